"""Offline A/B simulation: user-model rates against their configured probabilities, pipeline stages on
hand-made cases, A/A calibration, a random-reranking arm detected end to end on a small world."""

import statistics

import numpy as np
import pytest

from configs import ab_test as ab_configs
from graphgrpo_jax.data import world as world_lib
from graphgrpo_jax.data.cot import LABELS
from graphgrpo_jax.search import ab, pipeline, users
from graphgrpo_jax.search.engine import SearchEngine

E, S, C, I = (LABELS.index(label) for label in ("Exact", "Substitute", "Complement", "Irrelevant"))
EMPTY = users.EMPTY


def binomial_bound(p: float, n: int, checks: int, alpha: float = 1e-6) -> float:
    """Half-width of a two-sided normal-approximation interval for a binomial share at level `alpha`,
    Bonferroni-corrected over `checks` simultaneous checks."""
    z = statistics.NormalDist().inv_cdf(1.0 - alpha / (2 * checks))
    return z * np.sqrt(p * (1.0 - p) / n)


# ------------------------------------------------------------------------------------------ user model


def test_user_rates_match_the_configured_probabilities():
    cfg = users.default_user_config()
    cfg.examination_decay = 0.7
    page = np.array([E, S, C, I, E, EMPTY, S])
    sessions = 200_000
    behaviour = users.simulate(cfg, np.tile(page, (sessions, 1)), np.random.default_rng(0))
    examine = np.array([r ** -0.7 for r in range(1, len(page) + 1)])
    click = np.array([0.0 if label == EMPTY else cfg.click[LABELS[label]] for label in page])
    expected = {
        "examined": np.where(page == EMPTY, 0.0, examine),
        "clicked": examine * click,
        "purchased": examine * click * np.where(page == E, cfg.purchase_given_click, 0.0),
    }
    checks = len(expected) * len(page)
    for name, rates in expected.items():
        observed = getattr(behaviour, name).mean(axis=0)
        for rank, (seen, p) in enumerate(zip(observed, rates), start=1):
            assert abs(seen - p) <= binomial_bound(p, sessions, checks), (name, rank, seen, p)
    assert not behaviour.clicked[:, page == EMPTY].any()
    assert not behaviour.purchased[:, page != E].any(), "only intent-matching (Exact) products are bought"


def test_user_config_errors_name_the_field():
    cfg = users.default_user_config()
    cfg.click.Exact = 1.5
    with pytest.raises(ValueError, match=r"config.users.click.Exact"):
        users.validate_user_config(cfg)
    cfg = users.default_user_config()
    cfg.purchase_given_click = -0.1
    with pytest.raises(ValueError, match="purchase_given_click"):
        users.validate_user_config(cfg)
    with pytest.raises(ValueError, match="label ids"):
        users.simulate(users.default_user_config(), np.array([[0, 7]]), np.random.default_rng(0))


# ------------------------------------------------------------------------------------------- pipeline


class FakeEngine:
    """Hand-made result lists, ranked as given (nothing for any other query)."""

    def __init__(self, results):
        self.results = results

    def search_batch(self, queries, k):
        return [[(product_id, 1.0) for product_id in self.results.get(query, [])[:k]] for query in queries]


