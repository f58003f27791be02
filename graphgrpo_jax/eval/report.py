"""`report` stage: `report.md`, `report.json` and plots of a relevance run, from what its stages wrote.

Reads `<workdir>/eval/metrics.json` and the `sft` / `rl` metrics.jsonl; writes into `<workdir>/`:
`report.json` (the headline numbers), `report.md` (tables + the plots) and `plots/*.png`.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from graphgrpo_jax import artifacts, metrics as metrics_lib
from graphgrpo_jax.eval import plots


def _read_rows(workdir: str, stage: str) -> list[dict]:
    path = artifacts.metrics_path(workdir, stage)
    return metrics_lib.read_jsonl(path) if os.path.exists(path) else []


def headline(report: dict) -> dict:
    """The numbers an experiment table needs from one classification report."""
    return {
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "irrelevant_f1": report["per_class"]["Irrelevant"]["f1"],
        "auc_macro": report.get("auc", {}).get("macro"),
        "format_failure_rate": report["format_failure_rate"],
        "num_examples": report["num_examples"],
        "product_truncated": report.get("product_truncated", 0),  # prompts that showed a cut product text
    }


def rl_summary(rows: list[dict]) -> dict:
    """RL curve summaries: mean training accuracy over all steps (area under the curve per step), the
    last 20% of steps, and the final φ per edge."""
    acc = np.asarray([r["rl/accuracy"] for r in rows if "rl/accuracy" in r])
    if not len(acc):
        return {}
    tail = acc[-max(1, len(acc) // 5):]
    last = rows[-1]
    return {"steps": int(last["step"]), "train_accuracy_auc": float(acc.mean()),
            "train_accuracy_last20pct": float(tail.mean()),
            "phi_final": {k[len("phi/"):]: v for k, v in last.items() if k.startswith("phi/")}}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    with open(os.path.join(artifacts.eval_dir(workdir), "metrics.json")) as f:
        results = json.load(f)
    rl_rows = _read_rows(workdir, "rl")
    plot_dir = os.path.join(workdir, "plots")
    figures = {}
    if rl_rows:
        figures["reward and accuracy over RL steps"] = plots.training_curves(
            rl_rows, os.path.join(plot_dir, "rl_reward_accuracy.png"))
        figures["φ per edge over RL steps"] = plots.phi_curves(rl_rows, os.path.join(plot_dir, "phi.png"))
        figures["per-node advantage spread"] = plots.node_advantage_spread(
            rl_rows, list(config.graph.nodes), os.path.join(plot_dir, "node_advantage_std.png"))
    for name, report in results.items():
        figures[f"confusion matrix, {name}"] = plots.confusion_matrix(
            report, os.path.join(plot_dir, f"confusion_{name.replace('/', '_')}.png"), title=name)

    summary = {"variant": config.get("variant"), "credit": config.credit.to_dict(),
               "controller_mode": config.controller.mode,
               "eval": {name: headline(report) for name, report in results.items()},
               "rl": rl_summary(rl_rows)}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)

    lines = [f"# Relevance run: `{config.get('variant')}`", "",
             f"Credit: `{config.credit.variant}` (evidence `{config.credit.evidence}`, norm "
             f"`{config.credit.norm}`, κ = {config.credit.kappa}), controller `{config.controller.mode}`.", "",
             "| policy/split | accuracy | macro-F1 | Irrelevant F1 | AUC (macro) | format failures | n "
             "| products cut |",
             "|---|---|---|---|---|---|---|---|"]
    for name, h in summary["eval"].items():
        auc = "n/a" if h["auc_macro"] is None else f"{h['auc_macro']:.3f}"
        lines.append(f"| {name} | {h['accuracy']:.3f} | {h['macro_f1']:.3f} | {h['irrelevant_f1']:.3f} | {auc} | "
                     f"{h['format_failure_rate']:.3f} | {h['num_examples']} | {h['product_truncated']} |")
    if summary["rl"]:
        rl = summary["rl"]
        lines += ["", f"RL: {rl['steps']} steps; training accuracy mean over steps {rl['train_accuracy_auc']:.3f}, "
                      f"last 20% {rl['train_accuracy_last20pct']:.3f}.", "",
                  "Final φ: " + ", ".join(f"`{k}` {v:.2f}" for k, v in rl["phi_final"].items())]
    lines += [""] + [f"## {title}\n\n![{title}](plots/{os.path.basename(path)})\n" for title, path in figures.items()]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return summary
