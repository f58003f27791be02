r"""Query rewriting (paper B): raw query vs single-task SFT vs multi-task SFT vs GRPO per reward variant.

  python experiments/rewrite_results.py --base=runs/rewrite_results              # cpu config, 3 seeds
  python experiments/rewrite_results.py --base=runs/rr --seeds=0 --fusions=rfusion,conv

Per seed: one single-task SFT (rewrite generation only) and one multi-task SFT (generation + tagging,
1:1); each GRPO variant starts from that seed's multi-task SFT policy (or, `--grpo_from=single`, from its
single-task one, for fusions without r_rel or with a judge other than the tagging task). The seed changes the model's
initialisation, the batches and the sampling; the world (catalogue, queries) stays the same. Prints
accuracy, recall@k and relevance@k on the chosen split as mean ± std over seeds (the gold rewrite is the
ceiling of accuracy). Finished runs are reused, so an interrupted sweep resumes.
"""

import json
import os
import shutil

import numpy as np
from absl import app, flags

from configs import common, rewrite as rewrite_configs
from graphgrpo_jax import main as pipeline
from graphgrpo_jax.rl import rewards

_BASE = flags.DEFINE_string("base", "runs/rewrite_results", "Folder for every run of the sweep.")
_VARIANT = flags.DEFINE_string("variant", "cpu", "Variant of configs/rewrite.py.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_FUSIONS = flags.DEFINE_list("fusions", list(rewards.FUSION_MODES), "GRPO reward variants.")
_SPLIT = flags.DEFINE_string("split", "test", "Held-out split of the table (test or ood).")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Config overrides for every run, e.g. rl.num_steps=100.")
_GRPO_FROM = flags.DEFINE_enum("grpo_from", "multi", ["multi", "single"], "The SFT policy GRPO starts from; "
                               "`single` has no tagging task, so not with the tagger judge in r_rel.")

METRICS = ("accuracy", "recall", "relevance")
JUDGE_METRICS = ("tag_accuracy", "own_tag_accuracy", "own_p_relevant", "own_truly_relevant")


def _run(workdir: str, seed: int, stages: tuple[str, ...], policies: tuple[str, ...], **overrides) -> dict:
    """Runs `stages` in `workdir` unless an earlier sweep finished them; returns its eval report."""
    report = os.path.join(workdir, "rewrite_eval", "metrics.json")
    if not os.path.exists(report):
        config = rewrite_configs.get_config(_VARIANT.value)
        config.seed = seed
        config.stages = stages
        config.rewrite_eval.policies = policies
        common.apply_overrides(config, _OVERRIDES.value)
        config.update_from_flattened_dict(overrides)
        pipeline.run(config, workdir)
    with open(report) as f:
        return json.load(f)


def _reads_tagger(fusion: str) -> bool:
    """Whether GRPO with `fusion` asks the SFT policy's own tagging task for r_rel."""
    config = common.apply_overrides(rewrite_configs.get_config(_VARIANT.value), _OVERRIDES.value)
    return "rel" in rewards.FUSION_INPUTS[fusion] and config.rewrite.judge == "tagger"


def sweep_seed(seed: int) -> dict[str, dict]:
    """{row name: report on the split} for one seed."""
    base = os.path.join(_BASE.value, f"seed{seed}")
    split = _SPLIT.value
    sft_stages = ("data", "index", "rewrite_sft", "rewrite_eval")
    single = _run(os.path.join(base, "single_task_sft"), seed, sft_stages, ("sft",),
                  **{"rewrite_sft.task_mix.tag": 0.0})
    multi_dir = os.path.join(base, "multi_task_sft")
    multi = _run(multi_dir, seed, sft_stages, ("sft",))
    rows = {"raw query": multi[f"raw/{split}"], "gold rewrite (ceiling)": multi[f"gold/{split}"],
            "single-task SFT": single[f"sft/{split}"], "multi-task SFT": multi[f"sft/{split}"]}
    for fusion in _FUSIONS.value:
        rl_dir, sft_dir, label = os.path.join(base, f"grpo_{fusion}"), multi_dir, f"GRPO, reward {fusion}"
        if _GRPO_FROM.value == "single":
            if _reads_tagger(fusion):
                raise app.UsageError(f"--grpo_from=single: fusion {fusion!r} reads r_rel from the tagger judge, "
                                     "the multi-task SFT's tagging task (set rewrite.judge to another judge)")
            rl_dir, sft_dir = f"{rl_dir}_from_single", os.path.join(base, "single_task_sft")
            label = f"GRPO from single-task SFT, reward {fusion}"
        if not os.path.exists(rl_dir):  # start from this seed's SFT policy
            shutil.copytree(sft_dir, rl_dir, ignore=shutil.ignore_patterns("rewrite_eval"))
        rows[label] = _run(rl_dir, seed, ("rl", "rewrite_eval"), ("rl",), **{"rewrite.fusion": fusion})[f"rl/{split}"]
    return rows


def _mean_std(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(_):
    per_seed = [sweep_seed(int(seed)) for seed in _SEEDS.value]
    k = per_seed[0]["raw query"]["k"]
    print(f"\n{_SPLIT.value} split, {per_seed[0]['raw query']['num_examples']} queries, "
          f"{len(per_seed)} seed(s), mean ± std over seeds\n")
    print(f"| | accuracy | recall@{k} | relevance@{k} (0-3) |")
    print("|---|---|---|---|")
    for row in per_seed[0]:
        print(f"| {row} | " + " | ".join(_mean_std([reports[row][m] for reports in per_seed]) for m in METRICS) + " |")
    judged = [row for row in per_seed[0] if all("judge" in reports[row] for reports in per_seed)]
    if judged:
        print("\nThe r_rel judge (the multi-task SFT's tagging task, frozen) on each policy's rewrites: its accuracy "
              "against the world's rule, mean P(relevant), and the share truly relevant\n")
        print("| | judge accuracy, labelled test tags | judge accuracy, policy's rewrites | mean P(relevant) | "
              "truly relevant |")
        print("|---|---|---|---|---|")
        for row in judged:
            print(f"| {row} | " + " | ".join(_mean_std([reports[row]["judge"][m] for reports in per_seed])
                                           for m in JUDGE_METRICS) + " |")


if __name__ == "__main__":
    app.run(main)
