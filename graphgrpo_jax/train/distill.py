"""`distill` stage: graph-node multi-head distillation of the policy into a MiniLM cross-encoder (METHOD.md A5).

Teacher. For every synthetic pair of the train and test splits, the policy's belief about each decision node
(`y`, `ms`, `ma`) is a distribution over the node's allowed values, read one of two ways (`distill.teacher`):

- `forced`: the policy writes its greedy chain of thought; for each node, every allowed value is scored as
  the continuation `<node>value</node>` after the greedy response up to that node's open tag (for `y` under
  the label-first template: right after the prompt), and the scores are normalised over the values
  (`eval/relevance.forced_value_probabilities`, the same scoring the evaluation's label AUC uses).
- `samples`: the share of `num_samples` sampled chains of thought that wrote each value, plus
  `sample_smoothing` pseudo-counts per value, so that no value has zero mass and a node that no sample
  wrote is uniform.
- `gold`: no policy; the world's gold node values, one-hot. This trains the same multi-head cross-encoder
  on the synthetic world's node labels, for pipelines without a relevance policy (the query-rewriting
  pipeline's retrieval judge, `tasks/rewrite.RetrievalJudge`).

The policy teachers are computed once, written atomically to `<workdir>/distill/teacher.npz` together with
the settings and pair ids they came from, and reused by every later run that asks for the same teacher (a
run that asks for another one fails rather than distil from a stale file).

Student. MiniLM-L6 (pretrained) with one classification head per node of `distill.heads`, trained with

    Σ_v λ_v · T² · KL(teacher_v^(T) ‖ student_v^(T)) + ce_weight · CE(gold y)

where ^(T) softens a distribution with temperature T (Hinton et al., 2015; T² keeps the gradient scale of
the soft terms independent of T). Rows without a teacher (ESCI pairs: no node labels, no policy judgement)
contribute to the CE term only. `distill.heads = ("y",)` is the single-head student METHOD.md A5 compares
against. Training runs in the resumable `loop.fit` under the stage name `distill.run_name` (default
"distill"), so several students can be trained from one workdir's teacher; the evaluation of
`eval/student.py` is written to `<workdir>/<run_name>/report.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from graphgrpo_jax import artifacts, mesh as mesh_lib, sampling
from graphgrpo_jax.data import batching, cot, esci, examples as examples_lib, prepare
from graphgrpo_jax.eval import classification, relevance, student as student_eval
from graphgrpo_jax.models import decoder, encoder
from graphgrpo_jax.rl import rollout
from graphgrpo_jax.train import loop, state as state_lib

# Every categorical node the teacher describes and the student may have a head for, with its values.
NODE_VALUES = artifacts.STUDENT_NODE_VALUES  # the categorical nodes a student has heads for
TEACHERS = ("forced", "samples", "gold")
POLICIES = ("sft", "rl")  # checkpoint stages a teacher can come from
TEACHER_SPLITS = ("train", "test")  # train: distillation targets; test: held-out KL


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Static (hashable) settings of `distillation_loss`."""

    heads: tuple[str, ...]  # the heads distilled from the teacher, "y" among them
    weights: tuple[float, ...]  # λ_v, aligned with `heads`
    temperature: float
    ce_weight: float


