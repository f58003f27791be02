r"""The real-ESCI relevance experiment's table (issue #27): finished runs' eval reports, with bootstrap 95% intervals
over *queries*, beside the majority class, and paired differences between arms.

  python experiments/esci_results.py \
    --arm="zero-shot=runs/zs:base/test" --arm="CoT SFT=runs/cot:sft/test" --arm="Graph-GRPO=runs/cot:rl/test" \
    --pair="Graph-GRPO,CoT SFT" --pair="CoT SFT,majority class" --resamples=2000 --seed=0 --out=results.json

An arm is `NAME=WORKDIR:POLICY/SPLIT`: the report `POLICY/SPLIT` of `<WORKDIR>/eval/metrics.json`, whose
`predictions` (a label index per row, -1 for a format failure) and `example_ids` are matched, by example id, to
the run's own examples (`tasks.relevance.examples_of(<WORKDIR>/config.json, SPLIT)`) for their query ids and gold
labels. "majority class" always answers the most frequent label of the first arm's train split (ties: the
earlier label of `cot.LABELS`, as `eval/student.majority_report`) on the first arm's rows.

Metrics (every one recomputed from a confusion matrix, `eval/classification.confusion_matrix`): 4-class accuracy;
micro-F1; macro-F1 over the 4 classes (a class with no gold rows adds F1 0, as scikit-learn's
`f1_score(labels=all four, average="macro")`; `classification_report` averages only the classes present, which agrees
whenever all four are, but would make a resample that misses a rare class jump); per-class F1 (undefined, NaN, for a
class with no gold rows: its interval is over the resamples that hold it); the binarised F1s Exact-vs-rest and
E+S-vs-C+I (positive = Exact, or Exact or Substitute; a format failure is a predicted negative); the format-failure
rate. A failure is a false negative for its gold class and a false positive for none.

Bootstrap: the query ids of a row set are drawn with replacement (`numpy.random.default_rng(seed)`), every row of
a drawn query comes along, every metric is recomputed, and the 2.5 / 97.5 percentiles are the 95% interval.
Arms evaluated on the same rows (same example ids, query ids and gold labels) share the same resamples, so
`--pair="A,B"` reports A minus B per resample, point estimate and interval; arms on different rows cannot
be paired. Prints markdown tables; `--out` writes everything as JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import app, flags

from graphgrpo_jax import artifacts
from graphgrpo_jax.data import cot
from graphgrpo_jax.eval import classification
from graphgrpo_jax.tasks import relevance

LABELS = cot.LABELS
MAJORITY = "majority class"
CONFIDENCE = 0.95
BINARY = {"exact_vs_rest": ("Exact",), "es_vs_ci": ("Exact", "Substitute")}  # name -> positive labels
METRICS = ("accuracy", "micro_f1", "macro_f1", *(f"f1/{label}" for label in LABELS),
           *(f"f1/{name}" for name in BINARY), "format_failure_rate")
MAIN_COLUMNS = {"accuracy": "accuracy", "micro_f1": "micro-F1", "macro_f1": "macro-F1",
                "f1/Irrelevant": "Irrelevant F1", "f1/exact_vs_rest": "F1 Exact vs rest",
                "f1/es_vs_ci": "F1 E+S vs C+I", "format_failure_rate": "format failures"}
CLASS_COLUMNS = {f"f1/{label}": f"{label} F1" for label in LABELS}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (the metric is undefined on those rows)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def metrics_of(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of confusion matrices [..., C, C + 1] (rows gold, last column format failures, as
    `classification.confusion_matrix` counts them; leading axes are resamples), each an array [...]."""
    m = np.asarray(matrix, np.float64)
    num_classes = m.shape[-2]
    n = m.sum((-2, -1))
    cells = m[..., :num_classes]  # rows with a predicted label
    tp = np.diagonal(cells, axis1=-2, axis2=-1)
    predicted, support = cells.sum(-2), m.sum(-1)
    failures = m[..., num_classes].sum(-1)
    # Per class, as classification_report: precision 0 for a class never predicted, F1 0 where precision and
    # recall are both 0; but F1 is NaN (undefined) for a class with no gold rows. Macro-F1 is the mean over all
    # the classes, such a class counting 0: on the real test split Complement has one row, so a resample misses
    # it about a third of the time, and a mean over the classes present would jump by a class each time.
    precision = np.nan_to_num(_divide(tp, predicted))
    recall = _divide(tp, support)
    f1 = np.where(support > 0, np.nan_to_num(_divide(2 * precision * recall, precision + recall)), np.nan)
    macro = np.where(n > 0, np.nan_to_num(f1).mean(-1), np.nan)
    # Micro-F1: micro precision counts only the rows with a prediction (TP / (N - failures)), micro recall
    # all rows (TP / N), so micro-F1 = 2 TP / (2N - failures). It equals accuracy when every row has a
    # prediction (one gold label and one predicted label a row: every wrong row is one FP and one FN), and
    # exceeds it when there are format failures (a failure is an FN with no FP).
    correct = tp.sum(-1)
    micro_precision, micro_recall = _divide(correct, n - failures), _divide(correct, n)
    micro_f1 = np.where(correct > 0, _divide(2 * micro_precision * micro_recall, micro_precision + micro_recall),
                        np.where(n > 0, 0.0, np.nan))
    out = {"accuracy": _divide(correct, n), "micro_f1": micro_f1, "macro_f1": macro}
    out.update({f"f1/{label}": f1[..., c] for c, label in enumerate(LABELS[:num_classes])})
    for name, positive in BINARY.items():
        pos = np.asarray([LABELS.index(label) for label in positive])
        true_pos = m[..., pos, :][..., pos].sum((-2, -1))
        predicted_pos, gold_pos = m[..., :, pos].sum((-2, -1)), m[..., pos, :].sum((-2, -1))
        out[f"f1/{name}"] = _divide(2 * true_pos, predicted_pos + gold_pos)  # 2TP / (2TP + FP + FN)
    out["format_failure_rate"] = _divide(failures, n)
    return out


