"""Scaling of our whole GRPO step: seconds per step as group size, batch and completion length double.

    python experiments/bench/bench_scaling.py                      # base 8 prompts x 8, 64 tokens; x1, x2, x4
    python experiments/bench/bench_scaling.py --factors 1 2 --reps 3

From the base setting, one knob at a time is multiplied by each of `--factors` (group size G, prompts
per step, completion length). Each setting is the step of `bench_grpo_step.py` (sample, score, outcome
GRPO update), compiled once, then the median of `--reps` steps; the table gives the step time against the
base's and the share of it spent sampling vs updating. Linear scaling means the time ratio equals the
work factor; doubling the rollouts (G or prompts) doubles every phase's work, doubling the completion
length doubles the decode steps and the update's tokens and more than doubles its attention.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
from collections.abc import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_grpo_step  # noqa: E402
import common  # noqa: E402


def settings(base: dict[str, int], factors: Sequence[int]) -> list[tuple[str, int, dict[str, int]]]:
    """(knob, factor, setting) for the base (knob "base") and each knob times each factor above 1."""
    out = [("base", 1, dict(base))]
    for knob in ("group", "num_prompts", "completion_len"):
        out += [(knob, f, {**base, knob: base[knob] * f}) for f in factors if f != 1]
    return out


def run(preset: str, base: dict[str, int], factors: Sequence[int], prompt_len: int, reps: int
        ) -> list[list[str]]:
    config, params = common.policy(preset)
    tokenizer, prompts = bench_grpo_step.tokenizer_and_prompts(
        config.vocab_size, tempfile.mkdtemp(prefix="bench_scaling_"), prompt_len)
    rows, base_s = [], None
    for knob, factor, setting in settings(base, factors):
        phases = {}
        step = bench_grpo_step.our_grpo_step(params, config, tokenizer, prompts, prompt_len=prompt_len,
                                             phases=phases, **setting)
        timing = common.timed_pairs({"ours": step}, reps)["ours"]
        base_s = base_s or timing.median_s
        sample, update = (statistics.median(phases[name][1:]) for name in ("sample", "update"))
        rows.append([f"{knob} ×{factor}" if knob != "base" else "base", str(setting["num_prompts"]),
                     str(setting["group"]), str(setting["completion_len"]), f"{timing.first_s:.1f}",
                     f"{timing.median_s:.2f}", f"{timing.median_s / base_s:.2f} (work ×{factor})",
                     f"{sample / timing.median_s:.0%} / {update / timing.median_s:.0%}"])
    return rows


HEADER = ["setting", "prompts", "G", "completion tokens", "first step s (compile)", "median step s",
          "time vs base", "sample / update share"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_grpo_step_flags(parser)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no_save", action="store_true", help="print only; do not append to results/")
    args = parser.parse_args(argv)
    base = dict(num_prompts=args.prompts, group=args.group, completion_len=args.completion_len)
    rows = run(args.preset, base, args.factors, args.prompt_len, args.reps)
    common.report("scaling", "python experiments/bench/bench_scaling.py " + " ".join(sys.argv[1:]),
                  common.markdown_table(HEADER, rows),
                  [f"{args.preset} preset, prompts left-padded to {args.prompt_len}; each setting compiled once, "
                   f"then the median of {args.reps} steps; the remainder of a step is host work (decode, "
                   "reward, layout)."], results_dir=None if args.no_save else common.RESULTS_DIR)


if __name__ == "__main__":
    main()
