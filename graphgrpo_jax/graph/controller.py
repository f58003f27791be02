"""The edge-coefficient controller (METHOD.md A3): how φ moves during training, as pure functions.

Modes (`controller.mode`), all logging φ per edge every step:

* `fixed`: φ stays at `graph.phi_init`.
* `main_loss`: φ takes a step down the gradient of the main clipped policy loss, which reaches φ
  through the differentiable advantages of `credit.compute_credit`. With one PPO iteration
  (`num_iterations = 1`) the ratio is 1 and advantages have zero group mean, so that gradient is zero
  in expectation: the mode refuses μ = 1, and any step whose φ-gradient norm is below `grad_tol` is
  skipped (counted), so Adam never normalises noise into a step.
* `alignment`: φ ascends the cosine between the policy gradient under graph credit and the
  outcome-GRPO gradient, cross-fitted: graph credit on one half of the prompts against GRPO on the
  other (`alignment_objective`). On the same half the optimum would be φ = 1, plain GRPO, trivially.

In both learnable modes a step whose φ-gradient norm is below `grad_tol`, or is not finite, is
skipped: φ and the optimizer state stay as they were and `controller/num_skipped` counts it.

Parametrisation. The controller's parameter *is* φ, one coefficient per edge in [0, 1], kept there by
Euclidean projection after every optimizer step (projected gradient descent). Configured endpoints
(the default's exact 0s and 1s) are represented exactly, the gradient is the plain derivative of the
objective in φ (finite everywhere, never squashed by a saturated sigmoid), and an Adam learning rate
reads directly as "φ moves about this much per step". At the box's faces a gradient pointing
outward leaves φ there; one pointing inward moves it.

API::

    settings = controller_settings(config.controller, spec, num_iterations=config.grpo.num_iterations)
    state = init_controller(spec, settings)
    grads = jax.grad(loss_in_phi)(state.phi)       # main_loss: the policy loss as a function of φ
                                                   # alignment: minus alignment_objective
    state, metrics = controller_update(state, grads, settings)   # metrics['phi/y->ms'], ...
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from graphgrpo_jax.graph.spec import GraphSpec

MODES = ("fixed", "main_loss", "alignment")
OPTIMIZERS = ("adam", "sgd")

PyTree = Any


def default_controller_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        mode="fixed",  # fixed | main_loss | alignment
        learning_rate=1e-2,  # in units of φ per step under Adam
        grad_tol=1e-8,  # skip a step whose φ-gradient norm is below this
        optimizer="adam",  # adam | sgd
    ))


@dataclasses.dataclass(frozen=True)
class ControllerSettings:
    """Static controller options (hashable), plus the edge names its logs use."""

    mode: str
    learning_rate: float
    grad_tol: float
    optimizer: str
    edge_names: tuple[str, ...]


def validate_controller_config(cfg: Mapping[str, Any] | ml_collections.ConfigDict,
                               num_iterations: int) -> None:
    """Fails on the first bad controller option, naming it and the reason."""

    def fail(field: str, why: str) -> None:
        raise ValueError(f"controller config field {field!r} = {cfg[field]!r}: {why}")

    if cfg["mode"] not in MODES:
        fail("mode", f"choose one of {MODES}")
    if cfg["mode"] == "main_loss" and num_iterations == 1:
        fail("mode", "needs num_iterations >= 2 (PPO epochs per batch): with one iteration the "
             "ratio is 1 and group-centred advantages make the loss's φ-gradient zero in expectation")
    if cfg["optimizer"] not in OPTIMIZERS:
        fail("optimizer", f"choose one of {OPTIMIZERS}")
    if not cfg["learning_rate"] > 0:
        fail("learning_rate", "must be > 0")
    if not cfg["grad_tol"] >= 0:
        fail("grad_tol", "must be >= 0")


def controller_settings(cfg: Mapping[str, Any] | ml_collections.ConfigDict, spec: GraphSpec,
                        num_iterations: int) -> ControllerSettings:
    validate_controller_config(cfg, num_iterations)
    return ControllerSettings(mode=cfg["mode"], learning_rate=float(cfg["learning_rate"]),
                              grad_tol=float(cfg["grad_tol"]), optimizer=cfg["optimizer"],
                              edge_names=spec.edge_names)


class ControllerState(NamedTuple):
    phi: jax.Array  # [E] in [0, 1]
    opt_state: optax.OptState
    step: jax.Array  # int32: updates requested
    num_skipped: jax.Array  # int32: learnable-mode steps skipped below grad_tol (or non-finite)


def _optimizer(settings: ControllerSettings) -> optax.GradientTransformation:
    make = {"adam": optax.adam, "sgd": optax.sgd}[settings.optimizer]
    return make(settings.learning_rate)


def init_controller(spec: GraphSpec, settings: ControllerSettings) -> ControllerState:
    phi = jnp.asarray(spec.phi_init, jnp.float32)
    return ControllerState(phi=phi, opt_state=_optimizer(settings).init(phi),
                           step=jnp.zeros((), jnp.int32), num_skipped=jnp.zeros((), jnp.int32))


def phi_metrics(phi: jax.Array, edge_names: tuple[str, ...]) -> dict[str, jax.Array]:
    return {f"phi/{name}": phi[e] for e, name in enumerate(edge_names)}


@functools.partial(jax.jit, static_argnames=("settings",))
def controller_update(state: ControllerState, grads: jax.Array | None,
                      settings: ControllerSettings) -> tuple[ControllerState, dict[str, jax.Array]]:
    """One controller step. `grads` is the gradient in φ of the objective to *minimise* (ignored,
    and may be None, in `fixed` mode). Returns the new state and this step's logs."""
    step = state.step + 1
    if settings.mode == "fixed":
        metrics = {"controller/grad_norm": jnp.zeros(()), "controller/skipped": jnp.zeros(()),
                   "controller/num_skipped": state.num_skipped}
        return state._replace(step=step), {**phi_metrics(state.phi, settings.edge_names), **metrics}

    grad_norm = optax.global_norm(grads)
    skip = ~(jnp.isfinite(grad_norm) & (grad_norm >= settings.grad_tol))
    updates, opt_state = _optimizer(settings).update(grads, state.opt_state, state.phi)
    phi = optax.projections.projection_box(optax.apply_updates(state.phi, updates), 0.0, 1.0)
    keep = lambda old, new: jnp.where(skip, old, new)
    new_state = ControllerState(
        phi=keep(state.phi, phi),
        opt_state=jax.tree_util.tree_map(keep, state.opt_state, opt_state),
        step=step,
        num_skipped=state.num_skipped + skip.astype(jnp.int32),
    )
    metrics = {"controller/grad_norm": grad_norm, "controller/skipped": skip.astype(jnp.float32),
               "controller/num_skipped": new_state.num_skipped}
    return new_state, {**phi_metrics(new_state.phi, settings.edge_names), **metrics}


