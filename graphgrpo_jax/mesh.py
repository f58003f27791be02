"""Scale-out: a (data, fsdp, tensor) device mesh, logical sharding rules, and sharded jitted steps.

The same training code runs on 1 CPU, a fake 8-device CPU mesh, one GPU host and a TPU pod slice; only
`config.mesh` changes. The pieces, in the order a stage uses them:

1. `maybe_initialize_distributed(config.mesh)`: joins a multi-host job, before JAX touches a device.
2. `make_mesh(config.mesh)`: axes (data, fsdp, tensor), sizes from the config, -1 for "the rest",
   Auto axis types (linen layers fail under the Explicit axes `jax.make_mesh` defaults to).
3. `logical_rules(config.mesh)`: model code names parameter axes logically (`vocab`, `embed`, `heads`,
   ...; see `models/decoder.py`); the rules map each name to mesh axes. A dimension a rule cannot shard
   evenly (Qwen2.5's 2 kv heads on 4 tensor devices) is replicated instead, with a log line.
4. `sharded_init(init_fn, mesh, logical_axes)`: plans shardings with `jax.eval_shape`, then runs
   the init under `jax.jit(out_shardings=...)`, so no device ever holds more than its shard. Optimizer
   moments follow their params; everything else (step counts, RNG keys, φ) is replicated.
5. `shard_step`, `shard_rl_update`, `shard_sampler`: `jax.jit` with those shardings (today's pjit).
6. Per-process input: `process_batch_slice` says which rows of a global batch this process loads, and
   `global_batch` assembles the process-local rows into one global array; `host_to_global` places
   host arrays every process holds whole (checkpoint weights).

The stages use these through one object, `Layout.from_config(config.mesh)`: state built shard by shard
(`Layout.init`), steps jitted with the state's shardings (`Layout.step`), batches loaded per process
(`Layout.load_batch`), sampled rollouts brought back to every host (`Layout.to_host`). The default mesh,
`single`, is one device, so a laptop run compiles the same programs it always did.

Checkpoints need nothing extra: orbax writes global arrays collectively (every process calls `save`),
and restores into whatever shardings the target tree carries (`with_shardings`), so a checkpoint saved
on 8 devices restores on 1 and vice versa. Logs and metrics are written by process 0 (`metrics.py`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from graphgrpo_jax import sampling
from graphgrpo_jax.models import decoder, lora

PyTree = Any
Rules = Mapping[str, tuple[str, ...]]  # logical axis name -> mesh axes (empty: replicated)

MESH_AXES = ("data", "fsdp", "tensor")

# Megatron-style tensor parallelism (heads, mlp and vocab split over `tensor`) on top of ZeRO-3 style
# fully sharded data parallelism (`embed` split over `fsdp`); batches split over both data axes.
LOGICAL_RULES: Rules = types.MappingProxyType({
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "layers": (),
    "lora_rank": (),  # LoRA adapters: sharded along their other axis, like the kernel they adapt
})


# --------------------------------------------------------------------------------------------------
# Mesh and rules from the config
# --------------------------------------------------------------------------------------------------

def _sizes(mesh_cfg: Mapping[str, Any]) -> list[int]:
    """The configured axis sizes (data, fsdp, tensor), checked; absent axes have size 1."""
    sizes = []
    for axis in MESH_AXES:
        size = mesh_cfg.get(axis, 1)
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"config.mesh.{axis} = {size!r}: a mesh axis size is a positive int, or -1 "
                             f"for the remaining devices")
        sizes.append(size)
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    return sizes


def mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> tuple[int, ...]:
    """Axis sizes (data, fsdp, tensor) from the config; one axis may be -1, meaning all remaining devices."""
    sizes = _sizes(mesh_cfg)
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"config.mesh sizes {dict(zip(MESH_AXES, sizes))}: {num_devices} devices do "
                             f"not split into the fixed axes' {fixed}")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"config.mesh sizes {dict(zip(MESH_AXES, sizes))} need {fixed} devices, but "
                         f"{num_devices} are available (use -1 on one axis for 'the rest')")
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: every device of every process) with Auto axis types.

    By default, a single-process run whose axis sizes are all fixed and need fewer devices than it has
    takes the first ones: the `single` preset (1, 1, 1) is one device however many are visible (the
    test suite's fake 8-device CPU, a GPU host that runs a small job). A -1 axis always takes them all.
    `jax.make_mesh` orders the devices by the hardware topology where it knows it (TPU slices), so the
    innermost axis, `tensor`, gets the fastest links.
    """
    if devices is None:
        devices = jax.devices()
        sizes = _sizes(mesh_cfg)
        if -1 not in sizes and jax.process_count() == 1 and math.prod(sizes) < len(devices):
            devices = devices[:math.prod(sizes)]
    devices = list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _as_mesh_axes(value: Any, field: str) -> tuple[str, ...]:
    axes = () if value is None else (value,) if isinstance(value, str) else tuple(value)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown or len(set(axes)) != len(axes):
        raise ValueError(f"{field} = {value!r}: name distinct mesh axes among {MESH_AXES}, or None")
    return axes


