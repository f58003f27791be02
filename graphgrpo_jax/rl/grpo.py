"""The GRPO core shared by relevance and rewriting: its settings, the clipped policy loss and the reward logs.

METHOD.md section C. Option names and definitions follow TRL's `GRPOTrainer` so that configs and logs
read the same as there (`config.grpo`, read once into the frozen `GrpoSettings` by `grpo_settings`):

* `num_generations`: G, rollouts per prompt, laid out as contiguous blocks of G rows.
* `scale_rewards`: `group` (TRL's default), `batch` or `none`; the mean is always the group's, the
  std is the group's (`group`) or the whole batch's (`batch`), unbiased, plus `credit.eps`. The
  advantages are computed in `graph/credit.py` (outcome GRPO is its `outcome` variant), which takes this
  option through `credit_settings(..., scale_rewards=)`.
* `loss_type`: `grpo` (per-sequence token mean, then mean over sequences), `dapo` (token mean over the
  batch) and `dr_grpo` (token sum over `N · max_completion_length`, a constant; the only reader of
  `max_completion_length`).
* `epsilon` / `epsilon_high`: the lower / upper clip range of the ratio (DAPO's clip-higher).
* `delta`: TRL's two-sided clip, the ratio capped at `delta` before the surrogate. With
  `delta > 1 + epsilon_high` (enforced) it touches only tokens with negative advantage, where it bounds
  the surrogate below by `delta · A`: exactly the dual clip of Ye et al. (2020) used by DAPO/VAPO-style
  recipes, so no second option exists for it.
* `beta`: weight of the k3 estimate of KL(π_θ ‖ π_ref), `exp(ref − logp) − (ref − logp) − 1`,
  added per token; `beta = 0` needs no reference model.
* `num_iterations`: μ, policy updates per generated batch (the first has ratio 1, so the clip options
  act from the second on).
* `mask_truncated_completions`: rows flagged truncated (no EOS before the length limit) leave the loss.

Advantages are per token, `[N, T]`, so graph credit plugs in directly; outcome GRPO is the special case
where every token of a response carries the same value (a `[N]` array is broadcast that way).
Everything here is a pure function of arrays; the settings are read at trace time, so close over them
(or `functools.partial`) before `jax.jit`. The loss functions read the options as attributes, of a
`GrpoSettings` or of the config section itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

# The credit functions apply `scale_rewards` (and compute the group statistics the reward logs read too).
from graphgrpo_jax.graph.credit import SCALE_REWARDS_MODES, group_moments

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def default_grpo_config() -> ml_collections.ConfigDict:
    """GRPO options with TRL's names; defaults are TRL's except clip-higher (DAPO's 0.28)."""
    return ml_collections.ConfigDict(
        dict(
            num_generations=8,  # G: rollouts per prompt, one contiguous block each
            epsilon=0.2,  # lower clip: ratio >= 1 - epsilon
            epsilon_high=0.28,  # upper clip: ratio <= 1 + epsilon_high
            delta=config_dict.placeholder(float),  # dual clip cap on the ratio; None disables it
            beta=0.0,  # KL weight; 0 means no reference model
            loss_type="grpo",
            scale_rewards="group",
            num_iterations=1,  # mu: policy updates per generated batch (the update's scan)
            mask_truncated_completions=True,
            max_completion_length=256,  # tokens; also the dr_grpo normaliser
        )
    )


@dataclasses.dataclass(frozen=True)
class GrpoSettings:
    """`config.grpo`, frozen and hashable: the RL update closes over it and is cached on it. The defaults
    are `default_grpo_config`'s."""

    num_generations: int = 8
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    delta: float | None = None
    beta: float = 0.0
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    mask_truncated_completions: bool = True
    max_completion_length: int = 256


_INTEGER_FIELDS = ("num_generations", "num_iterations", "max_completion_length")
_FLOAT_FIELDS = ("epsilon", "epsilon_high", "delta", "beta")


def grpo_settings(cfg: Mapping[str, Any] | ml_collections.ConfigDict | GrpoSettings) -> GrpoSettings:
    """The validated `GrpoSettings` of a GRPO config section, failing on the first bad field, named: a field
    `GrpoSettings` does not know (a typo would otherwise be ignored), a number of the wrong type, or a value
    `validate_grpo_config` refuses."""
    if isinstance(cfg, GrpoSettings):
        return cfg
    known = [field.name for field in dataclasses.fields(GrpoSettings)]
    unknown = sorted(set(cfg.keys()) - set(known))
    if unknown:
        raise ValueError(f"GRPO config field {unknown[0]!r}: no such option; the options are {known}")
    values = {name: cfg[name] for name in known if name in cfg}
    for name, value in values.items():
        if name in _INTEGER_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"GRPO config field {name!r} = {value!r}: must be an integer")
        if name in _FLOAT_FIELDS and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"GRPO config field {name!r} = {value!r}: must be a number")
            values[name] = float(value)
    if not isinstance(values.get("mask_truncated_completions", True), bool):
        raise ValueError(f"GRPO config field 'mask_truncated_completions' = "
                         f"{values['mask_truncated_completions']!r}: must be True or False")
    settings = GrpoSettings(**values)
    validate_grpo_config(settings)
    return settings


