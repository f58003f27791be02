"""GRPO core: its settings, every loss mode, clip and KL option against an independent numpy reference.

The group normalisation of rewards is `graph/credit.py`'s (outcome GRPO is its `outcome` variant), tested in
test_credit.py; every option reaching the RL update is tested in test_rl_update.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphgrpo_jax.rl import grpo

N, T, G = 8, 12, 4  # 2 prompts x 4 rollouts, 12 completion tokens


def make_cfg(**overrides):
    cfg = grpo.default_grpo_config()
    cfg.num_generations = G
    cfg.max_completion_length = 16
    cfg.update(overrides)
    return grpo.grpo_settings(cfg)


# ---------------------------------------------------------------- numpy reference (from the formulas)


def np_unbiased_std(x):
    x = np.asarray(x, np.float64)
    return np.sqrt(np.sum((x - x.mean()) ** 2) / (x.size - 1))


def np_policy_loss(logp, old, adv, mask, *, eps_low, eps_high, delta, beta, ref, loss_type, max_len):
    """PPO-clip with clip-higher; dual clip as Ye et al. write it: max(min(...), delta * A) for A < 0."""
    ratio = np.exp(logp - old)
    surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if delta is not None:
        surrogate = np.where(adv < 0, np.maximum(surrogate, delta * adv), surrogate)
    per_token = -surrogate
    if beta:
        per_token = per_token + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    per_token = per_token * mask
    if loss_type == "grpo":
        rows = [per_token[i].sum() / max(mask[i].sum(), 1) for i in range(len(mask))]
        return float(np.mean(rows))
    if loss_type == "dapo":
        return float(per_token.sum() / mask.sum())
    if loss_type == "dr_grpo":
        return float(per_token.sum() / (len(mask) * max_len))
    raise AssertionError(loss_type)


@pytest.fixture(scope="module")
def batch():
    """Random rollouts whose ratios land on both sides of both clip bounds."""
    rng = np.random.default_rng(0)
    lengths = np.array([12, 9, 5, 1, 12, 7, 3, 10])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    old = rng.normal(-2.0, 0.5, (N, T)).astype(np.float32)
    logp = (old + rng.normal(0.0, 0.4, (N, T))).astype(np.float32)
    ref = (old + rng.normal(0.0, 0.3, (N, T))).astype(np.float32)
    adv = rng.normal(0.0, 1.0, (N, T)).astype(np.float32)
    return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, lengths=lengths)


def reference(batch, cfg, **changes):
    kwargs = dict(
        eps_low=cfg.epsilon, eps_high=cfg.epsilon_high, delta=cfg.delta, beta=cfg.beta,
        ref=batch["ref"].astype(np.float64), loss_type=cfg.loss_type, max_len=cfg.max_completion_length,
    )
    kwargs.update(changes)
    arrays = [batch[k].astype(np.float64) for k in ("logp", "old", "adv", "mask")]
    return np_policy_loss(*arrays, **kwargs)


def run(batch, cfg, **kwargs):
    return grpo.policy_loss(
        jnp.asarray(batch["logp"]), jnp.asarray(batch["old"]), jnp.asarray(batch["adv"]),
        jnp.asarray(batch["mask"]), cfg, **kwargs,
    )


# ---------------------------------------------------------------- reward logs


def test_group_reward_stats():
    stats = grpo.group_reward_stats(jnp.array([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0]), 4)
    np.testing.assert_allclose(stats["reward"], 10 / 8)
    np.testing.assert_allclose(stats["reward_std"], np.sqrt(1 / 3) / 2, rtol=1e-6)
    np.testing.assert_allclose(stats["frac_reward_zero_std"], 0.5)
    # A group of equal rewards whose float mean is not exact still counts as zero spread (an exact test).
    stats = grpo.group_reward_stats(jnp.array([0.1] * 8 + [1.0, 0.0] * 4), 8)
    np.testing.assert_allclose(stats["frac_reward_zero_std"], 0.5)
    np.testing.assert_allclose(stats["reward_std"], np.std([1.0, 0.0] * 4, ddof=1) / 2, rtol=1e-6)


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_loss_types_match_numpy(batch, loss_type):
    cfg = make_cfg(loss_type=loss_type)
    loss, metrics = run(batch, cfg)
    np.testing.assert_allclose(loss, reference(batch, cfg), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], loss)


def test_clip_higher_hand_worked():
    # One token, ratio 1.25, A = +1: inside [0.8, 1.28] it is unclipped; with a symmetric 0.2 it clips.
    logp, old = jnp.log(jnp.array([[1.25]])), jnp.zeros((1, 1))
    adv, mask = jnp.ones((1, 1)), jnp.ones((1, 1))
    loss_high, m_high = grpo.policy_loss(logp, old, adv, mask, make_cfg(epsilon_high=0.28))
    loss_sym, m_sym = grpo.policy_loss(logp, old, adv, mask, make_cfg(epsilon_high=0.2))
    np.testing.assert_allclose([loss_high, loss_sym], [-1.25, -1.2], rtol=1e-6)
    assert (m_high["clip_ratio/high"], m_sym["clip_ratio/high"]) == (0.0, 1.0)


def test_clip_higher_matches_numpy(batch):
    cfg = make_cfg(epsilon=0.1, epsilon_high=0.35, loss_type="dapo")
    np.testing.assert_allclose(run(batch, cfg)[0], reference(batch, cfg), rtol=1e-5)


def test_dual_clip_hand_worked():
    # Ratio 5 on a negative advantage: PPO's loss is 5·|A|; the dual clip caps it at delta·|A| = 3.
    logp, old = jnp.log(jnp.array([[5.0, 5.0]])), jnp.zeros((1, 2))
    adv, mask = jnp.array([[-1.0, 1.0]]), jnp.ones((1, 2))
    plain, _ = grpo.policy_loss(logp, old, adv, mask, make_cfg(loss_type="dapo"))
    dual, metrics = grpo.policy_loss(logp, old, adv, mask, make_cfg(loss_type="dapo", delta=3.0))
    # Token 2 (A > 0) is clipped at 1.28 either way.
    np.testing.assert_allclose([plain, dual], [(5.0 - 1.28) / 2, (3.0 - 1.28) / 2], rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/dual"], 0.5)


def test_dual_clip_matches_numpy(batch):
    noise = np.random.default_rng(3).normal(0, 1.5, (N, T)).astype(np.float32)
    wide = dict(batch, logp=batch["old"] + noise)
    cfg = make_cfg(delta=2.0)
    assert np.any((np.exp(wide["logp"] - wide["old"]) > 2.0) & (wide["adv"] < 0) & (wide["mask"] > 0))
    np.testing.assert_allclose(run(wide, cfg)[0], reference(wide, cfg), rtol=1e-5)
    assert not np.isclose(run(wide, make_cfg())[0], run(wide, cfg)[0])


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_kl_term_matches_numpy(batch, loss_type):
    cfg = make_cfg(beta=0.1, loss_type=loss_type)
    loss, metrics = run(batch, cfg, ref_logp=jnp.asarray(batch["ref"]))
    np.testing.assert_allclose(loss, reference(batch, cfg), rtol=1e-5)
    log_ratio = (batch["ref"] - batch["logp"]).astype(np.float64)
    k3 = np.exp(log_ratio) - log_ratio - 1
    np.testing.assert_allclose(metrics["kl"], (k3 * batch["mask"]).sum() / batch["mask"].sum(), rtol=1e-5)


def test_beta_needs_reference():
    with pytest.raises(ValueError, match="'beta'"):
        grpo.policy_loss(jnp.zeros((2, 2)), None, jnp.zeros(2), jnp.ones((2, 2)), make_cfg(beta=0.04))


def test_first_iteration_loss_and_gradient():
    """mu = 1, beta = 0: the ratio is 1, so each token's loss is -A_i.

    With one advantage per sequence, `grpo` averages -A_i over sequences: 0, since advantages have
    zero group mean. `dapo` and `dr_grpo` weight sequences by length, which is not 0 when lengths
    differ. The gradient is -A_i / (N * L_i) on each token of sequence i (grpo), never all zero.
    """
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.3, 0.9, 0.1, 0.2]])
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    advantages = jnp.asarray((centred / rewards.std(axis=1, ddof=1, keepdims=True)).reshape(-1), jnp.float32)
    lengths = np.array([3, 7, 12, 5, 9, 2, 12, 4])
    mask = jnp.asarray((np.arange(T)[None, :] < lengths[:, None]).astype(np.float32))
    logp = jnp.asarray(np.random.default_rng(4).normal(-2.0, 0.5, (N, T)).astype(np.float32))

    def loss_fn(lp, loss_type):
        return grpo.policy_loss(lp, None, advantages, mask, make_cfg(loss_type=loss_type))[0]

    a = np.asarray(advantages, np.float64)
    np.testing.assert_allclose(loss_fn(logp, "grpo"), 0.0, atol=1e-6)
    np.testing.assert_allclose(loss_fn(logp, "dapo"), -(a * lengths).sum() / lengths.sum(), rtol=1e-5)
    np.testing.assert_allclose(loss_fn(logp, "dr_grpo"), -(a * lengths).sum() / (N * 16), rtol=1e-5)

    grad = jax.grad(loss_fn)(logp, "grpo")
    expected = -(a / (N * lengths))[:, None] * np.asarray(mask)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)
    assert np.abs(grad).max() > 0.01


def test_truncated_rows_leave_the_loss(batch):
    truncated = jnp.array([False, True, False, False, False, False, True, False])
    cfg = make_cfg()
    loss, metrics = run(batch, cfg, truncated=truncated)
    zeroed = dict(batch, mask=batch["mask"] * (1 - np.asarray(truncated, np.float32))[:, None])
    np.testing.assert_allclose(loss, reference(zeroed, cfg), rtol=1e-5)
    np.testing.assert_allclose(metrics["completions/truncated_ratio"], 0.25)
    # Lengths are logged before masking, as TRL does.
    np.testing.assert_allclose(metrics["completions/mean_length"], batch["lengths"].mean())

    def loss_of(lp):
        return grpo.policy_loss(lp, jnp.asarray(batch["old"]), jnp.asarray(batch["adv"]),
                                jnp.asarray(batch["mask"]), cfg, truncated=truncated)[0]

    grad = np.asarray(jax.grad(loss_of)(jnp.asarray(batch["logp"])))
    assert np.all(grad[[1, 6]] == 0.0) and np.any(grad[0] != 0.0)
    kept = make_cfg(mask_truncated_completions=False)
    np.testing.assert_allclose(run(batch, kept, truncated=truncated)[0], reference(batch, kept), rtol=1e-5)


def test_metrics_match_numpy(batch):
    cfg = make_cfg()
    entropy = np.random.default_rng(5).uniform(0, 3, (N, T)).astype(np.float32)
    _, metrics = run(batch, cfg, entropy=jnp.asarray(entropy))
    mask = batch["mask"] > 0
    ratio = np.exp(batch["logp"] - batch["old"]).astype(np.float64)
    low = (ratio < 0.8) & (batch["adv"] < 0)
    high = (ratio > 1.28) & (batch["adv"] > 0)
    assert low[mask].any() and high[mask].any()
    np.testing.assert_allclose(metrics["clip_ratio/low"], low[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/high"], high[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/region"], (low | high)[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio/mean"], ratio[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy"], entropy[mask].mean(), rtol=1e-5)
    assert (metrics["completions/min_length"], metrics["completions/max_length"]) == (1.0, 12.0)
    assert "kl" not in metrics and "clip_ratio/dual" not in metrics


def test_padding_at_minus_infinity_stays_finite(batch):
    pad = batch["mask"] == 0
    logp = np.where(pad, -np.inf, batch["logp"]).astype(np.float32)
    ref = np.where(pad, -np.inf, batch["ref"]).astype(np.float32)
    cfg = make_cfg(beta=0.1)

    def loss_of(lp):
        return grpo.policy_loss(lp, jnp.asarray(batch["old"]), jnp.asarray(batch["adv"]),
                                jnp.asarray(batch["mask"]), cfg, jnp.asarray(ref))[0]

    loss, grad = jax.value_and_grad(loss_of)(jnp.asarray(logp))
    np.testing.assert_allclose(loss, reference(batch, cfg), rtol=1e-5)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[pad] == 0.0)


def test_jitted_loss_equals_eager(batch):
    cfg = make_cfg(beta=0.05, delta=3.0, loss_type="dr_grpo")
    jitted = jax.jit(functools.partial(grpo.policy_loss, cfg=cfg))
    args = [jnp.asarray(batch[k]) for k in ("logp", "old", "adv", "mask")]
    eager_loss, eager_metrics = grpo.policy_loss(*args, cfg, jnp.asarray(batch["ref"]))
    jit_loss, jit_metrics = jitted(*args, ref_logp=jnp.asarray(batch["ref"]))
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
    np.testing.assert_allclose(jit_loss, reference(batch, cfg), rtol=1e-5)
    assert jit_metrics.keys() == eager_metrics.keys()


def test_outcome_advantages_broadcast_over_tokens(batch):
    per_response = np.random.default_rng(6).normal(size=N).astype(np.float32)
    cfg = make_cfg()
    token_level = dict(batch, adv=np.repeat(per_response[:, None], T, axis=1))
    got, _ = grpo.policy_loss(jnp.asarray(batch["logp"]), jnp.asarray(batch["old"]),
                              jnp.asarray(per_response), jnp.asarray(batch["mask"]), cfg)
    np.testing.assert_allclose(got, reference(token_level, cfg), rtol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [("num_generations", 1), ("epsilon", 1.0), ("delta", 1.2), ("beta", -0.1),
     ("loss_type", "bnpo_typo"), ("scale_rewards", "global"), ("num_iterations", 0),
     ("max_completion_length", 0), ("num_iterations", 1.5), ("beta", "0.1"),
     ("mask_truncated_completions", 1)],
)
def test_config_errors_name_the_field(field, value):
    cfg = dict(grpo.default_grpo_config())
    cfg[field] = value
    with pytest.raises(ValueError, match=f"'{field}'"):
        grpo.grpo_settings(cfg)


def test_settings_are_the_config_frozen():
    """The defaults agree with the config's, a typo'd field is refused rather than ignored, and the settings
    are hashable (the RL update is cached on them)."""
    assert grpo.grpo_settings(grpo.default_grpo_config()) == grpo.GrpoSettings()
    assert hash(make_cfg(beta=0.1)) == hash(make_cfg(beta=0.1)) and make_cfg(beta=0.1) != make_cfg()
    cfg = grpo.default_grpo_config()
    cfg.epsilon_hi = 0.3
    with pytest.raises(ValueError, match="'epsilon_hi': no such option"):
        grpo.grpo_settings(cfg)


def test_dr_grpo_rejects_completions_wider_than_its_normaliser():
    cfg = make_cfg(loss_type="dr_grpo", max_completion_length=4)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo.policy_loss(jnp.zeros((2, 5)), None, jnp.zeros(2), jnp.ones((2, 5)), cfg)
    # Rows that start with a prompt block: only the completion part must fit.
    after_prompt = jnp.ones((2, 5)).at[:, 0].set(0.0)
    loss, _ = grpo.policy_loss(jnp.zeros((2, 5)), None, jnp.ones(2), after_prompt, cfg, completion_width=4)
    np.testing.assert_allclose(loss, -(2 * 4) / (2 * 4))
