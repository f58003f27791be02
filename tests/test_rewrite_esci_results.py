"""The real-ESCI rewrite results script (experiments/rewrite_esci_results.py) on fake run folders: per-query means
over seeds, seed spread, bootstrap intervals and paired differences over the queries two arms share."""

import json

import numpy as np
import pytest

from experiments import rewrite_esci_results as results


def _run(folder, reports):
    (folder / "rewrite_eval").mkdir(parents=True)
    (folder / "rewrite_eval" / "metrics.json").write_text(json.dumps({
        name: {"per_query": {"query": list(values), "recall": list(values.values()),
                             "ndcg": [v / 2 for v in values.values()]}} for name, values in reports.items()}))
    return str(folder)


def test_arms_seeds_intervals_and_pairs(tmp_path):
    s0 = _run(tmp_path / "s0", {"sft/test": {"a": 0.0, "b": 0.5, "c": 1.0}, "raw/test": {"a": 0.0, "b": 0.0, "c": 0.5},
                                "teacher/test": {"b": 1.0}})
    s1 = _run(tmp_path / "s1", {"sft/test": {"a": 1.0, "b": 0.5, "c": 1.0}})
    sft = results.read_arm(f"SFT={s0},{s1}:sft/test")
    assert sft.per_query["recall"] == {"a": 0.5, "b": 0.5, "c": 1.0}  # the mean over the two seeds
    assert sft.seed_means["recall"] == pytest.approx([0.5, 2.5 / 3])
    raw, teacher = results.read_arm(f"raw={s0}:raw/test"), results.read_arm(f"teacher={s0}:teacher/test")
    summary = results.summarise([sft, raw, teacher], [("SFT", "raw"), ("teacher", "raw")], resamples=500, seed=0)
    arm = summary["arms"]["SFT"]["recall"]
    assert arm["mean"] == pytest.approx(2 / 3) and arm["low"] <= arm["mean"] <= arm["high"]
    assert arm["seed_std"] == pytest.approx(np.std([0.5, 2.5 / 3], ddof=1))
    assert summary["arms"]["SFT"]["ndcg"]["mean"] == pytest.approx(1 / 3)
    pair = summary["pairs"]["SFT - raw"]
    assert pair["queries"] == 3 and pair["recall"]["mean"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    assert pair["recall"]["low"] == pytest.approx(0.5) == pair["recall"]["high"]  # a constant difference
    assert summary["pairs"]["teacher - raw"] == {"queries": 1, "recall": {"mean": 1.0, "low": 1.0, "high": 1.0},
                                                 "ndcg": {"mean": 0.5, "low": 0.5, "high": 0.5}}
    assert "| SFT | 3 | 0.667" in results.markdown(summary)
    with pytest.raises(KeyError, match="has no per-query report 'rl/test'"):
        results.read_arm(f"GRPO={s0}:rl/test")
    with pytest.raises(ValueError, match="expected NAME=WORKDIR"):
        results.read_arm("no-workdir")
    with pytest.raises(ValueError, match="may not hold a comma"):
        results.read_arm(f"SFT, seed 0={s0}:sft/test")