def loss_settings(cfg: ml_collections.ConfigDict) -> LossSettings:
    """Validates `config.distill` (naming the bad field) and returns its loss settings."""

    def fail(field: str, why: str) -> None:
        raise ValueError(f"config.distill.{field} = {cfg[field]!r}: {why}")

    heads = tuple(cfg.heads)
    if not heads or len(set(heads)) != len(heads) or not set(heads) <= set(NODE_VALUES):
        fail("heads", f"must be distinct nodes among {tuple(NODE_VALUES)}")
    if cot.LABEL_NODE not in heads:
        fail("heads", f"must include the label node {cot.LABEL_NODE!r} (the CE term and every report read it)")
    missing = [node for node in heads if node not in cfg.loss_weights]
    if missing:
        fail("loss_weights", f"has no weight for head(s) {missing}")
    if any(cfg.loss_weights[node] < 0 for node in heads):
        fail("loss_weights", "weights must be >= 0")
    if cfg.policy not in POLICIES:
        fail("policy", f"must be one of {POLICIES}")
    if cfg.teacher not in TEACHERS:
        fail("teacher", f"must be one of {TEACHERS}")
    if not cfg.sources or not set(cfg.sources) <= set(examples_lib.SOURCES):
        fail("sources", f"must be a non-empty subset of {examples_lib.SOURCES}")
    if "esci" in cfg.sources and not cfg.esci_path:
        fail("esci_path", "is empty but sources include 'esci'")
    if cfg.temperature <= 0:
        fail("temperature", "must be > 0")
    if cfg.ce_weight < 0:
        fail("ce_weight", "must be >= 0")
    if cfg.teacher == "samples" and cfg.num_samples < 1:
        fail("num_samples", "must be >= 1")
    if cfg.sample_smoothing < 0:
        fail("sample_smoothing", "must be >= 0")
    for field in ("max_length", "batch_size", "num_steps", "log_every"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            fail(field, "must be a positive int")
    return LossSettings(heads=heads, weights=tuple(float(cfg.loss_weights[node]) for node in heads),
                        temperature=float(cfg.temperature), ce_weight=float(cfg.ce_weight))


# ---------------------------------------------------------------------------------------------------------
# Teacher signals from the policy


def node_prefix(response: Sequence[int], open_id: int, *, label_first_label: bool = False) -> list[int]:
    """Where a node's value is forced: the greedy response up to the node's open tag (all of it when the
    tag never came), or nothing for the label under the label-first template (as `eval/relevance.judge`)."""
    response = list(response)
    if label_first_label:
        return []
    return response[:response.index(open_id)] if open_id in response else response


def sampled_value_probabilities(texts: Sequence[Sequence[str]], node_values: Mapping[str, Sequence[str]],
                                smoothing: float) -> dict[str, np.ndarray]:
    """[B, C_v] per node: (number of row b's sampled texts whose `<v>` holds each allowed value + smoothing),
    normalised; a row with no such text and no smoothing is uniform.

    A text counts for every node it writes with an allowed value, even if another node of it is malformed:
    the value still is what the policy wrote there.
    """
    probabilities = {}
    parses = [[cot.parse(text) for text in row] for row in texts]
    for node, values in node_values.items():
        counts = np.full((len(texts), len(values)), float(smoothing))
        for b, row in enumerate(parses):
            for parse in row:
                value = parse.values.get(node)
                if value in values:
                    counts[b, list(values).index(value)] += 1
        totals = counts.sum(axis=1, keepdims=True)
        probabilities[node] = np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), 1.0 / len(values))
    return probabilities


def greedy_responses(params, model_config: decoder.DecoderConfig, tokenizer, prompt_tokens: np.ndarray,
                     prompt_mask: np.ndarray, max_new_tokens: int) -> list[list[int]]:
    """Each row's greedy response ids, without the final EOS."""
    out = jax.device_get(sampling.generate(
        params, model_config, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), jax.random.PRNGKey(0),
        max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        sampling=sampling.GREEDY))
    responses = []
    for tokens, length, truncated in zip(out.tokens, out.lengths, out.truncated):
        ids = [int(t) for t in tokens[:int(length)]]
        responses.append(ids[:-1] if ids and not truncated else ids)
    return responses