# --------------------------------------------------------------------------------------------------
# Arms: one run's predictions on its rows
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arm:
    """One row of the table: predictions on rows sorted by example id."""
    name: str
    source: str  # "WORKDIR:POLICY/SPLIT", or what the majority class was taken from
    example_ids: tuple[str, ...]
    query_ids: tuple[str, ...]
    gold: np.ndarray  # [N] label index
    pred: np.ndarray  # [N] label index, -1 = format failure

    @property
    def rows(self) -> tuple:
        """What two arms must share to be paired."""
        return self.example_ids, self.query_ids, tuple(self.gold.tolist())


def parse_arm(spec: str) -> tuple[str, str, str]:
    """"NAME=WORKDIR:POLICY/SPLIT" -> (name, workdir, "POLICY/SPLIT")."""
    name, sep, rest = spec.partition("=")
    workdir, colon, key = rest.rpartition(":")
    name = name.strip()
    if not sep or not colon or not name or not workdir or "/" not in key or key.startswith("/") or key.endswith("/"):
        raise app.UsageError(f"--arm={spec!r}: expected NAME=WORKDIR:POLICY/SPLIT, e.g. 'CoT SFT=runs/cot:sft/test'")
    if "," in name or name == MAJORITY:
        raise app.UsageError(f"--arm={spec!r}: an arm's name may not contain ',' nor be {MAJORITY!r}")
    return name, workdir, key


