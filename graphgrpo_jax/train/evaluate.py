"""Evaluation stages.

`eval`: the pipeline's policies (SFT and RL checkpoints, or "base": the pretrained checkpoint untrained, the
zero-shot baseline, best with `config.data.answer = "label"`) on the held-out splits of the run's data source
(`config.data.source`: the world's test / ood, or an ESCI file's val / test queries), written to
`<workdir>/eval/metrics.json`: for every policy and split, the full classification report of
`eval/relevance.py` (accuracy, macro-F1, per-class P/R/F1, AUC, confusion matrix, format failures).

`eval_file`: the eval-only mode. Judges every row of any ESCI-format JSONL file (`config.eval.input_path`,
read by `data/esci.py`, whose errors name the file, row and field) with the checkpoints of a finished run
(`config.eval.checkpoint_workdir`, default the workdir itself): the policies "sft" / "rl" through their
chain of thought, prompted exactly as the run's own eval prompts (its prompt style, chat template, product
fields and truncation rule), and "student", the distilled encoder. The model shapes come from the finished
run's own `config.json`, so only the eval fields need setting:

  python -m graphgrpo_jax.main --config=configs/relevance.py:eval_file --workdir=runs/esci_eval \
    --config.eval.input_path=../shared/data/esci-graded-subset/esci_pairs.jsonl \
    --config.eval.checkpoint_workdir=runs/relevance_cpu

It writes `<workdir>/eval/<input file stem>.json`.
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_collections

from graphgrpo_jax import artifacts
from graphgrpo_jax.data import cot, esci, examples as examples_lib
from graphgrpo_jax.eval import classification, relevance
from graphgrpo_jax.eval import student as student_eval
from graphgrpo_jax.models import encoder
from graphgrpo_jax.tasks import relevance as relevance_task

FILE_POLICIES = ("sft", "rl", "student", artifacts.BASE_POLICY)


def _write(workdir: str, name: str, results: dict) -> None:
    out_dir = artifacts.eval_dir(workdir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)  # a reader never sees half a report


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    tokenizer = artifacts.load_tokenizer(config, workdir)
    held_out = {split: relevance_task.examples_of(config, split)[:config.eval.max_examples]
                for split in config.eval.splits}
    empty = [split for split, examples in held_out.items() if not examples]
    if empty:
        raise ValueError(f"config.eval.splits = {tuple(config.eval.splits)}: no examples in {empty} of "
                         f"config.data.source = {config.data.get('source', 'world')!r}")
    results = {}
    for stage in config.eval.policies:
        params = artifacts.policy_params(config, workdir, stage)
        for split, examples in held_out.items():
            results[f"{stage}/{split}"] = relevance.evaluate_pairs(
                params, config, tokenizer, [e.query for e in examples], [e.product_text for e in examples],
                [e.label for e in examples])
            results[f"{stage}/{split}"]["example_ids"] = [e.example_id for e in examples]  # the rows of "predictions"
    _write(workdir, "metrics.json", results)
    if config.data.get("source", "world") == "esci":  # how the examples were made: splits, teacher join, skips
        _write(workdir, "data.json", relevance_task.esci_set(config).counts)
    return results


def trained_config(checkpoint_workdir: str) -> ml_collections.ConfigDict:
    """The config a finished run wrote to its workdir (model shapes, tokenizer, distillation heads)."""
    path = os.path.join(checkpoint_workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: config.eval.checkpoint_workdir must be the workdir of a "
                                f"finished run")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _student_report(trained: ml_collections.ConfigDict, source: str, examples: list[esci.EsciExample]) -> dict:
    params = artifacts.student_params(trained, source)
    tokenizer = encoder.load_pair_tokenizer(encoder.minilm_folder())
    probs = encoder.head_probabilities(
        params, artifacts.student_config(), tokenizer, [e.query for e in examples],
        [e.product_title for e in examples], max_length=trained.distill.max_length,
        batch_size=trained.distill.batch_size)[cot.LABEL_NODE]
    return classification.classification_report([cot.LABELS.index(e.label) for e in examples],
                                                 probs.argmax(-1), cot.LABELS, probs=probs,
                                                 negative_class=student_eval.NEGATIVE_LABEL)


def run_file(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The `eval_file` stage (see the module docstring)."""
    cfg = config.eval
    if not cfg.get("input_path"):
        raise ValueError("the eval_file stage needs config.eval.input_path: an ESCI-format JSONL file")
    unknown = set(cfg.policies) - set(FILE_POLICIES)
    if unknown:
        raise ValueError(f"config.eval.policies = {tuple(cfg.policies)}: {sorted(unknown)} not among "
                         f"{FILE_POLICIES}")
    source = cfg.get("checkpoint_workdir") or workdir
    trained = trained_config(source)
    data = esci.read_flat_jsonl(cfg.input_path, test_fraction=cfg.input_test_fraction,
                                skip_bad_rows=cfg.get("skip_bad_rows", False))
    examples = list(data.examples) if cfg.input_split == "all" else data.split(cfg.input_split)
    if not examples:
        raise ValueError(f"{cfg.input_path}: no readable rows in split {cfg.input_split!r}")
    results = {"input_path": str(cfg.input_path), "checkpoint_workdir": source, "split": cfg.input_split,
               "num_rows": len(examples), "skipped_rows": data.skipped}
    trained.eval.batch_size = cfg.batch_size  # the finished run's shapes, this run's batching
    policy_tokenizer = artifacts.load_tokenizer(trained, source) if set(cfg.policies) - {"student"} else None
    # The product text as the finished run showed it (its `data.esci.product_fields`; titles for a world run).
    fields = trained.data.esci.product_fields if "esci" in trained.data else ("title",)
    products = [examples_lib.product_text(e, fields) for e in examples]
    for policy in cfg.policies:
        if policy == "student":
            results[policy] = _student_report(trained, source, examples)
            continue
        results[policy] = relevance.evaluate_pairs(
            artifacts.policy_params(trained, source, policy), trained, policy_tokenizer,
            [e.query for e in examples], products, [e.label for e in examples])
    _write(workdir, pathlib.Path(cfg.input_path).stem + ".json", results)
    return results
