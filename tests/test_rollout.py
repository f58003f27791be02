"""Rollout assembly: completions → parsed nodes, rewards, node ids; malformed output is a counted penalty."""


import numpy as np
import pytest

from graphgrpo_jax import tokenization
from graphgrpo_jax.data import batching, cot, examples
from graphgrpo_jax.graph import spec as spec_lib
from graphgrpo_jax.rl import rollout
from graphgrpo_jax.tasks import relevance

VALUES = {"qs": "running shoes", "qa": "color=red", "ps": "trail shoes", "pa": "color=red", "ms": "partial",
          "ma": "match", "y": "Substitute"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [cot.prompt_text("red runners", "Acme trail shoes red") + " " + cot.render(VALUES)] * 20
    corpus += ["query: product: judge: Exact Complement Irrelevant mismatch complement none"] * 5
    return tokenization.train_tokenizer(corpus, 400, tmp_path_factory.mktemp("tok"),
                                        extra_special_tokens=cot.node_tags())


def _completion(tokenizer, text, eos=True):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if eos else [])


def test_pieces_decode_with_exact_offsets(tokenizer):
    text = cot.render(VALUES) + " trailing words"
    ids = _completion(tokenizer, text, eos=False)
    decoded, offsets = rollout.TokenPieces(tokenizer).decode(ids)
    assert decoded == text
    for token_id, (start, end) in zip(ids, offsets):
        assert decoded[start:end] == tokenizer.decode([token_id])


def test_assemble_scores_parses_and_lays_out(tokenizer):
    spec = spec_lib.graph_spec(spec_lib.default_graph_config())
    wrong = dict(VALUES, y="Exact")
    texts = [cot.render(VALUES), cot.render(wrong), "<qs>running shoes</qs><qa>", cot.render(VALUES)]
    completions = [_completion(tokenizer, t, eos=i != 3) for i, t in enumerate(texts)]
    completions[3] = completions[3][:5]  # truncated mid-way: no EOS
    width = max(map(len, completions))
    tokens = np.zeros((4, width), np.int32)
    for i, c in enumerate(completions):
        tokens[i, :len(c)] = c
    lengths = np.array([len(c) for c in completions])
    truncated = np.array([False, False, False, True])
    prompt = batching.encode_prompts(tokenizer, [cot.prompt_text("red runners", "Acme trail shoes red")] * 4, 24)
    example = examples.RelevanceExample(example_id="p0", query_id="q0", query="red runners",
                                        product_text="Acme trail shoes red", label="Substitute", split="train",
                                        nodes=VALUES, gold_nodes=VALUES)
    task = relevance.RelevanceTask([example], spec, r_format=-1.0)
    np.testing.assert_array_equal(task.encode_prompts(tokenizer, 24)["tokens"], prompt["tokens"][:1])
    out = rollout.assemble(task, rollout.TokenPieces(tokenizer), np.zeros(4, int), prompt["tokens"],
                           prompt["attention_mask"], tokens, lengths, truncated)

    np.testing.assert_array_equal(out.scored.rewards, [1.0, 0.0, -1.0, -1.0])
    np.testing.assert_array_equal(out.scored.format_valid, [True, True, False, False])
    assert out.scored.metrics["rl/format_failures"] == 2.0
    assert out.scored.metrics["rl/accuracy"] == 0.25
    assert out.scored.node_correct[0].all()
    assert out.scored.node_correct[1].tolist() == [True] * 6 + [False]  # only the label is wrong
    assert out.scored.node_correct[2].tolist() == [True] + [False] * 6  # only qs was written
    assert out.texts[0] == texts[0]  # EOS is not part of the judged text
    assert out.completion_mask.sum(axis=1).tolist() == lengths.tolist()
    assert not out.completion_mask[:, :24].any()
    # Node ids of a generated response equal those the SFT batching gives the same response.
    sft = batching.encode_sft(tokenizer, [cot.prompt_text("red runners", "Acme trail shoes red")], [texts[0]], 24,
                              width)
    np.testing.assert_array_equal(out.node_ids[0, 24:24 + lengths[0]], sft["node_ids"][0, 24:24 + lengths[0]])
    # Node values: categorical by index, free text interned (equal strings share an id), missing -1.
    ms, y, qs, qa = (spec.index(n) for n in ("ms", "y", "qs", "qa"))
    assert out.scored.node_values[0, ms] == spec.categorical[ms].index("partial")
    assert out.scored.node_values[1, y] == spec.categorical[y].index("Exact")
    assert out.scored.node_values[0, qs] == out.scored.node_values[1, qs] == out.scored.node_values[2, qs] >= 0
    assert out.scored.node_values[2, qa] == -1 and out.scored.node_values[2, y] == -1


def test_unknown_categorical_value_counts_as_missing():
    spec = spec_lib.graph_spec(spec_lib.default_graph_config())
    parsed = cot.parse(cot.render(dict(VALUES, ms="sort of")))
    ids = relevance.node_value_ids([parsed], spec)
    assert ids[0, spec.index("ms")] == -1
    assert ids[0, spec.index("ma")] == spec.categorical[spec.index("ma")].index("match")