def run_config(workdir: str) -> ml_collections.ConfigDict:
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a finished run's workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_arm(name: str, workdir: str, key: str) -> Arm:
    """The report `key` of `workdir`'s eval, matched by example id to the run's examples of its split."""
    source = f"{workdir}:{key}"
    config = run_config(workdir)
    path = pathlib.Path(artifacts.eval_dir(workdir)) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"arm {name!r}: {path} not found (run the eval stage)")
    reports = json.loads(path.read_text())
    if key not in reports:
        raise KeyError(f"arm {name!r}: no report {key!r} in {path}; it has {sorted(reports)}")
    report = reports[key]
    if "predictions" not in report or "example_ids" not in report:
        raise ValueError(f"arm {name!r}: {path}[{key!r}] has no per-row predictions / example_ids (an eval from "
                         "before they were written: rerun the eval stage)")
    preds, ids = list(report["predictions"]), [str(i) for i in report["example_ids"]]
    if len(preds) != len(ids) or not ids:
        raise ValueError(f"arm {name!r}: {path}[{key!r}] has {len(preds)} predictions for {len(ids)} example ids")
    repeated = [i for i, count in collections.Counter(ids).items() if count > 1]
    if repeated:
        raise ValueError(f"arm {name!r}: {path}[{key!r}] repeats example ids {repeated[:5]}")
    bad = [p for p in preds if isinstance(p, bool) or not isinstance(p, int) or not -1 <= p < len(LABELS)]
    if bad:
        raise ValueError(f"arm {name!r}: {path}[{key!r}] has predictions {bad[:5]} outside -1..{len(LABELS) - 1}")
    split = key.split("/", 1)[1]
    examples = {e.example_id: e for e in relevance.examples_of(config, split)}
    missing = [i for i in ids if i not in examples]
    if missing:
        raise KeyError(f"run {workdir}: example id {missing[0]!r} of report {key!r} is not among the run's "
                       f"{len(examples)} {split!r} examples ({len(missing)} missing; config.data.source = "
                       f"{config.data.get('source', 'world')!r})")
    order = np.argsort(ids, kind="stable")
    rows = [examples[ids[i]] for i in order]
    arm = Arm(name, source, tuple(e.example_id for e in rows), tuple(e.query_id for e in rows),
              np.asarray([LABELS.index(e.label) for e in rows], np.int64), np.asarray(preds, np.int64)[order])
    if "accuracy" in report:  # the run's examples must give back the run's own score
        accuracy = float(metrics_of(classification.confusion_matrix(arm.gold, arm.pred, len(LABELS)))["accuracy"])
        if not math.isclose(accuracy, report["accuracy"], abs_tol=1e-9):
            raise ValueError(f"arm {name!r}: the run's {split!r} examples give accuracy {accuracy:.6f}, its report "
                             f"{report['accuracy']:.6f}: the gold labels differ from the eval's (data changed?)")
    return arm


def majority_label(train_labels: Sequence[str]) -> str:
    """The most frequent training label; ties go to the earlier label of cot.LABELS."""
    counts = collections.Counter(train_labels)
    if not counts:
        raise ValueError("the majority-class baseline needs at least one training example")
    return max(LABELS, key=lambda label: counts[label])  # max keeps the first of equal counts


def majority_arm(first: Arm, label: str) -> Arm:
    source = f"always {label}, the most frequent label of {first.source.rsplit(':', 1)[0]}'s train split"
    return dataclasses.replace(first, name=MAJORITY, source=source, pred=np.full_like(first.pred, LABELS.index(label)))


# --------------------------------------------------------------------------------------------------
# The bootstrap over queries
# --------------------------------------------------------------------------------------------------

def query_matrices(arm: Arm, queries: Sequence[str]) -> np.ndarray:
    """[Q, C, C + 1]: the confusion matrix of each query's rows."""
    index = {q: i for i, q in enumerate(queries)}
    of_row = np.asarray([index[q] for q in arm.query_ids])
    return np.stack([classification.confusion_matrix(arm.gold[of_row == i], arm.pred[of_row == i], len(LABELS))
                     for i in range(len(queries))])


