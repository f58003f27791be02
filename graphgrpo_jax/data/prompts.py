"""Prompts for from-scratch and pretrained models: the relevance prompts (rendered, tokenized and cut to fit) and,
at the end, the two prompts of the rewrite task.

Two styles (`PROMPT_STYLES`):

- ``"plain"``: `cot.prompt_text` ("query: ... product: ... judge:"), instruction-free, for the small models
  trained from scratch; tokenized as `batching.encode_prompts` does (special tokens added), so a prompt that
  fits gives exactly `encode_prompts`' ids. It carries no instruction, so `answer` does not change it.
- ``"chat"``: the checkpoint's own chat template applied to a system turn (`SYSTEM`) and a user turn
  (`user_text`), with the assistant generation prompt appended; the assistant turn is what the model
  writes (the tagged CoT, or one label, then EOS). The rendered text already holds every special token
  the template wants (ChatML's ``<|im_start|>``, or a ``{{ bos_token }}``), so it is tokenized with
  ``add_special_tokens=False``, as ``apply_chat_template(tokenize=True)`` does; adding them again would
  double a BOS on Llama-style tokenizers. (SmolLM2's tokenizer adds nothing either way.)

The user turn, for a query ``q`` and a product title ``p`` (whitespace collapsed to single spaces), is
``"Query: q\\nProduct: p\\n"`` followed by the instruction of the answer kind (`ANSWERS`):

- ``"cot"`` (`COT_INSTRUCTION`): judge relevance through the tagged chain of thought (METHOD.md A1), every
  node named, then the allowed labels (`cot.LABELS`)::

    Judge the product's relevance to the query. Reason in tags: <qs>query subject</qs><qa>query
    attributes</qa><ps>product subject</ps><pa>product attributes</pa><ms>subject match</ms><ma>attribute
    match</ma><y>label</y>, label one of: Exact, Substitute, Complement, Irrelevant.

  (one line; wrapped here);
- ``"label"`` (`LABEL_INSTRUCTION`): answer with one label only (zero-shot baselines)::

    Judge the product's relevance to the query. Answer with one label of: Exact, Substitute, Complement,
    Irrelevant.

The system turn is `SYSTEM`, "You are a search relevance judge." (7 SmolLM2 tokens; giving none would not
save them, SmolLM2's template then inserts its own 17-token default). The wording is defined here (the
docs fix none) and kept short: the first target is a 135M model. Under SmolLM2's template the chat "cot"
prompt costs ~105 tokens besides the query and the title (~85 with the CoT tags as added tokens,
`tokenization.checkpoint_tokenizer`), "label" ~50; ESCI titles run ~35 tokens (median), ~63 (p95).

Truncation. Real product titles run long, and cutting a prompt's first or last tokens would drop the
instruction or the query. Here only the product text is ever cut: when a rendered prompt exceeds
`max_prompt_len` tokens, the product title is cut after its k-th token (its own tokenization, at a token
boundary) and the prompt re-rendered, k the largest that fits. The search runs over all overflowing rows
together, one batched render and tokenization per step: it probes the k the overflow suggests, then its
neighbour, which settles almost every row in two steps, and bisects where they do not (rows that fit
cost one render and one batched tokenization in all; 802 ESCI rows under SmolLM2, 215 of them cut,
took 7 steps and ~0.6 s on 2 CPU cores). The cut rows are flagged in `product_truncated`. A row whose prompt does
not fit even with an empty product is an error naming the row, its query and the length it needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphgrpo_jax.data import batching, cot, rewrite_data

_LOG = logging.getLogger(__name__)

PROMPT_STYLES: tuple[str, ...] = ("plain", "chat")
ANSWERS: tuple[str, ...] = ("cot", "label")

SYSTEM = "You are a search relevance judge."
# What each CoT node holds, as the instruction names it; the categorical nodes' values (cot.MS_VALUES,
# cot.MA_VALUES) are left to SFT: listing them would cost ~25 more tokens per prompt.
NODE_HINTS: dict[str, str] = {
    "qs": "query subject", "qa": "query attributes", "ps": "product subject", "pa": "product attributes",
    "ms": "subject match", "ma": "attribute match", "y": "label",
}
_TASK = "Judge the product's relevance to the query."
COT_INSTRUCTION = (f"{_TASK} Reason in tags: "
                   + "".join(f"<{node}>{NODE_HINTS[node]}</{node}>" for node in cot.NODES)
                   + ", label one of: " + ", ".join(cot.LABELS) + ".")
LABEL_INSTRUCTION = f"{_TASK} Answer with one label of: " + ", ".join(cot.LABELS) + "."
INSTRUCTIONS: dict[str, str] = {"cot": COT_INSTRUCTION, "label": LABEL_INSTRUCTION}


def _one_line(text: str) -> str:
    """Single spaces, no newlines (as `cot.prompt_text` cleans its fields)."""
    return " ".join(str(text).split())


def _check_options(style: str, answer: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r} is not one of {PROMPT_STYLES}")
    if answer not in ANSWERS:
        raise ValueError(f"answer {answer!r} is not one of {ANSWERS}")


def _check_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"prompt style 'chat' needs a tokenizer with a chat template, and {name!r} has none "
                         "(no chat_template in its tokenizer_config.json); use prompt style 'plain'")


def user_text(query: str, product: str, answer: str = "cot") -> str:
    """The user turn of a chat prompt: the query, the product, then the instruction for `answer`."""
    if answer not in ANSWERS:
        raise ValueError(f"answer {answer!r} is not one of {ANSWERS}")
    return f"Query: {_one_line(query)}\nProduct: {_one_line(product)}\n{INSTRUCTIONS[answer]}"


def messages(query: str, product: str, answer: str = "cot") -> list[dict[str, str]]:
    """The chat conversation before the model's turn: the system turn and the user turn."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_text(query, product, answer)}]


