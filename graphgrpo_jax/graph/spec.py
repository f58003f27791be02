"""The reasoning dependency graph: a validated spec from the config, and rollouts as a jraph batch.

METHOD.md A1. The graph is data: any DAG over named chain-of-thought sections works. An edge `u->v`
says that step `u` *consumes* step `v` (the label `y` consumes the subject match `ms`, which consumes
the query subject `qs`), so credit flows along it from `u` to `v`, starting at the root (the label).

Config fields (`default_graph_config()` holds the defaults of METHOD.md A1/A2)::

    nodes       node names, in template order; the index of a name is its node id everywhere
    root        the node whose credit is the outcome itself (the label)
    edges       'u->v' strings: credit flows from consumer u to the step v it reads
    phi_init    {'u->v': float in [0, 1]}: the initial coefficient of every edge
    categorical {node: values}: nodes with a closed vocabulary (their ids index these tuples);
                every other node is free text (any interned id, equal strings sharing one id)
    rule_inputs the categorical nodes the label rule reads, in the column order of label_rule
    label_rule  rows (*rule_inputs, label), '*' a wildcard, first matching row wins

Validation fails with the offending field and value: an unknown node name, a missing or non-root
root, a cycle (named node by node), a node the root cannot reach, a malformed rule row.

Batch encoding (`encode_rollouts`): rollout `i` of a batch of `num_groups × group_size` rollouts
(groups contiguous) becomes graph `i` of a `jraph.GraphsTuple` with one node per spec node, in spec
order, and one edge per spec edge; then `jraph.pad_with_graphs` appends padding so that the sizes
depend only on `max_rollouts`, and a jitted consumer never recompiles. Features:

    nodes   'type' [n]: spec node id; 'value' [n]: the parsed value id, -1 when missing;
            'value_class' [n]: the batch index of the first rollout in the same group with the same
            value at that node (-1 when missing), so "equal value in the group" is one segment id
    edges   'type' [e]: spec edge id (indexes the coefficient vector φ)
    globals 'reward' [g] float32, 'gold_label' [g] int32, 'group' [g] int32
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jraph
import ml_collections
import numpy as np

from graphgrpo_jax.data import cot

EDGE_ARROW = "->"

# The relevance template of METHOD.md A1 and its ESCI label rule (the label consumes ms and ma), from the
# one place that defines the template.
WILDCARD = cot.WILDCARD
DEFAULT_NODES = cot.NODES
DEFAULT_EDGES = ("y->ms", "y->ma", "ms->qs", "ms->ps", "ma->qa", "ma->pa")
DEFAULT_CATEGORICAL = {node: values for node, values in cot.DEFAULT_ALLOWED.items() if values is not None}
DEFAULT_LABEL_RULE = cot.DEFAULT_LABEL_RULE


def default_graph_config() -> ml_collections.ConfigDict:
    """The 7-node relevance graph with the "consumer evidence" coefficients of METHOD.md A2."""
    # φ = 0 out of the root: match nodes are credited by their own evidence; φ = 1 into the readings:
    # each reading inherits the credit of the match node that uses it.
    phi_init = {edge: 0.0 if edge.startswith("y->") else 1.0 for edge in DEFAULT_EDGES}
    return ml_collections.ConfigDict(dict(
        nodes=DEFAULT_NODES,
        root="y",
        edges=DEFAULT_EDGES,
        phi_init=phi_init,
        categorical=dict(DEFAULT_CATEGORICAL),
        rule_inputs=("ms", "ma"),
        label_rule=DEFAULT_LABEL_RULE,
    ))


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """A validated credit DAG. Hashable (tuples only), so jitted functions take it as a static arg."""

    nodes: tuple[str, ...]
    root: int
    senders: tuple[int, ...]  # edge e runs senders[e] -> receivers[e]: consumer -> consumed step
    receivers: tuple[int, ...]
    phi_init: tuple[float, ...]  # per edge, in [0, 1]
    levels: tuple[int, ...]  # per node: longest path from the root (root 0), so parents come first
    categorical: tuple[tuple[str, ...] | None, ...]  # per node; None for free text
    rule_inputs: tuple[int, ...] = ()
    label_rule: tuple[tuple[str, ...], ...] = ()

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_edges(self) -> int:
        return len(self.senders)

    @property
    def depth(self) -> int:
        return max(self.levels)

    @property
    def edge_names(self) -> tuple[str, ...]:
        return tuple(f"{self.nodes[u]}{EDGE_ARROW}{self.nodes[v]}"
                     for u, v in zip(self.senders, self.receivers))

    @property
    def nodes_by_level(self) -> tuple[tuple[str, ...], ...]:
        """Topological levels: level k holds the nodes whose longest path from the root is k."""
        return tuple(tuple(n for n, lv in zip(self.nodes, self.levels) if lv == k)
                     for k in range(self.depth + 1))

    def index(self, node: str) -> int:
        return self.nodes.index(node)

    def consumer_closure(self) -> np.ndarray:
        """`[V, V]` bool: `[v, w]` when w = v or credit reaches v from w (w is a later step of v)."""
        closure = np.eye(self.num_nodes, dtype=bool)
        for v in sorted(range(self.num_nodes), key=lambda n: self.levels[n]):
            for u, w in zip(self.senders, self.receivers):
                if w == v:
                    closure[v] |= closure[u]
        return closure

    def label_from_rule(self, inputs: Sequence[str]) -> str | None:
        """The label the rule gives to values of `rule_inputs` (first matching row), None if none."""
        for row in self.label_rule:
            if all(cell in (value, WILDCARD) for cell, value in zip(row[:-1], inputs)):
                return row[-1]
        return None

    def rule_consistency_table(self) -> np.ndarray:
        """`[len(rule_inputs), max values, num labels]` bool: value a of input k is consistent with
        gold label y when some assignment of the other inputs, with input k = a, gets label y."""
        labels = self.categorical[self.root]
        vocabularies = [self.categorical[n] for n in self.rule_inputs]
        width = max((len(vocab) for vocab in vocabularies), default=0)
        table = np.zeros((len(self.rule_inputs), width, len(labels or ())), dtype=bool)
        for combo in itertools.product(*(range(len(vocab)) for vocab in vocabularies)):
            label = self.label_from_rule([vocab[a] for vocab, a in zip(vocabularies, combo)])
            if label is not None:
                for k, a in enumerate(combo):
                    table[k, a, labels.index(label)] = True
        return table


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"graph config field {field} = {value!r}: {why}")


def _find_cycle(names: Sequence[str], parents: Mapping[int, list[int]], stuck: set[int]) -> str:
    """A cycle among `stuck` nodes (each has a parent in `stuck`), written 'a -> b -> a'."""
    path, node = [], min(stuck)
    while node not in path:
        path.append(node)
        node = next(p for p in parents[node] if p in stuck)
    cycle = path[path.index(node):][::-1]  # walked against the edges; read along them
    return " -> ".join(names[n] for n in cycle + [cycle[0]])


def graph_spec(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> GraphSpec:
    """Validates a graph config (see the module docstring) and returns its spec."""
    names = tuple(cfg["nodes"])
    if not names:
        _fail("nodes", names, "a graph needs at least one node")
    if len(set(names)) != len(names):
        _fail("nodes", names, "node names must be unique")
    index = {name: i for i, name in enumerate(names)}

    def node_id(field: str, name: Any, value: Any = None) -> int:
        if name not in index:
            _fail(field, name if value is None else value, f"unknown node {name!r}; nodes are {names}")
        return index[name]

    root_name = cfg.get("root", None)
    if not root_name:
        _fail("root", root_name, "no root: name the node whose credit is the outcome (the label)")
    root = node_id("root", root_name)

    edges = tuple(cfg.get("edges", None) or ())
    senders, receivers, edge_names = [], [], []
    for k, edge in enumerate(edges):
        field = f"edges[{k}]"
        parts = edge.split(EDGE_ARROW) if isinstance(edge, str) else []
        if len(parts) != 2:
            _fail(field, edge, f"write an edge as 'u{EDGE_ARROW}v' (credit flows from u to v)")
        u, v = node_id(field, parts[0].strip(), edge), node_id(field, parts[1].strip(), edge)
        name = f"{names[u]}{EDGE_ARROW}{names[v]}"
        if name in edge_names:
            _fail(field, edge, "duplicate edge")
        if v == root:
            _fail(field, edge, f"an edge into the root {names[root]!r}: the root's credit is the outcome")
        senders.append(u)
        receivers.append(v)
        edge_names.append(name)
    parents = {v: [u for u, w in zip(senders, receivers) if w == v] for v in range(len(names))}

    # Kahn's algorithm: nodes left over sit on (or behind) a cycle.
    indegree = {v: len(parents[v]) for v in parents}
    order, frontier = [], [v for v in parents if indegree[v] == 0]
    while frontier:
        u = frontier.pop()
        order.append(u)
        for s, v in zip(senders, receivers):
            if s == u:
                indegree[v] -= 1
                if indegree[v] == 0:
                    frontier.append(v)
    if len(order) < len(names):
        stuck = set(parents) - set(order)
        _fail("edges", edges, f"not a DAG, cycle: {_find_cycle(names, parents, stuck)}")

    reached = {root}
    for v in order:  # topological order: a node's parents are settled before it
        if any(p in reached for p in parents[v]):
            reached.add(v)
    if len(reached) < len(names):
        unreached = [n for v, n in enumerate(names) if v not in reached]
        _fail("edges", edges, f"nodes {unreached} get no credit: every node must be reachable "
              f"from the root {names[root]!r} along the edges")
    levels = {}
    for v in order:
        levels[v] = 1 + max((levels[p] for p in parents[v]), default=-1)

    phi_cfg = {str(key).replace(" ", ""): value for key, value in dict(cfg.get("phi_init", {})).items()}
    for key, value in phi_cfg.items():
        if key not in edge_names:
            _fail(f"phi_init[{key!r}]", value, f"not an edge; edges are {tuple(edge_names)}")
    phi_init = []
    for name in edge_names:
        if name not in phi_cfg:
            _fail("phi_init", phi_cfg, f"no initial coefficient for edge {name!r}")
        value = float(phi_cfg[name])
        if not 0.0 <= value <= 1.0:
            _fail(f"phi_init[{name!r}]", value, "a coefficient must lie in [0, 1]")
        phi_init.append(value)

    categorical_cfg = dict(cfg.get("categorical", None) or {})
    categorical: list[tuple[str, ...] | None] = [None] * len(names)
    for node, values in categorical_cfg.items():
        values = tuple(values)
        if not values or len(set(values)) != len(values):
            _fail(f"categorical[{node!r}]", values, "needs distinct values")
        categorical[node_id(f"categorical[{node!r}]", node)] = values

    rule_inputs = tuple(node_id("rule_inputs", n) for n in (cfg.get("rule_inputs", None) or ()))
    rule = tuple(tuple(row) for row in (cfg.get("label_rule", None) or ()))
    for n in rule_inputs:
        if categorical[n] is None:
            _fail("rule_inputs", names[n], "the label rule can only read categorical nodes")
    if rule and not rule_inputs:
        _fail("rule_inputs", (), "a label rule needs the nodes it reads")
    if rule and categorical[root] is None:
        _fail("categorical", categorical_cfg, f"a label rule needs the root {names[root]!r}'s labels")
    for k, row in enumerate(rule):
        field = f"label_rule[{k}]"
        if len(row) != len(rule_inputs) + 1:
            _fail(field, row, f"a row is (*{[names[n] for n in rule_inputs]}, label)")
        for n, cell in zip(rule_inputs, row[:-1]):
            if cell != WILDCARD and cell not in categorical[n]:
                _fail(field, row, f"{cell!r} is not a value of {names[n]!r} {categorical[n]}")
        if row[-1] not in categorical[root]:
            _fail(field, row, f"{row[-1]!r} is not a label {categorical[root]}")

    return GraphSpec(nodes=names, root=root, senders=tuple(senders), receivers=tuple(receivers),
                     phi_init=tuple(phi_init), levels=tuple(levels[v] for v in range(len(names))),
                     categorical=tuple(categorical), rule_inputs=rule_inputs, label_rule=rule)


def _check_ids(field: str, ids: np.ndarray, low: int, high: int, what: str,
               nodes: Sequence[str] | None = None) -> None:
    """Fails on the first id outside [low, high), naming its position (and node, for `[N, V]`)."""
    bad = np.argwhere((ids < low) | (ids >= high))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        node = f" (node {nodes[where[1]]!r})" if nodes is not None else ""
        raise ValueError(f"{field}[{', '.join(map(str, where))}] = {int(ids[where])}{node}: {what}")


def encode_rollouts(spec: GraphSpec, rewards: np.ndarray, node_values: np.ndarray,
                    gold_label: np.ndarray | None, group_size: int,
                    max_rollouts: int | None = None) -> jraph.GraphsTuple:
    """Rollouts as a padded `GraphsTuple` (layout in the module docstring).

    Args:
      spec: the graph.
      rewards: `[N]` outcomes R_i (1 right, 0 wrong, r_format unparseable).
      node_values: `[N, V]` int value ids; categorical nodes index their value tuple; -1 = missing.
      gold_label: `[N]` int, the gold label's index among the root's values (rule_consistency needs
        it); None stores -1.
      group_size: rollouts per prompt; groups are contiguous blocks of the batch.
      max_rollouts: pad to this many rollouts (default N), so every batch has the same shapes.
    """
    rewards = np.asarray(rewards, np.float32)
    node_values = np.asarray(node_values)
    num_rollouts, num_nodes, num_edges = rewards.shape[0], spec.num_nodes, spec.num_edges
    if rewards.ndim != 1 or node_values.shape != (num_rollouts, num_nodes):
        raise ValueError(f"rewards {rewards.shape} and node_values {node_values.shape} must be "
                         f"[N] and [N, {num_nodes}] (nodes {spec.nodes})")
    if not np.issubdtype(node_values.dtype, np.integer):
        raise ValueError(f"node_values must be integer ids, got dtype {node_values.dtype}")
    if group_size < 1 or num_rollouts % group_size:
        raise ValueError(f"{num_rollouts} rollouts do not split into groups of {group_size}")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"rewards[{int(np.argmin(np.isfinite(rewards)))}] is not finite")
    _check_ids("node_values", node_values, -1, np.iinfo(np.int32).max,
               "ids are >= 0, or -1 if missing", spec.nodes)
    for v, vocab in enumerate(spec.categorical):
        if vocab is not None:
            high = np.where(np.arange(num_nodes) == v, len(vocab), np.iinfo(np.int32).max)
            _check_ids("node_values", node_values, -1, high, f"outside the values {vocab}", spec.nodes)
    if gold_label is None:
        gold_label = np.full(num_rollouts, -1, np.int32)
    gold_label = np.asarray(gold_label, np.int32)
    if gold_label.shape != (num_rollouts,):
        raise ValueError(f"gold_label {gold_label.shape} must be [{num_rollouts}]")
    labels = spec.categorical[spec.root]
    if labels is not None:
        _check_ids("gold_label", gold_label, -1, len(labels), f"outside the labels {labels}")
    max_rollouts = num_rollouts if max_rollouts is None else max_rollouts
    if max_rollouts < num_rollouts:
        raise ValueError(f"max_rollouts = {max_rollouts} < {num_rollouts} rollouts in the batch")

    # value_class: the first rollout of the group with an equal value (an id local to the group).
    grouped = node_values.reshape(-1, group_size, num_nodes)
    same = grouped[:, :, None, :] == grouped[:, None, :, :]  # [groups, i, j, V]
    first = np.argmax(same, axis=2) + (np.arange(grouped.shape[0]) * group_size)[:, None, None]
    value_class = np.where(node_values < 0, -1, first.reshape(num_rollouts, num_nodes))

    offsets = np.arange(num_rollouts, dtype=np.int32)[:, None] * num_nodes
    graph = jraph.GraphsTuple(
        nodes={"type": np.tile(np.arange(num_nodes, dtype=np.int32), num_rollouts),
               "value": node_values.astype(np.int32).reshape(-1),
               "value_class": value_class.astype(np.int32).reshape(-1)},
        edges={"type": np.tile(np.arange(num_edges, dtype=np.int32), num_rollouts)},
        senders=(offsets + np.asarray(spec.senders, np.int32)).reshape(-1),
        receivers=(offsets + np.asarray(spec.receivers, np.int32)).reshape(-1),
        globals={"reward": rewards, "gold_label": gold_label,
                 "group": (np.arange(num_rollouts) // group_size).astype(np.int32)},
        n_node=np.full(num_rollouts, num_nodes, np.int32),
        n_edge=np.full(num_rollouts, num_edges, np.int32),
    )
    # jraph's convention: one padding graph holds the padding (at least one node), so the padding
    # masks (`jraph.get_graph_padding_mask`) are well defined even when nothing else is padded.
    return jraph.pad_with_graphs(graph, n_node=max_rollouts * num_nodes + 1,
                                 n_edge=max_rollouts * num_edges, n_graph=max_rollouts + 1)
