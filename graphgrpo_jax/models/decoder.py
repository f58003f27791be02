"""A causal decoder of the Qwen2 / Qwen2.5 / Qwen3 / Llama family in Flax linen, with a KV cache.

One module covers the family because its members differ only in switches: q/k/v biases (Qwen2),
per-head q/k RMSNorm (Qwen3), tied or untied LM head. Weights follow Hugging Face's math exactly
(rotate-half RoPE, grouped-query attention with kv head ``h // (H / K)``, SwiGLU), so `models.hf` imports
checkpoints by reshaping tensors, never by re-deriving them.

Everything other modules call is a pure function of explicit pytrees (params, cache, tokens); the linen
module is an implementation detail. The KV cache is a plain pytree passed in and returned, so a jitted
sampler can donate it.

Params layout (``init_params``; leading ``L = num_layers`` axis on every layer weight, because the layers
are one ``nn.scan``; logical axis names in brackets, see ``param_logical_axes``)::

    embed_tokens                        [V, D]        (vocab, embed)
    layers/input_layernorm/scale        [L, D]        (layers, embed)
    layers/self_attn/q_proj/kernel      [L, D, H, Dh] (layers, embed, heads, head_dim)
    layers/self_attn/q_proj/bias        [L, H, Dh]    (layers, heads, head_dim)       if qkv_bias
    layers/self_attn/{k,v}_proj/kernel  [L, D, K, Dh] (layers, embed, kv_heads, head_dim)
    layers/self_attn/{k,v}_proj/bias    [L, K, Dh]    (layers, kv_heads, head_dim)    if qkv_bias
    layers/self_attn/{q,k}_norm/scale   [L, Dh]       (layers, head_dim)              if qk_norm
    layers/self_attn/o_proj/kernel      [L, H, Dh, D] (layers, heads, head_dim, embed)
    layers/post_attention_layernorm/scale [L, D]      (layers, embed)
    layers/mlp/{gate,up}_proj/kernel    [L, D, F]     (layers, embed, mlp)
    layers/mlp/down_proj/kernel         [L, F, D]     (layers, mlp, embed)
    norm/scale                          [D]           (embed,)
    lm_head                             [D, V]        (embed, vocab)                  if not tied

With LoRA (`lora_rank` r > 0) each projection of `lora_targets` also holds its adapters (`models/lora.py`),
e.g. ``layers/self_attn/q_proj/lora_a [L, D, r] (layers, embed, lora_rank)`` and
``layers/self_attn/q_proj/lora_b [L, r, H, Dh] (layers, lora_rank, heads, head_dim)``.

Decoding an unrolled model (`DecoderConfig.unrolled`, e.g. the small CPU preset) splits the stack once into
``layers_0 ... layers_{L-1}`` (`decoding_params`) and keeps one KV cache per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from graphgrpo_jax.models import lora

Params = Any  # a nested dict of arrays, laid out as in the module docstring

ARCHS = ("qwen2", "qwen3", "llama")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_INIT_STDDEV = 0.02  # Hugging Face's `initializer_range` for this family


class DtypeFields:
    """The `dtype` (activations) and `param_dtype` (weights) fields of a model config as jnp dtypes."""

    dtype: str
    param_dtype: str

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class DecoderConfig(DtypeFields):
    """Static model shape and numerics; frozen and hashable so it can be a static jit argument."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = True
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    max_seq_len: int = 2048
    remat: bool = False  # recompute each layer in the backward pass: memory for compute
    scan_unroll: int = 1  # layers per iteration of the scanned stack; num_layers unrolls it (`unrolled`)
    lora_rank: int = 0  # > 0: low-rank adapters on `lora_targets`, the only weights training updates
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = 0.0  # on the adapters' input, when the caller passes a dropout rng

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # hashable, whatever came in
        if self.lora_rank < 0:
            raise ValueError(f"model.lora_rank={self.lora_rank} must be >= 0 (0: no adapters)")
        unknown = [name for name in self.lora_targets if name not in LORA_TARGETS]
        if unknown or (self.lora_rank and not self.lora_targets):
            raise ValueError(f"model.lora_targets={self.lora_targets}: name one or more of {LORA_TARGETS}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout={self.lora_dropout} must lie in [0, 1)")
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is not one of {ARCHS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of "
                             f"model.num_kv_heads={self.num_kv_heads}")
        if self.scan_unroll < 1:
            raise ValueError(f"model.scan_unroll={self.scan_unroll} must be >= 1 (num_layers unrolls the stack)")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{field}={getattr(self, field)!r} is not float32, bfloat16 or float16")

    @property
    def unrolled(self) -> bool:
        """Whether the layers run unrolled: training unrolls the scan, and decoding keeps per-layer params
        and caches (`decoding_params`, `init_cache`). On CPU this saves copying every layer's weights and
        K/V out of the stacks at every decode step; big models on accelerators keep the scan (compile time)."""
        return self.scan_unroll >= self.num_layers

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def without_lora(self) -> "DecoderConfig":
        """The same model without adapters: what `lora.merged` or `lora.without_adapters` params run on."""
        return dataclasses.replace(self, lora_rank=0) if self.lora_rank else self

    @classmethod
    def from_config(cls, cfg) -> "DecoderConfig":
        """Builds from an ml_collections model config (or any mapping); extra keys such as `preset` are ignored."""
        values = {}
        for field in dataclasses.fields(cls):
            if field.name in cfg:
                values[field.name] = cfg[field.name]
            elif field.default is dataclasses.MISSING:
                raise ValueError(f"model config is missing the field {field.name!r}")
        return cls(**values)