def _render_many(tokenizer: Any, queries: Sequence[str], products: Sequence[str], style: str,
                 answer: str) -> list[str]:
    if style == "plain":
        return [cot.prompt_text(query, product) for query, product in zip(queries, products)]
    if not queries:
        return []
    conversations = [messages(query, product, answer) for query, product in zip(queries, products)]
    return list(tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True))


def render_relevance_prompt(tokenizer: Any, query: str, product: str, *, style: str = "plain",
                            answer: str = "cot") -> str:
    """The prompt text for one (query, product) pair, uncut."""
    _check_options(style, answer)
    if style == "chat":
        _check_chat_template(tokenizer)
    return _render_many(tokenizer, [query], [product], style, answer)[0]


def _tokenize(tokenizer: Any, texts: list[str], style: str) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=style == "plain")["input_ids"]


def relevance_prompt_ids(tokenizer: Any, queries: Sequence[str], products: Sequence[str], *,
                         max_prompt_len: int, style: str = "plain",
                         answer: str = "cot") -> tuple[list[list[int]], np.ndarray]:
    """(token ids per row, each at most `max_prompt_len` long; product_truncated [B] int32).

    Rows that overflow have their product title cut to the longest token prefix that fits (module
    docstring); the query and the instructions are never cut.
    """
    _check_options(style, answer)
    if style == "chat":
        _check_chat_template(tokenizer)
    queries, products = list(queries), [_one_line(product) for product in products]
    if len(queries) != len(products):
        raise ValueError(f"{len(queries)} queries but {len(products)} products")
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be positive, got {max_prompt_len}")
    ids = _tokenize(tokenizer, _render_many(tokenizer, queries, products, style, answer), style)
    truncated = np.zeros(len(ids), dtype=np.int32)
    over = [row for row, row_ids in enumerate(ids) if len(row_ids) > max_prompt_len]
    if over:

        def encode(rows: list[int], kept_products: list[str]) -> list[list[int]]:
            texts = _render_many(tokenizer, [queries[row] for row in rows], kept_products, style, answer)
            return _tokenize(tokenizer, texts, style)

        cut = _cut_products(tokenizer, over, [len(ids[row]) for row in over], queries, products, encode,
                            max_prompt_len, style)
        for row, row_ids in zip(over, cut):
            ids[row] = row_ids
        truncated[over] = 1
        _LOG.info("cut the product text of %d of %d %s prompts to fit %d tokens", len(over), len(ids), style,
                  max_prompt_len)
    return ids, truncated


