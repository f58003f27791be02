"""Relevance examples from the synthetic world and from the real ESCI rows: splits, product text, teachers."""

import collections
import hashlib
import json

import pytest

from graphgrpo_jax.data import cot, esci, teacher
from graphgrpo_jax.data import examples as ex
from graphgrpo_jax.data.world import SPLITS as WORLD_SPLITS
from graphgrpo_jax.data.world import WorldConfig, build_world

GRADED_ROWS, GRADED_QUERIES = 802, 294


def _pairs_file(shared_data, folder: str):
    path = shared_data / folder / "esci_pairs.jsonl"
    if not path.is_file():
        pytest.skip(f"ESCI rows not found beside the repo: {path}")
    return path


@pytest.fixture(scope="module")
def graded(shared_data):
    return _pairs_file(shared_data, "esci-graded-subset")


@pytest.fixture(scope="module")
def vespa_pairs(shared_data):
    """ESCI rows with product text (description, bullets)."""
    return _pairs_file(shared_data, "esci-vespa-sample")


@pytest.fixture(scope="module")
def rule_set(graded):
    return ex.esci_examples(graded)


def esci_row(**changes):
    fields = {"example_id": "1", "query_id": "7", "query": "red nike shoes", "product_id": "p1",
              "product_title": "Nike  Running\nShoe", "label": "Exact", "split": "train"}
    return esci.EsciExample(**{**fields, **changes})


# --------------------------------------------------------------------------------------------------
# The synthetic world
# --------------------------------------------------------------------------------------------------

def test_world_examples_reproduce_the_pair_prompts_and_targets():
    world = build_world(WorldConfig(products_per_type=6, num_queries=60, corrupt_cot_share=0.5))
    seen = 0
    for split in WORLD_SPLITS:
        pairs, examples = world.split_pairs(split), ex.world_examples(world, split)
        assert len(examples) == len(pairs)
        seen += len(pairs)
        for pair, example in zip(pairs, examples):
            assert example.prompt() == cot.prompt_text(pair.query, pair.product_title)
            for position in ("last", "first"):
                assert example.target(position) == cot.render(pair.teacher, label_position=position)
            assert example.target() == pair.teacher_cot
            assert (example.example_id, example.query_id, example.split, example.label) == (
                pair.pair_id, pair.query_id, split, pair.label)
            assert example.gold_nodes == pair.gold and not example.label_only
    assert seen == len(world.pairs) and ex.world_examples(world, "train")
    # The world corrupts some teacher chains: examples keep the teacher's nodes apart from the gold ones.
    assert any(e.nodes != e.gold_nodes for e in ex.world_examples(world, "train"))
    with pytest.raises(ValueError, match="unknown world split 'val'"):
        ex.world_examples(world, "val")


def test_an_example_needs_a_known_label():
    with pytest.raises(ValueError, match="label 'Exakt'"):
        ex.RelevanceExample("e", "q", "query", "title", "Exakt", "train")


# --------------------------------------------------------------------------------------------------
# Splitting by query
# --------------------------------------------------------------------------------------------------

def _split(query_id, seed=0):
    return ex.query_split(query_id, seed=seed, val_fraction=0.1, test_fraction=0.2)


def test_query_split_is_the_documented_hash_and_depends_on_the_seed(graded):
    query_ids = sorted({e.query_id for e in esci.read_flat_jsonl(graded).examples})
    assert len(query_ids) == GRADED_QUERIES
    for query_id in query_ids:  # an independent reading of the documented rule
        position = int(hashlib.sha256(f"0:{query_id}".encode()).hexdigest()[:16], 16) / 16**16
        expected = "test" if position < 0.2 else "val" if position < 0.3 else "train"
        assert _split(query_id) == expected == _split(query_id)
    shares = collections.Counter(_split(q) for q in query_ids)
    assert 0.13 <= shares["test"] / GRADED_QUERIES <= 0.27 and 0.05 <= shares["val"] / GRADED_QUERIES <= 0.16
    moved = sum(_split(q) != _split(q, seed=1) for q in query_ids)
    assert moved > 0.2 * GRADED_QUERIES
    assert {ex.query_split(q, seed=0, val_fraction=0, test_fraction=0) for q in query_ids} == {"train"}


