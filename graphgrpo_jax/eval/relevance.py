"""`eval` stage: the policy's relevance judgements on held-out pairs, as metrics, a report and plots.

Prompts are the relevance task's (`tasks/relevance.py`), so the eval sees what training saw: the same
style and template, and the same rule when a prompt is too long (only the product text is cut; the
report counts those rows in `product_truncated`).

The label is read from the greedy chain of thought (a format failure counts as wrong), or, for a plain
answer (`config.data.answer = "label"`: the zero-shot baseline), as the first label word of the text. Label
probabilities for AUC come from forced decoding: after the generated reasoning (label-last) or right after
the prompt (label-first, and plain answers), each allowed label is scored as the continuation `<y>label</y>`
(or the bare label word) and the scores are normalised over labels.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from graphgrpo_jax import sampling
from graphgrpo_jax.metrics import report_text
from graphgrpo_jax.data import cot
from graphgrpo_jax.eval import classification
from graphgrpo_jax.models import decoder
from graphgrpo_jax.rl import rollout
from graphgrpo_jax.tasks import relevance as relevance_task


@functools.partial(jax.jit, static_argnums=1)
def _continuation_log_probs(params, model_config, tokens, attention_mask, score_mask):
    return (decoder.token_log_probs(params, model_config, tokens, attention_mask) * score_mask).sum(axis=1)


def tag_ids(tokenizer, node: str) -> tuple[int, int]:
    """Ids of `<node>` and `</node>`, which must be whole tokens (the CoT tags are added tokens)."""
    vocab = tokenizer.get_vocab()
    tags = (f"<{node}>", f"</{node}>")
    missing = [tag for tag in tags if tag not in vocab]
    if missing:
        raise ValueError(f"the policy tokenizer has no token for {missing}: node tags must be whole tokens")
    return vocab[tags[0]], vocab[tags[1]]


def forced_value_probabilities(params, model_config: decoder.DecoderConfig, tokenizer, prompt_tokens: np.ndarray,
                               prompt_mask: np.ndarray, prefixes: Mapping[str, Sequence[Sequence[int]]],
                               node_values: Mapping[str, Sequence[str]], response_len: int, *,
                               tagged: bool = True) -> dict[str, np.ndarray]:
    """[B, C_v] probabilities per node v: each allowed value scored as the continuation `<v>value</v>` after
    row b's response prefix for v (`prefixes[v][b]`), normalised over v's values. With `tagged=False` the
    continuation is the value's own tokens (a plain-text answer, `config.data.answer = "label"`).

    The label's AUC (`judge`) and the distillation teacher (`train/distill.py`) both read it; every
    (row, node, value) continuation goes through one forward pass.
    """
    batch, prompt_len = prompt_tokens.shape
    continuations = []  # (row, node, token ids of "<v>value</v>"), node-major, then row, then value
    for node, values in node_values.items():
        open_id, close_id = tag_ids(tokenizer, node) if tagged else (None, None)
        value_ids = [tokenizer(value, add_special_tokens=False)["input_ids"] for value in values]
        if tagged:
            value_ids = [[open_id, *ids, close_id] for ids in value_ids]
        continuations += [(b, node, ids) for b in range(batch) for ids in value_ids]
    tokens = np.full((len(continuations), prompt_len + response_len), tokenizer.pad_token_id, np.int32)
    mask = np.zeros(tokens.shape, bool)
    score = np.zeros(tokens.shape, np.float32)
    for row, (b, node, continuation) in enumerate(continuations):
        response = (list(prefixes[node][b]) + continuation)[-response_len:]
        end = prompt_len + len(response)
        tokens[row, :prompt_len], mask[row, :prompt_len] = prompt_tokens[b], prompt_mask[b]
        tokens[row, prompt_len:end], mask[row, prompt_len:end] = response, True
        score[row, end - len(continuation) + int(tagged):end] = 1.0  # the value and the close tag, not "<v>"
    scores = np.asarray(_continuation_log_probs(params, model_config, jnp.asarray(tokens), jnp.asarray(mask),
                                                jnp.asarray(score)), np.float64)
    probabilities, start = {}, 0
    for node, values in node_values.items():
        node_scores = scores[start:start + batch * len(values)].reshape(batch, len(values))
        start += batch * len(values)
        node_scores = np.exp(node_scores - node_scores.max(axis=1, keepdims=True))
        probabilities[node] = node_scores / node_scores.sum(axis=1, keepdims=True)
    return probabilities


class Judgements(NamedTuple):
    preds: np.ndarray  # [N] predicted label ids, -1 = format failure
    probs: np.ndarray  # [N, L] label probabilities by forced decoding
    texts: list[str]  # the generated chains
    product_truncated: np.ndarray  # [N] bool: the prompt showed a cut product text


def judge(params, config: ml_collections.ConfigDict, tokenizer, queries: list[str], titles: list[str],
          batch_size: int) -> Judgements:
    """Greedy judgements of (query, product text) pairs, prompted as the relevance task prompts in training
    (`tasks.relevance.encode_prompts`: the configured style, only the product text cut to fit)."""
    model_config = decoder.DecoderConfig.from_config(config.model)
    labels = cot.LABELS
    answer = relevance_task.answer_format(config)
    label_first = config.sft.label_position == "first" or answer == "label"  # the label is scored at the start
    pieces = rollout.TokenPieces(tokenizer)
    open_y = tokenizer.convert_tokens_to_ids("<y>")
    preds, probs, texts, cut = [], [], [], []
    pairs = [types.SimpleNamespace(query=q, product_text=t) for q, t in zip(queries, titles)]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape, one compile
        enc = relevance_task.encode_prompts(config, tokenizer, padded)
        prompt_tokens, prompt_mask = enc["tokens"], enc["attention_mask"].astype(bool)
        cut.append(enc["product_truncated"][:len(chunk)].astype(bool))
        out = jax.device_get(sampling.generate(
            params, model_config, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), jax.random.PRNGKey(0),
            max_new_tokens=config.data.max_response_len, eos_ids=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id, sampling=sampling.GREEDY))
        prefixes = []
        for b in range(len(padded)):
            ids = [int(t) for t in out.tokens[b, :out.lengths[b]]]
            if ids and not out.truncated[b]:
                ids = ids[:-1]  # EOS
            text, _ = pieces.decode(ids)
            label = relevance_task.read_label(text, answer)
            if b < len(chunk):
                preds.append(labels.index(label) if label in labels else -1)
                texts.append(text)
            prefixes.append([] if label_first else (ids[:ids.index(open_y)] if open_y in ids else ids))
        probs.append(forced_value_probabilities(params, model_config, tokenizer, prompt_tokens, prompt_mask,
                                                {cot.LABEL_NODE: prefixes}, {cot.LABEL_NODE: labels},
                                                config.data.max_response_len,
                                                tagged=answer == "cot")[cot.LABEL_NODE][:len(chunk)])
    return Judgements(np.asarray(preds), np.concatenate(probs), texts, np.concatenate(cut))


def evaluate_pairs(params, config, tokenizer, queries, titles, gold_labels) -> dict:
    """The classification report of the policy's judgements, with how many prompts showed a cut product."""
    preds, probs, texts, cut = judge(params, config, tokenizer, queries, titles, config.eval.batch_size)
    gold = [cot.LABELS.index(label) for label in gold_labels]
    report = classification.classification_report(gold, preds, cot.LABELS, probs=probs,
                                                  negative_class="Irrelevant")
    report["product_truncated"] = int(cut.sum())
    report["predictions"] = [int(pred) for pred in preds]  # per row, in input order: label index, -1 = failure
    report["examples"] = [{"query": report_text(q), "title": report_text(t), "gold": g, "generated": report_text(x)}
                          for q, t, g, x in list(zip(queries, titles, gold_labels, texts))[:5]]
    return report
