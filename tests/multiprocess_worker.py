"""A few steps of the sharded RL loop on a tiny decoder: sample → score → graph credit → GRPO update → φ.

Run as a script it is one process of a multi-process CPU job (`tests/test_multiprocess.py` starts two):
it joins the job through `mesh.maybe_initialize_distributed`, loads only its own rows of every batch,
and at the end writes a checkpoint collectively and (process 0) the final params and φ to `--out`.
Imported, `run_rl` on a one-device mesh is the single-process reference, and `rollout_batch` gives
`tests/test_mesh.py` a GRPO batch.

    python tests/multiprocess_worker.py --process_id=0 --num_processes=2 --port=PORT --out=DIR

Scoring is synthetic but deterministic, so every process computes the same rewards from the same
gathered completions: a rollout is right when its first token lies in the lower half of the vocabulary,
node values are read off fixed completion positions, token j of a completion writes node j mod V.
"""

from __future__ import annotations

import argparse
import os

import jax
import jraph
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from graphgrpo_jax import checkpointing, mesh as mesh_lib, sampling
from graphgrpo_jax.graph import controller as controller_lib, credit as credit_lib, spec as spec_lib
from graphgrpo_jax.models import decoder
from graphgrpo_jax.rl import grpo
from graphgrpo_jax.train import rl, state as state_lib

MODEL = decoder.DecoderConfig(arch="qwen2", vocab_size=128, hidden_size=32, num_layers=1, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=64, qkv_bias=True, max_seq_len=32)
NUM_PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS, NUM_STEPS = 2, 4, 6, 6, 3
NUM_ROWS = NUM_PROMPTS * GROUP
PAD, EOS = 0, 1
SEED = 0


def rl_parts():
    """(graph spec, credit settings, controller settings, GRPO config, policy optimizer)."""
    spec = spec_lib.graph_spec(spec_lib.default_graph_config())
    grpo_cfg = grpo.default_grpo_config()
    # Completions are cut at NEW_TOKENS, so most are truncated: keep them in the loss.
    grpo_cfg.update(num_generations=GROUP, num_iterations=2, beta=0.05, max_completion_length=NEW_TOKENS,
                    mask_truncated_completions=False)
    ctrl_cfg = controller_lib.default_controller_config()
    ctrl_cfg.mode = "main_loss"
    optimizer = state_lib.make_optimizer(ml_collections.ConfigDict(dict(learning_rate=1e-3)), NUM_STEPS)
    return (spec, credit_lib.credit_settings(credit_lib.default_credit_config(), spec),
            controller_lib.controller_settings(ctrl_cfg, spec, num_iterations=grpo_cfg.num_iterations),
            grpo_cfg, optimizer)