class KVCache(NamedTuple):
    """Keys and values of every layer for ``max_len`` slots, filled left to right.

    Stacked as [L, B, K, S, Dh] arrays, or, for an unrolled model (`DecoderConfig.unrolled`), as tuples of
    L arrays [B, K, S, Dh] that each layer updates in place.

    All rows write the same slot at each step (prompts are left-padded), so ``end`` is one scalar;
    ``valid`` marks which slots hold real tokens (False for prompt padding), and a row's next rotary
    position is its count of valid slots.
    """

    keys: jax.Array | tuple[jax.Array, ...]  # [L, B, K, S, Dh]: heads-major, see `grouped_query_attention`
    values: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array  # [B, S] bool
    end: jax.Array  # [] int32: the next slot to write


def matmul_2d(inputs: jax.Array, kernel: jax.Array, dimension_numbers, precision=None,
              preferred_element_type=None) -> jax.Array:
    """`lax.dot_general` for `nn.DenseGeneral` (trailing input axes against leading kernel axes), as one
    2-D [tokens, fan_in] x [fan_in, fan_out] matmul.

    Why: differentiating the batched form makes XLA:CPU transpose the [B, T, out] output gradient into
    a copy as large as itself before the weight-gradient matmul; the 2-D form needs none, which halves
    the time of that gradient. Same params and results as `lax.dot_general`.
    """
    (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
    num_in = len(lhs_contract)
    if lhs_batch or tuple(lhs_contract) != tuple(range(inputs.ndim - num_in, inputs.ndim)) \
            or tuple(rhs_contract) != tuple(range(num_in)):
        raise ValueError(f"matmul_2d contracts trailing input axes with leading kernel axes, got {dimension_numbers}")
    fan_in = math.prod(kernel.shape[:num_in])
    out = jnp.dot(inputs.reshape(-1, fan_in), kernel.reshape(fan_in, -1), precision=precision,
                  preferred_element_type=preferred_element_type)
    return out.reshape(*inputs.shape[:inputs.ndim - num_in], *kernel.shape[num_in:])


def _dense_init(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), names)