def _cut_products(tokenizer: Any, rows: list[int], lengths: list[int], queries: list[str], products: list[str],
                  encode: Callable[[list[int], list[str]], list[list[int]]], max_len: int,
                  style: str) -> list[list[int]]:
    """Prompt ids of each row in `rows` (whole prompt `lengths` tokens long) with its product cut to the
    most leading tokens that fit.

    `encode(rows, products)` renders and tokenizes those rows with those product texts. One search per row
    for the largest number of product tokens kept that fits, all rows stepped together so that each step
    is one batched call. The first probe keeps as many tokens as the overflow leaves and the second its
    neighbour, which settles most rows in two steps (a title tokenizes in its prompt much as alone);
    bisection takes over where they do not.
    """
    pieces = tokenizer([products[row] for row in rows], add_special_tokens=False,
                       return_offsets_mapping=True)["offset_mapping"]
    ends = {row: [int(end) for _, end in offsets] for row, offsets in zip(rows, pieces)}

    def prefix(row: int, kept: int) -> str:
        """The product title up to the end of its `kept`-th token."""
        return products[row][:ends[row][kept - 1]].rstrip() if kept else ""

    # Invariant: keeping `low` product tokens fits (-1: nothing known to fit), keeping `high + 1` does not
    # (the whole title did not fit, so `high` starts at its token count - 1).
    low = dict.fromkeys(rows, -1)
    high = {row: len(ends[row]) - 1 for row in rows}
    best: dict[int, list[int]] = {}
    # The prompt's length with an empty product, for the error; known at once for an empty title.
    empty_length = {row: length for row, length in zip(rows, lengths) if not ends[row]}
    want = {row: len(ends[row]) - (length - max_len) for row, length in zip(rows, lengths)}
    active = [row for row in rows if low[row] < high[row]]
    step = 0
    while active:
        if step >= 2:
            want = {row: (low[row] + high[row] + 1) // 2 for row in active}
        probe = {row: min(max(want[row], low[row] + 1), high[row]) for row in active}
        for row, row_ids in zip(active, encode(active, [prefix(row, probe[row]) for row in active])):
            kept, fits = probe[row], len(row_ids) <= max_len
            if fits:
                low[row], best[row] = kept, row_ids
            else:
                high[row] = kept - 1
                if kept == 0:
                    empty_length[row] = len(row_ids)
            want[row] = kept + 1 if fits else kept - 1  # the neighbour, probed at step 1
        active = [row for row in active if low[row] < high[row]]
        step += 1
    for row in rows:
        if low[row] < 0:
            raise ValueError(f"row {row}: the {style} prompt for query {queries[row]!r} needs "
                             f"{empty_length[row]} tokens even with an empty product, more than "
                             f"max_prompt_len={max_len}; raise max_prompt_len")
    return [best[row] for row in rows]


def encode_relevance_prompts(tokenizer: Any, queries: Sequence[str], products: Sequence[str], *,
                             max_prompt_len: int, style: str = "plain",
                             answer: str = "cot") -> dict[str, np.ndarray]:
    """Left-padded generation prompts in `batching.encode_prompts`' layout, products cut to fit.

    Returns int32 tokens, attention_mask, positions [B, max_prompt_len] and product_truncated [B] (1 where
    the product title was cut); prompt_truncated [B] is the same flag, under the key `encode_prompts`'
    callers read.
    """
    ids, truncated = relevance_prompt_ids(tokenizer, queries, products, max_prompt_len=max_prompt_len,
                                          style=style, answer=answer)
    encoded = batching.encode_prompts(tokenizer, ids, max_prompt_len)
    return {**encoded, "prompt_truncated": truncated.copy(), "product_truncated": truncated}


def encode_relevance_sft(tokenizer: Any, queries: Sequence[str], products: Sequence[str],
                         responses: Sequence[str], *, max_prompt_len: int, max_response_len: int,
                         style: str = "plain", answer: str = "cot",
                         nodes: Sequence[str] = cot.NODES) -> dict[str, np.ndarray]:
    """Teacher-forcing rows (`batching.encode_sft`'s dict) whose prompt columns are exactly
    `encode_relevance_prompts`' tokens for the same rows, plus product_truncated [B] (and prompt_truncated,
    the same flag).

    The response is tokenized without special tokens and ends with the tokenizer's EOS, as in `encode_sft`;
    for ChatML checkpoints (SmolLM2, Qwen2.5-Instruct) EOS is ``<|im_end|>``, the template's end of turn.
    """
    if len(responses) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(responses)} responses")
    ids, truncated = relevance_prompt_ids(tokenizer, queries, products, max_prompt_len=max_prompt_len,
                                          style=style, answer=answer)
    encoded = batching.encode_sft(tokenizer, ids, responses, max_prompt_len, max_response_len, nodes)
    return {**encoded, "prompt_truncated": truncated.copy(), "product_truncated": truncated}


