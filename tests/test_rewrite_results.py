"""The rewrite sweep (experiments/rewrite_results.py) on the micro config: which SFT each GRPO run starts from,
the student judge trained once for the whole sweep, resuming finished runs, and the table's mean ± std."""

import json
import os

import numpy as np
import pytest
from absl import app

from configs import rewrite as rewrite_configs
from experiments import rewrite_results
from graphgrpo_jax import config_validation, main
from graphgrpo_jax.eval import plots

# The recipe of the `cpu_scarce` variant, on the micro world.
SCARCE = ("rewrite_sft.task_mix.tag=0", "rewrite_sft.labelled_fraction=0.6", "rewrite.rl_queries=unlabelled",
          "rewrite.judge=student", "rewrite.w_rel=0.2", "rewrite.w_conv=0.8", "rl.temperature=1.5",
          "rewrite_eval.splits=[\"test\"]")


def _config(workdir) -> dict:
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)


def _files(folder) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def test_cpu_scarce_is_the_cpu_world_with_the_headline_recipe():
    cpu, scarce = rewrite_configs.get_config("cpu"), rewrite_configs.get_config("cpu_scarce")
    config_validation.validate(scarce, stages=main.STAGES)
    assert scarce.world == cpu.world and scarce.model == cpu.model and scarce.rewrite_sft.num_steps == 1200
    assert scarce.stages.index("distill") < scarce.stages.index("rl")  # the student judge exists before GRPO
    assert (scarce.rewrite_sft.task_mix.tag, scarce.rewrite_sft.labelled_fraction) == (0.0, 0.6)
    assert (scarce.rewrite.judge, scarce.rewrite.w_rel, scarce.rewrite.w_conv) == ("student", 0.2, 0.8)
    assert (scarce.rl.num_steps, scarce.rl.temperature, scarce.rl_optim.learning_rate) == (360, 1.5, 1e-4)
    assert rewrite_results.Sweep("unused", "cpu_scarce").start_from() == "single"
    assert rewrite_results.Sweep("unused", "cpu").start_from() == "multi"


def test_grpo_from_single_task_sft_needs_a_judge_other_than_its_tagger(tmp_path):
    sweep = rewrite_results.Sweep(str(tmp_path), "micro", fusions=("conv", "rfusion"), grpo_from="single")
    with pytest.raises(app.UsageError, match="fusion 'rfusion' reads r_rel from the tagger judge"):
        sweep.seed_rows(0)
    assert not os.listdir(tmp_path)  # nothing trained before the check


def test_scarce_sweep_starts_grpo_from_single_task_sft_with_one_student(tmp_path):
    sweep = rewrite_results.Sweep(str(tmp_path), "micro", overrides=SCARCE, fusions=("rfusion",))
    rows = sweep.seed_rows(0)
    assert list(rows) == ["raw query", "gold rewrite (ceiling)", "single-task SFT", "multi-task SFT",
                          "GRPO from single-task SFT, reward rfusion"]
    seed = tmp_path / "seed0"
    assert sorted(os.listdir(tmp_path)) == ["seed0", "student"] and not list(seed.glob("*.tmp"))
    assert (tmp_path / "student" / "distill" / "report.json").exists()
    single, multi, grpo = (_config(seed / name) for name in ("single_task_sft", "multi_task_sft",
                                                             "grpo_rfusion_from_single"))
    assert (single["rewrite_sft"]["task_mix"]["tag"], multi["rewrite_sft"]["task_mix"]["tag"]) == (0.0, 1.0)
    assert grpo["rewrite"]["student_workdir"] == str(tmp_path / "student")
    assert grpo["rewrite_sft"]["task_mix"]["tag"] == 0.0  # its SFT: no tagging task, so no tag-judge metrics
    assert "judge" in rows["multi-task SFT"] and "judge" not in rows["GRPO from single-task SFT, reward rfusion"]
    assert "retrieval_judge" in rows["GRPO from single-task SFT, reward rfusion"]
    assert (grpo["rl"]["temperature"], grpo["stages"]) == (1.5, ["rl", "rewrite_eval"])
    # GRPO started from the single-task SFT's checkpoints, copied unchanged.
    copied, source = _files(seed / "grpo_rfusion_from_single" / "sft"), _files(seed / "single_task_sft" / "sft")
    assert copied and copied == source
    for report in rows.values():
        assert 0.0 <= report["recall"] <= 1.0 and 0.0 <= report["relevance"] <= 3.0

    # A finished sweep is reused: nothing runs again, the reports are the same.
    stamps = {p: os.path.getmtime(p) for p in seed.glob("*/rewrite_eval/metrics.json")}
    assert len(stamps) == 3 and sweep.seed_rows(0) == rows
    assert stamps == {p: os.path.getmtime(p) for p in stamps}


def _reports(acc, rec, rel, **rows):
    """One seed's rows: the raw query with these metrics, then `rows` as offsets from it."""
    out = {"raw query": {"accuracy": acc, "recall": rec, "relevance": rel, "k": 10, "num_examples": 256}}
    for name, (da, dr, dl) in rows.items():
        out[name] = {"accuracy": acc + da, "recall": rec + dr, "relevance": rel + dl}
    return out


