"""Start-up validation of experiment configs: a wrong value fails before any work, naming the field.

`SCHEMA` declares, field by field, the choices and ranges a config may hold; a rule whose field is absent
from a config is not checked (configs carry the sections their stages need). On top of it: rules across
fields (`_cross_field_errors`, some only for the stages that will run), the frozen settings the stages build
(optimizers, GRPO, graph and credit), and the files and folders those stages read. `unknown_field_error`
names the nearest fields of a misspelled one (main.py's flag parser uses it).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Collection
from typing import Any

import ml_collections

from graphgrpo_jax import tasks
from graphgrpo_jax.data import cot, esci, examples, prompts, rewrite_data, teacher, world
from graphgrpo_jax.graph import controller, credit
from graphgrpo_jax.graph.spec import graph_spec
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


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field of `config` as a dotted path (`model.hf_checkpoint`)."""
    paths = []
    for key in config.keys():
        value, path = config[key], f"{prefix}{key}"
        paths += field_paths(value, path + ".") if isinstance(value, (ml_collections.ConfigDict, dict)) else [path]
    return paths


def unknown_field_error(config: ml_collections.ConfigDict, path: str) -> str | None:
    """None when the dotted `path` names a field of `config`; otherwise what is wrong, with the nearest names
    (in the same section first, then anywhere): `config.model.hf_ckpt` -> did you mean config.model.hf_checkpoint."""
    node: Any = config
    parts = path.split(".")
    for depth, part in enumerate(parts):
        section = ".".join(parts[:depth])
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            return f"config.{path}: config.{section} is a value, not a section"
        if part in node:
            node = node[part]
            continue
        where = f"config.{section}" if section else "the config"
        names = [f"{section}.{name}" if section else str(name)
                 for name in difflib.get_close_matches(part, [str(k) for k in node.keys()], n=3, cutoff=0.6)]
        if not names:  # a right name in the wrong section: match the last part against every field
            leaves = {p: p.rsplit(".", 1)[-1] for p in field_paths(config)}
            close = set(difflib.get_close_matches(parts[-1], set(leaves.values()), n=3, cutoff=0.75))
            names = sorted(p for p, leaf in leaves.items() if leaf in close)[:5]
        hint = f"; did you mean {' or '.join(f'config.{n}' for n in names)}?" if names else ""
        return f"config.{path}: {where} has no field {part!r}{hint}"
    return None


@dataclasses.dataclass(frozen=True)
class Choice:
    path: str
    allowed: Collection[Any]
    many: bool = False  # the field holds a sequence of choices (e.g. the stages to run)

    def check(self, value: Any) -> str | None:
        if self.many and isinstance(value, str):
            return f"{value!r} is not a sequence; a tuple of {', '.join(map(repr, self.allowed))}"
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

def boolean(path: str) -> Predicate:
    return Predicate(path, lambda value: isinstance(value, bool), "True or False")


def probability(path: str) -> Range:
    return Range(path, low=0.0, high=1.0)


def positive(path: str) -> Range:
    return Range(path, low=0.0, low_inclusive=False)


def non_negative(path: str, integer: bool = False) -> Range:
    return Range(path, low=0, integer=integer)


OPTIMIZER_SECTIONS = ("optim", "rl_optim", "distill.optim")

# The choices of fields read only by heavy stage modules (transformers, tantivy, orbax), written out here so that
# validating a config imports none of them; tests/test_config_schema.py checks each against its consumer's constant.
SFT_AND_RL_POLICIES = ("sft", "rl")  # train/distill.POLICIES, train/export (what a run's checkpoints hold)
EVAL_POLICIES = ("sft", "rl", "base", "student")  # train/evaluate.FILE_POLICIES (the eval_file stage)
EVAL_STAGE_POLICIES = EVAL_POLICIES[:3]  # the eval stage judges a run's policies, not its student
DISTILL_TEACHERS = ("forced", "samples", "gold")  # train/distill.TEACHERS
STUDENT_HEADS = ("y", "ms", "ma")  # artifacts.STUDENT_NODE_VALUES
EXPORT_DTYPES = ("float32", "bfloat16")  # train/export.DTYPES
REWRITE_JUDGES = ("tagger", "rule", "student", "retrieval_rule")  # tasks/rewrite.JUDGES
REWRITE_RL_QUERIES = ("all", "unlabelled")  # tasks/rewrite.RL_QUERIES
REWRITE_WORLD_ONLY_JUDGES = ("rule", "retrieval_rule")  # tasks/rewrite.WORLD_ONLY_JUDGES
REWRITE_EVAL_SPLITS = tuple(dict.fromkeys(world.SPLITS + rewrite_data.POOL_SPLITS))  # by data.source, below
FUSION_MODES = ("rfusion", "product", "min", "rel", "conv", "rule")  # rl/rewards.FUSION_MODES
FUSIONS_READING_REL = ("rfusion", "product", "min", "rel")  # the modes whose rl/rewards.FUSION_INPUTS hold "rel"
CONVERSION_METRICS = ("recall", "ndcg")  # rl/rewards.CONVERSION_METRICS
HELD_OUT_SPLITS = tuple(dict.fromkeys(examples.SPLITS + world.SPLITS))  # train, val, test, ood
FILE_SPLITS = ("all", *esci.SPLITS)  # eval.input_split: a file's rows, or one of its query splits
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # models/decoder
RL_STAGES = ("rl",)  # main.STAGES that run GRPO (both tasks)

