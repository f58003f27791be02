"""The real-ESCI results script (experiments/esci_results.py): metrics against hand-computed values, the bootstrap
over queries, paired differences, and the whole script on fake run folders over the graded ESCI subset."""

import json
import math

import numpy as np
import pytest
from absl import flags

from configs import smollm2_esci
from experiments import esci_results
from graphgrpo_jax.data import cot
from graphgrpo_jax.eval import classification
from graphgrpo_jax.tasks import relevance

E, S, C, I = range(4)  # cot.LABELS order
FAIL = -1


def _arm(name, query_ids, gold, pred):
    ids = tuple(f"r{i:03d}" for i in range(len(gold)))
    return esci_results.Arm(name, "test", ids, tuple(query_ids), np.asarray(gold, np.int64),
                            np.asarray(pred, np.int64))


# 6 rows of 3 queries, one format failure.
TINY = dict(query_ids=["q1", "q1", "q2", "q2", "q3", "q3"],
            gold=[E, S, I, E, C, I],
            pred=[E, E, I, FAIL, I, S])


def _metrics(gold, pred):
    return {k: float(v) for k, v in esci_results.metrics_of(
        classification.confusion_matrix(gold, pred, len(cot.LABELS))).items()}


def test_metrics_match_hand_computed_values():
    m = _metrics(TINY["gold"], TINY["pred"])
    assert m["accuracy"] == pytest.approx(2 / 6)
    # Exact: P 1/2 (r0, r1 predicted), R 1/2 (r0, r3 gold); Substitute: its one prediction wrong; Complement never
    # predicted; Irrelevant: P 1/2 (r2, r4), R 1/2 (r2, r5).
    assert [m[f"f1/{label}"] for label in cot.LABELS] == pytest.approx([0.5, 0.0, 0.0, 0.5])
    assert m["macro_f1"] == pytest.approx(0.25)
    # Micro: P = 2 correct / 5 predicted, R = 2 / 6 rows: 2·2 / (5 + 6); the failure makes it differ from accuracy.
    assert m["micro_f1"] == pytest.approx(4 / 11)
    # Exact vs rest: gold positive r0, r3; predicted positive r0, r1 (the failure r3 a predicted negative): TP 1.
    assert m["f1/exact_vs_rest"] == pytest.approx(2 * 1 / (2 + 2))
    # E+S vs C+I: gold positive r0, r1, r3; predicted positive r0, r1, r5: TP 2.
    assert m["f1/es_vs_ci"] == pytest.approx(2 * 2 / (3 + 3))
    assert m["format_failure_rate"] == pytest.approx(1 / 6)


def test_micro_f1_is_accuracy_without_failures_and_metrics_agree_with_the_classification_report():
    rng = np.random.default_rng(1)
    gold = rng.choice([E, S, I, C], 200, p=[0.3, 0.3, 0.3, 0.1])
    pred = np.where(rng.random(200) < 0.5, gold, rng.integers(-1, 4, 200))
    m, report = _metrics(gold, pred), classification.classification_report(gold, pred, cot.LABELS)
    assert m["accuracy"] == pytest.approx(report["accuracy"]) and m["macro_f1"] == pytest.approx(report["macro_f1"])
    assert m["format_failure_rate"] == pytest.approx(report["format_failure_rate"])
    for label in cot.LABELS:
        assert m[f"f1/{label}"] == pytest.approx(report["per_class"][label]["f1"])
    # Without Complement rows its F1 is undefined and counts 0 in the macro mean over the 4 classes (the report
    # averages the 3 classes present).
    kept = gold != C
    m, report = _metrics(gold[kept], pred[kept]), classification.classification_report(gold[kept], pred[kept],
                                                                                         cot.LABELS)
    assert math.isnan(m["f1/Complement"]) and m["macro_f1"] == pytest.approx(report["macro_f1"] * 3 / 4)
    answered = pred >= 0
    assert _metrics(gold[answered], pred[answered])["micro_f1"] == pytest.approx(
        _metrics(gold[answered], pred[answered])["accuracy"])