def query_counts(num_queries: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, Q]: how often each query is drawn, Q draws with replacement per resample."""
    draws = np.random.default_rng(seed).integers(0, num_queries, size=(resamples, num_queries))
    offsets = np.arange(resamples)[:, None] * num_queries
    return np.bincount((draws + offsets).ravel(), minlength=resamples * num_queries).reshape(resamples, num_queries)


def row_weights(arm: Arm, counts: np.ndarray) -> np.ndarray:
    """[resamples, N]: how often each row is in each resample (its query's count: the rows of a query go together)."""
    queries = sorted(set(arm.query_ids))
    index = {q: i for i, q in enumerate(queries)}
    return counts[:, [index[q] for q in arm.query_ids]]


def _interval(point: float, values: np.ndarray) -> dict:
    defined = np.isfinite(values)
    half = 100 * (1 - CONFIDENCE) / 2
    low, high = (np.percentile(values[defined], [half, 100 - half]) if defined.any() else (np.nan, np.nan))
    out = {"value": float(point), "low": float(low), "high": float(high)}
    if not defined.all():
        out["resamples_defined"] = int(defined.sum())  # resamples where the metric exists (e.g. the class is drawn)
    return out


def bootstrap(arms: Sequence[Arm], pairs: Sequence[tuple[str, str]], resamples: int, seed: int) -> dict:
    """Point estimates, intervals and paired differences (see the module docstring)."""
    if resamples < 1:
        raise app.UsageError(f"--resamples={resamples}: need at least one")
    by_name = {arm.name: arm for arm in arms}
    row_sets: list[tuple] = []
    point, draws, out_arms = {}, {}, {}
    for arm in arms:
        if arm.rows not in row_sets:
            row_sets.append(arm.rows)
        queries = sorted(set(arm.query_ids))
        per_query = query_matrices(arm, queries).reshape(len(queries), -1)
        counts = query_counts(len(queries), resamples, seed)  # the same seed: same rows, same resamples
        shape = (len(LABELS), len(LABELS) + 1)
        point[arm.name] = metrics_of(per_query.sum(0).reshape(shape))
        draws[arm.name] = metrics_of((counts @ per_query).reshape(resamples, *shape))
        out_arms[arm.name] = {"source": arm.source, "row_set": row_sets.index(arm.rows),
                              "num_rows": len(arm.example_ids), "num_queries": len(queries),
                              "metrics": {m: _interval(point[arm.name][m], draws[arm.name][m]) for m in METRICS}}
    out_pairs = []
    for a, b in pairs:
        for name in (a, b):
            if name not in by_name:
                raise app.UsageError(f"--pair={a},{b}: no arm {name!r}; arms are {list(by_name)}")
        if by_name[a].rows != by_name[b].rows:
            shared = len(set(by_name[a].example_ids) & set(by_name[b].example_ids))
            raise ValueError(f"--pair={a},{b}: the arms were evaluated on different rows ({len(by_name[a].example_ids)}"
                             f" and {len(by_name[b].example_ids)} rows, {shared} example ids in common, or other "
                             "query ids / gold labels): they cannot be paired")
        out_pairs.append({"a": a, "b": b, "metrics": {
            m: _interval(point[a][m] - point[b][m], draws[a][m] - draws[b][m]) for m in METRICS}})
    return {"arms": out_arms, "pairs": out_pairs}


# --------------------------------------------------------------------------------------------------
# Tables and the command line
# --------------------------------------------------------------------------------------------------

def _cell(stat: dict, signed: bool = False) -> str:
    if not math.isfinite(stat["value"]):
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    bounds = ", ".join("n/a" if not math.isfinite(stat[k]) else fmt.format(stat[k]) for k in ("low", "high"))
    return f"{fmt.format(stat['value'])} [{bounds}]"


def table(results: dict) -> str:
    """Markdown: the headline metrics, per-class F1, and the paired differences, each with its 95% interval."""
    n = results["resamples"]
    lines = [f"Point estimate [95% bootstrap interval over queries, {n} resamples, seed {results['seed']}]", "",
             "| arm | rows / queries | " + " | ".join(MAIN_COLUMNS.values()) + " |",
             "|---|---|" + "---|" * len(MAIN_COLUMNS)]
    for name, arm in results["arms"].items():
        lines.append(f"| {name} | {arm['num_rows']} / {arm['num_queries']} | "
                     + " | ".join(_cell(arm["metrics"][m]) for m in MAIN_COLUMNS) + " |")
    lines += ["", "Per-class F1 (n/a: the class has no gold rows)", "",
              "| arm | " + " | ".join(CLASS_COLUMNS.values()) + " |", "|---|" + "---|" * len(CLASS_COLUMNS)]
    for name, arm in results["arms"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(arm["metrics"][m]) for m in CLASS_COLUMNS) + " |")
    if results["pairs"]:
        columns = {**MAIN_COLUMNS, **CLASS_COLUMNS}
        lines += ["", "Paired differences, A − B on the same resamples", "",
                  "| A − B | " + " | ".join(columns.values()) + " |", "|---|" + "---|" * len(columns)]
        for pair in results["pairs"]:
            lines.append(f"| {pair['a']} − {pair['b']} | "
                         + " | ".join(_cell(pair["metrics"][m], signed=True) for m in columns) + " |")
    return "\n".join(lines)


