"""Rewards: hand-worked cases per reward, a micro search catalogue, fusion and TRL aggregation against
independent references written here from the formulas."""

import math

import numpy as np
import pytest

from graphgrpo_jax.data import cot
from graphgrpo_jax.rl import rewards
from graphgrpo_jax.search.engine import SearchEngine

# ------------------------------------------------------------------------------------------ registry


def test_registry_holds_every_reward_by_name():
    assert set(rewards.registered_rewards()) >= {
        "relevance_outcome", "r_rule", "r_conv", "r_rel", "rewrite_fused"}
    assert rewards.get_reward("r_conv") is rewards.r_conv
    with pytest.raises(KeyError, match="no reward named 'r_nope'.*r_conv"):
        rewards.get_reward("r_nope")
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("r_rule")(lambda completions, contexts: [])


def test_registered_rewards_check_their_batch(monkeypatch):
    monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))  # register into a copy

    @rewards.register_reward("test_constant_length")
    def wrong_length(completions, contexts):
        return [1.0]

    with pytest.raises(ValueError, match="2 completions but 1 contexts"):
        rewards.r_rule(["a", "b"], [{"query": "q"}])
    with pytest.raises(ValueError, match="'test_constant_length' returned shape \\(1,\\), expected \\(2,\\)"):
        wrong_length(["a", "b"], [{}, {}])


# -------------------------------------------------------------------------------- relevance outcome

GOLD = {"qs": "running shoes", "qa": "color=red", "ps": "trail shoes", "pa": "color=red",
        "ms": "partial", "ma": "match", "y": "Substitute"}


def test_relevance_outcome_right_wrong_and_unparseable():
    right = cot.render(GOLD)
    wrong = cot.render({**GOLD, "y": "Exact"})
    completions = [
        right,
        wrong,
        cot.render(GOLD, label_position="first"),  # the label first is still a valid response
        cot.render({**GOLD, "y": "Maybe"}),  # label outside the vocabulary
        cot.render({n: v for n, v in GOLD.items() if n != "ma"}, nodes=[n for n in cot.NODES if n != "ma"]),
        right + " because",  # stray text
        right[:-4],  # truncated: <y> unclosed
        "",
        "Substitute",
    ]
    contexts = [{"label": "Substitute"}] * len(completions)
    expected = [1.0, 0.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]
    np.testing.assert_array_equal(rewards.relevance_outcome(completions, contexts), expected)
    scaled = rewards.relevance_outcome(completions, contexts, r_format=-0.5)
    np.testing.assert_array_equal(scaled, [-0.5 if e == -1 else e for e in expected])


def test_relevance_outcome_reuses_parses_and_reads_label_indices():
    completions = [cot.render(GOLD), cot.render({**GOLD, "y": "Irrelevant"})]
    parses = rewards.parse_completions(completions)
    assert [p.values["y"] for p in parses] == ["Substitute", "Irrelevant"]
    # A parse is trusted as given: a (fake) invalid parse gives r_format whatever the text says.
    invalid = [parses[0], cot.ParseResult({}, {}, {}, ("<y> missing",))]
    contexts = [{"label": cot.LABELS.index("Substitute")}, {"label": np.int64(3)}]  # TFDS ClassLabel
    np.testing.assert_array_equal(rewards.relevance_outcome(completions, contexts, parses=parses), [1, 1])
    np.testing.assert_array_equal(rewards.relevance_outcome(completions, contexts, parses=invalid), [1, -1])


def test_relevance_outcome_bad_contexts_are_named():
    completions = [cot.render(GOLD)]
    with pytest.raises(KeyError, match=r"'relevance_outcome' reads contexts\[0\]\['label'\]"):
        rewards.relevance_outcome(completions, [{"query": "q"}])
    with pytest.raises(ValueError, match=r"contexts\[0\]\['label'\] = 'Exakt' is not one of"):
        rewards.relevance_outcome(completions, [{"label": "Exakt"}])
    with pytest.raises(ValueError, match="no index into labels"):
        rewards.relevance_outcome(completions, [{"label": 4}])


