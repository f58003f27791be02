"""Rollouts of any task: prompts → G samples → decoded text → the task's scores → the update's arrays.

The sampler writes completions [N, C] after left-padded prompts [N, P]; this module decodes them with
exact per-token character offsets, hands the texts to the task (`tasks/`), whose `score` returns a
`Scored` (rewards, node values, per-token node ids), and lays the batch out in the shared
`[prompt | response]` layout of `data/batching.py` for the jitted update. Malformed generations never
raise: the task gives them its format reward and missing nodes (-1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from graphgrpo_jax.data import batching


class TokenPieces:
    """Text of each token id, cached, so completions decode with exact per-token character offsets.

    Decoding token by token is exact for text whose characters each fall inside one token (all ASCII
    text, and the CoT tags, which are whole tokens); a multi-byte character split across tokens decodes
    to replacement characters, which the parser then treats like any other malformed text.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        if token_id not in self._cache:
            self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False,
                                                           clean_up_tokenization_spaces=False)
        return self._cache[token_id]

    def decode(self, token_ids: Sequence[int]) -> tuple[str, np.ndarray]:
        """(text, offsets [len, 2]) for a completion's tokens."""
        pieces = [self.piece(int(t)) for t in token_ids]
        ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        starts = ends - np.asarray([len(p) for p in pieces], dtype=np.int64)
        return "".join(pieces), np.stack([starts, ends], axis=1) if pieces else np.zeros((0, 2), np.int64)


@dataclasses.dataclass
class Scored:
    """What a task makes of a batch of decoded completions (rows: prompts × G, groups contiguous)."""

    rewards: np.ndarray  # [N] float32 outcome rewards
    node_values: np.ndarray  # [N, V] int32 value ids, -1 missing (see `node_value_ids`)
    node_ids: list[np.ndarray]  # per rollout, [length] int32: node of each completion token, -1 outside
    gold_label: np.ndarray | None  # [N] int32 gold root value (rule_consistency evidence), or None
    format_valid: np.ndarray  # [N] bool
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # task-specific logs
    node_correct: np.ndarray | None = None  # [N, V] bool against gold node values, where a task knows them


@dataclasses.dataclass
class Rollouts:
    """Host arrays of one RL batch in the `[prompt | response]` layout; rows are prompts × G."""

    tokens: np.ndarray  # [N, P + C] int32
    attention_mask: np.ndarray  # [N, P + C] bool
    completion_mask: np.ndarray  # [N, P + C] bool: generated tokens, EOS included
    node_ids: np.ndarray  # [N, P + C] int32: node index, -1 outside node spans, -2 prompt/padding
    truncated: np.ndarray  # [N] bool
    texts: list[str]
    scored: Scored

    def arrays(self) -> dict[str, np.ndarray]:
        """What the jitted update reads."""
        return {"tokens": self.tokens, "attention_mask": self.attention_mask,
                "completion_mask": self.completion_mask, "node_ids": self.node_ids, "truncated": self.truncated}


def decode_completions(pieces: TokenPieces, completions: np.ndarray, lengths: np.ndarray,
                       truncated: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Texts (without the final EOS) and per-token offsets of each generated row."""
    texts, offsets = [], []
    for i in range(completions.shape[0]):
        text, row_offsets = pieces.decode(completions[i, :int(lengths[i])])
        if lengths[i] and not truncated[i]:  # the last token is EOS: not part of the judged text
            text = text[:int(row_offsets[-1, 0])]
        texts.append(text)
        offsets.append(row_offsets)
    return texts, offsets


def assemble(task, pieces: TokenPieces, rows: np.ndarray, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
             completions: np.ndarray, lengths: np.ndarray, truncated: np.ndarray) -> Rollouts:
    """Decodes, scores (through `task`) and lays out one batch of rollouts."""
    num, prompt_len = prompt_tokens.shape
    completion_len = completions.shape[1]
    texts, offsets = decode_completions(pieces, completions, lengths, truncated)
    scored = task.score(rows, texts, offsets)
    completion_mask = np.arange(completion_len)[None, :] < np.asarray(lengths)[:, None]
    node_ids = np.full((num, prompt_len + completion_len), batching.PROMPT_NODE_ID, np.int32)
    for i, ids in enumerate(scored.node_ids):
        node_ids[i, prompt_len:prompt_len + len(ids)] = ids
    return Rollouts(
        tokens=np.concatenate([prompt_tokens, completions], axis=1).astype(np.int32),
        attention_mask=np.concatenate([prompt_mask.astype(bool), completion_mask], axis=1),
        completion_mask=np.concatenate([np.zeros((num, prompt_len), bool), completion_mask], axis=1),
        node_ids=node_ids,
        truncated=np.asarray(truncated, bool),
        texts=texts,
        scored=scored,
    )
