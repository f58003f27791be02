"""`data` stage: the synthetic world and the tokenizer every later stage reads from the workdir.

The world is a deterministic function of `config.world`, so later stages rebuild it (in about a second)
instead of parsing a file; `data/world.json` is written once for inspection and for other tools. The
tokenizer is a byte-level BPE trained on the world's text or, with `config.tokenizer.hf_checkpoint`, the
pretrained checkpoint's own tokenizer; either way the CoT tags are whole tokens, so node spans map onto
tokens exactly.
"""

from __future__ import annotations

import functools
import os

import ml_collections
from absl import logging

from graphgrpo_jax import artifacts, tokenization
from graphgrpo_jax.data import cot, world as world_lib


def size_with_node_tags(tokenizer) -> int:
    """How many tokens a checkpoint's tokenizer holds once this stage has added the CoT tags it lacks."""
    return len(tokenizer) + sum(tag not in tokenizer.get_vocab() for tag in cot.node_tags())


@functools.lru_cache(maxsize=4)
def _build_world(world_items: tuple) -> world_lib.World:
    return world_lib.build_world(dict(world_items))


def load_world(config: ml_collections.ConfigDict) -> world_lib.World:
    """The world of `config.world` (cached per config within a process)."""
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.world.to_dict().items()))
    return _build_world(items)


def corpus(world: world_lib.World) -> list[str]:
    """Every text the models will read or write, for tokenizer training."""
    texts = [p.title for p in world.products]
    texts += [q.text for q in world.queries] + [q.gold_rewrite for q in world.queries]
    texts += [cot.prompt_text(p.query, p.product_title) + " " + p.teacher_cot for p in world.pairs]
    texts += [cot.tag_prompt(t.query, t.rewrite) + " " + t.tag for t in world.rewrite_tags]
    return texts


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The `data` stage: the world (its JSON in `<workdir>/data`) and the policy tokenizer (`<workdir>/tokenizer`),
    the checkpoint's with the CoT tags added, or one trained on the world's texts. A run on real rows
    (`config.data.source = "esci"`) with a checkpoint tokenizer needs no world and builds none."""
    checkpoint = config.tokenizer.get("hf_checkpoint")
    needs_world = not (checkpoint and config.data.get("source", "world") != "world")
    os.makedirs(artifacts.data_dir(workdir), exist_ok=True)
    world_path = os.path.join(artifacts.data_dir(workdir), "world.json")
    if needs_world and not os.path.exists(world_path):
        with open(world_path + ".tmp", "w") as f:
            f.write(load_world(config).to_json())
        os.replace(world_path + ".tmp", world_path)
    if not os.path.exists(os.path.join(artifacts.tokenizer_dir(workdir), "tokenizer.json")):
        if checkpoint:
            tokenizer = tokenization.checkpoint_tokenizer(checkpoint, artifacts.tokenizer_dir(workdir), cot.node_tags())
            logging.info("the %d-token tokenizer of %s, with the CoT tags added, in %s", len(tokenizer),
                         checkpoint, artifacts.tokenizer_dir(workdir))
        else:
            tokenizer = tokenization.train_tokenizer(corpus(load_world(config)), config.tokenizer.vocab_size,
                                                     artifacts.tokenizer_dir(workdir),
                                                     extra_special_tokens=cot.node_tags())
            logging.info("trained a %d-token tokenizer in %s", len(tokenizer), artifacts.tokenizer_dir(workdir))
    artifacts.load_tokenizer(config, workdir)  # fail now, not three stages later, when it does not fit the model
    if needs_world:
        world = load_world(config)
        logging.info("world: %d products, %d queries, %d relevance pairs, %d rewrite tags", len(world.products),
                     len(world.queries), len(world.pairs), len(world.rewrite_tags))
