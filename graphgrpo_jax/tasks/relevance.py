"""The relevance task (METHOD.md A): judge a (query, product) pair through the tagged chain of thought.

One module holds what the task is: its prompt (`encode_prompts`, through `data/prompts.py`: plain or the
checkpoint's chat template, a tagged chain or a plain label as the answer), its SFT targets
(`sft_responses`: the teacher's chain, or the label alone for a row without one), its parser (`read_label`,
`cot.parse` over the graph's nodes), its outcome reward (`rewards.relevance_outcome`: 1 right label, 0 wrong,
`r_format` unparseable), and the RL scorer that turns decoded completions into `rollout.Scored`. It reads *examples*
(`data/examples.RelevanceExample`), so the synthetic world and real ESCI files train the same way; node-level
diagnostics run where the examples carry gold node values (the world) and are absent elsewhere.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphgrpo_jax.data import cot, examples as examples_lib, prepare, prompts as prompts_lib
from graphgrpo_jax.graph.spec import GraphSpec
from graphgrpo_jax.rl import rewards as rewards_lib
from graphgrpo_jax.rl.rollout import Scored
from graphgrpo_jax.tasks import SftData, register_task


def prompt_style(config) -> str:
    """`config.data.prompt_style`: "plain" (`cot.prompt_text`, for models trained from scratch) or "chat" (the
    checkpoint's chat template; `data/prompts.py`)."""
    return config.data.get("prompt_style", "plain")


def answer_format(config) -> str:
    """`config.data.answer`: "cot" (the tagged chain of thought, the method) or "label" (one label word, as
    plain text: the zero-shot and label-only baselines of a pretrained chat model)."""
    answer = config.data.get("answer", "cot")
    if answer not in prompts_lib.ANSWERS:
        raise ValueError(f"config.data.answer = {answer!r}: choose one of {prompts_lib.ANSWERS}")
    return answer


_LABEL_WORD = re.compile(r"\b(" + "|".join(cot.LABELS) + r")\b", re.IGNORECASE)


def read_label(text: str, answer: str = "cot") -> str | None:
    """The label a completion gives, None for a format failure: the `<y>` node of a well-formed chain ("cot"),
    or the first label word in the text ("label"; case-insensitive, whole words)."""
    if answer == "cot":
        parse = cot.parse(text)
        return parse.values.get(cot.LABEL_NODE) if parse.valid else None
    match = _LABEL_WORD.search(text)
    return None if match is None else cot.LABELS[[label.lower() for label in cot.LABELS].index(match[1].lower())]


def encode_prompts(config, tokenizer: Any, examples: Sequence[examples_lib.RelevanceExample]
                   ) -> dict[str, np.ndarray]:
    """The generation prompts of `examples` as RL, eval and eval-only all see them: the configured style and
    answer format, the product text cut to fit `config.data.max_prompt_len` (flagged in `product_truncated`),
    never the query."""
    return prompts_lib.encode_relevance_prompts(
        tokenizer, [e.query for e in examples], [e.product_text for e in examples],
        max_prompt_len=config.data.max_prompt_len, style=prompt_style(config), answer=answer_format(config))


def sft_response(example: examples_lib.RelevanceExample, label_position: str = "last", answer: str = "cot") -> str:
    """The SFT target: the teacher's chain with the label where configured, or the label alone (tagged, or
    as the plain word under `answer="label"`)."""
    if answer == "label":
        return example.label
    if example.nodes is None:
        return cot.render({cot.LABEL_NODE: example.label}, nodes=(cot.LABEL_NODE,))
    return cot.render(example.nodes, label_position=label_position)


def sft_responses(examples: Sequence[examples_lib.RelevanceExample], label_position: str = "last",
                  answer: str = "cot") -> list[str]:
    return [sft_response(e, label_position, answer) for e in examples]


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


def same_value(node: str, value: str | None, gold: str) -> bool:
    """A parsed node value equals the gold one; attribute lists compare as key=value sets."""
    if value is None:
        return False
    if node in ("qa", "pa"):
        parsed = cot.parse_attributes(value)
        return parsed is not None and parsed == cot.parse_attributes(gold)
    return value.strip() == gold


class RelevanceTask:
    """RL over the training examples: outcome 1 / 0 / r_format (METHOD.md A2), scored on the parsed label."""

    name = "relevance"

    def __init__(self, examples: Sequence[examples_lib.RelevanceExample], spec: GraphSpec, r_format: float,
                 prompt_style: str = "plain"):
        if not examples:
            raise ValueError("the relevance task has no training examples")
        self.examples = list(examples)
        self.spec = spec
        self.r_format = r_format
        self.prompt_style = prompt_style
        self.labels = spec.categorical[spec.root]
        self.has_gold_nodes = all(e.gold_nodes is not None for e in self.examples)

    def encode_prompts(self, tokenizer: Any, max_prompt_len: int) -> dict[str, np.ndarray]:
        return prompts_lib.encode_relevance_prompts(
            tokenizer, [e.query for e in self.examples], [e.product_text for e in self.examples],
            max_prompt_len=max_prompt_len, style=self.prompt_style)

    def score(self, rows: np.ndarray, texts: list[str], offsets: list[np.ndarray]) -> Scored:
        parses = [cot.parse(text, self.spec.nodes) for text in texts]
        examples = [self.examples[r] for r in rows]
        rewards = rewards_lib.relevance_outcome(texts, [{"label": e.label} for e in examples], parses=parses,
                                                r_format=self.r_format, nodes=self.spec.nodes)
        valid = np.asarray([p.valid for p in parses], bool)
        node_correct = None
        if self.has_gold_nodes:
            node_correct = np.asarray([[same_value(node, parse.values.get(node), e.gold_nodes[node])
                                        for node in self.spec.nodes] for parse, e in zip(parses, examples)], bool)
        return Scored(
            rewards=np.asarray(rewards, np.float32),
            node_values=node_value_ids(parses, self.spec),
            node_ids=[cot.token_node_ids(p.char_spans, o, self.spec.nodes) for p, o in zip(parses, offsets)],
            gold_label=np.asarray([self.labels.index(e.label) for e in examples], np.int32),
            format_valid=valid,
            metrics={"rl/accuracy": float(np.mean(rewards == 1.0)),
                     "rl/format_failure_rate": float(1.0 - valid.mean()),
                     "rl/format_failures": float((~valid).sum())},
            node_correct=node_correct,
        )


DATA_SOURCES = examples_lib.SOURCES


@functools.lru_cache(maxsize=4)
def _esci_set(path: str, teacher: str, missing: str, seed: int, val_fraction: float, test_fraction: float,
              product_fields: tuple[str, ...], skip_bad_rows: bool) -> examples_lib.ExampleSet:
    return examples_lib.esci_examples(path, teacher=teacher, missing=missing, seed=seed, val_fraction=val_fraction,
                                      test_fraction=test_fraction, product_fields=product_fields,
                                      skip_bad_rows=skip_bad_rows)


def esci_set(config) -> examples_lib.ExampleSet:
    """Every example of `config.data.esci` (split by query, joined with its teacher), cached per process."""
    cfg = config.data.esci
    if not cfg.path:
        raise ValueError("config.data.source = 'esci' needs config.data.esci.path: a flat ESCI JSONL file")
    return _esci_set(str(cfg.path), str(cfg.teacher), cfg.missing, int(cfg.split_seed), float(cfg.val_fraction),
                     float(cfg.test_fraction), tuple(cfg.product_fields), bool(cfg.skip_bad_rows))


def examples_of(config, split: str) -> list[examples_lib.RelevanceExample]:
    """The examples of `split` from `config.data.source`: the synthetic world (splits train / test / ood) or a
    real ESCI file (train / val / test, by query)."""
    source = config.data.get("source", "world")
    if source == "world":
        return examples_lib.world_examples(prepare.load_world(config), split)
    if source == "esci":
        return esci_set(config).split(split)
    raise ValueError(f"config.data.source = {source!r}: choose one of {DATA_SOURCES}")


def training_examples(config) -> list[examples_lib.RelevanceExample]:
    found = examples_of(config, "train")
    if not found:
        raise ValueError(f"config.data.source = {config.data.get('source', 'world')!r} has no training examples")
    return found


def rl_task(config, workdir: str, spec: GraphSpec) -> RelevanceTask:
    del workdir  # the task reads nothing from earlier stages; the loop restores the policy
    if answer_format(config) != "cot":
        raise ValueError("the relevance RL task rewards the tagged chain of thought: config.data.answer must be "
                         "'cot' for the rl stage")
    return RelevanceTask(training_examples(config), spec, config.rl.r_format, prompt_style(config))


def sft_data(config, workdir: str, tokenizer: Any) -> SftData:
    """CoT-masked SFT (METHOD.md A4) on the training examples, `config.optim.batch_size` rows a step."""
    del workdir
    cfg = config.sft
    examples = training_examples(config)
    answer = answer_format(config)
    rows = prompts_lib.encode_relevance_sft(
        tokenizer, [e.query for e in examples], [e.product_text for e in examples],
        sft_responses(examples, cfg.label_position, answer), max_prompt_len=config.data.max_prompt_len,
        max_response_len=config.data.max_response_len, style=prompt_style(config), answer=answer)
    logging.info("relevance SFT: %d training rows, %d label-only, %d with the product text cut to fit",
                 len(examples), sum(e.nodes is None for e in examples), int(rows["product_truncated"].sum()))

    def sample_rows(step: int) -> np.ndarray:
        return np.random.default_rng([config.seed, 1, step]).choice(len(examples), config.optim.batch_size,
                                                                     replace=False)

    return SftData(rows, sample_rows, cfg.num_steps, cfg.log_every,
                   mask=dict(label_node=cot.NODES.index(cot.LABEL_NODE), num_nodes=len(cot.NODES),
                             p_mask=cfg.p_mask, mask_unit=cfg.mask_unit))


register_task("relevance", rl_task=rl_task, sft_data=sft_data)
