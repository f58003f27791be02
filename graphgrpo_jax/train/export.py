"""`export` stage: a trained policy as a Hugging Face folder that transformers and servers load as it is.

For each policy of `config.export.policies` ("sft", "rl"), `<workdir>/export/<policy>/` gets config.json and
model.safetensors (`models/hf.save_hf`, in `config.export.dtype`), the run's tokenizer with its chat template
and the CoT tags (`tokenizer.json`, `tokenizer_config.json`), and a generation_config.json with its EOS and pad
ids. A LoRA policy is exported merged (W + (alpha / r) A B), the plain model any server loads. The folder is
written beside its destination and renamed into place, so a reader never sees half of one; an existing export
of the same checkpoint step is kept.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from graphgrpo_jax import artifacts, checkpointing, fileio
from graphgrpo_jax.models import decoder, hf, lora

DTYPES = ("float32", "bfloat16")


def export_dir(workdir: str, policy: str) -> pathlib.Path:
    return pathlib.Path(workdir) / "export" / policy


def _latest_step(workdir: str, policy: str) -> int:
    with checkpointing.Checkpointer(artifacts.checkpoint_dir(workdir, policy)) as ckpt:
        steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no {policy} checkpoint in {artifacts.checkpoint_dir(workdir, policy)}: run the "
                                f"'{policy}' stage first")
    return steps[-1]


def export_policy(config: ml_collections.ConfigDict, workdir: str, policy: str) -> pathlib.Path:
    """Writes `export_dir(workdir, policy)` from the policy's newest checkpoint; returns the folder."""
    dtype = config.export.dtype
    if dtype not in DTYPES:
        raise ValueError(f"config.export.dtype = {dtype!r}: choose one of {DTYPES}")
    out, step = export_dir(workdir, policy), _latest_step(workdir, policy)
    stamp = {"policy": policy, "step": step, "dtype": dtype}
    if (out / "export.json").is_file() and json.loads((out / "export.json").read_text()) == stamp:
        logging.info("export of %s step %d already in %s", policy, step, out)
        return out
    model_config = decoder.DecoderConfig.from_config(config.model)
    # LoRA adapters merged into their kernels in fp32, before the cast: the folder holds the plain model.
    params = jax.device_get(lora.merged(artifacts.policy_params(config, workdir, policy), model_config.lora_scale))
    params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
    tokenizer = artifacts.load_tokenizer(config, workdir)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        special["bos_token_id"] = tokenizer.bos_token_id
    model = ml_collections.ConfigDict(dict(config.model.to_dict(), param_dtype=dtype, lora_rank=0))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        hf.save_hf(params, model, staging, extra_config=special)
        tokenizer.save_pretrained(str(staging))
        (staging / "generation_config.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
        (staging / "export.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        fileio.move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logging.info("exported %s step %d (%s) to %s", policy, step, dtype, out)
    return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    return {policy: str(export_policy(config, workdir, policy)) for policy in config.export.policies}