def policy_teacher(params, config: ml_collections.ConfigDict, tokenizer, queries: Sequence[str],
                   titles: Sequence[str]) -> dict[str, np.ndarray]:
    """[N, C_v] teacher distributions per node of `NODE_VALUES` for (query, title) pairs, by
    `config.distill.teacher`, in batches of `config.eval.batch_size` prompts (padded: one compile)."""
    cfg = config.distill
    model_config = decoder.DecoderConfig.from_config(config.model)
    batch_size, response_len = config.eval.batch_size, config.data.max_response_len
    label_first = config.sft.label_position == "first"
    open_ids = {node: relevance.tag_ids(tokenizer, node)[0] for node in NODE_VALUES}
    pieces = rollout.TokenPieces(tokenizer)
    prompts = [cot.prompt_text(query, title) for query, title in zip(queries, titles)]
    chunks = []
    for chunk_index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        enc = batching.encode_prompts(tokenizer, chunk + [chunk[-1]] * (batch_size - len(chunk)),
                                      config.data.max_prompt_len, truncate_prompts=True)
        prompt_tokens, prompt_mask = enc["tokens"], enc["attention_mask"].astype(bool)
        if cfg.teacher == "forced":
            responses = greedy_responses(params, model_config, tokenizer, prompt_tokens, prompt_mask, response_len)
            prefixes = {node: [node_prefix(response, open_ids[node],
                                           label_first_label=label_first and node == cot.LABEL_NODE)
                               for response in responses] for node in NODE_VALUES}
            probs = relevance.forced_value_probabilities(params, model_config, tokenizer, prompt_tokens,
                                                         prompt_mask, prefixes, NODE_VALUES, response_len)
        else:
            group = cfg.num_samples
            out = jax.device_get(sampling.generate(
                params, model_config, jnp.asarray(np.repeat(prompt_tokens, group, axis=0)),
                jnp.asarray(np.repeat(prompt_mask, group, axis=0)),
                jax.random.fold_in(jax.random.PRNGKey(config.seed), chunk_index), max_new_tokens=response_len,
                eos_ids=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                sampling=sampling.SamplingParams(temperature=cfg.sample_temperature)))
            texts, _ = rollout.decode_completions(pieces, out.tokens, out.lengths, out.truncated)
            probs = sampled_value_probabilities([texts[b * group:(b + 1) * group] for b in range(batch_size)],
                                                NODE_VALUES, cfg.sample_smoothing)
        chunks.append({node: p[:len(chunk)] for node, p in probs.items()})
    return {node: np.concatenate([c[node] for c in chunks]).astype(np.float32) for node in NODE_VALUES}


# ---------------------------------------------------------------------------------------------------------
# The teacher file

Teacher = dict[str, dict[str, np.ndarray]]  # split -> node -> [N, C] distributions over NODE_VALUES[node]


def teacher_meta(config: ml_collections.ConfigDict, world) -> dict[str, Any]:
    """What a teacher file was computed from; a file is reused only when all of it matches."""
    cfg = config.distill
    meta = {"policy": cfg.policy, "teacher": cfg.teacher, "label_position": config.sft.label_position,
            "values": {node: list(values) for node, values in NODE_VALUES.items()},
            "pair_ids": {split: [pair.pair_id for pair in world.split_pairs(split)] for split in TEACHER_SPLITS}}
    if cfg.teacher == "samples":
        meta.update(num_samples=cfg.num_samples, sample_temperature=cfg.sample_temperature,
                    sample_smoothing=cfg.sample_smoothing, seed=config.seed)
    return meta


def save_teacher(path: str, teacher: Teacher, meta: Mapping[str, Any]) -> None:
    """Writes the distributions and their meta atomically (a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    arrays = {f"{split}/{node}": np.asarray(probs, np.float32)
              for split, nodes in teacher.items() for node, probs in nodes.items()}
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        np.savez(f, meta=np.asarray(json.dumps(dict(meta), sort_keys=True)), **arrays)
    os.replace(temporary, path)


def load_teacher(path: str) -> tuple[Teacher, dict[str, Any]]:
    """The distributions and meta of a teacher file, checked: every array is [pairs of its split, values of
    its node] and its rows are distributions."""
    with np.load(path, allow_pickle=False) as data:
        if "meta" not in data.files:
            raise ValueError(f"{path}: no 'meta' entry; not a teacher file")
        meta = json.loads(str(data["meta"]))
        teacher: Teacher = {}
        for key in data.files:
            if key == "meta":
                continue
            split, _, node = key.partition("/")
            probs = data[key]
            expected = (len(meta["pair_ids"].get(split, ())), len(meta["values"].get(node, ())))
            if probs.shape != expected:
                raise ValueError(f"{path}: {key} has shape {probs.shape}, expected {expected} (pairs of split "
                                 f"{split!r}, values of node {node!r})")
            if not (np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)):
                raise ValueError(f"{path}: {key} has rows that are not probability distributions")
            teacher.setdefault(split, {})[node] = probs
    return teacher, meta


def gold_teacher(world) -> Teacher:
    """One-hot distributions of the world's gold node values (`distill.teacher = "gold"`)."""
    return {split: {node: np.eye(len(values), dtype=np.float32)[[values.index(p.gold[node]) for p in pairs]]
                    for node, values in NODE_VALUES.items()}
            for split in TEACHER_SPLITS for pairs in [world.split_pairs(split)]}