def logical_rules(mesh_cfg: Mapping[str, Any] | None = None) -> dict[str, tuple[str, ...]]:
    """`LOGICAL_RULES` updated with `config.mesh.rules` ({logical name: mesh axis, axes or None})."""
    rules = dict(LOGICAL_RULES)
    overrides = (mesh_cfg or {}).get("rules") or {}
    for name, value in overrides.items():
        rules[name] = _as_mesh_axes(value, f"config.mesh.rules.{name}")
    return rules


def _axis_sizes(mesh: Mesh | Mapping[str, int]) -> Mapping[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else mesh


def mesh_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh | Mapping[str, int],
              rules: Rules = LOGICAL_RULES, *, name: str = "array") -> PartitionSpec:
    """The mesh PartitionSpec of an array of `shape` whose dimensions carry the `logical` names.

    Mesh axes of size 1 are dropped (they shard nothing). A dimension is replicated, with a log line,
    when its size is not divisible by its mesh axes or when an earlier dimension already uses one of them.
    """
    if len(logical) != len(shape):
        raise ValueError(f"{name}: logical axes {logical} do not match its shape {tuple(shape)}")
    sizes = _axis_sizes(mesh)
    used: set[str] = set()
    spec = []
    for dim, (logical_name, size) in enumerate(zip(logical, shape)):
        if logical_name is None:
            spec.append(None)
            continue
        if logical_name not in rules:
            raise ValueError(f"{name}: logical axis {logical_name!r} has no sharding rule; add "
                             f"config.mesh.rules.{logical_name} (rules: {sorted(rules)})")
        axes = tuple(a for a in rules[logical_name] if sizes[a] > 1)
        devices = math.prod(sizes[a] for a in axes)
        if used & set(axes):
            logging.info("%s: dim %d (%s) is replicated: mesh axes %s already shard another dim",
                         name, dim, logical_name, sorted(used & set(axes)))
            axes = ()
        elif size % devices:
            logging.info("%s: dim %d (%s, size %d) is replicated: not divisible by mesh axes %s (%d devices)",
                         name, dim, logical_name, size, axes, devices)
            axes = ()
        used |= set(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


# --------------------------------------------------------------------------------------------------
# Shardings of params, train state and batches
# --------------------------------------------------------------------------------------------------

def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """Splits an array's leading (batch) axis over the rule's `batch` axes; use it as a pytree prefix."""
    axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(mesh: Mesh, params_like: PyTree, logical_axes: PyTree,
                    rules: Rules = LOGICAL_RULES) -> PyTree:
    """A NamedSharding per param; `params_like` gives the shapes (arrays or `jax.eval_shape` structs)."""
    def sharding(path, logical, like):
        return NamedSharding(mesh, mesh_spec(logical, like.shape, mesh, rules, name=_path_name(path)))

    return jax.tree_util.tree_map_with_path(sharding, logical_axes, params_like,
                                            is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(mesh: Mesh, state_like: Mapping[str, PyTree], params_shardings: PyTree) -> PyTree:
    """Shardings of a train state `{"params", "opt_state", "rng", ...}`.

    Every subtree laid out like `state["params"]` (same tree, same shapes: the params themselves,
    Adam's moments, a reference copy), or like its trainable part (`lora.split`: the adapters' moments),
    takes the params' shardings; all other leaves (counts, RNG keys, the controller's φ) are small and
    replicated.
    """
    layouts = [(state_like["params"], params_shardings)]
    if lora.has_adapters(state_like["params"]):
        layouts.append((lora.split(state_like["params"])[0], lora.split(params_shardings)[0]))
    signatures = [(jax.tree_util.tree_structure(like), [x.shape for x in jax.tree_util.tree_leaves(like)])
                  for like, _ in layouts]

    def matching(node) -> int | None:
        signature = (jax.tree_util.tree_structure(node), [getattr(x, "shape", None)
                                                          for x in jax.tree_util.tree_leaves(node)])
        return next((i for i, known in enumerate(signatures) if known == signature), None)

    return jax.tree_util.tree_map(
        lambda node: replicated(mesh) if matching(node) is None else layouts[matching(node)][1],
        state_like, is_leaf=lambda node: matching(node) is not None)


def with_shardings(like: PyTree, shardings: PyTree) -> PyTree:
    """`jax.ShapeDtypeStruct`s carrying `shardings`: the target tree of a (resharding) checkpoint restore."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  like, shardings)


def host_to_global(host_tree: PyTree, shardings: PyTree) -> PyTree:
    """Global arrays from host arrays that every process holds whole (e.g. a Hugging Face checkpoint
    each host read): each process copies only the slices its own devices hold."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x[index])),
        host_tree, shardings)


def sharded_init(init_fn: Callable[..., dict], mesh: Mesh, logical_axes: PyTree, *args,
                 rules: Rules = LOGICAL_RULES) -> tuple[dict, PyTree]:
    """(state, its shardings) from `init_fn(*args) -> {"params", ...}`, each device building only its shard.

    The shapes come from `jax.eval_shape`, so nothing is materialised before the shardings are known;
    `args` (e.g. restored params to build an RL state around) are passed, not closed over, so they are
    not baked into the compiled init as constants.
    """
    like = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(mesh, like, param_shardings(mesh, like["params"], logical_axes, rules))
    return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


# --------------------------------------------------------------------------------------------------
# Sharded jitted steps
# --------------------------------------------------------------------------------------------------

def shard_step(step_fn: Callable, mesh: Mesh, state_shardings: PyTree,
               batch_shardings: PyTree | None = None) -> Callable:
    """`jax.jit` of a `step(state, batch) -> (state, metrics)` (SFT, distillation) with the state kept in
    its shardings (and donated), the batch split over the batch axes, and the metrics replicated."""
    batch_shardings = batch_sharding(mesh) if batch_shardings is None else batch_shardings
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def shard_rl_update(update: Callable, mesh: Mesh, params_shardings: PyTree, opt_shardings: PyTree, *,
                    reference: bool, batch_shardings: PyTree | None = None) -> Callable:
    """`train/rl.py`'s `update(params, opt_state, phi, batch, graph, ref_params) -> (params, opt_state, g_phi,
    metrics)` with explicit shardings, each argument's found by its name in the update's signature, so that
    the two cannot drift apart (a parameter this function does not know fails here, naming it).

    The token batch is split over the batch axes; φ and the rollout graph (small, and read whole by the
    credit computation) are replicated; the reference params (when `reference`, i.e. `beta > 0`; else None)
    share the shardings of the policy's trainable part (`lora.split`: with LoRA the reference is adapters).
    Params and optimizer state are donated and come back in their shardings; the φ-gradient and the metrics
    come back replicated.
    """
    rep = replicated(mesh)
    by_name = {"params": params_shardings, "opt_state": opt_shardings, "phi": rep,
               "batch": batch_sharding(mesh) if batch_shardings is None else batch_shardings, "graph": rep,
               "ref_params": lora.split(params_shardings)[0] if reference else None}
    names = list(inspect.signature(update).parameters)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise TypeError(f"shard_rl_update: the update's parameters {unknown} have no sharding; an RL update "
                        f"takes {list(by_name)}")
    return jax.jit(update, in_shardings=tuple(by_name[name] for name in names),
                   out_shardings=(params_shardings, opt_shardings, rep, rep),
                   donate_argnums=tuple(i for i, name in enumerate(names) if name in ("params", "opt_state")))


def _check_prompts(prompt_tokens, prompt_mask, group_size: int) -> None:
    """`sampling.check_prompts` on this process's rows only (the others are not addressable); groups are
    checked within each shard that holds whole groups."""
    if not isinstance(prompt_mask, jax.Array):
        return sampling.check_prompts(prompt_tokens, prompt_mask, group_size)
    for tokens, mask in zip(prompt_tokens.addressable_shards, prompt_mask.addressable_shards):
        first = mask.index[0].start or 0
        whole_groups = first % group_size == 0 and mask.data.shape[0] % group_size == 0
        sampling.check_prompts(tokens.data, mask.data, group_size if whole_groups else 1, first_row=first)


def _generate(model_config: decoder.DecoderConfig, max_new_tokens: int, group_size: int, params, prompt_tokens,
              prompt_mask, rng, knobs, eos_ids, pad_id) -> sampling.SampleOutput:
    """Prefill and decode as one program (module-level, so every sampler of a shape shares its compilation)."""
    next_logits, cache = sampling.prefill(params, model_config, prompt_tokens, prompt_mask,
                                          cache_len=prompt_tokens.shape[1] + max_new_tokens, group_size=group_size)
    output, _ = sampling.decode(params, model_config, cache, next_logits, rng, knobs, eos_ids, pad_id,
                                max_new_tokens=max_new_tokens)
    return output


def shard_sampler(mesh: Mesh, params_shardings: PyTree, model_config: decoder.DecoderConfig, *,
                  max_new_tokens: int, rules: Rules = LOGICAL_RULES, group_size: int = 1) -> Callable:
    """A sharded `sampling.generate`: prefill and decode as one jitted program over the mesh.

    Returns `generate(params, prompt_tokens, prompt_mask, rng, knobs, eos_ids, pad_id) -> SampleOutput`
    for left-padded global prompt arrays [B, P]; rows (and the KV cache they fill) are split over the
    batch axes, the params stay in their shardings, and the outputs come back split by rows. With
    `group_size` G > 1 the rows come in groups of G identical prompts, each prefilled once (the RL stage's
    rollouts). Samplers built again for the same mesh, model, length and group size reuse the compiled
    program.
    """
    batch, rep = batch_sharding(mesh, rules), replicated(mesh)
    jitted = jax.jit(_generate, static_argnums=(0, 1, 2),
                     in_shardings=(params_shardings, batch, batch, rep, rep, rep, rep), out_shardings=batch)

    def run(params, prompt_tokens, prompt_mask, rng, knobs: sampling.SamplingParams, eos_ids, pad_id):
        _check_prompts(prompt_tokens, prompt_mask, group_size)
        # Fixed dtypes, as in `sampling.generate`, so Python numbers and arrays share one compilation.
        knobs = sampling.SamplingParams(jnp.asarray(knobs.temperature, jnp.float32),
                                        jnp.asarray(knobs.top_k, jnp.int32), jnp.asarray(knobs.top_p, jnp.float32))
        return jitted(model_config, max_new_tokens, group_size, params, prompt_tokens, prompt_mask, rng, knobs,
                      jnp.atleast_1d(jnp.asarray(eos_ids, jnp.int32)), jnp.asarray(pad_id, jnp.int32))

    return run


# --------------------------------------------------------------------------------------------------
# Multi-host: joining the job, per-process input
# --------------------------------------------------------------------------------------------------

def maybe_initialize_distributed(mesh_cfg: Mapping[str, Any] | None) -> bool:
    """Joins a multi-process job when the config or the environment asks for one; returns whether it did.

    Call it before anything touches a device. `config.mesh.coordinator_address` (with `num_processes`
    and `process_id`) starts an explicit job; `config.mesh.distributed = True` or JAX's own environment
    variable `JAX_COORDINATOR_ADDRESS` lets JAX detect the rest (TPU pod slices, SLURM, Open MPI,
    Kubernetes). Otherwise this is a single-process run and nothing happens.
    """
    mesh_cfg = mesh_cfg or {}
    address = mesh_cfg.get("coordinator_address")
    wanted = address or mesh_cfg.get("distributed", False) or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not wanted or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(coordinator_address=address, num_processes=mesh_cfg.get("num_processes"),
                               process_id=mesh_cfg.get("process_id"))
    logging.info("joined a distributed job as process %d of %d (%d local, %d global devices)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def process_batch_slice(mesh: Mesh, global_batch_size: int, rules: Rules = LOGICAL_RULES) -> slice:
    """The rows of a global batch that this process loads: those its devices hold under `batch_sharding`.

    Processes whose devices share rows (a batch axis smaller than the process count) load the same rows.
    """
    sharding = batch_sharding(mesh, rules)
    num_splits = math.prod(mesh.shape[a] for a in rules["batch"])
    if global_batch_size % num_splits:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {num_splits} "
                         f"batch shards of mesh {dict(mesh.shape)}")
    spans = {index[0].indices(global_batch_size)[:2]
             for index in sharding.addressable_devices_indices_map((global_batch_size,)).values()}
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    if sum(e - s for s, e in spans) != stop - start:
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {sorted(spans)} on "
                         f"mesh {dict(mesh.shape)}; order the mesh so each process's devices are adjacent")
    return slice(start, stop)


