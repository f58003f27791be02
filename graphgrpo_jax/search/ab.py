"""Offline A/B tests of whole search stacks on the synthetic world, with simulated users.

Both papers end with an online A/B test (bad-case rate for relevance, purchases per user for rewriting).
The synthetic world knows every query's intent and every product's true label, so the same experiment
runs offline: pages come from real stacks (`search/pipeline.py`), behaviour from `search/users.py`.

* Pages: each arm's pipeline runs once over the split's queries (a deterministic stack gives a query the
  same page every time); every page is judged against the truth: label ids per slot, NDCG@k with linear
  gains Exact 3 / Substitute 2 / Complement 1 / Irrelevant 0 against the best k products of the whole
  catalogue, and recall@k of the query's logged purchases.
* Traffic: `num_users` users, each issuing 1 + Poisson(sessions_per_user − 1) sessions, each session a
  query drawn uniformly from the split (the world's query distribution); users, not sessions, are
  randomised to arm B with probability `share_b`, as live tests do, so one user never sees both arms.
* Metrics per arm, each a ratio of sums over users (`METRICS`): bad-case rate (Irrelevant share of the
  products shown), NDCG@k, recall@k, CTR (share of sessions with a click), UCVR (share of users who
  bought), purchases per user, results per page; and the latency of each stage on this machine.
* Inference: a Poisson bootstrap over users (every user gets a Poisson(1) weight per replicate;
  Chamandy et al., 2012): vectorised, and it resamples users, the unit of randomisation, so sessions of
  one user stay together. The arms are resampled independently; the difference B − A is significant
  when its percentile interval at `confidence` excludes 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from graphgrpo_jax.data import world as world_lib  # noqa: E402
from graphgrpo_jax.data.cot import LABELS  # noqa: E402
from graphgrpo_jax.search import pipeline, users  # noqa: E402
from graphgrpo_jax.search.engine import Retriever, ndcg_at_k, recall_at_k  # noqa: E402

GAINS = {"Exact": 3.0, "Substitute": 2.0, "Complement": 1.0, "Irrelevant": 0.0}
# Per-user sums the metrics are built from; "users" is 1 for every user.
FIELDS = ("users", "sessions", "shown", "irrelevant_shown", "ndcg", "recall", "sessions_with_log",
          "sessions_clicked", "clicks", "purchases", "converted")
# Metric -> (numerator, denominator) among FIELDS.
METRICS: dict[str, tuple[str, str]] = {
    "bad_case_rate": ("irrelevant_shown", "shown"),
    "ndcg": ("ndcg", "sessions"),
    "recall": ("recall", "sessions_with_log"),
    "ctr": ("sessions_clicked", "sessions"),
    "ucvr": ("converted", "users"),
    "purchases_per_user": ("purchases", "users"),
    "results_per_page": ("shown", "sessions"),
}


def default_sessions_config() -> ml_collections.ConfigDict:
    """The `config.sessions` section."""
    return ml_collections.ConfigDict(dict(num_users=6000, sessions_per_user=2.0, share_b=0.5))


def default_bootstrap_config() -> ml_collections.ConfigDict:
    """The `config.bootstrap` section."""
    return ml_collections.ConfigDict(dict(reps=1000, confidence=0.95))


# ---------------------------------------------------------------------------------------------------------
# Judging pages against the truth


@dataclasses.dataclass(frozen=True)
class JudgedPages:
    """One arm's page for every query of the split, judged against the world's truth."""

    labels: np.ndarray  # [Q, K] label ids (users.EMPTY past the page's end)
    ndcg: np.ndarray  # [Q] NDCG@k
    recall: np.ndarray  # [Q] recall@k of the logged purchases; NaN for a query with none


def true_label(world: world_lib.World, query: world_lib.Query, product: world_lib.Product) -> str:
    """The ESCI label of `product` for the query's intent, by the world's label rule."""
    ms = world_lib.subject_match(world.types, query.subject, product.product_type)
    ma = world_lib.attribute_match(query.attributes, product.attributes)
    return world_lib.apply_label_rule(world_lib.DEFAULT_LABEL_RULE, ms, ma)


def judge_pages(world: world_lib.World, queries: Sequence[world_lib.Query], pages: Sequence[Sequence[str]],
                k: int) -> JudgedPages:
    """Label ids, NDCG@k (ideal: the k best products of the catalogue) and recall@k of each query's page."""
    if len(queries) != len(pages):
        raise ValueError(f"{len(queries)} queries but {len(pages)} pages")
    labels = np.full((len(queries), k), users.EMPTY, np.int64)
    ndcg, recall = np.zeros(len(queries)), np.full(len(queries), np.nan)
    for row, (query, page) in enumerate(zip(queries, pages)):
        if len(page) > k:
            raise ValueError(f"page of query {query.query_id} holds {len(page)} products, more than k={k}")
        gains = {product.product_id: GAINS[true_label(world, query, product)] for product in world.products}
        labels[row, :len(page)] = [LABELS.index(true_label(world, query, world.product_by_id[p])) for p in page]
        ndcg[row] = ndcg_at_k(list(page), gains, k) or 0.0  # None: nothing relevant exists, nothing to rank
        query_recall = recall_at_k(list(page), query.purchased_product_ids, k)
        recall[row] = np.nan if query_recall is None else query_recall
    return JudgedPages(labels=labels, ndcg=ndcg, recall=recall)


