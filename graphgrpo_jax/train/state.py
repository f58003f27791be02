"""Training state and optimizers: plain pytrees, so they jit, shard and checkpoint without wrappers.

A state is a dict `{"params", "opt_state", "rng"}` (stages add their own entries, e.g. `phi`); the step
count lives in the checkpoint, not in the state, so resuming never depends on a counter array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from graphgrpo_jax.models import lora

SCHEDULES = ("constant", "cosine")
# Fields an optimizer section may also hold that its stage reads, not the optimizer: rows per step and the
# gradient-accumulation slices of a step (`config.optim` for SFT, `config.rl_optim` for the RL update).
STAGE_FIELDS = ("batch_size", "microbatches")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """An optimizer section (`config.optim`, `config.rl_optim`, `config.distill.optim`), frozen and hashable:
    the cache key of compiled steps. AdamW with global-norm clipping; the defaults are those of a section
    that leaves the field out."""

    learning_rate: float
    warmup_steps: int = 0  # linear warm-up from 0
    schedule: str = "constant"  # after the warm-up: constant, or cosine decay to 10% at the last step
    grad_clip: float = 1.0  # global gradient norm
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0  # decoupled (AdamW)


def optimizer_settings(cfg: Mapping[str, Any] | ml_collections.ConfigDict | OptimizerSettings,
                       section: str | None = None) -> OptimizerSettings:
    """The validated `OptimizerSettings` of a config section, failing on the first bad field, named
    `config.<section>.<field>` (or as an optimizer config field when `section` is not given): a field neither
    the optimizer nor its stage reads (`STAGE_FIELDS`), which would otherwise be ignored, or a bad value."""
    if isinstance(cfg, OptimizerSettings):
        return cfg

    def fail(field: str, why: str) -> None:
        name = f"optimizer config field {field!r}" if section is None else f"config.{section}.{field}"
        raise ValueError(f"{name} = {cfg.get(field)!r}: {why}")

    known = [field.name for field in dataclasses.fields(OptimizerSettings)]
    for field in sorted(set(cfg.keys()) - set(known) - set(STAGE_FIELDS)):
        fail(field, f"no such option; an optimizer section holds {known} and its stage's {list(STAGE_FIELDS)}")
    if "learning_rate" not in cfg:
        fail("learning_rate", "is required")
    values = {name: cfg[name] for name in known if name in cfg}
    for name, value in values.items():
        if name == "schedule":
            if value not in SCHEDULES:
                fail(name, f"choose one of {SCHEDULES}")
        elif isinstance(value, bool) or not isinstance(value, int if name == "warmup_steps" else (int, float)):
            fail(name, "must be an integer" if name == "warmup_steps" else "must be a number")
    settings = OptimizerSettings(**{name: value if name in ("schedule", "warmup_steps") else float(value)
                                    for name, value in values.items()})
    if not settings.learning_rate > 0:
        fail("learning_rate", "must be > 0")
    if settings.warmup_steps < 0:
        fail("warmup_steps", "must be >= 0")
    if not settings.grad_clip > 0:
        fail("grad_clip", "must be > 0")
    for beta in ("b1", "b2"):
        if not 0.0 <= getattr(settings, beta) < 1.0:
            fail(beta, "must lie in [0, 1)")
    if not settings.weight_decay >= 0:
        fail("weight_decay", "must be >= 0")
    return settings


def learning_rate_schedule(settings: OptimizerSettings, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then constant or cosine decay to 10% over the run."""
    warmup = min(settings.warmup_steps, max(num_steps - 1, 0))
    if settings.schedule == "cosine":
        warmup = max(warmup, 1)
        return optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, warmup, max(num_steps, warmup + 1),
                                                  end_value=0.1 * settings.learning_rate)
    if warmup == 0:
        return optax.constant_schedule(settings.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, settings.learning_rate, warmup),
                                 optax.constant_schedule(settings.learning_rate)], [warmup])


