r"""Credit-assignment ablation (issue 6): every method from one shared SFT checkpoint, each at its own LR.

  # 1. sweep learning rates on one seed, 2. run each method's best LR on several seeds:
  python experiments/credit_ablation.py --base=runs/ablation --phase=sweep --lrs=1e-4,3e-4,1e-3
  python experiments/credit_ablation.py --base=runs/ablation --phase=seeds --seeds=0,1,2,3,4
  python experiments/credit_ablation.py --base=runs/ablation --phase=table     # markdown table

The shared SFT lives in `<base>/sft` (`data` + `sft` stages of the config, run once); every method run
copies its data, tokenizer and SFT checkpoint and runs `rl` + `eval` with the method's overrides. METHOD.md
A2' explains why each method gets its own tuned learning rate: graph credit and node normalisation change
step sizes, so at one fixed rate a "gain" can be a learning-rate effect.

Reported per run (from `eval/metrics.json` and `rl/metrics.jsonl`): test accuracy, macro-F1, Irrelevant
F1 of the RL policy, the mean training accuracy over RL steps (area under the curve per step), blame
precision@1 (a diagnostic) and the final φ.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from absl import app, flags, logging

from configs import common, relevance
from graphgrpo_jax import main as main_lib, metrics
from graphgrpo_jax.eval import plots, report
from graphgrpo_jax.graph import credit

_BASE = flags.DEFINE_string("base", "runs/ablation", "Folder of the ablation (shared SFT + one folder per run).")
_PHASE = flags.DEFINE_enum("phase", "sweep", ["sweep", "seeds", "table"], "What to run.")
_LRS = flags.DEFINE_list("lrs", ["1e-4", "3e-4", "1e-3"], "RL learning rates of the sweep.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the multi-seed phase.")
_METHODS = flags.DEFINE_list("methods", [], "Subset of methods to run (default: all).")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Config overrides for every run, e.g. rl.num_steps=100.")


def _paper_faithful(config):
    config.update_from_flattened_dict(credit.credit_preset("paper_faithful", config.graph))


# name -> edits of the base config (the default config *is* Graph-GRPO with consumer evidence).
METHODS = {
    "outcome_grpo": lambda c: c.credit.update(variant="outcome"),
    "chain_process": lambda c: c.credit.update(variant="chain_process"),
    "pure_min": lambda c: c.credit.update(variant="pure_min"),
    "graph_paper_faithful": _paper_faithful,
    "graph_default": lambda c: None,
    "graph_rule_consistency": lambda c: c.credit.update(evidence="rule_consistency"),
    "graph_main_loss": lambda c: (c.controller.update(mode="main_loss"), c.grpo.update(num_iterations=2)),
    "graph_alignment": lambda c: c.controller.update(mode="alignment"),
    "graph_default_no_cot_mask": lambda c: None,  # the default RL, from an SFT without CoT masking
}
# Methods whose controller changes φ during RL (the others keep φ fixed).
CONTROLLED = {"graph_main_loss", "graph_alignment"}
# Methods that need their own SFT (its folder under <base>) instead of the shared one.
OWN_SFT = {"graph_default_no_cot_mask": ("sft_no_cot_mask", lambda c: c.sft.update(p_mask=0.0))}


def base_config():
    return common.apply_overrides(relevance.get_config("cpu"), _OVERRIDES.value)


def sft_dir(base: str, method: str) -> str:
    """Runs data + sft once for `method`'s SFT variant (resumes if interrupted); returns its folder."""
    name, edit = OWN_SFT.get(method, ("sft", lambda c: None))
    config = base_config()
    edit(config)
    config.stages = ("data", "sft")
    main_lib.run(config, os.path.join(base, name))
    return os.path.join(base, name)


def run_dir(base: str, method: str, lr: float, seed: int) -> str:
    return os.path.join(base, "runs", f"{method}_lr{lr:g}_seed{seed}")


