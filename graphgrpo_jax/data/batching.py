"""From text examples to padded int32 token arrays with loss masks and per-token node ids.

One static layout serves SFT, generation and RL: a row is the prompt, left-padded to `max_prompt_len`,
followed by the response, right-padded to `max_response_len`::

    [pad pad p1 p2 p3 | r1 r2 r3 eos pad]
     <- max_prompt_len -> <- max_response_len ->

Every response starts at column `max_prompt_len`, where the sampler starts writing, so SFT batches and
rollouts share shapes and loss code. Prompt and response are tokenized separately (as at sampling time,
when the response is generated after the prompt's last token) and the response ends with EOS, which is
trained so the model learns to stop. `positions` count real tokens only, so left padding shifts nothing.

Per-token node ids: the index in `nodes` of the CoT node whose span (tags included, see `cot`) holds the
token, `OUTSIDE_NODE_ID` for response tokens outside every span (EOS, stray text, a response without
nodes such as a rewrite), `PROMPT_NODE_ID` for prompt and padding. CoT random masking (METHOD.md A4) and
graph credit act on these ids.

Overflow: a response longer than `max_response_len - 1` is an error (a cut target would teach a broken
format); a prompt longer than `max_prompt_len` is an error unless `truncate_prompts` is set, which keeps
its last tokens (the cue the model answers after) and flags the row in `prompt_truncated`.

Prompts are text (tokenized here with the tokenizer's special tokens) or already token ids (any sequence of
ints, used as given): `prompts.encode_relevance_prompts` renders and truncates real-checkpoint prompts
itself and passes ids, so they land in this same layout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphgrpo_jax.data.cot import NODES, parse, token_node_ids

_LOG = logging.getLogger(__name__)

PROMPT_NODE_ID = -2  # prompt and padding
OUTSIDE_NODE_ID = -1  # response tokens outside every node span


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    """(eos, pad) ids; pad falls back to eos, since padded positions are masked anyway."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: responses must end with one")
    pad = tokenizer.pad_token_id
    return eos, eos if pad is None else pad


def _positions(attention_mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)


def _prompt_ids(tokenizer: Any, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids per prompt: text is tokenized (in one batch, special tokens added), ids are kept."""
    encoded: list[list[int] | None] = [None if isinstance(prompt, str) else [int(i) for i in prompt]
                                       for prompt in prompts]
    text_rows = [row for row, ids in enumerate(encoded) if ids is None]
    if text_rows:
        texts = [prompts[row] for row in text_rows]
        for row, ids in zip(text_rows, tokenizer(texts, add_special_tokens=True)["input_ids"]):
            encoded[row] = ids
    return encoded


def encode_prompts(tokenizer: Any, prompts: Sequence[str | Sequence[int]], max_prompt_len: int,
                   truncate_prompts: bool = False) -> dict[str, np.ndarray]:
    """Left-padded prompt ids for generation: tokens, attention_mask, positions [B, P]; prompt_truncated [B].

    A prompt is text or a sequence of token ids (taken as is, nothing added).
    """
    _, pad = _special_ids(tokenizer)
    encoded = _prompt_ids(tokenizer, prompts)
    batch = len(encoded)
    tokens = np.full((batch, max_prompt_len), pad, dtype=np.int32)
    attention_mask = np.zeros((batch, max_prompt_len), dtype=np.int32)
    truncated = np.zeros(batch, dtype=np.int32)
    for row, ids in enumerate(encoded):
        if len(ids) > max_prompt_len:
            if not truncate_prompts:
                raise ValueError(f"prompt {row} has {len(ids)} tokens > max_prompt_len {max_prompt_len}: raise "
                                 f"config.data.max_prompt_len ({prompts[row][:80]!r}...)")
            ids, truncated[row] = ids[-max_prompt_len:], 1
        if ids:
            tokens[row, -len(ids):] = ids
            attention_mask[row, -len(ids):] = 1
    if truncated.any():
        _LOG.warning("truncated %d of %d prompts to their last %d tokens", truncated.sum(), batch,
                     max_prompt_len)
    return {"tokens": tokens, "attention_mask": attention_mask, "positions": _positions(attention_mask),
            "prompt_truncated": truncated}


def encode_sft(tokenizer: Any, prompts: Sequence[str | Sequence[int]], responses: Sequence[str],
               max_prompt_len: int, max_response_len: int, nodes: Sequence[str] = NODES,
               truncate_prompts: bool = False) -> dict[str, np.ndarray]:
    """Prompt + response rows for teacher forcing.

    Returns int32 arrays: tokens, attention_mask, positions, loss_mask (response tokens and EOS) and
    node_ids, all [B, max_prompt_len + max_response_len]; prompt_truncated [B]. Targets are `tokens`
    shifted by one, left to the loss. Prompts are text or token ids, as in `encode_prompts`.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos, pad = _special_ids(tokenizer)
    prompt_part = encode_prompts(tokenizer, prompts, max_prompt_len, truncate_prompts)
    encoded = tokenizer(list(responses), add_special_tokens=False, return_offsets_mapping=True)
    batch = len(responses)
    tokens = np.full((batch, max_response_len), pad, dtype=np.int32)
    loss_mask = np.zeros((batch, max_response_len), dtype=np.int32)
    node_ids = np.full((batch, max_response_len), PROMPT_NODE_ID, dtype=np.int32)
    for row, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
        length = len(ids) + 1
        if length > max_response_len:
            raise ValueError(f"response {row} has {len(ids)} tokens + EOS > max_response_len "
                             f"{max_response_len} ({responses[row][:80]!r}...)")
        tokens[row, :length] = [*ids, eos]
        loss_mask[row, :length] = 1
        spans = parse(responses[row], nodes).char_spans
        node_ids[row, :len(ids)] = token_node_ids(spans, np.asarray(offsets).reshape(-1, 2), nodes)
        node_ids[row, len(ids)] = OUTSIDE_NODE_ID
    attention_mask = np.concatenate([prompt_part["attention_mask"], loss_mask], axis=1)
    return {
        "tokens": np.concatenate([prompt_part["tokens"], tokens], axis=1),
        "attention_mask": attention_mask,
        "positions": _positions(attention_mask),
        "loss_mask": np.concatenate([np.zeros_like(prompt_part["attention_mask"]), loss_mask], axis=1),
        "node_ids": np.concatenate([np.full_like(prompt_part["tokens"], PROMPT_NODE_ID), node_ids], axis=1),
        "prompt_truncated": prompt_part["prompt_truncated"],
    }
