"""The KV-cache sampler against greedy decoding by full recomputation, teacher-forced log-probs, and numpy.

The model is the perturbed Qwen2 parity fixture: its logits are far from uniform, so greedy paths vary
and sampled tokens differ from greedy ones.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphgrpo_jax import sampling
from graphgrpo_jax.models import decoder, hf

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf_qwen2_tiny"
PROMPT_LEN, NEW_TOKENS, PAD = 8, 8, 0
NEVER = 10_000  # an EOS id outside the vocabulary: rows run to max_new_tokens
forward = jax.jit(decoder.forward, static_argnums=1)
token_log_probs = jax.jit(decoder.token_log_probs, static_argnums=1)


@pytest.fixture(scope="module")
def model():
    config = hf.config_from_hf(FIXTURE)
    return decoder.DecoderConfig.from_config(config), hf.load_params(FIXTURE, config)


@pytest.fixture(scope="module")
def prompts():
    """Three left-padded prompts with 8, 5 and 2 real tokens."""
    tokens = np.random.default_rng(0).integers(1, 128, size=(3, PROMPT_LEN)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    for row, length in enumerate((8, 5, 2)):
        tokens[row, :PROMPT_LEN - length], mask[row, :PROMPT_LEN - length] = PAD, False
    return tokens, mask


@pytest.fixture(scope="module")
def greedy_by_recompute(model, prompts):
    """Greedy completions computed the slow way: a full forward over the whole sequence per new token."""
    config, params = model
    tokens, mask = prompts
    sequence = np.concatenate([tokens, np.full((3, NEW_TOKENS), PAD, np.int32)], axis=1)
    sequence_mask = np.concatenate([mask, np.zeros((3, NEW_TOKENS), bool)], axis=1)
    for step in range(NEW_TOKENS):
        logits = np.asarray(forward(params, config, sequence, sequence_mask))
        sequence[:, PROMPT_LEN + step] = logits[:, PROMPT_LEN + step - 1].argmax(-1)
        sequence_mask[:, PROMPT_LEN + step] = True
    return sequence[:, PROMPT_LEN:]


def generate(model, prompts, rng=0, eos=NEVER, group_size=1, **knobs):
    config, params = model
    tokens, mask = prompts
    return sampling.generate(params, config, jnp.asarray(tokens), mask, jax.random.key(rng),
                             max_new_tokens=NEW_TOKENS, eos_ids=eos, pad_id=PAD,
                             sampling=sampling.SamplingParams(**knobs), group_size=group_size)


@pytest.mark.parametrize("unrolled", [False, True], ids=["scanned", "unrolled"])
def test_greedy_matches_recomputation_and_log_probs_match_teacher_forcing(model, prompts, greedy_by_recompute,
                                                                          unrolled):
    config, params = model
    if unrolled:  # per-layer params and caches in the decode loop (`DecoderConfig.unrolled`)
        model = dataclasses.replace(config, scan_unroll=config.num_layers), params
    out = generate(model, prompts, temperature=0.0)
    np.testing.assert_array_equal(out.tokens, greedy_by_recompute)
    assert len(set(np.asarray(out.tokens).ravel().tolist())) > 3  # varied paths, not one repeated token
    np.testing.assert_array_equal(out.lengths, [NEW_TOKENS] * 3)
    np.testing.assert_array_equal(out.truncated, [True] * 3)

    tokens, mask = prompts
    sequence = np.concatenate([tokens, np.asarray(out.tokens)], axis=1)
    sequence_mask = np.concatenate([mask, np.ones((3, NEW_TOKENS), bool)], axis=1)
    teacher_forced = np.asarray(token_log_probs(params, config, sequence, sequence_mask))[:, PROMPT_LEN:]
    np.testing.assert_allclose(out.log_probs, teacher_forced, atol=1e-5)


def test_rows_stop_at_their_first_eos(model, prompts, greedy_by_recompute):
    config, params = model
    eos = int(greedy_by_recompute[0, 3])
    out = generate(model, prompts, temperature=0.0, eos=[NEVER, eos])
    stopped = 0
    for row, reference in enumerate(greedy_by_recompute):
        hits = np.flatnonzero(reference == eos)
        length = hits[0] + 1 if hits.size else NEW_TOKENS
        stopped += bool(hits.size)
        assert out.lengths[row] == length
        assert bool(out.truncated[row]) == (not hits.size)
        np.testing.assert_array_equal(out.tokens[row, :length], reference[:length])
        np.testing.assert_array_equal(out.tokens[row, length:], PAD)
        np.testing.assert_array_equal(out.log_probs[row, length:], 0.0)
        assert np.all(np.asarray(out.log_probs[row, :length]) < 0)
    assert stopped >= 1


def test_sampling_is_reproducible_per_key(model, prompts, greedy_by_recompute):
    first, again, other = (generate(model, prompts, rng=rng) for rng in (1, 1, 2))
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.log_probs, again.log_probs)
    assert not np.array_equal(first.tokens, other.tokens)
    assert not np.array_equal(first.tokens, greedy_by_recompute)


@pytest.mark.parametrize("knobs", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-5)],
                         ids=["top_k=1", "top_p=1e-6", "temperature=1e-5"])
def test_degenerate_sampling_is_greedy(model, prompts, greedy_by_recompute, knobs):
    np.testing.assert_array_equal(generate(model, prompts, rng=3, **knobs).tokens, greedy_by_recompute)


def test_new_rng_or_knobs_do_not_recompile(model, prompts):
    generate(model, prompts, rng=4)
    sizes = sampling.prefill._cache_size(), sampling.decode._cache_size()
    generate(model, prompts, rng=5, temperature=0.7, top_k=5, top_p=0.9, eos=3)
    generate(model, prompts, rng=6, temperature=0.0)
    assert (sampling.prefill._cache_size(), sampling.decode._cache_size()) == sizes


def test_groups_of_one_prompt_are_prefilled_once_and_sample_as_whole_rows(model, prompts, greedy_by_recompute):
    """`group_size`: GRPO's G rows per prompt share one prefill; greedy rows follow the recomputed reference,
    sampled ones equal sampling the repeated rows one by one, and groups that differ are refused."""
    tokens, mask = prompts
    rows = np.repeat(tokens, 2, axis=0), np.repeat(mask, 2, axis=0)
    greedy = generate(model, rows, temperature=0.0, group_size=2)
    np.testing.assert_array_equal(greedy.tokens, np.repeat(greedy_by_recompute, 2, axis=0))
    shared, whole = (generate(model, rows, rng=7, group_size=g) for g in (2, 1))
    np.testing.assert_array_equal(shared.tokens, whole.tokens)
    np.testing.assert_allclose(shared.log_probs, whole.log_probs, atol=1e-5)
    assert not np.array_equal(shared.tokens[0], shared.tokens[1])  # one prompt, two different samples
    other = rows[0].copy()
    other[3, -1] += 1
    with pytest.raises(ValueError, match=r"groups \[1\] \(rows from 2\) are not identical"):
        generate(model, (other, rows[1]), group_size=2)
    with pytest.raises(ValueError, match="group_size 4 does not divide the 6"):
        generate(model, rows, group_size=4)


def test_right_padded_prompts_are_refused(model, prompts):
    tokens, mask = prompts
    right_padded = mask.copy()
    right_padded[1] = mask[1, ::-1]
    with pytest.raises(ValueError, match=r"left-padded.*rows \[1\] end in padding"):
        generate(model, (tokens, right_padded))


PROBS = np.array([0.15, 0.5, 0.1, 0.25])  # deliberately unsorted


@pytest.mark.parametrize("knobs, kept", [
    (dict(top_k=2), [1, 3]),
    (dict(top_p=0.7), [1, 3]),  # mass before each sorted token: 0, .5, .75, .9
    (dict(top_p=0.8), [0, 1, 3]),
    (dict(top_k=2, top_p=0.6), [1]),  # top-p sees the top-k-renormalised [2/3, 1/3]
    (dict(top_k=0, top_p=1.0), [0, 1, 2, 3]),
])
def test_filter_logits_keeps_the_right_tokens(knobs, kept):
    logits = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]
    filtered = np.asarray(sampling.filter_logits(logits, sampling.SamplingParams(**knobs)))[0]
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(filtered)), kept)
    np.testing.assert_allclose(filtered[kept], np.log(PROBS[kept]), rtol=1e-6)


def sorted_filter_reference(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Hugging Face's warpers in numpy for one row: sort, cut at the k-th value, then at the nucleus."""
    out = scaled.astype(np.float64)
    if 0 < top_k < out.size:
        out[out < np.sort(out)[-top_k]] = -np.inf
    if top_p < 1.0:
        ordered = -np.sort(-out)
        probs = np.exp(ordered - ordered[0]) / np.exp(ordered - ordered[0]).sum()
        before = np.cumsum(probs) - probs
        out[out < ordered[max(np.sum(before < top_p), 1) - 1]] = -np.inf
    return out


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_filter_logits_matches_a_sorting_reference(ties):
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=3.0, size=(96, 300)).astype(np.float32)
    if ties:
        logits = np.round(logits)  # many equal values at every threshold
    logits[:, :5] = -np.inf  # already-banned tokens stay banned
    for top_k, top_p, temperature in [(40, 1.0, 1.0), (0, 0.9, 0.7), (50, 0.95, 1.3), (1, 0.5, 1.0),
                                      (0, 0.05, 1.0), (299, 0.999, 2.0)]:
        filtered = np.asarray(sampling.filter_logits(
            jnp.asarray(logits), sampling.SamplingParams(temperature, top_k, top_p)))
        for row, scaled in zip(filtered, logits / np.float32(temperature)):
            expected = sorted_filter_reference(scaled, top_k, top_p)
            np.testing.assert_array_equal(np.isfinite(row), np.isfinite(expected),
                                          err_msg=f"top_k={top_k} top_p={top_p} T={temperature}")
            np.testing.assert_allclose(row[np.isfinite(row)], scaled[np.isfinite(row)], rtol=1e-6)


