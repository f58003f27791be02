"""The world's lexical gap is real: keyword search on raw queries misses what gold rewrites retrieve."""

import os
import sys

import pytest

from graphgrpo_jax.data import world as world_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import lexical_gap  # noqa: E402


@pytest.fixture(scope="module")
def world_and_engine(tmp_path_factory):
    world = world_lib.build_world(world_lib.WorldConfig(seed=3, num_queries=300, products_per_type=16))
    return world, lexical_gap.build_engine(world, str(tmp_path_factory.mktemp("gap") / "index"))


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_gold_rewrites_retrieve_what_raw_queries_miss(world_and_engine, split):
    raw, gold = lexical_gap.split_recalls(*world_and_engine, split, k=10)
    assert gold >= 0.85, gold
    assert raw <= gold - 0.3, (raw, gold)


def test_no_gap_without_colloquial_wording(tmp_path):
    """Control: when queries use catalogue words (no synonyms, typos or fillers), raw queries do as well."""
    world = world_lib.build_world(world_lib.WorldConfig(seed=3, num_queries=150, products_per_type=16,
                                                        synonym_rate=0.0, typo_rate=0.0, filler_rate=0.0))
    raw, gold = lexical_gap.split_recalls(world, lexical_gap.build_engine(world, str(tmp_path / "i")), "train", 10)
    assert raw >= gold - 0.15, (raw, gold)
