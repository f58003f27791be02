"""Stages of the query-rewriting pipeline (METHOD.md B): `index`, `rewrite_sft` and `rewrite_eval`.

The `rl` stage between them is the shared loop of `train/rl.py` with `config.task = "rewrite"`
(`rl/rewrite_task.py`).

* `index`: a BM25 index of the catalogue's titles in `<workdir>/index`, built once and reused.
* `rewrite_sft`: multi-task SFT, stage 1 of the paper. Two tasks share the model: rewrite generation
  (`query: … rewrite:` → the gold rewrite) and query-rewrite relevance tagging (`query: … rewrite: …
  tag:` → relevant | partial | irrelevant). Each batch mixes them by `config.rewrite_sft.task_mix`
  (1:1 by default; a zero weight gives single-task SFT). Rewrites have no CoT nodes, so nothing is
  masked. The policy is saved as stage `sft`, where the `rl` stage and its judge look for it.
* `rewrite_eval`: accuracy, recall@k and relevance@k (`eval/rewrite.py`) of each policy's greedy
  rewrites on held-out splits, next to the raw query and the gold rewrite, in
  `<workdir>/rewrite_eval/metrics.json`.
"""

from __future__ import annotations

import functools
import json
import os

import ml_collections
import numpy as np
from absl import logging

from graphgrpo_jax import artifacts
from graphgrpo_jax.data import batching, cot, prepare, world as world_lib
from graphgrpo_jax.eval import rewrite as rewrite_eval
from graphgrpo_jax.models import decoder
from graphgrpo_jax.rl import rewrite_task
from graphgrpo_jax.search.engine import MANIFEST, SearchEngine
from graphgrpo_jax.train import sft

SFT_TASKS = ("rewrite", "tag")


# ------------------------------------------------------------------------------------------- index


def build_index(config: ml_collections.ConfigDict, workdir: str) -> SearchEngine:
    """The `index` stage: the catalogue's search index, reused when an earlier run built it."""
    world = prepare.load_world(config)
    directory = artifacts.index_dir(workdir)
    if os.path.exists(os.path.join(directory, MANIFEST)):
        engine = SearchEngine.open(directory)
        if len(engine) != len(world.products):
            raise ValueError(f"{directory} indexes {len(engine)} products but the world of this config has "
                             f"{len(world.products)}: use a fresh workdir for a different world")
        return engine
    engine = SearchEngine.build([{"id": p.product_id, "title": p.title} for p in world.products], directory)
    logging.info("indexed %d products in %s", len(engine), directory)
    return engine


# --------------------------------------------------------------------------------------------- SFT


def sft_examples(world: world_lib.World, split: str, labelled_fraction: float = 1.0,
                 tagged_fraction: float | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """(prompts, responses) of each SFT task on a split's queries and rewrite tags; with
    `labelled_fraction` < 1, only the rewrites of the queries that have teacher labels
    (`rewrite_task.is_labelled`), and the tags of the `tagged_fraction` share (default: the same queries)."""
    if tagged_fraction is None:
        tagged_fraction = labelled_fraction
    if tagged_fraction < labelled_fraction:
        raise ValueError(f"config.rewrite_sft.tagged_fraction = {tagged_fraction} is below labelled_fraction = "
                         f"{labelled_fraction}: the tagged queries include the labelled ones")
    queries = [q for q in world.split_queries(split) if rewrite_task.is_labelled(q.query_id, labelled_fraction)]
    tags = [t for t in world.split_rewrite_tags(split) if rewrite_task.is_labelled(t.query_id, tagged_fraction)]
    return {
        "rewrite": ([cot.rewrite_prompt(q.text) for q in queries], [q.gold_rewrite for q in queries]),
        "tag": ([cot.tag_prompt(t.query, t.rewrite) for t in tags], [t.tag for t in tags]),
    }


def task_counts(task_mix: ml_collections.ConfigDict | dict, batch_size: int) -> dict[str, int]:
    """Rows of each SFT task per batch: `batch_size` split by the mix weights (largest remainder,
    ties to the earlier task), so every batch has the same composition."""
    unknown = sorted(set(task_mix) - set(SFT_TASKS))
    if unknown:
        raise ValueError(f"config.rewrite_sft.task_mix names unknown tasks {unknown}; tasks are {SFT_TASKS}")
    weights = np.array([float(task_mix.get(task, 0.0)) for task in SFT_TASKS])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"config.rewrite_sft.task_mix = {dict(task_mix)}: weights must be >= 0 with a positive sum")
    raw = weights / weights.sum() * batch_size
    counts = np.floor(raw).astype(int)
    for i in sorted(range(len(SFT_TASKS)), key=lambda i: (counts[i] - raw[i], i))[:batch_size - counts.sum()]:
        counts[i] += 1
    return dict(zip(SFT_TASKS, counts.tolist()))