# ------------------------------------------------------------------------------------------ r_rule

QUERY = "jogging sneakers"
RULE_CASES = [
    ("running shoes", ()),
    ("(nike OR adidas) AND running shoes", ()),
    ("women's running shoes", ()),
    ("brand:nike running shoes", ()),
    ("  running shoes \n", ()),
    ("shoes AND", ()),  # balanced; only the engine knows the dangling operator is malformed
    ("", ("empty", "too_short")),
    ("   ", ("empty", "too_short")),
    ("AND OR NOT", ("empty", "too_short")),
    ("( )", ("empty", "too_short")),
    ("(running shoes", ("unbalanced",)),
    ("running shoes)", ("unbalanced",)),
    (")running shoes(", ("unbalanced",)),
    ('"running shoes', ("unbalanced",)),
    ("Jogging   SNEAKERS", ("copy",)),
    ("x" * 10_000, ("too_long",)),
    ("shoe " * 2_000, ("too_long", "repetition")),
    (" ".join(f"w{i}" for i in range(33)), ("too_long",)),
    ("red red red shoes", ("repetition",)),
    ("red shoes red shoes", ("repetition",)),
    ("(red OR blue) AND (red OR green)", ()),  # a word twice is allowed, no bigram repeats
    # Quoted phrases are one term each: the ESCI teacher's phrase lists are not loops, a phrase thrice is.
    ('("HD TV" OR "LED TV" OR "4K TV" OR \'smart TV\') AND television', ()),
    ('"hd tv" OR "HD  TV" OR \'hd tv\'', ("repetition",)),
    ("women's OR womens' OR women's shoes", ()),  # apostrophes are not quotes
]


@pytest.mark.parametrize("rewrite, violations", RULE_CASES)
def test_rule_violations(rewrite, violations):
    assert rewards.rule_violations(rewrite, QUERY) == violations


def test_r_rule_is_one_exactly_when_no_check_fails(engine):
    completions = [rewrite for rewrite, _ in RULE_CASES]
    expected = [float(not violations) for _, violations in RULE_CASES]
    contexts = [{"query": QUERY}] * len(completions)
    np.testing.assert_array_equal(rewards.r_rule(completions, contexts), expected)
    # The engine's syntax check adds `malformed` where the query language rejects the rewrite.
    assert rewards.rule_violations("shoes AND", QUERY, engine=engine) == ("malformed",)
    assert rewards.rule_violations("(nike OR adidas) AND shoes", QUERY, engine=engine) == ()
    with_engine = rewards.r_rule(["shoes AND", "running shoes"], contexts[:2], engine=engine)
    np.testing.assert_array_equal(with_engine, [0.0, 1.0])
    stricter = rewards.r_rule(["running shoes", "red running shoes"], contexts[:2], min_words=3)
    np.testing.assert_array_equal(stricter, [0.0, 1.0])
    with pytest.raises(KeyError, match=r"'r_rule' reads contexts\[0\]\['query'\]"):
        rewards.r_rule(["x"], [{}])


# ------------------------------------------------------------------------------------------ r_conv