def _json_ready(value):
    """NaN (an undefined metric) as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def parse_pair(spec: str) -> tuple[str, str]:
    parts = [part.strip() for part in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise app.UsageError(f"--pair={spec!r}: expected 'ARM A,ARM B' (A minus B)")
    return parts[0], parts[1]


def run(arm_specs: Sequence[str], pair_specs: Sequence[str] = (), resamples: int = 2000, seed: int = 0,
        out: str | None = None) -> dict:
    """Loads the arms, adds the majority class, bootstraps, prints the tables, writes `out`; returns the results."""
    if not arm_specs:
        raise app.UsageError("give at least one --arm=NAME=WORKDIR:POLICY/SPLIT")
    parsed = [parse_arm(spec) for spec in arm_specs]
    pairs = [parse_pair(spec) for spec in pair_specs]
    names = [name for name, _, _ in parsed]
    if len(set(names)) != len(names):
        raise app.UsageError(f"arm names repeat: {names}")
    unknown = sorted({name for pair in pairs for name in pair} - {*names, MAJORITY})
    if unknown:
        raise app.UsageError(f"--pair names unknown arms {unknown}; arms are {[*names, MAJORITY]}")
    arms = [load_arm(*spec) for spec in parsed]
    train = relevance.examples_of(run_config(parsed[0][1]), "train")
    label = majority_label([e.label for e in train])
    arms.append(majority_arm(arms[0], label))
    results = {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE, "labels": list(LABELS),
               "metrics": list(METRICS), "majority_label": label, "majority_train_rows": len(train),
               **bootstrap(arms, pairs, resamples, seed)}
    print(table(results))
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_ready(results), indent=2) + "\n")
        print(f"\nWrote {path}")
    return results


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; defined only when run as a script (or by a test on its own FlagValues)."""
    flags.DEFINE_multi_string("arm", [], "NAME=WORKDIR:POLICY/SPLIT, e.g. 'CoT SFT=runs/cot:sft/test' "
                              "(repeat; the first arm's rows and train split give the majority class).",
                              flag_values=flag_values)
    flags.DEFINE_multi_string("pair", [], "'A,B': report arm A minus arm B (repeat; 'majority class' is an arm).",
                              flag_values=flag_values)
    flags.DEFINE_integer("resamples", 2000, "Bootstrap resamples of the queries.", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of the bootstrap (numpy default_rng).", flag_values=flag_values)
    flags.DEFINE_string("out", None, "JSON file for every number (optional).", flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flag_values
    run(f.arm, f.pair, f.resamples, f.seed, f.out)  # nothing returned: app.run exits with main's return value


if __name__ == "__main__":
    define_flags()
    app.run(main)
