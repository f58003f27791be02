r"""Runs an experiment config: `python -m graphgrpo_jax.main --config=configs/relevance.py:cpu --workdir=DIR`.

Overrides go on the command line (`--config.rl.group_size=16`). With `model.hf_checkpoint`, the model's
architecture comes from that folder's config.json (command-line model overrides still win). The config is
validated before any work,
written to `<workdir>/config.json`, and its `stages` run in order. Stages talk to each other only through
the workdir (tokenizer folder, checkpoints, reports), so a re-run resumes where the last one stopped.
Every stage places its arrays on the device mesh of `config.mesh` (default `single`: one device); a
multi-host run joins its job here, before any stage runs (`mesh.py`).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import sys
from collections.abc import Collection

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
    "rewrite_sft": "graphgrpo_jax.train.sft:run",  # the sft stage of config.task = "rewrite"
    "rewrite_eval": "graphgrpo_jax.train.rewrite:run_eval",
    "report": "graphgrpo_jax.eval.report:run",
    "distill": "graphgrpo_jax.train.distill:run",
    "lm_smoke": "graphgrpo_jax.train.smoke:run",
    "export": "graphgrpo_jax.train.export:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")


def resolve(config: ml_collections.ConfigDict, explicit: Collection[str] = ()) -> ml_collections.ConfigDict:
    """A copy of `config` whose model takes its architecture from `model.hf_checkpoint`'s config.json when it
    names one; `explicit` are dotted fields set on the command line (`model.max_seq_len`), which win."""
    if not config.get("model") or not config.model.get("hf_checkpoint"):
        return config
    from graphgrpo_jax.models import hf  # transformers: loaded only when a checkpoint is named

    resolved = copy.deepcopy(config)
    model_fields = {field.split(".", 1)[1] for field in explicit if field.startswith("model.")}
    try:
        resolved.model = hf.resolve_checkpoint_model(config.model, model_fields)
    except (OSError, ValueError) as err:
        raise config_validation.ConfigError(f"invalid config:\n  {err}") from None
    if "vocab_size" not in model_fields:
        resolved.model.vocab_size = _vocab_with_cot_tags(resolved)
    return resolved


def _vocab_with_cot_tags(config: ml_collections.ConfigDict, multiple: int = 64) -> int:
    """The embedding rows a run needs: the checkpoint's, or, when the `data` stage will add the CoT tags to the
    checkpoint's own tokenizer and they do not fit (SmolLM2 has no spare rows; Qwen2.5 has), the tokenizer plus
    the tags, rounded up to `multiple` rows (SFT fills the new rows with the mean embedding)."""
    vocab = config.model.vocab_size
    if config.get("tokenizer", {}).get("hf_checkpoint") != config.model.hf_checkpoint:
        return vocab
    from graphgrpo_jax import tokenization
    from graphgrpo_jax.data import prepare

    try:
        tokenizer = tokenization.load_tokenizer(config.model.hf_checkpoint)
    except (OSError, ValueError, TypeError):
        return vocab  # validation names the folder and what is wrong with it
    needed = prepare.size_with_node_tags(tokenizer)
    if needed <= vocab or len(tokenizer) > vocab:  # it fits, or the tokenizer is not this embedding's (an error)
        return vocab
    return -(-needed // multiple) * multiple


def run(config: ml_collections.ConfigDict, workdir: str, explicit: Collection[str] = ()) -> None:
    """Resolves and validates `config` and runs its stages in `workdir` (the library entry point; main() wraps
    it, passing the fields set on the command line as `explicit`)."""
    config = resolve(config, explicit)
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


def _load_config_file(spec: str) -> ml_collections.ConfigDict | None:
    """The config of `--config=PATH[:VARIANT]` as config_flags loads it, or None when it cannot be loaded."""
    path, _, variant = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_config_file", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except Exception:  # noqa: BLE001 -- a config that fails to load is reported by absl's own error
        return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but an override naming no config field (`--config.model.hf_ckpt=...`, which
    ml_collections answers with a bare KeyError) fails with the nearest field names."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as err:
        files = [arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--config=")]
        config = _load_config_file(files[-1]) if files else None
        paths = [arg.split("=", 1)[0][len("--config."):] for arg in argv[1:] if arg.startswith("--config.")]
        problems = [config_validation.unknown_field_error(config, path) for path in paths] if config else []
        problems = [problem for problem in problems if problem] or [f"{type(err).__name__}: {err}"]
        sys.exit("invalid command line:\n  " + "\n  ".join(problems))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run(_CONFIG.value, _WORKDIR.value, explicit=config_flags.get_override_values(flags.FLAGS["config"]))
    except config_validation.ConfigError as err:
        raise app.UsageError(str(err)) from None


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])  # here, so scripts importing run() need no flags
    app.run(main, flags_parser=parse_flags)
