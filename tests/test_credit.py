"""Graph credit: hand-worked examples, identities with GRPO, a numpy reference, padding, gradients.

Default-graph batches are all encoded to the same padded shapes (MAX_ROLLOUTS rollouts, T tokens), so
each jitted setting compiles once for the whole module.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np
import pytest

from graphgrpo_jax.graph import credit
from graphgrpo_jax.graph.credit import CreditSettings, compute_credit
from graphgrpo_jax.graph.spec import default_graph_config, encode_rollouts, graph_spec

MAX_ROLLOUTS, T = 12, 10
SQRT3 = np.sqrt(3.0)

GRAPH = CreditSettings(eps=0.0)  # consumer evidence (the default config), exact division
RULE = CreditSettings(evidence="rule_consistency", eps=0.0)
NODE_NORM = CreditSettings(norm="node", eps=0.0)
OUTCOME = CreditSettings(variant="outcome", eps=0.0)
CHAIN = CreditSettings(variant="chain_process", eps=0.0)
PATH = CreditSettings(variant="path_scaled", eps=0.0)


def chain_spec():
    return graph_spec(dict(nodes=("s1", "s2", "y"), root="y", edges=("y->s2", "s2->s1"),
                           phi_init={"y->s2": 0.5, "s2->s1": 0.5}))


def diamond_spec():
    """`a` is read by both b and c (two incoming edges); b and c feed a two-input label rule."""
    edges = ("y->b", "y->c", "b->a", "c->a")
    return graph_spec(dict(
        nodes=("a", "b", "c", "y"), root="y", edges=edges, phi_init={e: 1.0 for e in edges},
        categorical={"b": ("ok", "bad"), "c": ("ok", "bad", "odd"), "y": ("good", "poor")},
        rule_inputs=("b", "c"), label_rule=(("ok", "ok", "good"), ("*", "*", "poor"))))


@pytest.fixture(scope="module")
def spec():
    return graph_spec(default_graph_config())


def run(spec, settings, rewards, values, group_size, *, phi=None, gold=None, tokens=None, mask=None,
        max_rollouts=MAX_ROLLOUTS):
    """compute_credit on a batch padded to fixed shapes; outputs cut back to the real rollouts."""
    rewards, values = np.asarray(rewards, np.float32), np.asarray(values)
    n = rewards.shape[0]
    graph = encode_rollouts(spec, rewards, values, gold, group_size, max_rollouts=max_rollouts)
    phi = jnp.asarray(spec.phi_init if phi is None else phi, jnp.float32)
    ids = np.full((max_rollouts, T), -1, np.int32)
    keep = np.zeros((max_rollouts, T), bool)
    if tokens is not None:
        ids[:n, :tokens.shape[1]], keep[:n, :tokens.shape[1]] = tokens, mask
    out = compute_credit(graph, phi, jnp.asarray(ids), jnp.asarray(keep), spec=spec, settings=settings)
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[:n] if np.ndim(x) else np.asarray(x), out)


# ------------------------------------------------------------------------------ hand-worked examples


def test_three_node_chain_by_hand():
    spec = chain_spec()  # y -> s2 -> s1, φ = 0.5 on both edges
    rewards = [1, 1, 0, 0]  # mean 1/2, unbiased std 1/√3: A = (c - mean c)·√3 under outcome norm
    values = [[5, 0, 0], [6, 0, 0], [5, 0, 1], [6, 1, 3]]  # columns s1, s2, y
    # ℓ_s2: value 0 in rollouts 0,1,2 -> (1+1+0)/3 = 2/3; value 1 -> 0.
    # ℓ_s1: value 5 in rollouts 0,2 -> 1/2; value 6 in rollouts 1,3 -> 1/2.
    # c_s2 = ½ℓ_s2 + ½R = [5/6, 5/6, 1/3, 0]            (mean 1/2)
    # c_s1 = ½ℓ_s1 + ½c_s2 = [2/3, 2/3, 5/12, 1/4]        (mean 1/2)
    credits = np.array([[2 / 3, 5 / 6, 1], [2 / 3, 5 / 6, 1], [5 / 12, 1 / 3, 0], [1 / 4, 0, 0]])
    centred = credits - 0.5
    tokens = np.array([[-1, -1, 0, 0, 1, 2, -1, -1]] * 4)  # prompt, s1, s1, s2, y, free text, pad
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 0]] * 4, bool)
    with jax.disable_jit():
        out = run(spec, GRAPH, rewards, values, 4, tokens=tokens, mask=mask, max_rollouts=4)
        np.testing.assert_allclose(out.node_credits, credits, atol=1e-6)
        np.testing.assert_allclose(out.node_advantages, centred * SQRT3, atol=1e-6)
        a = centred * SQRT3
        expected_tokens = np.stack([[0, 0, r[0], r[0], r[1], r[2], r[2], 0] for r in a])
        np.testing.assert_allclose(out.token_advantages[:, :8], expected_tokens, atol=1e-6)

        # node norm: std of c_s2 = std of [5/6, 5/6, 1/3, 0] = 1/√6 (sum of squares 1/2, over 3);
        # c_s1 = 1/4 + c_s2/2 is affine in c_s2, so it normalises to the same numbers.
        out = run(spec, NODE_NORM, rewards, values, 4, max_rollouts=4)
        node = np.array([np.sqrt(6) / 3, np.sqrt(6) / 3, -np.sqrt(6) / 6, -np.sqrt(6) / 2])
        np.testing.assert_allclose(out.node_advantages, np.stack([node, node, centred[:, 2] * SQRT3], 1),
                                   atol=1e-6)

        # chain_process: s1 gets A_s1 + A_s2 + A_y, s2 gets A_s2 + A_y.
        out = run(spec, CHAIN, rewards, values, 4, max_rollouts=4)
        np.testing.assert_allclose(out.node_advantages,
                                   np.stack([a.sum(1), a[:, 1] + a[:, 2], a[:, 2]], 1), atol=1e-6)

        # path_scaled: w_y = 1, w_s2 = 1/2, w_s1 = 1/4 times Â = (R - 1/2)·√3.
        out = run(spec, PATH, rewards, values, 4, max_rollouts=4)
        np.testing.assert_allclose(out.node_advantages, np.outer(a[:, 2], [0.25, 0.5, 1]), atol=1e-6)
        np.testing.assert_allclose(out.node_credits, np.outer(rewards, [0.25, 0.5, 1]), atol=1e-6)


def default_graph_example(spec):
    """One prompt, 4 rollouts on the 7-node graph (columns qs qa ps pa ms ma y)."""
    rewards = [1, 1, 0, 0]
    values = np.array([
        [10, 20, 30, 40, 0, 0, 0],  # ms match, ma match, y Exact
        [10, 21, 30, 41, 0, 1, 0],  # ms match, ma partial
        [11, 21, 30, 42, 0, 1, 1],  # ms match, ma partial
        [12, -1, 30, 43, 3, 1, 3],  # ms mismatch, ma partial, qa missing
    ])
    return rewards, values


def test_default_graph_by_hand(spec):
    rewards, values = default_graph_example(spec)
    # Consumer evidence: φ(y->ms) = φ(y->ma) = 0, readings φ = 1, κ = 0.
    # ℓ_ms: match in rollouts 0,1,2 -> 2/3; mismatch -> 0.      c_ms = [2/3, 2/3, 2/3, 0], mean 1/2
    # ℓ_ma: match in rollout 0 -> 1; partial in 1,2,3 -> 1/3.  c_ma = [1, 1/3, 1/3, 1/3], mean 1/2
    # readings copy their match node (qs, ps <- ms; qa, pa <- ma); c_y = R.
    c_ms, c_ma = np.array([2 / 3, 2 / 3, 2 / 3, 0]), np.array([1, 1 / 3, 1 / 3, 1 / 3])
    r = np.array(rewards, float)
    credits = np.stack([c_ms, c_ma, c_ms, c_ma, c_ms, c_ma, r], 1)
    # Outcome norm: divide by std R = 1/√3. qa is missing in rollout 3: advantage 0 there.
    advantages = (credits - 0.5) * SQRT3
    advantages[3, 1] = 0.0
    tokens = np.array([[-1, 0, 1, 2, 3, 4, 5, 6, -1, -1]] * 4)
    mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]] * 4, bool)
    out = run(spec, GRAPH, rewards, values, 4, tokens=tokens, mask=mask)
    np.testing.assert_allclose(out.node_credits, credits, atol=1e-6)
    np.testing.assert_allclose(out.node_advantages, advantages, atol=1e-6)
    zero = np.zeros((4, 1))
    expected_tokens = np.concatenate([zero, advantages, advantages[:, 6:], zero], 1)
    np.testing.assert_allclose(out.token_advantages, expected_tokens, atol=1e-6)
    # Logs: qa counts in rollouts 0-2 only: mean of (1/2, -1/6, -1/6)·√3 = √3/18.
    np.testing.assert_allclose(out.node_stats["credit/adv_mean/qa"], SQRT3 / 18, atol=1e-6)
    np.testing.assert_allclose(out.node_stats["credit/adv_min/ms"], -SQRT3 / 2, atol=1e-6)
    np.testing.assert_allclose(out.node_stats["credit/adv_max/y"], SQRT3 / 2, atol=1e-6)
    np.testing.assert_allclose(out.node_stats["credit/adv_std/y"], SQRT3 / 2, atol=1e-6)


def test_rule_consistency_by_hand(spec):
    # Gold label Exact. (ms, ma) -> rule label: (match, match) Exact, right: R = 1;
    # (match, partial) Substitute, (complement, match) Complement, (mismatch, mismatch) Irrelevant.
    rewards = [1, 0, 0, 0]
    values = np.array([
        [1, 2, 3, 4, 0, 0, 0],
        [1, 2, 3, 4, 0, 1, 1],
        [1, 2, 3, 4, 2, 0, 2],
        [1, 2, 3, 4, 3, 2, 3],
    ])
    gold = [0, 0, 0, 0]
    # ms = match can give Exact (with ma = match); complement, mismatch cannot: ℓ_ms = [1, 1, 0, 0].
    # ma = match can (with ms = match); partial and mismatch never give Exact: ℓ_ma = [1, 0, 1, 0].
    # R: mean 1/4, unbiased std 1/2: A_ms = (ℓ_ms - 1/2)·2, A_ma = (ℓ_ma - 1/2)·2, A_y = (R - 1/4)·2.
    l_ms, l_ma, r = np.array([1.0, 1, 0, 0]), np.array([1.0, 0, 1, 0]), np.array(rewards, float)
    out = run(spec, RULE, rewards, values, 4, gold=gold)
    np.testing.assert_allclose(out.node_credits, np.stack([l_ms, l_ma, l_ms, l_ma, l_ms, l_ma, r], 1))
    a_ms, a_ma = 2 * (l_ms - 0.5), 2 * (l_ma - 0.5)
    a_y = 2 * (r - 0.25)
    np.testing.assert_allclose(out.node_advantages, np.stack([a_ms, a_ma, a_ms, a_ma, a_ms, a_ma, a_y], 1),
                               atol=1e-6)
    # With φ = 0.5 everywhere a reading mixes its inherited evidence with its consumer's credit:
    # c_ms = ½ℓ_ms + ½R = [1, 1/2, 0, 0]; c_qs = ½ℓ_qs + ½c_ms, ℓ_qs = ℓ_ms: [1, 3/4, 0, 0].
    out = run(spec, RULE, rewards, values, 4, gold=gold, phi=np.full(6, 0.5))
    np.testing.assert_allclose(out.node_credits[:, 4], [1, 0.5, 0, 0])
    np.testing.assert_allclose(out.node_credits[:, 0], [1, 0.75, 0, 0])


def test_format_failures_and_unparseable_spans(spec):
    rewards = [1, 0, -1, 0]  # rollout 2 failed to parse: r_format = -1, no node values
    values = np.array([[1, 2, 3, 4, 0, 0, 0], [1, 2, 3, 4, -1, 0, 1], [-1] * 7, [1, 2, 3, 4, 0, 0, 1]])
    tokens = np.array([[0, 4, 6, -1, -1, -1]] * 4)
    tokens[2] = -1  # no spans at all in the failed generation
    mask = np.ones((4, 6), bool)
    out = run(spec, GRAPH, rewards, values, 4, tokens=tokens, mask=mask)
    # Â = R / std(R): mean 0, unbiased variance 2/3.
    outcome = np.array(rewards, float) / np.sqrt(2 / 3)
    np.testing.assert_allclose(out.token_advantages[2, :6], np.full(6, outcome[2]), atol=1e-6)
    assert out.token_advantages[1, 1] == 0.0  # rollout 1's ms span did not parse: advantage 0
    np.testing.assert_allclose(out.node_advantages[:, 6], outcome, atol=1e-6)
    assert np.all(out.node_advantages[2, :6] == 0)


# ------------------------------------------------------------------------------- identities with GRPO


def np_grpo(rewards, group_size, eps=0.0):
    """Standard group-normalised GRPO advantages (TRL: unbiased std), 0 for a group without spread."""
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for start in range(0, rewards.size, group_size):
        group = rewards[start:start + group_size]
        if group.max() > group.min():
            out[start:start + group_size] = (group - group.mean()) / (group.std(ddof=1) + eps)
    return out


def random_batch(spec, seed, num_groups=3, group_size=4, p_missing=0.15, tokens_on_missing=True):
    """Random values (small id ranges, so equal values occur), missing nodes, a format failure,
    a group without reward spread, random token spans and masks."""
    rng = np.random.default_rng(seed)
    n, v = num_groups * group_size, spec.num_nodes
    values = np.stack([rng.integers(0, len(vocab) if vocab else 3, n) for vocab in spec.categorical], 1)
    values[rng.random((n, v)) < p_missing] = -1
    rewards = rng.choice([0.0, 1.0], n)
    rewards[1], values[1] = -1.0, -1  # a format failure
    rewards[-group_size:] = 1.0  # the last group has no spread
    labels = spec.categorical[spec.root]
    gold = np.repeat(rng.integers(0, len(labels) if labels else 1, num_groups), group_size)
    tokens = rng.integers(-1, v, (n, T))
    if not tokens_on_missing:
        tokens = np.where(np.take_along_axis(values, np.maximum(tokens, 0), 1) < 0, -1, tokens)
    start = rng.integers(0, 3, n)[:, None]
    stop = rng.integers(6, T + 1, n)[:, None]
    mask = (np.arange(T) >= start) & (np.arange(T) < stop)
    return rewards, values, gold, tokens, mask


def test_outcome_variant_is_grpo(spec):
    rewards, values, gold, tokens, mask = random_batch(spec, seed=1)
    out = run(spec, OUTCOME, rewards, values, 4, gold=gold, tokens=tokens, mask=mask)
    grpo = np_grpo(rewards, 4)
    np.testing.assert_allclose(out.token_advantages, np.where(mask, grpo[:, None], 0.0), atol=1e-6)
    np.testing.assert_allclose(out.node_advantages, np.repeat(grpo[:, None], 7, 1), atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_reaches_the_advantages(spec, scale):
    """`config.grpo.scale_rewards` as TRL defines it: the group's mean, divided by the group's std, the whole batch's,
    or nothing; a group without spread gets 0 in every mode. Outcome GRPO and graph credit (outcome norm)."""
    rewards, values, gold, tokens, mask = random_batch(spec, seed=7)
    grouped = rewards.reshape(-1, 4)
    centred = np.where((grouped.max(1) > grouped.min(1))[:, None], grouped - grouped.mean(1, keepdims=True), 0.0)
    denominator = {"group": grouped.std(1, ddof=1, keepdims=True), "batch": rewards.std(ddof=1), "none": 1.0}[scale]
    expected = (centred / np.where(centred == 0, 1.0, denominator)).reshape(-1)
    out = run(spec, dataclasses.replace(OUTCOME, scale_rewards=scale), rewards, values, 4, gold=gold)
    np.testing.assert_allclose(out.node_advantages[:, 0], expected, atol=1e-6)
    # Graph credit under outcome norm shares the denominator: its advantages scale with it, node by node.
    base = run(spec, GRAPH, rewards, values, 4, gold=gold).node_advantages
    scaled = run(spec, dataclasses.replace(GRAPH, scale_rewards=scale), rewards, values, 4, gold=gold).node_advantages
    group_std = grouped.std(1, ddof=1)
    ratio = np.where(group_std > 0, group_std, 1.0) / np.broadcast_to(denominator, (len(grouped), 1))[:, 0]
    ratio = np.repeat(np.where(group_std > 0, ratio, 1.0), 4)[:, None]  # zero-spread groups are 0 either way
    np.testing.assert_allclose(scaled, base * ratio, atol=1e-5)


def test_scale_rewards_other_than_group_is_refused_under_node_norm(spec):
    with pytest.raises(ValueError, match="scale_rewards"):
        credit.credit_settings(dict(variant="graph", evidence="group_value", kappa=1.0, norm="node", eps=1e-6),
                               spec, scale_rewards="batch")
    with pytest.raises(ValueError, match="scale_rewards"):
        credit.credit_settings(credit.default_credit_config(), spec, scale_rewards="bogus")


def setting_id(settings):
    return f"{settings.variant}-{settings.evidence}-{settings.norm}"


@pytest.mark.parametrize("settings", [GRAPH, RULE, NODE_NORM, PATH], ids=setting_id)
def test_phi_one_is_plain_grpo_on_every_token(spec, settings):
    # Missing nodes have no spans here: plain GRPO would credit them, graph credit gives them 0.
    rewards, values, gold, tokens, mask = random_batch(spec, seed=2, tokens_on_missing=False)
    outcome = run(spec, OUTCOME, rewards, values, 4, gold=gold, tokens=tokens, mask=mask)
    out = run(spec, settings, rewards, values, 4, gold=gold, tokens=tokens, mask=mask, phi=np.ones(6))
    np.testing.assert_allclose(out.token_advantages, outcome.token_advantages, atol=1e-6)


def test_phi_one_is_plain_grpo_with_two_incoming_edges():
    spec = diamond_spec()  # a's two incoming coefficients of 1 are scaled to 1/2 each
    rewards, values, gold, tokens, mask = random_batch(spec, seed=3, tokens_on_missing=False)
    with jax.disable_jit():
        outcome = run(spec, OUTCOME, rewards, values, 4, gold=gold, tokens=tokens, mask=mask)
        for settings in (GRAPH, RULE, NODE_NORM, PATH):
            out = run(spec, settings, rewards, values, 4, gold=gold, tokens=tokens, mask=mask,
                      phi=np.ones(4))
            np.testing.assert_allclose(out.token_advantages, outcome.token_advantages, atol=1e-6)


def test_chain_process_on_a_single_node_is_grpo():
    spec = graph_spec(dict(nodes=("y",), root="y", edges=(), phi_init={}))
    rewards, values, gold, tokens, mask = random_batch(spec, seed=4)
    with jax.disable_jit():
        out = run(spec, CHAIN, rewards, values, 4, tokens=tokens, mask=mask, phi=np.zeros(0))
    grpo = np_grpo(rewards, 4)
    np.testing.assert_allclose(out.token_advantages, np.where(mask, grpo[:, None], 0), atol=1e-6)


@pytest.mark.parametrize("settings", [GRAPH, NODE_NORM], ids=["outcome_norm", "node_norm"])
def test_own_evidence_with_shared_context_gives_grpo_direction(spec, settings):
    """METHOD.md A2': κ = 0, φ(y->ms) = 0, one context for the group's ms: the policy gradient of a
    tabular softmax over ms values under ms's graph advantages is GRPO's (node norm: rescaled)."""
    rng = np.random.default_rng(5)
    group = 8
    logits = rng.normal(size=4)
    probs = np.exp(logits) / np.exp(logits).sum()
    ms = rng.choice(4, group, p=probs)
    rewards = (rng.random(group) < np.array([0.9, 0.5, 0.3, 0.1])[ms]).astype(float)
    rewards[:2] = [1.0, 0.0]  # make sure the group has spread
    values = np.zeros((group, 7), np.int64)
    values[:, 4] = ms
    out = run(spec, settings, rewards, values, group)

    def policy_gradient(advantages):  # Σ_i A_i ∇ log softmax(θ)[z_i] = Σ_i A_i (e_{z_i} - π)
        return sum(a * (np.eye(4)[z] - probs) for a, z in zip(advantages, ms))

    graph_grad = policy_gradient(out.node_advantages[:, 4])
    grpo_grad = policy_gradient(np_grpo(rewards, group))
    cosine = graph_grad @ grpo_grad / np.linalg.norm(graph_grad) / np.linalg.norm(grpo_grad)
    np.testing.assert_allclose(cosine, 1.0, atol=1e-5)
    if settings.norm == "outcome":
        np.testing.assert_allclose(graph_grad, grpo_grad, atol=1e-5)
    else:  # std(R) / std(ℓ) >= 1: only a larger step
        assert np.linalg.norm(graph_grad) >= np.linalg.norm(grpo_grad) - 1e-6


# --------------------------------------------------------------------------------- numpy reference


def np_rule_label(rule, inputs):
    for row in rule:
        if all(cell in ("*", value) for cell, value in zip(row[:-1], inputs)):
            return row[-1]
    return None


def np_reference(spec, rewards, values, gold, group_size, phi, settings, tokens, mask):
    """METHOD.md A2 written out with loops over groups, rollouts and nodes, in float64."""
    n, v_count = values.shape
    edges = list(zip(spec.senders, spec.receivers))
    consumers = {v: [(e, u) for e, (u, w) in enumerate(edges) if w == v] for v in range(v_count)}
    raw_in = {v: sum(phi[e] for e, _ in consumers[v]) for v in range(v_count)}
    eff = {e: phi[e] / max(1.0, raw_in[w]) for e, (_, w) in enumerate(edges)}
    order = []
    while len(order) < v_count:
        order += [v for v in range(v_count)
                  if v not in order and all(u in order for _, u in consumers[v])]

    def later(v):
        found = {v}
        for _, u in consumers[v]:
            found |= later(u)
        return found

    labels, root = spec.categorical[spec.root], spec.root
    vocabs = [spec.categorical[k] for k in spec.rule_inputs]
    credits, advantages = np.zeros((n, v_count)), np.zeros((n, v_count))
    for start in range(0, n, group_size):
        rows = slice(start, start + group_size)
        r, z = rewards[rows].astype(np.float64), values[rows]
        spread = r.max() > r.min()
        std_r = r.std(ddof=1)
        a_hat = (r - r.mean()) / (std_r + settings.eps) if spread else np.zeros_like(r)
        ell, c = np.zeros((group_size, v_count)), np.zeros((group_size, v_count))
        for i in range(group_size):
            for v in order:
                if v == root:
                    ell[i, v] = r[i]
                elif settings.evidence == "group_value":
                    same = z[:, v] == z[i, v]
                    ell[i, v] = r[i] if z[i, v] < 0 else (
                        (r[same].sum() + settings.kappa * r.mean()) / (same.sum() + settings.kappa))
                elif v in spec.rule_inputs:
                    k, g = spec.rule_inputs.index(v), gold[start + i]
                    if z[i, v] < 0 or g < 0:
                        ell[i, v] = r[i]
                    else:
                        ell[i, v] = float(any(
                            np_rule_label(spec.label_rule, combo) == labels[g]
                            for combo in itertools.product(*vocabs) if combo[k] == vocabs[k][z[i, v]]))
                else:
                    ell[i, v] = np.mean([ell[i, u] for _, u in consumers[v]])
                incoming = sum(eff[e] for e, _ in consumers[v])
                c[i, v] = r[i] if v == root else (
                    (1 - incoming) * ell[i, v] + sum(eff[e] * c[i, u] for e, u in consumers[v]))
        counted = (z >= 0) | (np.arange(v_count) == root)
        if settings.variant == "outcome":
            credits[rows], advantages[rows] = r[:, None], a_hat[:, None]
            continue
        if settings.variant == "path_scaled":
            w = np.zeros(v_count)
            for v in order:
                w[v] = 1.0 if v == root else sum(eff[e] * w[u] for e, u in consumers[v])
            credits[rows], advantages[rows] = r[:, None] * w, a_hat[:, None] * w * counted
            continue
        a = np.zeros_like(c)
        for v in range(v_count):
            std_c = c[:, v].std(ddof=1)
            scale, ok = (std_r, spread) if settings.norm == "outcome" else (
                std_c, spread and c[:, v].max() > c[:, v].min())
            if ok:
                a[:, v] = (c[:, v] - c[:, v].mean()) / (scale + settings.eps)
        a *= counted
        if settings.variant == "chain_process":
            a = np.stack([a[:, sorted(later(v))].sum(1) for v in range(v_count)], 1) * counted
        if settings.variant == "pure_min":  # the least advantage of the node and its later steps that are present
            a = np.array([[min(a[i, w] for w in later(v) if counted[i, w]) if counted[i, v] else 0.0
                           for v in range(v_count)] for i in range(group_size)])
        credits[rows], advantages[rows] = c, a
    token_adv = np.zeros(tokens.shape)
    for i, t in zip(*np.nonzero(mask)):
        token_adv[i, t] = advantages[i, root if tokens[i, t] < 0 else tokens[i, t]]
    return credits, advantages, token_adv


# `outcome` and `path_scaled` read neither evidence nor norm: one setting each covers them.
GRID = [CreditSettings(variant=variant, evidence=evidence, norm=norm, kappa=0.5, eps=1e-3)
        for variant in ("graph", "chain_process", "pure_min") for evidence in credit.EVIDENCE_MODES
        for norm in credit.NORM_MODES] + [
        CreditSettings(variant=variant, kappa=0.5, eps=1e-3) for variant in ("outcome", "path_scaled")]


@pytest.mark.parametrize("make_spec", [lambda: graph_spec(default_graph_config()), diamond_spec],
                         ids=["default_graph", "diamond"])
def test_every_setting_matches_the_numpy_reference(make_spec):
    spec = make_spec()
    rng = np.random.default_rng(6)
    phi = rng.uniform(0.0, 1.0, spec.num_edges)
    if spec.num_nodes == 4:
        phi[2:] = [0.9, 0.8]  # a's incoming coefficients sum above 1: scaled
    batch = random_batch(spec, seed=7)
    rewards, values, gold, tokens, mask = batch
    with jax.disable_jit():  # one pass of the same code per setting; the jitted path is checked below
        for settings in GRID:
            out = run(spec, settings, rewards, values, 4, gold=gold, tokens=tokens, mask=mask, phi=phi)
            expected = np_reference(spec, rewards, values, gold, 4, phi, settings, tokens, mask)
            for got, want in zip((out.node_credits, out.node_advantages, out.token_advantages), expected):
                np.testing.assert_allclose(got, want, atol=2e-5, err_msg=str(settings))


@pytest.mark.parametrize("settings", [GRAPH, RULE, OUTCOME, CHAIN, PATH, NODE_NORM], ids=setting_id)
def test_jitted_matches_the_numpy_reference(spec, settings):
    rewards, values, gold, tokens, mask = random_batch(spec, seed=8)
    phi = np.random.default_rng(8).uniform(0.0, 1.0, 6)
    out = run(spec, settings, rewards, values, 4, gold=gold, tokens=tokens, mask=mask, phi=phi)
    expected = np_reference(spec, rewards, values, gold, 4, phi, settings, tokens, mask)
    for got, want in zip((out.node_credits, out.node_advantages, out.token_advantages), expected):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_padding_changes_nothing(spec):
    rewards, values, gold, tokens, mask = random_batch(spec, seed=9)
    base = run(spec, GRAPH, rewards, values, 4, gold=gold, tokens=tokens, mask=mask)
    # jraph's own padding, with extra nodes, edges and graphs, on top of a tight encoding: the padding
    # graph's zero features (group 0, value 0) must not leak into group 0.
    tight = jraph.unpad_with_graphs(encode_rollouts(spec, rewards, values, gold, 4))
    padded = jraph.pad_with_graphs(tight, n_node=12 * 7 + 9, n_edge=12 * 6 + 5, n_graph=12 + 3)
    out = compute_credit(padded, jnp.asarray(spec.phi_init), jnp.asarray(tokens), jnp.asarray(mask),
                         spec=spec, settings=GRAPH)
    np.testing.assert_allclose(out.token_advantages, base.token_advantages, atol=1e-6)
    np.testing.assert_allclose(out.node_credits, base.node_credits, atol=1e-6)
    # Fewer rollouts than the padded size: the first group alone gives the same numbers for it.
    alone = run(spec, GRAPH, rewards[:4], values[:4], 4, gold=gold[:4], tokens=tokens[:4], mask=mask[:4])
    np.testing.assert_allclose(alone.token_advantages, base.token_advantages[:4], atol=1e-6)


# -------------------------------------------------------------------------------------- gradients


@jax.jit(static_argnames=("spec", "settings"))
def loss_and_grad(phi, graph, tokens, mask, weights, *, spec, settings):
    """A scalar that depends on every token advantage, Σ weights · A_tokens, and its φ-gradient."""

    def loss(p):
        out = compute_credit(graph, p, tokens, mask, spec=spec, settings=settings)
        return jnp.sum(out.token_advantages * weights)

    return jax.value_and_grad(loss)(phi)


def encoded(spec, batch):
    rewards, values, gold, tokens, mask = batch
    graph = encode_rollouts(spec, rewards, values, gold, 4, max_rollouts=MAX_ROLLOUTS)
    return graph, jnp.asarray(tokens), jnp.asarray(mask)


RULE_NODE_NORM = CreditSettings(evidence="rule_consistency", norm="node", eps=0.0)


def test_groups_without_reward_spread_have_zero_finite_gradients(spec):
    # Rule evidence varies inside a group even when every rollout is wrong; node norm divides by
    # the spread of credits: both must still give exactly zero, with finite gradients.
    settings = RULE_NODE_NORM
    rng = np.random.default_rng(10)
    rewards = np.zeros(MAX_ROLLOUTS)  # every group wrong: rule evidence still varies
    values = rng.integers(0, 3, (MAX_ROLLOUTS, 7))
    values[:, 4:6] = rng.integers(0, 2, (MAX_ROLLOUTS, 2))
    tokens = rng.integers(-1, 7, (MAX_ROLLOUTS, T))
    batch = (rewards, values, np.zeros(MAX_ROLLOUTS, int), tokens, np.ones((MAX_ROLLOUTS, T), bool))
    weights = jnp.asarray(rng.normal(size=(MAX_ROLLOUTS, T)), jnp.float32)
    value, grad = loss_and_grad(jnp.full(6, 0.5), *encoded(spec, batch), weights, spec=spec,
                                settings=settings)
    assert value == 0.0
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("settings", [GRAPH, RULE_NODE_NORM], ids=setting_id)
def test_gradient_matches_finite_differences_of_the_reference(spec, settings):
    batch = random_batch(spec, seed=11)
    rng = np.random.default_rng(11)
    weights = rng.normal(size=(MAX_ROLLOUTS, T))
    phi = rng.uniform(0.2, 0.8, 6)
    _, grad = loss_and_grad(jnp.asarray(phi, jnp.float32), *encoded(spec, batch),
                            jnp.asarray(weights, jnp.float32), spec=spec, settings=settings)

    def reference_loss(p):
        return np.sum(np_reference(spec, *batch[:3], 4, p, settings, *batch[3:])[2] * weights)

    h = 1e-5
    numeric = [(reference_loss(phi + h * e) - reference_loss(phi - h * e)) / (2 * h) for e in np.eye(6)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)
    assert np.any(np.abs(numeric) > 1e-2)  # the check is not vacuous


# ---------------------------------------------------------------------------------- config surface


def test_paper_faithful_is_one_override_away():
    config = ml_collections.ConfigDict(
        dict(graph=default_graph_config(), credit=credit.default_credit_config()))
    spec = graph_spec(config.graph)
    assert credit.credit_settings(config.credit, spec) == CreditSettings()
    config.update_from_flattened_dict(credit.credit_preset("paper_faithful"))
    spec = graph_spec(config.graph)
    assert credit.credit_settings(config.credit, spec) == CreditSettings(norm="node", kappa=1.0)
    assert spec.phi_init == (0.5,) * 6
    config.update_from_flattened_dict(credit.credit_preset("default"))
    assert graph_spec(config.graph) == graph_spec(default_graph_config())
    with pytest.raises(ValueError, match="unknown credit preset 'best'"):
        credit.credit_preset("best")


@pytest.mark.parametrize("field, value, message", [
    ("variant", "magic",
     r"'variant' = 'magic': choose one of \('outcome', 'graph', 'chain_process', 'pure_min', 'path_scaled'"),
    ("evidence", "oracle", r"'evidence' = 'oracle'"),
    ("norm", "batch", r"'norm' = 'batch'"),
    ("kappa", -1.0, r"'kappa' = -1.0: must be >= 0"),
])
def test_bad_credit_config_names_the_field(spec, field, value, message):
    cfg = credit.default_credit_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=message):
        credit.credit_settings(cfg, spec)


def test_rule_consistency_needs_a_label_rule():
    cfg = credit.default_credit_config()
    cfg.evidence = "rule_consistency"
    with pytest.raises(ValueError, match="no label_rule"):
        credit.credit_settings(cfg, chain_spec())


def test_variants_are_a_registry(spec, monkeypatch):
    with pytest.raises(ValueError, match="'graph' is already registered"):
        credit.register_variant("graph")(lambda *args: None)
    monkeypatch.setattr(credit, "_VARIANTS", dict(credit._VARIANTS))

    @credit.register_variant("root_only")
    def root_only(ctx, phi, spec, settings):  # every token gets the root's graph advantage
        credits, advantages = credit._VARIANTS["graph"](ctx, phi, spec, settings)
        return credits, jnp.repeat(advantages[:, spec.root:spec.root + 1], spec.num_nodes, 1)

    cfg = credit.default_credit_config()
    cfg.variant = "root_only"
    settings = dataclasses.replace(credit.credit_settings(cfg, spec), eps=0.0)
    rewards, values = default_graph_example(spec)
    with jax.disable_jit():
        out = run(spec, settings, rewards, values, 4)
    grpo = np_grpo(rewards, 4)
    np.testing.assert_allclose(out.node_advantages, np.repeat(grpo[:, None], 7, 1), atol=1e-6)


def test_pure_min_bounds_every_node_by_its_own_graph_advantage_with_finite_phi_gradients(spec):
    """The minimum over the node and its later steps includes the node itself, so PURE-min never pays a node more
    than `graph` does, and exactly the same where the node is the root; missing nodes get 0, gradients stay finite."""
    rng = np.random.default_rng(12)
    rewards = rng.integers(0, 2, MAX_ROLLOUTS).astype(float)
    rewards[::4] = 1.0
    rewards[1::4] = 0.0  # every group has spread
    values = rng.integers(0, 3, (MAX_ROLLOUTS, 7))
    values[:, 4:6] = rng.integers(0, 2, (MAX_ROLLOUTS, 2))
    values[rng.random((MAX_ROLLOUTS, 7)) < 0.2] = -1  # some spans did not parse
    values[:, 6] = rng.integers(0, 4, MAX_ROLLOUTS)
    graph_out = run(spec, CreditSettings(variant="graph", eps=1e-3), rewards, values, 4)
    pure = run(spec, CreditSettings(variant="pure_min", eps=1e-3), rewards, values, 4)
    assert np.all(pure.node_advantages <= graph_out.node_advantages + 1e-6)
    np.testing.assert_allclose(pure.node_advantages[:, spec.root], graph_out.node_advantages[:, spec.root], atol=1e-6)
    missing = (values < 0) & (np.arange(7) != spec.root)
    assert np.all(pure.node_advantages[missing] == 0.0)
    tokens = rng.integers(-1, 7, (MAX_ROLLOUTS, T))
    batch = (rewards, values, np.zeros(MAX_ROLLOUTS, int), tokens, np.ones((MAX_ROLLOUTS, T), bool))
    weights = jnp.asarray(rng.normal(size=(MAX_ROLLOUTS, T)), jnp.float32)
    _, grad = loss_and_grad(jnp.full(6, 0.5), *encoded(spec, batch), weights, spec=spec,
                            settings=CreditSettings(variant="pure_min", eps=1e-3))
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0.0)
