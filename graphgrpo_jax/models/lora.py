"""Low-rank adapters (LoRA, Hu et al. 2021) as functions of a params pytree.

With `model.lora_rank` r > 0 every projection named in `model.lora_targets` (see `models/decoder.py`) holds,
beside its frozen `kernel` W, two params: `lora_a` [*fan_in, r] and `lora_b` [r, *fan_out] (after the layer
stack's leading axis), and computes ``x W + (alpha / r) (x A) B``. B starts at zero, so an adapted model
starts as its base.

The functions here only move leaves around; the model defines the adapters and the trainers decide what
to do with them:
- training differentiates and updates `split(params)[0]` only, so frozen weights get no gradient and no
  optimizer state, and joins it back to the rest (`join`);
- the sampler and the export read `merged(params, scale)`: W + (alpha / r) A B once, no adapters, the plain
  model (decoding then costs what it costs without LoRA);
- without adapters in the tree every function is the identity on the whole tree (`split` gives
  `(params, {})`), so a full fine-tune runs the same code.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

ADAPTERS = ("lora_a", "lora_b")

PyTree = Any


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(tree) if tree else {}


def _is_adapter(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTERS


def has_adapters(params: PyTree) -> bool:
    return any(_is_adapter(path) for path in _flat(params))


def split(params: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable, frozen): the adapters and every other leaf, or, without adapters, `(params, {})`.

    Works on any tree laid out like the params (arrays, shapes, shardings, logical axes)."""
    flat = _flat(params)
    if not any(_is_adapter(path) for path in flat):
        return params, {}
    adapters = {path: leaf for path, leaf in flat.items() if _is_adapter(path)}
    rest = {path: leaf for path, leaf in flat.items() if not _is_adapter(path)}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(rest)


def join(frozen: PyTree, trainable: PyTree) -> PyTree:
    """The inverse of `split`: one params tree from its frozen and trainable parts."""
    if not frozen:
        return trainable
    return traverse_util.unflatten_dict({**_flat(frozen), **_flat(trainable)})


def without_adapters(params: PyTree) -> PyTree:
    """The base weights alone (same arrays, no copy): the model before its adapters."""
    return split(params)[1] if has_adapters(params) else params


def merged(params: PyTree, scale: float) -> PyTree:
    """The plain model's params: each adapted kernel W replaced by W + scale · A B (in fp32, cast back to W's
    dtype), the adapters dropped. Leading axes shared by W, A and B (the layer stack's) are kept."""
    flat = _flat(params)
    if not any(_is_adapter(path) for path in flat):
        return params
    out = {}
    for path, leaf in flat.items():
        if _is_adapter(path):
            continue
        parent = path[:-1]
        if path[-1] == "kernel" and parent + ("lora_a",) in flat:
            leaf = _merge_kernel(leaf, flat[parent + ("lora_a",)], flat[parent + ("lora_b",)], scale)
        out[path] = leaf
    return traverse_util.unflatten_dict(out)


def _merge_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """kernel [*lead, *in, *out] + scale · a [*lead, *in, r] b [*lead, r, *out]."""
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    num_in = a.ndim - 1 - lead
    lead_shape, rank = kernel.shape[:lead], a.shape[-1]
    fan_in = math.prod(kernel.shape[lead:lead + num_in])
    a2 = a.reshape(*lead_shape, fan_in, rank).astype(jnp.float32)
    b2 = b.reshape(*lead_shape, rank, -1).astype(jnp.float32)
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def count(params: PyTree) -> tuple[int, int]:
    """(trainable, total) numbers of parameters."""
    trainable, _ = split(params)
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
    return size(trainable), size(params)
