"""Stages of the query-rewriting pipeline (METHOD.md B): `index` and `rewrite_eval`.

The `rewrite_sft` and `rl` stages between them are the shared loops of `train/sft.py` and `train/rl.py`
with `config.task = "rewrite"` (`tasks/rewrite.py` gives them its SFT rows, prompts and rewards).

* `index`: a BM25 index of the catalogue's titles in `<workdir>/index`, built once and reused.
* `rewrite_sft` (`tasks/rewrite.sft_data`): multi-task SFT, stage 1 of the paper, saved as stage `sft`.
* `rewrite_eval`: accuracy, recall@k and relevance@k (`eval/rewrite.py`) of each policy's greedy
  rewrites on held-out splits, next to the raw query and the gold rewrite, in
  `<workdir>/rewrite_eval/metrics.json`.
"""

from __future__ import annotations

import functools
import json
import os

import ml_collections
from absl import logging

from graphgrpo_jax import artifacts
from graphgrpo_jax.data import prepare, rewrite_data
from graphgrpo_jax.eval import rewrite as rewrite_eval
from graphgrpo_jax.models import decoder
from graphgrpo_jax.tasks import rewrite as rewrite_task
from graphgrpo_jax.search.engine import MANIFEST, SearchEngine


# ------------------------------------------------------------------------------------------- index


def catalogue(config: ml_collections.ConfigDict) -> tuple[list[dict[str, str]], tuple[str, ...]]:
    """(products, extra text fields) the index holds: the world's titles, or the real pool's titles with their
    brand, colour and bullets (`rewrite_data.POOL_FIELDS`)."""
    if rewrite_task.source(config) == "esci":
        return list(rewrite_task.real_data(config).pool.products), rewrite_data.POOL_FIELDS
    return [{"id": p.product_id, "title": p.title} for p in prepare.load_world(config).products], ()


def build_index(config: ml_collections.ConfigDict, workdir: str) -> SearchEngine:
    """The `index` stage: the catalogue's search index, reused when an earlier run built it."""
    products, extra_fields = catalogue(config)
    directory = artifacts.index_dir(workdir)
    if os.path.exists(os.path.join(directory, MANIFEST)):
        engine = SearchEngine.open(directory)
        if len(engine) != len(products):
            raise ValueError(f"{directory} indexes {len(engine)} products but the catalogue of this config has "
                             f"{len(products)}: use a fresh workdir for a different catalogue")
        return engine
    engine = SearchEngine.build(products, directory, extra_fields=extra_fields)
    logging.info("indexed %d products in %s", len(engine), directory)
    return engine


# -------------------------------------------------------------------------------------------- eval


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The `rewrite_eval` stage: `{"<policy>/<split>": metrics}` for the raw query, the gold rewrite
    and each policy of `config.rewrite_eval.policies`, written to `<workdir>/rewrite_eval/metrics.json`."""
    real = rewrite_task.source(config) == "esci"
    results = run_real_eval(config, workdir) if real else _run_world_eval(config, workdir)
    out_dir = os.path.join(workdir, "rewrite_eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def run_real_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Real data: each pool split of `config.rewrite_eval.splits` ("test": never trained on; "rl": the queries
    GRPO trained on) for the raw query, the teacher's rewrite in both formats where the query files hold one
    (`teacher_boolean`, `teacher_plain`; their `num_examples` say how many), and each policy ("base" is the
    checkpoint before SFT: zero-shot)."""
    cfg = config.rewrite_eval
    data, tokenizer = rewrite_task.real_data(config), artifacts.load_tokenizer(config, workdir)
    engine = SearchEngine.open(artifacts.index_dir(workdir))
    model_config = decoder.DecoderConfig.from_config(config.model)
    queries = {split: list(data.pool_queries[split][:cfg.max_examples]) for split in cfg.splits}
    results = {}
    for split, split_queries in queries.items():
        results[f"raw/{split}"] = rewrite_eval.real_rewrite_metrics(data.pool, engine, split_queries,
                                                                    [q.text for q in split_queries], cfg.k)
        taught = [q for q in split_queries if q.text in data.teacher_rewrites]
        for fmt in rewrite_data.REWRITE_FORMATS if taught else ():  # the teacher's Boolean query and its words
            results[f"teacher_{fmt}/{split}"] = rewrite_eval.real_rewrite_metrics(
                data.pool, engine, taught, [data.teacher_rewrites[q.text].target(fmt) for q in taught], cfg.k)
    for stage in cfg.policies:
        params = artifacts.policy_params(config, workdir, stage)
        for split, split_queries in queries.items():
            rewrites = rewrite_eval.generate_rewrites(
                params, model_config, tokenizer, [q.text for q in split_queries],
                max_prompt_len=config.data.max_prompt_len, max_new_tokens=config.data.max_response_len,
                batch_size=cfg.batch_size, prompt_style=rewrite_task.prompt_style(config),
                rewrite_format=rewrite_task.rewrite_format(config))
            results[f"{stage}/{split}"] = rewrite_eval.real_rewrite_metrics(data.pool, engine, split_queries,
                                                                            rewrites, cfg.k)
    results["pool"] = {"products": len(data.pool.products), "title_conflicts": len(data.pool.title_conflicts),
                       **{f"{split}_queries": len(qs) for split, qs in data.pool_queries.items()}}
    for name, report in results.items():
        if name != "pool":
            logging.info("%s (%d queries): recall@%d %.3f, NDCG@%d %.3f, judged relevance@%d %.3f (%.2f judged), "
                         "format failures %.3f", name, report["num_examples"], cfg.k, report["recall"], cfg.k,
                         report["ndcg"], cfg.k, report["relevance_judged"], report["judged_share"],
                         report["format_failure_rate"])
    return results


def _run_world_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
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
    return results
