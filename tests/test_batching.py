"""Token batches: layout, masks, positions and per-token node ids, with a real fast tokenizer."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from graphgrpo_jax.data import batching, cot
from graphgrpo_jax.data.world import WorldConfig, build_world

P, R = 48, 64  # max prompt / response tokens


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(products_per_type=6, num_queries=40))


def train_tokenizer(lines, tags_as_tokens: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on world text in well under a second."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    if tags_as_tokens:
        tokenizer.add_tokens([f"<{slash}{node}>" for node in cot.NODES for slash in ("", "/")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module", params=[False, True], ids=["bpe", "bpe+tag_tokens"])
def tokenizer(request, world):
    lines = [cot.prompt_text(p.query, p.product_title) + " " + p.teacher_cot for p in world.pairs]
    return train_tokenizer(lines, tags_as_tokens=request.param)


@pytest.fixture(scope="module")
def examples(world):
    pairs = world.pairs[:6]
    return ([cot.prompt_text(p.query, p.product_title) for p in pairs],
            [cot.render(p.teacher, label_position="first" if i % 2 else "last") for i, p in enumerate(pairs)])


def test_prompt_batch_is_left_padded(tokenizer, examples):
    prompts = examples[0]
    batch = batching.encode_prompts(tokenizer, prompts, P)
    assert {key: value.shape for key, value in batch.items()} == {
        "tokens": (6, P), "attention_mask": (6, P), "positions": (6, P), "prompt_truncated": (6,)}
    assert all(value.dtype == np.int32 for value in batch.values())
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        n = len(ids)
        np.testing.assert_array_equal(batch["tokens"][row, P - n:], ids)
        np.testing.assert_array_equal(batch["tokens"][row, : P - n], tokenizer.pad_token_id)
        np.testing.assert_array_equal(batch["attention_mask"][row], [0] * (P - n) + [1] * n)
        np.testing.assert_array_equal(batch["positions"][row, P - n:], np.arange(n))
    assert not batch["prompt_truncated"].any()


def test_sft_batch_layout_and_masks(tokenizer, examples):
    prompts, responses = examples
    batch = batching.encode_sft(tokenizer, prompts, responses, P, R)
    assert {key: value.shape for key, value in batch.items()} == {
        "tokens": (6, P + R), "attention_mask": (6, P + R), "positions": (6, P + R), "loss_mask": (6, P + R),
        "node_ids": (6, P + R), "prompt_truncated": (6,)}
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        tokens, mask = batch["tokens"][row], batch["attention_mask"][row]
        loss, nodes = batch["loss_mask"][row], batch["node_ids"][row]
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        n, m = len(prompt_ids), len(response_ids) + 1
        # Prompt right-aligned before column P, response (with EOS) from column P.
        assert tokenizer.decode(tokens[P - n:P]) == prompt
        assert tokenizer.decode(tokens[P:P + m - 1]) == response
        assert tokens[P + m - 1] == tokenizer.eos_token_id
        np.testing.assert_array_equal(mask, [0] * (P - n) + [1] * (n + m) + [0] * (R - m))
        np.testing.assert_array_equal(loss, [0] * P + [1] * m + [0] * (R - m))
        np.testing.assert_array_equal(batch["positions"][row, P - n:P + m], np.arange(n + m))
        assert (nodes[:P] == batching.PROMPT_NODE_ID).all() and (nodes[P + m:] == batching.PROMPT_NODE_ID).all()
        assert nodes[P + m - 1] == batching.OUTSIDE_NODE_ID  # EOS belongs to no node
        assert set(nodes[P:P + m - 1]) == set(range(len(cot.NODES)))


def char_owner(text: str) -> list[int]:
    """Node index of every character, read with plain string search (independent of cot.parse)."""
    owner = [-1] * len(text)
    for index, node in enumerate(cot.NODES):
        start = text.index(f"<{node}>")
        end = text.index(f"</{node}>") + len(f"</{node}>")
        owner[start:end] = [index] * (end - start)
    return owner


def test_node_ids_follow_each_tokens_first_character(tokenizer, examples):
    prompts, responses = examples
    batch = batching.encode_sft(tokenizer, prompts, responses, P, R)
    tag_tokens = len(tokenizer) > tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    for row, response in enumerate(responses):
        offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ids = batch["node_ids"][row, P:P + len(offsets)]
        owner = char_owner(response)
        assert [owner[start] for start, _ in offsets] == ids.tolist()
        if tag_tokens:  # token boundaries fall on tag boundaries: each node's tokens cover exactly its span
            for index in range(len(cot.NODES)):
                covered = [c for (start, end), i in zip(offsets, ids) if i == index for c in range(start, end)]
                assert covered == [c for c, o in enumerate(owner) if o == index]


def test_responses_without_nodes_and_empty_prompts(tokenizer):
    batch = batching.encode_sft(tokenizer, ["", cot.rewrite_prompt("red runners")],
                                ["red running shoes", "relevant"], P, R)
    response = batch["node_ids"][:, P:]
    assert set(response[batch["loss_mask"][:, P:] == 1].tolist()) == {batching.OUTSIDE_NODE_ID}
    assert batch["attention_mask"][0, :P].sum() == 0
    assert batch["positions"][0, P] == 0


def test_overflow(tokenizer, examples):
    prompts, responses = examples
    with pytest.raises(ValueError, match=r"response 0 has \d+ tokens \+ EOS > max_response_len 8"):
        batching.encode_sft(tokenizer, prompts, responses, P, 8)
    with pytest.raises(ValueError, match="prompt 0 has .* > max_prompt_len 4"):
        batching.encode_prompts(tokenizer, prompts, 4)
    batch = batching.encode_prompts(tokenizer, prompts, 4, truncate_prompts=True)
    assert batch["prompt_truncated"].tolist() == [1] * len(prompts)
    np.testing.assert_array_equal(batch["tokens"][0], tokenizer(prompts[0])["input_ids"][-4:])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        batching.encode_sft(tokenizer, prompts[:2], responses[:1], P, R)


def test_tokenizer_without_eos_is_refused(tokenizer):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no eos_token"):
        batching.encode_prompts(no_eos, ["query: x judge:"], P)
