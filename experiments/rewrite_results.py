r"""Query rewriting (paper B): raw query vs single-task SFT vs multi-task SFT vs GRPO per reward variant.

  python experiments/rewrite_results.py --base=runs/rewrite_results              # cpu config, 3 seeds
  python experiments/rewrite_results.py --base=runs/rr --seeds=0 --fusions=rfusion,conv
  python experiments/rewrite_results.py --base=runs/rr_scarce --variant=cpu_scarce --fusions=rfusion \
      --seeds=0,1,2,3,4,5,6,7                                                      # experiments/README's headline

Per seed: one single-task SFT (rewrite generation only) and one multi-task SFT (generation + tagging; the
variant's mix, or 1:1 where the variant is single-task). Each GRPO variant starts from the SFT policy the
variant's own pipeline trains (multi-task for `cpu`, single-task for `cpu_scarce`), or the one `--grpo_from`
names; from single-task SFT only with a judge other than the tagging task. A student judge
(`rewrite.judge=student`) is trained once, in `<base>/student`, unless `rewrite.student_workdir` names one.
The seed changes the model's initialisation, the batches and the sampling; the world (catalogue, queries)
stays the same. Prints accuracy, recall@k and relevance@k on the chosen split as mean ± std over seeds (the
gold rewrite is the ceiling of accuracy). Finished runs are reused, so an interrupted sweep resumes.
"""

import dataclasses
import json
import os
import shutil

import ml_collections
import numpy as np
from absl import app, flags
from scipy import stats

from configs import common, rewrite as rewrite_configs
from graphgrpo_jax import main as pipeline, metrics
from graphgrpo_jax.eval import plots
from graphgrpo_jax.rl import rewards

METRICS = ("accuracy", "recall", "relevance")
SIGNAL = ("rl/frac_reward_zero_std", "rl/entropy", "rl/reward")
JUDGE_METRICS = ("tag_accuracy", "own_tag_accuracy", "own_p_relevant", "own_truly_relevant")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One table: every seed's SFT pair and GRPO runs under `base`, from `variant` plus `overrides`."""
    base: str
    variant: str = "cpu"
    overrides: tuple[str, ...] = ()
    fusions: tuple[str, ...] = tuple(rewards.FUSION_MODES)
    grpo_from: str | None = None  # "multi" | "single" | None: the SFT the variant's own pipeline trains
    split: str = "test"

    def config(self, seed: int = 0, **overrides) -> ml_collections.ConfigDict:
        config = common.apply_overrides(rewrite_configs.get_config(self.variant), self.overrides)
        config.seed = seed
        config.update_from_flattened_dict(overrides)
        return config

    def own_sft(self) -> str:
        """The SFT the variant's own pipeline trains: "multi" when its mix holds the tagging task."""
        return "multi" if self.config().rewrite_sft.task_mix.tag > 0 else "single"

    def start_from(self) -> str:
        return self.grpo_from or self.own_sft()

    def check(self) -> None:
        """Fails before any training where GRPO from single-task SFT would need its (absent) tagging task."""
        if self.start_from() != "single" or self.config().rewrite.judge != "tagger":
            return
        for fusion in self.fusions:
            if "rel" in rewards.FUSION_INPUTS[fusion]:
                raise app.UsageError(f"GRPO from single-task SFT: fusion {fusion!r} reads r_rel from the tagger "
                                     "judge, the multi-task SFT's tagging task (set rewrite.judge to another judge)")

    def run(self, workdir: str, seed: int, stages: tuple[str, ...], policies: tuple[str, ...],
            **overrides) -> dict:
        """Runs `stages` in `workdir` unless an earlier sweep finished them; returns its eval report."""
        report = os.path.join(workdir, "rewrite_eval", "metrics.json")
        if not os.path.exists(report):
            config = self.config(seed, **overrides, **self.student())
            config.stages = stages
            config.rewrite_eval.policies = policies
            pipeline.run(config, workdir)
        with open(report) as f:
            return json.load(f)

    def student(self) -> dict:
        """The override pointing a student judge at `<base>/student`, trained there once (seed 0) if needed."""
        config = self.config()
        if config.rewrite.judge != "student" or config.rewrite.student_workdir:
            return {}
        workdir = os.path.join(self.base, "student")
        done = os.path.join(workdir, config.distill.run_name, "report.json")  # the distill stage's last write
        if not os.path.exists(done):
            config.stages = ("data", "distill")
            pipeline.run(config, workdir)
        return {"rewrite.student_workdir": workdir}

    def seed_rows(self, seed: int) -> dict[str, dict]:
        """{row name: report on the split} for one seed."""
        self.check()
        base, split = os.path.join(self.base, f"seed{seed}"), self.split
        sft_stages = ("data", "index", "rewrite_sft", "rewrite_eval")
        single_dir, multi_dir = os.path.join(base, "single_task_sft"), os.path.join(base, "multi_task_sft")
        single = self.run(single_dir, seed, sft_stages, ("sft",), **{"rewrite_sft.task_mix.tag": 0.0})
        multi_mix = {} if self.own_sft() == "multi" else {"rewrite_sft.task_mix.tag": 1.0}
        multi = self.run(multi_dir, seed, sft_stages, ("sft",), **multi_mix)
        rows = {"raw query": multi[f"raw/{split}"], "gold rewrite (ceiling)": multi[f"gold/{split}"],
                "single-task SFT": single[f"sft/{split}"], "multi-task SFT": multi[f"sft/{split}"]}
        if self.start_from() == "single":
            sft_dir, sft_mix, suffix, label = (single_dir, {"rewrite_sft.task_mix.tag": 0.0}, "_from_single",
                                               "GRPO from single-task SFT, reward {}")
        else:
            sft_dir, sft_mix, suffix, label = multi_dir, multi_mix, "", "GRPO, reward {}"
        for fusion in self.fusions:
            rl_dir = os.path.join(base, f"grpo_{fusion}{suffix}")
            if not os.path.exists(rl_dir):  # start from this seed's SFT policy; a half-done copy never counts
                shutil.rmtree(f"{rl_dir}.tmp", ignore_errors=True)
                shutil.copytree(sft_dir, f"{rl_dir}.tmp", ignore=shutil.ignore_patterns("rewrite_eval"))
                os.replace(f"{rl_dir}.tmp", rl_dir)
            # The run's config names the SFT it starts from: eval asks only a tagging SFT for tag-judge metrics.
            report = self.run(rl_dir, seed, ("rl", "rewrite_eval"), ("rl",), **{"rewrite.fusion": fusion}, **sft_mix)
            rows[label.format(fusion)] = dict(report[f"rl/{split}"], signal=training_signal(rl_dir))
        return rows


