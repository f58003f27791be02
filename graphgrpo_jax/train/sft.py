"""Supervised fine-tuning with CoT random masking (METHOD.md A4).

"Label-first CoT random masking": while learning to write the chain of thought, a random share `p_mask`
of the reasoning is left out of the loss, but the decision label is always supervised. With
`mask_unit="token"` each reasoning token is dropped independently; with `mask_unit="node"` whole nodes
are dropped (all tokens of e.g. `<qa>…</qa>` of one example together). Tokens outside every node span
(separators, end of sequence) are always supervised, like the label.

Batches are dicts of equal-shape int/bool arrays `[B, T]`: `tokens`, `attention_mask`, `loss_mask`
(response tokens) and `node_ids` (index of the node a token writes, or negative outside node spans).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from graphgrpo_jax import artifacts, mesh as mesh_lib, tasks
from graphgrpo_jax.data import cot
from graphgrpo_jax.models import decoder, lora
from graphgrpo_jax.train import loop, state as state_lib

BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "node_ids")


def cot_random_mask(rng: jax.Array, loss_mask: jax.Array, node_ids: jax.Array, *, label_node: int,
                    num_nodes: int, p_mask: float, unit: str = "token") -> jax.Array:
    """The loss mask with a random `p_mask` share of reasoning tokens (or nodes) removed.

    Reasoning tokens are response tokens of a node other than `label_node`; everything else keeps its
    `loss_mask` value.
    """
    if unit not in cot.MASK_UNITS:
        raise ValueError(f"mask_unit must be one of {cot.MASK_UNITS}, got {unit!r}")
    reasoning = loss_mask & (node_ids >= 0) & (node_ids != label_node)
    if unit == "token":
        drop = jax.random.bernoulli(rng, p_mask, loss_mask.shape)
    else:
        node_drop = jax.random.bernoulli(rng, p_mask, (loss_mask.shape[0], num_nodes))
        drop = jnp.take_along_axis(node_drop, jnp.clip(node_ids, 0, num_nodes - 1), axis=1)
    return loss_mask & ~(reasoning & drop)


def summed_nll(params: Any, model_config: decoder.DecoderConfig, batch: dict) -> jax.Array:
    """Negative log-likelihood summed over the tokens of `batch["weights"]` (float32 0/1). With a
    `batch["dropout_rng"]` (one key per row) the LoRA adapters' dropout runs, keyed by the first row's key."""
    dropout_rng = batch["dropout_rng"][0] if "dropout_rng" in batch else None
    logp = decoder.token_log_probs(params, model_config, batch["tokens"], batch["attention_mask"],
                                   dropout_rng=dropout_rng)
    return -(logp * batch["weights"]).sum()


def make_train_step(model_config: decoder.DecoderConfig, optimizer: optax.GradientTransformation, *,
                    label_node: int, num_nodes: int, p_mask: float, mask_unit: str, microbatches: int = 1):
    """A pure `step(state, batch) -> (state, metrics)`; jit it with the caller's shardings.

    The loss is the mean NLL over the batch's supervised tokens; `microbatches` > 1 computes it in
    slices of rows (`state.summed_value_and_grad`): the same update, a smaller working set. With LoRA
    (`model_config.lora_rank`) only the adapters are differentiated and updated (`lora.split`).
    """

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        rng, mask_rng, dropout_rng = jax.random.split(state["rng"], 3)
        loss_mask = batch["loss_mask"]
        if p_mask > 0:
            loss_mask = cot_random_mask(mask_rng, loss_mask, batch["node_ids"], label_node=label_node,
                                        num_nodes=num_nodes, p_mask=p_mask, unit=mask_unit)
        weights = loss_mask.astype(jnp.float32)
        num_tokens = jnp.maximum(weights.sum(), 1.0)
        rows = {"tokens": batch["tokens"], "attention_mask": batch["attention_mask"], "weights": weights}
        if model_config.lora_rank and model_config.lora_dropout:  # one key per row: each slice its own
            rows["dropout_rng"] = jax.random.split(dropout_rng, batch["tokens"].shape[0])
        trainable, frozen = lora.split(state["params"])
        nll, grads = state_lib.summed_value_and_grad(
            lambda p, b: summed_nll(lora.join(frozen, p), model_config, b), trainable, rows, microbatches)
        grads = jax.tree_util.tree_map(lambda g: g / num_tokens.astype(g.dtype), grads)
        params, opt_state = state_lib.apply_gradients(optimizer, state["params"], state["opt_state"], grads)
        metrics = {"sft/loss": nll / num_tokens, "sft/supervised_tokens": weights.sum(),
                   "sft/grad_norm": optax.global_norm(grads),
                   "sft/masked_share": 1.0 - weights.sum() / jnp.maximum(batch["loss_mask"].sum(), 1)}
        return {**state, "params": params, "opt_state": opt_state, "rng": rng}, metrics

    return step


def init_state(config: ml_collections.ConfigDict, model_config: decoder.DecoderConfig,
               optimizer: optax.GradientTransformation, layout: mesh_lib.Layout) -> tuple[dict, Any]:
    """The policy state SFT starts from, placed by `layout`, and its shardings.

    Params come from `config.model.hf_checkpoint` when it names a Hugging Face checkpoint folder (each
    process reads the file and places only its devices' slices), else from the seed. An embedding that
    `main.resolve` grew for the CoT tags gets mean-initialised rows (`hf.grow_rows`).
    """
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    logical_axes = decoder.param_logical_axes(model_config)
    if config.model.get("hf_checkpoint"):
        params = artifacts.pretrained_params(config, layout)
        return layout.init(lambda p: state_lib.new_state(p, optimizer, state_rng), logical_axes, params)
    return layout.init(lambda: state_lib.new_state(decoder.init_params(model_config, init_rng), optimizer, state_rng),
                       logical_axes)


def fit(config: ml_collections.ConfigDict, workdir: str, data: dict[str, np.ndarray],
        sample_rows: Callable[[int], np.ndarray], num_steps: int, log_every: int, **mask_settings) -> dict:
    """SFT of the config's policy on `data` (encoded `[N, T]` arrays), saved as stage `sft`.

    `sample_rows(step)` gives the dataset rows of a step's global batch (the same on every process);
    each process loads only the rows its devices hold; `mask_settings` are `make_train_step`'s CoT-masking
    keywords. Shared by the relevance and rewrite pipelines.
    """
    layout = mesh_lib.Layout.from_config(config.get("mesh"))
    model_config = decoder.DecoderConfig.from_config(config.model)
    optimizer = state_lib.make_optimizer(config.optim, num_steps)
    state, shardings = init_state(config, model_config, optimizer, layout)
    step_fn = layout.step(make_train_step(model_config, optimizer, microbatches=config.optim.get("microbatches", 1),
                                          **mask_settings), shardings)

    def load(rows: np.ndarray) -> dict:
        return {k: data[k][rows].astype(bool if k.endswith("mask") else np.int32) for k in BATCH_KEYS}

    return loop.fit(state, step_fn, lambda step: layout.load_batch(sample_rows(step), load),
                    num_steps=num_steps, workdir=workdir, stage="sft", save_every=config.checkpoint.save_every,
                    max_to_keep=config.checkpoint.max_to_keep, log_every=log_every, progress_keys=("sft/loss",))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The `sft` stage (and `rewrite_sft`): SFT on the rows of the task `config.task` names (`tasks/`)."""
    data = tasks.task_of(config).sft_data(config, workdir, artifacts.load_tokenizer(config, workdir))
    return fit(config, workdir, data.rows, data.sample_rows, data.num_steps, data.log_every, **data.mask)
