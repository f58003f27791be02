"""Credit diagnostics: blame precision by hand, and a group where one upstream node is wrong."""

import jax.numpy as jnp
import numpy as np
import pytest

from graphgrpo_jax.eval import credit as diagnostics
from graphgrpo_jax.graph.credit import CreditSettings, node_credit
from graphgrpo_jax.graph.spec import default_graph_config, encode_rollouts, graph_spec


def test_blame_precision_by_hand():
    spec = graph_spec(dict(nodes=("s1", "s2", "y"), root="y", edges=("y->s2", "s2->s1"),
                           phi_init={"y->s2": 0.5, "s2->s1": 0.5}))  # s2 is closer to the root
    F, T = False, True
    credits = np.array([
        [0.2, 0.5, 0.0],  # 0: s1 lowest, wrong                    hit; tie 1;   random 2/2
        [0.3, 0.3, 0.0],  # 1: tie -> s2 (closer to root), wrong  hit; tie 1/2; random 1/2
        [0.7, 0.7 + 1e-9, 0.0],  # 2: a tie within tie_tol, as 1   hit; tie 1/2; random 1/2
        [0.1, 0.9, 0.0],  # 3: s1 lowest, right                   miss; tie 0;  random 1/2
        [0.5, 0.1, 0.0],  # 4: label wrong but no wrong step: not blamed
        [0.8, 0.6, 1.0],  # 5: label right: not blamed
        [-5.0, 0.4, 0.0],  # 6: s1 missing, so only s2 counts      hit; tie 1;   random 1/1
    ])
    node_correct = np.array([[F, F, F], [T, F, F], [T, F, F], [T, F, F], [T, T, F], [T, T, T], [F, F, F]])
    label_correct = np.array([F, F, F, F, F, T, F])
    present = np.ones((7, 3), bool)
    present[6, 0] = False
    result = diagnostics.credit_diagnostics(spec, credits, node_correct, label_correct, present)
    assert result.num_blamed == 5
    np.testing.assert_allclose(result.blame_precision_at_1, 4 / 5)
    np.testing.assert_allclose(result.blame_precision_tie_expected, 3 / 5)
    np.testing.assert_allclose(result.blame_random_baseline, 3.5 / 5)
    # Pearson over the candidate (credit, correct) pairs, written out: the root and s1 of row 6 excluded.
    pairs = np.array([(0.2, 0), (0.5, 0), (0.3, 1), (0.3, 0), (0.7, 1), (0.7 + 1e-9, 0), (0.1, 1),
                      (0.9, 0), (0.5, 1), (0.1, 1), (0.8, 1), (0.6, 1), (0.4, 0)])
    x, y = pairs[:, 0] - pairs[:, 0].mean(), pairs[:, 1] - pairs[:, 1].mean()
    np.testing.assert_allclose(result.credit_correctness_corr, x @ y / np.sqrt((x @ x) * (y @ y)))


def test_shape_errors_name_the_array():
    spec = graph_spec(default_graph_config())
    with pytest.raises(ValueError, match=r"credits has shape \(2, 3\); expected \(2, 7\)"):
        diagnostics.credit_diagnostics(spec, np.zeros((2, 3)), np.zeros((2, 7), bool), np.zeros(2, bool),
                                       np.ones((2, 7), bool))


@pytest.fixture(scope="module")
def wrong_attribute_match():
    """One prompt, 8 rollouts. All readings are right and identical; the first 4 rollouts are right
    everywhere (Exact); in the last 4 the attribute match `ma` is wrong (partial instead of match),
    which makes the label wrong (Substitute). Columns: qs qa ps pa ms ma y."""
    spec = graph_spec(default_graph_config())
    gold = np.array([100, 101, 102, 103, 0, 0, 0])
    values = np.tile(gold, (8, 1))
    values[4:, spec.index("ma")] = 1
    values[4:, spec.index("y")] = 1
    rewards = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
    graph = encode_rollouts(spec, rewards, values, np.zeros(8, int), group_size=8)
    node_correct = diagnostics.node_correctness(values, np.tile(gold, (8, 1)))
    return spec, graph, values, node_correct, rewards == 1


def test_graph_credit_blames_the_wrong_node_and_outcome_cannot(wrong_attribute_match):
    spec, graph, values, node_correct, label_correct = wrong_attribute_match
    assert node_correct[4:].sum(1).tolist() == [5] * 4  # ma and y wrong
    default = CreditSettings()
    results = diagnostics.diagnose_variants(spec, graph, np.asarray(spec.phi_init), node_correct,
                                            label_correct, values >= 0, default,
                                            variants=("outcome", "graph"))
    # Consumer evidence. Failed rollouts: c_ma = 0 (every `partial` rollout failed), c_ms = 1/2 (all
    # rollouts share ms), readings copy their match node: qa = pa = 0, qs = ps = 1/2. The lowest credit
    # is shared by ma and the two readings it consumes; the tie resolves to ma, the node measured.
    graph_result, outcome_result = results["graph"], results["outcome"]
    assert graph_result.num_blamed == 4
    assert graph_result.blame_precision_at_1 == 1.0
    np.testing.assert_allclose(graph_result.blame_precision_tie_expected, 1 / 3)
    np.testing.assert_allclose(graph_result.blame_random_baseline, 1 / 6)
    # Outcome credit is R on every node: every candidate ties, so it can only score as the tie
    # resolves (to ms here, which is right) and its tie-expected precision is the random baseline.
    assert outcome_result.blame_precision_at_1 == 0.0
    np.testing.assert_allclose(outcome_result.blame_precision_tie_expected, 1 / 6)
    assert graph_result.credit_correctness_corr > outcome_result.credit_correctness_corr > 0


def test_paper_faithful_graph_credit_singles_the_wrong_node_out(wrong_attribute_match):
    spec, graph, values, node_correct, label_correct = wrong_attribute_match
    settings = CreditSettings(norm="node", kappa=1.0)
    phi = jnp.full(spec.num_edges, 0.5)
    credits = np.asarray(node_credit(graph, phi, spec=spec, settings=settings).credits)[:8]
    # κ = 1: ℓ_ma = (0 + ½)/(4 + 1) = 0.1 for `partial`; c_ma = ½·0.1 + ½·0 = 0.05;
    # ℓ_ms = ½ (shared), c_ms = ½·½ + ½·0 = 0.25; readings ℓ = ½:
    # c_qa = c_pa = ¼ + ½·0.05 = 0.275, c_qs = c_ps = ¼ + ½·0.25 = 0.375.
    np.testing.assert_allclose(credits[4], [0.375, 0.275, 0.375, 0.275, 0.25, 0.05, 0.0], atol=1e-6)
    result = diagnostics.credit_diagnostics(spec, credits, node_correct, label_correct, values >= 0)
    assert result.blame_precision_at_1 == 1.0 and result.blame_precision_tie_expected == 1.0


def test_node_correctness_treats_missing_as_wrong():
    correct = diagnostics.node_correctness(np.array([[0, -1, 2]]), np.array([[0, -1, 1]]))
    assert correct.tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="differ in shape"):
        diagnostics.node_correctness(np.zeros((1, 2)), np.zeros((1, 3)))
