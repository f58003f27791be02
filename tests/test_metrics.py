"""Metrics land in TensorBoard event files and in metrics.jsonl, with the same values."""

import glob

import jax.numpy as jnp
from tensorboard.backend.event_processing import event_accumulator

from graphgrpo_jax import metrics


def test_scalars_reach_both_sinks(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), "stage") as writer:
        writer.write_scalars(1, {"loss": jnp.float32(2.5), "acc": 0.25})
        writer.write_scalars(2, {"loss": 1.5, "acc": jnp.array(0.5)})
    rows = metrics.read_jsonl(str(tmp_path / "stage" / "metrics.jsonl"))
    assert rows == [{"step": 1, "loss": 2.5, "acc": 0.25}, {"step": 2, "loss": 1.5, "acc": 0.5}]

    [event_file] = glob.glob(str(tmp_path / "stage" / "events.out.tfevents.*"))
    acc = event_accumulator.EventAccumulator(event_file)
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["acc", "loss"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("acc")] == [(1, 0.25), (2, 0.5)]


def test_non_finite_values_stay_valid_json(tmp_path):
    with metrics.MetricsWriter(str(tmp_path)) as writer:
        writer.write_scalars(3, {"x": float("nan")})
    assert metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 3, "x": "nan"}]


def test_disabled_writer_writes_nothing(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), "off", enabled=False) as writer:
        assert writer.write_scalars(1, {"a": 1}) == {"a": 1.0}
    assert not (tmp_path / "off").exists()


def test_report_text_caps_long_fields_and_says_how_much_was_cut():
    assert metrics.report_text("short title") == "short title"
    capped = metrics.report_text("x" * 1_000_000)
    assert capped == "x" * metrics.REPORT_TEXT_CHARS + f"…[+{1_000_000 - metrics.REPORT_TEXT_CHARS} chars]"
    assert metrics.report_text("abcdef", limit=6) == "abcdef" and metrics.report_text("abcdefg", limit=6) == \
        "abcdef…[+1 chars]"
