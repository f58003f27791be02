"""The distilled student as a serving artifact: `jax.export` program + weights + tokenizer, no training code.

A search service should load the relevance model without our Flax modules, configs or checkpoints, and
one artifact should serve any batch size. `export_cross_encoder` traces the model's forward pass with a
symbolic batch dimension and a fixed sequence length, serializes it with `jax.export` (StableHLO, stable
across JAX versions within its compatibility window), and writes into one folder, atomically (a staging
folder renamed into place):

    model.jax        the serialized `jax.export.Exported`: (weights, input_ids, token_type_ids,
                     attention_mask) -> {head: [B, C] softmax probabilities}
    weights.npz      the parameter arrays, in the order the program takes them
    tokenizer/       the Hugging Face tokenizer files (`tokenizer.json` is what the loader reads)
    serving.json     format, heads with their labels, max_length, pad token, platforms, weight dtypes, and
                     free-form `source` metadata (which run and checkpoint it came from)

Weights travel as an argument rather than as constants folded into the program, so the program stays
small and XLA does not constant-fold 22 M parameters at load time.

`ServedCrossEncoder` loads such a folder with only jax, numpy and the `tokenizers` library, encodes
`[CLS] query [SEP] title [SEP]` pairs exactly as `models.encoder.encode_pairs` does (right padding to
max_length, longest-first truncation) and scores them in fixed-size batches (one compile).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from graphgrpo_jax import fileio

FORMAT = "graphgrpo_jax.search.serving/1"
MODEL_FILE = "model.jax"
WEIGHTS_FILE = "weights.npz"
TOKENIZER_DIR = "tokenizer"
META_FILE = "serving.json"

# (params, input_ids [B, T], token_type_ids [B, T], attention_mask [B, T]) -> {head: logits [B, C]}
LogitsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], Mapping[str, jax.Array]]


def export_cross_encoder(directory: str | os.PathLike, logits_fn: LogitsFn, params: Any, tokenizer: Any,
                         heads: Mapping[str, Sequence[str]], max_length: int, *,
                         platforms: Sequence[str] = ("cpu",), source: Mapping[str, Any] | None = None,
                         overwrite: bool = False) -> pathlib.Path:
    """Writes the serving folder of a cross-encoder (module docstring) and returns its path.

    `heads` maps each exported classification head to its labels, in the order of its logits (e.g.
    ``{"y": LABELS}``); heads of `logits_fn` not named are left out. `tokenizer` is a Hugging Face fast
    tokenizer (it must have `save_pretrained`, `pad_token` and `pad_token_id`). `overwrite` replaces a
    folder written here before, never any other directory.
    """
    directory = pathlib.Path(directory)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    if not heads:
        raise ValueError("export needs at least one head")
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
        if not (directory / META_FILE).is_file():
            raise FileExistsError(f"{directory} exists and is not a serving folder; not replacing it")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer defines no pad token, which fixed-length serving needs")

    leaves, treedef = jax.tree_util.tree_flatten(params)
    names = tuple(heads)

    def probabilities(weights, input_ids, token_type_ids, attention_mask):
        logits = logits_fn(jax.tree_util.tree_unflatten(treedef, weights), input_ids, token_type_ids,
                           attention_mask)
        return {node: jax.nn.softmax(logits[node].astype(jnp.float32), axis=-1) for node in names}

    (batch,) = jax.export.symbolic_shape("batch")
    tokens = jax.ShapeDtypeStruct((batch, max_length), jnp.int32)
    weight_specs = [jax.ShapeDtypeStruct(np.shape(leaf), jnp.asarray(leaf).dtype) for leaf in leaves]
    mask = jax.ShapeDtypeStruct((batch, max_length), jnp.bool_)
    out_shapes = jax.eval_shape(probabilities, weight_specs, tokens, tokens, mask)
    for node, labels in heads.items():
        if node not in out_shapes:
            raise ValueError(f"head {node!r} is not among the model's heads")
        if out_shapes[node].shape[-1] != len(labels):
            raise ValueError(f"head {node!r} has {out_shapes[node].shape[-1]} classes but {len(labels)} labels "
                             f"{list(labels)}")
    exported = jax.export.export(jax.jit(probabilities), platforms=tuple(platforms))(
        weight_specs, tokens, tokens, mask)

    meta = {"format": FORMAT, "heads": {node: list(labels) for node, labels in heads.items()},
            "max_length": int(max_length), "pad_token": tokenizer.pad_token, "pad_id": int(tokenizer.pad_token_id),
            "platforms": list(exported.platforms), "weight_dtypes": [str(spec.dtype) for spec in weight_specs],
            "jax_version": jax.__version__, "source": dict(source or {})}
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.export-", dir=directory.parent))
    try:
        (staging / MODEL_FILE).write_bytes(exported.serialize())
        with open(staging / WEIGHTS_FILE, "wb") as f:  # bfloat16 & co. are stored as raw bytes (see load)
            np.savez(f, **{f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        fileio.move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The `serving.json` of a serving folder, checked for its format."""
    path = pathlib.Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no serving folder at {directory}: {META_FILE} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class ServedCrossEncoder:
    """A loaded serving folder: `score(queries, titles) -> {head: [N, C] probabilities}`.

    Needs jax, numpy and `tokenizers` only. Pairs run in chunks of `batch_size`, the last one padded, so
    the program compiles once per loader.
    """

    def __init__(self, directory: str | os.PathLike, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        directory = pathlib.Path(directory)
        self.meta = read_meta(directory)
        self.batch_size = batch_size
        self.max_length = int(self.meta["max_length"])
        self.heads: dict[str, list[str]] = self.meta["heads"]
        exported = jax.export.deserialize(bytearray((directory / MODEL_FILE).read_bytes()))
        with np.load(directory / WEIGHTS_FILE, allow_pickle=False) as data:
            dtypes = self.meta["weight_dtypes"]
            if len(data.files) != len(dtypes):
                raise ValueError(f"{directory / WEIGHTS_FILE}: {len(data.files)} arrays, {META_FILE} lists "
                                 f"{len(dtypes)}")
            self._weights = [jax.device_put(_as_dtype(data[f"{i:05d}"], dtype)) for i, dtype in enumerate(dtypes)]
        self._tokenizer = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_DIR / "tokenizer.json"))
        self._tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        self._tokenizer.enable_padding(direction="right", length=self.max_length, pad_id=self.meta["pad_id"],
                                       pad_token=self.meta["pad_token"], pad_type_id=0)
        self._call = jax.jit(exported.call)

    def encode(self, queries: Sequence[str], titles: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, token_type_ids, attention_mask), each [N, max_length]."""
        if len(queries) != len(titles):
            raise ValueError(f"{len(queries)} queries but {len(titles)} titles")
        encodings = self._tokenizer.encode_batch(list(zip(queries, titles)))
        return (np.array([e.ids for e in encodings], np.int32).reshape(-1, self.max_length),
                np.array([e.type_ids for e in encodings], np.int32).reshape(-1, self.max_length),
                np.array([e.attention_mask for e in encodings], bool).reshape(-1, self.max_length))

    def score(self, queries: Sequence[str], titles: Sequence[str]) -> dict[str, np.ndarray]:
        """[N, C] probabilities per head for (query, title) pairs."""
        if len(queries) != len(titles):
            raise ValueError(f"{len(queries)} queries but {len(titles)} titles")
        chunks: dict[str, list[np.ndarray]] = {node: [] for node in self.heads}
        for start in range(0, len(queries), self.batch_size):
            rows = list(range(start, min(start + self.batch_size, len(queries))))
            padded = rows + [rows[-1]] * (self.batch_size - len(rows))
            inputs = self.encode([queries[i] for i in padded], [titles[i] for i in padded])
            for node, probs in jax.device_get(self._call(self._weights, *inputs)).items():
                chunks[node].append(np.asarray(probs)[:len(rows)])
        return {node: (np.concatenate(parts) if parts else np.zeros((0, len(self.heads[node]))))
                for node, parts in chunks.items()}


def _as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """`np.savez` writes dtypes numpy does not know (bfloat16) as raw bytes; view them back."""
    target = jnp.dtype(dtype)
    return array if array.dtype == target else array.view(target)


