"""The jitted RL update on hand-made batches: φ-gradients of both learnable controller modes, and every GRPO
option reaching the update.

The batch has reward spread in every group and node spans on every completion, so graph credit depends
on φ; the `main_loss` gradient must be non-zero with μ = 2 (and exactly zero in expectation with μ = 1,
which the config refuses), and the `alignment` gradient must match finite differences of the objective.
"""

import dataclasses

import ml_collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from graphgrpo_jax.graph import controller, credit, spec as spec_lib
from graphgrpo_jax.models import decoder
from graphgrpo_jax.rl import grpo
from graphgrpo_jax.train import rl, state

G, PROMPTS, P, C = 4, 2, 6, 14


@pytest.fixture(scope="module")
def setup():
    model_config = decoder.DecoderConfig.from_config(common.model_config("tiny", vocab_size=64))
    params = decoder.init_params(model_config, jax.random.PRNGKey(0))
    spec = spec_lib.graph_spec(spec_lib.default_graph_config())
    rng = np.random.default_rng(0)
    n = G * PROMPTS
    tokens = rng.integers(2, 64, (n, P + C)).astype(np.int32)
    tokens[:, :P] = np.repeat(rng.integers(2, 64, (PROMPTS, P)), G, axis=0)  # one prompt per group, as rollouts
    completion = np.zeros((n, P + C), bool)
    completion[:, P:] = True
    node_ids = np.full((n, P + C), -2, np.int32)
    node_ids[:, P:] = np.repeat(np.arange(spec.num_nodes), 2)  # two tokens per node
    batch = {"tokens": tokens, "attention_mask": np.ones((n, P + C), bool), "completion_mask": completion,
             "node_ids": node_ids, "truncated": np.zeros(n, bool)}
    rewards = np.array([1, 0, 0, 1, 0, 1, 1, 1], np.float32)
    node_values = rng.integers(0, 2, (n, spec.num_nodes)).astype(np.int32)
    graph = spec_lib.encode_rollouts(spec, rewards, node_values, None, G, max_rollouts=n + 1)
    settings = credit.credit_settings(credit.default_credit_config(), spec)
    return model_config, params, spec, settings, batch, graph


def _update(setup, mode, num_iterations, **update_kwargs):
    model_config, params, spec, settings, batch, graph = setup
    cfg = grpo.default_grpo_config()
    cfg.update(num_generations=G, num_iterations=num_iterations, max_completion_length=C)
    optimizer = state.make_optimizer(ml_collections.ConfigDict(dict(learning_rate=1e-2)), 10)
    update = rl.make_update(model_config, cfg, spec, settings, optimizer, mode, **update_kwargs)
    phi = jnp.full((spec.num_edges,), 0.5)
    copy = jax.tree_util.tree_map(jnp.copy, params)
    return update(copy, optimizer.init(copy), phi, batch, graph, None), cfg


@pytest.fixture(scope="module")
def main_loss_update(setup):
    """The plain `main_loss` update with μ = 2, every row scored in full: the reference of the variants."""
    return _update(setup, "main_loss", num_iterations=2)[0]


def test_main_loss_gradient_is_nonzero_with_two_iterations(main_loss_update):
    _, _, g_phi, metrics = main_loss_update
    assert np.all(np.isfinite(g_phi)) and np.linalg.norm(g_phi) > 0
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("scoring, params_atol", [(dict(prompt_len=P), 1e-6),
                                                  (dict(prompt_len=P, share_prompts=True), 1e-4),
                                                  (dict(microbatches=2), 1e-4),
                                                  (dict(prompt_len=P, share_prompts=True, microbatches=2), 1e-4)],
                         ids=["completions_only", "one_prompt_per_group", "microbatches", "shared_microbatches"])
