"""Graph credit: outcome reward -> node credit -> token advantages (METHOD.md A2), jitted.

Everything here is a pure function of a batch encoded by `spec.encode_rollouts`, of the per-edge
coefficients `phi` (an explicit argument, so `jax.grad` reaches it) and of static settings.

API (what the RL loop calls)::

    spec = graph_spec(config.graph); settings = credit_settings(config.credit, spec)
    graph = encode_rollouts(spec, rewards, node_values, gold_label, group_size)        # host, numpy
    out = compute_credit(graph, phi, token_node_ids, completion_mask, spec=spec, settings=settings)
    out.token_advantages   [N, T] fp32, for the clipped policy loss
    out.node_advantages    [N, V] the advantage given to each node's tokens
    out.node_credits       [N, V] the credit c_{i,v} before normalisation
    out.node_stats         {'credit/adv_mean/qs': scalar, ... mean/std/min/max per node}

`token_node_ids[i, t]` is the node of token t (-1 outside every span: the root's advantage) and
`completion_mask[i, t]` is False on prompt and padding tokens (advantage 0). Their N rows are the
batch's real rollouts in order (N below the number of graphs: the encoding always adds padding).
`phi` is the `[E]` vector of edge coefficients (`spec.phi_init`, or the controller's state).

The computation (METHOD.md A2, with R_i the outcome and groups the prompts' rollouts):

1. Evidence ℓ_{i,v}. `group_value`: (Σ_{j: z_jv = z_iv} R_j + κ·mean R) / (n_iv + κ) over the group.
   `rule_consistency`: for the label rule's inputs, 1 if z_{i,v} can give the gold label under the rule
   (some value of the other inputs does), else 0; any other node inherits the mean evidence of the
   nodes that consume it. A missing node (value -1), or a missing gold label, falls back to R_i: there
   is no evidence about it, so it is credited like the outcome.
2. Propagation from the root, level by level with segment sums over the edges:
   c_{i,root} = R_i, c_{i,v} = (1 - Σ_{u->v} φ'_uv)·ℓ_{i,v} + Σ_{u->v} φ'_uv·c_{i,u}.
3. Normalisation inside each group (`norm`): A = (c - mean_j c_j) / (std_j R_j + eps) (`outcome`)
   or / (std_j c_j + eps) (`node`). Under `outcome` the reward scale follows `config.grpo.scale_rewards`,
   as in TRL: the group's std (`group`), the whole batch's (`batch`) or none (`none`, no division); the
   mean is always the group's. `node` defines its own scale and takes only `group`. Stds are unbiased
   (n - 1), as TRL's GRPO; `eps` is `credit.eps`, 1e-6 by default (TRL adds 1e-4). A
   group whose outcomes are all equal gets A = 0 in every mode (it carries no outcome signal, and the
   division would blow rule evidence up); under `node`, so does a node whose credit has no spread.
   Both are exact tests (max == min), and every std and division is guarded so that gradients are
   finite there. `group_moments` is the package's one group statistic: the RL stage's reward logs
   (`rl/grpo.group_reward_stats`) read it too.
4. A node missing from a rollout gets advantage 0 (tokens of a span whose value did not parse
   included); the root never does, since R_i is defined for every rollout (r_format for format
   failures), so the tokens of a failed generation still learn. `outcome` knows nothing of nodes and
   gives every completion token Â_i, so `graph` at φ = 1 equals it wherever a span parsed.

The coefficient parametrisation. `phi[e]` is the coefficient of edge e itself, a number in [0, 1]
that the controller keeps there by projection (see `controller.py`); a node whose incoming
coefficients sum above 1 uses them scaled to sum to 1: φ' = φ / max(1, Σ_in φ). So φ = 1 everywhere
means c = R on every node, plain GRPO exactly, and the configured 0s and 1s are represented exactly,
which a sigmoid of a finite θ cannot do; the gradient in φ is the plain derivative, finite everywhere.

Variants (a registry; `register_variant` adds one):
  `outcome`        plain GRPO: every node, and every completion token, gets Â_i; c = R.
  `graph`          the credits above, per-node normalised.
  `chain_process`  DeepSeekMath-style process supervision: a node's tokens get the sum of the
                   normalised credits of the node and of all its later steps (the nodes credit
                   reaches it from, up to the root); over a chain, the step and all later steps.
                   With φ = 0 each step is rewarded by its own evidence alone, as in DeepSeekMath.
  `pure_min`       PURE's min-form credit (arXiv 2504.15275): a node's tokens get the minimum, not the sum, of
                   the normalised advantages of the node and of its later steps (those present).
  `path_scaled`    A_{i,v} = w_v·Â_i with w_root = 1, w_v = Σ_{u->v} φ'_uv·w_u; c = w_v·R_i.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np

from graphgrpo_jax.graph.spec import GraphSpec, default_graph_config, graph_spec

EVIDENCE_MODES = ("group_value", "rule_consistency")
NORM_MODES = ("outcome", "node")


def default_credit_config() -> ml_collections.ConfigDict:
    """The "consumer evidence" default of METHOD.md A2 (with `default_graph_config`'s φ)."""
    return ml_collections.ConfigDict(dict(
        variant="graph",  # outcome | chain_process | graph | path_scaled
        evidence="group_value",  # group_value | rule_consistency
        kappa=0.0,  # group_value smoothing towards the group mean outcome
        norm="outcome",  # outcome (default) | node (paper-faithful)
        eps=1e-6,  # added to every std an advantage is divided by (TRL's constant is 1e-4)
    ))


def credit_preset(name: str, graph_cfg: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """Flat overrides (`config.update_from_flattened_dict(...)`) for a named credit setting.

    `default`: consumer evidence (group_value, κ = 0, outcome norm, φ = 0 on edges out of the root and
    1 on all others). `paper_faithful`: node norm, κ = 1, φ = 0.5 on every edge. `graph_cfg` gives
    the edges (default: the 7-node relevance graph).
    """
    spec = graph_spec(graph_cfg if graph_cfg is not None else default_graph_config())
    if name == "default":
        root = spec.nodes[spec.root]
        phi = {e: 0.0 if e.startswith(root + "->") else 1.0 for e in spec.edge_names}
        overrides = dict(variant="graph", evidence="group_value", kappa=0.0, norm="outcome")
    elif name == "paper_faithful":
        phi = {e: 0.5 for e in spec.edge_names}
        overrides = dict(variant="graph", evidence="group_value", kappa=1.0, norm="node")
    else:
        raise ValueError(f"unknown credit preset {name!r}; choose 'default' or 'paper_faithful'")
    flat = {f"credit.{key}": value for key, value in overrides.items()}
    flat.update({f"graph.phi_init.{edge}": value for edge, value in phi.items()})
    return flat


@dataclasses.dataclass(frozen=True)
class CreditSettings:
    """The static part of the credit config (hashable: jitted functions take it as a static arg)."""

    variant: str = "graph"
    evidence: str = "group_value"
    kappa: float = 0.0
    norm: str = "outcome"
    eps: float = 1e-6
    scale_rewards: str = "group"  # config.grpo.scale_rewards: the reward std of a group, of the batch, or none


SCALE_REWARDS_MODES = ("group", "batch", "none")  # the modes of `config.grpo.scale_rewards`


def credit_settings(cfg: Mapping[str, Any] | ml_collections.ConfigDict,
                    spec: GraphSpec, scale_rewards: str = "group") -> CreditSettings:
    """Validates the credit config against the graph, failing with the field's name; `scale_rewards` is
    `config.grpo.scale_rewards`."""
    settings = CreditSettings(variant=cfg["variant"], evidence=cfg["evidence"],
                              kappa=float(cfg["kappa"]), norm=cfg["norm"], eps=float(cfg["eps"]),
                              scale_rewards=scale_rewards)

    def fail(field: str, why: str) -> None:
        raise ValueError(f"credit config field {field!r} = {getattr(settings, field)!r}: {why}")

    if settings.scale_rewards not in SCALE_REWARDS_MODES:
        raise ValueError(f"GRPO config field 'scale_rewards' = {scale_rewards!r}: choose one of "
                         f"{SCALE_REWARDS_MODES}")
    if settings.norm == "node" and settings.scale_rewards != "group":
        raise ValueError(f"GRPO config field 'scale_rewards' = {scale_rewards!r}: credit.norm='node' scales "
                         f"each node by its own group std; scale_rewards applies to credit.norm='outcome' only")

    if settings.variant not in _VARIANTS:
        fail("variant", f"choose one of {tuple(_VARIANTS)}")
    if settings.evidence not in EVIDENCE_MODES:
        fail("evidence", f"choose one of {EVIDENCE_MODES}")
    if settings.evidence == "rule_consistency" and not spec.label_rule:
        fail("evidence", "the graph config has no label_rule / rule_inputs to check consistency with")
    if settings.norm not in NORM_MODES:
        fail("norm", f"choose one of {NORM_MODES}")
    if not settings.kappa >= 0.0:
        fail("kappa", "must be >= 0")
    if not settings.eps >= 0.0:
        fail("eps", "must be >= 0")
    return settings


def effective_edge_weights(spec: GraphSpec, phi: jax.Array) -> jax.Array:
    """φ' = φ / max(1, Σ of φ into the same node): a node's incoming weights sum to at most 1."""
    receivers = jnp.asarray(spec.receivers, jnp.int32)
    incoming = jraph.segment_sum(phi, receivers, num_segments=spec.num_nodes)
    return phi / jnp.maximum(1.0, incoming[receivers])


# ----------------------------------------------------------------------------------- batch views


class _Batch(NamedTuple):
    """Per-node (flat, `[n]`) and per-graph (`[g]`) views of an encoded batch, padding neutralised."""

    node_type: jax.Array  # [n]
    node_graph: jax.Array  # [n] the rollout of each node
    value: jax.Array  # [n] -1 when missing or padding
    value_class: jax.Array  # [n]
    present: jax.Array  # [n] bool: a real node with a parsed value
    node_real: jax.Array  # [n] bool
    node_group_slot: jax.Array  # [n] group * V + type: one segment per (prompt, node)
    senders: jax.Array
    receivers: jax.Array
    edge_type: jax.Array
    edge_real: jax.Array  # [e] float 0/1
    graph_real: jax.Array  # [g] bool
    group: jax.Array  # [g] prompt id; every reduction masks padding out, whatever its id
    reward: jax.Array  # [g]
    gold_label: jax.Array  # [g]
    offsets: jax.Array  # [g] index of each graph's first node

    @property
    def num_graphs(self) -> int:
        return self.graph_real.shape[0]

    @property
    def num_node_slots(self) -> int:
        return self.node_type.shape[0]


def _batch_view(graph: jraph.GraphsTuple, spec: GraphSpec) -> _Batch:
    num_node_slots = graph.nodes["type"].shape[0]
    node_real = jraph.get_node_padding_mask(graph)
    graph_real = jraph.get_graph_padding_mask(graph)
    # searchsorted, not jnp.repeat: XLA mis-partitions the repeat inside the update's scan on some meshes
    node_graph = jnp.searchsorted(jnp.cumsum(graph.n_node), jnp.arange(num_node_slots), side="right")
    value = jnp.where(node_real, graph.nodes["value"], -1)
    group = graph.globals["group"]
    node_type = jnp.where(node_real, graph.nodes["type"], 0)
    return _Batch(
        node_type=node_type,
        node_graph=node_graph,
        value=value,
        value_class=jnp.where(node_real, graph.nodes["value_class"], -1),
        present=value >= 0,
        node_real=node_real,
        node_group_slot=group[node_graph] * spec.num_nodes + node_type,
        senders=graph.senders,
        receivers=graph.receivers,
        edge_type=jnp.where(jraph.get_edge_padding_mask(graph), graph.edges["type"], 0),
        edge_real=jraph.get_edge_padding_mask(graph).astype(jnp.float32),
        graph_real=graph_real,
        group=group,
        reward=jnp.where(graph_real, graph.globals["reward"], 0.0).astype(jnp.float32),
        gold_label=graph.globals["gold_label"],
        offsets=jnp.cumsum(graph.n_node) - graph.n_node,
    )


def _to_dense(batch: _Batch, flat: jax.Array, num_nodes: int) -> jax.Array:
    """`[n]` node values -> `[g, V]`: node v of graph g sits at offsets[g] + v (the encoding)."""
    index = batch.offsets[:, None] + jnp.arange(num_nodes)
    valid = batch.graph_real[:, None] & (index < batch.num_node_slots)
    return jnp.where(valid, flat[jnp.clip(index, 0, batch.num_node_slots - 1)], 0.0)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt whose gradient is 0, not NaN, at 0 (the derivative of sqrt is infinite there)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


class GroupMoments(NamedTuple):
    mean: jax.Array
    std: jax.Array
    spread: jax.Array  # bool: max > min, exact


def group_moments(x: jax.Array, segments: jax.Array, num_segments: int, real: jax.Array) -> GroupMoments:
    """Mean, unbiased std and spread of `x` within its segment, over the elements that are `real`, gathered
    back to every element. The one group statistic of the package (advantages and reward logs), so that a
    group's std and its no-signal test (spread, exact) cannot differ between them; gradients are finite at
    zero spread."""
    count = jraph.segment_sum(real.astype(jnp.float32), segments, num_segments)
    total = jraph.segment_sum(jnp.where(real, x, 0.0), segments, num_segments)
    mean = (total / jnp.maximum(count, 1.0))[segments]
    squares = jraph.segment_sum(jnp.where(real, (x - mean) ** 2, 0.0), segments, num_segments)
    std = _safe_sqrt(squares / jnp.maximum(count - 1.0, 1.0))[segments]
    high = jraph.segment_max(jnp.where(real, x, -jnp.inf), segments, num_segments)
    low = jraph.segment_min(jnp.where(real, x, jnp.inf), segments, num_segments)
    return GroupMoments(mean, std, (high > low)[segments])


def _normalise(centred: jax.Array, denominator: jax.Array, ok: jax.Array) -> jax.Array:
    """centred / denominator where `ok`, else exactly 0, with a finite gradient either way."""
    return jnp.where(ok, centred / jnp.where(ok, denominator, 1.0), 0.0)


def _reward_denominator(batch: _Batch, moments: GroupMoments, settings: CreditSettings) -> jax.Array:
    """[g] what a rollout's centred outcome is divided by, by `settings.scale_rewards`."""
    if settings.scale_rewards == "group":
        return moments.std + settings.eps
    if settings.scale_rewards == "batch":
        whole = group_moments(batch.reward, jnp.zeros_like(batch.group), 1, batch.graph_real)
        return whole.std + settings.eps
    return jnp.ones_like(moments.std)


def _propagate(own: jax.Array, own_weight: jax.Array, edge_weight: jax.Array, senders: jax.Array,
               receivers: jax.Array, node_level: jax.Array, depth: int) -> jax.Array:
    """x_v = own_weight_v·own_v + Σ_{u->v} edge_weight_uv·x_u, solved from the root level by level.

    Level-0 nodes (the root) keep own_weight·own; a node at level k only reads nodes at levels < k,
    which are final by then. The loop is over the (static) depth, never over rollouts.
    """
    x = own_weight * own
    for level in range(1, depth + 1):
        incoming = jraph.segment_sum(edge_weight * x[senders], receivers, own.shape[0])
        x = jnp.where(node_level == level, own_weight * own + incoming, x)
    return x


class _Context(NamedTuple):
    """What every variant needs: the batch, per-rollout outcome statistics, spec-derived arrays."""

    batch: _Batch
    reward_node: jax.Array  # [n] R of the node's rollout
    outcome_advantage: jax.Array  # [g] Â_i, plain GRPO
    reward_moments: GroupMoments  # [g]
    reward_denominator: jax.Array  # [g] the outcome's scale (`scale_rewards`), eps included
    node_level: jax.Array  # [n]
    is_root: jax.Array  # [n] bool


def _context(graph: jraph.GraphsTuple, spec: GraphSpec, settings: CreditSettings) -> _Context:
    batch = _batch_view(graph, spec)
    moments = group_moments(batch.reward, batch.group, batch.num_graphs, batch.graph_real)
    denominator = _reward_denominator(batch, moments, settings)
    return _Context(
        batch=batch,
        reward_node=batch.reward[batch.node_graph],
        outcome_advantage=_normalise(batch.reward - moments.mean, denominator, moments.spread),
        reward_moments=moments,
        reward_denominator=denominator,
        node_level=jnp.asarray(spec.levels, jnp.int32)[batch.node_type],
        is_root=batch.node_real & (batch.node_type == spec.root),
    )


# --------------------------------------------------------------------------------------- evidence


def _group_value_evidence(ctx: _Context, spec: GraphSpec, kappa: float) -> jax.Array:
    """(Σ R_j over the group's rollouts with the same value + κ·mean R) / (their count + κ)."""
    b = ctx.batch
    num_classes = b.num_graphs * spec.num_nodes
    classes = jnp.where(b.present, b.value_class * spec.num_nodes + b.node_type, num_classes)
    same_total = jraph.segment_sum(ctx.reward_node, classes, num_classes + 1)[classes]
    same_count = jraph.segment_sum(jnp.ones_like(ctx.reward_node), classes, num_classes + 1)[classes]
    group_mean = ctx.reward_moments.mean[b.node_graph]
    smoothed = (same_total + kappa * group_mean) / jnp.where(b.present, same_count + kappa, 1.0)
    return jnp.where(b.present, smoothed, ctx.reward_node)


def _rule_consistency_evidence(ctx: _Context, spec: GraphSpec) -> jax.Array:
    """1/0 consistency with the gold label for rule inputs; other nodes inherit their consumers'."""
    b = ctx.batch
    table = jnp.asarray(spec.rule_consistency_table())  # [input, value, label]
    slot_of_node = np.full(spec.num_nodes, -1, np.int32)
    slot_of_node[list(spec.rule_inputs)] = np.arange(len(spec.rule_inputs))
    slot = jnp.asarray(slot_of_node)[b.node_type]
    is_input = slot >= 0
    gold = b.gold_label[b.node_graph]
    consistent = table[jnp.maximum(slot, 0), jnp.clip(b.value, 0, table.shape[1] - 1),
                       jnp.clip(gold, 0, table.shape[2] - 1)].astype(jnp.float32)
    own = jnp.where(b.present & (gold >= 0), consistent, ctx.reward_node)
    own = jnp.where(ctx.is_root, ctx.reward_node, jnp.where(is_input, own, 0.0))
    # Every other node is the mean of its consumers: edge weight 1 / (number of consumers).
    receivers = np.asarray(spec.receivers, np.int64)
    consumers = np.bincount(receivers, minlength=spec.num_nodes)
    inherits = slot_of_node < 0
    edge_weight = np.where(inherits, 1.0 / np.maximum(consumers, 1), 0.0)[receivers]
    edge_weight = jnp.asarray(edge_weight, jnp.float32)[b.edge_type] * b.edge_real
    keeps_own = (is_input | ctx.is_root).astype(jnp.float32)
    return _propagate(own, keeps_own, edge_weight, b.senders, b.receivers, ctx.node_level, spec.depth)


def _propagated_credit(ctx: _Context, phi: jax.Array, spec: GraphSpec,
                       settings: CreditSettings) -> jax.Array:
    """c_root = R; c_v = (1 - Σ φ')·ℓ_v + Σ_{u->v} φ'_uv·c_u, on every node of the batch."""
    b = ctx.batch
    if settings.evidence == "group_value":
        evidence = _group_value_evidence(ctx, spec, settings.kappa)
    else:
        evidence = _rule_consistency_evidence(ctx, spec)
    weights = effective_edge_weights(spec, phi)
    incoming = jraph.segment_sum(weights, jnp.asarray(spec.receivers, jnp.int32), spec.num_nodes)
    own = jnp.where(ctx.is_root, ctx.reward_node, evidence)
    return _propagate(own, (1.0 - incoming)[b.node_type], weights[b.edge_type] * b.edge_real,
                      b.senders, b.receivers, ctx.node_level, spec.depth)


def _node_advantages(ctx: _Context, credits: jax.Array, spec: GraphSpec,
                     settings: CreditSettings) -> jax.Array:
    """Group-normalised node advantages (`norm`), 0 on missing non-root nodes and padding."""
    b = ctx.batch
    node_moments = group_moments(credits, b.node_group_slot, b.num_graphs * spec.num_nodes, b.node_real)
    outcome_spread = ctx.reward_moments.spread[b.node_graph]
    if settings.norm == "outcome":
        denominator, ok = ctx.reward_denominator[b.node_graph], outcome_spread
    else:
        denominator, ok = node_moments.std + settings.eps, outcome_spread & node_moments.spread
    advantages = _normalise(credits - node_moments.mean, denominator, ok)
    return jnp.where(b.present | ctx.is_root, advantages, 0.0)


# ---------------------------------------------------------------------------------------- variants

# A variant maps (context, φ, spec, settings) to dense `[g, V]` (credits, node advantages).
VariantFn = Callable[[_Context, jax.Array, GraphSpec, CreditSettings], tuple[jax.Array, jax.Array]]
_VARIANTS: dict[str, VariantFn] = {}


def register_variant(name: str) -> Callable[[VariantFn], VariantFn]:
    """Adds a credit variant under `name` (the value of `credit.variant`)."""

    def register(fn: VariantFn) -> VariantFn:
        if name in _VARIANTS:
            raise ValueError(f"credit variant {name!r} is already registered")
        _VARIANTS[name] = fn
        return fn

    return register


def variant_names() -> tuple[str, ...]:
    return tuple(_VARIANTS)


@register_variant("outcome")
def _outcome(ctx: _Context, phi: jax.Array, spec: GraphSpec, settings: CreditSettings):
    del phi, settings
    rows = lambda x: jnp.where(ctx.batch.graph_real, x, 0.0)[:, None] * jnp.ones(spec.num_nodes)
    return rows(ctx.batch.reward), rows(ctx.outcome_advantage)


@register_variant("graph")
def _graph(ctx: _Context, phi: jax.Array, spec: GraphSpec, settings: CreditSettings):
    credits = _propagated_credit(ctx, phi, spec, settings)
    advantages = _node_advantages(ctx, credits, spec, settings)
    return _to_dense(ctx.batch, credits, spec.num_nodes), _to_dense(ctx.batch, advantages, spec.num_nodes)


@register_variant("chain_process")
def _chain_process(ctx: _Context, phi: jax.Array, spec: GraphSpec, settings: CreditSettings):
    credits, advantages = _graph(ctx, phi, spec, settings)
    later_steps = jnp.asarray(spec.consumer_closure(), jnp.float32)  # [v, w]: w is v or a later step
    present = _to_dense(ctx.batch, (ctx.batch.present | ctx.is_root).astype(jnp.float32), spec.num_nodes)
    return credits, (advantages @ later_steps.T) * present


@register_variant("pure_min")
def _pure_min(ctx: _Context, phi: jax.Array, spec: GraphSpec, settings: CreditSettings):
    """PURE's min-form credit (Cheng et al. 2025, arXiv 2504.15275) on the graph: a node's tokens get the least
    normalised advantage among the node and its later steps that are present, where `chain_process` sums them,
    so one bad later step bounds every step before it and no step is paid twice."""
    credits, advantages = _graph(ctx, phi, spec, settings)
    later_steps = jnp.asarray(spec.consumer_closure(), bool)  # [v, w]: w is v or a later step
    present = _to_dense(ctx.batch, (ctx.batch.present | ctx.is_root).astype(jnp.float32), spec.num_nodes) > 0
    candidates = jnp.where(later_steps[None] & present[:, None, :], advantages[:, None, :], jnp.inf)  # [g, v, w]
    return credits, jnp.where(present, candidates.min(axis=-1), 0.0)


@register_variant("path_scaled")
def _path_scaled(ctx: _Context, phi: jax.Array, spec: GraphSpec, settings: CreditSettings):
    del settings
    root = jax.nn.one_hot(spec.root, spec.num_nodes)
    path_weight = _propagate(root, root, effective_edge_weights(spec, phi),
                             jnp.asarray(spec.senders, jnp.int32), jnp.asarray(spec.receivers, jnp.int32),
                             jnp.asarray(spec.levels, jnp.int32), spec.depth)
    present = _to_dense(ctx.batch, (ctx.batch.present | ctx.is_root).astype(jnp.float32), spec.num_nodes)
    reward = jnp.where(ctx.batch.graph_real, ctx.batch.reward, 0.0)
    return reward[:, None] * path_weight, ctx.outcome_advantage[:, None] * path_weight * present


# ----------------------------------------------------------------------------------------- entry points


class NodeCredit(NamedTuple):
    credits: jax.Array  # [g, V] c_{i,v}
    advantages: jax.Array  # [g, V] what the node's tokens get
    counted: jax.Array  # [g, V] bool: real rollouts' nodes whose advantage is applied (present or root)


class CreditOutput(NamedTuple):
    node_credits: jax.Array  # [N, V]
    node_advantages: jax.Array  # [N, V]
    token_advantages: jax.Array  # [N, T]
    node_stats: dict[str, jax.Array]


@functools.partial(jax.jit, static_argnames=("spec", "settings"))
def node_credit(graph: jraph.GraphsTuple, phi: jax.Array, *, spec: GraphSpec,
                settings: CreditSettings) -> NodeCredit:
    """Credits and advantages per node of every graph of the batch (padding graphs: 0)."""
    if phi.shape != (spec.num_edges,):
        raise ValueError(f"phi has shape {phi.shape}; the graph has {spec.num_edges} edges "
                         f"{spec.edge_names}")
    ctx = _context(graph, spec, settings)
    credits, advantages = _VARIANTS[settings.variant](ctx, phi.astype(jnp.float32), spec, settings)
    counted = ctx.batch.present | ctx.is_root
    if settings.variant == "outcome":
        counted = ctx.batch.node_real
    return NodeCredit(credits, advantages, _to_dense(ctx.batch, counted, spec.num_nodes) > 0)


def token_advantages(node_advantages: jax.Array, token_node_ids: jax.Array, completion_mask: jax.Array,
                     root: int) -> jax.Array:
    """`[N, T]`: a token gets its node's advantage, the root's outside every span, 0 off completions."""
    ids = jnp.where(token_node_ids >= 0, token_node_ids, root)
    per_token = jnp.take_along_axis(node_advantages, ids, axis=1, mode="clip")
    return jnp.where(completion_mask, per_token, 0.0)


def node_advantage_stats(spec: GraphSpec, advantages: jax.Array,
                         counted: jax.Array) -> dict[str, jax.Array]:
    """Mean / std / min / max of each node's advantage over the rollouts where it counts."""
    count = jnp.sum(counted, axis=0)
    mean = jnp.sum(jnp.where(counted, advantages, 0.0), axis=0) / jnp.maximum(count, 1)
    var = jnp.sum(jnp.where(counted, (advantages - mean) ** 2, 0.0), axis=0) / jnp.maximum(count, 1)
    has_any = count > 0
    stats = {
        "mean": mean,
        "std": _safe_sqrt(var),
        "min": jnp.where(has_any, jnp.min(jnp.where(counted, advantages, jnp.inf), axis=0), 0.0),
        "max": jnp.where(has_any, jnp.max(jnp.where(counted, advantages, -jnp.inf), axis=0), 0.0),
    }
    return {f"credit/adv_{stat}/{node}": values[v]
            for stat, values in stats.items() for v, node in enumerate(spec.nodes)}


@functools.partial(jax.jit, static_argnames=("spec", "settings"))
def compute_credit(graph: jraph.GraphsTuple, phi: jax.Array, token_node_ids: jax.Array,
                   completion_mask: jax.Array, *, spec: GraphSpec,
                   settings: CreditSettings) -> CreditOutput:
    """Node credits, node and token advantages and per-node logs for the first N graphs (N = the
    token arrays' rows, the real rollouts in order). Differentiable in `phi`."""
    rows = token_node_ids.shape[0]
    if rows >= graph.n_node.shape[0] or completion_mask.shape != token_node_ids.shape:
        raise ValueError(f"token arrays {token_node_ids.shape}, {completion_mask.shape} must be "
                         f"[N, T] with N below the {graph.n_node.shape[0]} graphs (one is padding)")
    credit = node_credit(graph, phi, spec=spec, settings=settings)
    advantages = credit.advantages[:rows]
    return CreditOutput(
        node_credits=credit.credits[:rows],
        node_advantages=advantages,
        token_advantages=token_advantages(advantages, token_node_ids, completion_mask, spec.root),
        node_stats=node_advantage_stats(spec, advantages, credit.counted[:rows]),
    )
