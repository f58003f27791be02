r"""Multi-head vs single-head MiniLM students vs the teacher LLM (METHOD.md A5), on a relevance workdir.

  python -m graphgrpo_jax.main --config=configs/relevance.py:cpu --workdir=/tmp/distill_wd
  python experiments/distill_results.py --workdir=/tmp/distill_wd
  python experiments/distill_results.py --workdir=/tmp/distill_wd --num_steps=100 --esci=
  python experiments/distill_results.py --workdir=/tmp/distill_wd --seeds=0,1,2 --students=distill,distill_single

From the workdir's policy (`config.distill.policy`, default the RL checkpoint) it computes the teacher once
(`<workdir>/distill/teacher.npz`), then trains three students with the `distill` stage, each under its own
stage name so they coexist in the workdir (a re-run resumes or reuses them; seeds other than 0 append
`_seed<k>`, a `--node_lambda` other than 1 appends `_lam<value>` to the multi-head students):

  distill         heads y, ms, ma, distilled on the synthetic train split
  distill_single  head y only, same data (the single-head baseline of METHOD.md A5)
  distill_esci    heads y, ms, ma, distilled on the synthetic train split + CE on the ESCI train queries

and prints markdown tables: the synthetic test split (label accuracy, macro-F1, Irrelevant F1, per-node
accuracy, held-out KL to the teacher) for the teacher LLM and the students; the held-out ESCI queries of the
graded subset for the majority class of its training queries, the teacher LLM and the students; and
seconds per pair of the student and of the policy's greedy chain of thought, at batch 1 and 64.
"""

import copy
import json
import pathlib

import ml_collections
import numpy as np
from absl import app, flags

from configs import defaults
from graphgrpo_jax import artifacts
from graphgrpo_jax.data import cot, esci, prepare
from graphgrpo_jax.eval import classification, relevance, student
from graphgrpo_jax.models import decoder, encoder
from graphgrpo_jax.train import distill

_DEFAULT_ESCI = pathlib.Path(__file__).resolve().parents[2] / "shared/data/esci-graded-subset/esci_pairs.jsonl"

STUDENTS = {
    "distill": dict(heads=("y", "ms", "ma"), sources=("world",)),
    "distill_single": dict(heads=("y",), sources=("world",)),
    "distill_esci": dict(heads=("y", "ms", "ma"), sources=("world", "esci")),
}
NODES = ("ms", "ma")

_WORKDIR = flags.DEFINE_string("workdir", None, "A relevance workdir with data, sft and rl stages done.")
_ESCI = flags.DEFINE_string("esci", str(_DEFAULT_ESCI), "Flat ESCI JSONL; empty to skip the ESCI table.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Student training steps (default: config.distill).")
_REPEATS = flags.DEFINE_integer("latency_repeats", 5, "Timed batches per batch size (median reported).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Student seeds (init of the heads, batch order); the tables report "
                           "mean ± std over them. Seed 0 keeps the plain stage names.")
_STUDENTS = flags.DEFINE_list("students", list(STUDENTS), "Which students to train and report.")
_NODE_LAMBDA = flags.DEFINE_float("node_lambda", 1.0, "λ of the ms and ma heads (y keeps 1); a value other "
                                  "than 1 trains the multi-head students under names ending in _lam<value>.")
flags.mark_flag_as_required("workdir")


