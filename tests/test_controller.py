"""φ controller: config refusal, fixed/main_loss/alignment steps on a toy tabular softmax policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphgrpo_jax.graph import controller
from graphgrpo_jax.graph.credit import CreditSettings, compute_credit
from graphgrpo_jax.graph.spec import default_graph_config, encode_rollouts, graph_spec

GROUP, NUM_GROUPS, K = 4, 4, 3  # 4 prompts x 4 rollouts; every node takes one of 3 values
SETTINGS = CreditSettings()
OUTCOME = CreditSettings(variant="outcome")


@pytest.fixture(scope="module")
def spec():
    return graph_spec(default_graph_config())


def controller_cfg(**overrides):
    cfg = controller.default_controller_config()
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def toy(spec):
    """A tabular softmax policy: node v's value z ~ softmax(θ[v]), one token per node, the same
    context for every prompt. Rewards: right when ms and ma are both 0 (the label follows them)."""
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(size=(7, K)), jnp.float32)
    n = GROUP * NUM_GROUPS
    z = rng.integers(0, K, (n, 7))
    rewards = ((z[:, 4] == 0) & (z[:, 5] == 0)).astype(np.float32)
    rewards[::GROUP] = 1.0  # every group has a right and (below) a wrong rollout
    z[::GROUP, 4:6] = 0
    z[1::GROUP, 4] = 1
    rewards[1::GROUP] = 0.0
    rollouts = dict(rewards=rewards, z=z)
    return theta, rollouts


def encode_half(spec, half):
    graph = encode_rollouts(spec, half["rewards"], half["z"], None, GROUP)
    n = half["z"].shape[0]
    return dict(graph=graph, z=jnp.asarray(half["z"]), tokens=jnp.tile(jnp.arange(7), (n, 1)),
                mask=jnp.ones((n, 7), bool))


def token_logp(theta, z):
    """log softmax(θ[v])[z_iv]: one token per node."""
    return jnp.take_along_axis(jax.nn.log_softmax(theta, axis=-1)[None], z[..., None], axis=-1)[..., 0]


# ------------------------------------------------------------------------------------------ config


def test_main_loss_refuses_one_iteration(spec):
    with pytest.raises(ValueError, match=r"'mode' = 'main_loss': needs num_iterations >= 2"):
        controller.controller_settings(controller_cfg(mode="main_loss"), spec, num_iterations=1)
    settings = controller.controller_settings(controller_cfg(mode="main_loss"), spec, num_iterations=2)
    assert settings.mode == "main_loss" and settings.edge_names == spec.edge_names


@pytest.mark.parametrize("field, value, message", [
    ("mode", "learned", r"'mode' = 'learned': choose one of"),
    ("optimizer", "lion", r"'optimizer' = 'lion'"),
    ("learning_rate", 0.0, r"'learning_rate' = 0.0: must be > 0"),
    ("grad_tol", -1.0, r"'grad_tol' = -1.0"),
])
def test_bad_controller_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        controller.validate_controller_config(controller_cfg(**{field: value}), num_iterations=2)


# ------------------------------------------------------------------------------------------- modes


def test_fixed_keeps_phi_and_logs_every_edge(spec):
    settings = controller.controller_settings(controller_cfg(), spec, num_iterations=1)
    state = controller.init_controller(spec, settings)
    state, metrics = controller.controller_update(state, None, settings)
    np.testing.assert_array_equal(state.phi, spec.phi_init)
    assert int(state.step) == 1
    assert {k: float(v) for k, v in metrics.items() if k.startswith("phi/")} == {
        "phi/y->ms": 0.0, "phi/y->ma": 0.0, "phi/ms->qs": 1.0, "phi/ms->ps": 1.0,
        "phi/ma->qa": 1.0, "phi/ma->pa": 1.0}


def clipped_policy_loss(phi, theta, theta_old, data, spec):
    """The GRPO clipped surrogate (ε = 0.2) of the toy policy, as a function of φ."""
    out = compute_credit(data["graph"], phi, data["tokens"], data["mask"], spec=spec, settings=SETTINGS)
    ratio = jnp.exp(token_logp(theta, data["z"]) - token_logp(theta_old, data["z"]))
    advantages = out.token_advantages
    surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 0.8, 1.2) * advantages)
    return -jnp.mean(surrogate)


def test_main_loss_skips_the_zero_gradient_of_one_iteration_and_steps_on_two(spec, toy):
    theta, rollouts = toy
    data = encode_half(spec, rollouts)
    grad_fn = jax.jit(jax.grad(clipped_policy_loss), static_argnames="spec")
    # grad_tol = 0 would let μ = 1 through: that is what the check is for.
    settings = controller.ControllerSettings("main_loss", 0.05, 1e-6, "adam", spec.edge_names)
    state = controller.init_controller(spec, settings)

    # μ = 1: ratio 1, every node has one token per rollout and zero-mean advantages in its group.
    zero = grad_fn(state.phi, theta, theta, data, spec=spec)
    assert float(jnp.linalg.norm(zero)) < 1e-6
    skipped, metrics = controller.controller_update(state, zero, settings)
    np.testing.assert_array_equal(skipped.phi, state.phi)
    assert int(skipped.num_skipped) == 1 and float(metrics["controller/skipped"]) == 1.0
    assert int(skipped.opt_state[0].count) == 0  # Adam's moments were not fed the zero step

    # μ = 2: the second epoch sees a moved policy, and the loss now reaches φ.
    step = np.random.default_rng(1).normal(size=theta.shape)
    theta_moved = theta + 0.3 * jnp.asarray(step, jnp.float32)
    grads = grad_fn(state.phi, theta_moved, theta, data, spec=spec)
    assert float(jnp.linalg.norm(grads)) > 1e-3
    stepped, metrics = controller.controller_update(state, grads, settings)
    # Adam's first step is -lr·g / (|g| + 1e-8) (both moments start from this g); the box keeps [0, 1].
    g = np.asarray(grads, np.float64)
    expected = np.clip(np.asarray(spec.phi_init) - 0.05 * g / (np.abs(g) + 1e-8), 0.0, 1.0)
    np.testing.assert_allclose(stepped.phi, expected, atol=1e-6)
    assert int(stepped.num_skipped) == 0 and float(metrics["controller/skipped"]) == 0.0
    np.testing.assert_allclose(metrics["phi/ms->qs"], expected[2], atol=1e-6)


def test_projection_keeps_phi_in_the_box(spec):
    settings = controller.ControllerSettings("main_loss", 10.0, 0.0, "sgd", spec.edge_names)
    state = controller.init_controller(spec, settings)
    grads = jnp.asarray([-1.0, 0.01, 1.0, -1.0, 0.02, 0.0])
    state, _ = controller.controller_update(state, grads, settings)
    # φ - 10·g = [10, -0.1, -9, 11, 0.8, 1] -> [1, 0, 0, 1, 0.8, 1]
    np.testing.assert_allclose(state.phi, [1.0, 0.0, 0.0, 1.0, 0.8, 1.0], atol=1e-6)


# --------------------------------------------------------------------------------------- alignment


def surrogate_gradient(theta, advantages, z):
    """∇_θ of mean_i Σ_t A_it · log π_θ(token_it): the policy gradient of the toy policy."""
    return jax.grad(lambda t: jnp.mean(jnp.sum(advantages * token_logp(t, z), axis=1)))(theta)


def make_gradient_fns(spec, theta):
    def graph_gradient(phi, half):
        out = compute_credit(half["graph"], phi, half["tokens"], half["mask"], spec=spec,
                             settings=SETTINGS)
        return surrogate_gradient(theta, out.token_advantages, half["z"])

    def outcome_gradient(half):
        out = compute_credit(half["graph"], jnp.zeros(spec.num_edges), half["tokens"], half["mask"],
                             spec=spec, settings=OUTCOME)
        return surrogate_gradient(theta, out.token_advantages, half["z"])

    return graph_gradient, outcome_gradient


def np_policy_gradient(theta, advantages, z):
    """Σ_v Σ_i A_iv (e_{z_iv} - π_v) / N for a tabular softmax, written out."""
    theta = np.asarray(theta, np.float64)
    probs = np.exp(theta) / np.exp(theta).sum(1, keepdims=True)
    grad = np.zeros_like(theta)
    for i in range(z.shape[0]):
        for v in range(z.shape[1]):
            grad[v] += advantages[i, v] * (np.eye(K)[z[i, v]] - probs[v])
    return grad / z.shape[0]


def np_cosine(a, b):
    return float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_alignment_objective_is_the_cross_fitted_cosine(spec, toy):
    theta, rollouts = toy
    first, second = controller.split_prompt_halves(rollouts, GROUP)
    assert first["z"].shape[0] == second["z"].shape[0] == 8
    halves = (encode_half(spec, first), encode_half(spec, second))
    graph_gradient, outcome_gradient = make_gradient_fns(spec, theta)
    phi = jnp.asarray(spec.phi_init, jnp.float32)
    objective = controller.alignment_objective(phi, graph_gradient, outcome_gradient, halves)

    grads = {}
    for name, half in zip(("first", "second"), halves):
        for settings, key in ((SETTINGS, "graph"), (OUTCOME, "outcome")):
            out = compute_credit(half["graph"], phi, half["tokens"], half["mask"], spec=spec,
                                 settings=settings)
            advantages = np.asarray(out.token_advantages)
            grads[key, name] = np_policy_gradient(theta, advantages, np.asarray(half["z"]))
    expected = 0.5 * (np_cosine(grads["graph", "first"], grads["outcome", "second"])
                      + np_cosine(grads["graph", "second"], grads["outcome", "first"]))
    np.testing.assert_allclose(objective, expected, atol=1e-5)
    # On the same half, φ = 1 reproduces GRPO's gradient: the trivial optimum cross-fitting avoids.
    same = controller.cosine_similarity(graph_gradient(jnp.ones(6), halves[0]),
                                        outcome_gradient(halves[0]))
    np.testing.assert_allclose(same, 1.0, atol=1e-6)


def test_alignment_mode_ascends_the_objective(spec, toy):
    theta, rollouts = toy
    halves = tuple(encode_half(spec, h) for h in controller.split_prompt_halves(rollouts, GROUP))
    graph_gradient, outcome_gradient = make_gradient_fns(spec, theta)
    negative_objective = jax.jit(jax.value_and_grad(
        lambda phi: -controller.alignment_objective(phi, graph_gradient, outcome_gradient, halves)))
    settings = controller.ControllerSettings("alignment", 0.02, 0.0, "adam", spec.edge_names)
    state = controller.init_controller(spec, settings)
    start, _ = negative_objective(state.phi)
    for _ in range(5):
        value, grads = negative_objective(state.phi)
        assert np.all(np.isfinite(grads))
        state, metrics = controller.controller_update(state, grads, settings)
    end, _ = negative_objective(state.phi)
    assert -end > -start + 1e-4
    assert np.all((state.phi >= 0) & (state.phi <= 1)) and int(state.step) == 5


def test_cosine_is_zero_with_finite_gradient_at_zero():
    cosine_to_ones = lambda a: controller.cosine_similarity({"w": a}, {"w": jnp.ones(3)})
    value, grad = jax.value_and_grad(cosine_to_ones)(jnp.zeros(3))
    assert float(value) == 0.0 and np.all(np.isfinite(grad))


def test_split_needs_two_groups():
    with pytest.raises(ValueError, match="needs >= 2 whole groups of 4"):
        controller.split_prompt_halves({"x": np.zeros(4)}, 4)
