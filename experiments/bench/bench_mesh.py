"""Throughput of the sharded SFT train step and the sharded sampler on whatever devices JAX sees.

    python experiments/bench/bench_mesh.py                                   # small preset, this host's devices
    python experiments/bench/bench_mesh.py --preset qwen2.5-0.5b --dtype bfloat16 --mesh data \
        --batch 32 --length 512 --sample_batch 64 --prompt_len 128 --new_tokens 128   # one GPU

The exact code path of the pipeline's stages: `Layout.from_config(config.mesh)` places the state built by
`sft.init_state` (random weights of the preset's shape), `Layout.step` jits `sft.make_train_step` with
those shardings, and `mesh.shard_sampler` is the RL stage's sampler. Reports medians over `--reps`
(after one warm-up call that compiles) of train tokens/s with achieved TFLOP/s (6·N·tokens plus attention,
as in `common.analytic_train_flops`), and new tokens/s of greedy decoding; the table is printed and saved
to `experiments/bench/results/mesh.md` with the device names.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

from configs import common as config_presets  # noqa: E402
from graphgrpo_jax import sampling  # noqa: E402
from graphgrpo_jax.models import decoder  # noqa: E402
from graphgrpo_jax import mesh as mesh_lib
from graphgrpo_jax.train import sft, state as state_lib  # noqa: E402

# Plain next-token SFT: no CoT nodes, no masking.
SFT_STEP = dict(label_node=0, num_nodes=1, p_mask=0.0, mask_unit="token")


def _config(preset: str, dtype: str, mesh: str, vocab_size: int | None):
    import ml_collections
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = config_presets.model_config(preset, dtype=dtype, param_dtype="float32")
    if vocab_size:
        config.model.vocab_size = vocab_size
    config.model.max_seq_len = 4096
    config.mesh = config_presets.mesh_config(mesh)
    config.optim = ml_collections.ConfigDict(dict(learning_rate=1e-5, warmup_steps=0, schedule="constant",
                                                  grad_clip=1.0, weight_decay=0.0, batch_size=1))
    return config


def check_against_cpu(config, model_config, optimizer, layout, shardings, step, train_batch, host_batch, prompts,
                      prompt_mask, new_tokens: int) -> list[str]:
    """Notes comparing the mesh's first SFT step and greedy decode with the same work on the host CPU.

    Both sides start from the same state (`sft.init_state` is seeded) and multiply at full fp32 precision
    (`jax.default_matmul_precision("highest")`: no TF32 on the GPU side), so what differs is reduction order.
    """
    cpu = jax.devices("cpu")[0]
    with jax.default_matmul_precision("highest"):
        state, _ = sft.init_state(config, model_config, optimizer, layout)
        host_state = jax.device_get(state)
        tokens = generate_on(layout, shardings, model_config, new_tokens)(
            state["params"], prompts, prompt_mask, jax.random.PRNGKey(0), sampling.GREEDY, -1, 0).tokens
        state, metrics = step(state, train_batch)
        mesh_loss, mesh_params = float(metrics["sft/loss"]), jax.device_get(state["params"])
        with jax.default_device(cpu):
            cpu_state = jax.device_put(host_state, cpu)
            cpu_tokens = sampling.generate(cpu_state["params"], model_config, jax.device_put(prompts, cpu),
                                           jax.device_put(prompt_mask, cpu), jax.random.PRNGKey(0),
                                           max_new_tokens=new_tokens, eos_ids=-1, pad_id=0,
                                           sampling=sampling.GREEDY).tokens
            cpu_step = jax.jit(sft.make_train_step(model_config, optimizer, **SFT_STEP))
            cpu_state, cpu_metrics = cpu_step(cpu_state, jax.device_put(host_batch, cpu))
            cpu_loss, cpu_params = float(cpu_metrics["sft/loss"]), jax.device_get(cpu_state["params"])
    leaves = [jax.tree_util.tree_leaves(t) for t in (mesh_params, cpu_params, host_state["params"])]
    update_gap = np.sqrt(sum(np.sum((a - b) ** 2) for a, b, _ in zip(*leaves)) /
                         sum(np.sum((b - h) ** 2) for _, b, h in zip(*leaves)))
    share, prefix = common.greedy_agreement(np.asarray(tokens), np.asarray(cpu_tokens))
    return [f"Against the host CPU (fp32, highest matmul precision): first-step loss {mesh_loss:.6f} vs "
            f"{cpu_loss:.6f}, gradient norm {float(metrics['sft/grad_norm']):.6f} vs "
            f"{float(cpu_metrics['sft/grad_norm']):.6f}; the two parameter updates differ by {update_gap:.1e} of "
            f"the update's norm; greedy decode: {share:.0%} of rows identical, mean agreeing prefix "
            f"{prefix:.1f} of {new_tokens}."]


def generate_on(layout, shardings, model_config, new_tokens: int):
    """The RL stage's sharded sampler for this layout (greedy calls pass `sampling.GREEDY`)."""
    return mesh_lib.shard_sampler(layout.mesh, shardings["params"], model_config, max_new_tokens=new_tokens,
                                  rules=layout.rule_map)


