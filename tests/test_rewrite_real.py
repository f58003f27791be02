"""The rewrite task on real data end to end, small: a tiny Hugging Face checkpoint with a chat template, a few real
Rec-R1 queries with teacher rewrites, and the real ESCI product pool.

data → index → multi-task SFT (teacher rewrites + constructed tags, through the chat template) → one fused-reward
GRPO step (the SFT policy's tagger as judge) → eval on held-out pool queries, through `main.run` and the
`configs/rewrite.py:smollm2_esci_micro` config pointed at the tiny checkpoint.
"""

import json

import numpy as np
import pytest

from configs import rewrite as rewrite_configs
from graphgrpo_jax import artifacts, main
from graphgrpo_jax.data import prompts, rewrite_data
from graphgrpo_jax.search.engine import SearchEngine, recall_at_k
from graphgrpo_jax.tasks import rewrite as rewrite_task


@pytest.fixture(scope="module")
def files(shared_data, tmp_path_factory):
    """Small query files cut from the Rec-R1 ones (40 train rows; val: 10 esci_val rows and 5 rows of test queries;
    30 test rows), and the shared pool files as they are."""
    folder = tmp_path_factory.mktemp("recr1")
    source = shared_data / "esci-query-rewrite-recr1"
    test = (source / "test.jsonl").read_text().splitlines()[:30]
    test_queries = {json.loads(line)["query"] for line in test}
    val = [line for line in (source / "val.jsonl").read_text().splitlines()]
    val = [v for v in val if json.loads(v)["data_source"] == "esci_val"][:10] + \
        [v for v in val if json.loads(v)["query"] in test_queries][:5]
    paths = {"train_path": source / "train.jsonl", "val_path": folder / "val.jsonl", "test_path": folder / "test.jsonl"}
    (folder / "train.jsonl").write_text("\n".join((source / "train.jsonl").read_text().splitlines()[:40]) + "\n")
    paths["train_path"] = folder / "train.jsonl"
    paths["val_path"].write_text("\n".join(val) + "\n")
    paths["test_path"].write_text("\n".join(test) + "\n")
    pool = (shared_data / "esci-graded-subset" / "esci_pairs.jsonl", shared_data / "esci-vespa-sample" / "esci_pairs.jsonl")
    return {**{k: str(v) for k, v in paths.items()}, "pool_paths": tuple(str(p) for p in pool)}


@pytest.fixture(scope="module")
def checkpoint(files, tmp_path_factory, make_chat_checkpoint):
    """A tiny random Llama-shaped model whose ChatML tokenizer (EOS `<|im_end|>`) saw the queries and titles."""
    folder = tmp_path_factory.mktemp("checkpoint")
    queries = rewrite_data.read_queries(files["train_path"], split="train").queries
    titles = [p["title"] for p in rewrite_data.read_pool(files["pool_paths"]).products]
    corpus = [q.text + " " + (q.teacher.rewrite if q.teacher else "") for q in queries] + titles + [
        prompts.REWRITE_SYSTEM, *prompts.REWRITE_INSTRUCTIONS.values(), prompts.TAG_INSTRUCTION]
    return make_chat_checkpoint(folder, corpus, 900)


def _config(checkpoint, files):
    config = rewrite_configs.get_config("smollm2_esci_micro")
    config.model.hf_checkpoint = str(checkpoint)
    config.rewrite_data.update(files)
    config.data.update(max_prompt_len=200, max_response_len=64)  # the tiny tokenizer spends more tokens per word
    config.rewrite_eval.update(max_examples=12, batch_size=6)
    return config


