"""TFDS builders prepare array_record files and read them back without TensorFlow."""

import collections
import sys

import pytest
import tensorflow_datasets as tfds

from graphgrpo_jax.data import esci, tfds_builders
from graphgrpo_jax.data.cot import LABELS, REWRITE_TAGS, format_attributes
from graphgrpo_jax.data.world import WorldConfig, build_world


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def micro_world():
    return build_world(tfds_builders.WORLD_SIZES["micro"])


def prepared(builder):
    builder.download_and_prepare()
    return builder


def text(value: bytes) -> str:
    return value.decode("utf-8")


def test_synthetic_relevance_round_trip(data_dir, micro_world):
    builder = prepared(tfds_builders.SyntheticRelevance(config="micro", data_dir=data_dir))
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    for split in ("train", "test", "ood"):
        source = builder.as_data_source(split)
        pairs = {pair.pair_id: pair for pair in micro_world.split_pairs(split)}
        assert len(source) == len(pairs) > 0
        for record in source:
            pair = pairs[text(record["pair_id"])]
            assert LABELS[record["label"]] == pair.label
            assert {node: text(value) for node, value in record["gold"].items()} == pair.gold
            assert {node: text(value) for node, value in record["teacher"].items()} == pair.teacher
            assert text(record["teacher_cot"]) == pair.teacher_cot
            assert text(record["corrupted_node"]) == (pair.corrupted_node or "")
            assert bool(record["corruption_propagated"]) == pair.corruption_propagated
            assert (text(record["query"]), text(record["product_title"])) == (pair.query, pair.product_title)
    # A fresh builder on the same directory reads the prepared files.
    again = tfds_builders.SyntheticRelevance(config="micro", data_dir=data_dir)
    assert again.is_prepared() and len(again.as_data_source("train")) == len(micro_world.split_pairs("train"))


def test_prepared_files_are_byte_identical(data_dir, tmp_path):
    first = prepared(tfds_builders.SyntheticRelevance(config="micro", data_dir=data_dir))
    second = prepared(tfds_builders.SyntheticRelevance(config="micro", data_dir=tmp_path))
    names = sorted(path.name for path in first.data_path.glob("*.array_record*"))
    assert len(names) == 3  # one shard per split
    for name in names:
        assert (first.data_path / name).read_bytes() == (second.data_path / name).read_bytes()


def test_synthetic_rewrite_parts(data_dir, micro_world):
    queries = prepared(tfds_builders.SyntheticRewrite(config="queries_micro", data_dir=data_dir))
    for split in ("train", "test", "ood"):
        expected = {q.query_id: q for q in micro_world.split_queries(split)}
        source = queries.as_data_source(split)
        assert len(source) == len(expected)
        for record in source:
            query = expected[text(record["query_id"])]
            assert text(record["gold_rewrite"]) == query.gold_rewrite
            assert text(record["attributes"]) == format_attributes(query.attributes)
            assert tuple(map(text, record["purchased_product_ids"])) == query.purchased_product_ids
    tags = prepared(tfds_builders.SyntheticRewrite(config="tags_micro", data_dir=data_dir))
    records = list(tags.as_data_source("train"))
    assert collections.Counter(REWRITE_TAGS[r["tag"]] for r in records) == collections.Counter(
        t.tag for t in micro_world.split_rewrite_tags("train"))
    catalogue = prepared(tfds_builders.SyntheticRewrite(config="catalogue_micro", data_dir=data_dir))
    assert list(catalogue.info.splits) == [tfds_builders.CATALOGUE_SPLIT]
    products = {text(r["product_id"]): text(r["title"]) for r in catalogue.as_data_source("catalogue")}
    assert products == {p.product_id: p.title for p in micro_world.products}


def test_custom_world_config(data_dir):
    world_config = WorldConfig(products_per_type=6, num_queries=20, seed=7)
    config = tfds_builders.WorldBuilderConfig(name="tiny_seed7", world=world_config)
    builder = prepared(tfds_builders.SyntheticRelevance(config=config, data_dir=data_dir))
    assert len(builder.as_data_source("train")) == len(build_world(world_config).split_pairs("train"))


@pytest.mark.parametrize("config, folder, total, labels", [
    ("vespa_sample", "esci-vespa-sample", 16, {"Exact": 3, "Substitute": 6, "Irrelevant": 7}),
    ("graded_subset", "esci-graded-subset", 802,
     {"Exact": 239, "Substitute": 248, "Complement": 20, "Irrelevant": 295}),
])
def test_esci_from_manual_dir(shared_data, data_dir, config, folder, total, labels):
    builder = tfds_builders.Esci(config=config, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=shared_data / folder))
    records = [record for split in builder.info.splits for record in builder.as_data_source(split)]
    assert len(records) == total
    assert collections.Counter(LABELS[r["label"]] for r in records) == labels
    assert builder.info.metadata["skipped_rows"] == {}
    for split in builder.info.splits:  # the split follows the query id
        assert all(esci.query_split(text(r["query_id"]), 0.2) == split for r in builder.as_data_source(split))


def test_esci_without_files_says_what_is_missing(shared_data, data_dir, tmp_path):
    builder = tfds_builders.Esci(config="official", data_dir=data_dir)
    with pytest.raises(AssertionError, match="shopping_queries_dataset_examples.parquet"):  # the instructions
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=tmp_path))
    (tmp_path / "shopping_queries_dataset_examples.parquet").write_bytes(
        (shared_data / "esci-vespa-sample" / "test-sample.parquet").read_bytes())
    with pytest.raises(esci.EsciFormatError, match="shopping_queries_dataset_products.parquet: no such file"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=tmp_path))


def test_no_tensorflow_was_imported():
    assert "tensorflow" not in sys.modules
