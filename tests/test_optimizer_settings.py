"""Optimizer sections as frozen settings: every config's sections read, bad fields named, the schedules."""

import numpy as np
import pytest

from configs import relevance, rewrite
from graphgrpo_jax.train import state


@pytest.mark.parametrize("config", [relevance.get_config("cpu"), relevance.get_config("micro"),
                                    rewrite.get_config("cpu")], ids=["relevance", "relevance_micro", "rewrite"])
def test_every_optimizer_section_of_the_configs_reads(config):
    for section, cfg in (("optim", config.optim), ("rl_optim", config.rl_optim),
                         ("distill.optim", config.distill.optim)):
        settings = state.optimizer_settings(cfg, section)
        assert settings.learning_rate == cfg.learning_rate and settings.schedule == cfg.get("schedule", "constant")
        assert hash(settings) == hash(state.optimizer_settings(cfg.to_dict(), section))  # a cache key


def test_defaults_are_those_of_a_section_that_leaves_the_field_out():
    assert state.optimizer_settings({"learning_rate": 1e-3}) == state.OptimizerSettings(
        learning_rate=1e-3, warmup_steps=0, schedule="constant", grad_clip=1.0, b1=0.9, b2=0.95, weight_decay=0.0)


def test_schedules():
    """Linear warm-up, then constant, or cosine decay to 10% at the last step."""
    cosine = state.learning_rate_schedule(state.OptimizerSettings(learning_rate=1.0, warmup_steps=10,
                                                                  schedule="cosine"), 100)
    np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(100)], [0.0, 0.5, 1.0, 0.1], atol=1e-6)
    constant = state.learning_rate_schedule(state.OptimizerSettings(learning_rate=2.0, warmup_steps=4), 100)
    np.testing.assert_allclose([constant(0), constant(2), constant(4), constant(99)], [0.0, 1.0, 2.0, 2.0])
    flat = state.learning_rate_schedule(state.OptimizerSettings(learning_rate=2.0), 100)
    np.testing.assert_allclose([flat(0), flat(99)], [2.0, 2.0])


@pytest.mark.parametrize("field, value, why", [
    ("schedule", "linear", "choose one of"), ("learning_rate", 0.0, "must be > 0"),
    ("warmup_steps", -1, "must be >= 0"), ("warmup_steps", 2.5, "must be an integer"),
    ("grad_clip", 0.0, "must be > 0"), ("b1", 1.0, r"must lie in \[0, 1\)"), ("b2", -0.1, r"must lie in \[0, 1\)"),
    ("weight_decay", -1e-2, "must be >= 0"), ("learning_rate", "1e-3", "must be a number"),
    ("lr", 1e-3, "no such option"),
])
def test_bad_fields_are_named(field, value, why):
    cfg = dict(learning_rate=1e-3, microbatches=2)  # microbatches: the stage's field, allowed
    cfg[field] = value
    with pytest.raises(ValueError, match=f"config.rl_optim.{field} = {value!r}: {why}"):
        state.optimizer_settings(cfg, "rl_optim")
    with pytest.raises(ValueError, match=f"optimizer config field '{field}'"):
        state.make_optimizer(cfg, 10)


def test_learning_rate_is_required():
    with pytest.raises(ValueError, match="config.optim.learning_rate = None: is required"):
        state.optimizer_settings({"batch_size": 8}, "optim")