def test_first_max_index_is_argmax():
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=(64, 257))).astype(np.float32)  # ties: the first maximum wins
    x[5] = -np.inf
    np.testing.assert_array_equal(np.asarray(sampling.first_max_index(jnp.asarray(x))), np.argmax(x, axis=-1))


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_candidate_logits_match_the_sorting_reference_where_exact(ties):
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=3.0, size=(96, 300)).astype(np.float32)  # 300 tokens, 64 candidates
    if ties:
        logits = np.round(logits)
    logits[:, :5] = -np.inf
    # (knobs, rows reported exact without ties): k <= 64 always fits; k = 65 never; a wide nucleus does not.
    for top_k, top_p, temperature, exact_rows in [(40, 1.0, 1.0, 96), (64, 1.0, 1.0, 96), (50, 0.95, 1.3, 96),
                                                  (0, 0.9, 0.7, 96), (1, 0.5, 1.0, 96), (65, 0.9, 1.0, 0),
                                                  (0, 0.999, 2.0, 0)]:
        knobs = sampling.SamplingParams(temperature, top_k, top_p)
        candidates, ids, exact = map(np.asarray, sampling.candidate_logits(jnp.asarray(logits), knobs))
        if not ties:
            assert exact.sum() == exact_rows, (top_k, top_p, temperature)
        for row in np.flatnonzero(exact):
            scaled = logits[row] / np.float32(temperature)
            kept = np.full(scaled.shape, -np.inf)
            kept[ids[row]] = candidates[row]
            expected = sorted_filter_reference(scaled, top_k, top_p)
            np.testing.assert_array_equal(np.isfinite(kept), np.isfinite(expected),
                                          err_msg=f"row {row}: top_k={top_k} top_p={top_p} T={temperature}")
            np.testing.assert_allclose(kept[np.isfinite(kept)], scaled[np.isfinite(kept)], rtol=1e-6)


