"""`eval` stage: evaluates the pipeline's policies (SFT and RL checkpoints) on the world's held-out splits.

Writes `<workdir>/eval/metrics.json`: for every policy and split, the full classification report of
`eval/relevance.py` (accuracy, macro-F1, per-class P/R/F1, AUC, confusion matrix, format failures).
"""

from __future__ import annotations

import json
import os

import ml_collections

from graphgrpo_jax.data import prepare
from graphgrpo_jax.eval import relevance
from graphgrpo_jax.train import rl


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    world, tokenizer = prepare.load_world(config), prepare.load_tokenizer(config, workdir)
    results = {}
    for stage in config.eval.policies:
        params = rl.restore_policy(config, workdir, stage)
        for split in config.eval.splits:
            pairs = world.split_pairs(split)[:config.eval.max_examples]
            results[f"{stage}/{split}"] = relevance.evaluate_pairs(
                params, config, tokenizer, [p.query for p in pairs], [p.product_title for p in pairs],
                [p.label for p in pairs])
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results