def test_scoring_completions_only_changes_nothing(setup, main_loss_update, scoring, params_atol):
    """`prompt_len` skips the prompt block's logits, `share_prompts` runs each group's prompt once, and
    `microbatches` scores one group at a time (μ = 2, so the old log-probs too) and adds the slices' sums;
    the update is the same. (Sharing and slicing sum gradients in another order; Adam's first steps,
    g / (|g| + eps), blow that rounding up on near-zero gradients, so params get 1e-4 of a 1e-2 step;
    test_decoder and test_sft check the gradients themselves.)"""
    params, _, g_phi, metrics = main_loss_update
    (params_p, _, g_phi_p, metrics_p), _ = _update(setup, "main_loss", num_iterations=2, **scoring)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=params_atol), params, params_p)
    np.testing.assert_allclose(g_phi, g_phi_p, atol=1e-6)
    assert metrics_p.keys() == metrics.keys()
    for key in metrics:
        np.testing.assert_allclose(metrics_p[key], metrics[key], atol=1e-5, err_msg=key)
    with pytest.raises(ValueError, match="needs the prompt block's width"):
        _update(setup, "main_loss", num_iterations=2, share_prompts=True)
    with pytest.raises(ValueError, match="microbatches=3 of blocks of 1 rows must divide the batch's rows"):
        _update(setup, "main_loss", num_iterations=2, microbatches=3)


def test_alignment_gradient_matches_finite_differences(setup):
    (_, _, g_phi, _), cfg = _update(setup, "alignment", num_iterations=1)
    model_config, params, spec, settings, batch, graph = setup
    outcome_settings = credit.CreditSettings(variant="outcome")

    def surrogate(p, phi, rows, s):
        out = credit.compute_credit(graph, phi, batch["node_ids"], batch["completion_mask"], spec=spec, settings=s)
        logp = decoder.token_log_probs(p, model_config, batch["tokens"][rows], batch["attention_mask"][rows])
        return grpo.policy_loss(logp, None, out.token_advantages[rows], batch["completion_mask"][rows], cfg)[0]

    halves = (slice(0, G), slice(G, 2 * G))

    @jax.jit
    def objective(phi):
        return controller.alignment_objective(
            phi, lambda f, h: jax.grad(surrogate)(params, f, h, settings),
            lambda h: jax.grad(surrogate)(params, f_outcome, h, outcome_settings), halves)

    f_outcome = jnp.full((spec.num_edges,), 0.5)
    phi = jnp.full((spec.num_edges,), 0.5)
    assert np.linalg.norm(g_phi) > 0
    eps = 1e-2
    for e in range(spec.num_edges):
        step = jnp.zeros(spec.num_edges).at[e].set(eps)
        numeric = (objective(phi + step) - objective(phi - step)) / (2 * eps)
        assert -float(g_phi[e]) == pytest.approx(float(numeric), abs=2e-3, rel=2e-2)


# ------------------------------------------------------------------------- every GRPO option reaches the update

OPTION_MODEL = decoder.DecoderConfig.from_config(
    common.model_config("tiny", vocab_size=64, hidden_size=32, num_layers=1, head_dim=8, mlp_dim=64))
OPTION_SPEC = spec_lib.graph_spec(spec_lib.default_graph_config())
# The options the batch fixes (its groups and completion width), and μ = 2: the first iteration's ratio is 1,
# so the clip options act from the second on.
BASE_GRPO = dict(num_generations=G, max_completion_length=C, num_iterations=2)
LENGTHS = np.array([14, 9, 5, 12, 14, 7, 11, 3])  # unequal, so the loss types weigh rows differently; 14 = C
# XLA:CPU options that compile the same program about 2.5x faster on this tiny model (no LLVM optimisation,
# the elemental emitters): 11 compiles stay within the test's time.
COMPILE_FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
OPTION_LEARNING_RATE = 3e-2  # the second iteration's ratios leave every clip range, the dual clip's included


