"""The decoder's pieces against hand-worked numbers and numpy, and its invariances (padding, causality, cache).

Parity with Hugging Face's implementation lives in test_hf.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import MODEL_PRESETS, model_config
from graphgrpo_jax.models import decoder

CONFIG = decoder.DecoderConfig.from_config(model_config("tiny", vocab_size=128, max_seq_len=32))
LENGTH = 12  # every forward in this file has shape [2, LENGTH]: one compile
forward = jax.jit(decoder.forward, static_argnums=1)
token_log_probs = jax.jit(decoder.token_log_probs, static_argnums=1)
extend_cache = jax.jit(decoder.extend_cache, static_argnums=1)


@pytest.fixture(scope="module")
def params():
    return jax.jit(decoder.init_params, static_argnums=0)(CONFIG, jax.random.key(0))


def random_tokens(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=shape).astype(np.int32)


def test_config_from_every_preset_is_hashable_and_equal_by_value():
    for name in MODEL_PRESETS:
        config = decoder.DecoderConfig.from_config(model_config(name))
        assert hash(config) == hash(decoder.DecoderConfig.from_config(model_config(name)))
    assert decoder.DecoderConfig.from_config(model_config("qwen3-0.6b")).qk_norm


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        decoder.DecoderConfig.from_config(model_config("tiny", num_kv_heads=3))
    with pytest.raises(ValueError, match="arch='gpt2'"):
        decoder.DecoderConfig.from_config(model_config("tiny", arch="gpt2"))
    with pytest.raises(ValueError, match="scan_unroll=0"):
        decoder.DecoderConfig.from_config(model_config("tiny", scan_unroll=0))
    cfg = model_config("tiny")
    del cfg["mlp_dim"]
    with pytest.raises(ValueError, match="mlp_dim"):
        decoder.DecoderConfig.from_config(cfg)


def test_params_layout_and_logical_axes(params):
    L, D, H, K, Dh, F, V = 2, 64, 4, 2, 16, 128, 128
    attn = params["layers"]["self_attn"]
    assert params["embed_tokens"].shape == (V, D)
    assert attn["q_proj"]["kernel"].shape == (L, D, H, Dh)
    assert attn["q_proj"]["bias"].shape == (L, H, Dh)
    assert attn["k_proj"]["kernel"].shape == (L, D, K, Dh)
    assert attn["o_proj"]["kernel"].shape == (L, H, Dh, D)
    assert params["layers"]["mlp"]["down_proj"]["kernel"].shape == (L, F, D)
    assert "lm_head" not in params  # tied

    axes = decoder.param_logical_axes(CONFIG)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert tuple(axes["layers"]["self_attn"]["o_proj"]["kernel"]) == ("layers", "heads", "head_dim", "embed")
    assert tuple(axes["embed_tokens"]) == ("vocab", "embed")
    untied = dataclasses.replace(CONFIG, tie_embeddings=False, qkv_bias=False, qk_norm=True)
    untied_axes = decoder.param_logical_axes(untied)
    assert tuple(untied_axes["lm_head"]) == ("embed", "vocab")
    assert tuple(untied_axes["layers"]["self_attn"]["q_norm"]["scale"]) == ("layers", "head_dim")
    assert "bias" not in untied_axes["layers"]["self_attn"]["q_proj"]


def test_rope_rotates_pairs_half_a_head_apart():
    # head_dim 4, base 100: frequencies 1 and 0.1; HF's rotate-half pairs dims (0, 2) and (1, 3).
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    cos, sin = decoder.rope_tables(jnp.array([[2]]), head_dim=4, theta=100.0)
    got = np.asarray(decoder.apply_rope(jnp.asarray(x)[None, None, None], cos, sin))[0, 0, 0]
    a, b = 2.0, 0.2  # position 2 times each frequency
    want = [1 * np.cos(a) - 3 * np.sin(a), 2 * np.cos(b) - 4 * np.sin(b),
            3 * np.cos(a) + 1 * np.sin(a), 4 * np.cos(b) + 2 * np.sin(b)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_grouped_query_attention_matches_numpy_loop():
    rng = np.random.default_rng(0)
    B, T, S, H, K, Dh = 2, 3, 5, 4, 2, 8
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((B, T, H, Dh), (B, K, S, Dh), (B, K, S, Dh)))
    allowed = rng.random((B, T, S)) < 0.6
    allowed[:, :, 0] = True
    got = np.asarray(decoder.grouped_query_attention(q, k, v, allowed))
    want = np.zeros_like(got)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                kv = h // (H // K)
                scores = k[b, kv] @ q[b, t, h] / np.sqrt(Dh)
                scores = np.where(allowed[b, t], scores, -np.inf)
                probs = np.exp(scores - scores.max())
                want[b, t, h] = (probs / probs.sum()) @ v[b, kv]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_left_padding_does_not_change_real_positions(params):
    # Row 0 holds 7 tokens then junk after its end (causally invisible: the unpadded sequence);
    # row 1 holds the same 7 tokens after 5 columns of left padding.
    tokens = random_tokens(1, (2, LENGTH))
    tokens[1, 5:] = tokens[0, :7]
    mask = np.zeros_like(tokens, dtype=bool)
    mask[0, :7], mask[1, 5:] = True, True
    logits = np.asarray(forward(params, CONFIG, tokens, mask))
    assert logits[0, :7].std() > 0.1  # a meaningful signal, not a constant
    np.testing.assert_allclose(logits[1, 5:], logits[0, :7], atol=1e-5)


def test_future_tokens_do_not_change_past_logits(params):
    tokens = random_tokens(3, (2, LENGTH))
    mask = np.ones_like(tokens, dtype=bool)
    changed = tokens.copy()
    changed[:, 6] = (changed[:, 6] + 1) % CONFIG.vocab_size
    a, b = np.asarray(forward(params, CONFIG, tokens, mask)), np.asarray(forward(params, CONFIG, changed, mask))
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_token_log_probs_scores_next_tokens_and_zeroes_unconditioned_positions(params):
    tokens = random_tokens(4, (2, LENGTH))
    mask = np.ones_like(tokens, dtype=bool)
    first_real = {0: 3, 1: 6}
    for row, first in first_real.items():
        mask[row, :first] = False
    logits = np.asarray(forward(params, CONFIG, tokens, mask), np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    got = np.asarray(token_log_probs(params, CONFIG, tokens, mask))
    for row, first in first_real.items():
        want = [log_softmax[row, t - 1, tokens[row, t]] for t in range(first + 1, LENGTH)]
        np.testing.assert_allclose(got[row, first + 1:], want, atol=1e-5)
        np.testing.assert_array_equal(got[row, :first + 1], 0.0)  # padding and the context-free first token


def test_token_log_probs_from_a_position_skip_the_earlier_ones_only(params):
    """`targets_from` (completions only, as the RL loss scores): the same values from there on, 0 before."""
    tokens = random_tokens(5, (2, LENGTH))
    mask = np.ones_like(tokens, dtype=bool)
    mask[0, :3] = False
    full_logp, full_entropy = decoder.token_log_probs_and_entropy(params, CONFIG, tokens, mask)
    logp, entropy = decoder.token_log_probs_and_entropy(params, CONFIG, tokens, mask, targets_from=7)
    for got, want in ((logp, full_logp), (entropy, full_entropy)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got[:, 7:], want[:, 7:], atol=1e-5)
        np.testing.assert_array_equal(got[:, :7], 0.0)
    with pytest.raises(ValueError, match="targets_from = 0"):
        decoder.token_log_probs(params, CONFIG, tokens, mask, targets_from=0)


@pytest.mark.parametrize("scan_unroll", [1, CONFIG.num_layers])
def test_shared_prompts_score_like_whole_rows(params, scan_unroll):
    """`group_size`: each group's prompt block runs once, under the group's completions; log-probs, entropies
    and gradients equal scoring every row whole (left-padded prompts, completions of different lengths)."""
    group, prompt_len = 3, 5
    config = dataclasses.replace(CONFIG, scan_unroll=scan_unroll)
    prompt_mask = np.arange(prompt_len)[None, :] >= np.array([[2], [0]])
    completion_mask = np.arange(LENGTH - prompt_len)[None, :] < np.array([[7], [3], [1], [5], [7], [2]])
    tokens = np.concatenate([np.repeat(random_tokens(11, (2, prompt_len)), group, axis=0),
                             random_tokens(12, (2 * group, LENGTH - prompt_len))], axis=1)
    mask = np.concatenate([np.repeat(prompt_mask, group, axis=0), completion_mask], axis=1)
    weights = np.random.default_rng(13).normal(size=tokens.shape).astype(np.float32)

    def loss(params, group_size):
        logp, entropy = decoder.token_log_probs_and_entropy(params, config, tokens, mask, targets_from=prompt_len,
                                                            group_size=group_size)
        return jnp.sum(weights * (logp + 0.1 * entropy)), (logp, entropy)

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (whole_grads, whole), (shared_grads, shared) = grad(params, 1), grad(params, group)
    for got, want in zip(shared, whole):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.count_nonzero(np.asarray(whole[0])) == completion_mask.sum()  # every real completion token
    for a, b in zip(jax.tree_util.tree_leaves(shared_grads), jax.tree_util.tree_leaves(whole_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="group_size = 4"):
        decoder.token_log_probs(params, config, tokens, mask, targets_from=prompt_len, group_size=4)


@pytest.mark.parametrize("scan_unroll", [1, CONFIG.num_layers])
def test_prefill_then_single_steps_match_full_forward(params, scan_unroll):
    tokens = random_tokens(6, (2, LENGTH))
    mask = np.ones_like(tokens, dtype=bool)
    mask[0, :4], mask[1, :2] = False, False  # prompts of different lengths
    full = np.asarray(forward(params, CONFIG, tokens, mask))
    config = dataclasses.replace(CONFIG, scan_unroll=scan_unroll)
    prompt_len = 8
    cache = decoder.init_cache(config, batch_size=2, max_len=LENGTH)
    logits, cache = extend_cache(params, config, cache, tokens[:, :prompt_len], mask[:, :prompt_len])
    np.testing.assert_allclose(logits, full[:, prompt_len - 1], atol=1e-5)
    for t in range(prompt_len, LENGTH):
        logits, cache = extend_cache(params, config, cache, tokens[:, t:t + 1], mask[:, t:t + 1])
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5)
    assert int(cache.end) == LENGTH
    np.testing.assert_array_equal(cache.valid, mask)


def test_cache_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len=32"):
        decoder.init_cache(CONFIG, batch_size=1, max_len=33)


def test_bfloat16_model_returns_fp32_logits_close_to_fp32(params):
    config = dataclasses.replace(CONFIG, dtype="bfloat16", param_dtype="bfloat16")
    bf16_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = random_tokens(8, (2, LENGTH))
    mask = np.ones_like(tokens, dtype=bool)
    low = forward(bf16_params, config, tokens, mask)
    high = np.asarray(forward(params, CONFIG, tokens, mask))
    assert low.dtype == jnp.float32
    assert np.abs(np.asarray(low) - high).max() < 0.05 * np.abs(high).max()


@pytest.mark.parametrize("change", [dict(remat=True), dict(scan_unroll=CONFIG.num_layers)], ids=str)
def test_remat_and_unrolled_layers_give_the_same_gradients(params, change):
    """Execution knobs: recomputing layers, or unrolling the layer scan, leave the maths alone."""
    tokens = random_tokens(9, (2, LENGTH))
    mask = np.ones_like(tokens, dtype=bool)

    def loss(params, config):
        return -decoder.token_log_probs(params, config, tokens, mask).sum()

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    plain = grad(params, CONFIG)
    changed = grad(params, dataclasses.replace(CONFIG, **change))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(changed)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_chunked_scoring_equals_whole_logits(params):
    """Above the logits budget, positions are scored in chunks (11 positions in chunks of 4, the last one
    padded): same log-probs, entropies and gradients as scoring all positions at once."""
    tokens = random_tokens(10, (2, LENGTH))
    mask = np.ones_like(tokens, dtype=bool)
    mask[1, :3] = False

    def loss(params, budget):
        logp, entropy = decoder.token_log_probs_and_entropy(params, CONFIG, tokens, mask, logits_budget=budget)
        return -logp.sum() + 0.1 * entropy.sum(), (logp, entropy)

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    whole_grads, (whole_logp, whole_entropy) = grad(params, 2 ** 26)
    chunked_grads, (chunked_logp, chunked_entropy) = grad(params, 2 * 4 * CONFIG.vocab_size)
    np.testing.assert_allclose(chunked_logp, whole_logp, atol=1e-6)
    np.testing.assert_allclose(chunked_entropy, whole_entropy, atol=1e-6)
    assert np.all(np.asarray(whole_logp)[1, :4] == 0.0)
    for a, b in zip(jax.tree_util.tree_leaves(chunked_grads), jax.tree_util.tree_leaves(whole_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)