def test_no_query_in_two_splits(rule_set):
    splits_of = collections.defaultdict(set)
    for example in rule_set.examples:
        splits_of[example.query_id].add(example.split)
    assert len(splits_of) == GRADED_QUERIES and all(len(s) == 1 for s in splits_of.values())
    assert all(rule_set.split(name) for name in ex.SPLITS)


@pytest.mark.parametrize("val, test, problem", [(-0.1, 0.2, "val_fraction must be a number >= 0"),
                                                (0.1, float("nan"), "test_fraction must be a number >= 0"),
                                                (0.5, 0.5, "must be < 1"), (0.1, "0.2", "test_fraction")])
def test_bad_fractions(val, test, problem):
    with pytest.raises(ValueError, match=problem):
        ex.query_split("1", seed=0, val_fraction=val, test_fraction=test)


# --------------------------------------------------------------------------------------------------
# Product text
# --------------------------------------------------------------------------------------------------

def test_product_text_formats_the_configured_fields_in_order():
    row = esci_row(product_brand="Nike", product_color="",
                   product_description="<b>Light</b> &amp; <br>fast", product_bullet_point="  cushioned\n sole ")
    assert ex.product_text(row, ("title",)) == "Nike Running Shoe"
    assert ex.product_text(row, ("title", "brand", "color")) == "Nike Running Shoe | brand: Nike"  # empty colour left out
    assert ex.product_text(row, ["bullets", "title", "description"]) == (
        "bullets: cushioned sole | Nike Running Shoe | description: Light & fast")


@pytest.mark.parametrize("fields, error, problem", [
    (("title", "size"), ValueError, r"unknown product fields \['size'\]; allowed: \['title', 'brand'"),
    (("brand",), ValueError, "must include 'title'"),
    (("title", "title"), ValueError, "repeat"),
    ("title", TypeError, "got the string 'title'"),
])
def test_product_text_errors(fields, error, problem):
    with pytest.raises(error, match=problem):
        ex.product_text(esci_row(), fields)


def test_esci_reader_keeps_description_and_bullets(vespa_pairs, tmp_path):
    rows = [json.loads(line) for line in vespa_pairs.read_text().splitlines() if line.strip()]
    read = esci.read_flat_jsonl(vespa_pairs).examples
    assert [e.product_description for e in read] == [r.get("product_description") or "" for r in rows]
    assert [e.product_bullet_point for e in read] == [r.get("product_bullet_point") or "" for r in rows]
    assert any(e.product_description for e in read) and any(e.product_bullet_point for e in read)
    folder = vespa_pairs.parent
    official = esci.read_official(folder / "test-sample.parquet", folder / "sample-products.jsonl").examples
    assert any(e.product_description and e.product_bullet_point for e in official)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"query_id": 1, "query": "q", "product_id": "p", "product_title": "t",
                                "esci_label": "E", "product_bullets": "soft"}) + "\n"
                    + json.dumps({"query_id": 1, "query": "q", "product_id": "p2", "product_title": "t",
                                  "esci_label": "I"}) + "\n")
    assert [(e.product_bullet_point, e.product_description) for e in esci.read_flat_jsonl(path).examples] == [
        ("soft", ""), ("", "")]
    texts = ex.esci_examples(vespa_pairs, product_fields=("title", "brand", "bullets"))
    assert all(" | brand: " in e.product_text and " | bullets: " in e.product_text for e in texts.examples)


# --------------------------------------------------------------------------------------------------
# ESCI examples and their teachers
# --------------------------------------------------------------------------------------------------

