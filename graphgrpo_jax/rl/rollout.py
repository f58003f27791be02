"""Rollouts for relevance Graph-GRPO: prompts → G samples → parsed nodes → rewards → credit inputs.

The sampler writes completions [N, C] after left-padded prompts [N, P]; this module turns them into the
host-side arrays the jitted update consumes, in the shared `[prompt | response]` layout of
`data/batching.py`: tokens, attention mask, completion mask, per-token node ids, node value ids, rewards.
Malformed generations never raise: they get the format reward and missing nodes (-1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from graphgrpo_jax.data import batching, cot
from graphgrpo_jax.graph.spec import GraphSpec
from graphgrpo_jax.rl import rewards as rewards_lib


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


def node_value_ids(parses: Sequence[cot.ParseResult], spec: GraphSpec) -> np.ndarray:
    """[N, V] int32: categorical values by index in their vocabulary, free text interned per batch
    (equal strings, equal ids), -1 where the node is missing or its value is not allowed."""
    ids = np.full((len(parses), spec.num_nodes), -1, np.int32)
    interned: dict[str, int] = {}
    for i, parse in enumerate(parses):
        for v, node in enumerate(spec.nodes):
            value = parse.values.get(node)
            if value is None:
                continue
            vocab = spec.categorical[v]
            if vocab is None:
                ids[i, v] = interned.setdefault(value, len(interned))
            elif value in vocab:
                ids[i, v] = vocab.index(value)
    return ids


@dataclasses.dataclass
class Rollouts:
    """Host arrays of one RL batch; rows are prompts × G samples, groups contiguous."""

    tokens: np.ndarray  # [N, P + C] int32
    attention_mask: np.ndarray  # [N, P + C] bool
    completion_mask: np.ndarray  # [N, P + C] bool: generated tokens, EOS included
    node_ids: np.ndarray  # [N, P + C] int32: node index, -1 outside node spans, -2 prompt/padding
    node_values: np.ndarray  # [N, V] int32
    rewards: np.ndarray  # [N] float32
    gold_label: np.ndarray  # [N] int32
    truncated: np.ndarray  # [N] bool
    format_valid: np.ndarray  # [N] bool
    texts: list[str]


def assemble(pieces: TokenPieces, spec: GraphSpec, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
             completions: np.ndarray, lengths: np.ndarray, truncated: np.ndarray, gold_labels: Sequence[str],
             r_format: float) -> Rollouts:
    """Parses completions and lays out everything the update step needs."""
    num, prompt_len = prompt_tokens.shape
    completion_len = completions.shape[1]
    completion_mask = np.arange(completion_len)[None, :] < np.asarray(lengths)[:, None]
    node_ids = np.full((num, completion_len), batching.PROMPT_NODE_ID, np.int32)
    texts, parses = [], []
    for i in range(num):
        length = int(lengths[i])
        ids = completions[i, :length]
        text, offsets = pieces.decode(ids)
        eos_cut = len(text)
        if length and not truncated[i]:  # the last token is EOS: not part of the judged text
            eos_cut = int(offsets[-1, 0])
        parse = cot.parse(text[:eos_cut], spec.nodes)
        texts.append(text[:eos_cut])
        parses.append(parse)
        node_ids[i, :length] = cot.token_node_ids(parse.char_spans, offsets, spec.nodes)
    contexts = [{"label": label} for label in gold_labels]
    rewards = rewards_lib.relevance_outcome(texts, contexts, parses=parses, r_format=r_format, nodes=spec.nodes)
    labels = spec.categorical[spec.root]
    return Rollouts(
        tokens=np.concatenate([prompt_tokens, completions], axis=1).astype(np.int32),
        attention_mask=np.concatenate([prompt_mask.astype(bool), completion_mask], axis=1),
        completion_mask=np.concatenate([np.zeros((num, prompt_len), bool), completion_mask], axis=1),
        node_ids=np.concatenate([np.full((num, prompt_len), batching.PROMPT_NODE_ID, np.int32), node_ids], axis=1),
        node_values=node_value_ids(parses, spec),
        rewards=np.asarray(rewards, np.float32),
        gold_label=np.asarray([labels.index(label) for label in gold_labels], np.int32),
        truncated=np.asarray(truncated, bool),
        format_valid=np.asarray([p.valid for p in parses], bool),
        texts=texts,
    )
