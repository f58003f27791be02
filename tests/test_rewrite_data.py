"""Real rewrite data (data/rewrite_data.py) on the shared Rec-R1 and ESCI files: splits without test leakage and
their counts, teacher transcripts and model answers, the product pool, and the search reward on real rows."""

import json
import pathlib

import numpy as np
import pytest

from graphgrpo_jax.data import esci, rewrite_data
from graphgrpo_jax.rl import rewards
from graphgrpo_jax.search.engine import SearchEngine

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
RECR1 = SHARED / "esci-query-rewrite-recr1"
POOL_FILES = (SHARED / "esci-graded-subset" / "esci_pairs.jsonl", SHARED / "esci-vespa-sample" / "esci_pairs.jsonl")


@pytest.fixture(scope="module")
def splits():
    return rewrite_data.read_splits(RECR1 / "train.jsonl", RECR1 / "val.jsonl", RECR1 / "test.jsonl")


@pytest.fixture(scope="module")
def pool():
    return rewrite_data.read_pool(POOL_FILES)


def test_the_recr1_splits_have_the_documented_counts_and_no_test_query_outside_test(splits):
    # SOURCE.md: 4,510 train queries, 898 val rows (100 esci_val + the 798 test queries), 798 test queries.
    assert (len(splits.train.queries), len(splits.val.queries), len(splits.test.queries)) == (4510, 100, 798)
    assert splits.val_rows_of_test_queries == 798
    assert {q.data_source for q in splits.val.queries} == {"esci_val"}
    test = {q.text for q in splits.test.queries}
    assert not test & {q.text for q in splits.train.queries + splits.val.queries}
    assert len({q.text for q in splits.train.queries}) == 4510
    # 4,509 of the 4,510 train transcripts have an <answer>; 4 of those are not JSON: 4,505 teacher rewrites.
    assert splits.train.teacherless == {'answer is not JSON with a non-empty "query" string': 4, "no <answer> block": 1}
    assert sum(q.teacher is not None for q in splits.train.queries) == 4505
    assert all(q.teacher is None for q in splits.test.queries)
    assert splits.train.skipped == splits.val.skipped == splits.test.skipped == {}
    mean_targets = np.mean([len(q.target_ids) for q in splits.test.queries])
    assert mean_targets == pytest.approx(3.87, abs=0.005)  # SOURCE.md: mean 3.87 targets per test query


def test_a_teacher_transcript_parses_into_reasoning_and_both_rewrite_formats(splits):
    first = splits.train.queries[0]
    record = json.loads((RECR1 / "train.jsonl").open().readline())
    assert (first.text, first.target_ids) == (record["query"], tuple(record["target_asins"]))
    assert first.teacher.rewrite == "LED AND (race OR wire)"
    assert first.teacher.target("boolean") == "LED AND (race OR wire)"
    assert first.teacher.target("plain") == "led race wire"
    assert first.teacher.think.startswith('The original query "led race wire" consists of three distinct terms')
    # The prompt's own "<answer> </answer>" instruction is not the answer.
    assert " </answer>" in record["sft_text"].split("<|im_start|>assistant")[0]
    with pytest.raises(ValueError, match="rewrite format 'json'"):
        first.teacher.target("json")


def test_model_answers_are_read_without_ever_raising():
    assert rewrite_data.answer_query('<think>x</think>\n<answer>\n{\n  "query": "(a OR b) AND c"\n}\n</answer>') == \
        "(a OR b) AND c"
    assert rewrite_data.answer_query(rewrite_data.answer_text('women\'s "red" shoes')) == 'women\'s "red" shoes'
    assert rewrite_data.answer_query('<answer>{"query": "a"}</answer> <answer>{"query": "b"}</answer>') == "b"
    for broken in ("", "no tags", "<answer>{\"query\": \"a\"", '<answer>{"query": 3}</answer>',
                   '<answer>{"query": "  "}</answer>', "<answer>[1]</answer>", "<answer>{'query': 'a'}</answer>",
                   "<answer>\ud800</answer>"):
        assert rewrite_data.answer_query(broken) is None
    assert rewrite_data.plain_rewrite('(brand:Nike OR adidas) AND "running shoes" AND NOT kids') == \
        "nike adidas running shoes kids"