def _zeros_init(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the scale, as Hugging Face does."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, Dh] for Hugging Face's rotate-half RoPE (frequencies repeated, not interleaved)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, N, Dh] by its positions' angles (cos, sin [B, T, Dh]), in fp32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention: q [B, T, H, Dh], k/v [B, K, S, Dh], allowed [B, T, S] -> [B, T, H, Dh].

    Query head h reads kv head h // (H / K), as Hugging Face's `repeat_kv`. Scores and softmax are fp32.
    Keys and values are heads-major, the layout of the KV cache, so that each dot's batch axes (B, K)
    lead and a decode step reads the cache without a transposed copy. A query with no allowed key (a
    padding position) gets a uniform mix instead of NaN; its output is never used.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # probs [B, K, G, T, S] x v [B, K, S, Dh] as a plain batched matmul (probs on the left), then to [B, T, ...].
    out = jax.lax.dot_general(probs.reshape(batch, num_kv_heads, -1, probs.shape[-1]), v,
                              (((3,), (2,)), ((0, 1), (0, 1))))
    out = out.reshape(batch, num_kv_heads, num_heads // num_kv_heads, length, head_dim)
    return jnp.moveaxis(out, 3, 1).reshape(batch, length, num_heads, head_dim)


class Projection(nn.DenseGeneral):
    """`nn.DenseGeneral` over the trailing `in_names` axes (through `matmul_2d`), plus, when the config adapts
    this projection (`lora_targets`), the LoRA term (alpha / r) · (x A) B of `models/lora.py`.

    The adapters' logical axes are the kernel's input axes + `lora_rank`, and `lora_rank` + its output axes.
    Dropout on the adapters' input runs only when the caller passes a "dropout" rng.
    """

    config: DecoderConfig | None = None
    in_names: tuple[str, ...] = ("embed",)
    out_names: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        out = super().__call__(inputs)
        cfg = self.config
        if not cfg.lora_rank or self.name not in cfg.lora_targets:
            return out
        num_in = len(self.in_names)
        in_shape, out_shape = inputs.shape[inputs.ndim - num_in:], out.shape[inputs.ndim - num_in:]
        a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(num_in)),
                                                  out_axis=-1)  # PEFT's kaiming-uniform(a=√5): ±1/√fan_in
        a = self.param("lora_a", nn.with_logical_partitioning(a_init, (*self.in_names, "lora_rank")),
                       (*in_shape, cfg.lora_rank), self.param_dtype)
        b = self.param("lora_b", _zeros_init(("lora_rank", *self.out_names)), (cfg.lora_rank, *out_shape),
                       self.param_dtype)
        x = inputs
        if cfg.lora_dropout and self.has_rng("dropout"):
            x = nn.Dropout(cfg.lora_dropout, deterministic=False)(x)
        contract = lambda n, ndim: ((tuple(range(ndim - n, ndim)), tuple(range(n))), ((), ()))
        low = matmul_2d(x.astype(self.dtype), a.astype(self.dtype), contract(num_in, x.ndim))
        delta = matmul_2d(low, b.astype(self.dtype), contract(1, low.ndim))
        return out + (cfg.lora_scale * delta).astype(out.dtype)


