r"""The real-ESCI rewrite experiment's table (issue #29): finished runs' `rewrite_eval` reports, with bootstrap 95%
intervals over *queries*, the spread over seeds, and paired differences between arms.

  python experiments/rewrite_esci_results.py \
    --arm="raw query=runs/rw_s0:raw/test" --arm="teacher=runs/rw_s0:teacher/test" \
    --arm="zero-shot=runs/rw_s0:base/test" --arm="multi-task SFT=runs/rw_s0,runs/rw_s1,runs/rw_s2:sft/test" \
    --arm="GRPO=runs/rw_s0,runs/rw_s1,runs/rw_s2:rl/test" --pair="GRPO,multi-task SFT" --pair="multi-task SFT,raw query"

An arm is `NAME=WORKDIR[,WORKDIR...]:REPORT`: the report `REPORT` (e.g. `sft/test`) of each workdir's
`rewrite_eval/metrics.json`, whose `per_query` lists each query's recall@k and NDCG@k. With several workdirs (seeds)
an arm's per-query value is the mean over the seeds that evaluated the query, and the table adds the seeds' own
means (mean ± standard deviation over seeds, ddof 1): the seed spread the issue's bar compares GRPO's gain with.

Bootstrap: queries are drawn with replacement (`numpy.random.default_rng(seed)`), the mean recomputed, and the 2.5 /
97.5 percentiles are the interval. `--pair="A,B"` reports A minus B over the queries both arms evaluated (the
teacher arm covers only the queries with a teacher rewrite), each resample drawing those queries. Prints markdown
tables; `--out` writes everything as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np
from absl import app, flags

METRICS = ("recall", "ndcg")
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    per_query: dict[str, dict[str, float]]  # metric -> query -> value (mean over seeds)
    seed_means: dict[str, list[float]]  # metric -> one mean per workdir (seed)


def read_arm(spec: str) -> Arm:
    """`NAME=WORKDIR[,WORKDIR...]:REPORT` read from each workdir's rewrite_eval/metrics.json."""
    name, sep, rest = spec.partition("=")
    workdirs, sep2, report = rest.rpartition(":")
    if not (sep and sep2 and name and workdirs and report):
        raise ValueError(f"--arm={spec!r}: expected NAME=WORKDIR[,WORKDIR...]:REPORT, e.g. 'SFT=runs/a:sft/test'")
    if "," in name:
        raise ValueError(f"--arm={spec!r}: an arm's name may not hold a comma (--pair=A,B names two arms)")
    values: dict[str, dict[str, list[float]]] = {metric: {} for metric in METRICS}
    seed_means: dict[str, list[float]] = {metric: [] for metric in METRICS}
    for workdir in workdirs.split(","):
        path = pathlib.Path(workdir) / "rewrite_eval" / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"--arm={spec!r}: {path} not found (has the run's rewrite_eval stage finished?)")
        reports = json.loads(path.read_text())
        if report not in reports or "per_query" not in reports[report]:
            raise KeyError(f"--arm={spec!r}: {path} has no per-query report {report!r}; it has {sorted(reports)}")
        per_query = reports[report]["per_query"]
        for metric in METRICS:
            for query, value in zip(per_query["query"], per_query[metric]):
                values[metric].setdefault(query, []).append(value)
            seed_means[metric].append(float(np.mean(per_query[metric])))
    return Arm(name, {metric: {q: float(np.mean(v)) for q, v in by_query.items()} for metric, by_query in
                      values.items()}, seed_means)


def interval(values: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` over queries and its bootstrap interval."""
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[draws].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def summarise(arms: Sequence[Arm], pairs: Sequence[tuple[str, str]], resamples: int, seed: int) -> dict:
    by_name = {arm.name: arm for arm in arms}
    out: dict = {"arms": {}, "pairs": {}}
    for arm in arms:
        rng = np.random.default_rng(seed)
        out["arms"][arm.name] = {"queries": len(arm.per_query["recall"]), **{
            metric: dict(zip(("mean", "low", "high"), interval(np.array(list(arm.per_query[metric].values())),
                                                               resamples, rng)),
                         seeds=arm.seed_means[metric],
                         seed_std=float(np.std(arm.seed_means[metric], ddof=1)) if len(arm.seed_means[metric]) > 1
                         else None)
            for metric in METRICS}}
    for first, second in pairs:
        if first not in by_name or second not in by_name:
            raise KeyError(f"--pair={first},{second}: arms are {sorted(by_name)}")
        a, b = by_name[first], by_name[second]
        common = sorted(set(a.per_query["recall"]) & set(b.per_query["recall"]))
        if not common:
            raise ValueError(f"--pair={first},{second}: the two arms share no query")
        rng = np.random.default_rng(seed)
        out["pairs"][f"{first} - {second}"] = {"queries": len(common), **{
            metric: dict(zip(("mean", "low", "high"), interval(
                np.array([a.per_query[metric][q] - b.per_query[metric][q] for q in common]), resamples, rng)))
            for metric in METRICS}}
    return out


def markdown(summary: dict) -> str:
    def cell(stats: dict) -> str:
        text = f"{stats['mean']:.3f} [{stats['low']:.3f}, {stats['high']:.3f}]"
        if stats.get("seed_std") is not None:
            text += f" (seeds {np.mean(stats['seeds']):.3f} ± {stats['seed_std']:.3f}, n={len(stats['seeds'])})"
        return text

    lines = ["| arm | queries | recall@10 | NDCG@10 |", "|---|---|---|---|"]
    lines += [f"| {name} | {arm['queries']} | {cell(arm['recall'])} | {cell(arm['ndcg'])} |"
              for name, arm in summary["arms"].items()]
    if summary["pairs"]:
        lines += ["", "| paired difference | queries | recall@10 | NDCG@10 |", "|---|---|---|---|"]
        lines += [f"| {name} | {pair['queries']} | {cell(pair['recall'])} | {cell(pair['ndcg'])} |"
                  for name, pair in summary["pairs"].items()]
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a script, so that importing this module (tests) defines no global flag."""
    flags.DEFINE_multi_string("arm", [], "NAME=WORKDIR[,WORKDIR...]:REPORT")
    flags.DEFINE_multi_string("pair", [], "A,B: the paired difference A - B")
    flags.DEFINE_integer("resamples", 2000, "bootstrap resamples")
    flags.DEFINE_integer("seed", 0, "bootstrap seed")
    flags.DEFINE_string("out", "", "write the summary as JSON here")


def main(argv: Sequence[str]) -> None:
    del argv
    arms = [read_arm(spec) for spec in FLAGS.arm]
    pairs = [tuple(pair.split(",", 1)) for pair in FLAGS.pair]
    summary = summarise(arms, pairs, FLAGS.resamples, FLAGS.seed)
    print(markdown(summary))
    if FLAGS.out:
        pathlib.Path(FLAGS.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)