CATALOGUE = [
    {"id": "P1", "title": "red running shoes"},
    {"id": "P2", "title": "blue running shoes"},
    {"id": "P3", "title": "ceramic coffee mug"},
    {"id": "P4", "title": "steel travel mug"},
    {"id": "P5", "title": "yoga mat"},
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return SearchEngine.build(CATALOGUE, tmp_path_factory.mktemp("catalogue") / "engine")


class CountingEngine:
    """Records each `search_batch` call of the engine it wraps."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def search_batch(self, queries, k):
        self.calls.append((list(queries), k))
        return self.engine.search_batch(queries, k)


# Rankings (BM25): "red running shoes" -> P1, P2; "coffee mug" -> P3, P4; "yoga mat" -> P5; "" -> none.
CONV_ROWS = [  # rewrite, purchases
    ("red running shoes", ["P2"]),
    ("coffee mug", ["P3", "P4"]),
    ("yoga mat", []),  # nobody bought: r_conv does not apply
    ("", ["P5"]),
    ("coffee mug", [b"P4"]),  # repeated rewrite; TFDS gives ids as bytes
    ("yoga mat", ["P1"]),
]
INV_LOG3 = 1 / math.log2(3)  # DCG discount at rank 2
CONV_EXPECTED = {  # (metric, k) -> values, by hand
    ("recall", 1): [0.0, 0.5, np.nan, 0.0, 0.0, 0.0],
    ("recall", 2): [1.0, 1.0, np.nan, 0.0, 1.0, 0.0],
    ("ndcg", 1): [0.0, 1.0, np.nan, 0.0, 0.0, 0.0],  # ideal DCG@1 of two purchases is 1
    ("ndcg", 2): [INV_LOG3, 1.0, np.nan, 0.0, INV_LOG3, 0.0],
}


@pytest.mark.parametrize("metric, k", sorted(CONV_EXPECTED))
def test_r_conv_hand_computed(engine, metric, k):
    counting = CountingEngine(engine)
    completions = [rewrite for rewrite, _ in CONV_ROWS]
    contexts = [{"query": "q", "purchased_product_ids": bought} for _, bought in CONV_ROWS]
    values = rewards.r_conv(completions, contexts, engine=counting, k=k, metric=metric)
    np.testing.assert_allclose(values, CONV_EXPECTED[metric, k], rtol=1e-12)
    # One batched search over the distinct rewrites of rows with purchases, in first-seen order.
    assert counting.calls == [(["red running shoes", "coffee mug", "", "yoga mat"], k)]


def test_r_conv_bad_input(engine):
    with pytest.raises(KeyError, match=r"'r_conv' reads contexts\[1\]\['purchased_product_ids'\]"):
        rewards.r_conv(["a", "b"], [{"purchased_product_ids": ["P1"]}, {"query": "b"}], engine=engine)
    with pytest.raises(TypeError, match="one string 'P1'"):
        rewards.r_conv(["a"], [{"purchased_product_ids": "P1"}], engine=engine)
    with pytest.raises(ValueError, match="metric 'map'"):
        rewards.r_conv(["a"], [{"purchased_product_ids": ["P1"]}], engine=engine, metric="map")
    counting = CountingEngine(engine)
    values = rewards.r_conv(["a"], [{"purchased_product_ids": []}], engine=counting)
    assert np.isnan(values).all() and counting.calls == []


# ------------------------------------------------------------------------------------------- r_rel


class TableJudge:
    """A judge reading fixed distributions from a table keyed by (query, rewrite); records calls."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, queries, rewrites):
        self.calls.append((list(queries), list(rewrites)))
        return np.array([self.table[q, r] for q, r in zip(queries, rewrites)])


JUDGE_TABLE = {
    ("q1", "a"): [0.7, 0.2, 0.1],
    ("q1", "b"): [0.0, 0.0, 1.0],
    ("q2", "a"): [0.2, 0.6, 0.2],
}


def test_r_rel_expected_tag_credit_and_one_deduplicated_call():
    judge = TableJudge(JUDGE_TABLE)
    completions = ["a", "b", "a", "a"]
    contexts = [{"query": "q1"}, {"query": "q1"}, {"query": "q1"}, {"query": "q2"}]
    values = rewards.r_rel(completions, contexts, judge=judge)
    np.testing.assert_allclose(values, [0.7 + 0.1, 0.0, 0.7 + 0.1, 0.2 + 0.3], rtol=1e-12)
    assert judge.calls == [(["q1", "q1", "q2"], ["a", "b", "a"])]


def test_r_rel_takes_a_score_judge_as_it_stands():
    """A judge answering one score in [0, 1] per pair (a retrieval judge): the score is the credit."""
    judge = TableJudge({("q1", "a"): 0.25, ("q1", "b"): 1.0, ("q2", "a"): 0.0})
    values = rewards.r_rel(["a", "b", "a", "a"], [{"query": q} for q in ("q1", "q1", "q1", "q2")], judge=judge)
    np.testing.assert_array_equal(values, [0.25, 1.0, 0.25, 0.0])
    assert judge.calls == [(["q1", "q1", "q2"], ["a", "b", "a"])]


@pytest.mark.parametrize("bad, message", [
    (np.ones((2, 2)) / 2, r"shape \(2, 2\), expected \(2, 3\) \(one distribution .*\) or \(2,\)"),
    ([0.5, 1.2], r"judge row 1 is not a relevance score in \[0, 1\]"),
    ([np.nan, 0.5], r"judge row 0 is not a relevance score"),
    ([0.5], r"shape \(1,\), expected \(2, 3\)"),
    ([[0.5, 0.5, 0.0], [0.5, 0.6, 0.0]], "judge row 1 is not a distribution"),
    ([[1.2, -0.2, 0.0], [1.0, 0.0, 0.0]], "judge row 0 is not a distribution"),
    ([[np.nan, 0.5, 0.5], [1.0, 0.0, 0.0]], "judge row 0 is not a distribution"),
])
def test_r_rel_rejects_bad_judges(bad, message):
    with pytest.raises(ValueError, match=message):
        rewards.r_rel(["a", "b"], [{"query": "q"}] * 2, judge=lambda queries, rewrites: bad)


# ------------------------------------------------------------------------------------------- fusion


def fuse_reference(rule, rel, conv, mode, w_rel, w_conv):
    """Row by row, straight from the documented rules."""
    out = []
    for g, a, b in zip(rule, rel, conv):
        if mode in ("rule", "rel", "conv"):
            out.append({"rule": g, "rel": a, "conv": b}[mode])
            continue
        gate = 1.0 if math.isnan(g) else g
        present = [(w, r) for w, r in ((w_rel, a), (w_conv, b)) if not math.isnan(r)]
        if mode == "rfusion":
            total = sum(w for w, _ in present)
            mixed = sum(w * r for w, r in present) * (w_rel + w_conv) / total if total > 0 else math.nan
            out.append(gate * mixed)
        elif not present:
            out.append(math.nan)
        elif mode == "product":
            out.append(gate * math.prod(r for _, r in present))
        else:
            out.append(gate * min(r for _, r in present))
    return np.array(out)


def test_fusion_hand_worked():
    rule, rel, conv = np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.8, 0.8, 0.8, np.nan]), \
        np.array([0.5, np.nan, 0.5, np.nan])
    fuse = rewards.fuse_rewrite_rewards
    np.testing.assert_allclose(fuse(rule, rel, conv, "rfusion", w_rel=0.3, w_conv=0.7),
                               [0.3 * 0.8 + 0.7 * 0.5, 0.8, 0.0, np.nan])
    np.testing.assert_allclose(fuse(rule, rel, conv, "product"), [0.4, 0.8, 0.0, np.nan])
    np.testing.assert_allclose(fuse(rule, rel, conv, "min"), [0.5, 0.8, 0.0, np.nan])
    np.testing.assert_array_equal(fuse(rule, rel, conv, "conv"), conv)
    with pytest.raises(ValueError, match="fusion mode 'sum'"):
        fuse(rule, rel, conv, "sum")
    with pytest.raises(ValueError, match="positive sum"):
        fuse(rule, rel, conv, w_rel=0.0, w_conv=0.0)


