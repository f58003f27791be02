"""Evaluation of the distilled student (METHOD.md A5): node accuracy, label report, KL to the teacher, latency.

The student is judged on what it is for: predicting every graph node of a (query, product) pair at once,
as well as the LLM it was distilled from, at a fraction of the cost. So besides the usual label metrics
(`eval/classification.py`) it reports each head's accuracy against the gold node values, the held-out
KL(teacher ‖ student) per head (how much of the teacher's belief it kept, including its uncertainty), and
the wall-clock seconds per pair of the student and of the policy's greedy chain of thought on this host.
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graphgrpo_jax import sampling
from graphgrpo_jax.data import batching, cot
from graphgrpo_jax.eval import classification
from graphgrpo_jax.models import decoder, encoder

NEGATIVE_LABEL = "Irrelevant"  # reported on its own, as in the paper (METHOD.md A6)


def kl_divergence(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """[N] KL(teacher ‖ student) in nats between rows of two [N, C] distributions (0·log 0 = 0)."""
    teacher, student = np.asarray(teacher, np.float64), np.asarray(student, np.float64)
    terms = teacher * (np.log(np.where(teacher > 0, teacher, 1.0)) - np.log(student))
    return np.where(teacher > 0, terms, 0.0).sum(axis=-1)


def node_report(probs: Mapping[str, np.ndarray], gold: Mapping[str, Sequence[int]],
                teacher: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per-node accuracy of the argmax, the full label report (the `y` head) and, given the teacher's
    distributions on the same rows, the mean held-out KL(teacher ‖ student) per head."""
    report: dict[str, Any] = {
        "num_examples": int(len(gold[cot.LABEL_NODE])),
        "per_node_accuracy": {node: float(np.mean(p.argmax(-1) == np.asarray(gold[node])))
                              for node, p in probs.items()},
        "label": classification.classification_report(gold[cot.LABEL_NODE], probs[cot.LABEL_NODE].argmax(-1),
                                                      cot.LABELS, probs=probs[cot.LABEL_NODE],
                                                      negative_class=NEGATIVE_LABEL),
    }
    if teacher is not None:
        report["held_out_kl"] = {node: float(kl_divergence(teacher[node], p).mean()) for node, p in probs.items()}
    return report


def majority_report(train_labels: Sequence[str], test_labels: Sequence[str]) -> dict[str, Any]:
    """The label report of always answering the most frequent training label (ties: the earlier label)."""
    counts = collections.Counter(train_labels)
    if not counts:
        raise ValueError("the majority-class baseline needs at least one training label")
    majority = max(cot.LABELS, key=lambda label: counts[label])  # max keeps the first of equal counts
    gold = [cot.LABELS.index(label) for label in test_labels]
    report = classification.classification_report(gold, [cot.LABELS.index(majority)] * len(gold), cot.LABELS,
                                                  negative_class=NEGATIVE_LABEL)
    return {**report, "majority_label": majority}


def headline(report: Mapping[str, Any]) -> dict[str, float]:
    """Accuracy, macro-F1 and the Irrelevant class's F1 of a classification report."""
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "irrelevant_f1": report["per_class"][NEGATIVE_LABEL]["f1"]}


# ---------------------------------------------------------------------------------------------------------
# Latency


def seconds_per_pair(run_batch: Callable[[int], Any], batch_sizes: Sequence[int] = (1, 64), repeats: int = 5
                     ) -> dict[int, float]:
    """Median wall-clock seconds per pair of `run_batch(batch_size)`, which must block until its result
    is ready; one untimed call per batch size first, so compilation is not counted."""
    timings = {}
    for size in batch_sizes:
        run_batch(size)
        laps = []
        for _ in range(repeats):
            start = time.perf_counter()
            run_batch(size)
            laps.append(time.perf_counter() - start)
        timings[size] = statistics.median(laps) / size
    return timings


def student_runner(params: encoder.Params, config: encoder.EncoderConfig, tokenizer, queries: Sequence[str],
                   titles: Sequence[str], max_length: int) -> Callable[[int], Any]:
    """Serving one batch with the student: tokenization + one forward pass of every head."""

    def run_batch(size: int):
        rows = [i % len(queries) for i in range(size)]
        pairs = encoder.encode_pairs(tokenizer, [queries[i] for i in rows], [titles[i] for i in rows], max_length)
        return jax.block_until_ready(encoder.node_probabilities(params, config, *pairs))

    return run_batch


def policy_runner(params: decoder.Params, model_config: decoder.DecoderConfig, tokenizer, queries: Sequence[str],
                  titles: Sequence[str], *, max_prompt_len: int, max_response_len: int) -> Callable[[int], Any]:
    """Serving one batch with the policy: tokenization + greedy generation of the chain of thought."""

    def run_batch(size: int):
        rows = [i % len(queries) for i in range(size)]
        enc = batching.encode_prompts(tokenizer, [cot.prompt_text(queries[i], titles[i]) for i in rows],
                                      max_prompt_len, truncate_prompts=True)
        return jax.block_until_ready(sampling.generate(
            params, model_config, jnp.asarray(enc["tokens"]), jnp.asarray(enc["attention_mask"].astype(bool)),
            jax.random.PRNGKey(0), max_new_tokens=max_response_len, eos_ids=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id, sampling=sampling.GREEDY))

    return run_batch
