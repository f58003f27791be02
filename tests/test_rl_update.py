"""The jitted RL update on a hand-made batch: φ-gradients of both learnable controller modes.

The batch has reward spread in every group and node spans on every completion, so graph credit depends
on φ; the `main_loss` gradient must be non-zero with μ = 2 (and exactly zero in expectation with μ = 1,
which the config refuses), and the `alignment` gradient must match finite differences of the objective.
"""

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
