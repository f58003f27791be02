"""The relevance pipeline end to end on the micro config: data → SFT → Graph-GRPO → eval.

One run covers the richest path (reference model with β > 0, μ = 2 PPO iterations, the `main_loss` φ
controller); a second RL run continues it from its checkpoint and must match an uninterrupted run exactly.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from configs import relevance
from graphgrpo_jax import artifacts, checkpointing, main, metrics
from graphgrpo_jax.train import rl


def _config(rl_steps: int):
    config = relevance.get_config("micro")
    config.grpo.beta = 0.01
    config.grpo.num_iterations = 2
    config.controller.mode = "main_loss"
    config.controller.grad_tol = 0.0
    config.rl.num_steps = rl_steps
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    main.run(_config(rl_steps=2), str(path))
    return path


def test_every_stage_leaves_its_outputs(workdir):
    assert (workdir / "config.json").exists()
    assert (workdir / "tokenizer" / "tokenizer.json").exists()
    assert (workdir / "data" / "world.json").exists()
    for stage, last in (("sft", 6), ("rl", 2)):
        with checkpointing.Checkpointer(artifacts.checkpoint_dir(str(workdir), stage)) as ckpt:
            assert ckpt.all_steps()[-1] == last
    results = json.load(open(workdir / "eval" / "metrics.json"))
    assert sorted(results) == ["rl/ood", "rl/test", "sft/ood", "sft/test"]
    for report in results.values():
        assert report["num_examples"] == 8
        assert 0.0 <= report["accuracy"] <= 1.0
        counts = np.asarray(report["confusion_matrix"]["counts"])
        assert counts.shape == (4, 5) and counts.sum() == 8
        assert set(report["per_class"]) == {"Exact", "Substitute", "Complement", "Irrelevant"}
    summary = json.load(open(workdir / "report.json"))
    assert summary["eval"]["rl/test"]["accuracy"] == results["rl/test"]["accuracy"]
    assert summary["rl"]["steps"] == 2
    report_md = (workdir / "report.md").read_text()
    for plot in ("rl_reward_accuracy.png", "phi.png", "node_advantage_std.png", "confusion_rl_test.png"):
        assert (workdir / "plots" / plot).stat().st_size > 1000
        assert f"plots/{plot}" in report_md


def test_rl_logs_every_metric_each_step(workdir):
    rows = metrics.read_jsonl(str(workdir / "rl" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    expected = ["rl/reward", "rl/reward_std", "rl/frac_reward_zero_std", "rl/kl", "rl/entropy",
                "rl/clip_ratio/low", "rl/clip_ratio/high", "rl/clip_ratio/region", "rl/completions/mean_length",
                "rl/accuracy", "rl/format_failure_rate", "rl/format_failures", "rl/loss", "rl/grad_norm",
                "controller/grad_norm", "time/step_s", "time/generate_s", "time/score_s", "time/update_s",
                "time/other_s", "credit/blame_precision_at_1",
                "credit/blame_random_baseline", "credit/credit_correctness_corr"]
    expected += [f"phi/{edge}" for edge in ("y->ms", "y->ma", "ms->qs", "ms->ps", "ma->qa", "ma->pa")]
    expected += [f"credit/adv_{stat}/{node}" for stat in ("mean", "std", "min", "max")
                 for node in ("qs", "qa", "ps", "pa", "ms", "ma", "y")]
    for row in rows:
        missing = [k for k in expected if k not in row]
        assert not missing, missing
        assert row["rl/format_failures"] == pytest.approx(row["rl/format_failure_rate"] * 8)
        assert row["time/generate_s"] > 0 < row["time/update_s"] and row["time/score_s"] >= 0
        assert all(0.0 <= row[f"phi/{e}"] <= 1.0 for e in ("y->ms", "ms->qs"))


def test_rl_resumes_exactly(workdir, tmp_path):
    """Continue the 2-step run to 3 steps; an uninterrupted 3-step run from the same SFT must match."""
    resumed_dir = tmp_path / "resumed"
    straight_dir = tmp_path / "straight"
    for target in (resumed_dir, straight_dir):
        shutil.copytree(workdir, target)
    shutil.rmtree(straight_dir / "checkpoints" / "rl")
    config = _config(rl_steps=3)
    resumed = rl.run(config, str(resumed_dir))
    straight = rl.run(config, str(straight_dir))
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in metrics.read_jsonl(str(resumed_dir / "rl" / "metrics.jsonl"))] == [1, 2, 3]



def test_eval_only_mode_judges_an_esci_file(workdir, tmp_path, shared_data):
    """The `eval_file` stage on the first real ESCI rows, with the micro run's checkpoints."""
    rows = (shared_data / "esci-graded-subset" / "esci_pairs.jsonl").read_text().splitlines()[:12]
    input_path = tmp_path / "esci_head.jsonl"
    input_path.write_text("\n".join(rows) + "\n")
    config = relevance.get_config("eval_file")
    config.eval.update(input_path=str(input_path), checkpoint_workdir=str(workdir), policies=("sft", "rl"))
    main.run(config, str(tmp_path / "eval_only"))

    results = json.load(open(tmp_path / "eval_only" / "eval" / "esci_head.json"))
    assert results["num_rows"] == 12 and results["skipped_rows"] == {}
    gold = [{"E": "Exact", "S": "Substitute", "C": "Complement", "I": "Irrelevant"}[json.loads(r)["esci_label"]]
            for r in rows]
    for policy in ("sft", "rl"):
        counts = np.asarray(results[policy]["confusion_matrix"]["counts"])
        assert counts.sum(axis=1).tolist() == [gold.count(label) for label in results[policy]["per_class"]]


def test_eval_only_mode_names_a_bad_row(workdir, tmp_path):
    input_path = tmp_path / "bad.jsonl"
    input_path.write_text(json.dumps({"query_id": 1, "query": "q", "product_id": "p", "product_title": "t",
                                      "esci_label": "E"}) + "\n" + json.dumps({"query_id": 2, "query": "q"}) + "\n")
    config = relevance.get_config("eval_file")
    config.eval.update(input_path=str(input_path), checkpoint_workdir=str(workdir))
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 2, field 'product_id'"):
        main.run(config, str(tmp_path / "eval_only"))
