"""Batched autoregressive sampling with a KV cache: a jitted prefill, then a `lax.while_loop` decode.

Params are a traced argument (a policy update never recompiles), the cache is donated to the decode
loop (updated in place), and the sampling knobs (temperature, top-k, top-p), the rng, the EOS ids and
the pad id are traced too: only the model config, the shapes and `max_new_tokens` are static.

Log-probabilities: `SampleOutput.log_probs` holds log π_θ(token | prefix) under the **raw model
distribution** (temperature 1, no top-k/top-p filtering), the distribution `decoder.token_log_probs`
scores, so they serve directly as the "old" log-probs of the RL ratio. They are not the log-probs of the
tempered, filtered distribution the tokens were drawn from.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from graphgrpo_jax.models import decoder


class SamplingParams(NamedTuple):
    """Traced sampling knobs. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float | jax.Array = 1.0
    top_k: int | jax.Array = 0
    top_p: float | jax.Array = 1.0


GREEDY = SamplingParams(temperature=0.0)


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B, N] int32; pad_id after a row's EOS
    log_probs: jax.Array  # [B, N] fp32 log-probs of `tokens` under the raw model (see module doc); 0 after EOS
    lengths: jax.Array  # [B] int32 tokens generated, the EOS included
    truncated: jax.Array  # [B] bool: reached max_new_tokens without an EOS


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of the float32 values x (-inf lowest): the float bits, sign-folded."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    bits = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.uint32) ^ jnp.uint32(0x80000000)


def _smallest_key(predicate, low: jax.Array, high: jax.Array) -> jax.Array:
    """Per row, the smallest uint32 key t in [low, high] with predicate(t), for a predicate that is
    monotone in t and true at `high` (not evaluated there). Bisection: 32 halvings cover every key."""
    def halve(_, bounds):
        low, high = bounds
        mid = low + (high - low) // 2
        holds = predicate(mid)
        return jnp.where(holds, low, mid + 1), jnp.where(holds, mid, high)

    return jax.lax.fori_loop(0, 32, halve, (low, high))[1]


