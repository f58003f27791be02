"""TFDS builders for the synthetic world and for ESCI, written as array_record (no TensorFlow needed).

Files are array_record (the builders' default), read with `as_data_source`; `as_dataset` and `tfds.load`
would need TensorFlow. Prepare and read back::

    builder = SyntheticRelevance(config="small", data_dir=data_dir)
    builder.download_and_prepare()
    pairs = builder.as_data_source("train")  # random access; pairs[i] is a dict of numpy values

Text comes back as bytes. `SyntheticRewrite` has one config per part and size (`queries_small`,
`tags_small`, `catalogue_small`): the parts have different features and the same world config, so they
describe one world. `Esci` reads real files from a manual directory (see `MANUAL_DOWNLOAD_INSTRUCTIONS`)::

    Esci(config="graded_subset", data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=folder_with_the_files))

A custom world is a config too: `SyntheticRelevance(config=WorldBuilderConfig(name="mine",
world=WorldConfig(seed=3)), data_dir=...)`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from graphgrpo_jax.data import esci
from graphgrpo_jax.data.cot import LABELS, NODES, REWRITE_TAGS, format_attributes
from graphgrpo_jax.data.world import SPLITS, World, WorldConfig, build_world

# World sizes offered as configs: `micro` for tests, `small` for CPU runs, `base` for accelerators.
WORLD_SIZES: dict[str, WorldConfig] = {
    "micro": WorldConfig(products_per_type=16, num_queries=80, pairs_per_query=4, tags_per_query=3),
    "small": WorldConfig(),
    "base": WorldConfig(products_per_type=64, num_queries=10_000, pairs_per_query=8),
}
REWRITE_PARTS: tuple[str, ...] = ("queries", "tags", "catalogue")
CATALOGUE_SPLIT = "catalogue"

_TEXT = tfds.features.Text


@dataclasses.dataclass
class WorldBuilderConfig(tfds.core.BuilderConfig):
    """A TFDS config carrying the world it is generated from."""

    world: WorldConfig = WorldConfig()


@dataclasses.dataclass
class RewriteBuilderConfig(WorldBuilderConfig):
    part: str = "queries"  # one of REWRITE_PARTS


def _world(config: WorldBuilderConfig) -> World:
    return build_world(config.world)


class _PackagedBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the builders of this package (abstract, so TFDS does not register it).

    TFDS 4.9.10 finds a packaged builder's source through `importlib_resources`, a backport that is not
    installed on Python >= 3.9 (its own requirement stops at 3.8); naming the file here skips that lookup.
    """

    code_path = epath.Path(__file__)

    def __init__(self, *, file_format: str | None = "array_record", **kwargs):
        """array_record by default: the TFRecord default would need TensorFlow to read back."""
        super().__init__(file_format=file_format, **kwargs)


