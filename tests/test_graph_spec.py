"""Graph spec: validation errors, topological levels, the label rule as data, the jraph encoding."""

import jax
import jraph
import numpy as np
import pytest

from graphgrpo_jax.graph.spec import default_graph_config, encode_rollouts, graph_spec


def chain_config(**overrides):
    cfg = dict(nodes=("s1", "s2", "y"), root="y", edges=("y->s2", "s2->s1"),
               phi_init={"y->s2": 0.5, "s2->s1": 0.5})
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def spec():
    return graph_spec(default_graph_config())


def test_default_graph(spec):
    assert spec.nodes == ("qs", "qa", "ps", "pa", "ms", "ma", "y")
    assert spec.root == 6
    assert spec.edge_names == ("y->ms", "y->ma", "ms->qs", "ms->ps", "ma->qa", "ma->pa")
    assert spec.phi_init == (0.0, 0.0, 1.0, 1.0, 1.0, 1.0)
    assert spec.levels == (2, 2, 2, 2, 1, 1, 0)
    assert spec.nodes_by_level == (("y",), ("ms", "ma"), ("qs", "qa", "ps", "pa"))
    assert spec.categorical[spec.index("ms")] == ("match", "partial", "complement", "mismatch")
    assert spec.categorical[spec.index("qs")] is None
    assert spec.rule_inputs == (4, 5)
    hash(spec)  # static argument of jitted functions


def test_levels_are_longest_paths_from_the_root():
    # a is read by b and directly by the root: it must come after b (level 2, not 1).
    cfg = dict(nodes=("a", "b", "y"), root="y", edges=("y->a", "y->b", "b->a"),
               phi_init={"y->a": 0.5, "y->b": 0.5, "b->a": 0.5})
    assert graph_spec(cfg).levels == (2, 1, 0)


def test_any_dag_over_named_sections():
    facets = dict(
        nodes=("brand", "category", "color", "m_brand", "m_category", "m_color", "label"),
        root="label",
        edges=("label->m_brand", "label->m_category", "label->m_color", "m_brand->brand",
               "m_category->category", "m_color->color", "m_brand->category"),
        phi_init={e: 1.0 for e in ("label->m_brand", "label->m_category", "label->m_color",
                                   "m_brand->brand", "m_category->category", "m_color->color",
                                   "m_brand->category")},
    )
    spec = graph_spec(facets)
    assert spec.depth == 2 and spec.num_edges == 7
    assert graph_spec(chain_config()).nodes_by_level == (("y",), ("s2",), ("s1",))
    single = graph_spec(dict(nodes=("y",), root="y", edges=(), phi_init={}))
    assert single.depth == 0 and single.num_edges == 0


@pytest.mark.parametrize("overrides, message", [
    (dict(edges=("y->s2", "s2->s1", "s1->s2")), r"cycle: s2 -> s1 -> s2|cycle: s1 -> s2 -> s1"),
    (dict(edges=("y->s2", "s2->x")), r"edges\[1\] = 's2->x': unknown node 'x'"),
    (dict(edges=("y->s2", "s2-s1")), r"edges\[1\] = 's2-s1': write an edge as 'u->v'"),
    (dict(root=None), r"no root"),
    (dict(root="z"), r"root = 'z': unknown node"),
    (dict(edges=("y->s2", "s2->s1", "s1->y")), r"an edge into the root"),
    (dict(edges=("y->s2",), phi_init={"y->s2": 0.5}), r"nodes \['s1'\] get no credit"),
    (dict(phi_init={"y->s2": 0.5}), r"no initial coefficient for edge 's2->s1'"),
    (dict(phi_init={"y->s2": 0.5, "s2->s1": 1.5}), r"phi_init\['s2->s1'\] = 1.5: .* in \[0, 1\]"),
    (dict(phi_init={"y->s2": 0.5, "s2->s1": 0.5, "y->s1": 0.5}),
     r"phi_init\['y->s1'\] = 0.5: not an edge"),
    (dict(nodes=("s1", "s2", "s2", "y")), r"node names must be unique"),
    (dict(edges=("y->s2", "s2->s1", "y->s2")), r"duplicate edge"),
])
def test_invalid_graphs_fail_with_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        graph_spec(chain_config(**overrides))


def test_a_longer_cycle_is_named_node_by_node():
    cfg = dict(nodes=("a", "b", "c", "y"), root="y", edges=("y->a", "a->b", "b->c", "c->a"),
               phi_init={e: 1.0 for e in ("y->a", "a->b", "b->c", "c->a")})
    with pytest.raises(ValueError, match=r"cycle: (a -> b -> c -> a|b -> c -> a -> b|c -> a -> b -> c)"):
        graph_spec(cfg)


def test_rule_errors_name_the_row():
    cfg = default_graph_config()
    cfg.label_rule = cfg.label_rule + (("match", "maybe", "Exact"),)
    with pytest.raises(ValueError, match=r"label_rule\[6\].*'maybe' is not a value of 'ma'"):
        graph_spec(cfg)
    cfg = default_graph_config()
    cfg.rule_inputs = ("ms", "qa")
    with pytest.raises(ValueError, match=r"rule_inputs = 'qa': the label rule can only read categorical"):
        graph_spec(cfg)