def validate_grpo_config(cfg: Any) -> None:
    """Fails on the first bad GRPO option, naming it; call once at start-up (`grpo_settings` does)."""

    def fail(field: str, why: str) -> None:
        raise ValueError(f"GRPO config field {field!r} = {getattr(cfg, field)!r}: {why}")

    if cfg.num_generations < 2:
        fail("num_generations", "a group needs at least 2 rollouts to have a relative advantage")
    if not 0.0 <= cfg.epsilon < 1.0:
        fail("epsilon", "must lie in [0, 1)")
    if cfg.epsilon_high < 0.0:
        fail("epsilon_high", "must be >= 0")
    if cfg.delta is not None and cfg.delta <= 1.0 + cfg.epsilon_high:
        fail("delta", f"the dual clip cap must exceed 1 + epsilon_high = {1.0 + cfg.epsilon_high}")
    if cfg.beta < 0.0:
        fail("beta", "must be >= 0")
    if cfg.loss_type not in LOSS_TYPES:
        fail("loss_type", f"choose one of {LOSS_TYPES}")
    if cfg.scale_rewards not in SCALE_REWARDS_MODES:
        fail("scale_rewards", f"choose one of {SCALE_REWARDS_MODES}")
    if cfg.num_iterations < 1:
        fail("num_iterations", "must be >= 1")
    if cfg.max_completion_length < 1:
        fail("max_completion_length", "must be >= 1")


def group_reward_stats(rewards: jax.Array, group_size: int) -> dict[str, jax.Array]:
    """TRL's reward logs: batch mean, mean within-group std, share of groups with zero std (`credit.group_moments`,
    the statistics the advantages are computed from)."""
    groups = jnp.arange(rewards.shape[0]) // group_size
    moments = group_moments(rewards, groups, rewards.shape[0] // group_size, jnp.ones(rewards.shape, bool))
    return {
        "reward": jnp.mean(rewards),
        "reward_std": jnp.mean(moments.std[::group_size]),
        "frac_reward_zero_std": jnp.mean((~moments.spread[::group_size]).astype(jnp.float32)),
    }


class LossWeights(NamedTuple):
    """Batch-wide token weights that make the policy loss and its logs plain sums over tokens, so that a
    batch can be scored in slices of rows and the slices' sums added (`policy_loss_terms`)."""

    loss: jax.Array  # [N, T]: the loss is Σ loss · per-token loss (`cfg.loss_type`'s normalisation)
    mean: jax.Array  # [N, T]: mask / Σ mask, so a masked token mean is Σ mean · x


def loss_weights(mask: jax.Array, cfg: Any, truncated: jax.Array | None = None, *,
                 completion_width: int | None = None) -> LossWeights:
    """The weights of `[N, T]` completion tokens (`mask`) under `cfg.loss_type` (TRL's three definitions):
    `grpo` 1 / (N · the row's length), `dapo` 1 / (tokens in the batch), `dr_grpo` 1 / (N ·
    max_completion_length); rows flagged `truncated` weigh 0 under `cfg.mask_truncated_completions`.

    `completion_width`: the most completion tokens a row can hold, which `dr_grpo`'s normaliser must bound;
    by default the mask's width, less where the rows start with a prompt block (the RL update's batches:
    `T` = prompt block + completions)."""
    mask = mask.astype(jnp.float32)
    if truncated is not None and cfg.mask_truncated_completions:
        mask = mask * (1.0 - truncated.astype(jnp.float32))[:, None]
    rows = mask.shape[0]
    if cfg.loss_type == "grpo":
        loss = mask / (rows * jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0))
    elif cfg.loss_type == "dapo":
        loss = mask / jnp.maximum(jnp.sum(mask), 1.0)
    elif cfg.loss_type == "dr_grpo":
        width = mask.shape[-1] if completion_width is None else completion_width
        if width > cfg.max_completion_length:
            raise ValueError(
                f"completions are {width} tokens wide but max_completion_length = "
                f"{cfg.max_completion_length}: the dr_grpo normaliser must bound every length"
            )
        loss = mask / (rows * cfg.max_completion_length)
    else:
        raise ValueError(f"GRPO config field 'loss_type' = {cfg.loss_type!r}: choose one of {LOSS_TYPES}")
    return LossWeights(loss=loss, mean=mask / jnp.maximum(jnp.sum(mask), 1.0))


