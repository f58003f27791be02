r"""Runs the arms of the real-ESCI relevance experiment (issue #27) over learning rates and seeds, resumably.

  python experiments/esci_arms.py --runs=runs/esci --arm=label --lr=3e-5,1e-4,3e-4 --seed=0
  python experiments/esci_arms.py --runs=runs/esci --arm=graph --lr=5e-6 --seed=0,1,2 --sft=cot_lr0.0001_s0
  python experiments/esci_arms.py --runs=runs/esci --summary            # val and test macro-F1 of every run

Every run is `python -m graphgrpo_jax.main --config=configs/smollm2_esci.py:cpu` with the arm's overrides, in its
own workdir `<runs>/<arm>_lr<lr>_s<seed>` (RL arms: `<arm>_lr<lr>_s<seed>_from_<sft run>`); a run whose
`eval/metrics.json` exists is skipped, and one that stopped part-way resumes from its checkpoints (the stages
resume from their workdir), so the same command can be repeated until everything is done. Every run is
evaluated on the val split (to choose a rate) and the test split (to report it, with `esci_results.py`).

Arms (experiments/README.md names them by number):
  zero_shot  (1) the imported checkpoint untrained, asked for one label word through its chat template
  label      (2) label-only SFT: the label word alone as the answer
  cot        (3) CoT-masked SFT on the rule teacher's chains
  outcome    (4) outcome GRPO from a `cot` run (`--sft`)
  graph      (5) the default Graph-GRPO from a `cot` run (`--sft`)
`--lr` is the SFT rate (`optim.learning_rate`) for the SFT arms and the RL rate (`rl_optim.learning_rate`) for
the RL arms; `--seed` sets `config.seed` (the order of the training rows, the sampling, the initialisation of
the CoT tag rows), never the split, which `data.esci.split_seed` fixes. `--set` passes further overrides.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time

from absl import app, flags

CONFIG = "configs/smollm2_esci.py:cpu"
SFT_ARMS = ("zero_shot", "label", "cot")
RL_ARMS = ("outcome", "graph")
SPLITS = ("val", "test")

_RUNS = flags.DEFINE_string("runs", "runs/esci", "Folder holding one workdir per run.")
_ARM = flags.DEFINE_enum("arm", None, SFT_ARMS + RL_ARMS, "Which arm to run.")
_LRS = flags.DEFINE_list("lr", [], "Learning rates (SFT arms: optim; RL arms: rl_optim).")
_SEEDS = flags.DEFINE_list("seed", ["0"], "Seeds (config.seed).")
_SFT = flags.DEFINE_string("sft", None, "RL arms: the `cot` run (a workdir name under --runs) to start from.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "models/SmolLM2-135M-Instruct", "The imported model folder.")
_SET = flags.DEFINE_multi_string("set", [], "Further overrides, `field=value` (no leading --config.).")
_SUMMARY = flags.DEFINE_bool("summary", False, "Print val / test figures of every finished run and stop.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.")


def arm_overrides(arm: str, lr: str) -> list[str]:
    """The config overrides that make `arm` out of configs/smollm2_esci.py:cpu."""
    evaluate = [f"--config.eval.splits={SPLITS!r}"]
    if arm == "zero_shot":
        return ["--config.stages=('data','eval')", "--config.eval.policies=('base',)",
                "--config.data.answer=label", *evaluate]
    if arm in ("label", "cot"):
        answer = ["--config.data.answer=label"] if arm == "label" else []
        return ["--config.stages=('data','sft','eval')", "--config.eval.policies=('sft',)", *answer,
                f"--config.optim.learning_rate={lr}", *evaluate]
    if arm in RL_ARMS:
        return ["--config.stages=('rl','eval')", "--config.eval.policies=('rl',)", f"--config.credit.variant={arm}",
                f"--config.rl_optim.learning_rate={lr}", *evaluate]
    raise ValueError(f"unknown arm {arm!r}; choose one of {SFT_ARMS + RL_ARMS}")


def run_name(arm: str, lr: str, seed: str, sft: str | None) -> str:
    name = arm if arm == "zero_shot" else f"{arm}_lr{float(lr):g}"
    name = f"{name}_s{seed}"
    return f"{name}_from_{sft}" if arm in RL_ARMS else name


def start_from_sft(sft_workdir: pathlib.Path, workdir: pathlib.Path) -> None:
    """An RL run's workdir begins as a copy of its SFT run's, without that run's RL, eval and report outputs."""
    if not (sft_workdir / "eval" / "metrics.json").exists():
        raise FileNotFoundError(f"--sft={sft_workdir.name}: {sft_workdir} has not finished (no eval/metrics.json)")
    if workdir.exists():
        return
    partial = workdir.with_name(workdir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(sft_workdir, partial, ignore=shutil.ignore_patterns("rl", "eval", "report*", "log.txt"))
    partial.rename(workdir)  # atomic: a half-copied workdir is never taken for a started run


def run(arm: str, lr: str, seed: str, runs: pathlib.Path) -> None:
    name = run_name(arm, lr, seed, _SFT.value)
    workdir = runs / name
    if (workdir / "eval" / "metrics.json").exists():
        print(f"[done] {name}", flush=True)
        return
    command = [sys.executable, "-m", "graphgrpo_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
               f"--config.model.hf_checkpoint={_CHECKPOINT.value}", f"--config.seed={seed}",
               *arm_overrides(arm, lr), *(f"--config.{override}" for override in _SET.value)]
    print(f"[run] {name}: {' '.join(command[1:])}", flush=True)
    if _DRY_RUN.value:
        return
    if arm in RL_ARMS:
        if not _SFT.value:
            raise app.UsageError(f"--arm={arm} starts from a cot run: pass --sft=<its workdir name>")
        start_from_sft(runs / _SFT.value, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(workdir / "log.txt", "a") as log:
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if returncode:
        raise SystemExit(f"[failed] {name} (exit {returncode}); see {workdir / 'log.txt'}")
    print(f"[finished] {name} in {time.time() - start:.0f} s", flush=True)


def summary(runs: pathlib.Path) -> None:
    """Val and test accuracy / macro-F1 of every finished run (the point estimates; intervals: esci_results.py)."""
    print("| run | val accuracy | val macro-F1 | test accuracy | test macro-F1 | test format failures |")
    print("|---|---|---|---|---|---|")
    for metrics_file in sorted(runs.glob("*/eval/metrics.json")):
        results = json.loads(metrics_file.read_text())
        for key in sorted(k for k in results if k.endswith("/test")):
            policy = key.split("/")[0]
            val, test = results.get(f"{policy}/val", {}), results[key]
            cells = [val.get("accuracy"), val.get("macro_f1"), test.get("accuracy"), test.get("macro_f1"),
                     test.get("format_failure_rate")]
            print(f"| {metrics_file.parent.parent.name}:{policy} | "
                  + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")


def main(argv):
    del argv
    runs = pathlib.Path(_RUNS.value)
    if _SUMMARY.value:
        summary(runs)
        return
    if _ARM.value is None:
        raise app.UsageError("pass --arm (or --summary)")
    lrs = _LRS.value or (["0"] if _ARM.value == "zero_shot" else [])
    if not lrs:
        raise app.UsageError(f"--arm={_ARM.value} needs --lr")
    for seed in _SEEDS.value:
        for lr in lrs:
            run(_ARM.value, lr, seed, runs)


if __name__ == "__main__":
    app.run(main)