def test_table_is_mean_and_sample_std_over_seeds():
    per_seed = [_reports(0.1, 0.5, 1.0), _reports(0.3, 0.7, 2.0), _reports(0.2, 0.9, 1.5)]
    lines = rewrite_results.table(per_seed, "test").splitlines()
    assert lines[0] == "test split, 256 queries, 3 seed(s), mean ± std over seeds"
    assert lines[2] == "| | accuracy | recall@10 | relevance@10 (0-3) |"
    expected = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" for v in ([0.1, 0.3, 0.2], [0.5, 0.7, 0.9],
                                                                        [1.0, 2.0, 1.5])]
    assert lines[4] == "| raw query | " + " | ".join(expected) + " |"
    assert rewrite_results.table(per_seed[:1], "test").splitlines()[4] == "| raw query | 0.100 | 0.500 | 1.000 |"


def test_paired_table_against_the_t_distribution_with_two_degrees_of_freedom():
    gains = [0.01, 0.03, 0.02]  # recall of "GRPO" minus "SFT", per seed
    per_seed = [_reports(0.2, 0.6 + i / 10, 1.5, SFT=(0.0, 0.0, 0.0), GRPO=(-0.01 * i, g, 0.1))
                for i, g in enumerate(gains)]
    lines = rewrite_results.paired_table(per_seed, "SFT").splitlines()
    assert len(lines) == 5 and lines[4].startswith("| GRPO | ")  # only rows after the reference
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    # Two-sided p of Student's t with 2 degrees of freedom, in closed form: 1 - |t| / sqrt(t^2 + 2).
    t = np.mean(gains) / (np.std(gains, ddof=1) / np.sqrt(3))
    assert cells[2] == f"+0.020 ± 0.010, p = {1 - abs(t) / np.sqrt(t * t + 2):.3f}"
    assert cells[1].startswith("-0.010 ± 0.010, p = ")
    assert cells[3] == "+0.100 ± 0.000"  # no spread: no test
    assert cells[4:] == ["+0.010, +0.030, +0.020", "3 of 3"]
    tight = [_reports(0.2, 0.6, 1.5, SFT=(0.0, 0.0, 0.0), GRPO=(0.0, 0.1 + 1e-4 * i, 0.0)) for i in range(3)]
    t = 0.1001 / (1e-4 / np.sqrt(3))  # std of the differences: 1e-4
    p = 1 - t / np.sqrt(t * t + 2)
    assert f"± 0.000, p = {p:.1e} |" in rewrite_results.paired_table(tight, "SFT").splitlines()[4]


def test_plot_has_a_panel_per_metric_and_skips_the_gold_ceiling(tmp_path, monkeypatch):
    per_seed = [_reports(0.1, 0.5, 1.0, **{"gold rewrite (ceiling)": (0.9, 0.4, 1.9), "SFT": (0.1, 0.1, 0.1)})
                for _ in range(2)]
    drawn, draw = {}, plots.paired_by_seed
    monkeypatch.setattr(rewrite_results.plots, "paired_by_seed",
                        lambda values, path: drawn.update(values) or path)
    rewrite_results.write_plot(per_seed, str(tmp_path / "p.png"))
    assert list(drawn) == ["accuracy", "recall@10", "relevance@10 (0-3)"]
    assert drawn["recall@10"] == {"raw query": [0.5, 0.5], "SFT": [0.6, 0.6]}
    path = draw(drawn, str(tmp_path / "plots" / "by_seed.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_signal_is_the_first_and_last_tenth_of_the_logged_steps(tmp_path):
    os.makedirs(tmp_path / "rl")
    logged = [{"step": k, "rl/frac_reward_zero_std": k / 100, "rl/entropy": 1 - k / 100, "rl/reward": k / 10}
              for k in range(1, 21)]
    resumed = dict(logged[-1], **{"rl/reward": 9.0})  # step 20 logged again after a resume: the last counts
    with open(tmp_path / "rl" / "metrics.jsonl", "w") as f:
        for row in logged[:-1] + [logged[-1], {"step": 20, "time/eval_s": 1.0}, resumed]:
            f.write(json.dumps(row) + "\n")
    signal = rewrite_results.training_signal(str(tmp_path))
    assert signal["rl/frac_reward_zero_std"] == pytest.approx((0.015, 0.195))  # steps 1-2, steps 19-20
    assert signal["rl/entropy"] == pytest.approx((0.985, 0.805))
    assert signal["rl/reward"] == pytest.approx((0.15, (1.9 + 9.0) / 2))

    per_seed = [_reports(0.1, 0.5, 1.0, GRPO=(0.0, 0.1, 0.0)) for _ in range(2)]
    for reports, spread in zip(per_seed, (0.5, 0.7)):
        reports["GRPO"]["signal"] = dict(signal, **{"rl/frac_reward_zero_std": (spread, spread + 0.1)})
    lines = rewrite_results.table(per_seed, "test").splitlines()
    assert lines[-1] == "| GRPO | 0.600 → 0.700 | 0.985 → 0.805 | 0.150 → 5.450 |"