def _weighted_sum(weights: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(weights > 0, weights * x, 0.0))


def policy_loss_terms(
    logp: jax.Array,
    old_logp: jax.Array | None,
    advantages: jax.Array,
    weights: LossWeights,
    cfg: Any,
    ref_logp: jax.Array | None = None,
    *,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped surrogate (+ k3 KL) and its token-mean logs as sums over the given rows, with
    batch-wide `weights` (`loss_weights`): over slices of a batch's rows they add up to `policy_loss`."""
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"GRPO config field 'beta' = {cfg.beta}: a KL penalty needs ref_logp")
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = jnp.broadcast_to(advantages, logp.shape)
    active = weights.mean > 0

    # Log-ratios are zeroed off the mask first so that padding (even at -inf) stays finite.
    ratio = jnp.exp(jnp.where(active, logp - old_logp, 0.0))
    clipped = jnp.clip(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high)
    capped = ratio if cfg.delta is None else jnp.minimum(ratio, cfg.delta)
    per_token_loss = -jnp.minimum(capped * advantages, clipped * advantages)

    token_means = {}
    if ref_logp is not None:
        ref_log_ratio = jnp.where(active, ref_logp - logp, 0.0)
        per_token_kl = jnp.exp(ref_log_ratio) - ref_log_ratio - 1.0
        if cfg.beta > 0:
            per_token_loss = per_token_loss + cfg.beta * per_token_kl
        token_means["kl"] = per_token_kl

    low = (ratio < 1.0 - cfg.epsilon) & (advantages < 0)
    high = (ratio > 1.0 + cfg.epsilon_high) & (advantages > 0)
    token_means.update({"clip_ratio/low": low, "clip_ratio/high": high, "clip_ratio/region": low | high,
                        "ratio/mean": ratio})
    if cfg.delta is not None:
        token_means["clip_ratio/dual"] = (ratio > cfg.delta) & (advantages < 0)
    if entropy is not None:
        token_means["entropy"] = entropy
    loss = _weighted_sum(weights.loss, per_token_loss)
    metrics = {name: _weighted_sum(weights.mean, x.astype(jnp.float32)) for name, x in token_means.items()}
    return loss, jax.lax.stop_gradient({"loss": loss, **metrics})


def completion_metrics(mask: jax.Array, truncated: jax.Array | None = None) -> dict[str, jax.Array]:
    """Completion lengths (mean, min, max) and the truncated share, the logs that are not token sums."""
    lengths = jnp.sum(mask.astype(jnp.float32), axis=-1)
    metrics = {"completions/mean_length": jnp.mean(lengths), "completions/min_length": jnp.min(lengths),
               "completions/max_length": jnp.max(lengths)}
    if truncated is not None:
        metrics["completions/truncated_ratio"] = jnp.mean(truncated.astype(jnp.float32))
    return metrics


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    cfg: Any,
    ref_logp: jax.Array | None = None,
    *,
    truncated: jax.Array | None = None,
    entropy: jax.Array | None = None,
    completion_width: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped GRPO surrogate (+ k3 KL) over completion tokens, and its logs.

    Args:
      logp: `[N, T]` log-probs of the sampled tokens under the policy being trained.
      old_logp: `[N, T]` log-probs under the policy that sampled them (constants). `None` means
        `num_iterations = 1`, where they equal `logp` without its gradient.
      advantages: `[N, T]` per-token advantages, or `[N]` for one advantage per response.
      mask: `[N, T]` 1 on completion tokens, 0 on prompt and padding.
      cfg: GRPO options (`GrpoSettings`, or a section like `default_grpo_config`).
      ref_logp: `[N, T]` reference-model log-probs; required when `cfg.beta > 0`, and when given
        with `beta = 0` the KL is still logged.
      truncated: `[N]` bool, rows that hit the length limit without EOS.
      entropy: `[N, T]` per-token policy entropies, logged only.
      completion_width: the most completion tokens a row holds (`loss_weights`); default `T`.

    Returns:
      The scalar loss to minimise and a dict of scalar logs.
    """
    weights = loss_weights(mask, cfg, truncated, completion_width=completion_width)
    loss, metrics = policy_loss_terms(logp, old_logp, advantages, weights, cfg, ref_logp, entropy=entropy)
    return loss, {**metrics, **completion_metrics(mask, truncated)}