class Attention(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, cos, sin, allowed, cache_kv, layer, write_slot):
        cfg = self.config
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, dot_general=matmul_2d, config=cfg)

        def projection(name, num, heads_axis):
            return Projection((num, cfg.head_dim), use_bias=cfg.qkv_bias, name=name,
                              kernel_init=_dense_init(("embed", heads_axis, "head_dim")),
                              bias_init=_zeros_init((heads_axis, "head_dim")), out_names=(heads_axis, "head_dim"),
                              **dense)(x)

        q = projection("q_proj", cfg.num_heads, "heads")
        k = projection("k_proj", cfg.num_kv_heads, "kv_heads")
        v = projection("v_proj", cfg.num_kv_heads, "kv_heads")
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, axis_name="head_dim", dtype=cfg.compute_dtype,
                        param_dtype=cfg.weight_dtype)
            q = RMSNorm(name="q_norm", **norm)(q)
            k = RMSNorm(name="k_norm", **norm)(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = (jnp.swapaxes(x, 1, 2) for x in (k, v))  # [B, K, T, Dh], see `grouped_query_attention`

        if cache_kv is not None and layer is None:  # this layer's own cache [B, K, S, Dh]
            cache_kv = tuple(jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype), (0, 0, write_slot, 0))
                             for cached, new in zip(cache_kv, (k, v)))
            k, v = cache_kv
        elif cache_kv is not None:
            # Write this layer's new keys/values into the whole stacked cache (in place: it is the scan's
            # carry), then attend over this layer's slice of it.
            where = (layer, 0, 0, write_slot, 0)
            cache_kv = tuple(jax.lax.dynamic_update_slice(stack, new[None].astype(stack.dtype), where)
                             for stack, new in zip(cache_kv, (k, v)))
            k, v = (jax.lax.dynamic_index_in_dim(stack, layer, keepdims=False) for stack in cache_kv)

        out = grouped_query_attention(q, k, v, allowed)
        out = Projection(cfg.hidden_size, axis=(-2, -1), use_bias=False, name="o_proj",
                         kernel_init=_dense_init(("heads", "head_dim", "embed")), in_names=("heads", "head_dim"),
                         **dense)(out)
        return out, cache_kv


class MLP(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = dict(use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, dot_general=matmul_2d,
                     config=cfg)
        into_mlp = dict(kernel_init=_dense_init(("embed", "mlp")), out_names=("mlp",), **dense)
        gate = Projection(cfg.mlp_dim, name="gate_proj", **into_mlp)(x)
        up = Projection(cfg.mlp_dim, name="up_proj", **into_mlp)(x)
        return Projection(cfg.hidden_size, name="down_proj", kernel_init=_dense_init(("mlp", "embed")),
                          in_names=("mlp",), **dense)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block; the signature (carry, scanned, *broadcast) is what `nn.scan` wants.

    The carry is the hidden states and, when decoding, the whole stacked KV cache [L, ...]: a carry is
    updated in place by the scan's loop, whereas a scanned-over cache would be sliced out and re-stacked
    (a full copy of the cache) at every decode step.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, carry, layer, cos, sin, allowed, write_slot):
        x, cache_kv = carry
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        attn_out, cache_kv = Attention(cfg, name="self_attn")(
            RMSNorm(name="input_layernorm", **norm)(x), cos, sin, allowed, cache_kv, layer, write_slot)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(RMSNorm(name="post_attention_layernorm", **norm)(x))
        return (x, cache_kv), None


