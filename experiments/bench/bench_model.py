"""Throughput of the policy model on this machine: KV-cache decoding, a training step, and a matmul roofline.

    python experiments/bench/bench_model.py            # `small` preset, 5 repetitions
    python experiments/bench/bench_model.py --preset tiny --reps 7

Measures, on the default JAX device, with medians over `--reps` timed runs after one compiling run:
- decode: `sampling.generate`, greedy, batch 16, left-padded prompts of 64, 64 new tokens (no EOS, so
  every row runs the full 64 steps); tokens/s counts generated tokens, the prefill included in the time.
- train: a jitted AdamW step on the next-token loss, batch 16 x 128, fp32; FLOP/s from the analytic
  6·N·tokens + attention count. (XLA's `cost_analysis` is not used: it counts the body of the scanned
  layer stack once, not once per layer.)
- matmul: a 4096^3 fp32 matmul, as the machine's attainable FLOP/s for reference.
Prints a markdown table.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs.common import model_config
from graphgrpo_jax import sampling
from graphgrpo_jax.models import decoder


def timed(fn, reps: int) -> tuple[float, float]:
    """(seconds of the first, compiling call, median seconds of `reps` further calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def analytic_train_flops(config: decoder.DecoderConfig, params, batch: int, length: int) -> float:
    """6·N·tokens (N includes the LM head, not the embedding lookup) + dense attention (12·L·B·T²·H·Dh)."""
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    if not config.tie_embeddings:
        num_params -= config.vocab_size * config.hidden_size  # the lookup table does no matmul
    attention = 12 * config.num_layers * batch * length ** 2 * config.num_heads * config.head_dim
    return 6 * num_params * batch * length + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    config = decoder.DecoderConfig.from_config(model_config(args.preset))
    params = jax.jit(decoder.init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    rows = []

    # Decode: prompts of 32..64 real tokens, left-padded to 64.
    batch, prompt_len, new_tokens = 16, 64, 64
    prompts = rng.integers(1, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
    mask = np.arange(prompt_len)[None] >= rng.integers(0, prompt_len // 2, size=(batch, 1))
    prompts = jnp.asarray(np.where(mask, prompts, 0))
    never = config.vocab_size  # an EOS id outside the vocabulary

    def generate():
        return sampling.generate(params, config, prompts, mask, jax.random.key(0), max_new_tokens=new_tokens,
                                 eos_ids=never, pad_id=0, sampling=sampling.GREEDY).tokens

    compile_s, step_s = timed(generate, args.reps)
    rows.append(("decode (greedy, B=16, prompt 64, +64 tokens)", compile_s, step_s,
                 f"{batch * new_tokens / step_s:,.0f} new tokens/s ({1e3 * step_s / new_tokens:.1f} ms/token step)"))

    # Train step: AdamW on the mean next-token negative log-likelihood.
    batch, length = 16, 128
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(batch, length)).astype(np.int32))
    full = jnp.ones((batch, length), bool)
    optimizer = optax.adamw(1e-3)

    def train_step(params, opt_state, tokens, mask):
        def loss(params):
            return -decoder.token_log_probs(params, config, tokens, mask).sum() / (mask.sum() - batch)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    train_step = jax.jit(train_step)
    opt_state = optimizer.init(params)
    state = {"params": params, "opt_state": opt_state}

    def step():
        state["params"], state["opt_state"], value = train_step(state["params"], state["opt_state"], tokens, full)
        return value

    compile_s, step_s = timed(step, args.reps)
    flops = analytic_train_flops(config, params, batch, length)
    rows.append(("train step (AdamW, B=16 x 128, fp32)", compile_s, step_s,
                 f"{batch * length / step_s:,.0f} tokens/s; {flops / step_s / 1e9:.1f} GFLOP/s "
                 f"({flops / 1e9:.1f} GFLOP per step, 6N + attention)"))

    # Roofline reference.
    n = 4096
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    compile_s, step_s = timed(lambda: matmul(a, b), args.reps)
    rows.append((f"matmul {n}^3 fp32", compile_s, step_s, f"{2 * n ** 3 / step_s / 1e9:.1f} GFLOP/s"))

    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"preset {args.preset}: {num_params / 1e6:.2f}M params, {config.num_layers} layers, "
          f"d={config.hidden_size}, vocab {config.vocab_size}; device {jax.devices()[0].device_kind} "
          f"x{jax.device_count()}; jax {jax.__version__}; median of {args.reps}\n")
    print("| benchmark | first call (compile + run) s | median s | throughput |")
    print("|---|---:|---:|---|")
    for name, compile_s, step_s, throughput in rows:
        print(f"| {name} | {compile_s:.2f} | {step_s:.3f} | {throughput} |")


if __name__ == "__main__":
    main()