def _config(workdir: str) -> ml_collections.ConfigDict:
    """The run's own config (what `graphgrpo_jax.main` wrote; importing main would define its flags)."""
    config = ml_collections.ConfigDict(json.loads((pathlib.Path(workdir) / "config.json").read_text()))
    if "distill" not in config:
        config.distill = defaults.distill()
    if _NUM_STEPS.value is not None:
        config.distill.num_steps = _NUM_STEPS.value
    config.distill.esci_path = _ESCI.value
    return config


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _stat(values) -> str:
    """One value as is; several as mean ± std (ddof 1) over seeds."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return _fmt(values[0] if values else None)
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def student_configs(config: ml_collections.ConfigDict) -> dict[str, list[ml_collections.ConfigDict]]:
    """The students to train, by row label, one config per seed; each trains under its own stage name."""
    runs = {}
    for name in _STUDENTS.value:
        variant = dict(STUDENTS[name])
        if config.distill.esci_path == "" and "esci" in variant["sources"]:
            continue
        label = name
        if _NODE_LAMBDA.value != 1.0 and len(variant["heads"]) > 1:
            variant["loss_weights"] = dict(y=1.0, ms=_NODE_LAMBDA.value, ma=_NODE_LAMBDA.value)
            label = f"{name}_lam{_NODE_LAMBDA.value:g}"
        runs[label] = []
        for seed in map(int, _SEEDS.value):
            run_config = copy.deepcopy(config)
            run_config.seed = seed
            run_config.distill.update(run_name=label if seed == 0 else f"{label}_seed{seed}", **variant)
            runs[label].append(run_config)
    return runs


def teacher_rows(config, workdir: str, world, esci_data):
    """Greedy judgements of the teacher LLM: its synthetic-test row (with node accuracy read from the
    generated chains) and its ESCI report."""
    params = artifacts.policy_params(config, workdir, config.distill.policy)
    tokenizer = artifacts.load_tokenizer(config, workdir)
    pairs = world.split_pairs("test")
    preds, probs, texts, _ = relevance.judge(params, config, tokenizer, [p.query for p in pairs],
                                             [p.product_title for p in pairs], config.eval.batch_size)
    report = classification.classification_report([cot.LABELS.index(p.label) for p in pairs], preds, cot.LABELS,
                                                  probs=probs, negative_class=student.NEGATIVE_LABEL)
    values = [cot.parse(text).values for text in texts]
    node_accuracy = {node: float(np.mean([v.get(node) == p.gold[node] for v, p in zip(values, pairs)]))
                     for node in NODES}
    esci_report = None
    if esci_data is not None:
        test = esci_data.split("test")
        preds, probs, _, _ = relevance.judge(params, config, tokenizer, [e.query for e in test],
                                             [e.product_title for e in test], config.eval.batch_size)
        esci_report = classification.classification_report([cot.LABELS.index(e.label) for e in test], preds,
                                                            cot.LABELS, probs=probs,
                                                            negative_class=student.NEGATIVE_LABEL)
    return params, {**student.headline(report), **{f"acc_{n}": node_accuracy[n] for n in NODES},
                    "format_failures": report["format_failure_rate"]}, esci_report


def main(_):
    workdir = _WORKDIR.value
    config = _config(workdir)
    world = prepare.load_world(config)
    esci_data = esci.read_flat_jsonl(_ESCI.value, test_fraction=config.distill.esci_test_fraction) \
        if _ESCI.value else None

    configs = student_configs(config)
    reports = {label: [distill.run(run_config, workdir) for run_config in runs] for label, runs in configs.items()}
    first = next(iter(reports.values()))[0]

    policy_params, teacher_synthetic, teacher_esci = teacher_rows(config, workdir, world, esci_data)
    print(f"\n### Synthetic test split ({first['synthetic_test']['num_examples']} pairs; policy = "
          f"{config.distill.policy}, teacher = {config.distill.teacher}, {config.distill.num_steps} student "
          f"steps, seeds {','.join(_SEEDS.value)})\n")
    print("| model | accuracy | macro-F1 | Irrelevant F1 | acc ms | acc ma | KL y | KL ms | KL ma |")
    print("|---|---|---|---|---|---|---|---|---|")
    t = teacher_synthetic
    print(f"| teacher LLM, greedy CoT (format failures {t['format_failures']:.3f}) | {_fmt(t['accuracy'])} | "
          f"{_fmt(t['macro_f1'])} | {_fmt(t['irrelevant_f1'])} | {_fmt(t['acc_ms'])} | {_fmt(t['acc_ma'])} "
          f"| – | – | – |")
    for label, runs in reports.items():
        heads = [student.headline(r["synthetic_test"]["label"]) for r in runs]
        accuracy = [r["synthetic_test"]["per_node_accuracy"] for r in runs]
        kl = [r["synthetic_test"]["held_out_kl"] for r in runs]
        cells = [_stat([h[key] for h in heads]) for key in ("accuracy", "macro_f1", "irrelevant_f1")]
        cells += [_stat([a.get(node) for a in accuracy]) for node in NODES]
        cells += [_stat([k.get(node) for k in kl]) for node in ("y",) + NODES]
        print(f"| student `{label}` ({'+'.join(runs[0]['heads'])}) | " + " | ".join(cells) + " |")

    if esci_data is not None:
        majority = first["esci_test"]["majority"]
        print(f"\n### ESCI graded subset, held-out queries ({first['esci_test']['student']['num_examples']} pairs; "
              f"{len(esci_data.split('train'))} training pairs)\n")
        print("| model | accuracy | macro-F1 | Irrelevant F1 |")
        print("|---|---|---|---|")
        rows = [(f"majority class ({majority['majority_label']})", [majority]),
                ("teacher LLM, greedy CoT (zero-shot)", [teacher_esci])]
        rows += [(f"student `{label}`" + ("" if "esci" in configs[label][0].distill.sources else " (zero-shot)"),
                  [r["esci_test"]["student"] for r in runs]) for label, runs in reports.items()]
        for label, row_reports in rows:
            heads = [student.headline(r) for r in row_reports]
            print(f"| {label} | " + " | ".join(_stat([h[key] for h in heads])
                                               for key in ("accuracy", "macro_f1", "irrelevant_f1")) + " |")

    pairs = world.split_pairs("test")
    queries, titles = [p.query for p in pairs], [p.product_title for p in pairs]
    encoder_config = artifacts.student_config()
    student_params = artifacts.student_params(next(iter(configs.values()))[0], workdir)
    student_timing = student.seconds_per_pair(
        student.student_runner(student_params, encoder_config, encoder.load_pair_tokenizer(encoder.minilm_folder()),
                               queries, titles, config.distill.max_length), repeats=_REPEATS.value)
    policy_timing = student.seconds_per_pair(
        student.policy_runner(policy_params, decoder.DecoderConfig.from_config(config.model),
                              artifacts.load_tokenizer(config, workdir), queries, titles,
                              max_prompt_len=config.data.max_prompt_len,
                              max_response_len=config.data.max_response_len), repeats=_REPEATS.value)
    print("\n### Latency per pair on this CPU (tokenization included; median of "
          f"{_REPEATS.value} batches)\n")
    print("| model | batch 1 | batch 64 |")
    print("|---|---|---|")
    print(f"| student (MiniLM-L6, {len(first['heads'])} heads, {config.distill.max_length} tokens) | "
          f"{student_timing[1] * 1e3:.2f} ms | {student_timing[64] * 1e3:.2f} ms |")
    print(f"| policy greedy CoT ({config.model.preset}, {config.data.max_response_len} new tokens max) | "
          f"{policy_timing[1] * 1e3:.2f} ms | {policy_timing[64] * 1e3:.2f} ms |")


if __name__ == "__main__":
    app.run(main)