def test_rule_teacher_gives_every_real_row_a_valid_chain(graded, rule_set):
    counts = rule_set.counts
    assert counts["rows"] == GRADED_ROWS and counts["skipped"] == 0
    assert counts["kept"] + counts["dropped"] == counts["rows"]
    assert counts["joined"] + counts["without_teacher"] + counts["label_disagrees"] == counts["rows"]
    assert sum(counts[name] for name in ex.SPLITS) == counts["kept"] == len(rule_set.examples)
    assert {name: len(rule_set.split(name)) for name in ex.SPLITS} == {name: counts[name] for name in ex.SPLITS}
    # The rule teacher picks its match nodes so that they give the human label: it never disagrees.
    assert (counts["joined"], counts["label_only"], counts["label_disagrees"]) == (GRADED_ROWS, 0, 0)
    assert 0 < counts["rule_against_evidence"] < GRADED_ROWS
    by_id = {e.example_id: e for e in esci.read_flat_jsonl(graded).examples}
    for example in rule_set.examples:
        assert teacher.check_nodes(example.nodes) is None and example.nodes["y"] == example.label
        source = by_id[example.example_id]
        assert (example.label, example.query, example.product_text) == (source.label, source.query,
                                                                        source.product_title)
        assert example.prompt() == cot.prompt_text(source.query, source.product_title)
        assert example.split == _split(source.query_id)
    assert ex.esci_examples(graded, missing="drop").examples == rule_set.examples  # nothing to drop
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        rule_set.split("dev")


def test_without_a_teacher_every_row_is_label_only(graded):
    label_only = ex.esci_examples(graded, teacher="none")
    assert label_only.counts["label_only"] == label_only.counts["without_teacher"] == GRADED_ROWS
    assert all(e.nodes is None and e.target() is None for e in label_only.examples)
    with pytest.raises(ValueError, match="no examples left"):
        ex.esci_examples(graded, teacher="none", missing="drop")


def test_teacher_file_is_joined_by_example_id(graded, tmp_path):
    rows = esci.read_flat_jsonl(graded).examples
    agree, also_agree, disagree = rows[0], rows[1], next(e for e in rows if e.label == "Irrelevant")
    nodes_by_id = {e.example_id: teacher.rule_teacher(e.query, e.product_title, e.label) for e in (agree, also_agree)}
    nodes_by_id[disagree.example_id] = teacher.rule_teacher(disagree.query, disagree.product_title, "Exact")
    nodes_by_id["not-a-row"] = teacher.rule_teacher("q", "t", "Exact")
    path = tmp_path / "teacher.jsonl"
    teacher.write_teacher_file(path, nodes_by_id, "hand")

    kept = ex.esci_examples(graded, teacher=path)
    assert {k: kept.counts[k] for k in ("joined", "label_disagrees", "without_teacher", "dropped", "kept",
                                        "teacher_ids_unused", "label_only")} == {
        "joined": 2, "label_disagrees": 1, "without_teacher": GRADED_ROWS - 3, "dropped": 0, "kept": GRADED_ROWS,
        "teacher_ids_unused": 1, "label_only": GRADED_ROWS - 2}
    with_nodes = {e.example_id: e.nodes for e in kept.examples if not e.label_only}
    assert with_nodes == {e.example_id: nodes_by_id[e.example_id] for e in (agree, also_agree)}
    assert next(e for e in kept.examples if e.example_id == disagree.example_id).label == "Irrelevant"

    dropped = ex.esci_examples(graded, teacher=str(path), missing="drop")
    assert dropped.counts["dropped"] == GRADED_ROWS - 2 and dropped.counts["kept"] == 2
    assert [e.example_id for e in dropped.examples] == [agree.example_id, also_agree.example_id]
    assert sum(dropped.counts[name] for name in ex.SPLITS) == 2


def test_bad_arguments_are_named(graded, tmp_path):
    with pytest.raises(ValueError, match=r"teacher must be one of \('rule', 'none'\).*no such file: 'rules'"):
        ex.esci_examples(graded, teacher="rules")
    absent = tmp_path / "absent-teacher.jsonl"
    with pytest.raises(ValueError, match=str(absent)):
        ex.esci_examples(graded, teacher=absent)
    with pytest.raises(TypeError, match="teacher must be"):
        ex.esci_examples(graded, teacher=None)
    with pytest.raises(ValueError, match="missing must be one of"):
        ex.esci_examples(graded, missing="keep")
    with pytest.raises(ValueError, match="unknown product fields"):
        ex.esci_examples(graded, product_fields=("title", "price"))
    with pytest.raises(ValueError, match="must be < 1"):
        ex.esci_examples(graded, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(esci.EsciFormatError, match="no such file"):
        ex.esci_examples(tmp_path / "absent.jsonl")
