"""Serving artifact of the student: the exported program scores like the in-process model, the loader
tokenizes like `encoder.encode_pairs`, and it loads with jax, numpy and `tokenizers` alone."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from graphgrpo_jax.data.cot import LABELS, MA_VALUES, MS_VALUES
from graphgrpo_jax.models import encoder
from graphgrpo_jax.search import serving

TINY = pathlib.Path(__file__).resolve().parent / "fixtures" / "bert_tiny"
HEADS = {"y": LABELS, "ms": MS_VALUES, "ma": MA_VALUES}
MAX_LENGTH = 24
QUERIES = ["red running shoes size 9", "cheap kicks", "strideon trail shoes for women black size 10", "x"]
TITLES = ["Strideon running shoes TX1234, red, size 9, Premium Lightweight",
          "Pacewell walking shoes", "Guardly phone case compatible with smartphone, silicone, blue, Ultra Compact "
          "Deluxe Signature edition with a long tail of marketing words", "Kibble"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The tiny fixture's random body (every tensor perturbed) with fresh heads and MiniLM's real tokenizer,
    exported once. The fixture's 100-word vocabulary is widened to the tokenizer's with random rows."""
    tokenizer = encoder.load_pair_tokenizer(encoder.minilm_folder())
    config = encoder.EncoderConfig.from_hf(TINY)
    params = encoder.load_pretrained(TINY, config, {node: len(values) for node, values in HEADS.items()},
                                     jax.random.PRNGKey(1))
    config = dataclasses.replace(config, vocab_size=len(tokenizer))
    params["embeddings"]["word_embeddings"] = np.random.default_rng(1).normal(
        0.0, 0.02, (config.vocab_size, config.hidden_size)).astype(np.float32)
    directory = tmp_path_factory.mktemp("serving") / "student"
    serving.export_cross_encoder(
        directory, lambda p, *inputs: encoder.node_logits(p, config, *inputs), params, tokenizer, HEADS, MAX_LENGTH,
        source={"run": "test"})
    return config, params, tokenizer, directory


def test_exported_student_scores_like_the_in_process_model(student):
    config, params, tokenizer, directory = student
    served = serving.ServedCrossEncoder(directory, batch_size=3)  # 4 pairs: one full and one padded batch
    expected = encoder.head_probabilities(params, config, tokenizer, QUERIES, TITLES,
                                                  max_length=MAX_LENGTH, batch_size=4)
    scores = served.score(QUERIES, TITLES)
    assert set(scores) == set(HEADS)
    for node, values in HEADS.items():
        assert scores[node].shape == (len(QUERIES), len(values))
        np.testing.assert_allclose(scores[node], expected[node], atol=1e-5, rtol=0)
    assert served.heads == {node: list(values) for node, values in HEADS.items()}


def test_loader_tokenizes_like_encode_pairs(student):
    _, _, tokenizer, directory = student
    served = serving.ServedCrossEncoder(directory)
    expected = encoder.encode_pairs(tokenizer, QUERIES, TITLES, MAX_LENGTH)
    for ours, theirs in zip(served.encode(QUERIES, TITLES), expected):
        np.testing.assert_array_equal(ours, theirs)
    assert expected.attention_mask[2].all(), "the long pair is truncated to max_length"


def test_loads_without_the_training_code(student):
    """A fresh interpreter where flax, optax, orbax, transformers and our models cannot be imported."""
    _, _, _, directory = student
    reference = serving.ServedCrossEncoder(directory).score(QUERIES, TITLES)["y"]
    script = f"""
import json, sys
for name in ("flax", "optax", "orbax", "transformers", "graphgrpo_jax.models", "graphgrpo_jax.train"):
    sys.modules[name] = None
from graphgrpo_jax.search import serving
served = serving.ServedCrossEncoder({str(directory)!r}, batch_size=2)
print(json.dumps(served.score({QUERIES!r}, {TITLES!r})["y"].tolist()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    np.testing.assert_allclose(np.array(json.loads(out.stdout.strip().splitlines()[-1])), reference, atol=1e-6)


def test_folder_contents_and_overwrite_rules(student, tmp_path):
    config, params, tokenizer, directory = student
    meta = serving.read_meta(directory)
    assert meta["max_length"] == MAX_LENGTH and meta["source"] == {"run": "test"} and meta["platforms"] == ["cpu"]
    assert (directory / serving.TOKENIZER_DIR / "tokenizer.json").is_file()
    logits_fn = lambda p, *inputs: encoder.node_logits(p, config, *inputs)  # noqa: E731
    with pytest.raises(FileExistsError, match="overwrite=True"):
        serving.export_cross_encoder(directory, logits_fn, params, tokenizer, HEADS, MAX_LENGTH)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not a serving folder"):
        serving.export_cross_encoder(tmp_path / "other", logits_fn, params, tokenizer, HEADS, MAX_LENGTH,
                                     overwrite=True)
    with pytest.raises(ValueError, match=r"head 'ma' has 3 classes but 2 labels"):
        serving.export_cross_encoder(tmp_path / "bad", logits_fn, params, tokenizer, {"ma": ("a", "b")}, MAX_LENGTH)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FileNotFoundError, match="serving.json is missing"):
        serving.ServedCrossEncoder(tmp_path / "other")
