"""Byte-level BPE training, offline reload, exact round trips, offsets and prompt batches."""

import json

import numpy as np
import pytest

from graphgrpo_jax import artifacts, tokenization
from graphgrpo_jax.data import cot

TAGS = ("<qs>", "</qs>", "<y>", "</y>")
CORPUS = [
    "nike running shoes men size 10",
    "Apple AirPods Pro (2nd Generation) — Wireless Earbuds",
    "<qs>running shoes</qs><y>Exact</y>",
    "  leading spaces, double  spaces and a trailing space ",
    "line one\nline two\ttabbed\r\nwindows line",
    "café crème brûlée ünïcödé 日本語 emoji 🙂👍🏽 and € 5,99",
    "",
    "a",
    "!!!???...,,,;;;",
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    return tokenization.train_tokenizer(iter(CORPUS), vocab_size=300, out_dir=folder,
                                        extra_special_tokens=TAGS), folder


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_special_tokens_have_fixed_ids_and_stay_whole(trained):
    tokenizer, _ = trained
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.convert_tokens_to_ids(list(TAGS)) == [2, 3, 4, 5]
    assert ids_of(tokenizer, "<qs>x</qs>") == [2, *ids_of(tokenizer, "x"), 3]
    assert ids_of(tokenizer, tokenization.EOS_TOKEN) == [1]


def test_bpe_learns_merges_within_the_vocab_budget(trained):
    tokenizer, _ = trained
    assert 256 + 6 < len(tokenizer) <= 300  # byte alphabet + specials, plus learned merges
    assert tokenizer.convert_ids_to_tokens(ids_of(tokenizer, "running")) == ["running"]
    text = "nike running shoes men size 10"
    assert len(ids_of(tokenizer, text)) < len(text.encode())


def test_round_trip_is_exact(trained):
    tokenizer, _ = trained
    unseen = ["zebra → ψ 🦓", "   ", "tab\tand\nnewline", "<y>Irrelevant</y> trailing"]
    for text in CORPUS[:9] + unseen:
        assert tokenizer.decode(ids_of(tokenizer, text)) == text


def test_saved_folder_reloads_offline(trained, monkeypatch):
    tokenizer, folder = trained
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = tokenization.load_tokenizer(folder)
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (0, 1)
    for text in CORPUS[:9]:
        assert ids_of(reloaded, text) == ids_of(tokenizer, text)


def test_offsets_tile_the_text(trained):
    tokenizer, _ = trained
    for text in ["<qs>running shoes</qs> nike  air", "café 🙂 €5"]:
        spans = np.array(tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
        starts, ends = spans[:, 0], spans[:, 1]
        # In order and without gaps; tokens holding bytes of one multi-byte character overlap on it.
        assert starts[0] == 0 and ends[-1] == len(text)
        assert np.all(starts[1:] <= ends[:-1]) and np.all(np.diff(starts) >= 0) and np.all(np.diff(ends) >= 0)
        assert np.all(starts < ends)
    spans = tokenizer("<qs>shoes", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert spans[0] == (0, 4)


def test_encode_batch_pads_left_or_right_to_a_fixed_length(trained):
    tokenizer, _ = trained
    texts = ["nike shoes", "a", "<qs>running shoes</qs>"]
    rows = [ids_of(tokenizer, t) for t in texts]
    ids, mask = tokenization.encode_batch(tokenizer, texts, max_len=12)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (3, 12)
    for row, row_ids in enumerate(rows):
        pad = 12 - len(row_ids)
        assert ids[row, pad:].tolist() == row_ids and ids[row, :pad].tolist() == [0] * pad
        assert mask[row].tolist() == [False] * pad + [True] * len(row_ids)
    right_ids, right_mask = tokenization.encode_batch(tokenizer, texts, max_len=12, padding_side="right")
    assert right_ids[1].tolist() == rows[1] + [0] * (12 - len(rows[1]))
    assert right_mask.sum(1).tolist() == mask.sum(1).tolist()


def test_encode_batch_refuses_a_text_that_does_not_fit(trained):
    tokenizer, _ = trained
    with pytest.raises(ValueError, match="text 1 has .* tokens, more than max_len=3"):
        tokenization.encode_batch(tokenizer, ["a", "a much longer text than three tokens"], max_len=3)


def test_a_checkpoint_without_pad_token_pads_with_eos(trained, tmp_path):
    _, folder = trained
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / file).write_text((folder / file).read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = tokenization.load_tokenizer(tmp_path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1


def test_vocab_too_small_for_the_byte_alphabet_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        tokenization.train_tokenizer(CORPUS, vocab_size=100, out_dir=tmp_path)


def test_real_esci_titles_round_trip(shared_data, tmp_path):
    rows = [json.loads(line) for line in
            (shared_data / "esci-graded-subset" / "esci_pairs.jsonl").read_text().splitlines()]
    texts = [text for row in rows for text in (row["query"], row["product_title"])]
    tokenizer = tokenization.train_tokenizer(texts[:1000], vocab_size=1024, out_dir=tmp_path)
    for text in texts:
        assert tokenizer.decode(ids_of(tokenizer, text)) == text
    ids, mask = tokenization.encode_batch(tokenizer, texts[1000:1016], max_len=128)
    assert mask.any(axis=1).all() and mask[:, -1].all()


def test_checkpoint_tokenizer_adds_the_cot_tags_as_whole_tokens(tmp_path):
    """A pretrained checkpoint's tokenizer (here a BPE saved like one, without tags) gains the CoT tags
    after its vocabulary; untagged text encodes exactly as before; the data stage uses it when asked."""
    from configs import relevance
    from graphgrpo_jax.data import prepare

    texts = ["red cotton shirt for men", "phone case, black", "<ms> is not a tag yet"] * 20
    checkpoint = tmp_path / "checkpoint"
    original = tokenization.train_tokenizer(texts, 300, checkpoint)
    tags = cot.node_tags()
    tokenizer = tokenization.checkpoint_tokenizer(checkpoint, tmp_path / "out", tags)
    reloaded = tokenization.load_tokenizer(tmp_path / "out")
    for tok in (tokenizer, reloaded):
        assert len(tok) == len(original) + len(tags)
        for i, tag in enumerate(tags):
            assert tok(tag, add_special_tokens=False)["input_ids"] == [len(original) + i]
        for text in texts[:2]:
            assert tok(text, add_special_tokens=False)["input_ids"] == original(text, add_special_tokens=False)[
                "input_ids"]
        assert tok.decode(tok("<y>Exact</y>", add_special_tokens=False)["input_ids"]) == "<y>Exact</y>"

    config = relevance.get_config("micro")
    config.tokenizer.hf_checkpoint = str(checkpoint)
    config.model.vocab_size = len(original) + len(tags)
    prepare.run(config, str(tmp_path / "work"))
    assert len(artifacts.load_tokenizer(config, str(tmp_path / "work"))) == len(original) + len(tags)