def training_signal(rl_dir: str) -> dict[str, tuple[float, float]]:
    """{metric: (mean over the first 10% of RL steps, over the last 10%)} for what tells whether GRPO had
    gradient to learn from: groups whose rollouts all earned one reward carry none."""
    by_step = {row["step"]: row for row in metrics.read_jsonl(os.path.join(rl_dir, "rl", "metrics.jsonl"))
               if "rl/reward" in row}  # a resumed run may log a step twice: the last one counts
    rows = [by_step[step] for step in sorted(by_step)]
    n = max(len(rows) // 10, 1)
    return {key: (float(np.mean([r[key] for r in rows[:n]])), float(np.mean([r[key] for r in rows[-n:]])))
            for key in SIGNAL}


def _mean_std(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(per_seed: list[dict[str, dict]], split: str) -> str:
    """The markdown table(s) of a sweep: every row's metrics as mean ± std over seeds."""
    k = per_seed[0]["raw query"]["k"]
    lines = [f"{split} split, {per_seed[0]['raw query']['num_examples']} queries, {len(per_seed)} seed(s), "
             "mean ± std over seeds", "", f"| | accuracy | recall@{k} | relevance@{k} (0-3) |", "|---|---|---|---|"]
    for row in per_seed[0]:
        lines.append(f"| {row} | " + " | ".join(_mean_std([reports[row][m] for reports in per_seed])
                                                for m in METRICS) + " |")
    judged = [row for row in per_seed[0] if all("judge" in reports[row] for reports in per_seed)]
    if judged:
        lines += ["", "The r_rel judge (the multi-task SFT's tagging task, frozen) on each policy's rewrites: its "
                  "accuracy against the world's rule, mean P(relevant), and the share truly relevant", "",
                  "| | judge accuracy, labelled test tags | judge accuracy, policy's rewrites | mean P(relevant) | "
                  "truly relevant |", "|---|---|---|---|---|"]
        for row in judged:
            lines.append(f"| {row} | " + " | ".join(_mean_std([reports[row]["judge"][m] for reports in per_seed])
                                                    for m in JUDGE_METRICS) + " |")
    trained = [row for row in per_seed[0] if all("signal" in reports[row] for reports in per_seed)]
    if trained:
        lines += ["", "Training signal, first → last 10% of RL steps (mean over seeds): the share of groups with "
                  "no reward spread (no gradient), the policy's entropy, the reward", "",
                  "| | zero-spread groups | entropy | reward |", "|---|---|---|---|"]
        for row in trained:
            cells = [" → ".join(f"{np.mean([r[row]['signal'][key][end] for r in per_seed]):.3f}" for end in (0, 1))
                     for key in SIGNAL]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def define_flags() -> None:
    """The command line; defined only when run as a script, so tests can import the module beside others."""
    flags.DEFINE_string("base", "runs/rewrite_results", "Folder for every run of the sweep.")
    flags.DEFINE_string("variant", "cpu", "Variant of configs/rewrite.py.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
    flags.DEFINE_list("fusions", list(rewards.FUSION_MODES), "GRPO reward variants.")
    flags.DEFINE_string("split", "test", "Held-out split of the table (test or ood).")
    flags.DEFINE_multi_string("set", [], "Config overrides for every run, e.g. rl.num_steps=100.")
    flags.DEFINE_enum("grpo_from", None, ["multi", "single"], "The SFT policy GRPO starts from (default: the "
                      "variant's own); `single` has no tagging task, so not with the tagger judge in r_rel.")


def paired_table(per_seed: list[dict[str, dict]], reference: str) -> str:
    """Each later row minus `reference`, seed by seed: mean ± std of the differences, the one-sample t-test's p
    (runs of one seed share the world and the SFT, so paired differences are what separates methods), and
    recall's per-seed differences."""
    names = list(per_seed[0])
    lines = [f"Paired differences against {reference} (mean ± std over seeds; p: one-sample t-test)", "",
             "| | Δ accuracy | Δ recall | Δ relevance | Δ recall per seed | seeds above |", "|---|---|---|---|---|---|"]
    for row in names[names.index(reference) + 1:]:
        deltas = {m: np.array([r[row][m] - r[reference][m] for r in per_seed]) for m in METRICS}
        cells = []
        for m in METRICS:
            d = deltas[m]
            p = f", p = {_p_value(d)}" if len(d) > 1 and d.std() > 0 else ""
            cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.3f}{p}")
        recall = deltas["recall"]
        cells += [", ".join(f"{d:+.3f}" for d in recall), f"{(recall > 0).sum()} of {len(recall)}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _p_value(differences: np.ndarray) -> str:
    p = stats.ttest_1samp(differences, 0.0).pvalue
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def write_plot(per_seed: list[dict[str, dict]], path: str) -> str:
    """Each metric per row and seed (plots.paired_by_seed), every row but the gold ceiling."""
    rows = [row for row in per_seed[0] if row != "gold rewrite (ceiling)"]
    k = per_seed[0]["raw query"]["k"]
    titles = {"accuracy": "accuracy", "recall": f"recall@{k}", "relevance": f"relevance@{k} (0-3)"}
    return plots.paired_by_seed({titles[m]: {row: [r[row][m] for r in per_seed] for row in rows} for m in METRICS},
                                path)


def main(_):
    f = flags.FLAGS
    sweep = Sweep(f.base, f.variant, tuple(f.set), tuple(f.fusions), f.grpo_from, f.split)
    per_seed = [sweep.seed_rows(int(seed)) for seed in f.seeds]
    print("\n" + table(per_seed, sweep.split))
    starts = ["single-task SFT"] + (["multi-task SFT"] if sweep.start_from() == "multi" else [])
    for reference in starts:
        print("\n" + paired_table(per_seed, reference))
    print("\nPlot:", write_plot(per_seed, os.path.join(sweep.base, "plots", f"by_seed_{sweep.split}.png")))


if __name__ == "__main__":
    define_flags()
    app.run(main)