@pytest.fixture(scope="module")
def option_setup():
    """A one-layer decoder and a rollout batch in which every option has something to act on: completions of
    unequal lengths, two of them truncated (full length, no EOS), reward spread in every group, and a
    reference policy unlike the policy (KL > 0)."""
    rng = np.random.default_rng(0)
    n = G * PROMPTS
    tokens = rng.integers(2, 64, (n, P + C)).astype(np.int32)
    tokens[:, :P] = np.repeat(rng.integers(2, 64, (PROMPTS, P)), G, axis=0)  # one prompt per group
    position = np.arange(P + C)[None, :]
    written = position < P + LENGTHS[:, None]
    node_ids = np.full((n, P + C), -1, np.int32)
    node_ids[:, P:] = np.repeat(np.arange(OPTION_SPEC.num_nodes), 2)
    batch = {"tokens": tokens, "attention_mask": written, "completion_mask": written & (position >= P),
             "node_ids": node_ids, "truncated": LENGTHS == C}
    rewards = np.array([1, 0, 0, 1, 0, 1, 1, 0.5], np.float32)
    node_values = rng.integers(0, 2, (n, OPTION_SPEC.num_nodes)).astype(np.int32)
    graph = spec_lib.encode_rollouts(OPTION_SPEC, rewards, node_values, None, G, max_rollouts=n + 1)
    return dict(params=decoder.init_params(OPTION_MODEL, jax.random.PRNGKey(0)),
                ref_params=decoder.init_params(OPTION_MODEL, jax.random.PRNGKey(1)), batch=batch, graph=graph)


def option_settings(**overrides) -> grpo.GrpoSettings:
    cfg = grpo.default_grpo_config()
    cfg.update(BASE_GRPO)
    cfg.update(overrides)
    return grpo.grpo_settings(cfg)


@pytest.fixture(scope="module")
def run_option_update(option_setup):
    """`run(settings, **batch_changes) -> (params, metrics)` after one update of the setup's params on its
    batch with `batch_changes`, the update built as the RL stage builds it (credit settings on the same
    `scale_rewards`, each group's prompt run once) with outcome credit, plain GRPO: the options act on the loss
    whatever the credit, and this one compiles in half the time of graph credit. Each settings' update is
    compiled once, by `COMPILE_FAST` (the cases compare updates with each other, never with recorded numbers)."""
    compiled = {}

    def run(settings: grpo.GrpoSettings, **batch_changes):
        optimizer = state.make_optimizer(state.OptimizerSettings(learning_rate=OPTION_LEARNING_RATE), 10)
        params = jax.tree_util.tree_map(jnp.copy, option_setup["params"])
        args = (params, optimizer.init(params), jnp.full((OPTION_SPEC.num_edges,), 0.5),
                {**option_setup["batch"], **batch_changes}, option_setup["graph"],
                option_setup["ref_params"] if settings.beta > 0 else None)
        if settings not in compiled:
            credit_settings = credit.CreditSettings(variant="outcome", scale_rewards=settings.scale_rewards)
            update = rl.make_update(OPTION_MODEL, settings, OPTION_SPEC, credit_settings, optimizer, prompt_len=P,
                                    share_prompts=True)
            compiled[settings] = update.lower(*args).compile(COMPILE_FAST)
        params, _, _, metrics = compiled[settings](*args)  # outcome credit: no φ-gradient
        return jax.device_get((params, metrics))

    return run


@pytest.fixture(scope="module")
def base_update(run_option_update):
    return run_option_update(option_settings())