class SyntheticRelevance(_PackagedBuilder):
    """Query-product pairs with gold node values and (possibly corrupted) teacher chains of thought."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [WorldBuilderConfig(name=name, world=world) for name, world in WORLD_SIZES.items()]
    DEFAULT_BUILDER_CONFIG_NAME = "small"

    def _info(self) -> tfds.core.DatasetInfo:
        nodes = tfds.features.FeaturesDict({node: _TEXT() for node in NODES})
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic e-commerce relevance pairs (graphgrpo_jax.data.world).",
            features=tfds.features.FeaturesDict({
                "pair_id": _TEXT(), "query_id": _TEXT(), "product_id": _TEXT(),
                "query": _TEXT(), "product_title": _TEXT(),
                "label": tfds.features.ClassLabel(names=LABELS),
                "gold": nodes, "teacher": nodes, "teacher_cot": _TEXT(),
                "corrupted_node": _TEXT(),  # "" when the teacher is right
                "corruption_propagated": np.bool_,
            }))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        world = _world(self.builder_config)
        return {split: self._generate_examples(world, split) for split in SPLITS if world.split_pairs(split)}

    def _generate_examples(self, world: World, split: str) -> Iterator[tuple[str, dict]]:
        for pair in world.split_pairs(split):
            yield pair.pair_id, {
                "pair_id": pair.pair_id, "query_id": pair.query_id, "product_id": pair.product_id,
                "query": pair.query, "product_title": pair.product_title, "label": pair.label,
                "gold": pair.gold, "teacher": pair.teacher, "teacher_cot": pair.teacher_cot,
                "corrupted_node": pair.corrupted_node or "",
                "corruption_propagated": pair.corruption_propagated,
            }


class SyntheticRewrite(_PackagedBuilder):
    """Rewriting data: queries with gold rewrites and purchases, rewrite tags, and the catalogue."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [RewriteBuilderConfig(name=f"{part}_{name}", world=world, part=part)
                       for name, world in WORLD_SIZES.items() for part in REWRITE_PARTS]
    DEFAULT_BUILDER_CONFIG_NAME = "queries_small"

    def _info(self) -> tfds.core.DatasetInfo:
        part = self.builder_config.part
        if part == "queries":
            features = {"query_id": _TEXT(), "query": _TEXT(), "subject": _TEXT(), "attributes": _TEXT(),
                        "gold_rewrite": _TEXT(), "purchased_product_ids": tfds.features.Sequence(_TEXT())}
        elif part == "tags":
            features = {"tag_id": _TEXT(), "query_id": _TEXT(), "query": _TEXT(), "rewrite": _TEXT(),
                        "tag": tfds.features.ClassLabel(names=REWRITE_TAGS)}
        elif part == "catalogue":
            features = {"product_id": _TEXT(), "product_type": _TEXT(), "attributes": _TEXT(),
                        "title": _TEXT(), "pool": _TEXT()}
        else:
            raise ValueError(f"RewriteBuilderConfig.part must be one of {REWRITE_PARTS}, got {part!r}")
        return tfds.core.DatasetInfo(
            builder=self, description=f"Synthetic query rewriting data, part {part!r}.",
            features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        world = _world(self.builder_config)
        if self.builder_config.part == "catalogue":
            return {CATALOGUE_SPLIT: self._generate_examples(world, CATALOGUE_SPLIT)}
        return {split: self._generate_examples(world, split) for split in SPLITS if world.split_queries(split)}

    def _generate_examples(self, world: World, split: str) -> Iterator[tuple[str, dict]]:
        part = self.builder_config.part
        if part == "catalogue":
            for product in world.products:
                yield product.product_id, {
                    "product_id": product.product_id, "product_type": product.product_type,
                    "attributes": format_attributes(product.attributes), "title": product.title,
                    "pool": product.pool}
        elif part == "queries":
            for query in world.split_queries(split):
                yield query.query_id, {
                    "query_id": query.query_id, "query": query.text, "subject": query.subject,
                    "attributes": format_attributes(query.attributes), "gold_rewrite": query.gold_rewrite,
                    "purchased_product_ids": list(query.purchased_product_ids)}
        else:
            for tag in world.split_rewrite_tags(split):
                yield tag.tag_id, {"tag_id": tag.tag_id, "query_id": tag.query_id, "query": tag.query,
                                   "rewrite": tag.rewrite, "tag": tag.tag}


@dataclasses.dataclass
class EsciBuilderConfig(tfds.core.BuilderConfig):
    """Which files of the manual directory to read, and how."""

    layout: str = "official"  # official (examples parquet + products) | flat (pairs JSONL)
    examples_file: str = "shopping_queries_dataset_examples.parquet"
    products_file: str = "shopping_queries_dataset_products.parquet"  # official layout only
    teacher_cot_file: str = "teacher_cot.jsonl"  # joined by example_id when present
    locale: str | None = "us"  # official layout only; None keeps every locale
    test_fraction: float = 0.2
    skip_bad_rows: bool = False


class Esci(_PackagedBuilder):
    """Real ESCI query-product judgements, split train/test by query id."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        EsciBuilderConfig(name="official", description="The official Shopping Queries Dataset files."),
        EsciBuilderConfig(name="vespa_sample", examples_file="test-sample.parquet",
                          products_file="sample-products.jsonl",
                          description="The Vespa sample app's excerpt (official schema, Vespa products)."),
        EsciBuilderConfig(name="graded_subset", layout="flat", examples_file="esci_pairs.jsonl",
                          description="Flat JSON lines with query, product_title and esci_label/relevance."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "official"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put the files named by the config in the manual directory:
    - `official`: shopping_queries_dataset_examples.parquet and shopping_queries_dataset_products.parquet
      from https://github.com/amazon-science/esci-data (shopping_queries_dataset/).
    - `vespa_sample`: test-sample.parquet and sample-products.jsonl (decompressed) from
      vespa-engine/sample-apps, commerce-product-ranking/sample-data/.
    - `graded_subset`: esci_pairs.jsonl, one JSON object per line with query_id, query, product_id,
      product_title and esci_label (E/S/C/I) or relevance (3/2/1/0).
    Optionally add teacher_cot.jsonl, lines of {"example_id": ..., "cot": ...}, to join teacher chains of
    thought. Then: builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=<that directory>)).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Amazon Shopping Queries (ESCI) relevance judgements.",
            features=tfds.features.FeaturesDict({
                "example_id": _TEXT(), "query_id": _TEXT(), "query": _TEXT(), "product_id": _TEXT(),
                "product_title": _TEXT(), "label": tfds.features.ClassLabel(names=LABELS),
                "esci_split": _TEXT(), "teacher_cot": _TEXT(),  # "" when none was joined
            }),
            homepage="https://github.com/amazon-science/esci-data",
            citation="Reddy et al. 2022, Shopping Queries Dataset, arXiv:2206.06588",
            license="Apache-2.0",
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        folder = pathlib.Path(dl_manager.manual_dir)
        cot_path = folder / config.teacher_cot_file
        common = dict(test_fraction=config.test_fraction, skip_bad_rows=config.skip_bad_rows,
                      teacher_cot_path=cot_path if cot_path.is_file() else None)
        if config.layout == "official":
            data = esci.read_official(folder / config.examples_file, folder / config.products_file,
                                      locale=config.locale, **common)
        elif config.layout == "flat":
            data = esci.read_flat_jsonl(folder / config.examples_file, **common)
        else:
            raise ValueError(f"EsciBuilderConfig.layout must be 'official' or 'flat', got {config.layout!r}")
        self.info.metadata["skipped_rows"] = data.skipped
        # TFDS cannot write an empty split (a sample with one query fills only one).
        return {split: self._generate_examples(data, split) for split in esci.SPLITS if data.split(split)}

    def _generate_examples(self, data: esci.EsciData, split: str) -> Iterator[tuple[str, dict]]:
        for example in data.split(split):
            yield example.example_id, {
                "example_id": example.example_id, "query_id": example.query_id, "query": example.query,
                "product_id": example.product_id, "product_title": example.product_title,
                "label": example.label, "esci_split": example.esci_split,
                "teacher_cot": example.teacher_cot or ""}