def _scaled(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Logits divided by the temperature (by 1 when greedy)."""
    temperature = jnp.asarray(params.temperature, jnp.float32)
    return logits / jnp.where(temperature > 0, temperature, 1.0)


def _top_k_on(top_k: jax.Array, vocab: int) -> jax.Array:
    """Whether top-k removes any token of a `vocab`-token row (0 switches it off)."""
    return (top_k > 0) & (top_k < vocab)


def _filtering(params: SamplingParams, vocab: int) -> jax.Array:
    """Whether top-k or top-p removes any token."""
    return _top_k_on(jnp.asarray(params.top_k, jnp.int32), vocab) | (jnp.asarray(params.top_p, jnp.float32) < 1.0)


def _truncate(scaled: jax.Array, params: SamplingParams) -> jax.Array:
    """Tempered logits [B, V] with the tokens outside the top-k / top-p sets at -inf (see `filter_logits`)."""
    top_k = jnp.asarray(params.top_k, jnp.int32)
    top_p = jnp.asarray(params.top_p, jnp.float32)
    keys = _order_keys(scaled)
    lowest = jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32)
    highest = jnp.max(keys, axis=-1, keepdims=True)
    k_key = jax.lax.cond(
        _top_k_on(top_k, scaled.shape[-1]),
        lambda: _smallest_key(lambda t: jnp.sum(keys > t, axis=-1, keepdims=True) < top_k, lowest, highest),
        lambda: lowest)

    def nucleus_key():
        probs = jax.nn.softmax(jnp.where(keys >= k_key, scaled, -jnp.inf), axis=-1)
        mass_above = lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), axis=-1, keepdims=True)
        return _smallest_key(lambda t: mass_above(t) < top_p, k_key, highest)

    p_key = jax.lax.cond(top_p < 1.0, nucleus_key, lambda: k_key)
    return jnp.where(keys >= p_key, scaled, -jnp.inf)


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Logits [B, V] divided by the temperature, with tokens outside the top-k / top-p sets at -inf.

    Applied in Hugging Face's order (temperature, top-k, top-p), top-p on the top-k-renormalised
    distribution; top-p keeps the smallest prefix of the sorted tokens whose mass reaches p. Ties at a
    threshold are all kept.

    Why no sort: XLA:CPU sorts a [64, 2048] block in ~60 ms, which made every sampled decode step 10x a
    greedy one. Each threshold is instead found exactly by bisection over the 2^32 order-preserving keys
    of the float32 values (32 passes of compare-and-sum over [B, V]): top-k's is the k-th largest value,
    top-p's the smallest value whose strictly-larger mass is below p. Skipped when neither filter is on.
    """
    return jax.lax.cond(_filtering(params, logits.shape[-1]), functools.partial(_truncate, params=params),
                        lambda scaled: scaled, _scaled(logits, params))


CANDIDATES = 64  # the largest logits per row that a filtered draw looks at first (`candidate_logits`)


def candidate_logits(logits: jax.Array, params: SamplingParams,
                     num_candidates: int = CANDIDATES) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`filter_logits` on each row's `num_candidates` largest logits only: (filtered [B, C], their token
    ids [B, C], exact [B]). `exact` says that every token `filter_logits` keeps is a candidate, so a draw
    over the candidates has the same distribution; it holds when top-k is on with k ≤ C (and no ties at
    the k-th value spill past C), or when top-p alone finds its nucleus within the candidates.

    Why: the exact thresholds over the whole vocabulary take 64 bisection passes of [B, V] per decode
    step, and a Gumbel draw another [B, V]; here one `lax.top_k` does the [B, V] work, and the rest runs
    on [B, C]. A token's top-p test is the same as `filter_logits`'s: the top-k-renormalised mass of the
    strictly larger logits is below p. `lax.top_k`'s outputs are only read whole (the k-th value by a
    one-hot sum, the smallest by a min): XLA:CPU turns a top_k whose output is indexed or sliced other
    than from 0 into a full sort, ~35 ms of [64, 2048] against ~1.5 ms.
    """
    scaled = _scaled(logits, params)
    vocab = scaled.shape[-1]
    num_candidates = min(num_candidates, vocab)
    top_k = jnp.asarray(params.top_k, jnp.int32)
    top_p = jnp.asarray(params.top_p, jnp.float32)
    values, ids = jax.lax.top_k(scaled, num_candidates)  # descending
    k_on = _top_k_on(top_k, vocab)
    position = jax.lax.broadcasted_iota(jnp.int32, values.shape, 1)
    kth = jnp.sum(jnp.where(position == top_k - 1, values, 0.0), axis=-1, keepdims=True)
    kth = jnp.where(k_on, kth, -jnp.inf)
    kept_by_k = scaled >= kth  # [B, V]: ties at the k-th value are all kept
    keep = values >= kth
    # Top-p on the top-k-renormalised distribution: the mass of each candidate's strictly larger tokens,
    # which are all candidates (every other token is at most the smallest candidate).
    normaliser = jax.nn.logsumexp(jnp.where(kept_by_k, scaled, -jnp.inf), axis=-1, keepdims=True)
    probs = jnp.where(keep, jnp.exp(values - normaliser), 0.0)
    mass_above = jnp.sum(jnp.where(values[:, :, None] > values[:, None, :], probs[:, :, None], 0.0), axis=1)
    keep &= (top_p >= 1.0) | (mass_above < top_p)
    # Exact when no kept token lies outside: top-k's kept set fits, or (top-p alone) every outside token,
    # at most the smallest candidate, has at least the candidates above that one in front of it.
    k_fits = (top_k <= num_candidates) & (jnp.sum(kept_by_k, axis=-1) <= num_candidates)
    smallest = jnp.min(values, axis=-1, keepdims=True)
    nucleus_fits = jnp.sum(jnp.where(values > smallest, probs, 0.0), axis=-1) >= top_p
    exact = (num_candidates == vocab) | jnp.where(k_on, k_fits, nucleus_fits)
    return jnp.where(keep, values, -jnp.inf), ids, exact


def first_max_index(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first index of each row's maximum; rows without NaN) as two plain
    reductions, a max and a masked min. Why: XLA:CPU runs argmax's variadic (value, index) reduce without
    vectorising it, and in a sampled decode step that took ~2 ms of [64, 2048] against ~0.1 ms for these.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def sample_tokens(logits: jax.Array, rng: jax.Array, params: SamplingParams) -> jax.Array:
    """One token per row from logits [B, V]: argmax when temperature is 0, else a tempered, filtered draw.

    Draws are `jax.random.categorical`'s Gumbel-max trick, spelled out to use `first_max_index`. With
    top-k or top-p on, the draw is over `candidate_logits` when they are exact for every row, else over
    `filter_logits` of the whole vocabulary. `lax.cond`s, not selects: greedy decoding skips the filters
    and the Gumbel noise instead of computing and discarding them.
    """
    def gumbel_max(logits):
        return first_max_index(jax.random.gumbel(rng, logits.shape) + logits)

    def filtered(logits):
        candidates, ids, exact = candidate_logits(logits, params)
        over_candidates = lambda: jnp.take_along_axis(ids, gumbel_max(candidates)[:, None], axis=-1)[:, 0]
        over_vocabulary = lambda: gumbel_max(_truncate(_scaled(logits, params), params))
        return jax.lax.cond(jnp.all(exact), over_candidates, over_vocabulary)

    def draw(logits):
        unfiltered = lambda logits: gumbel_max(_scaled(logits, params))
        return jax.lax.cond(_filtering(params, logits.shape[-1]), filtered, unfiltered, logits)

    return jax.lax.cond(jnp.asarray(params.temperature) > 0, draw, first_max_index, logits)


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "group_size"))
def prefill(params: decoder.Params, config: decoder.DecoderConfig, prompt_tokens: jax.Array,
            prompt_mask: jax.Array, cache_len: int, group_size: int = 1) -> tuple[jax.Array, decoder.KVCache]:
    """Runs left-padded prompts [B, P] through a fresh cache of `cache_len` slots.

    Returns the logits [B, V] of each row's next token (the last column is real under left padding)
    and the cache. With `group_size` G > 1 the rows come in groups of G identical prompts (GRPO's G
    samples per prompt): each group's prompt runs once and its logits and cache rows are repeated.
    """
    prompt_tokens, prompt_mask = prompt_tokens[::group_size], prompt_mask[::group_size]
    cache = decoder.init_cache(config, prompt_tokens.shape[0], cache_len)
    logits, cache = decoder.extend_cache(params, config, cache, prompt_tokens, prompt_mask)
    return jnp.repeat(logits, group_size, axis=0), decoder.repeat_cache_rows(cache, group_size)


class _LoopState(NamedTuple):
    step: jax.Array
    cache: decoder.KVCache
    next_logits: jax.Array
    tokens: jax.Array
    log_probs: jax.Array
    lengths: jax.Array
    done: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"), donate_argnames=("cache",))
def decode(params: decoder.Params, config: decoder.DecoderConfig, cache: decoder.KVCache,
           next_logits: jax.Array, rng: jax.Array, sampling: SamplingParams, eos_ids: jax.Array,
           pad_id: jax.Array, max_new_tokens: int) -> tuple[SampleOutput, decoder.KVCache]:
    """Samples up to `max_new_tokens` per row after `prefill`, stopping each row at its first EOS.

    The loop exits as soon as every row is done. The cache must have `max_new_tokens` free slots; it is
    donated and returned (holding the completions too), so XLA updates it in place instead of copying.
    """
    batch = next_logits.shape[0]
    eos_ids = jnp.atleast_1d(jnp.asarray(eos_ids, jnp.int32))
    pad_id = jnp.asarray(pad_id, jnp.int32)
    params = decoder.decoding_params(params, config)  # per-layer slices once, not at every step

    def body(state: _LoopState) -> _LoopState:
        token = sample_tokens(state.next_logits, jax.random.fold_in(rng, state.step), sampling)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(state.next_logits), token[:, None], axis=-1)[:, 0]
        token = jnp.where(state.done, pad_id, token)
        log_prob = jnp.where(state.done, 0.0, log_prob)
        next_logits, cache = decoder.extend_cache(params, config, state.cache, token[:, None],
                                                  jnp.ones((batch, 1), bool))
        return _LoopState(
            step=state.step + 1,
            cache=cache,
            next_logits=next_logits,
            tokens=jax.lax.dynamic_update_index_in_dim(state.tokens, token, state.step, axis=1),
            log_probs=jax.lax.dynamic_update_index_in_dim(state.log_probs, log_prob, state.step, axis=1),
            lengths=state.lengths + (~state.done).astype(jnp.int32),
            done=state.done | jnp.isin(token, eos_ids),
        )

    def not_finished(state: _LoopState) -> jax.Array:
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    initial = _LoopState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        next_logits=next_logits,
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        log_probs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
    )
    final = jax.lax.while_loop(not_finished, body, initial)
    output = SampleOutput(tokens=final.tokens, log_probs=final.log_probs, lengths=final.lengths,
                          truncated=~final.done)
    return output, final.cache


def check_prompts(prompt_tokens, prompt_mask, group_size: int = 1, first_row: int = 0) -> None:
    """Fails, naming rows, unless the prompts [B, P] are left-padded and non-empty, and, with `group_size`
    G > 1, come in consecutive groups of G identical rows (what `prefill` then runs once per group).
    `first_row` numbers the rows of a shard."""
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} must be "
                         f"the same [batch, length] shape")
    ends_in_padding = np.flatnonzero(~prompt_mask[:, -1]) + first_row
    if ends_in_padding.size:
        raise ValueError(f"prompts must be left-padded and non-empty; rows {ends_in_padding[:5].tolist()} "
                         f"end in padding")
    if group_size < 1 or len(prompt_tokens) % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {len(prompt_tokens)} prompt rows")
    masked = np.where(prompt_mask, prompt_tokens, -1).reshape(-1, group_size, prompt_tokens.shape[1])
    differs = np.flatnonzero(np.any(masked != masked[:, :1], axis=(1, 2)))
    if differs.size:
        raise ValueError(f"group_size {group_size}: the prompts of groups {differs[:5].tolist()} (rows from "
                         f"{first_row + differs[0] * group_size}) are not identical within the group")


def generate(params: decoder.Params, config: decoder.DecoderConfig, prompt_tokens: jax.Array,
             prompt_mask: jax.Array, rng: jax.Array, *, max_new_tokens: int, eos_ids: int | Sequence[int],
             pad_id: int, sampling: SamplingParams = SamplingParams(), group_size: int = 1) -> SampleOutput:
    """Completions for a batch of left-padded prompts [B, P] (mask True on real tokens).

    `group_size` G > 1: rows come in consecutive groups of G identical prompts, each prefilled once
    (see `prefill`); the G completions of a group still differ through sampling.

    Compiles once per (config, batch, prompt length, max_new_tokens, group size); new params, rng,
    sampling knobs or EOS/pad ids reuse the compiled code.
    """
    check_prompts(prompt_tokens, prompt_mask, group_size)
    prompt_mask = jnp.asarray(prompt_mask, bool)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    # Fixed dtypes, so Python numbers and arrays hit the same compiled decode loop.
    sampling = SamplingParams(jnp.asarray(sampling.temperature, jnp.float32),
                              jnp.asarray(sampling.top_k, jnp.int32), jnp.asarray(sampling.top_p, jnp.float32))
    next_logits, cache = prefill(params, config, prompt_tokens, prompt_mask,
                                 cache_len=prompt_tokens.shape[1] + max_new_tokens, group_size=group_size)
    output, _ = decode(params, config, cache, next_logits, rng, sampling,
                       jnp.atleast_1d(jnp.asarray(eos_ids, jnp.int32)), jnp.asarray(pad_id, jnp.int32),
                       max_new_tokens=max_new_tokens)
    return output