@pytest.mark.parametrize("mode", rewards.FUSION_MODES)
def test_fusion_matches_reference_on_random_inputs_with_nans(mode):
    rng = np.random.default_rng(0)
    n = 200
    rule = rng.integers(0, 2, n).astype(float)
    rel, conv = rng.uniform(size=n), rng.uniform(size=n)
    for values, p in ((rule, 0.1), (rel, 0.3), (conv, 0.4)):
        values[rng.uniform(size=n) < p] = np.nan
    for w_rel, w_conv in ((0.5, 0.5), (0.2, 1.3), (0.0, 1.0)):
        got = rewards.fuse_rewrite_rewards(rule, rel, conv, mode, w_rel=w_rel, w_conv=w_conv)
        np.testing.assert_allclose(got, fuse_reference(rule, rel, conv, mode, w_rel, w_conv), rtol=1e-12)


def test_rewrite_fused_combines_the_registered_components(engine):
    judge = TableJudge({("jogging sneakers", r): p for r, p in
                        [("running shoes", [0.9, 0.1, 0.0]), ("jogging sneakers", [1.0, 0.0, 0.0]),
                         ("coffee mug", [0.0, 0.1, 0.9])]})
    completions = ["running shoes", "jogging sneakers", "coffee mug", "running shoes"]
    contexts = [{"query": "jogging sneakers", "purchased_product_ids": ["P1", "P2"]}] * 4
    parts = rewards.rewrite_reward_components(completions, contexts, engine=engine, judge=judge, k=2,
                                              w_rel=0.4, w_conv=0.6)
    np.testing.assert_array_equal(parts["r_rule"], [1, 0, 1, 1])  # the copy of the query fails
    np.testing.assert_allclose(parts["r_rel"], [0.95, 1.0, 0.05, 0.95])
    np.testing.assert_array_equal(parts["r_conv"], [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(parts["fused"], [0.4 * 0.95 + 0.6, 0.0, 0.4 * 0.05, 0.4 * 0.95 + 0.6])
    fused = rewards.get_reward("rewrite_fused")(completions, contexts, engine=engine, judge=judge, k=2,
                                                w_rel=0.4, w_conv=0.6)
    np.testing.assert_array_equal(fused, parts["fused"])
    # `rule` alone needs neither engine nor judge; the unread rewards stay NaN.
    rule_only = rewards.rewrite_reward_components(completions, contexts, mode="rule")
    assert np.isnan(rule_only["r_rel"]).all() and np.isnan(rule_only["r_conv"]).all()
    np.testing.assert_array_equal(rule_only["fused"], [1, 0, 1, 1])
    with pytest.raises(ValueError, match="needs a relevance judge"):
        rewards.rewrite_reward_components(completions, contexts, engine=engine)


# -------------------------------------------------------------------------------------- aggregation


TRL_STD_EPS = 1e-4  # TRL's; ours is config.credit.eps (1e-6), aggregate's `eps`


def trl_normalize_then_sum_reference(table, weights, group_size):
    """TRL's `normalize_then_sum` before its final batch normalisation, transcribed formula by formula:
    nanmean, nanstd with Bessel's count/(count-1), + 1e-4, weighted nansum."""
    grouped = table.reshape(-1, group_size, table.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(grouped, axis=1, keepdims=True)
        count = np.sum(~np.isnan(grouped), axis=1, keepdims=True)
        variance = np.nanmean((grouped - mean) ** 2, axis=1, keepdims=True) * count / (count - 1)
        normalised = (grouped - mean) / (np.sqrt(variance) + TRL_STD_EPS)
    return np.nansum(normalised.reshape(table.shape) * weights, axis=1)


def random_reward_table(rng, groups=6, group_size=4, functions=3):
    table = rng.normal(size=(groups * group_size, functions))
    table[rng.uniform(size=table.shape) < 0.3] = np.nan
    table[0] = np.nan  # a row no function scores
    table[4:8, 0] = 0.25  # a group with no spread
    table[8:12, 1] = [np.nan, 0.7, np.nan, np.nan]  # a group with one scored row
    return table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_trl_formulas_on_random_inputs_with_nans(seed):
    rng = np.random.default_rng(seed)
    table = random_reward_table(rng)
    names = ["correct", "format", "length"]
    weights = dict(zip(names, [1.0, 0.5, 2.0]))
    by_name = {name: table[:, i] for i, name in enumerate(names)}
    weight_row = np.array([weights[name] for name in names])

    summed, stats = rewards.aggregate(by_name, weights, group_size=4, mode="sum_then_normalize")
    expected_sum = [sum(w * v for w, v in zip(weight_row, row) if not np.isnan(v)) for row in table]
    np.testing.assert_allclose(summed, expected_sum, rtol=1e-12, atol=1e-12)

    # Normalised by the advantages' group statistics, in float32.
    normalised, _ = rewards.aggregate(by_name, weights, group_size=4, mode="normalize_then_sum", eps=TRL_STD_EPS)
    np.testing.assert_allclose(normalised, trl_normalize_then_sum_reference(table, weight_row, 4),
                               rtol=1e-5, atol=1e-5)

    assert summed[0] == 0.0 and normalised[0] == 0.0
    assert stats["rewards/unscorable"] == float(np.isnan(table).all(axis=1).sum()) >= 1
    for i, name in enumerate(names):
        column = table[:, i]
        assert stats[f"rewards/{name}/mean"] == pytest.approx(np.nanmean(column))
        assert stats[f"rewards/{name}/std"] == pytest.approx(np.nanstd(column, ddof=1))
        assert stats[f"rewards/{name}/not_applicable"] == pytest.approx(np.isnan(column).mean())


def test_aggregate_reproduces_trls_worked_example():
    # One prompt, G = 4: correctness and a raw length penalty, weights 1 and 1.
    by_name = {"correct": [1.0, 0.0, 1.0, 0.0], "length": [-120.0, -100.0, -60.0, -80.0]}
    summed, _ = rewards.aggregate(by_name, None, group_size=4, mode="sum_then_normalize")
    np.testing.assert_array_equal(summed, [-119, -100, -59, -80])
    np.testing.assert_allclose(rewards.normalize_within_groups(summed, 4), [-1.14, -0.41, 1.18, 0.37], atol=5e-3)
    normalised, _ = rewards.aggregate(by_name, None, group_size=4, mode="normalize_then_sum")
    np.testing.assert_allclose(normalised, [-0.296, -1.253, 2.028, -0.479], atol=5e-4)
    # TRL's final normalisation over the batch, here one group.
    np.testing.assert_allclose(rewards.normalize_within_groups(normalised, 4), [-0.21, -0.89, 1.43, -0.34],
                               atol=5e-3)


def test_group_normalisation_without_nans_is_the_advantages_formula():
    rng = np.random.default_rng(3)
    values = rng.normal(size=24)
    values[8:12] = 0.1  # no spread, of a value whose float mean is not exact: exactly 0 all the same
    grouped = values.reshape(-1, 4)
    expected = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-6)
    expected[2] = 0.0
    got = rewards.normalize_within_groups(values, 4)
    np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-5, atol=1e-5)
    assert np.all(got[8:12] == 0.0)
    with pytest.raises(ValueError, match="groups of 4"):
        rewards.normalize_within_groups(values[:6], 4)


def test_aggregate_bad_input():
    with pytest.raises(KeyError, match=r"weights name \['a'\] but the rewards are \['a', 'b'\]"):
        rewards.aggregate({"a": [1.0, 2.0], "b": [0.0, 1.0]}, {"a": 1.0}, 2)
    with pytest.raises(ValueError, match="reward 'b' has shape \\(3,\\)"):
        rewards.aggregate({"a": [1.0, 2.0], "b": [0.0, 1.0, 2.0]}, None, 2)
    with pytest.raises(ValueError, match="3 rewards per function do not split into groups of 2"):
        rewards.aggregate({"a": [1.0, 2.0, 3.0]}, None, 2)
    with pytest.raises(ValueError, match="multi_objective_aggregation 'mean'"):
        rewards.aggregate({"a": [1.0, 2.0]}, None, 2, mode="mean")