def global_batch(mesh: Mesh, local_batch: PyTree, global_batch_size: int, rules: Rules = LOGICAL_RULES
                 ) -> PyTree:
    """Global arrays [global_batch_size, ...] from this process's rows (`process_batch_slice`) of each leaf."""
    sharding = batch_sharding(mesh, rules)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x),
                                                         (global_batch_size, *np.shape(x)[1:])),
        local_batch)


# --------------------------------------------------------------------------------------------------
# One object per stage: mesh + rules -> shardings, sharded state, per-process batches, jitted steps
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a stage's arrays live: the mesh of `config.mesh` and its logical rules.

    Every stage (SFT, RL, distillation) builds one with `Layout.from_config(config.mesh)` and places its
    state, batches and steps through it, so the stages cannot drift apart. Frozen and hashable: a cache
    key for compiled steps.
    """

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def from_config(cls, mesh_cfg: Mapping[str, Any] | None) -> "Layout":
        mesh_cfg = mesh_cfg or {}
        return cls(make_mesh(mesh_cfg), tuple(sorted(logical_rules(mesh_cfg).items())))

    @property
    def rule_map(self) -> dict[str, tuple[str, ...]]:
        return dict(self.rules)

    @property
    def batch_sharding(self) -> NamedSharding:
        return batch_sharding(self.mesh, self.rule_map)

    def param_shardings(self, params_like: PyTree, logical_axes: PyTree) -> PyTree:
        return param_shardings(self.mesh, params_like, logical_axes, self.rule_map)

    def state_shardings(self, state_like: Mapping[str, PyTree], logical_axes: PyTree) -> PyTree:
        """Shardings of a `{"params", ...}` state (arrays or `jax.eval_shape` structs); see `state_shardings`."""
        return state_shardings(self.mesh, state_like, self.param_shardings(state_like["params"], logical_axes))

    def init(self, init_fn: Callable[..., dict], logical_axes: PyTree, *args) -> tuple[dict, PyTree]:
        """`sharded_init` on this layout: (state, its shardings), each device building only its shard."""
        return sharded_init(init_fn, self.mesh, logical_axes, *args, rules=self.rule_map)

    def step(self, step_fn: Callable, state_shardings: PyTree) -> Callable:
        """`shard_step` on this layout: a jitted `step(state, batch)` with batches split over the batch axes."""
        return shard_step(step_fn, self.mesh, state_shardings, self.batch_sharding)

    def load_batch(self, rows: np.ndarray, load: Callable[[np.ndarray], PyTree]) -> PyTree:
        """The global batch of dataset `rows`, each process calling `load` on only the rows its devices hold.

        `load(rows) -> pytree of host arrays [len(rows), ...]`; `rows` is the same on every process.
        """
        mine = process_batch_slice(self.mesh, len(rows), self.rule_map)
        return global_batch(self.mesh, load(np.asarray(rows)[mine]), len(rows), self.rule_map)

    def to_host(self, tree: PyTree) -> PyTree:
        """Whole host (numpy) arrays of a pytree of global arrays, on every process (a collective)."""
        if jax.process_count() == 1:
            return jax.device_get(tree)
        return multihost_utils.process_allgather(tree, tiled=True)
