"""Start-up validation of experiment configs: a wrong value fails before any work, naming the field.

Rules are data: a dotted field path and what it may hold. A rule whose field is absent from a config is
not checked (configs only carry the sections their stages need); `required` fields must be present.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

import ml_collections

from graphgrpo_jax.graph import controller, credit
from graphgrpo_jax.rl import grpo


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
    Range("optim.learning_rate", low=0.0, low_inclusive=False),
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
]


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
    if get_field(config, "credit.norm", None) == "node" and get_field(config, "grpo.scale_rewards", "group") != "group":
        errors.append(f"config.grpo.scale_rewards = {get_field(config, 'grpo.scale_rewards')!r} applies to "
                      f"config.credit.norm = 'outcome' only; 'node' scales each node by its own group std")
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


def validate(config: ml_collections.ConfigDict, *, stages: Collection[str] | None = None,
             extra_rules: list[Rule] = (), check_files: bool = True) -> None:
    """Raises ConfigError listing every invalid field (all of them, not just the first); with `check_files`,
    also what is wrong with the folders the config names (`checkpoint_errors`)."""
    rules = list(RULES) + list(extra_rules)
    if stages is not None:
        rules.append(Choice("stages", tuple(stages), many=True))
    errors = []
    for rule in rules:
        value = get_field(config, rule.path, _ABSENT)
        if value is _ABSENT:
            continue
        problem = rule.check(value)
        if problem:
            errors.append(f"config.{rule.path} = {problem}")
    errors += _cross_field_errors(config)
    if check_files and not errors:
        errors += checkpoint_errors(config)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