# ------------------------------------------------------------------------------------- query rewriting (B)
#
# The rewrite task's two prompts in the same two styles. "plain": `cot.rewrite_prompt` / `cot.tag_prompt`
# text (special tokens added as `batching.encode_prompts` adds them), the response the bare rewrite.
# "chat": the checkpoint's template over `REWRITE_SYSTEM` and a user turn naming the query (and, for tagging,
# the rewrite); the rewrite is answered as the ESCI teacher answers, `<answer>{"query": "..."}</answer>`
# (`rewrite_data.answer_text`), so that a response with no readable answer is a format failure. Tag responses
# are one of `cot.REWRITE_TAGS` in both styles. Queries and rewrites are short: nothing is cut, a prompt over
# `max_prompt_len` is an error (`batching.encode_prompts`).

REWRITE_SYSTEM = "You rewrite shopping queries for a product search engine."
_ANSWER_FORMAT = 'Answer as <answer>{"query": "..."}</answer>.'
REWRITE_INSTRUCTIONS: dict[str, str] = {
    "boolean": f"Rewrite the query for a keyword search engine, with AND, OR and parentheses. {_ANSWER_FORMAT}",
    "plain": f"Rewrite the query for a keyword search engine as a few search words. {_ANSWER_FORMAT}",
}
TAG_INSTRUCTION = ("Does the rewrite keep the query's intent? Answer with one of: "
                   + ", ".join(cot.REWRITE_TAGS) + ".")


def rewrite_user_text(query: str, rewrite_format: str = "boolean") -> str:
    if rewrite_format not in REWRITE_INSTRUCTIONS:
        raise ValueError(f"rewrite format {rewrite_format!r} is not one of {tuple(REWRITE_INSTRUCTIONS)}")
    return f"Query: {_one_line(query)}\n{REWRITE_INSTRUCTIONS[rewrite_format]}"


def tag_user_text(query: str, rewrite: str) -> str:
    return f"Query: {_one_line(query)}\nRewrite: {_one_line(rewrite)}\n{TAG_INSTRUCTION}"


def _chat_ids(tokenizer: Any, user_texts: list[str], system: str) -> list[list[int]]:
    _check_chat_template(tokenizer)
    if not user_texts:
        return []
    conversations = [[{"role": "system", "content": system}, {"role": "user", "content": text}]
                     for text in user_texts]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    return _tokenize(tokenizer, list(texts), "chat")


def rewrite_prompts(tokenizer: Any, queries: Sequence[str], *, style: str = "plain",
                    rewrite_format: str = "boolean") -> list[str] | list[list[int]]:
    """Rewrite-generation prompts, as `batching.encode_prompts` takes them (text for "plain", ids for "chat")."""
    _check_options(style, "cot")
    if style == "plain":
        return [cot.rewrite_prompt(query) for query in queries]
    return _chat_ids(tokenizer, [rewrite_user_text(query, rewrite_format) for query in queries], REWRITE_SYSTEM)


def tag_prompts(tokenizer: Any, queries: Sequence[str], rewrites: Sequence[str], *,
                style: str = "plain") -> list[str] | list[list[int]]:
    """Query-rewrite tagging prompts, as `rewrite_prompts`."""
    _check_options(style, "cot")
    if len(queries) != len(rewrites):
        raise ValueError(f"{len(queries)} queries but {len(rewrites)} rewrites")
    if style == "plain":
        return [cot.tag_prompt(query, rewrite) for query, rewrite in zip(queries, rewrites)]
    return _chat_ids(tokenizer, [tag_user_text(q, r) for q, r in zip(queries, rewrites)], REWRITE_SYSTEM)


def rewrite_response(rewrite: str, style: str = "plain") -> str:
    """The SFT response for a rewrite in `style` (EOS is added by the encoder)."""
    _check_options(style, "cot")
    return rewrite if style == "plain" else rewrite_data.answer_text(rewrite)


def read_rewrite(text: str, style: str = "plain") -> str | None:
    """The rewrite a response gives: the text itself ("plain"), or its answer's query ("chat"; None when the
    response has no readable answer, a format failure)."""
    return text if style == "plain" else rewrite_data.answer_query(text)