class Decoder(nn.Module):
    """Embeds tokens, runs the scanned layers, and (separately, see `logits`) projects to the vocabulary.

    The head is a separate method so callers can take logits at a few positions only (the sampler needs
    the last one; [B, T, V] logits of a 150k vocabulary do not fit anywhere).
    """

    config: DecoderConfig
    per_layer: bool = False  # params as `decoding_params` lays them out, one `layers_i` per layer

    def setup(self):
        cfg = self.config
        self.embed_tokens = self.param("embed_tokens", _dense_init(("vocab", "embed")),
                                       (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype)
        if self.per_layer:
            self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_layers)]  # named layers_0, layers_1, ...
        else:
            layer = nn.remat(DecoderLayer, prevent_cse=False) if cfg.remat else DecoderLayer
            self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                                  in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                                  length=cfg.num_layers, unroll=cfg.scan_unroll,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="norm")
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", _dense_init(("embed", "vocab")),
                                      (cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, D] of `tokens`, appended to `cache` when one is given."""
        cfg = self.config
        attention_mask = attention_mask.astype(bool)
        length = tokens.shape[1]
        new_positions = jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1
        if cache is None:
            positions = jnp.maximum(new_positions, 0)
            key_valid = attention_mask
            query_slots, key_slots = jnp.arange(length), jnp.arange(length)
            cache_kv, write_slot = None, None
        else:
            positions = jnp.maximum(jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None] + new_positions, 0)
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, cache.end, axis=1)
            query_slots, key_slots = cache.end + jnp.arange(length), jnp.arange(cache.valid.shape[1])
            cache_kv, write_slot = (cache.keys, cache.values), cache.end
        allowed = key_valid[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)

        x = jnp.take(self.embed_tokens, tokens, axis=0).astype(cfg.compute_dtype)
        if self.per_layer:
            per_layer_kv = []
            for i, layer in enumerate(self.layers):
                layer_kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
                (x, layer_kv), _ = layer((x, layer_kv), None, cos, sin, allowed, write_slot)
                per_layer_kv.append(layer_kv)
            cache_kv = None if cache_kv is None else tuple(map(tuple, zip(*per_layer_kv)))
        else:
            (x, cache_kv), _ = self.layers((x, cache_kv), jnp.arange(cfg.num_layers), cos, sin, allowed,
                                           write_slot)
        hidden = self.norm(x)
        if cache is not None:
            cache = KVCache(*cache_kv, valid=key_valid, end=cache.end + length)
        return hidden, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [..., V] of final hidden states [..., D] (matmul in the compute dtype, fp32 accumulate)."""
        cfg = self.config
        if cfg.tie_embeddings:
            head, spec = self.embed_tokens, "nd,vd->nv"
        else:
            head, spec = self.lm_head, "nd,dv->nv"
        flat = hidden.reshape(-1, cfg.hidden_size).astype(cfg.compute_dtype)  # 2-D: see `matmul_2d`
        logits = jnp.einsum(spec, flat, head.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
        return logits.reshape(*hidden.shape[:-1], cfg.vocab_size)


def _all_logits(module: Decoder, tokens, attention_mask):
    hidden, _ = module(tokens, attention_mask)
    return module.logits(hidden)


def _boxed_init(config: DecoderConfig, rng: jax.Array):
    dummy = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config).init(rng, dummy, jnp.ones((1, 1), bool), method=_all_logits)["params"]


def init_params(config: DecoderConfig, rng: jax.Array) -> Params:
    """Fresh params (plain arrays, laid out as in the module docstring); traceable, so it can run under jit."""
    return nn.meta.unbox(_boxed_init(config, rng))


def with_adapters(params: Params, config: DecoderConfig, rng: jax.Array) -> Params:
    """`params` of the base model (a pretrained checkpoint) with fresh LoRA adapters when `config` has them
    (B = 0: the same function); `params` as they are when it has none or they already hold adapters."""
    if not config.lora_rank or lora.has_adapters(params):
        return params
    # Under jit XLA drops the base weights' initialisation, whose results are not returned.
    adapters = jax.jit(lambda key: lora.split(init_params(config, key))[0])(rng)
    return lora.join(params, adapters)


def param_logical_axes(config: DecoderConfig) -> Params:
    """A PartitionSpec of logical axis names per param (same tree as `init_params`), for sharding rules."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0)))


def forward(params: Params, config: DecoderConfig, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """fp32 logits [B, T, V]; positions come from the mask, so left padding does not change real rows."""
    return Decoder(config).apply({"params": params}, tokens, attention_mask, method=_all_logits)


def token_log_probs(params: Params, config: DecoderConfig, tokens: jax.Array,
                    attention_mask: jax.Array, *, targets_from: int = 1, group_size: int = 1,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, <t]) as [B, T] fp32.

    Zero where there is no context to condition on: position 0, padding, and a row's first real token
    (under left padding the token before it is padding); and before `targets_from` (see
    `token_log_probs_and_entropy`, also for `group_size` and `dropout_rng`).
    """
    return token_log_probs_and_entropy(params, config, tokens, attention_mask, targets_from=targets_from,
                                       group_size=group_size, dropout_rng=dropout_rng)[0]


# Most fp32 logits `token_log_probs_and_entropy` holds at once (256 MB); larger [B, T, V] blocks are scored
# in chunks of positions, each chunk's logits recomputed in the backward pass rather than kept.
LOGITS_BUDGET = 2 ** 26