def run_method(base: str, method: str, lr: float, seed: int) -> str:
    workdir = run_dir(base, method, lr, seed)
    if not os.path.exists(os.path.join(workdir, "eval", "metrics.json")):
        shared = sft_dir(base, method)
        for part in ("data", "tokenizer", os.path.join("checkpoints", "sft")):
            if not os.path.exists(os.path.join(workdir, part)):
                shutil.copytree(os.path.join(shared, part), os.path.join(workdir, part))
        config = base_config()
        METHODS[method](config)
        config.seed = seed
        config.rl_optim.learning_rate = lr
        config.stages = ("rl", "eval")
        config.eval.policies = ("rl",)
        main_lib.run(config, workdir)
    return workdir


def summarize(workdir: str) -> dict:
    results = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
    rows = metrics.read_jsonl(os.path.join(workdir, "rl", "metrics.jsonl"))
    blame = [r["credit/blame_precision_at_1"] for r in rows
             if isinstance(r.get("credit/blame_precision_at_1"), float)]
    return {**report.headline(results["rl/test"]), **report.rl_summary(rows),
            "blame_precision_at_1": float(np.mean(blame)) if blame else float("nan")}


def _runs(base: str) -> dict[tuple[str, float, int], dict]:
    found = {}
    runs_dir = os.path.join(base, "runs")
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        method, lr, seed = name.rsplit("_", 2)
        if os.path.exists(os.path.join(runs_dir, name, "eval", "metrics.json")):
            found[(method, float(lr[2:]), int(seed[4:]))] = summarize(os.path.join(runs_dir, name))
    return found


def write_plots(base: str, found: dict) -> list[str]:
    """Training accuracy over RL steps per method at its best LR (mean over seeds), and φ over steps of
    seed 0 for every method whose φ moves (the controller modes)."""
    best = best_lrs(found)
    curves = {method: [metrics.read_jsonl(os.path.join(run_dir(base, m, lr, seed), "rl", "metrics.jsonl"))
                       for m, lr, seed in found if m == method and lr == best[method]]
              for method in best}
    paths = [plots.method_curves(curves, "rl/accuracy", os.path.join(base, "plots", "train_accuracy.png"))]
    for method, method_runs in curves.items():
        if method in CONTROLLED:
            paths.append(plots.phi_curves(method_runs[0], os.path.join(base, "plots", f"phi_{method}.png")))
    return paths


def best_lrs(found: dict) -> dict[str, float]:
    """Per method, the swept learning rate with the best mean training accuracy (AUC) on seed 0."""
    best = {}
    for (method, lr, seed), s in found.items():
        if seed == 0 and (method not in best or s["train_accuracy_auc"] > found[(method, best[method], 0)][
                "train_accuracy_auc"]):
            best[method] = lr
    return best


def table(found: dict) -> str:
    best = best_lrs(found)
    lines = ["| method | lr | seeds | test accuracy | macro-F1 | Irrelevant F1 | train-acc AUC | blame P@1 |",
             "|---|---|---|---|---|---|---|---|"]
    for method, lr in best.items():
        runs = [s for (m, l, _), s in found.items() if m == method and l == lr]
        cell = lambda k: (f"{np.mean([r[k] for r in runs]):.3f} ± {np.std([r[k] for r in runs]):.3f}"
                          if len(runs) > 1 else f"{runs[0][k]:.3f}")
        lines.append(f"| {method} | {lr:g} | {len(runs)} | {cell('accuracy')} | {cell('macro_f1')} | "
                     f"{cell('irrelevant_f1')} | {cell('train_accuracy_auc')} | {cell('blame_precision_at_1')} |")
    return "\n".join(lines)


def main(_):
    base = _BASE.value
    methods = _METHODS.value or list(METHODS)
    if _PHASE.value == "sweep":
        for method in methods:
            for lr in map(float, _LRS.value):
                logging.info("%s lr=%g", method, lr)
                run_method(base, method, lr, seed=0)
    elif _PHASE.value == "seeds":
        best = best_lrs(_runs(base))
        for method in methods:
            for seed in map(int, _SEEDS.value):
                run_method(base, method, best[method], seed)
    found = _runs(base)
    print(table(found))
    for path in write_plots(base, found):
        print(path)


if __name__ == "__main__":
    app.run(main)