# The declared schema: every choice and every range a config field may hold, section by section. A field
# absent from a config is not checked (configs carry the sections their stages need); tests walk this list
# (a bad value of every field fails naming it) and the configs (every text field is here or is free text).
SCHEMA: tuple[Rule, ...] = (
    Range("seed", low=0, integer=True),
    Choice("task", tasks.task_names()),
    # model
    Choice("model.arch", ("qwen2", "qwen3", "llama")),
    Choice("model.dtype", ("float32", "bfloat16")),
    Choice("model.param_dtype", ("float32", "bfloat16")),
    *(positive_int(f"model.{field}") for field in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                                   "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len",
                                                   "scan_unroll")),
    positive("model.rope_theta"),
    positive("model.rms_norm_eps"),
    *(boolean(f"model.{field}") for field in ("qk_norm", "qkv_bias", "tie_embeddings", "remat")),
    non_negative("model.lora_rank", integer=True),
    positive("model.lora_alpha"),
    Choice("model.lora_targets", LORA_TARGETS, many=True),
    Range("model.lora_dropout", low=0.0, high=0.99),
    positive_int("tokenizer.vocab_size"),
    # optimizers (also checked whole by state.optimizer_settings, below)
    *(rule for section in OPTIMIZER_SECTIONS for rule in (
        Choice(f"{section}.schedule", state.SCHEDULES),
        positive(f"{section}.learning_rate"),
        non_negative(f"{section}.warmup_steps", integer=True),
        non_negative(f"{section}.weight_decay"),
        positive(f"{section}.grad_clip"),
    )),
    positive_int("optim.batch_size"),
    positive_int("optim.microbatches"),
    positive_int("rl_optim.microbatches"),
    non_negative("checkpoint.save_every", integer=True),
    positive_int("checkpoint.max_to_keep"),
    # data
    Choice("data.source", examples.SOURCES),
    Choice("data.prompt_style", prompts.PROMPT_STYLES),
    Choice("data.answer", prompts.ANSWERS),
    positive_int("data.max_prompt_len"),
    positive_int("data.max_response_len"),
    Choice("data.esci.missing", teacher.MISSING_MODES),
    probability("data.esci.val_fraction"),
    probability("data.esci.test_fraction"),
    non_negative("data.esci.split_seed", integer=True),
    boolean("data.esci.skip_bad_rows"),
    Predicate("data.esci.product_fields", lambda fields: _valid_product_fields(fields),
              f"a sequence of {examples.PRODUCT_FIELDS} holding 'title', each once"),
    *(positive_int(f"world.{field}") for field in ("num_queries", "pairs_per_query", "products_per_type")),
    non_negative("world.seed", integer=True),
    probability("world.corrupt_cot_share"),
    # sft
    non_negative("sft.num_steps", integer=True),
    positive_int("sft.log_every"),
    probability("sft.p_mask"),
    Choice("sft.mask_unit", cot.MASK_UNITS),
    Choice("sft.label_position", cot.LABEL_POSITIONS),
    # rl, grpo, credit, controller
    non_negative("rl.num_steps", integer=True),
    positive_int("rl.prompts_per_step"),
    positive_int("rl.log_every"),
    positive("rl.temperature"),
    non_negative("rl.top_k", integer=True),
    Range("rl.top_p", low=0.0, high=1.0, low_inclusive=False),
    Range("rl.r_format", high=0.0),
    Choice("grpo.loss_type", grpo.LOSS_TYPES),
    Choice("grpo.scale_rewards", grpo.SCALE_REWARDS_MODES),
    Range("grpo.num_generations", low=2, integer=True),
    positive_int("grpo.num_iterations"),
    positive_int("grpo.max_completion_length"),
    non_negative("grpo.beta"),
    non_negative("grpo.epsilon"),
    non_negative("grpo.epsilon_high"),
    boolean("grpo.mask_truncated_completions"),
    Predicate("grpo.delta", lambda delta: delta is None or (isinstance(delta, (int, float)) and delta > 1),
              "None (no dual clip) or a ratio cap > 1 + epsilon_high"),
    Choice("credit.variant", credit.variant_names()),
    Choice("credit.evidence", credit.EVIDENCE_MODES),
    Choice("credit.norm", credit.NORM_MODES),
    non_negative("credit.kappa"),  # a pseudo-count towards the group mean
    non_negative("credit.eps"),
    Choice("controller.mode", controller.MODES),
    Choice("controller.optimizer", controller.OPTIMIZERS),
    positive("controller.learning_rate"),
    non_negative("controller.grad_tol"),
    # eval, export
    Choice("eval.policies", EVAL_POLICIES, many=True),
    Choice("eval.splits", HELD_OUT_SPLITS, many=True),
    Choice("eval.input_split", FILE_SPLITS),
    probability("eval.input_test_fraction"),
    positive_int("eval.max_examples"),
    positive_int("eval.batch_size"),
    boolean("eval.skip_bad_rows"),
    Choice("export.dtype", EXPORT_DTYPES),
    Choice("export.policies", SFT_AND_RL_POLICIES, many=True),
    # distill
    Choice("distill.policy", SFT_AND_RL_POLICIES),
    Choice("distill.teacher", DISTILL_TEACHERS),
    Choice("distill.sources", examples.SOURCES, many=True),
    Choice("distill.heads", STUDENT_HEADS, many=True),
    positive("distill.temperature"),
    positive("distill.sample_temperature"),
    non_negative("distill.sample_smoothing"),
    non_negative("distill.ce_weight"),
    *(positive_int(f"distill.{field}") for field in ("num_samples", "batch_size", "max_length", "log_every")),
    non_negative("distill.num_steps", integer=True),
    probability("distill.esci_test_fraction"),
    *(non_negative(f"distill.loss_weights.{node}") for node in STUDENT_HEADS),
    # rewrite
    Choice("rewrite.judge", REWRITE_JUDGES),
    Choice("rewrite.fusion", FUSION_MODES),
    Choice("rewrite.conv_metric", CONVERSION_METRICS),
    Choice("rewrite.rl_queries", REWRITE_RL_QUERIES),
    positive_int("rewrite.k"),
    positive_int("rewrite.judge_batch_size"),
    non_negative("rewrite.w_rel"),
    non_negative("rewrite.w_conv"),
    non_negative("rewrite_sft.num_steps", integer=True),
    positive_int("rewrite_sft.log_every"),
    probability("rewrite_sft.labelled_fraction"),
    Predicate("rewrite_sft.tagged_fraction", lambda share: share is None or (
        isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share <= 1),
              "None (the labelled queries) or a share in [0, 1]"),
    non_negative("rewrite_sft.task_mix.rewrite"),
    non_negative("rewrite_sft.task_mix.tag"),
    *(non_negative(f"rewrite.rule.{field}", integer=True) for field in ("min_words", "max_words",
                                                                         "max_word_repeats", "max_chars")),
    Choice("rewrite_eval.policies", EVAL_STAGE_POLICIES, many=True),
    Choice("rewrite_eval.splits", REWRITE_EVAL_SPLITS, many=True),
    Choice("rewrite_data.rewrite_format", rewrite_data.REWRITE_FORMATS),
    non_negative("rewrite_data.pool_seed", integer=True),
    probability("rewrite_data.pool_rl_fraction"),
    boolean("rewrite_data.skip_bad_rows"),
    *(positive_int(f"rewrite_eval.{field}") for field in ("k", "batch_size", "max_examples")),
    *(positive_int(f"lm_smoke.{field}") for field in ("num_steps", "log_every", "seq_len", "vocab_size")),
    # mesh (axis sizes; -1: every device left)
    *(Range(f"mesh.{axis}", low=-1, integer=True) for axis in ("data", "fsdp", "tensor")),
    boolean("mesh.distributed"),
)


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
    dropout, stages = get_field(config, "model.lora_dropout", 0.0), get_field(config, "stages", ())
    running_rl = [stage for stage in stages if stage in RL_STAGES] if not isinstance(stages, str) else []
    if get_field(config, "model.lora_rank", 0) and isinstance(dropout, (int, float)) and dropout > 0 and running_rl:
        errors.append(f"config.model.lora_dropout = {dropout} with the {running_rl[0]!r} stage: GRPO's sampler and "
                      "its importance ratios read the adapters without dropout, so the loss would score another "
                      "policy than the one sampled; set it to 0 for RL (run SFT with dropout as its own stage)")
    if get_field(config, "data.prompt_style", "plain") == "chat" and not get_field(config, "model.hf_checkpoint", ""):
        errors.append("config.data.prompt_style = 'chat' needs a checkpoint's chat template: set "
                      "config.model.hf_checkpoint (a tokenizer trained from scratch has none)")
    real = get_field(config, "data.source", "world") == "esci"
    rewrite = get_field(config, "task", "relevance") == "rewrite"
    if real and not rewrite and not get_field(config, "data.esci.path", ""):
        errors.append("config.data.source = 'esci' needs config.data.esci.path: a flat ESCI JSONL file")
    if real and rewrite:
        errors += _real_rewrite_errors(config)
    if rewrite and "rewrite_eval" in get_field(config, "stages", ()):
        splits = rewrite_data.POOL_SPLITS if real else world.SPLITS
        wrong = sorted(set(get_field(config, "rewrite_eval.splits", ())) - set(splits))
        if wrong:
            errors.append(f"config.rewrite_eval.splits = {tuple(get_field(config, 'rewrite_eval.splits'))}: "
                          f"config.data.source = {get_field(config, 'data.source', 'world')!r} has the splits "
                          f"{splits}, not {wrong}")
        if "base" in get_field(config, "rewrite_eval.policies", ()) and not get_field(config, "model.hf_checkpoint", ""):
            errors.append("config.rewrite_eval.policies includes 'base' (the pretrained checkpoint, zero-shot): set "
                          "config.model.hf_checkpoint")
    if "rl" in get_field(config, "stages", ()) and get_field(config, "data.answer", "cot") != "cot" \
            and get_field(config, "task", "relevance") == "relevance":
        errors.append(f"config.data.answer = {get_field(config, 'data.answer')!r}: the rl stage rewards the tagged "
                      f"chain of thought, so it needs 'cot'")
    if get_field(config, "credit.norm", None) == "node" and get_field(config, "grpo.scale_rewards", "group") != "group":
        errors.append(f"config.grpo.scale_rewards = {get_field(config, 'grpo.scale_rewards')!r} applies to "
                      f"config.credit.norm = 'outcome' only; 'node' scales each node by its own group std")
    stages = tuple(get_field(config, "stages", ()))
    if "eval" in stages:
        extra = sorted(set(get_field(config, "eval.policies", ())) - set(EVAL_STAGE_POLICIES))
        if extra:
            errors.append(f"config.eval.policies = {tuple(get_field(config, 'eval.policies'))}: the eval stage judges "
                          f"{EVAL_STAGE_POLICIES}, not {extra} (the student: the eval_file stage)")
        source = get_field(config, "data.source", "world")
        splits = world.SPLITS if source == "world" else examples.SPLITS
        wrong = sorted(set(get_field(config, "eval.splits", ())) - set(splits))
        if wrong:
            errors.append(f"config.eval.splits = {tuple(get_field(config, 'eval.splits'))}: config.data.source = "
                          f"{source!r} has the splits {splits}, not {wrong}")
    if "distill" in stages:
        if cot.LABEL_NODE not in get_field(config, "distill.heads", STUDENT_HEADS):
            errors.append(f"config.distill.heads = {tuple(get_field(config, 'distill.heads'))}: must include the "
                          f"label node {cot.LABEL_NODE!r} (the CE term and every report read it)")
        if "esci" in get_field(config, "distill.sources", ()) and not get_field(config, "distill.esci_path", ""):
            errors.append("config.distill.sources includes 'esci': set config.distill.esci_path (a flat ESCI JSONL)")
    return errors


