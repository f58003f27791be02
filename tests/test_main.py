"""The CLI: overrides reach the run, bad values fail before any work, and resumes are bit-exact."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import relevance
from graphgrpo_jax import artifacts, checkpointing, config_validation, main, metrics
from graphgrpo_jax.train import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "graphgrpo_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_override_reaches_the_run(tmp_path):
    out = _cli("--config=configs/relevance.py:smoke", f"--workdir={tmp_path}",
               "--config.lm_smoke.num_steps=4", "--config.lm_smoke.log_every=2",
               "--config.optim.learning_rate=0.005")
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.load(open(tmp_path / "config.json"))
    assert written["lm_smoke"]["num_steps"] == 4
    assert written["optim"]["learning_rate"] == 0.005
    rows = metrics.read_jsonl(str(tmp_path / "lm_smoke" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4]


@pytest.mark.parametrize("override, field", [
    ("--config.model.dtype=float8", "config.model.dtype"),
    ("--config.optim.learning_rate=-1.0", "config.optim.learning_rate"),
    ("--config.stages=('lm_smoke','warp_drive')", "config.stages"),
])
def test_invalid_value_fails_before_any_work(tmp_path, override, field):
    out = _cli("--config=configs/relevance.py:smoke", f"--workdir={tmp_path}", override)
    assert out.returncode != 0
    assert field in out.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "config.json").exists()


def test_validation_lists_every_bad_field():
    config = relevance.get_config("smoke")
    config.model.num_heads = 4
    config.model.num_kv_heads = 3
    config.checkpoint.max_to_keep = 0
    config.optim.batch_size, config.optim.microbatches = 8, 3
    config.rl.prompts_per_step, config.rl_optim.microbatches = 8, 3
    with pytest.raises(config_validation.ConfigError) as err:
        config_validation.validate(config, stages=main.STAGES)
    assert "config.model.num_kv_heads = 3 must divide" in str(err.value)
    assert "config.optim.microbatches = 3 must divide config.optim.batch_size = 8" in str(err.value)
    assert "config.rl_optim.microbatches = 3 must divide config.rl.prompts_per_step = 8" in str(err.value)
    assert "config.checkpoint.max_to_keep" in str(err.value)


@pytest.mark.parametrize("field, value", [
    ("credit.variant", "bogus"), ("credit.evidence", "hunch"), ("credit.norm", "max"),
    ("controller.mode", "pid"), ("grpo.loss_type", "ppo"), ("grpo.scale_rewards", "median"),
])
def test_bad_enum_of_the_rl_sections_fails_validation_naming_the_field(field, value):
    config = relevance.get_config("micro")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(config_validation.ConfigError, match=f"config.{field} = '{value}' is not allowed"):
        config_validation.validate(config, stages=main.STAGES)


@pytest.mark.parametrize("field, value, message", [
    ("rl_optim.schedule", "linear", "config.rl_optim.schedule = 'linear' is not allowed; allowed values"),
    ("distill.optim.b2", 1.0, r"config.distill.optim.b2 = 1.0: must lie in \[0, 1\)"),
    ("optim.warmup", 10, "config.optim.warmup = 10: no such option"),
    ("grpo.beta", -0.1, "config.grpo.beta = -0.1 must be >= 0"),
    ("grpo.epsilon", 1.0, r"config.grpo: GRPO config field 'epsilon' = 1.0: must lie in \[0, 1\)"),
])
def test_bad_optimizer_or_grpo_settings_fail_validation_naming_the_field(field, value, message):
    """The frozen settings the RL and distillation stages build are checked at start-up, before SFT runs."""
    config = relevance.get_config("micro")
    section, _, name = field.rpartition(".")
    config_validation.get_field(config, section)[name] = value  # adds the field where it is a typo
    with pytest.raises(config_validation.ConfigError, match=message):
        config_validation.validate(config, stages=main.STAGES)


def test_batch_reward_scaling_under_node_norm_fails_validation():
    config = relevance.get_config("micro")
    config.credit.norm, config.grpo.scale_rewards = "node", "batch"
    with pytest.raises(config_validation.ConfigError, match="config.grpo.scale_rewards = 'batch' applies to"):
        config_validation.validate(config, stages=main.STAGES)


def test_interrupted_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    config = relevance.get_config("smoke")
    config.lm_smoke.num_steps, config.checkpoint.save_every = 6, 2
    straight = smoke.run(config, str(tmp_path / "straight"))

    real_sample_batch = smoke.sample_batch

    def dies_at_step_4(transitions, step, *args):
        if step == 3:  # the batch of step 4: the process dies after step 3, whose checkpoint is step 2
            raise KeyboardInterrupt("killed")
        return real_sample_batch(transitions, step, *args)

    monkeypatch.setattr(smoke, "sample_batch", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        smoke.run(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(smoke, "sample_batch", real_sample_batch)
    resumed = smoke.run(config, str(tmp_path / "resumed"))

    leaves_a, leaves_b = jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)
    assert len(leaves_a) == len(leaves_b) > 3
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with checkpointing.Checkpointer(artifacts.checkpoint_dir(str(tmp_path / "resumed"), "lm_smoke")) as ckpt:
        assert ckpt.all_steps() == [4, 6]
    logged = [r["step"] for r in metrics.read_jsonl(str(tmp_path / "resumed" / "lm_smoke" / "metrics.jsonl"))]
    assert logged == [5, 6]  # log_every=5 plus the final step; steps 3-4 re-run after the crash
