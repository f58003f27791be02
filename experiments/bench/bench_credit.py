r"""Throughput of graph credit: jitted node credit + token advantages for a batch of rollouts.

Run (CPU):
  python experiments/bench/bench_credit.py --num_rollouts=4096 --group_size=8 --seq_len=128

For each credit setting it reports the compile time (lower + compile, once) and the median over
`--reps` runs of the jitted `compute_credit` (and of its value-and-gradient in φ, what the
`main_loss` / `alignment` controllers pay), plus the host-side `encode_rollouts`. Rollouts are random
but shaped like real ones: 7 nodes of the default graph, categorical values in range, free-text ids
with repeats, 5% missing nodes, a 2% format-failure rate, one token span per node.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from graphgrpo_jax.graph.credit import CreditSettings, compute_credit
from graphgrpo_jax.graph.spec import GraphSpec, default_graph_config, encode_rollouts, graph_spec

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_rollouts", 4096, "rollouts per batch (num_groups x group_size)")
flags.DEFINE_integer("group_size", 8, "rollouts per prompt")
flags.DEFINE_integer("seq_len", 128, "completion tokens per rollout")
flags.DEFINE_integer("reps", 7, "timed repetitions (the median is reported)")
flags.DEFINE_integer("seed", 0, "random batch seed")

SETTINGS = {
    "outcome": CreditSettings(variant="outcome"),
    "graph (default)": CreditSettings(),
    "graph (paper-faithful)": CreditSettings(norm="node", kappa=1.0),
    "graph (rule_consistency)": CreditSettings(evidence="rule_consistency"),
    "chain_process": CreditSettings(variant="chain_process"),
    "path_scaled": CreditSettings(variant="path_scaled"),
}


def random_rollouts(spec: GraphSpec, num_rollouts: int, seq_len: int, seed: int):
    rng = np.random.default_rng(seed)
    values = np.stack([rng.integers(0, len(vocab) if vocab else 6, num_rollouts)
                       for vocab in spec.categorical], 1)
    values[rng.random(values.shape) < 0.05] = -1
    rewards = rng.choice([0.0, 1.0], num_rollouts)
    failed = rng.random(num_rollouts) < 0.02
    rewards[failed], values[failed] = -1.0, -1
    gold = rng.integers(0, len(spec.categorical[spec.root]), num_rollouts)
    # One span per node in template order after a 16-token prompt, the rest free text or padding.
    span = (seq_len - 16) // (spec.num_nodes + 1)
    token_node_ids = np.full((num_rollouts, seq_len), -1, np.int32)
    for v in range(spec.num_nodes):
        token_node_ids[:, 16 + v * span:16 + (v + 1) * span] = v
    completion_mask = np.zeros((num_rollouts, seq_len), bool)
    completion_mask[:, 16:] = True
    return rewards, values, gold, token_node_ids, completion_mask


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    spec = graph_spec(default_graph_config())
    n = FLAGS.num_rollouts
    rewards, values, gold, ids, mask = random_rollouts(spec, n, FLAGS.seq_len, FLAGS.seed)
    encode = lambda: encode_rollouts(spec, rewards, values, gold, FLAGS.group_size)
    encode_s = median_seconds(encode, FLAGS.reps)
    graph = jax.device_put(encode())
    ids, mask = jax.device_put(ids), jax.device_put(mask)
    phi = jnp.asarray(spec.phi_init, jnp.float32)
    weights = jax.random.normal(jax.random.key(0), ids.shape)

    def loss(p, graph, ids, mask, *, settings):
        out = compute_credit(graph, p, ids, mask, spec=spec, settings=settings)
        return jnp.sum(out.token_advantages * weights)

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnames="settings")

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
          f"{n} rollouts x {spec.num_nodes} nodes, group {FLAGS.group_size}, {FLAGS.seq_len} tokens; "
          f"median of {FLAGS.reps}")
    print(f"encode_rollouts (host numpy): {encode_s * 1e3:.1f} ms = {n / encode_s:,.0f} rollouts/s\n")
    print("| setting | compile (s) | credit + tokens (ms) | rollouts/s "
          "| value+grad in φ (ms) | rollouts/s |")
    print("|---|---|---|---|---|---|")
    for name, settings in SETTINGS.items():
        start = time.perf_counter()
        compiled = compute_credit.lower(graph, phi, ids, mask, spec=spec, settings=settings).compile()
        compile_s = time.perf_counter() - start
        forward_s = median_seconds(lambda: compiled(graph, phi, ids, mask), FLAGS.reps)
        jax.block_until_ready(grad_fn(phi, graph, ids, mask, settings=settings))  # compile
        grad_s = median_seconds(lambda: grad_fn(phi, graph, ids, mask, settings=settings), FLAGS.reps)
        print(f"| {name} | {compile_s:.2f} | {forward_s * 1e3:.2f} | {n / forward_s:,.0f} | "
              f"{grad_s * 1e3:.2f} | {n / grad_s:,.0f} |")


if __name__ == "__main__":
    app.run(main)
