"""The real path end to end, small: a tiny Hugging Face checkpoint with a chat template on a few real ESCI rows.

data → CoT-masked SFT on the rule teacher → one Graph-GRPO step → eval → report, through `main.run` and the
`configs/smollm2_esci.py:micro` config (the SmolLM2 run's own config, pointed at a tiny checkpoint); then the
eval-only mode judges the test rows with the run's checkpoints and must agree with the run's own eval.
"""

import json
import pathlib

import numpy as np
import pytest

from configs import smollm2_esci
from graphgrpo_jax import artifacts, main
from graphgrpo_jax.data import prompts
from graphgrpo_jax.models import decoder
from graphgrpo_jax.tasks import relevance

NUM_ROWS = 60


@pytest.fixture(scope="module")
def esci_rows(shared_data, tmp_path_factory) -> pathlib.Path:
    """The first rows of the graded subset, as a file of their own."""
    lines = (shared_data / "esci-graded-subset" / "esci_pairs.jsonl").read_text().splitlines()[:NUM_ROWS]
    path = tmp_path_factory.mktemp("esci") / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(esci_rows, tmp_path_factory, make_chat_checkpoint) -> pathlib.Path:
    """A tiny random Llama-shaped model whose tokenizer (ChatML, EOS `<|im_end|>`) saw the rows' text."""
    folder = tmp_path_factory.mktemp("checkpoint")
    rows = [json.loads(line) for line in esci_rows.read_text().splitlines()]
    corpus = [f"{r['query']} {r['product_title']}" for r in rows] + [prompts.SYSTEM, prompts.COT_INSTRUCTION]
    return make_chat_checkpoint(folder, corpus, 700)


def _config(checkpoint, esci_rows):
    config = smollm2_esci.get_config("micro")
    config.model.hf_checkpoint = str(checkpoint)
    config.data.esci.path = str(esci_rows)
    config.data.update(max_prompt_len=224, max_response_len=128)  # the tiny tokenizer spends more tokens per word
    config.eval.update(splits=("test",), max_examples=NUM_ROWS)
    return config