def token_log_probs_and_entropy(params: Params, config: DecoderConfig, tokens: jax.Array,
                                attention_mask: jax.Array, *, logits_budget: int = LOGITS_BUDGET,
                                targets_from: int = 1, group_size: int = 1,
                                dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`token_log_probs` and the entropy of the distribution each token was drawn from, both [B, T].

    One forward pass for both (the RL loss logs the policy's entropy); under jit an unused entropy costs
    nothing. Only the tokens at positions `targets_from` and later are scored; the others get 0 and the
    LM head never sees their positions (TRL's `logits_to_keep`: the RL loss reads completions only, so
    the prompt's [B, P, V] logits, their softmax and its gradient would be wasted work).

    `group_size` > 1 says that rows come in consecutive groups of that size whose first `targets_from`
    tokens (the prompt block) are identical, as GRPO's rollouts do: each group's prompt then runs once,
    and its keys and values are shared by the group's completions (`_shared_prompt_hidden`). The result
    is the same up to float rounding; the caller guarantees the grouping, which is not checked here.

    When the [B, T, V] logits exceed `logits_budget` elements (a 150k vocabulary at 32 × 512 is 10 GB per
    copy), positions are scored `logits_budget // (B · V)` at a time under `jax.checkpoint`, so memory
    stays at one chunk's logits in the forward and the backward pass alike.

    `dropout_rng` turns on the LoRA adapters' dropout (`config.lora_dropout`); without it the pass is
    deterministic.
    """
    if not 1 <= targets_from < tokens.shape[1]:
        raise ValueError(f"targets_from = {targets_from}: must be in [1, {tokens.shape[1]}) for {tokens.shape[1]} "
                         f"tokens per row")
    if group_size < 1 or tokens.shape[0] % group_size:
        raise ValueError(f"group_size = {group_size}: must be >= 1 and divide the {tokens.shape[0]} rows")
    module = Decoder(config)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    if group_size > 1:
        hidden = module.apply({"params": params}, tokens, attention_mask, targets_from, group_size,
                              method=_shared_prompt_hidden, rngs=rngs)
    else:
        hidden = module.apply({"params": params}, tokens, attention_mask, rngs=rngs)[0][:, targets_from - 1:-1]
    targets = tokens[:, targets_from:]

    def score(hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = module.apply({"params": params}, hidden, method="logits")
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return picked - log_z, log_z - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)

    batch, positions = targets.shape
    chunk = max(1, logits_budget // (batch * config.vocab_size))  # positions per chunk, whole rows kept
    if positions <= chunk:
        logp, entropy = score(hidden, targets)
    else:  # chunks along the sequence: the batch axis (and its sharding) stays as it is
        chunks = -(-positions // chunk)
        pad = chunks * chunk - positions
        split = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(
            batch, chunks, chunk, *x.shape[2:]), 1, 0)
        scores = jax.lax.map(lambda block: jax.checkpoint(score)(*block), (split(hidden), split(targets)))
        logp, entropy = (jnp.moveaxis(x, 0, 1).reshape(batch, -1)[:, :positions] for x in scores)
    mask = attention_mask.astype(bool)
    scored = mask[:, targets_from:] & mask[:, targets_from - 1:-1]
    pad = lambda x: jnp.pad(jnp.where(scored, x, 0.0), ((0, 0), (targets_from, 0)))
    return pad(logp), pad(entropy)


def _shared_prompt_hidden(module: Decoder, tokens: jax.Array, attention_mask: jax.Array, prompt_len: int,
                          group_size: int) -> jax.Array:
    """Final hidden states [N, T - P, D] at positions P - 1 ... T - 2 (those that predict tokens P ... T - 1)
    of rows grouped `group_size` at a time around a shared prompt block [:, :P].

    The prompt of each group runs once into a KV cache, the cache's rows are repeated for the group, and
    the completions run on top of it: prefill, then one extension of T - P tokens, the sampler's own path.
    Gradients reach the prompt through the cached keys and values (summed over the group by the repeat's
    transpose). The cache is the stacked one, the layer scan's carry: the backward pass keeps each layer's
    keys and values, not a copy of the stack per layer.
    """
    rows, length = tokens.shape
    prompts, prompt_mask = tokens[::group_size, :prompt_len], attention_mask[::group_size, :prompt_len]
    cache = init_cache(module.config, rows // group_size, length, per_layer=False)
    prompt_hidden, cache = module(prompts, prompt_mask, cache)
    completion_hidden, _ = module(tokens[:, prompt_len:], attention_mask[:, prompt_len:],
                                  repeat_cache_rows(cache, group_size))
    last_prompt = jnp.repeat(prompt_hidden[:, -1:], group_size, axis=0)
    return jnp.concatenate([last_prompt, completion_hidden[:, :-1]], axis=1)


def init_cache(config: DecoderConfig, batch_size: int, max_len: int, *, per_layer: bool | None = None) -> KVCache:
    """An empty cache with room for `max_len` tokens per row (prompt padding included).

    One array per layer (`per_layer`, by default for an unrolled model: the decode loop's layout) or
    stacked layers (the layer scan's carry)."""
    if max_len > config.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds model.max_seq_len={config.max_seq_len}")
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    if config.unrolled if per_layer is None else per_layer:
        keys, values = (tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers)) for _ in "kv")
    else:
        keys, values = (jnp.zeros((config.num_layers, *shape), config.compute_dtype) for _ in "kv")
    return KVCache(keys=keys, values=values, valid=jnp.zeros((batch_size, max_len), bool),
                   end=jnp.zeros((), jnp.int32))


def repeat_cache_rows(cache: KVCache, repeats: int) -> KVCache:
    """Each row of `cache` repeated `repeats` times in place (row i becomes rows i·r ... i·r + r - 1), for
    either layout: one prefilled prompt feeds a group of samples."""
    batch_axis = 0 if isinstance(cache.keys, tuple) else 1  # per-layer [B, ...] or stacked [L, B, ...]
    repeat = lambda x: jnp.repeat(x, repeats, axis=batch_axis)
    keys, values = (jax.tree_util.tree_map(repeat, x) for x in (cache.keys, cache.values))
    return KVCache(keys=keys, values=values, valid=jnp.repeat(cache.valid, repeats, axis=0), end=cache.end)


def decoding_params(params: Params, config: DecoderConfig) -> Params:
    """The params `extend_cache` reads, made once outside a decode loop: LoRA adapters merged into their
    kernels (`lora.merged`: a decode step then costs what the plain model's does), and, for an unrolled model,
    the layer stack split into `layers_0`, `layers_1`, ... (inside the loop, XLA would copy each slice at
    every step). Idempotent."""
    params = lora.merged(params, config.lora_scale)
    if not config.unrolled or "layers" not in params:
        return params
    split = {f"layers_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
             for i in range(config.num_layers)}
    return {**{k: v for k, v in params.items() if k != "layers"}, **split}


def extend_cache(params: Params, config: DecoderConfig, cache: KVCache, tokens: jax.Array,
                 attention_mask: jax.Array) -> tuple[jax.Array, KVCache]:
    """Feeds tokens [B, T] into the cache; returns fp32 logits [B, V] for the token after the last one.

    Prefill is this call with the left-padded prompt, each decode step is it with T = 1. The caller keeps
    ``cache.end + T`` within the cache length (writes past the end are clamped by XLA, silently). A decode
    loop passes `decoding_params(params, config)`, made once before the loop.
    """
    def last_logits(module: Decoder, tokens, attention_mask, cache):
        hidden, cache = module(tokens, attention_mask, cache)
        return module.logits(hidden[:, -1]), cache

    return Decoder(config.without_lora(), per_layer=config.unrolled).apply(
        {"params": decoding_params(params, config)}, tokens, attention_mask, cache, method=last_logits)