def ensure_teacher(config: ml_collections.ConfigDict, workdir: str, world) -> Teacher:
    """The teacher of `artifacts.distill_teacher_path(workdir)`, computed from the policy and saved first if absent (the gold
    teacher is read from the world, nothing saved)."""
    if config.distill.teacher == "gold":
        return gold_teacher(world)
    path, expected = artifacts.distill_teacher_path(workdir), teacher_meta(config, world)
    if os.path.exists(path):
        teacher, meta = load_teacher(path)
        differing = sorted(key for key in expected.keys() | meta.keys() if expected.get(key) != meta.get(key))
        if differing:
            raise ValueError(f"{path} was computed with other {differing} than this config asks for; delete it "
                             f"to recompute, or distil in another workdir")
        return teacher
    params = artifacts.policy_params(config, workdir, config.distill.policy)
    tokenizer = artifacts.load_tokenizer(config, workdir)
    teacher = {split: policy_teacher(params, config, tokenizer, [p.query for p in pairs],
                                     [p.product_title for p in pairs])
               for split in TEACHER_SPLITS for pairs in [world.split_pairs(split)]}
    if jax.process_index() == 0:
        save_teacher(path, teacher, expected)
    return teacher


# ---------------------------------------------------------------------------------------------------------
# Training examples


class StudentExamples(NamedTuple):
    """Encoded pairs with their gold label and (where there is one) the teacher's distributions."""

    pairs: encoder.EncodedPairs
    gold_y: np.ndarray  # [N] int32 index in cot.LABELS
    teacher: dict[str, np.ndarray]  # node -> [N, C] float32; uniform (a finite stand-in) without a teacher
    has_teacher: np.ndarray  # [N] bool

    @property
    def num_examples(self) -> int:
        return len(self.gold_y)

    def batch(self, rows: np.ndarray) -> dict[str, Any]:
        return {"input_ids": self.pairs.input_ids[rows], "token_type_ids": self.pairs.token_type_ids[rows],
                "attention_mask": self.pairs.attention_mask[rows], "gold_y": self.gold_y[rows],
                "has_teacher": self.has_teacher[rows], "teacher": {n: p[rows] for n, p in self.teacher.items()}}


def student_examples(tokenizer, queries: Sequence[str], titles: Sequence[str], labels: Sequence[str],
                     teacher: Mapping[str, np.ndarray] | None, heads: Sequence[str], max_length: int
                     ) -> StudentExamples:
    """Examples for the heads `heads`; `teacher=None` marks rows that only have a gold label."""
    num = len(labels)
    if teacher is None:
        teacher_rows = {node: np.full((num, len(NODE_VALUES[node])), 1.0 / len(NODE_VALUES[node]), np.float32)
                        for node in heads}
    else:
        teacher_rows = {node: np.asarray(teacher[node], np.float32) for node in heads}
    return StudentExamples(pairs=encoder.encode_pairs(tokenizer, queries, titles, max_length),
                           gold_y=np.asarray([cot.LABELS.index(label) for label in labels], np.int32),
                           teacher=teacher_rows, has_teacher=np.full(num, teacher is not None))


def concatenate(parts: Sequence[StudentExamples]) -> StudentExamples:
    return jax.tree_util.tree_map(lambda *arrays: np.concatenate(arrays), *parts)