def test_bootstrap_is_seeded_and_brackets_the_point_estimate():
    arm = _arm("a", **TINY)
    first, again = (esci_results.bootstrap([arm], [], 300, seed=3) for _ in range(2))
    assert first == again
    assert esci_results.bootstrap([arm], [], 300, seed=4) != first
    for name, stat in first["arms"]["a"]["metrics"].items():
        if math.isfinite(stat["value"]):
            assert stat["low"] <= stat["value"] <= stat["high"], name
    assert first["arms"]["a"]["metrics"]["accuracy"]["value"] == pytest.approx(2 / 6)


def test_identical_queries_collapse_the_interval():
    queries = [f"q{i}" for i in range(5) for _ in range(3)]
    arm = _arm("a", queries, [E, S, I] * 5, [E, I, FAIL] * 5)
    for name, stat in esci_results.bootstrap([arm], [], 200, seed=0)["arms"]["a"]["metrics"].items():
        if math.isfinite(stat["value"]):
            assert stat["low"] == stat["value"] == stat["high"], name


def test_resampling_draws_whole_queries():
    # 10 queries of 10 rows each, 5 all right and 5 all wrong: by query the accuracy's standard error is
    # sqrt(.25 / 10) = 0.16 (95% width ~0.6); by row it would be sqrt(.25 / 100) = 0.05 (width ~0.2).
    queries = [f"q{i}" for i in range(10) for _ in range(10)]
    gold = [E] * 100
    pred = [E if int(q[1:]) < 5 else I for q in queries]
    by_query = esci_results.bootstrap([_arm("a", queries, gold, pred)], [], 1000, 0)["arms"]["a"]["metrics"]
    by_row = esci_results.bootstrap([_arm("a", [f"r{i}" for i in range(100)], gold, pred)], [], 1000, 0)
    width = lambda stat: stat["high"] - stat["low"]  # noqa: E731
    assert width(by_query["accuracy"]) > 0.45 and width(by_row["arms"]["a"]["metrics"]["accuracy"]) < 0.3

    # The rows of a query share its draw count, and the resampled matrices are those of the weighted rows.
    arm = _arm("a", **TINY)
    counts = esci_results.query_counts(3, 50, seed=0)
    assert (counts.sum(1) == 3).all()
    weights = esci_results.row_weights(arm, counts)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 2] == weights[:, 3]).all()
    assert (weights[:, 4] == weights[:, 5]).all() and not (weights[:, 0] == weights[:, 2]).all()
    one_hot = np.stack([classification.confusion_matrix(arm.gold[i:i + 1], arm.pred[i:i + 1], 4)
                        for i in range(6)]).reshape(6, -1)
    per_query = esci_results.query_matrices(arm, ["q1", "q2", "q3"]).reshape(3, -1)
    np.testing.assert_array_equal(weights @ one_hot, counts @ per_query)


def test_paired_difference_with_itself_is_zero():
    arm = _arm("a", **TINY)
    out = esci_results.bootstrap([arm, esci_results.dataclasses.replace(arm, name="b")], [("a", "b"), ("a", "a")],
                                 300, 0)
    for pair in out["pairs"]:
        for name, stat in pair["metrics"].items():
            if math.isfinite(stat["value"]):
                assert (stat["value"], stat["low"], stat["high"]) == (0.0, 0.0, 0.0), name
    assert out["arms"]["a"]["row_set"] == out["arms"]["b"]["row_set"] == 0


def test_paired_difference_is_per_resample_and_needs_the_same_rows():
    a = _arm("a", **TINY)
    b = esci_results.dataclasses.replace(a, name="b", pred=np.asarray(TINY["gold"]))  # always right
    out = esci_results.bootstrap([a, b], [("b", "a")], 500, 0)
    diff = out["pairs"][0]["metrics"]["accuracy"]
    assert diff["value"] == pytest.approx(4 / 6) and diff["low"] > 0  # b beats a in every resample
    other = _arm("c", ["q1", "q1", "q2", "q2", "q3", "q9"], TINY["gold"], TINY["pred"])
    with pytest.raises(ValueError, match="different rows"):
        esci_results.bootstrap([a, other], [("a", "c")], 10, 0)


@pytest.fixture
def esci_config(shared_data):
    path = shared_data / "esci-graded-subset" / "esci_pairs.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    config = smollm2_esci.get_config("cpu")
    config.data.esci.path = str(path)
    return config


