"""Hugging Face checkpoints (config.json + safetensors) in and out of the decoder's params, without torch.

The decoder's param names are Hugging Face's (`layers/self_attn/q_proj/kernel` is
`model.layers.{i}.self_attn.q_proj.weight`), so the mapping is derived by walking the param tree; only
the layouts differ: a Linear weight is [out, in] where our kernel is [in..., out...] with heads split
out, a bias is flat where ours is [heads, head_dim], and the layers are stacked on a leading axis.
`config.json` is parsed with `transformers.AutoConfig`, so defaults and legacy keys (`rope_theta` at the
top level, a missing `head_dim`) resolve exactly as they do in transformers.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from graphgrpo_jax.models import decoder, lora

PathLike = str | pathlib.Path

HF_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
_HF_CLASS = {arch: cls for cls, arch in HF_ARCHITECTURES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Non-persistent buffers some older exporters wrote; they are recomputed, never weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def config_from_hf(folder: PathLike) -> ml_collections.ConfigDict:
    """The model config (fields of `configs/common.py`) of a Hugging Face checkpoint folder."""
    folder = pathlib.Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the checkpoint folder")
    architectures = json.loads(path.read_text()).get("architectures") or []
    known = [name for name in architectures if name in HF_ARCHITECTURES]
    if not known:
        raise ValueError(f"{path}: unsupported architectures {architectures}; "
                         f"supported: {sorted(HF_ARCHITECTURES)}")
    arch = HF_ARCHITECTURES[known[0]]
    hf = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)

    rope = dict(hf.rope_parameters or {})
    unsupported = {
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "hidden_act": (getattr(hf, "hidden_act", "silu"), "silu"),
        "use_sliding_window": (bool(getattr(hf, "use_sliding_window", False)), False),
        "mlp_bias": (bool(getattr(hf, "mlp_bias", False)), False),
    }
    for field, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"{path}: {field}={value!r} is not supported (only {supported!r})")

    dtype = str(getattr(hf, "dtype", None) or "float32").removeprefix("torch.")
    return ml_collections.ConfigDict(dict(
        preset=f"hf:{folder.name}",
        arch=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        mlp_dim=hf.intermediate_size,
        rope_theta=float(rope.get("rope_theta", 10_000.0)),
        rms_norm_eps=float(hf.rms_norm_eps),
        qkv_bias=True if arch == "qwen2" else bool(getattr(hf, "attention_bias", False)),
        qk_norm=arch == "qwen3",
        tie_embeddings=bool(hf.tie_word_embeddings),
        dtype=dtype,
        param_dtype=dtype,
        max_seq_len=hf.max_position_embeddings,
        scan_unroll=1,  # the scanned layer stack (see `DecoderConfig.unrolled`)
    ))


# The fields of a model config that a checkpoint's config.json fixes; compute choices (dtype, param_dtype,
# remat, scan_unroll) stay the experiment's.
ARCHITECTURE_FIELDS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                       "mlp_dim", "rope_theta", "rms_norm_eps", "qkv_bias", "qk_norm", "tie_embeddings",
                       "max_seq_len")


def resolve_checkpoint_model(model: ml_collections.ConfigDict,
                             explicit: Collection[str] = ()) -> ml_collections.ConfigDict:
    """`model` with its architecture taken from `model.hf_checkpoint`'s config.json, when it names one.

    Every field of `ARCHITECTURE_FIELDS` comes from the checkpoint except those in `explicit` (the fields the
    user set on the command line), which win; a preset's shapes never silently override the checkpoint's.
    `preset` records the checkpoint. Without `hf_checkpoint` the config is returned unchanged.
    """
    folder = model.get("hf_checkpoint")
    if not folder:
        return model
    if not pathlib.Path(folder).is_dir():
        raise FileNotFoundError(f"config.model.hf_checkpoint = {folder!r}: no such folder")
    from_checkpoint = config_from_hf(folder)
    resolved = ml_collections.ConfigDict(model.to_dict())
    with resolved.unlocked():
        for field in ARCHITECTURE_FIELDS:
            if field not in explicit:
                resolved[field] = from_checkpoint[field]
        resolved.preset = from_checkpoint.preset
    return resolved


class _Tensor(NamedTuple):
    """One Hugging Face tensor and where it lives in our params."""

    param_path: tuple[str, ...]
    layer: int | None  # index on the stacked layer axis, None for a top-level param
    hf_shape: tuple[int, ...]
    to_params: Callable[[np.ndarray], np.ndarray]  # Hugging Face layout -> ours (one layer's slice)
    to_hf: Callable[[np.ndarray], np.ndarray]  # the inverse


def _as_config(config) -> decoder.DecoderConfig:
    """The plain model of a model config: a checkpoint holds no LoRA adapters (the run adds or merges them)."""
    config = config if isinstance(config, decoder.DecoderConfig) else decoder.DecoderConfig.from_config(config)
    return config.without_lora()


@functools.lru_cache(maxsize=16)
def _tensor_table(config: decoder.DecoderConfig) -> dict[str, _Tensor]:
    """Every tensor name the checkpoint of `config` holds, mapped to our param it fills."""
    abstract = jax.eval_shape(functools.partial(decoder.init_params, config), jax.random.key(0))
    table = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = tuple(key.key for key in key_path)
        shape = leaf.shape[1:] if path[0] == "layers" else leaf.shape
        to_params, to_hf, hf_shape = _layout(path, shape)
        if path[0] == "layers":
            suffix = ".".join(path[1:-1]) + (".bias" if path[-1] == "bias" else ".weight")
            for i in range(config.num_layers):
                table[f"model.layers.{i}.{suffix}"] = _Tensor(path, i, hf_shape, to_params, to_hf)
        else:
            name = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
                    "lm_head": "lm_head.weight"}[path[0]]
            table[name] = _Tensor(path, None, hf_shape, to_params, to_hf)
    return table


def _layout(path: tuple[str, ...], shape: tuple[int, ...]):
    """(to_params, to_hf, hf_shape) for one param of per-layer shape `shape`."""
    if path[-1] == "kernel" or path == ("lm_head",):
        # torch Linear stores [out, in]; our kernels are [in..., out...] (o_proj has two input axes).
        num_in = 2 if "o_proj" in path else 1
        fan_in, fan_out = math.prod(shape[:num_in]), math.prod(shape[num_in:])
        return (lambda w: w.T.reshape(shape), lambda k: k.reshape(fan_in, fan_out).T, (fan_out, fan_in))
    if path[-1] == "bias":
        return (lambda w: w.reshape(shape), lambda b: b.reshape(-1), (math.prod(shape),))
    return (lambda w: w, lambda w: w, tuple(shape))  # embeddings and norm scales share the layout


def checkpoint_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it, for a single-file or a sharded checkpoint."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="np") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}")


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # [vocab, hidden] in the Hugging Face layout


def grow_rows(weight: np.ndarray, rows: int) -> np.ndarray:
    """`weight` [V, H] with rows appended up to `rows`, each the mean of the existing ones: a new token starts
    where an average token is, so its logit and embedding are unremarkable (transformers' `mean_resizing`)."""
    mean = weight.astype(np.float64).mean(axis=0, keepdims=True).astype(weight.dtype)
    return np.concatenate([weight, np.repeat(mean, rows - weight.shape[0], axis=0)])


def load_params(folder: PathLike, config, *, grow_vocab: bool = False) -> decoder.Params:
    """Params (host numpy arrays in `config.param_dtype`) from a checkpoint folder.

    `config` is the model config (e.g. from `config_from_hf`) or a `DecoderConfig`. Every tensor is
    checked before any is converted: a missing one, an unexpected one or a wrong shape is a ValueError
    naming the file and the tensor. With `grow_vocab`, an embedding (and untied head) with fewer rows than
    `config.vocab_size` is grown by `grow_rows` (tokens added to the checkpoint's tokenizer, such as the CoT
    tags). Place the result with `jax.device_put(params, shardings)`.
    """
    folder = pathlib.Path(folder)
    config = _as_config(config)
    table = _tensor_table(config)
    files = {name: file for name, file in checkpoint_files(folder).items()
             if not name.endswith(_IGNORED_SUFFIXES)}
    source = folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else SINGLE_FILE)
    missing = sorted(set(table) - set(files))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"for a {config.arch} model (tie_embeddings={config.tie_embeddings}, "
                         f"qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm})")
    extra = sorted(set(files) - set(table))
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                         f"for a {config.arch} model (tie_embeddings={config.tie_embeddings}, "
                         f"qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm}, num_layers={config.num_layers})")

    dtype = np.dtype(config.weight_dtype)
    by_file: dict[pathlib.Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    slices: dict[tuple[str, ...], dict[int | None, np.ndarray]] = {}
    for file, names in by_file.items():
        with safe_open(file, framework="np") as f:
            for name in names:
                spec = table[name]
                shape = tuple(f.get_slice(name).get_shape())
                grows = (grow_vocab and name in VOCAB_TENSORS and shape[1:] == spec.hf_shape[1:]
                         and shape[0] < spec.hf_shape[0])
                if shape != spec.hf_shape and not grows:
                    raise ValueError(f"{file}: tensor {name} has shape {shape}, expected {spec.hf_shape} "
                                     f"from the model config")
                tensor = grow_rows(f.get_tensor(name), spec.hf_shape[0]) if grows else f.get_tensor(name)
                slices.setdefault(spec.param_path, {})[spec.layer] = spec.to_params(tensor).astype(dtype)

    params: dict = {}
    for path, by_layer in slices.items():
        value = by_layer[None] if None in by_layer else np.stack([by_layer[i] for i in range(config.num_layers)])
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return params


def _hf_tensors(params: decoder.Params, config: decoder.DecoderConfig) -> Iterator[tuple[str, np.ndarray]]:
    for name, spec in _tensor_table(config).items():
        value = params
        for key in spec.param_path:
            value = value[key]
        value = np.asarray(value if spec.layer is None else value[spec.layer])
        yield name, np.ascontiguousarray(spec.to_hf(value))


def hf_config_dict(config) -> dict:
    """config.json contents for `config`; a ValueError when no supported class can express it."""
    config = _as_config(config)
    expected = {"qwen2": dict(qkv_bias=True, qk_norm=False), "qwen3": dict(qk_norm=True),
                "llama": dict(qk_norm=False)}[config.arch]
    for field, value in expected.items():
        if getattr(config, field) != value:
            raise ValueError(f"model.{field}={getattr(config, field)} cannot be exported as "
                             f"{_HF_CLASS[config.arch]}, which has {field}={value}")
    hf = dict(
        architectures=[_HF_CLASS[config.arch]],
        model_type=config.arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.rms_norm_eps,
        # Both spellings: transformers 5 reads `rope_parameters`, older servers read `rope_theta`.
        rope_theta=config.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        dtype=config.param_dtype,
        torch_dtype=config.param_dtype,
    )
    if config.arch == "qwen2":
        hf["use_sliding_window"] = False
    else:
        hf["attention_bias"] = config.qkv_bias
    return hf


def save_hf(params: decoder.Params, config, folder: PathLike,
            extra_config: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes config.json + model.safetensors that transformers (and servers built on it) load as is.

    Tensors keep the dtype of `params`. `extra_config` adds fields to config.json, e.g.
    ``{"eos_token_id": ...}``; save the tokenizer beside it with `tokenizer.save_pretrained(folder)`.
    """
    config = _as_config(config)
    if lora.has_adapters(params):
        raise ValueError("save_hf: the params hold LoRA adapters, which a Hugging Face checkpoint has no place "
                         "for; merge them first (lora.merged(params, config.lora_scale))")
    folder = pathlib.Path(folder)
    hf = {**hf_config_dict(config), **(extra_config or {})}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(_hf_tensors(params, config)), folder / SINGLE_FILE, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return folder
