r"""Runs an experiment config: `python -m graphgrpo_jax.main --config=configs/relevance.py:cpu --workdir=DIR`.

Overrides go on the command line (`--config.rl.group_size=16`). The config is validated before any work,
written to `<workdir>/config.json`, and its `stages` run in order. Stages talk to each other only through
the workdir (tokenizer folder, checkpoints, reports), so a re-run resumes where the last one stopped.
Every stage places its arrays on the device mesh of `config.mesh` (default `single`: one device); a
multi-host run joins its job here, before any stage runs (`mesh.py`).
"""

from __future__ import annotations

import importlib
import os

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from graphgrpo_jax import config_validation, mesh as mesh_lib

# Stage name -> "module:function"; each function takes (config, workdir). Imported lazily so a config
# that runs one stage does not pay for the imports of the others.
STAGES = {
    "data": "graphgrpo_jax.data.prepare:run",
    "sft": "graphgrpo_jax.train.sft:run",
    "rl": "graphgrpo_jax.train.rl:run",
    "eval": "graphgrpo_jax.train.evaluate:run",
    "eval_file": "graphgrpo_jax.train.evaluate:run_file",
    "index": "graphgrpo_jax.train.rewrite:build_index",
    "rewrite_sft": "graphgrpo_jax.train.rewrite:run_sft",
    "rewrite_eval": "graphgrpo_jax.train.rewrite:run_eval",
    "report": "graphgrpo_jax.eval.report:run",
    "distill": "graphgrpo_jax.train.distill:run",
    "lm_smoke": "graphgrpo_jax.train.smoke:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Validates `config` and runs its stages in `workdir` (the library entry point; main() wraps it)."""
    config_validation.validate(config, stages=STAGES)
    # Before anything touches a device: a multi-host job must be joined first (see mesh.py).
    mesh_lib.maybe_initialize_distributed(config.get("mesh"))
    os.makedirs(workdir, exist_ok=True)
    logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())
    logging.info("config:\n%s", config)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    for name in config.stages:
        module_name, function_name = STAGES[name].split(":")
        logging.info("stage %s", name)
        getattr(importlib.import_module(module_name), function_name)(config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except config_validation.ConfigError as err:
        raise app.UsageError(str(err)) from None


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])  # here, so scripts importing run() need no flags
    app.run(main)
