"""Training state and optimizers: plain pytrees, so they jit, shard and checkpoint without wrappers.

A state is a dict `{"params", "opt_state", "rng"}` (stages add their own entries, e.g. `phi`); the step
count lives in the checkpoint, not in the state, so resuming never depends on a counter array.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then constant or cosine decay to 10% over the run."""
    warmup = min(int(cfg.get("warmup_steps", 0)), max(num_steps - 1, 0))
    if cfg.get("schedule", "constant") == "cosine":
        warmup = max(warmup, 1)
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(num_steps, warmup + 1),
                                                  end_value=0.1 * cfg.learning_rate)
    if warmup == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                 optax.constant_schedule(cfg.learning_rate)], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, from the config's `optim` section."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.get("grad_clip", 1.0)),
        optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.95),
                    weight_decay=cfg.get("weight_decay", 0.0)),
    )


def create_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> dict:
    """The state, committed to the default device: uncommitted leaves (e.g. optax's step counters) would
    make the first jitted step compile once more when its outputs come back committed."""
    return jax.device_put({"params": params, "opt_state": optimizer.init(params), "rng": rng}, jax.devices()[0])