def make_optimizer(settings: OptimizerSettings | Mapping[str, Any] | ml_collections.ConfigDict,
                   num_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping over `num_steps` steps, from `OptimizerSettings` or an optimizer config
    section (read through `optimizer_settings`)."""
    settings = optimizer_settings(settings)
    return optax.chain(
        optax.clip_by_global_norm(settings.grad_clip),
        optax.adamw(learning_rate_schedule(settings, num_steps), b1=settings.b1, b2=settings.b2,
                    weight_decay=settings.weight_decay),
    )


def new_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> dict:
    """A train state around `params` (pure, so `Layout.init` can build it shard by shard). The optimizer
    state covers the trainable params only (`lora.split`: the adapters when the model has them)."""
    return {"params": params, "opt_state": optimizer.init(lora.split(params)[0]), "rng": rng}


def apply_gradients(optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
                    grads: Any) -> tuple[Any, Any]:
    """(params, opt_state) after one optimizer step, `grads` being those of the trainable params
    (`lora.split(params)[0]`, the whole tree without adapters); the frozen params come back as they were."""
    trainable, frozen = lora.split(params)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return lora.join(frozen, optax.apply_updates(trainable, updates)), opt_state


def create_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> dict:
    """The state, committed to the default device: uncommitted leaves (e.g. optax's step counters) would
    make the first jitted step compile once more when its outputs come back committed."""
    return jax.device_put(new_state(params, optimizer, rng), jax.devices()[0])


def split_rows(tree: Any, slices: int, rows_together: int = 1) -> Any:
    """Every leaf `[R, ...]` as `[slices, R / slices, ...]`, slice j holding blocks j, j + n, j + 2n, ... of
    `rows_together` consecutive rows (n = `slices`). Strided, so that for a batch sharded over devices
    in contiguous row blocks whose size is a multiple of n · rows_together, every slice is spread evenly
    over the devices and no row moves. `join_rows` undoes it."""
    rows = {x.shape[0] for x in jax.tree_util.tree_leaves(tree)}
    if len(rows) != 1 or slices < 1 or rows_together < 1 or next(iter(rows)) % (slices * rows_together):
        raise ValueError(f"microbatches={slices} of blocks of {rows_together} rows must divide the batch's "
                         f"rows {sorted(rows)}")
    return jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x.reshape(-1, slices, rows_together, *x.shape[1:]), 0, 1).reshape(
            slices, -1, *x.shape[1:]), tree)


def join_rows(tree: Any, rows_together: int = 1) -> Any:
    """The inverse of `split_rows`: leaves `[slices, R / slices, ...]` back to `[R, ...]`."""
    def join(x):
        blocks = x.reshape(x.shape[0], -1, rows_together, *x.shape[2:])
        return jnp.swapaxes(blocks, 0, 1).reshape(-1, *x.shape[2:])
    return jax.tree_util.tree_map(join, tree)


def map_rows(fn: Callable[[Any], Any], batch: Any, microbatches: int = 1, rows_together: int = 1) -> Any:
    """`fn(batch)` for a row-wise `fn` (outputs `[R, ...]`), run on `microbatches` slices of rows in turn."""
    if microbatches == 1:
        return fn(batch)
    return join_rows(jax.lax.map(fn, split_rows(batch, microbatches, rows_together)), rows_together)


def summed_value_and_grad(loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any, microbatches: int = 1,
                          *, has_aux: bool = False, rows_together: int = 1) -> tuple[Any, Any]:
    """`jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch)` for a loss (and aux outputs) that is a
    *sum* over the batch's rows, computed `microbatches` slices of rows at a time (`split_rows`; blocks of
    `rows_together` rows stay in one slice) and added up: gradient accumulation.

    Why: on CPU a smaller working set per forward/backward runs faster (the small preset's train step
    is ~10% faster in 4 slices of 4 rows than in one of 16), and on accelerators it bounds activation
    memory. Sums are accumulated in float32 and the gradients returned in the params' dtypes.
    """
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
    if microbatches == 1:
        return value_and_grad(params, batch)

    def add(totals, micro):
        return jax.tree_util.tree_map(lambda t, x: t + x.astype(jnp.float32), totals,
                                      value_and_grad(params, micro)), None

    slices = split_rows(batch, microbatches, rows_together)
    shapes = jax.eval_shape(value_and_grad, params, jax.tree_util.tree_map(lambda x: x[0], slices))
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
    value, grads = jax.lax.scan(add, zeros, slices)[0]
    return value, jax.tree_util.tree_map(lambda g, p: g.astype(jnp.result_type(p)), grads, params)