def offline_metrics(judged: JudgedPages) -> dict[str, float]:
    """Query-averaged page quality, before any user: what an offline evaluation of the arm reports."""
    shown = judged.labels != users.EMPTY
    return {"bad_case_rate": float((judged.labels == LABELS.index("Irrelevant")).sum() / max(shown.sum(), 1)),
            "ndcg": float(judged.ndcg.mean()), "recall": float(np.nanmean(judged.recall)),
            "results_per_page": float(shown.sum(axis=1).mean())}


# ---------------------------------------------------------------------------------------------------------
# Traffic and users


@dataclasses.dataclass(frozen=True)
class Traffic:
    """A session stream: who searched what, and which arm each user is in."""

    user: np.ndarray  # [S] user of each session
    query: np.ndarray  # [S] query row of each session
    arm: np.ndarray  # [U] 0 (A) or 1 (B)


def validate_sessions_config(cfg: ml_collections.ConfigDict) -> None:
    if not isinstance(cfg.num_users, int) or cfg.num_users < 2:
        raise ValueError(f"config.sessions.num_users = {cfg.num_users!r}: must be an int >= 2")
    if not cfg.sessions_per_user >= 1.0:
        raise ValueError(f"config.sessions.sessions_per_user = {cfg.sessions_per_user!r}: must be >= 1")
    if not 0.0 < cfg.share_b < 1.0:
        raise ValueError(f"config.sessions.share_b = {cfg.share_b!r}: must be in (0, 1)")


def draw_traffic(cfg: ml_collections.ConfigDict, num_queries: int, rng: np.random.Generator) -> Traffic:
    """Users, their sessions' queries (uniform over the split) and their arms (B with `share_b`)."""
    validate_sessions_config(cfg)
    sessions_per_user = 1 + rng.poisson(cfg.sessions_per_user - 1.0, cfg.num_users)
    user = np.repeat(np.arange(cfg.num_users), sessions_per_user)
    query = rng.integers(0, num_queries, len(user))
    arm = (rng.random(cfg.num_users) < cfg.share_b).astype(np.int64)
    return Traffic(user=user, query=query, arm=arm)


