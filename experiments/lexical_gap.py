r"""The synthetic world's lexical gap: BM25 recall@k of purchased products, raw query vs gold rewrite.

  python experiments/lexical_gap.py                 # default world (seed 0)
  python experiments/lexical_gap.py --seed=1 --k=10

Query rewriting only has something to learn if keyword search on raw queries misses products that a
rewrite in catalogue vocabulary finds. This prints recall@k per split for both.
"""

import os
import tempfile

import numpy as np
from absl import app, flags

from graphgrpo_jax.data import world as world_lib
from graphgrpo_jax.search import engine as engine_lib

_SEED = flags.DEFINE_integer("seed", 0, "World seed.")
_K = flags.DEFINE_integer("k", 10, "Cut-off of recall@k.")


def split_recalls(world: world_lib.World, engine: engine_lib.SearchEngine, split: str, k: int
                  ) -> tuple[float, float]:
    """Mean recall@k of the split's purchased products for raw queries and for gold rewrites."""
    queries = [q for q in world.split_queries(split) if q.purchased_product_ids]

    def mean_recall(texts):
        hits = engine.search_batch(texts, k)
        return float(np.mean([engine_lib.recall_at_k([pid for pid, _ in h], q.purchased_product_ids, k)
                              for h, q in zip(hits, queries)]))

    return mean_recall([q.text for q in queries]), mean_recall([q.gold_rewrite for q in queries])


def build_engine(world: world_lib.World, directory: str) -> engine_lib.SearchEngine:
    return engine_lib.SearchEngine.build([{"id": p.product_id, "title": p.title} for p in world.products],
                                         directory)


def main(_):
    world = world_lib.build_world(world_lib.WorldConfig(seed=_SEED.value))
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(world, os.path.join(tmp, "index"))
        print(f"| split | queries | recall@{_K.value} raw query | recall@{_K.value} gold rewrite |")
        print("|---|---|---|---|")
        for split in world_lib.SPLITS:
            raw, gold = split_recalls(world, engine, split, _K.value)
            print(f"| {split} | {len(world.split_queries(split))} | {raw:.3f} | {gold:.3f} |")


if __name__ == "__main__":
    app.run(main)
