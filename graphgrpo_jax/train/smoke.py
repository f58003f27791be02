"""`lm_smoke` stage: trains the configured decoder on a synthetic bigram language, end to end.

It exercises everything a real stage uses (config, model, optimizer, jitted step, resumable loop,
checkpoints, metrics) in seconds, and it has a known answer: the loss must fall towards the language's
entropy rate, which is logged next to it as `smoke/entropy_floor`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from graphgrpo_jax.models import decoder
from graphgrpo_jax.train import loop, state as state_lib


def bigram_language(vocab_size: int, seed: int, concentration: float = 0.1) -> tuple[np.ndarray, float]:
    """A random bigram transition matrix (sparse-ish rows) and its entropy rate in nats."""
    rng = np.random.default_rng(seed)
    transitions = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
    stationary = np.linalg.matrix_power(transitions.T, 64) @ np.full(vocab_size, 1.0 / vocab_size)
    entropy = -np.sum(stationary[:, None] * transitions * np.log(np.maximum(transitions, 1e-30)))
    return transitions, float(entropy)


def sample_batch(transitions: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """A deterministic batch for `step` (the data position is the step, so resumes are exact)."""
    rng = np.random.default_rng([seed, step])
    vocab = transitions.shape[0]
    cdf = np.cumsum(transitions, axis=1)
    tokens = np.empty((batch_size, seq_len), np.int32)
    tokens[:, 0] = rng.integers(vocab, size=batch_size)
    for t in range(1, seq_len):
        u = rng.random(batch_size)[:, None]
        tokens[:, t] = np.minimum((u > cdf[tokens[:, t - 1]]).sum(axis=1), vocab - 1)
    return tokens


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    cfg = config.lm_smoke
    model_cfg = decoder.DecoderConfig.from_config(config.model)
    transitions, entropy = bigram_language(cfg.vocab_size, config.seed)
    optimizer = state_lib.make_optimizer(config.optim, cfg.num_steps)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = state_lib.create_state(decoder.init_params(model_cfg, init_rng), optimizer, state_rng)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, tokens):
        mask = jnp.ones(tokens.shape, bool)

        def loss_fn(params):
            logp = decoder.token_log_probs(params, model_cfg, tokens, mask)
            return -logp[:, 1:].mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"smoke/loss": loss, "smoke/entropy_floor": entropy,
                   "smoke/grad_norm": optax.global_norm(grads)}
        return dict(state, params=params, opt_state=opt_state), metrics

    def batch_fn(step):
        return sample_batch(transitions, step, config.optim.batch_size, cfg.seq_len, config.seed)

    state = loop.fit(state, train_step, batch_fn, num_steps=cfg.num_steps, workdir=workdir, stage="lm_smoke",
                     save_every=config.checkpoint.save_every, max_to_keep=config.checkpoint.max_to_keep,
                     log_every=cfg.log_every, progress_keys=("smoke/loss",))
    return state
