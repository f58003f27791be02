r"""Offline A/B tests of the whole search stack (rewrite → retrieve → relevance → page) with simulated users.

Run, on a finished rewrite run (stages up to `rl`) and a finished relevance run with a `distill` stage:
  python experiments/ab_test.py --config=configs/ab_test.py --workdir=runs/ab_test \
    --rewrite_workdir=runs/rewrite_cpu --relevance_workdir=runs/relevance_cpu

Variants:
  cpu    (default) every test query, 6000 users, 1000 bootstrap replicates; the student scores 20 candidates
         per query (about 6 minutes of a 2-core CPU, most of it MiniLM).
  micro  16 queries, 400 users, 100 replicates (tests, smoke runs).

An arm is a declarative stack (see `search/pipeline.py`, `ArmSpec`): `rewriter` raw | gold | sft | rl (the
rewrite run's policies), `union` of the rewrite's and the raw query's results, `relevance` none | student |
policy, `filter` with `threshold` on P(Irrelevant), `rerank` none | relevance | random, page size `k` and
candidates per query `depth`. Comparisons are "A:B" (control:treatment). Overrides, e.g.
  --config.arms.student_filter.threshold=0.3 --config.comparisons="('control:grpo_union',)"
"""

import dataclasses

import ml_collections

from graphgrpo_jax.search import ab, pipeline, users


def arm(**fields) -> dict:
    """Every field of an arm (so each can be overridden from the command line), validated now."""
    return dataclasses.asdict(pipeline.ArmSpec(**fields))


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    config.split = "test"
    config.max_queries = 0  # 0: every query of the split
    # The distilled student (stage `run_name` of the relevance workdir), exported for serving; its heads are
    # read from that run's report.json (`heads` is the fallback for a run without one).
    config.student = ml_collections.ConfigDict(dict(
        run_name="distill", heads=("y", "ms", "ma"), batch_size=64, platforms=("cpu",)))
    config.rewrite_batch_size = 64  # queries per greedy rewrite batch (padded: one compile)

    depth = 20  # candidates per query the relevance stage sees; the page shows k = 10
    config.arms = ml_collections.ConfigDict(dict(
        control=arm(),
        grpo=arm(rewriter="rl"),
        grpo_union=arm(rewriter="rl", union=True),
        gold=arm(rewriter="gold"),
        student_filter=arm(relevance="student", filter=True, threshold=0.5, depth=depth),
        student_rerank=arm(relevance="student", filter=True, threshold=0.5, rerank="relevance", depth=depth),
        grpo_student=arm(rewriter="rl", relevance="student", filter=True, threshold=0.5, depth=depth),
        random_rerank=arm(rerank="random", depth=depth),
    ))
    # The three comparisons of issue #11: rewriting, the relevance filter, and both together.
    config.comparisons = ("control:grpo", "control:student_filter", "control:grpo_student")

    config.users = users.default_user_config()
    config.sessions = ab.default_sessions_config()
    config.bootstrap = ab.default_bootstrap_config()

    if variant == "micro":
        config.max_queries = 16
        config.sessions.num_users = 400
        config.bootstrap.reps = 100
        config.student.batch_size = 8
        config.rewrite_batch_size = 8
    elif variant != "cpu":
        raise ValueError(f"unknown variant {variant!r} of configs/ab_test.py; choose cpu or micro")
    return config