def params_moved(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# Each option of `config.grpo` at a value other than the base's, and what it must change (metrics are the first
# iteration's). Every field of GrpoSettings has a case (test_every_option_has_a_case).
OPTION_CASES = {
    "num_generations": 8,  # the batch's layout: which rows share a prompt block
    "epsilon": 0.05,  # second iteration: the lower clip
    "epsilon_high": 0.05,  # second iteration: the upper clip
    "delta": 1.3,  # second iteration: the dual clip of negative-advantage tokens
    "beta": 0.1,  # the KL term, from the first iteration
    "loss_type": "dr_grpo",  # the token weights
    "scale_rewards": "none",  # the advantages (through the credit settings)
    "num_iterations": 3,  # a third step
    "mask_truncated_completions": False,  # the truncated rows count
    "max_completion_length": 2 * C,  # dr_grpo's normaliser only
}


def test_every_option_has_a_case():
    assert set(OPTION_CASES) == {field.name for field in dataclasses.fields(grpo.GrpoSettings)}
    base = option_settings()  # the defaults but for BASE_GRPO (num_generations = 8 is the default, 4 the batch's)
    assert all(getattr(base, name) != value for name, value in OPTION_CASES.items())


@pytest.mark.parametrize("field", sorted(OPTION_CASES))
def test_every_grpo_option_changes_the_update(option_setup, run_option_update, base_update, field):
    base_params, base_metrics = base_update
    batch = option_setup["batch"]
    if field == "max_completion_length":
        # Read by dr_grpo only (under grpo and dapo it is unread): its normaliser N · max_completion_length, so
        # doubling it halves the loss and its gradient (Adam then takes nearly the same step).
        reference = run_option_update(option_settings(loss_type="dr_grpo"))[1]
        doubled = run_option_update(option_settings(loss_type="dr_grpo", max_completion_length=2 * C))[1]
        np.testing.assert_allclose(doubled["loss"], reference["loss"] / 2, rtol=1e-5)
        np.testing.assert_allclose(doubled["grad_norm"], reference["grad_norm"] / 2, rtol=1e-5)
        return
    settings = option_settings(**{field: OPTION_CASES[field]})
    params, metrics = run_option_update(settings)
    assert params_moved(params, base_params) > 1e-3, f"{field} = {OPTION_CASES[field]!r} left the params as they were"
    if field == "num_generations":
        # Rows come in groups of 8 around one prompt block, the first row's: the update is the one of a batch whose
        # second group has the first group's prompt. (The credit's groups are the rollout graph's, unchanged.)
        tokens = batch["tokens"].copy()
        tokens[:, :P] = tokens[0, :P]
        same_prompt = run_option_update(settings, tokens=tokens)
        assert params_moved(params, same_prompt[0]) == 0.0
    elif field in ("epsilon", "epsilon_high", "delta", "num_iterations"):
        # The first iteration (ratio 1) is the base's; the steps after it differ.
        np.testing.assert_allclose(metrics["loss"], base_metrics["loss"], rtol=1e-6)
    elif field == "beta":
        assert metrics["kl"] > 0 and "kl" not in base_metrics
        assert metrics["loss"] > base_metrics["loss"]  # + β · KL, KL >= 0
    elif field == "mask_truncated_completions":
        # Keeping truncated rows is the base update of a batch with no row flagged truncated.
        # (Two compiled programs: rounding apart, which Adam's first steps blow up to ~1e-6.)
        unflagged = run_option_update(option_settings(), truncated=np.zeros_like(batch["truncated"]))
        assert params_moved(params, unflagged[0]) <= 1e-5
        np.testing.assert_allclose(metrics["loss"], unflagged[1]["loss"], rtol=1e-6)
    else:  # loss_type, scale_rewards: the first iteration's loss itself
        assert not np.isclose(metrics["loss"], base_metrics["loss"], rtol=1e-3)


def test_scale_rewards_must_match_the_credit_settings():
    settings = option_settings(scale_rewards="none")
    credit_settings = credit.credit_settings(credit.default_credit_config(), OPTION_SPEC)  # "group"
    optimizer = state.make_optimizer(state.OptimizerSettings(learning_rate=1e-2), 10)
    with pytest.raises(ValueError, match="'scale_rewards' = 'none', but the credit settings were built with 'group'"):
        rl.make_update(OPTION_MODEL, settings, OPTION_SPEC, credit_settings, optimizer)


def test_the_update_is_cached_on_its_settings():
    """Equal configs (two copies) give one update function, so repeated runs in one process compile once; a
    changed option gives another."""
    spec, credit_settings = OPTION_SPEC, credit.CreditSettings()

    def cached(**grpo_overrides):
        optim = ml_collections.ConfigDict(dict(learning_rate=1e-4, schedule="constant", microbatches=2))
        return rl._cached_update(OPTION_MODEL, option_settings(**grpo_overrides), spec, credit_settings,
                                 state.optimizer_settings(optim, "rl_optim"), 10, "fixed", P, True, 2)

    assert cached() is cached()
    assert cached(beta=0.1) is not cached()