def test_label_rule_first_match_wins(spec):
    assert spec.label_from_rule(("match", "match")) == "Exact"
    assert spec.label_from_rule(("match", "mismatch")) == "Substitute"
    assert spec.label_from_rule(("partial", "match")) == "Substitute"  # the wildcard row
    assert spec.label_from_rule(("mismatch", "match")) == "Irrelevant"


def test_rule_consistency_table_by_hand(spec):
    # (ms, ma) -> label: (match, match) E; (match, partial|mismatch) S; partial S; complement C;
    # mismatch I. A value is consistent with y when some value of the other input gives y.
    E, S, C, I = True, True, True, True
    _ = False
    expected_ms = [[E, S, _, _],  # match
                   [_, S, _, _],  # partial
                   [_, _, C, _],  # complement
                   [_, _, _, I]]  # mismatch
    expected_ma = [[E, S, C, I],  # match: with ms = match, partial, complement, mismatch
                   [_, S, C, I],  # partial: never Exact
                   [_, S, C, I],  # mismatch
                   [_, _, _, _]]  # (ma has 3 values; padding row)
    np.testing.assert_array_equal(spec.rule_consistency_table(), np.array([expected_ms, expected_ma]))


def test_consumer_closure(spec):
    closure = spec.consumer_closure()
    later = lambda node: {spec.nodes[w] for w in np.flatnonzero(closure[spec.index(node)])}
    assert later("qs") == {"qs", "ms", "y"}
    assert later("pa") == {"pa", "ma", "y"}
    assert later("y") == {"y"}


def test_encoding_layout_and_value_classes(spec):
    values = np.full((8, 7), 0, np.int64)
    values[:, spec.index("qs")] = [7, 3, 7, -1, 3, 3, 5, 3]
    values[:, spec.index("ms")] = [0, 1, 0, 0, 3, 2, 3, -1]
    rewards = np.array([1, 0, 1, -1, 0, 0, 1, 0], np.float32)
    graph = encode_rollouts(spec, rewards, values, np.arange(8) % 4, group_size=4)

    assert graph.n_node.shape == (9,) and graph.nodes["type"].shape == (8 * 7 + 1,)
    assert graph.senders.shape == (8 * 6,)
    np.testing.assert_array_equal(graph.n_node, [7] * 8 + [1])
    np.testing.assert_array_equal(graph.globals["group"][:8], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(graph.globals["reward"][:8], rewards)
    # Rollout 2's edge ms->qs joins node 2*7+4 to node 2*7+0.
    assert (graph.senders[2 * 6 + 2], graph.receivers[2 * 6 + 2]) == (18, 14)
    classes = graph.nodes["value_class"][:56].reshape(8, 7)
    # First rollout of the same group with the same value, as a batch index; -1 when missing.
    np.testing.assert_array_equal(classes[:, spec.index("qs")], [0, 1, 0, -1, 4, 4, 6, 4])
    np.testing.assert_array_equal(classes[:, spec.index("ms")], [0, 1, 0, 0, 4, 5, 4, -1])
    mask = jraph.get_graph_padding_mask(graph)
    np.testing.assert_array_equal(mask, [True] * 8 + [False])


def test_padding_keeps_shapes_static(spec):
    rng = np.random.default_rng(0)
    shapes = set()
    for n in (4, 8, 12):
        graph = encode_rollouts(spec, rng.integers(0, 2, n), rng.integers(0, 3, (n, 7)), None,
                                group_size=4, max_rollouts=12)
        shapes.add(tuple(np.shape(x) for x in jax.tree_util.tree_leaves(graph)))
        assert int(np.sum(jraph.get_graph_padding_mask(graph))) == n
    assert len(shapes) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(node_values=np.array([[0, 0, 0, 0, 4, 0, 0]] * 4)),
     r"node_values\[0, 4\] = 4 \(node 'ms'\): outside the values"),
    (dict(node_values=np.array([[0, 0, 0, 0, 0, 0, -2]] * 4)),
     r"node_values\[0, 6\] = -2 \(node 'y'\): ids are >= 0"),
    (dict(node_values=np.zeros((4, 6), np.int32)), r"\[N, 7\]"),
    (dict(gold_label=np.array([0, 1, 2, 4])), r"gold_label\[3\] = 4: outside the labels"),
    (dict(group_size=3), r"4 rollouts do not split into groups of 3"),
    (dict(max_rollouts=2), r"max_rollouts = 2 < 4"),
])
def test_bad_batches_fail_with_the_offending_value(spec, kwargs, message):
    args = dict(rewards=np.ones(4), node_values=np.zeros((4, 7), np.int32),
                gold_label=np.zeros(4, np.int32), group_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        encode_rollouts(spec, **args)