def test_a_transcript_of_another_query_is_a_bad_row_naming_file_line_and_field(tmp_path):
    record = json.loads((RECR1 / "train.jsonl").open().readline())
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "query": "led race cable"}) + "\n")
    with pytest.raises(esci.EsciFormatError, match=r"train.jsonl, row 2, field 'sft_text': the transcript's query "
                                                   r"'led race wire' is not the row's query 'led race cable'"):
        rewrite_data.read_queries(path, split="train")
    read = rewrite_data.read_queries(path, split="train", skip_bad_rows=True)
    assert [q.text for q in read.queries] == ["led race wire"]
    assert list(read.skipped.values()) == [1]


def test_a_test_query_in_the_training_file_is_an_error(tmp_path):
    test_row = json.loads((RECR1 / "test.jsonl").open().readline())
    train = tmp_path / "train.jsonl"
    train.write_text((RECR1 / "train.jsonl").open().readline() + json.dumps(test_row) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl: query 'oculus rift s' \(row 2 of those read\) is also a "
                                         r"test query .*would leak the test split"):
        rewrite_data.read_splits(train, RECR1 / "val.jsonl", RECR1 / "test.jsonl")


def test_the_pool_holds_every_titled_product_and_its_judgements(pool, splits):
    assert len(pool.products) == 480  # 464 graded-subset products and the Vespa sample's 16
    assert len(pool.title_conflicts) == 19  # one ASIN's US and Spanish titles
    assert all(product["title"] for product in pool.products)
    vespa = next(p for p in pool.products if p["brand"])
    assert vespa["bullets"] and vespa["color"] is not None
    # Independent count of the graded subset's Exact judgements.
    rows = [json.loads(line) for path in POOL_FILES for line in path.open()]
    exact = {(" ".join(r["query"].split()), r["product_id"]) for r in rows if r["esci_label"] == "E"}
    assert {(q, p) for q, judged in pool.judgements.items() for p, g in judged.items() if g == 3} == exact
    queries = rewrite_data.pool_queries(pool, [splits.train, splits.val, splits.test])
    assert len({q.text for q in queries}) == len(queries) == 172
    ids = pool.ids
    assert all(q.target_ids and set(q.target_ids) <= ids for q in queries)
    judged_only = {q for q, _ in exact}
    assert {q.text for q in queries if q.split == "pool"} <= judged_only
    by_split = {split: [q for q in queries if rewrite_data.pool_split(q.text, seed=0, rl_fraction=0.5) == split]
                for split in rewrite_data.POOL_SPLITS}
    assert (len(by_split["rl"]), len(by_split["test"])) == (88, 84)
    with pytest.raises(ValueError, match="rl_fraction = 1.5"):
        rewrite_data.pool_split("q", seed=0, rl_fraction=1.5)


def test_the_search_reward_on_real_rows_matches_an_independent_recall(pool, splits, tmp_path):
    engine = SearchEngine.build(pool.products, tmp_path / "index", extra_fields=rewrite_data.POOL_FIELDS)
    assert len(engine) == 480
    queries = sorted(rewrite_data.pool_queries(pool, [splits.val, splits.test]), key=lambda q: q.text)[:6]
    texts = [q.text for q in queries]
    contexts = [{"query": q.text, "purchased_product_ids": list(q.target_ids)} for q in queries]
    recall = rewards.r_conv(texts, contexts, engine=engine, k=10)
    for value, query in zip(recall, queries):
        top = [pid for pid, _ in engine.search(query.text, 10)]
        assert value == pytest.approx(len(set(top) & set(query.target_ids)) / len(query.target_ids))
    assert recall.mean() > 0.3  # the raw query finds its own Exact products in a 480-product pool
    # Every teacher rewrite of these val queries is searched with its own syntax, and r_rule passes it.
    teacher = [q for q in splits.val.queries if q.teacher][:20]
    assert all(engine.is_well_formed(q.teacher.rewrite) for q in teacher)
    rules = rewards.r_rule([q.teacher.rewrite for q in teacher], [{"query": q.text} for q in teacher], engine=engine,
                           max_words=64)
    assert rules.mean() >= 0.9