def prompts(step: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [NUM_ROWS, PROMPT_LEN] of a step (each prompt repeated GROUP times), and their mask."""
    rng = np.random.default_rng([SEED, step])
    lengths = rng.integers(2, PROMPT_LEN + 1, NUM_PROMPTS)
    mask = np.arange(PROMPT_LEN)[None, :] >= PROMPT_LEN - lengths[:, None]
    tokens = np.where(mask, rng.integers(2, MODEL.vocab_size, (NUM_PROMPTS, PROMPT_LEN)), PAD)
    return np.repeat(tokens, GROUP, axis=0).astype(np.int32), np.repeat(mask, GROUP, axis=0)


def rollout_batch(spec: spec_lib.GraphSpec, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
                  completions: np.ndarray, lengths: np.ndarray, truncated: np.ndarray
                  ) -> tuple[dict[str, np.ndarray], jraph.GraphsTuple]:
    """The update's token arrays `[N, P + C]` and rollout graph from sampled completions (host numpy)."""
    num_rows, width = completions.shape
    written = np.arange(width)[None, :] < lengths[:, None]
    node_ids = np.where(written, np.arange(width)[None, :] % spec.num_nodes, -1)
    rewards = (completions[:, 0] < MODEL.vocab_size // 2).astype(np.float32)
    read_at = np.arange(spec.num_nodes) % width
    sizes = np.array([len(vocab) if vocab else 3 for vocab in spec.categorical])
    node_values = np.where(read_at[None, :] < lengths[:, None], completions[:, read_at] % sizes, -1)
    graph = spec_lib.encode_rollouts(spec, rewards, node_values, None, GROUP, max_rollouts=num_rows + 1)
    no_prompt = np.zeros_like(prompt_mask)
    arrays = {"tokens": np.concatenate([prompt_tokens, completions], axis=1).astype(np.int32),
              "attention_mask": np.concatenate([prompt_mask, written], axis=1),
              "completion_mask": np.concatenate([no_prompt, written], axis=1),
              "node_ids": np.concatenate([np.full(prompt_mask.shape, -1), node_ids], axis=1).astype(np.int32),
              "truncated": np.asarray(truncated, bool)}
    return arrays, graph


def init_state() -> dict:
    """The RL state: policy params, optimizer state, RNG key and the φ controller (pure, for `sharded_init`)."""
    spec, _, ctrl_settings, _, optimizer = rl_parts()
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(SEED))
    state = state_lib.create_state(decoder.init_params(MODEL, init_rng), optimizer, state_rng)
    return {**state, "controller": controller_lib.init_controller(spec, ctrl_settings)}


def run_rl(mesh: jax.sharding.Mesh, num_steps: int = NUM_STEPS) -> dict:
    """`num_steps` RL steps on `mesh`; returns the final state (global arrays)."""
    spec, settings, ctrl_settings, grpo_cfg, optimizer = rl_parts()
    state, shardings = mesh_lib.sharded_init(init_state, mesh, decoder.param_logical_axes(MODEL))
    # The KL reference: host arrays every process holds whole (as if each had read a checkpoint).
    ref_params = mesh_lib.host_to_global(multihost_utils.process_allgather(state["params"], tiled=True),
                                         shardings["params"])
    # As the RL stage runs: each group's prompt is prefilled, and scored in the update, once.
    update = mesh_lib.shard_rl_update(rl.make_update(MODEL, grpo_cfg, spec, settings, optimizer,
                                                     prompt_len=PROMPT_LEN, share_prompts=True), mesh,
                                      shardings["params"], shardings["opt_state"], reference=True)
    generate = mesh_lib.shard_sampler(mesh, shardings["params"], MODEL, max_new_tokens=NEW_TOKENS, group_size=GROUP)
    mine = mesh_lib.process_batch_slice(mesh, NUM_ROWS)
    for step in range(num_steps):
        prompt_tokens, prompt_mask = prompts(step)
        global_prompts = mesh_lib.global_batch(mesh, (prompt_tokens[mine], prompt_mask[mine]), NUM_ROWS)
        rng, sample_rng = jax.random.split(state["rng"])
        out = generate(state["params"], *global_prompts, sample_rng, sampling.SamplingParams(), EOS, PAD)
        out = multihost_utils.process_allgather(out, tiled=True)  # every process scores every rollout
        arrays, graph = rollout_batch(spec, prompt_tokens, prompt_mask, out.tokens, out.lengths, out.truncated)
        batch = mesh_lib.global_batch(mesh, {k: v[mine] for k, v in arrays.items()}, NUM_ROWS)
        ctrl = state["controller"]
        params, opt_state, g_phi, _ = update(state["params"], state["opt_state"], ctrl.phi, batch, graph,
                                             ref_params)
        ctrl, _ = controller_lib.controller_update(ctrl, g_phi, ctrl_settings)
        state = {**state, "params": params, "opt_state": opt_state, "rng": rng, "controller": ctrl}
    return state


def host_arrays(state: dict) -> dict[str, np.ndarray]:
    """Params and φ as flat host arrays, keyed by their tree path (every process calls it: a collective)."""
    tree = {"params": state["params"], "phi": state["controller"].phi}
    gathered = multihost_utils.process_allgather(tree, tiled=True)
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    mesh_lib.maybe_initialize_distributed(dict(coordinator_address=f"127.0.0.1:{args.port}",
                                               num_processes=args.num_processes, process_id=args.process_id))
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=2, tensor=-1))
    state = run_rl(mesh)
    with checkpointing.Checkpointer(os.path.join(args.out, "checkpoint"), async_save=False) as ckpt:
        ckpt.save(NUM_STEPS, state, force=True)
    arrays = host_arrays(state)
    if jax.process_index() == 0:
        np.savez(os.path.join(args.out, "final.npz"), **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