def _real_rewrite_errors(config: ml_collections.ConfigDict) -> list[str]:
    """The rewrite task on real data: its files named, and no option that only the synthetic world can serve."""
    errors = []
    for field in ("train_path", "val_path", "test_path"):
        if not get_field(config, f"rewrite_data.{field}", ""):
            errors.append(f"config.data.source = 'esci' needs config.rewrite_data.{field}: a query file")
    if not get_field(config, "rewrite_data.pool_paths", ()):
        errors.append("config.data.source = 'esci' needs config.rewrite_data.pool_paths: ESCI pair files of products")
    judge = get_field(config, "rewrite.judge", "tagger")
    if get_field(config, "rewrite.fusion", "rfusion") in FUSIONS_READING_REL and judge in REWRITE_WORLD_ONLY_JUDGES:
        errors.append(f"config.rewrite.judge = {judge!r} is an oracle of the synthetic world's gold intents; with "
                      f"config.data.source = 'esci' choose 'tagger' or 'student'")
    if get_field(config, "rewrite.rl_queries", "all") != "all":
        errors.append(f"config.rewrite.rl_queries = {get_field(config, 'rewrite.rl_queries')!r} splits the synthetic "
                      f"world's queries; real data trains GRPO on its pool queries: set it to 'all'")
    return errors


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
    graph_cfg, credit_cfg = get_field(config, "graph", None), get_field(config, "credit", None)
    if graph_cfg is not None and "graph" not in failed_sections:
        try:
            spec = graph_spec(graph_cfg)
            if credit_cfg is not None and "credit" not in failed_sections:
                credit.credit_settings(credit_cfg, spec)  # its pairing with grpo.scale_rewards: above
        except ValueError as err:
            errors.append(f"config.graph / config.credit: {err}")
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
    """The files the data section names that are not there: the ESCI rows, a teacher file (by path); for the
    rewrite task, its query files and pool files."""
    if get_field(config, "data.source", "world") != "esci":
        return []
    if get_field(config, "task", "relevance") == "rewrite":
        paths = [(f"rewrite_data.{field}", get_field(config, f"rewrite_data.{field}", ""))
                 for field in ("train_path", "val_path", "test_path")]
        paths += [(f"rewrite_data.pool_paths[{i}]", path)
                  for i, path in enumerate(get_field(config, "rewrite_data.pool_paths", ()))]
        return [f"config.{field} = {path!r}: no such file" for field, path in paths if path and not os.path.isfile(path)]
    errors = []
    path = get_field(config, "data.esci.path", "")
    if path and not os.path.isfile(path):
        errors.append(f"config.data.esci.path = {path!r}: no such file")
    mode = get_field(config, "data.esci.teacher", "rule")
    if mode not in examples.TEACHER_MODES and not os.path.isfile(str(mode)):
        errors.append(f"config.data.esci.teacher = {mode!r}: neither one of {examples.TEACHER_MODES} nor a "
                      f"teacher file")
    return errors