def test_micro_run_from_a_tiny_checkpoint_on_esci_rows(checkpoint, esci_rows, tmp_path):
    config = _config(checkpoint, esci_rows)
    workdir = tmp_path / "run"
    main.run(config, str(workdir))
    resolved = main.resolve(config)

    # The rows: split by query, every training row with the rule teacher's chain.
    counts = json.loads((workdir / "eval" / "data.json").read_text())
    assert counts["rows"] == NUM_ROWS and counts["train"] + counts["val"] + counts["test"] == NUM_ROWS
    test_rows = relevance.examples_of(resolved, "test")
    assert len(test_rows) == counts["test"] > 0
    train_queries = {e.query_id for e in relevance.examples_of(resolved, "train")}
    assert not train_queries & {e.query_id for e in test_rows}

    # SFT rows are chat prompts (system turn first, the assistant turn open) with the chain after them.
    tokenizer = artifacts.load_tokenizer(resolved, str(workdir))
    data = relevance.sft_data(resolved, str(workdir), tokenizer)
    row = data.rows["tokens"][0][data.rows["attention_mask"][0].astype(bool)]
    text = tokenizer.decode(row, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n" + prompts.SYSTEM)
    assert "<|im_start|>assistant\n<qs>" in text and text.endswith("</y><|im_end|>")

    # RL ran on the SFT policy; the eval and the report name the cut products.
    rl_log = pathlib.Path(artifacts.metrics_path(str(workdir), "rl"))
    rl_rows = [json.loads(line) for line in rl_log.read_text().splitlines()]
    assert rl_rows and "rl/reward" in rl_rows[-1]
    assert "credit/blame_precision_at_1" not in rl_rows[-1]  # no gold nodes in real data
    results = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert set(results) == {"sft/test", "rl/test"}
    for report in results.values():
        assert report["num_examples"] == len(test_rows) and "product_truncated" in report
    assert "products cut" in (workdir / "report.md").read_text()
    assert not (workdir / "data" / "world.json").exists()  # real rows and a checkpoint tokenizer: no world built

    # The eval-only mode on the test rows, with the run's checkpoints: the run's own numbers.
    test_queries = {e.query_id for e in test_rows}
    test_file = tmp_path / "test_rows.jsonl"
    bad_rows = ['{"query_id": "q-bad", "query": "lamp"}', '{"query_id": "q-cut", "query": "desk lamp", "prod']
    test_file.write_text("".join(line + "\n" for line in esci_rows.read_text().splitlines()
                                 if str(json.loads(line)["query_id"]) in test_queries) + "\n".join(bad_rows) + "\n")
    eval_config = _config(checkpoint, esci_rows)
    eval_config.stages = ("eval_file",)
    eval_config.eval.update(input_path=str(test_file), checkpoint_workdir=str(workdir), policies=("sft", "rl"),
                            input_split="all", skip_bad_rows=True)  # the two bad rows are counted, not judged
    main.run(eval_config, str(tmp_path / "eval_only"))
    judged = json.loads((tmp_path / "eval_only" / "eval" / "test_rows.json").read_text())
    assert judged["num_rows"] == len(test_rows)
    assert sum(judged["skipped_rows"].values()) == 2 and len(judged["skipped_rows"]) == 2, judged["skipped_rows"]
    for policy in ("sft", "rl"):
        for key in ("accuracy", "macro_f1", "format_failure_rate", "product_truncated"):
            assert judged[policy][key] == pytest.approx(results[f"{policy}/test"][key]), (policy, key)
        np.testing.assert_allclose(judged[policy]["auc"]["macro"], results[f"{policy}/test"]["auc"]["macro"],
                                   rtol=1e-5)


def test_zero_shot_base_policy_answers_a_label_word(checkpoint, esci_rows, tmp_path):
    """The `base` policy (the checkpoint untrained) under plain label answers; its label probabilities are
    those of each label word right after the prompt, computed here by hand."""
    import jax.numpy as jnp

    from graphgrpo_jax.eval import relevance as relevance_eval

    config = _config(checkpoint, esci_rows)
    config.data.answer = "label"
    config.stages = ("data", "eval")
    config.eval.policies = ("base",)
    workdir = tmp_path / "zero_shot"
    main.run(config, str(workdir))
    report = json.loads((workdir / "eval" / "metrics.json").read_text())["base/test"]
    assert report["num_examples"] == len(relevance.examples_of(main.resolve(config), "test"))

    resolved = main.resolve(config)
    tokenizer = artifacts.load_tokenizer(resolved, str(workdir))
    params = artifacts.policy_params(resolved, str(workdir), artifacts.BASE_POLICY)
    example = relevance.examples_of(resolved, "test")[0]
    judged = relevance_eval.judge(params, resolved, tokenizer, [example.query], [example.product_text], 1)
    prompt = relevance.encode_prompts(resolved, tokenizer, [example])
    assert "Answer with one label" in tokenizer.decode(prompt["tokens"][0])
    model_config = decoder.DecoderConfig.from_config(resolved.model)
    scores = []
    for label in relevance.cot.LABELS:
        ids = tokenizer(label, add_special_tokens=False)["input_ids"]
        tokens = np.concatenate([prompt["tokens"][0], ids])[None]
        mask = np.concatenate([prompt["attention_mask"][0], np.ones(len(ids), np.int32)])[None].astype(bool)
        logp = decoder.token_log_probs(params, model_config, jnp.asarray(tokens), jnp.asarray(mask))
        scores.append(float(np.asarray(logp)[0, -len(ids):].sum()))
    expected = np.exp(np.asarray(scores) - max(scores))
    np.testing.assert_allclose(judged.probs[0], expected / expected.sum(), rtol=1e-4, atol=1e-6)