def user_table(traffic: Traffic, pages: Sequence[JudgedPages], user_cfg: ml_collections.ConfigDict,
               rng: np.random.Generator) -> np.ndarray:
    """[U, len(FIELDS)] per-user sums after every session saw its user's arm's page (`pages[arm]`)."""
    users.validate_user_config(user_cfg)
    k = max(p.labels.shape[1] for p in pages)
    padded = [np.pad(p.labels, ((0, 0), (0, k - p.labels.shape[1])), constant_values=users.EMPTY) for p in pages]
    session_arm = traffic.arm[traffic.user]
    labels = np.choose(session_arm[:, None], [p[traffic.query] for p in padded])
    ndcg = np.choose(session_arm, [p.ndcg[traffic.query] for p in pages])
    recall = np.choose(session_arm, [p.recall[traffic.query] for p in pages])
    behaviour = users.simulate(user_cfg, labels, rng)
    purchases = behaviour.purchased.sum(axis=1)
    per_session = {
        "sessions": np.ones(len(traffic.user)),
        "shown": (labels != users.EMPTY).sum(axis=1),
        "irrelevant_shown": (labels == LABELS.index("Irrelevant")).sum(axis=1),
        "ndcg": ndcg,
        "recall": np.nan_to_num(recall, nan=0.0),
        "sessions_with_log": ~np.isnan(recall),
        "sessions_clicked": behaviour.clicked.any(axis=1),
        "clicks": behaviour.clicked.sum(axis=1),
        "purchases": purchases,
    }
    num_users = len(traffic.arm)
    table = {name: np.bincount(traffic.user, weights=values.astype(np.float64), minlength=num_users)
             for name, values in per_session.items()}
    table["users"] = np.ones(num_users)
    table["converted"] = (table["purchases"] > 0).astype(np.float64)
    return np.stack([table[name] for name in FIELDS], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Metrics and inference


def metric_values(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric from field sums `[..., len(FIELDS)]`; NaN where its denominator is 0."""
    values = {}
    for name, (numerator, denominator) in METRICS.items():
        top, bottom = sums[..., FIELDS.index(numerator)], sums[..., FIELDS.index(denominator)]
        values[name] = np.divide(top, bottom, out=np.full(np.shape(top), np.nan), where=bottom > 0)
    return values


def poisson_bootstrap(table: np.ndarray, reps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """[reps] bootstrap replicates of each metric: every user weighted by a Poisson(1) draw per replicate."""
    weights = rng.poisson(1.0, (reps, len(table))).astype(np.float64)
    return metric_values(weights @ table)


def compare(table_a: np.ndarray, table_b: np.ndarray, reps: int, confidence: float,
            rng: np.random.Generator) -> dict[str, dict[str, float | bool]]:
    """Per metric: both arms' values, B − A, its bootstrap percentile interval and the decision."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"config.bootstrap.confidence = {confidence!r}: must be in (0, 1)")
    if reps < 2:
        raise ValueError(f"config.bootstrap.reps = {reps!r}: must be >= 2")
    point_a, point_b = metric_values(table_a.sum(axis=0)), metric_values(table_b.sum(axis=0))
    boot_a, boot_b = poisson_bootstrap(table_a, reps, rng), poisson_bootstrap(table_b, reps, rng)
    tail = 100.0 * (1.0 - confidence) / 2.0
    results = {}
    for name in METRICS:
        a, b = float(point_a[name]), float(point_b[name])
        differences = boot_b[name] - boot_a[name]
        differences = differences[np.isfinite(differences)]
        low, high = (np.percentile(differences, [tail, 100.0 - tail]) if len(differences)
                     else (np.nan, np.nan))
        results[name] = {"a": a, "b": b, "difference": b - a,
                         "relative": (b - a) / a if a else float("nan"),
                         "ci_low": float(low), "ci_high": float(high),
                         "significant": bool(low > 0 or high < 0)}
    return results


def ab_test(pages_a: JudgedPages, pages_b: JudgedPages, config: ml_collections.ConfigDict,
            seed: int) -> dict[str, Any]:
    """One simulated experiment of B against A: traffic, users, per-arm sums and the comparison."""
    rng = np.random.default_rng(seed)
    if len(pages_a.labels) != len(pages_b.labels):
        raise ValueError(f"arms judged {len(pages_a.labels)} and {len(pages_b.labels)} queries; need the same")
    traffic = draw_traffic(config.sessions, len(pages_a.labels), rng)
    table = user_table(traffic, (pages_a, pages_b), config.users, rng)
    in_b = traffic.arm == 1
    comparison = compare(table[~in_b], table[in_b], config.bootstrap.reps, config.bootstrap.confidence, rng)
    return {"users": {"a": int((~in_b).sum()), "b": int(in_b.sum())},
            "sessions": {"a": int(table[~in_b, FIELDS.index("sessions")].sum()),
                         "b": int(table[in_b, FIELDS.index("sessions")].sum())},
            "metrics": comparison}


# ---------------------------------------------------------------------------------------------------------
# The experiment


def parse_comparison(text: str, arms: Mapping[str, Any]) -> tuple[str, str]:
    """"control:treatment" -> (A, B), both named in `config.arms`."""
    a, sep, b = text.partition(":")
    if not sep or not a or not b:
        raise ValueError(f"config.comparisons entry {text!r}: write it as 'arm_a:arm_b'")
    for name in (a, b):
        if name not in arms:
            raise ValueError(f"config.comparisons entry {text!r}: arm {name!r} is not in config.arms {sorted(arms)}")
    return a, b


def run_ab(config: ml_collections.ConfigDict, *, world: world_lib.World, engine: Retriever,
           rewriters: Mapping[str, pipeline.Rewriter], scorers: Mapping[str, pipeline.RelevanceScorer],
           workdir: str) -> dict[str, Any]:
    """Runs every arm of `config.comparisons` over the split, simulates each comparison, and writes
    `results.json`, `report.md` and `plots/` into `workdir`."""
    arms = {name: pipeline.ArmSpec.from_mapping(name, values) for name, values in config.arms.items()}
    comparisons = [parse_comparison(text, arms) for text in config.comparisons]
    queries = world.split_queries(config.split)[:config.max_queries or None]
    if not queries:
        raise ValueError(f"config.split = {config.split!r} has no queries")
    texts = [query.text for query in queries]
    titles = {product.product_id: product.title for product in world.products}
    needed = sorted({name for pair in comparisons for name in pair})
    # Compile outside the timed stages: every rewriter and scorer pads its batches to one shape.
    for name in {arms[arm].rewriter for arm in needed}:
        rewriters[name](texts[:1])
    for name in {arms[arm].relevance for arm in needed} - {"none"}:
        scorers[name](texts[:1], [world.products[0].title])

    results: dict[str, Any] = {"split": config.split, "num_queries": len(queries), "arms": {}, "comparisons": {}}
    judged = {}
    for name in needed:
        spec = arms[name]
        out = pipeline.run_pipeline(spec, texts, engine=engine, rewriters=rewriters, scorers=scorers,
                                    titles=titles, seed=config.seed)
        judged[name] = judge_pages(world, queries, out.pages, spec.k)
        results["arms"][name] = {
            "spec": dataclasses.asdict(spec), "offline": offline_metrics(judged[name]),
            "milliseconds_per_query": out.milliseconds_per_query,
            "examples": [{"query": q, "rewrite": r} for q, r in zip(texts[:5], out.rewrites[:5])]}
    for a, b in comparisons:
        results["comparisons"][f"{a}:{b}"] = ab_test(judged[a], judged[b], config, config.seed)
    write_report(results, config, workdir)
    return results


# ---------------------------------------------------------------------------------------------------------
# Report


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_report(results: Mapping[str, Any], config: ml_collections.ConfigDict) -> str:
    sessions, user_cfg = config.sessions, config.users
    lines = [
        "# Offline A/B test", "",
        f"{results['num_queries']} queries of the `{results['split']}` split; {sessions.num_users} users, "
        f"{sessions.sessions_per_user} sessions per user on average, share in B {sessions.share_b}; "
        f"examination r^-{user_cfg.examination_decay}, P(click | examined) "
        + ", ".join(f"{label} {user_cfg.click[label]}" for label in LABELS)
        + f", P(buy | clicked Exact) {user_cfg.purchase_given_click}; Poisson bootstrap over users, "
          f"{config.bootstrap.reps} replicates, {config.bootstrap.confidence:.0%} intervals.", "",
        "## Arms (offline page quality, latency in ms per query on this machine)", "",
    ]
    header = ["arm", "rewriter", "union", "relevance", "filter", "rerank", "k", "depth", "bad-case rate", "NDCG",
              "recall", "results/page", *[f"{stage} ms" for stage in pipeline.STAGES], "total ms"]
    lines += [_row(header), _row(["---"] * len(header))]
    for name, arm in results["arms"].items():
        spec, offline, ms = arm["spec"], arm["offline"], arm["milliseconds_per_query"]
        lines.append(_row([
            name, spec["rewriter"], spec["union"], spec["relevance"],
            f"P(Irr) < {spec['threshold']}" if spec["filter"] else "-", spec["rerank"], spec["k"], spec["depth"],
            f"{offline['bad_case_rate']:.3f}", f"{offline['ndcg']:.3f}", f"{offline['recall']:.3f}",
            f"{offline['results_per_page']:.2f}", *[f"{ms[stage]:.2f}" for stage in pipeline.STAGES],
            f"{ms['total']:.2f}"]))
    for key, comparison in results["comparisons"].items():
        a, b = key.split(":")
        lines += ["", f"## {b} (B) vs {a} (A)", "",
                  f"users A/B: {comparison['users']['a']}/{comparison['users']['b']}, sessions "
                  f"{comparison['sessions']['a']}/{comparison['sessions']['b']}", "",
                  _row(["metric", "A", "B", "B − A", f"{config.bootstrap.confidence:.0%} CI", "relative",
                        "significant"]),
                  _row(["---"] * 7)]
        for metric, m in comparison["metrics"].items():
            lines.append(_row([metric, f"{m['a']:.4f}", f"{m['b']:.4f}", f"{m['difference']:+.4f}",
                               f"[{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]", f"{m['relative']:+.1%}",
                               "yes" if m["significant"] else "no"]))
    return "\n".join(lines) + "\n"


def comparison_plot(comparison: Mapping[str, Any], title: str, path: str) -> str:
    """Relative difference (B − A) / A of each metric with its interval, significant ones filled."""
    names = list(comparison["metrics"])
    metrics = [comparison["metrics"][name] for name in names]
    scale = [abs(m["a"]) if m["a"] else np.nan for m in metrics]
    centre = np.array([m["difference"] for m in metrics]) / scale
    low = centre - np.array([m["ci_low"] for m in metrics]) / scale
    high = np.array([m["ci_high"] for m in metrics]) / scale - centre
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ys = np.arange(len(names))
    colors = ["tab:blue" if m["significant"] else "lightgray" for m in metrics]
    ax.barh(ys, centre, xerr=[low, high], color=colors, capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlabel("(B − A) / A")
    ax.set_title(title)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Mapping[str, Any], config: ml_collections.ConfigDict, workdir: str) -> None:
    """`results.json`, `report.md` and one plot per comparison, each written then renamed into place."""
    os.makedirs(workdir, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=2)),
                       ("report.md", markdown_report(results, config))):
        path = os.path.join(workdir, name)
        with open(f"{path}.tmp", "w") as f:
            f.write(text)
        os.replace(f"{path}.tmp", path)
    for key, comparison in results["comparisons"].items():
        a, b = key.split(":")
        comparison_plot(comparison, f"{b} vs {a}", os.path.join(workdir, "plots", f"{b}_vs_{a}.png"))
