"""Start-up validation of experiment configs: a wrong value fails before any work, naming the field.

Rules are data: a dotted field path and what it may hold. A rule whose field is absent from a config is
not checked (configs only carry the sections their stages need); `required` fields must be present.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection
from typing import Any

import ml_collections

from graphgrpo_jax.data import examples, prompts, teacher
from graphgrpo_jax.graph import controller, credit
from graphgrpo_jax.rl import grpo
from graphgrpo_jax.train import state


class ConfigError(ValueError):
    """A config value that cannot run; the message names the field and what it may hold."""


_MISSING = object()  # get_field's default: raise when the field is absent
_ABSENT = object()


def get_field(config: ml_collections.ConfigDict, path: str, default: Any = _MISSING) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            if default is _MISSING:
                raise ConfigError(f"config.{path} is missing")
            return default
        node = node[part]
    return node


@dataclasses.dataclass(frozen=True)
class Choice:
    path: str
    allowed: Collection[Any]
    many: bool = False  # the field holds a sequence of choices (e.g. the stages to run)

    def check(self, value: Any) -> str | None:
        values = tuple(value) if self.many else (value,)
        bad = [v for v in values if v not in self.allowed]
        if bad:
            return f"{bad[0]!r} is not allowed; allowed values: {', '.join(map(repr, self.allowed))}"
        return None


@dataclasses.dataclass(frozen=True)
class Range:
    path: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    integer: bool = False

    def check(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        if self.integer and not isinstance(value, int):
            return f"{value!r} is not an integer"
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return f"{value!r} must be {'>=' if self.low_inclusive else '>'} {self.low}"
        if self.high is not None and value > self.high:
            return f"{value!r} must be <= {self.high}"
        return None


@dataclasses.dataclass(frozen=True)
class Predicate:
    path: str
    test: Callable[[Any], bool]
    expectation: str

    def check(self, value: Any) -> str | None:
        return None if self.test(value) else f"{value!r} is invalid: {self.expectation}"


def positive_int(path: str) -> Range:
    return Range(path, low=1, integer=True)


Rule = Choice | Range | Predicate

# The rules every config is checked against. Stage modules add theirs here as they are written.
RULES: list[Rule] = [
    Choice("model.arch", ("qwen2", "qwen3", "llama")),
    Choice("model.dtype", ("float32", "bfloat16")),
    Choice("model.param_dtype", ("float32", "bfloat16")),
    positive_int("model.vocab_size"),
    positive_int("model.hidden_size"),
    positive_int("model.num_layers"),
    positive_int("model.num_heads"),
    positive_int("model.num_kv_heads"),
    positive_int("model.head_dim"),
    positive_int("model.mlp_dim"),
    positive_int("model.max_seq_len"),
    positive_int("optim.batch_size"),
    positive_int("optim.microbatches"),
    positive_int("rl_optim.microbatches"),
    Range("train.num_steps", low=0, integer=True),
    Range("checkpoint.save_every", low=0, integer=True),
    positive_int("checkpoint.max_to_keep"),
    Choice("credit.variant", credit.variant_names()),
    Choice("credit.evidence", credit.EVIDENCE_MODES),
    Choice("credit.norm", credit.NORM_MODES),
    Choice("controller.mode", controller.MODES),
    Choice("grpo.loss_type", grpo.LOSS_TYPES),
    Choice("grpo.scale_rewards", grpo.SCALE_REWARDS_MODES),
    Choice("data.source", ("world", "esci")),  # tasks/relevance.py DATA_SOURCES
    Choice("data.prompt_style", prompts.PROMPT_STYLES),
    Choice("data.answer", prompts.ANSWERS),
    Choice("data.esci.missing", teacher.MISSING_MODES),
    Range("data.esci.val_fraction", low=0.0, high=1.0),
    Range("data.esci.test_fraction", low=0.0, high=1.0),
    Predicate("data.esci.product_fields", lambda fields: _valid_product_fields(fields),
              f"a sequence of {examples.PRODUCT_FIELDS} holding 'title', each once"),
]


def _valid_product_fields(fields: Any) -> bool:
    try:
        examples.check_product_fields(tuple(fields) if not isinstance(fields, str) else fields)
    except (TypeError, ValueError):
        return False
    return True


def _cross_field_errors(config: ml_collections.ConfigDict) -> list[str]:
    errors = []
    heads = get_field(config, "model.num_heads", None)
    kv_heads = get_field(config, "model.num_kv_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads:
        errors.append(f"config.model.num_kv_heads = {kv_heads} must divide config.model.num_heads = {heads}")
    for rows, slices in (("optim.batch_size", "optim.microbatches"), ("rl.prompts_per_step", "rl_optim.microbatches")):
        count, parts = get_field(config, rows, None), get_field(config, slices, None)
        if isinstance(count, int) and isinstance(parts, int) and parts > 0 and count % parts:
            errors.append(f"config.{slices} = {parts} must divide config.{rows} = {count}")
    if get_field(config, "data.prompt_style", "plain") == "chat" and not get_field(config, "model.hf_checkpoint", ""):
        errors.append("config.data.prompt_style = 'chat' needs a checkpoint's chat template: set "
                      "config.model.hf_checkpoint (a tokenizer trained from scratch has none)")
    if get_field(config, "data.source", "world") == "esci" and not get_field(config, "data.esci.path", ""):
        errors.append("config.data.source = 'esci' needs config.data.esci.path: a flat ESCI JSONL file")
    if "rl" in get_field(config, "stages", ()) and get_field(config, "data.answer", "cot") != "cot" \
            and get_field(config, "task", "relevance") == "relevance":
        errors.append(f"config.data.answer = {get_field(config, 'data.answer')!r}: the rl stage rewards the tagged "
                      f"chain of thought, so it needs 'cot'")
    if get_field(config, "credit.norm", None) == "node" and get_field(config, "grpo.scale_rewards", "group") != "group":
        errors.append(f"config.grpo.scale_rewards = {get_field(config, 'grpo.scale_rewards')!r} applies to "
                      f"config.credit.norm = 'outcome' only; 'node' scales each node by its own group std")
    return errors


OPTIMIZER_SECTIONS = ("optim", "rl_optim", "distill.optim")


def _settings_errors(config: ml_collections.ConfigDict, failed_sections: Collection[str]) -> list[str]:
    """What the frozen settings the stages build would refuse (`state.optimizer_settings` of every optimizer
    section, `grpo.grpo_settings`), at start-up rather than stages later; a section whose field rules already
    failed is not checked twice."""
    errors = []
    for section in OPTIMIZER_SECTIONS:
        cfg = get_field(config, section, None)
        if cfg is not None and section not in failed_sections:
            try:
                state.optimizer_settings(cfg, section)
            except ValueError as err:
                errors.append(str(err))
    grpo_cfg = get_field(config, "grpo", None)
    if grpo_cfg is not None and "grpo" not in failed_sections:
        try:
            grpo.grpo_settings(grpo_cfg)
        except ValueError as err:
            errors.append(f"config.grpo: {err}")
    return errors


def checkpoint_errors(config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with the checkpoint folder `config.model.hf_checkpoint` names (nothing when it names none):
    a folder without a usable fast tokenizer, or a tokenizer with more tokens than the embedding has rows,
    would otherwise surface stages later (or, before, train on empty token lists)."""
    folder = get_field(config, "model.hf_checkpoint", None)
    if not folder:
        return []
    from graphgrpo_jax import tokenization  # transformers: loaded only when a checkpoint is named

    try:
        tokenizer = tokenization.load_tokenizer(folder)
    except (OSError, ValueError, TypeError) as err:
        return [f"config.model.hf_checkpoint = {folder!r}: no usable tokenizer in the folder "
                f"(tokenizer.json with tokenizer_config.json; for a GGUF file, import it with "
                f"`python -m graphgrpo_jax.models.gguf`): {type(err).__name__}: {err}"]
    if get_field(config, "data.prompt_style", "plain") == "chat" and not getattr(tokenizer, "chat_template", None):
        return [f"config.data.prompt_style = 'chat' but the tokenizer of config.model.hf_checkpoint = {folder!r} "
                f"has no chat template; use 'plain'"]
    vocab = get_field(config, "model.vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        return [f"config.model.hf_checkpoint = {folder!r}: its tokenizer has {len(tokenizer)} tokens but the "
                f"model's embedding has {vocab} rows (config.model.vocab_size)"]
    if get_field(config, "tokenizer.hf_checkpoint", None) == folder and isinstance(vocab, int):
        from graphgrpo_jax.data import prepare

        needed = prepare.size_with_node_tags(tokenizer)
        if needed > vocab:
            return [f"config.model.hf_checkpoint = {folder!r}: the `data` stage adds the {needed - len(tokenizer)} CoT "
                    f"tags as whole tokens, {needed} in all, but the embedding has {vocab} rows "
                    f"(config.model.vocab_size); leave config.model.vocab_size unset and the embedding grows to fit"]
    return []