class CountingScorer:
    """P(label) per title from a table; records the pairs it was asked about."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, queries, titles):
        self.calls.append(list(zip(queries, titles)))
        return np.array([self.table[title] for title in titles])


def test_interleave_alternates_and_skips_repeats():
    assert pipeline.interleave(["a", "b", "c"], ["b", "d"], 10) == ["a", "b", "d", "c"]
    assert pipeline.interleave(["a"], ["x", "y", "z"], 3) == ["a", "x", "y"]
    assert pipeline.interleave([], ["x"], 5) == ["x"]


def test_pipeline_stages_on_a_hand_made_case():
    engine = FakeEngine({"red shoes": ["p1", "p2", "p3"], "cheap kicks": ["p4", "p1"]})
    rewriters = {"raw": pipeline.raw_query, "fixed": lambda queries: ["red shoes" for _ in queries]}
    # P(label) in LABELS order (Exact, Substitute, Complement, Irrelevant); expected grades 3·E + 2·S + C.
    table = {"t1": [0.1, 0.1, 0.1, 0.7], "t2": [0.2, 0.6, 0.1, 0.1], "t3": [0.9, 0.0, 0.0, 0.1],
             "t4": [0.0, 0.0, 0.6, 0.4]}
    scorer = CountingScorer(table)
    titles = {f"p{i}": f"t{i}" for i in range(1, 5)}

    def page(**fields):
        spec = pipeline.ArmSpec(**fields)
        return pipeline.run_pipeline(spec, ["cheap kicks"], engine=engine, rewriters=rewriters,
                                     scorers={"judge": scorer}, titles=titles).pages[0]

    assert page() == ["p4", "p1"]
    assert page(rewriter="fixed", k=2, depth=3) == ["p1", "p2"]
    # Union: rewrite first, then raw, alternating; p1 is in both lists.
    assert page(rewriter="fixed", union=True, k=4, depth=4) == ["p1", "p4", "p2", "p3"]
    # Filter P(Irrelevant) >= 0.5 drops p1 (0.7); 0.4 of p4 stays.
    assert page(rewriter="fixed", union=True, relevance="judge", filter=True, k=4, depth=4) == ["p4", "p2", "p3"]
    # Rerank by expected grade: p3 2.7, p2 1.9, p4 0.6 (p1 filtered).
    assert page(rewriter="fixed", union=True, relevance="judge", filter=True, rerank="relevance", k=2,
                depth=4) == ["p3", "p2"]
    # The relevance stage reads the user's query, and each distinct pair once.
    assert sorted(scorer.calls[-1]) == [("cheap kicks", f"t{i}") for i in range(1, 5)]


def test_random_rerank_permutes_the_candidates():
    engine = FakeEngine({"q": [f"p{i}" for i in range(20)]})
    spec = pipeline.ArmSpec(rerank="random", k=20, depth=20)
    out = pipeline.run_pipeline(spec, ["q"], engine=engine, rewriters={"raw": pipeline.raw_query}, scorers={},
                                titles={}, seed=3)
    assert sorted(out.pages[0]) == sorted(engine.results["q"]) and out.pages[0] != engine.results["q"]
    assert set(out.milliseconds_per_query) == {*pipeline.STAGES, "total"}
    assert out.milliseconds_per_query["relevance"] == 0.0


def test_arm_spec_errors_name_the_arm():
    with pytest.raises(ValueError, match=r"config.arms.bad: .*relevance='none'"):
        pipeline.ArmSpec.from_mapping("bad", dict(filter=True))
    with pytest.raises(ValueError, match=r"config.arms.bad: unknown fields \['colour'\]"):
        pipeline.ArmSpec.from_mapping("bad", dict(colour="red"))
    with pytest.raises(ValueError, match="k <= depth"):
        pipeline.ArmSpec(k=10, depth=5)
    with pytest.raises(ValueError, match="not available"):
        pipeline.run_pipeline(pipeline.ArmSpec(rewriter="rl"), ["q"], engine=FakeEngine({}),
                              rewriters={"raw": pipeline.raw_query}, scorers={}, titles={})


# ------------------------------------------------------------------------------------- metrics and A/A


def test_user_table_sums_by_hand():
    """Users who examine everything, click everything relevant and buy every Exact they click."""
    cfg = ab_configs.get_config("micro")
    cfg.users.update(examination_decay=0.0, purchase_given_click=1.0)
    cfg.users.click.update(Exact=1.0, Substitute=1.0, Complement=0.0, Irrelevant=0.0)
    pages = ab.JudgedPages(labels=np.array([[E, I, EMPTY], [C, EMPTY, EMPTY]]), ndcg=np.array([0.8, 0.2]),
                           recall=np.array([1.0, np.nan]))
    # User 0 searches query 0 twice, user 1 query 1 once.
    traffic = ab.Traffic(user=np.array([0, 0, 1]), query=np.array([0, 0, 1]), arm=np.array([0, 0]))
    table = ab.user_table(traffic, (pages,), cfg.users, np.random.default_rng(0))
    row = {name: table[:, i].tolist() for i, name in enumerate(ab.FIELDS)}
    assert row["sessions"] == [2, 1] and row["shown"] == [4, 1] and row["irrelevant_shown"] == [2, 0]
    assert row["ndcg"] == [1.6, 0.2] and row["recall"] == [2.0, 0.0] and row["sessions_with_log"] == [2, 0]
    assert row["clicks"] == [2, 0] and row["purchases"] == [2, 0] and row["converted"] == [1, 0]
    values = {name: float(v) for name, v in ab.metric_values(table.sum(axis=0)).items()}
    assert values == pytest.approx({"bad_case_rate": 2 / 5, "ndcg": 1.8 / 3, "recall": 1.0, "ctr": 2 / 3,
                                    "ucvr": 0.5, "purchases_per_user": 1.0, "results_per_page": 5 / 3})


@pytest.fixture(scope="module")
def random_pages():
    rng = np.random.default_rng(7)
    labels = rng.choice([E, S, C, I, EMPTY], size=(40, 10), p=[0.3, 0.25, 0.15, 0.2, 0.1])
    recall = np.where(rng.random(40) < 0.8, rng.random(40), np.nan)
    return ab.JudgedPages(labels=labels, ndcg=rng.random(40), recall=recall)


def test_aa_test_is_not_significant_in_at_least_90_percent_of_seeds(random_pages):
    """The same pages in both arms. Measured over 1000 seeds at this size (1000 users, 200 replicates) the
    percentile interval is slightly anti-conservative for CTR (6.8% false positives; 5.3% at 3000 users)."""
    config = ab_configs.get_config("micro")
    config.sessions.num_users = 1000
    config.bootstrap.reps = 200
    seeds = range(200)
    significant = np.array([[m["significant"] for m in ab.ab_test(random_pages, random_pages, config, seed)
                             ["metrics"].values()] for seed in seeds])
    assert significant.shape == (len(seeds), len(ab.METRICS))
    false_positive_rate = significant.mean(axis=0)
    assert (false_positive_rate <= 0.10).all(), dict(zip(ab.METRICS, false_positive_rate))
    # Not vacuously wide intervals either: at 95%, about 5% of A/A decisions are false positives.
    assert 0.02 <= false_positive_rate.mean() <= 0.09, false_positive_rate


def test_comparison_errors():
    config = ab_configs.get_config("micro")
    with pytest.raises(ValueError, match="'arm_a:arm_b'"):
        ab.parse_comparison("control", config.arms)
    with pytest.raises(ValueError, match="arm 'nope' is not in config.arms"):
        ab.parse_comparison("control:nope", config.arms)


# ------------------------------------------------------------------------------ end to end on a world


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    world = world_lib.build_world(dict(seed=0, num_queries=200, products_per_type=8, pairs_per_query=2))
    engine = SearchEngine.build([{"id": p.product_id, "title": p.title} for p in world.products],
                                tmp_path_factory.mktemp("ab") / "index")
    return world, engine


def test_judge_pages_agrees_with_the_world_labels(small_world):
    world, _ = small_world
    pairs = world.split_pairs("test")[:40]
    queries = [world.query_by_id[pair.query_id] for pair in pairs]
    judged = ab.judge_pages(world, queries, [[pair.product_id] for pair in pairs], k=3)
    assert judged.labels[:, 0].tolist() == [LABELS.index(pair.label) for pair in pairs]
    assert (judged.labels[:, 1:] == EMPTY).all()
    # The catalogue's best k products by true grade score NDCG 1; a page of Irrelevant products 0.
    query = queries[0]
    by_grade = sorted(world.products, key=lambda p: -ab.GAINS[ab.true_label(world, query, p)])
    best, worst = [p.product_id for p in by_grade[:3]], [p.product_id for p in by_grade[-3:]]
    assert ab.judge_pages(world, [query, query], [best, worst], k=3).ndcg.tolist() == [1.0, 0.0]


def test_random_reranking_arm_is_detected_as_worse(small_world, tmp_path):
    world, engine = small_world
    config = ab_configs.get_config("micro")
    config.max_queries = 0  # all 30 test queries
    config.sessions.num_users = 3000
    config.bootstrap.reps = 300
    config.arms.ranked = ab_configs.arm(rewriter="gold", depth=30)
    config.arms.shuffled = ab_configs.arm(rewriter="gold", rerank="random", depth=30)
    config.comparisons = ("ranked:shuffled",)
    gold = {query.text: query.gold_rewrite for query in world.queries}
    results = ab.run_ab(config, world=world, engine=engine,
                        rewriters={"gold": lambda texts: [gold[text] for text in texts]}, scorers={},
                        workdir=str(tmp_path))
    metrics = results["comparisons"]["ranked:shuffled"]["metrics"]
    for name in ("ndcg", "ctr", "purchases_per_user"):
        assert metrics[name]["significant"] and metrics[name]["difference"] < 0, (name, metrics[name])
    assert results["arms"]["ranked"]["offline"]["ndcg"] > results["arms"]["shuffled"]["offline"]["ndcg"]
    report = (tmp_path / "report.md").read_text()
    assert "## shuffled (B) vs ranked (A)" in report and "| ndcg |" in report
    assert (tmp_path / "plots" / "shuffled_vs_ranked.png").stat().st_size > 0
    assert (tmp_path / "results.json").is_file()