def test_micro_run_from_a_tiny_checkpoint_on_real_queries(checkpoint, files, tmp_path):
    config = _config(checkpoint, files)
    workdir = tmp_path / "run"
    main.run(config, str(workdir))
    resolved = main.resolve(config)
    data = rewrite_task.real_data(resolved)

    # The pool index: every titled product, searched with brand, colour and bullets too.
    engine = SearchEngine.open(artifacts.index_dir(str(workdir)))
    assert len(engine) == 480 and engine.text_fields == ("title", *rewrite_data.POOL_FIELDS)
    # No held-out query is a training query, and none of the val file's test rows reached a split.
    assert not {q.text for q in data.pool_queries["test"]} & {q.text for q in data.splits.train.queries}
    assert data.splits.val_rows_of_test_queries == 5 and len(data.splits.val.queries) == 10

    # SFT rows are chat prompts with the teacher's rewrite (plain form) as the answer, or a constructed tag.
    tokenizer = artifacts.load_tokenizer(resolved, str(workdir))
    sft = rewrite_task.sft_data(resolved, str(workdir), tokenizer)
    texts = [tokenizer.decode(row[mask.astype(bool)], skip_special_tokens=False)
             for row, mask in zip(sft.rows["tokens"], sft.rows["attention_mask"])]
    first = data.splits.train.queries[0]
    rewrite_row = next(t for t in texts if f"Query: {first.text}\nRewrite the query" in t)
    assert rewrite_row.startswith("<|im_start|>system\n" + prompts.REWRITE_SYSTEM)
    assert rewrite_row.endswith("<|im_start|>assistant\n" + rewrite_data.answer_text(first.teacher.target("plain"))
                                + "<|im_end|>")
    tag_rows = [t for t in texts if prompts.TAG_INSTRUCTION in t]
    assert {t.rsplit("assistant\n", 1)[1] for t in tag_rows} == {f"{tag}<|im_end|>" for tag in
                                                                  ("relevant", "partial", "irrelevant")}

    # RL read every completion as an answer (or counted it as a format failure); no world intents, no accuracy.
    rl_rows = [json.loads(line) for line in open(artifacts.metrics_path(str(workdir), "rl"))]
    assert rl_rows and 0.0 <= rl_rows[-1]["rl/format_failure_rate"] <= 1.0 and "rl/accuracy" not in rl_rows[-1]
    assert "rl/reward_rel" in rl_rows[-1]  # the SFT policy's tagger judged the rewrites

    # The eval: the raw query, the teacher where it rewrote a held-out query, and each policy.
    results = json.loads((workdir / "rewrite_eval" / "metrics.json").read_text())
    held_out = list(data.pool_queries["test"][:12])
    assert {"raw/test", "base/test", "sft/test", "rl/test", "pool"} <= set(results)
    assert results["pool"]["products"] == 480
    raw = results["raw/test"]
    assert raw["num_examples"] == len(held_out) and raw["format_failure_rate"] == 0.0
    recalls = [recall_at_k([pid for pid, _ in engine.search(q.text, 10)], q.target_ids, 10) for q in held_out]
    assert raw["recall"] == pytest.approx(np.mean(recalls)) and raw["per_query"]["recall"] == pytest.approx(recalls)
    assert raw["per_query"]["query"] == [q.text for q in held_out]
    for fmt in rewrite_data.REWRITE_FORMATS:  # the teacher's rewrites of the held-out queries it rewrote
        taught = [q for q in held_out if q.text in data.teacher_rewrites]
        assert results.get(f"teacher_{fmt}/test", {}).get("num_examples", 0) == len(taught)
    for policy in ("base", "sft", "rl"):
        report = results[f"{policy}/test"]
        assert report["num_examples"] == len(held_out) and 0.0 <= report["format_failure_rate"] <= 1.0
        assert 0.0 <= report["recall"] <= 1.0


def test_real_data_refuses_the_world_oracles_and_a_missing_file(checkpoint, files, tmp_path):
    from graphgrpo_jax import config_validation as cv

    config = _config(checkpoint, files)
    config.rewrite.judge = "rule"
    config.rewrite.rl_queries = "unlabelled"
    config.rewrite_eval.splits = ("ood",)
    config.rewrite_data.test_path = str(tmp_path / "missing.jsonl")
    with pytest.raises(cv.ConfigError) as raised:
        cv.validate(config, check_files=False)
    message = str(raised.value)
    assert "config.rewrite.judge = 'rule' is an oracle of the synthetic world" in message
    assert "config.rewrite.rl_queries = 'unlabelled'" in message
    assert "config.rewrite_eval.splits = ('ood',): config.data.source = 'esci' has the splits ('rl', 'test')" in message
    config = _config(checkpoint, files)
    config.rewrite_data.test_path = str(tmp_path / "missing.jsonl")
    assert cv.data_file_errors(config) == [f"config.rewrite_data.test_path = {str(tmp_path / 'missing.jsonl')!r}: "
                                           "no such file"]