def run(preset: str, dtype: str, mesh: str, batch: int, length: int, sample_batch: int, prompt_len: int,
        new_tokens: int, reps: int, vocab_size: int | None = None, check_cpu: bool = False
        ) -> tuple[list[list], list[str]]:
    config = _config(preset, dtype, mesh, vocab_size)
    layout = mesh_lib.Layout.from_config(config.mesh)
    model_config = decoder.DecoderConfig.from_config(config.model)
    optimizer = state_lib.make_optimizer(config.optim, 1000)
    state, shardings = sft.init_state(config, model_config, optimizer, layout)
    step = layout.step(sft.make_train_step(model_config, optimizer, **SFT_STEP), shardings)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, model_config.vocab_size, size=(batch, length)).astype(np.int32)
    host_batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens, bool),
                  "loss_mask": np.ones_like(tokens, bool), "node_ids": np.zeros_like(tokens)}
    train_batch = layout.load_batch(np.arange(batch), lambda rows: {k: v[rows] for k, v in host_batch.items()})
    holder = {"state": state}

    def train() -> jax.Array:
        holder["state"], metrics = step(holder["state"], train_batch)
        return metrics["sft/loss"]

    generate = generate_on(layout, shardings, model_config, new_tokens)
    prompts = jnp.asarray(rng.integers(1, model_config.vocab_size, size=(sample_batch, prompt_len)), jnp.int32)
    prompt_mask = jnp.ones(prompts.shape, bool)

    def sample() -> jax.Array:
        # eos_ids = -1 never matches, so every row decodes exactly `new_tokens` tokens.
        return generate(holder["state"]["params"], prompts, prompt_mask, jax.random.PRNGKey(0), sampling.GREEDY,
                        -1, 0).tokens

    parity = check_against_cpu(config, model_config, optimizer, layout, shardings, step, train_batch, host_batch,
                               prompts, prompt_mask, new_tokens) if check_cpu else []
    timings = common.timed_pairs({"train step": train, "greedy decode": sample}, reps)
    params = holder["state"]["params"]
    flops = common.analytic_train_flops(model_config, params, batch, length)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    train_s, sample_s = timings["train step"].median_s, timings["greedy decode"].median_s
    rows = [["train step", f"{batch}×{length}", f"{timings['train step'].first_s:.1f}", f"{train_s:.4f}",
             f"{batch * length / train_s:,.0f}", f"{flops / train_s / 1e12:.2f}"],
            ["greedy decode", f"{sample_batch}×({prompt_len}+{new_tokens})",
             f"{timings['greedy decode'].first_s:.1f}", f"{sample_s:.4f}",
             f"{sample_batch * new_tokens / sample_s:,.0f}", ""]]
    devices = jax.devices()
    notes = [f"{preset} preset ({num_params / 1e6:.1f}M params, vocab {model_config.vocab_size}), activations "
             f"{dtype}, fp32 params and Adam; mesh `{mesh}` {dict(layout.mesh.shape)} over {len(devices)} × "
             f"{devices[0].device_kind}; medians of {reps} after one compiling call; tokens/s counts trained "
             f"tokens and new tokens.", *parity]
    return rows, notes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mesh", default="data", help="a mesh preset of configs/common.py")
    parser.add_argument("--vocab_size", type=int, default=None, help="override the preset's vocabulary")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--sample_batch", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--check_cpu", action="store_true",
                        help="also compare the first train step and greedy decode with the host CPU")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    rows, notes = run(args.preset, args.dtype, args.mesh, args.batch, args.length, args.sample_batch,
                      args.prompt_len, args.new_tokens, args.reps, args.vocab_size, args.check_cpu)
    table = common.markdown_table(["what", "shape", "first call s", "median s", "tokens/s", "TFLOP/s"], rows)
    print(table)
    print("\n".join(notes))
    if not args.no_save:
        command = "python experiments/bench/bench_mesh.py " + " ".join(sys.argv[1:] if argv is None else argv)
        common.report("mesh", command, table, notes)


if __name__ == "__main__":
    main()