@pytest.mark.parametrize("top_k, over_candidates", [(50, True), (80, False)], ids=["candidates", "whole_vocab"])
def test_filtered_draws_over_either_path_follow_the_distribution(top_k, over_candidates):
    """100 tokens, 64 candidates: top-k 50 draws over the candidates, top-k 80 over the whole vocabulary."""
    draws = 40_000
    row = np.linspace(2.0, -2.0, 100).astype(np.float32)  # descending: the top k are the first k
    knobs = sampling.SamplingParams(jnp.float32(1.0), jnp.int32(top_k), jnp.float32(1.0))
    logits = jnp.tile(jnp.asarray(row), (draws, 1))
    assert bool(np.all(np.asarray(sampling.candidate_logits(logits[:1], knobs)[2]))) == over_candidates
    tokens = np.asarray(jax.jit(sampling.sample_tokens)(logits, jax.random.key(4), knobs))
    expected = np.exp(row[:top_k] - row[:top_k].max())
    frequencies = np.bincount(tokens, minlength=100) / draws
    np.testing.assert_array_equal(frequencies[top_k:], 0.0)
    np.testing.assert_allclose(frequencies[:top_k], expected / expected.sum(), atol=0.004)


def test_draws_follow_the_filtered_tempered_distribution():
    draws = 20_000
    logits = jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32)), (draws, 1))
    sample = jax.jit(sampling.sample_tokens)
    cases = [
        (sampling.SamplingParams(1.0, 3, 1.0), np.array([0.15, 0.5, 0.0, 0.25]) / 0.9),
        # Temperature 0.5 squares the probabilities: [.065, .725, .029, .181]; top-p 0.9 keeps the top two.
        (sampling.SamplingParams(0.5, 0, 0.9), np.array([0.0, 0.25, 0.0, 0.0625]) / 0.3125),
    ]
    for seed, (knobs, expected) in enumerate(cases):
        knobs = sampling.SamplingParams(*(jnp.asarray(x) for x in knobs))
        tokens = np.asarray(sample(logits, jax.random.key(seed), knobs))
        frequencies = np.bincount(tokens, minlength=4) / draws
        np.testing.assert_allclose(frequencies, expected, atol=0.015)