def run_sft(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The `rewrite_sft` stage: multi-task SFT, saved as stage `sft` (the policy the RL stage starts from)."""
    cfg = config.rewrite_sft
    world, tokenizer = prepare.load_world(config), artifacts.load_tokenizer(config, workdir)
    counts = task_counts(cfg.task_mix, config.optim.batch_size)
    examples = sft_examples(world, "train", cfg.labelled_fraction, cfg.tagged_fraction)
    encoded = {task: batching.encode_sft(tokenizer, *examples[task], config.data.max_prompt_len,
                                         config.data.max_response_len, nodes=())
               for task in SFT_TASKS if counts[task]}
    for task, arrays in encoded.items():
        if not len(arrays["tokens"]):
            raise ValueError(f"config.rewrite_sft.task_mix gives task {task!r} weight but the world has "
                             f"no {task} examples in its train split")
    logging.info("rewrite SFT: %s rows per batch from %s examples", counts,
                 {task: len(arrays["tokens"]) for task, arrays in encoded.items()})
    # One table of both tasks' rows (padded to the same shapes), so a batch is a set of row indices that
    # each process can slice to the rows it loads.
    data = {k: np.concatenate([arrays[k] for arrays in encoded.values()]) for k in sft.BATCH_KEYS}
    offsets = dict(zip(encoded, np.cumsum([0] + [len(arrays["tokens"]) for arrays in encoded.values()])))

    def sample_rows(step: int) -> np.ndarray:
        rng = np.random.default_rng([config.seed, 1, step])
        rows = []
        for task, arrays in encoded.items():
            size = len(arrays["tokens"])
            rows.append(offsets[task] + rng.choice(size, counts[task], replace=counts[task] > size))
        return np.concatenate(rows)

    # No CoT nodes in these responses (node ids all -1) and no masking: every response token is trained.
    return sft.fit(config, workdir, data, sample_rows, cfg.num_steps, cfg.log_every, label_node=0, num_nodes=1,
                   p_mask=0.0, mask_unit="token")


# -------------------------------------------------------------------------------------------- eval


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The `rewrite_eval` stage: `{"<policy>/<split>": metrics}` for the raw query, the gold rewrite
    and each policy of `config.rewrite_eval.policies`, written to `<workdir>/rewrite_eval/metrics.json`."""
    cfg = config.rewrite_eval
    world, tokenizer = prepare.load_world(config), artifacts.load_tokenizer(config, workdir)
    engine = SearchEngine.open(artifacts.index_dir(workdir))
    model_config = decoder.DecoderConfig.from_config(config.model)
    queries = {split: world.split_queries(split)[:cfg.max_examples] for split in cfg.splits}
    policy = functools.cache(lambda stage: artifacts.policy_params(config, workdir, stage))  # each checkpoint read once
    # The r_rel judge (the SFT policy's tagging task, frozen), scored on every policy's rewrites.
    judge, tag_accuracies = None, {}
    if config.rewrite_sft.task_mix.get("tag", 0.0) > 0 and os.path.isdir(artifacts.checkpoint_dir(workdir, "sft")):
        judge = rewrite_task.tag_judge(config, workdir, policy("sft"))
        # Its accuracy on each split's labelled tag pairs (the world draws 3 tags per query).
        tag_accuracies = {split: rewrite_eval.tag_accuracy(judge, world.split_rewrite_tags(split)[:3 * len(qs)])
                          for split, qs in queries.items()}
    # The student retrieval judge, when RL used it, against the true relevance@k of the same rewrites.
    student, truths = None, {}
    if config.rewrite.judge == "student":
        student = rewrite_task.make_judge(config, world, workdir, engine, load_sft_params=None)
        truths = {split: rewrite_task.RetrievalJudge(engine, student.k, rewrite_task.rule_grader(world, qs))
                  for split, qs in queries.items()}
    results = {}
    for split, split_queries in queries.items():
        results[f"raw/{split}"] = rewrite_eval.rewrite_metrics(world, engine, split_queries,
                                                               [q.text for q in split_queries], cfg.k)
        results[f"gold/{split}"] = rewrite_eval.rewrite_metrics(world, engine, split_queries,
                                                                [q.gold_rewrite for q in split_queries], cfg.k)
    for stage in cfg.policies:
        params = policy(stage)
        for split, split_queries in queries.items():
            rewrites = rewrite_eval.generate_rewrites(
                params, model_config, tokenizer, [q.text for q in split_queries],
                max_prompt_len=config.data.max_prompt_len, max_new_tokens=config.data.max_response_len,
                batch_size=cfg.batch_size)
            results[f"{stage}/{split}"] = rewrite_eval.rewrite_metrics(world, engine, split_queries, rewrites, cfg.k)
            if judge is not None:
                results[f"{stage}/{split}"]["judge"] = {
                    "tag_accuracy": tag_accuracies[split],
                    **rewrite_eval.judge_metrics(judge, world, split_queries, rewrites)}
            if student is not None:
                results[f"{stage}/{split}"]["retrieval_judge"] = rewrite_eval.score_judge_metrics(
                    student, truths[split], split_queries, rewrites)
    for name, report in results.items():
        logging.info("%s: accuracy %.3f, recall@%d %.3f, relevance@%d %.3f", name, report["accuracy"],
                     cfg.k, report["recall"], cfg.k, report["relevance"])
    out_dir = os.path.join(workdir, "rewrite_eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results