def data_file_errors(config: ml_collections.ConfigDict) -> list[str]:
    """The files the data section names that are not there: the ESCI rows, a teacher file (by path)."""
    if get_field(config, "data.source", "world") != "esci":
        return []
    errors = []
    path = get_field(config, "data.esci.path", "")
    if path and not os.path.isfile(path):
        errors.append(f"config.data.esci.path = {path!r}: no such file")
    mode = get_field(config, "data.esci.teacher", "rule")
    if mode not in examples.TEACHER_MODES and not os.path.isfile(str(mode)):
        errors.append(f"config.data.esci.teacher = {mode!r}: neither one of {examples.TEACHER_MODES} nor a "
                      f"teacher file")
    return errors


def validate(config: ml_collections.ConfigDict, *, stages: Collection[str] | None = None,
             extra_rules: list[Rule] = (), check_files: bool = True) -> None:
    """Raises ConfigError listing every invalid field (all of them, not just the first); with `check_files`,
    also what is wrong with the folders the config names (`checkpoint_errors`)."""
    rules = list(RULES) + list(extra_rules)
    if stages is not None:
        rules.append(Choice("stages", tuple(stages), many=True))
    errors, failed_sections = [], set()
    for rule in rules:
        value = get_field(config, rule.path, _ABSENT)
        if value is _ABSENT:
            continue
        problem = rule.check(value)
        if problem:
            errors.append(f"config.{rule.path} = {problem}")
            failed_sections.add(rule.path.rpartition(".")[0])
    errors += _cross_field_errors(config)
    errors += _settings_errors(config, failed_sections)
    if check_files and not errors:
        errors += checkpoint_errors(config) + data_file_errors(config)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