def training_examples(config: ml_collections.ConfigDict, world, train_teacher: Mapping[str, np.ndarray],
                      esci_data: esci.EsciData | None, tokenizer) -> StudentExamples:
    cfg = config.distill
    parts = []
    if "world" in cfg.sources:
        pairs = world.split_pairs("train")
        parts.append(student_examples(tokenizer, [p.query for p in pairs], [p.product_title for p in pairs],
                                      [p.label for p in pairs], train_teacher, cfg.heads, cfg.max_length))
    if "esci" in cfg.sources:
        rows = esci_data.split("train")
        parts.append(student_examples(tokenizer, [e.query for e in rows], [e.product_title for e in rows],
                                      [e.label for e in rows], None, cfg.heads, cfg.max_length))
    examples = concatenate(parts)
    if examples.num_examples < cfg.batch_size:
        raise ValueError(f"config.distill.batch_size = {cfg.batch_size} exceeds the {examples.num_examples} "
                         f"training pairs of sources {tuple(cfg.sources)}")
    return examples


# ---------------------------------------------------------------------------------------------------------
# Loss and step


def distillation_loss(logits: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array], has_teacher: jax.Array,
                      gold_y: jax.Array, settings: LossSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Σ_v λ_v·T²·KL(teacher_v^(T) ‖ student_v^(T)) over rows with a teacher + ce_weight·CE(gold y) over all.

    Each KL is the mean over the rows that have a teacher (0 when none does); a teacher value of
    probability 0 contributes 0 (and a finite gradient).
    """
    t = settings.temperature
    weight = has_teacher.astype(jnp.float32)
    num_taught = jnp.maximum(weight.sum(), 1.0)
    total, metrics = jnp.zeros((), jnp.float32), {}
    for node, lam in zip(settings.heads, settings.weights):
        log_q = jax.nn.log_softmax(logits[node] / t, axis=-1)
        log_p = jax.nn.log_softmax(jnp.log(teacher[node]) / t, axis=-1)
        p = jnp.exp(log_p)
        kl_rows = jnp.where(p > 0, p * (log_p - log_q), 0.0).sum(axis=-1)
        kl = (kl_rows * weight).sum() / num_taught
        total += lam * t ** 2 * kl
        metrics[f"distill/kl/{node}"] = kl
    log_q_y = jax.nn.log_softmax(logits[cot.LABEL_NODE], axis=-1)
    ce = -jnp.take_along_axis(log_q_y, gold_y[:, None], axis=-1)[:, 0].mean()
    total += settings.ce_weight * ce
    metrics |= {"distill/loss": total, "distill/ce": ce,
                "distill/accuracy": (log_q_y.argmax(-1) == gold_y).mean()}
    return total, metrics


def make_train_step(encoder_config: encoder.EncoderConfig, optimizer: optax.GradientTransformation,
                    settings: LossSettings):
    """A pure `step(state, batch) -> (state, metrics)` over a state `{"params", "opt_state"}` (no dropout,
    so no rng: a step is a deterministic function of the state and the batch)."""

    def loss_fn(params, batch):
        logits = encoder.node_logits(params, encoder_config, batch["input_ids"], batch["token_type_ids"],
                                     batch["attention_mask"])
        return distillation_loss(logits, batch["teacher"], batch["has_teacher"], batch["gold_y"], settings)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        metrics["distill/grad_norm"] = optax.global_norm(grads)
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, metrics

    return step


@functools.lru_cache(maxsize=4)
def _cached_step(encoder_config: encoder.EncoderConfig, settings: LossSettings,
                 optim_settings: state_lib.OptimizerSettings, num_steps: int):
    """The step function and its optimizer, cached on their frozen settings so that repeated runs in one process
    (ablations, tests) jit the same function, which JAX compiles once per layout."""
    optimizer = state_lib.make_optimizer(optim_settings, num_steps)
    return make_train_step(encoder_config, optimizer, settings), optimizer


# ---------------------------------------------------------------------------------------------------------
# The stage


def init_student(encoder_config: encoder.EncoderConfig, heads: Sequence[str], seed: int) -> encoder.Params:
    """Pretrained MiniLM body with fresh heads (one per node of `heads`)."""
    return encoder.load_pretrained(encoder.minilm_folder(), encoder_config,
                                   artifacts.student_head_sizes(heads), jax.random.PRNGKey(seed))


def evaluate(params: encoder.Params, config: ml_collections.ConfigDict, encoder_config: encoder.EncoderConfig,
             tokenizer, world, test_teacher: Mapping[str, np.ndarray], esci_data: esci.EsciData | None) -> dict:
    """The student on the synthetic test split (per-node accuracy, label report, held-out KL per head) and,
    with ESCI data, on its held-out queries against the majority class of its training queries."""
    cfg = config.distill
    predict = functools.partial(encoder.head_probabilities, params, encoder_config, tokenizer,
                                max_length=cfg.max_length, batch_size=cfg.batch_size)
    pairs = world.split_pairs("test")
    probs = predict([p.query for p in pairs], [p.product_title for p in pairs])
    gold = {node: [values.index(p.gold[node]) for p in pairs] for node, values in NODE_VALUES.items()}
    report = {"heads": list(cfg.heads), "num_steps": cfg.num_steps,
              "synthetic_test": student_eval.node_report(probs, gold, test_teacher)}
    if esci_data is not None:
        test = esci_data.split("test")
        y_probs = predict([e.query for e in test], [e.product_title for e in test])[cot.LABEL_NODE]
        gold_y = [cot.LABELS.index(e.label) for e in test]
        report["esci_test"] = {
            "student": classification.classification_report(
                gold_y, y_probs.argmax(-1), cot.LABELS, probs=y_probs, negative_class=student_eval.NEGATIVE_LABEL),
            "majority": student_eval.majority_report([e.label for e in esci_data.split("train")],
                                                     [e.label for e in test])}
    return report


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    cfg = config.distill
    settings = loss_settings(cfg)
    optim_settings = state_lib.optimizer_settings(cfg.optim, "distill.optim")  # before the teacher: fail early
    world = prepare.load_world(config)
    teacher = ensure_teacher(config, workdir, world)
    encoder_config = artifacts.student_config()
    tokenizer = encoder.load_pair_tokenizer(encoder.minilm_folder())
    esci_data = esci.read_flat_jsonl(cfg.esci_path, test_fraction=cfg.esci_test_fraction) if cfg.esci_path else None
    examples = training_examples(config, world, teacher["train"], esci_data, tokenizer)

    # The student is sharded by the same logical rules as the policy (its params name the same axes:
    # vocab, embed, heads, mlp); each process places only its slices of the pretrained weights.
    layout = mesh_lib.Layout.from_config(config.get("mesh"))
    step_fn, optimizer = _cached_step(encoder_config, settings, optim_settings, cfg.num_steps)
    head_sizes = artifacts.student_head_sizes(cfg.heads)
    logical_axes = encoder.param_logical_axes(encoder_config, head_sizes)
    pretrained = init_student(encoder_config, cfg.heads, config.seed)
    params = mesh_lib.host_to_global(pretrained, layout.param_shardings(pretrained, logical_axes))
    state, shardings = layout.init(lambda p: {"params": p, "opt_state": optimizer.init(p)}, logical_axes, params)

    def batch_fn(step: int) -> dict:
        rows = np.random.default_rng([config.seed, 4, step]).choice(examples.num_examples, cfg.batch_size,
                                                                    replace=False)
        return layout.load_batch(rows, examples.batch)

    state = loop.fit(state, layout.step(step_fn, shardings), batch_fn, num_steps=cfg.num_steps, workdir=workdir,
                     stage=cfg.run_name, save_every=config.checkpoint.save_every,
                     max_to_keep=config.checkpoint.max_to_keep, log_every=cfg.log_every,
                     progress_keys=("distill/loss", "distill/accuracy"))
    report = evaluate(state["params"], config, encoder_config, tokenizer, world, teacher["test"], esci_data)
    if jax.process_index() == 0:
        path = os.path.join(workdir, cfg.run_name, "report.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(f"{path}.tmp", path)
    return report