def cosine_similarity(a: PyTree, b: PyTree) -> jax.Array:
    """Cosine between two pytrees of equal structure; 0 (with a finite gradient) if either is 0."""
    dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    squared = [sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(t)) for t in (a, b)]
    ok = (squared[0] > 0) & (squared[1] > 0)
    norms = jnp.sqrt(jnp.where(ok, squared[0] * squared[1], 1.0))
    return jnp.where(ok, dot / norms, 0.0)


def split_prompt_halves(batch: PyTree, group_size: int) -> tuple[PyTree, PyTree]:
    """Two halves of a batch by prompt (whole groups): leading axis `num_groups × group_size`."""
    leaves = jax.tree_util.tree_leaves(batch)
    num_groups = leaves[0].shape[0] // group_size
    if num_groups < 2 or leaves[0].shape[0] % group_size:
        raise ValueError(f"cross-fitting needs >= 2 whole groups of {group_size}; the batch has "
                         f"{leaves[0].shape[0]} rollouts")
    cut = num_groups // 2 * group_size
    return (jax.tree_util.tree_map(lambda x: x[:cut], batch),
            jax.tree_util.tree_map(lambda x: x[cut:], batch))


def alignment_objective(phi: jax.Array, graph_policy_gradient: Callable[[jax.Array, PyTree], PyTree],
                        outcome_policy_gradient: Callable[[PyTree], PyTree],
                        halves: tuple[PyTree, PyTree]) -> jax.Array:
    """Cross-fitted cosine between graph-credit and outcome-GRPO policy gradients, to maximise.

    `graph_policy_gradient(phi, half)` is the policy-parameter gradient of the surrogate with graph
    advantages (differentiable in φ); `outcome_policy_gradient(half)` the same with plain GRPO
    advantages (a constant here). The result is the mean of cos(graph on half 0, GRPO on half 1) and
    cos(graph on half 1, GRPO on half 0): GRPO's gradient on held-out prompts estimates the true
    policy gradient without sharing the noise of the prompts graph credit is computed on.
    """
    first, second = halves
    target = [jax.lax.stop_gradient(outcome_policy_gradient(h)) for h in (second, first)]
    return 0.5 * (cosine_similarity(graph_policy_gradient(phi, first), target[0])
                  + cosine_similarity(graph_policy_gradient(phi, second), target[1]))