def stage_file_errors(config: ml_collections.ConfigDict) -> list[str]:
    """The files and folders that the stages about to run read and that are not there, by the field naming them."""
    stages = set(get_field(config, "stages", ()))
    errors = []

    def need(path: str, kind: str, contents: str = "") -> None:
        value = get_field(config, path, "")
        if not value:
            return
        if kind == "file" and not os.path.isfile(value):
            errors.append(f"config.{path} = {value!r}: no such file")
        elif kind == "folder" and not os.path.isdir(value):
            errors.append(f"config.{path} = {value!r}: no such folder")
        elif contents and not os.path.exists(os.path.join(value, contents)):
            errors.append(f"config.{path} = {value!r}: holds no {contents} (is it a finished run's workdir?)")

    if "eval_file" in stages:
        need("eval.input_path", "file")
        need("eval.checkpoint_workdir", "folder", "config.json")
    if "distill" in stages and "esci" in get_field(config, "distill.sources", ()):
        need("distill.esci_path", "file")
    if "rl" in stages and get_field(config, "rewrite.judge", None) == "student":
        need("rewrite.student_workdir", "folder", "config.json")
    return errors


def validate(config: ml_collections.ConfigDict, *, stages: Collection[str] | None = None,
             extra_rules: list[Rule] = (), check_files: bool = True) -> None:
    """Raises ConfigError listing every invalid field (all of them, not just the first); with `check_files`,
    also what is wrong with the folders the config names (`checkpoint_errors`)."""
    rules = list(SCHEMA) + list(extra_rules)
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
        errors += checkpoint_errors(config) + data_file_errors(config) + stage_file_errors(config)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