def _write_run(folder, config, reports):
    (folder / "eval").mkdir(parents=True)
    (folder / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    (folder / "eval" / "metrics.json").write_text(json.dumps(reports))


def _report(examples, pred):
    gold = [cot.LABELS.index(e.label) for e in examples]
    report = classification.classification_report(gold, pred, cot.LABELS)
    return {**report, "predictions": [int(p) for p in pred], "example_ids": [e.example_id for e in examples]}


def test_script_on_fake_runs(tmp_path, esci_config, capsys):
    test = relevance.examples_of(esci_config, "test")
    gold = np.asarray([cot.LABELS.index(e.label) for e in test])
    rng = np.random.default_rng(0)
    sft = np.where(rng.random(len(test)) < 0.5, gold, rng.integers(-1, 4, len(test)))
    rl = np.where(rng.random(len(test)) < 0.8, gold, sft)
    order = rng.permutation(len(test))  # the eval's row order need not be the examples'
    shuffled = [test[i] for i in order]
    _write_run(tmp_path / "cot", esci_config, {"sft/test": _report(test, sft), "rl/test": _report(shuffled, rl[order])})
    _write_run(tmp_path / "zs", esci_config, {"base/test": _report(test[:100], np.full(100, -1))})

    fv = flags.FlagValues()
    esci_results.define_flags(fv)
    out = tmp_path / "results.json"
    fv(["esci_results", f"--arm=CoT SFT={tmp_path / 'cot'}:sft/test", f"--arm=Graph-GRPO={tmp_path / 'cot'}:rl/test",
        f"--arm=zero-shot={tmp_path / 'zs'}:base/test", "--pair=Graph-GRPO,CoT SFT", "--pair=CoT SFT,majority class",
        "--resamples=200", f"--out={out}"])
    assert esci_results.main(["esci_results"], fv) is None  # app.run exits with main's return value
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert list(saved["arms"]) == ["CoT SFT", "Graph-GRPO", "zero-shot", "majority class"]
    assert saved == json.loads(json.dumps(esci_results._json_ready(
        esci_results.run(fv.arm, fv.pair, fv.resamples, fv.seed))))  # the same numbers again
    arms = saved["arms"]
    assert saved["majority_label"] == "Irrelevant" and saved["majority_train_rows"] == 570
    assert (arms["CoT SFT"]["num_rows"], arms["CoT SFT"]["num_queries"]) == (168, 65)
    assert arms["majority class"]["metrics"]["accuracy"]["value"] == pytest.approx(np.mean(gold == 3))
    assert arms["Graph-GRPO"]["metrics"]["accuracy"]["value"] == pytest.approx(np.mean(rl == gold))
    assert arms["zero-shot"]["metrics"]["format_failure_rate"]["value"] == 1.0
    assert arms["zero-shot"]["metrics"]["f1/exact_vs_rest"]["value"] == 0.0
    assert arms["zero-shot"]["row_set"] != arms["CoT SFT"]["row_set"] == arms["majority class"]["row_set"]
    diff = saved["pairs"][0]
    assert (diff["a"], diff["b"]) == ("Graph-GRPO", "CoT SFT")
    assert diff["metrics"]["accuracy"]["value"] == pytest.approx(np.mean(rl == gold) - np.mean(sft == gold))
    assert "| Graph-GRPO − CoT SFT |" in printed and "| majority class | 168 / 65 |" in printed
    stat = arms["CoT SFT"]["metrics"]["macro_f1"]
    assert f"{stat['value']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]" in printed

    with pytest.raises(ValueError, match="cannot be paired"):
        esci_results.run([f"a={tmp_path / 'cot'}:sft/test", f"b={tmp_path / 'zs'}:base/test"], ["a,b"], 10)
    broken = _report(test, sft)
    broken["example_ids"][5] = "no-such-row"
    _write_run(tmp_path / "broken", esci_config, {"sft/test": broken})
    with pytest.raises(KeyError, match=r"broken: example id 'no-such-row'"):
        esci_results.run([f"a={tmp_path / 'broken'}:sft/test"])
