"""The rewrite task (METHOD.md B): prompts → G rewrites → fused reward, outcome credit.

A rewrite has no chain of thought, so the task plugs into the shared RL loop as a one-node graph whose
root is the rewrite itself: every completion token gets the rollout's group-relative advantage (plain
GRPO, `credit.variant = "outcome"`). The reward fuses three signals (`rewards.rewrite_reward_components`):

* `r_rule`: the rewrite is well formed, not a copy, within length bounds, not repetitive;
* `r_conv`: search-engine feedback, recall@k (or NDCG@k) of the query's purchases among the products
  the engine retrieves for the rewrite;
* `r_rel`: a relevance judge (`config.rewrite.judge`). Two kinds:
  - judges of the rewrite's words: the policy's own tagging task (`cot.tag_prompt`) on a frozen copy of
    the SFT model (`TagJudge`, "tagger"); for ablations, the world's tagging rule (`RuleJudge`, "rule",
    an oracle);
  - judges of what the rewrite retrieves (`RetrievalJudge`): the graded relevance to the *original* query
    of the engine's top k products for the rewrite, by the distilled relevance student of paper A
    ("student"); for ablations, by the world's label rule ("retrieval_rule", an oracle of the offline
    relevance@k itself).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from graphgrpo_jax import artifacts
from graphgrpo_jax.data import batching, cot, esci, prepare, rewrite_data, world as world_lib
from graphgrpo_jax.data import prompts as prompts_lib
from graphgrpo_jax.models import decoder, encoder
from graphgrpo_jax.rl import rewards as rewards_lib
from graphgrpo_jax.rl.rollout import Scored
from graphgrpo_jax.search.engine import Retriever, SearchEngine
from graphgrpo_jax.tasks import SftData, register_task

SFT_TASKS = ("rewrite", "tag")  # the two tasks of multi-task rewrite SFT


@functools.partial(jax.jit, static_argnums=1)
def tag_log_probs(params: decoder.Params, model_config: decoder.DecoderConfig, prompt_tokens: jax.Array,
                  prompt_mask: jax.Array, tag_tokens: jax.Array, tag_mask: jax.Array) -> jax.Array:
    """`[B, K]` log p(tag k, then EOS | prompt b) by forced decoding.

    `prompt_tokens` / `prompt_mask` are `[B, P]`, left-padded; `tag_tokens` / `tag_mask` are `[K, C]`,
    each tag's tokens and EOS, right-padded. Every (prompt, tag) row is scored in one forward pass.
    """
    num_prompts, prompt_len = prompt_tokens.shape
    num_tags = tag_tokens.shape[0]
    tokens = jnp.concatenate([jnp.repeat(prompt_tokens, num_tags, axis=0),
                              jnp.tile(tag_tokens, (num_prompts, 1))], axis=1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, num_tags, axis=0),
                            jnp.tile(tag_mask, (num_prompts, 1))], axis=1)
    # Zero on padding already: the sum runs over each tag's own tokens only.
    logp = decoder.token_log_probs(params, model_config, tokens, mask)[:, prompt_len:]
    return logp.sum(axis=1).reshape(num_prompts, num_tags)


class TagJudge:
    """`judge(queries, rewrites) -> [M, 3]`: the model's distribution over `cot.REWRITE_TAGS`.

    Each tag is scored as the whole response `tag<eos>` after `cot.tag_prompt(query, rewrite)` and the
    scores are normalised over the tags, so the probabilities are those of the complete answers the
    tagging task was trained to give. The params are copied, so the judge stays frozen while the policy
    it came from trains (the RL loop donates the policy's buffers). Pairs run in fixed-size chunks, so
    `tag_log_probs` compiles once.
    """

    def __init__(self, params: decoder.Params, model_config: decoder.DecoderConfig, tokenizer: Any, *,
                 max_prompt_len: int, batch_size: int, tags: Sequence[str] = cot.REWRITE_TAGS,
                 prompt_style: str = "plain"):
        if batch_size < 1:
            raise ValueError(f"judge batch_size must be >= 1, got {batch_size}")
        self.params = jax.tree_util.tree_map(jnp.copy, params)
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_prompt_len = max_prompt_len
        self.batch_size = batch_size
        self.prompt_style = prompt_style
        eos = tokenizer.eos_token_id
        responses = [tokenizer(tag, add_special_tokens=False)["input_ids"] + [eos] for tag in tags]
        width = max(len(ids) for ids in responses)
        self.tag_tokens = np.full((len(tags), width), tokenizer.pad_token_id, np.int32)
        self.tag_mask = np.zeros((len(tags), width), bool)
        for k, ids in enumerate(responses):
            self.tag_tokens[k, :len(ids)] = ids
            self.tag_mask[k, :len(ids)] = True

    def log_probs(self, queries: Sequence[str], rewrites: Sequence[str]) -> np.ndarray:
        """`[M, K]` log p(tag<eos> | tag prompt), unnormalised over tags."""
        if len(queries) != len(rewrites):
            raise ValueError(f"{len(queries)} queries but {len(rewrites)} rewrites")
        prompts = prompts_lib.tag_prompts(self.tokenizer, queries, rewrites, style=self.prompt_style)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            encoded = batching.encode_prompts(self.tokenizer, padded, self.max_prompt_len, truncate_prompts=True)
            scores.append(np.asarray(tag_log_probs(
                self.params, self.model_config, jnp.asarray(encoded["tokens"]),
                jnp.asarray(encoded["attention_mask"], bool), jnp.asarray(self.tag_tokens),
                jnp.asarray(self.tag_mask)))[:len(chunk)])
        return np.concatenate(scores) if scores else np.zeros((0, len(self.tag_tokens)), np.float32)

    def __call__(self, queries: Sequence[str], rewrites: Sequence[str]) -> np.ndarray:
        scores = self.log_probs(queries, rewrites).astype(np.float64)
        scores -= scores.max(axis=1, keepdims=True)
        return np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)


class RuleJudge:
    """An oracle `r_rel` judge for ablations: the world's tagging rule (`world.true_tag`), one-hot.

    It reads the gold intent of each training query, so it is not a method. It bounds what a perfect
    relevance judge could add to the fused reward, which separates the reward's design from the quality
    of the learned judge.
    """

    def __init__(self, world):
        self.world = world
        self.queries = {q.text: q for q in world.split_queries("train")}

    def __call__(self, queries: Sequence[str], rewrites: Sequence[str]) -> np.ndarray:
        tags = [world_lib.true_tag(self.world, self.queries[query], rewrite)
                for query, rewrite in zip(queries, rewrites)]
        return np.eye(len(cot.REWRITE_TAGS))[[cot.REWRITE_TAGS.index(tag) for tag in tags]]


# `grade(queries, product_ids) -> [N]`: expected relevance grades in [0, 3] of (query, product) pairs.
Grader = Callable[[Sequence[str], Sequence[str]], np.ndarray]


class RetrievalJudge:
    """`judge(queries, rewrites) -> [M]`: the mean relevance grade, scaled to [0, 1], of the `k` products the
    engine retrieves for each rewrite, graded against the *original* query.

    `grade(queries, product_ids) -> [N]` expected grades in [0, 3] (`world.RELEVANCE_GRADES`). An
    empty slot, when the engine finds fewer than k products, counts 0, as in the offline relevance@k, so a
    rewrite that retrieves nothing earns nothing. Why a judge of retrieved products rather than of words:
    a tagger of (query, rewrite) pairs sees only the tag data, and the policy learns to write rewrites it
    overrates (experiments/README.md); the products a rewrite retrieves are what the user sees. Grades
    are cached per (query, product), since GRPO revisits its queries and a group's rewrites share hits.
    """

    def __init__(self, engine: Retriever, k: int, grade: Grader):
        if k < 1:
            raise ValueError(f"retrieval judge k must be >= 1, got {k}")
        self.engine, self.k, self.grade = engine, k, grade
        self.cache: dict[tuple[str, str], float] = {}

    def __call__(self, queries: Sequence[str], rewrites: Sequence[str]) -> np.ndarray:
        if len(queries) != len(rewrites):
            raise ValueError(f"{len(queries)} queries but {len(rewrites)} rewrites")
        hits = self.engine.search_batch(list(rewrites), self.k)
        pairs = [[(query, product_id) for product_id, _ in row_hits[:self.k]]
                 for query, row_hits in zip(queries, hits)]
        new = list(dict.fromkeys(pair for row in pairs for pair in row if pair not in self.cache))
        if new:
            grades = np.asarray(self.grade([q for q, _ in new], [p for _, p in new]), np.float64)
            self.cache.update(zip(new, grades))
        return np.array([sum(self.cache[pair] for pair in row) / (3.0 * self.k) for row in pairs])


def rule_grader(world, queries: Sequence[Any] | None = None) -> Grader:
    """`grade(queries, product_ids)` by the world's label rule on the gold intents of `queries` (default: the
    training queries), looked up by text: an oracle."""
    by_text = {q.text: q for q in (world.split_queries("train") if queries is None else queries)}

    def grade(queries: Sequence[str], product_ids: Sequence[str]) -> np.ndarray:
        return np.array([world_lib.relevance_grade(world, by_text[q].subject, by_text[q].attributes,
                                                      world.product_by_id[p]) for q, p in zip(queries, product_ids)])

    return grade


def student_grader(params, encoder_config, tokenizer, titles: Mapping[str, str], *, max_length: int,
                   batch_size: int) -> Grader:
    """`grade(queries, product_ids)`: the expected grade under the relevance student's label head (the
    cross-encoder of paper A's distillation), on (query, product title) pairs; `titles`: product id -> title."""
    grades = np.array([world_lib.RELEVANCE_GRADES[label] for label in cot.LABELS], np.float64)

    def grade(queries: Sequence[str], product_ids: Sequence[str]) -> np.ndarray:
        probs = encoder.head_probabilities(params, encoder_config, tokenizer, list(queries),
                                           [titles[p] for p in product_ids],
                                           max_length=max_length, batch_size=batch_size)
        return probs[cot.LABEL_NODE].astype(np.float64) @ grades

    return grade


JUDGES = ("tagger", "rule", "student", "retrieval_rule")
WORLD_ONLY_JUDGES = ("rule", "retrieval_rule")  # oracles that read the synthetic world's gold intents
RL_QUERIES = ("all", "unlabelled")  # `rewrite.rl_queries`: the queries GRPO trains on


def source(config: ml_collections.ConfigDict) -> str:
    """Where the rewrite task's queries come from: "world" (synthetic) or "esci" (real, `config.rewrite_data`)."""
    return config.data.get("source", "world")


def prompt_style(config: ml_collections.ConfigDict) -> str:
    return config.data.get("prompt_style", "plain")


def rewrite_format(config: ml_collections.ConfigDict) -> str:
    return config.rewrite_data.rewrite_format if source(config) == "esci" else "plain"


def tag_judge(config: ml_collections.ConfigDict, workdir: str, params: decoder.Params) -> TagJudge:
    """The tagging task of `params` as a judge, its prompts as wide as a query plus a rewrite can be: the r_rel
    judge of RL, and the one `rewrite_eval` scores."""
    return TagJudge(params, decoder.DecoderConfig.from_config(config.model), artifacts.load_tokenizer(config, workdir),
                    max_prompt_len=config.data.max_prompt_len + config.data.max_response_len,
                    batch_size=config.rewrite.judge_batch_size, prompt_style=prompt_style(config))


def product_titles(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Product id -> title of the catalogue the index holds: the world's products or the real pool."""
    if source(config) == "esci":
        return {product["id"]: product["title"] for product in real_data(config).pool.products}
    return {product.product_id: product.title for product in prepare.load_world(config).products}


def make_judge(config: ml_collections.ConfigDict, world, workdir: str, engine: Retriever,
               load_sft_params: Callable[[], decoder.Params]) -> rewards_lib.Judge:
    """The r_rel judge `config.rewrite.judge` names; the tagger reads the SFT policy from `load_sft_params()`."""
    cfg = config.rewrite
    if cfg.judge in WORLD_ONLY_JUDGES and world is None:
        raise ValueError(f"config.rewrite.judge = {cfg.judge!r} is an oracle of the synthetic world's gold intents; "
                         f"with config.data.source = {source(config)!r} choose 'tagger' or 'student'")
    if cfg.judge == "tagger":
        return tag_judge(config, workdir, load_sft_params())
    if cfg.judge == "rule":
        return RuleJudge(world)
    if cfg.judge == "retrieval_rule":
        return RetrievalJudge(engine, cfg.k, rule_grader(world))
    student = artifacts.student_params(config, cfg.student_workdir or workdir)
    return RetrievalJudge(engine, cfg.k, student_grader(
        student, artifacts.student_config(), encoder.load_pair_tokenizer(encoder.minilm_folder()),
        product_titles(config), max_length=config.distill.max_length, batch_size=cfg.judge_batch_size))


def is_labelled(query_id: str, labelled_fraction: float) -> bool:
    """Whether a training query has a teacher rewrite for SFT: a stable `labelled_fraction` share of the
    query ids, by hash (paper B's setting: teacher labels are scarce, search feedback is not)."""
    if not 0.0 < labelled_fraction <= 1.0:
        raise ValueError(f"config.rewrite_sft.labelled_fraction = {labelled_fraction}: must be in (0, 1]")
    # `query_split` puts a `test_fraction` share of ids, by hash, in "test": here, the unlabelled share.
    return esci.query_split(query_id, 1.0 - labelled_fraction) == "train"


# ------------------------------------------------------------------------------------------ real data


@dataclasses.dataclass(frozen=True)
class RealData:
    """The real rewrite data of `config.rewrite_data`: the query files' splits, the product pool, and the pool
    queries (those with an Exact product in the pool) split into "rl" (GRPO trains on them; every query of the
    training file is here) and "test" (never trained on: not in the training file, no teacher row used)."""

    splits: rewrite_data.RewriteSplits
    pool: rewrite_data.ProductPool
    pool_queries: dict[str, tuple[rewrite_data.RewriteQuery, ...]]  # "rl" | "test" -> queries
    teacher_rewrites: dict[str, rewrite_data.TeacherRewrite]  # query -> the teacher's, for the eval's teacher arm only


@functools.cache
def _real_data(train: str, val: str, test: str, pool_paths: tuple[str, ...], skip_bad_rows: bool, seed: int,
               rl_fraction: float) -> RealData:
    splits = rewrite_data.read_splits(train, val, test, skip_bad_rows=skip_bad_rows)
    pool = rewrite_data.read_pool(pool_paths)
    queries = rewrite_data.pool_queries(pool, [splits.train, splits.val, splits.test])
    split_of = {q.text: "rl" if q.split == "train" else rewrite_data.pool_split(q.text, seed=seed, rl_fraction=rl_fraction)
                for q in queries}
    # The val file's teacher rows of test queries are dropped from every split; the eval reads them as the
    # teacher arm (the ceiling a copy of the teacher reaches), and nothing trains on them.
    rows = (*splits.train.queries, *splits.val.queries, *splits.val_test_rows)
    teacher = {q.text: q.teacher for q in rows if q.teacher}
    return RealData(splits, pool, {name: tuple(q for q in queries if split_of[q.text] == name)
                                   for name in rewrite_data.POOL_SPLITS}, teacher)


def real_data(config: ml_collections.ConfigDict) -> RealData:
    """`config.rewrite_data`'s files read (once per process) and split."""
    cfg = config.rewrite_data
    return _real_data(cfg.train_path, cfg.val_path, cfg.test_path, tuple(cfg.pool_paths), cfg.skip_bad_rows,
                      cfg.pool_seed, cfg.pool_rl_fraction)


def real_sft_examples(config: ml_collections.ConfigDict, tokenizer: Any,
                      labelled_fraction: float = 1.0) -> dict[str, tuple[list, list[str]]]:
    """(prompts, responses) of each SFT task from the training file's teacher rewrites (never val or test):
    rewrite generation to the teacher's rewrite in `config.rewrite_data.rewrite_format`, and tagging of the
    constructed (query, rewrite, tag) rows (`rewrite_data.constructed_tags`). With `labelled_fraction` < 1,
    only the queries `is_labelled` keeps.

    A rewrite whose response (and EOS) runs over `config.data.max_response_len` tokens is one the policy could
    not write: its rewrite row and the tag rows that show it are dropped, and the drop is logged (the ESCI
    teacher's Boolean answers run 42 SmolLM2 tokens at the median, 82 at p95; their plain forms 23 and 34).
    """
    style, fmt, limit = prompt_style(config), rewrite_format(config), config.data.max_response_len
    train = [q for q in real_data(config).splits.train.queries
             if q.teacher is not None and is_labelled(q.text, labelled_fraction)]
    tags = rewrite_data.constructed_tags(train, fmt, seed=config.seed)
    response_of = {rewrite: prompts_lib.rewrite_response(rewrite, style) for _, rewrite, _ in tags}
    responses = sorted(set(response_of.values()))
    lengths = [len(ids) + 1 for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]
    fits = {response for response, length in zip(responses, lengths) if length <= limit}
    kept = [q for q in train if response_of[q.teacher.target(fmt)] in fits]  # its "relevant" tag row's rewrite
    kept_tags = [row for row in tags if response_of[row[1]] in fits]
    if len(kept) < len(train):
        logging.warning("rewrite SFT: dropped %d of %d teacher rewrites (and %d of %d tag rows) longer than "
                        "config.data.max_response_len = %d tokens (longest %d)", len(train) - len(kept), len(train),
                        len(tags) - len(kept_tags), len(tags), limit, max(lengths))
    return {
        "rewrite": (prompts_lib.rewrite_prompts(tokenizer, [q.text for q in kept], style=style, rewrite_format=fmt),
                    [response_of[q.teacher.target(fmt)] for q in kept]),
        "tag": (prompts_lib.tag_prompts(tokenizer, [q for q, _, _ in kept_tags], [r for _, r, _ in kept_tags],
                                        style=style),
                [tag for _, _, tag in kept_tags]),
    }


class RewriteTask:
    """Rewrite the training queries; reward = the configured fusion of r_rule, r_rel and r_conv.

    `queries` are the RL queries: anything with `text` and `purchased_product_ids` (the world's queries, or
    real `rewrite_data.RewriteQuery`s, whose Exact products stand in for purchases). A completion is read as
    a rewrite by the prompt style (`prompts.read_rewrite`): in "chat" style one without a readable
    `<answer>` is a format failure, scored as the empty rewrite (r_rule 0, nothing retrieved) and counted.
    `keeps_intent(query, rewrite)`, where the source knows intents (the world), gives `rl/accuracy`.

    Rewards that do not apply (NaN, e.g. `r_conv` of a query nobody bought from, under a fusion that
    reads nothing else) become 0: every rollout of a group shares its query, so the whole group gets
    no advantage.
    """

    name = "rewrite"

    def __init__(self, config: ml_collections.ConfigDict, queries: Sequence[Any], *, engine: Retriever,
                 judge: rewards_lib.Judge | None, keeps_intent: Callable[[Any, str], bool] | None = None):
        self.cfg = config.rewrite
        if self.cfg.fusion not in rewards_lib.FUSION_MODES:
            raise ValueError(f"config.rewrite.fusion = {self.cfg.fusion!r}: choose one of "
                             f"{rewards_lib.FUSION_MODES}")
        self.queries = list(queries)
        if not self.queries:
            raise ValueError("no queries for RL")
        self.style, self.format = prompt_style(config), rewrite_format(config)
        self.engine = engine
        self.judge = judge
        self.keeps_intent = keeps_intent

    @classmethod
    def for_world(cls, config: ml_collections.ConfigDict, world, *, engine: Retriever,
                  judge: rewards_lib.Judge | None) -> RewriteTask:
        """The world's training queries (all, or with `rl_queries = "unlabelled"` those without teacher rewrites)."""
        queries = world.split_queries("train")
        if config.rewrite.rl_queries == "unlabelled":
            fraction = config.rewrite_sft.labelled_fraction
            queries = [q for q in queries if not is_labelled(q.query_id, fraction)]
        elif config.rewrite.rl_queries != "all":
            raise ValueError(f"config.rewrite.rl_queries = {config.rewrite.rl_queries!r}: choose one of {RL_QUERIES}")
        if not queries:
            raise ValueError("no training queries left for RL: config.rewrite_sft.labelled_fraction = 1 labels "
                             "them all; lower it or set config.rewrite.rl_queries = 'all'")
        return cls(config, queries, engine=engine, judge=judge,
                   keeps_intent=lambda query, rewrite: world.read_intent(rewrite) == (query.subject, query.attributes))

    @classmethod
    def from_workdir(cls, config: ml_collections.ConfigDict, world, workdir: str, *,
                     load_sft_params: Callable[[], decoder.Params]) -> RewriteTask:
        """The task over the `index` stage's search index, with the judge of `config.rewrite.judge` when the
        fusion reads `r_rel`. `world` is the synthetic world, or None for real data (`config.data.source`).
        `load_sft_params()` restores the SFT policy, called only for the tagging judge."""
        cfg = config.rewrite
        if cfg.judge not in JUDGES:
            raise ValueError(f"config.rewrite.judge = {cfg.judge!r}: choose one of {JUDGES}")
        engine = SearchEngine.open(artifacts.index_dir(workdir))
        reads_rel = "rel" in rewards_lib.FUSION_INPUTS[cfg.fusion]
        judge = make_judge(config, world, workdir, engine, load_sft_params) if reads_rel else None
        if world is not None:
            return cls.for_world(config, world, engine=engine, judge=judge)
        if cfg.rl_queries != "all":
            raise ValueError(f"config.rewrite.rl_queries = {cfg.rl_queries!r} splits the synthetic world's queries; "
                             "real data trains GRPO on its pool queries: set it to 'all'")
        return cls(config, real_data(config).pool_queries["rl"], engine=engine, judge=judge)

    def prompts(self, tokenizer: Any = None) -> list:
        """The RL prompts (text in "plain" style, token ids in "chat" style, which needs the tokenizer)."""
        return prompts_lib.rewrite_prompts(tokenizer, [query.text for query in self.queries], style=self.style,
                                           rewrite_format=self.format)

    def encode_prompts(self, tokenizer: Any, max_prompt_len: int) -> dict[str, np.ndarray]:
        return batching.encode_prompts(tokenizer, self.prompts(tokenizer), max_prompt_len)

    def contexts(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """What the rewards read of each rollout's query."""
        return [{"query": self.queries[r].text, "purchased_product_ids": self.queries[r].purchased_product_ids}
                for r in rows]

    def score(self, rows: np.ndarray, texts: list[str], offsets: list[np.ndarray]) -> Scored:
        cfg = self.cfg
        contexts = self.contexts(rows)
        read = [prompts_lib.read_rewrite(text, self.style) for text in texts]
        rewrites = [rewrite if rewrite is not None else "" for rewrite in read]  # a format failure: the empty rewrite
        parts = rewards_lib.rewrite_reward_components(
            rewrites, contexts, mode=cfg.fusion, engine=self.engine, judge=self.judge, w_rel=cfg.w_rel,
            w_conv=cfg.w_conv, k=cfg.k, metric=cfg.conv_metric, **cfg.rule)
        fused = parts["fused"]
        rule = parts["r_rule"]
        if np.isnan(rule).all():  # the fusion does not read r_rule; the logs still do
            rule = rewards_lib.r_rule(rewrites, contexts, engine=self.engine, **cfg.rule)
        metrics = {f"rl/reward_{name}": float(np.nanmean(parts[f"r_{name}"]))
                   for name in ("rel", "conv") if not np.isnan(parts[f"r_{name}"]).all()}
        metrics.update({
            "rl/reward_rule": float(rule.mean()),
            "rl/rule_failure_rate": float(np.mean(rule == 0.0)),
            "rl/reward_not_applicable": float(np.mean(np.isnan(fused))),
            "rl/rewrite_words": float(np.mean([len(rewards_lib.rewrite_words(text)) for text in rewrites])),
        })
        if self.style != "plain":  # a plain response is the rewrite itself: it cannot fail to parse
            metrics["rl/format_failure_rate"] = float(np.mean([rewrite is None for rewrite in read]))
        if self.keeps_intent is not None:
            metrics["rl/accuracy"] = float(np.mean([self.keeps_intent(self.queries[r], rewrite)
                                                    for r, rewrite in zip(rows, rewrites)]))
        return Scored(
            rewards=np.nan_to_num(fused, nan=0.0).astype(np.float32),
            node_values=np.full((len(texts), 1), -1, np.int32),
            node_ids=[np.full(len(o), batching.OUTSIDE_NODE_ID, np.int32) for o in offsets],
            gold_label=None,
            format_valid=rule == 1.0,
            metrics=metrics,
        )


def sft_examples(world: world_lib.World, split: str, labelled_fraction: float = 1.0,
                 tagged_fraction: float | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """(prompts, responses) of each SFT task on a split's queries and rewrite tags; with
    `labelled_fraction` < 1, only the rewrites of the queries that have teacher labels
    (`is_labelled`), and the tags of the `tagged_fraction` share (default: the same queries)."""
    if tagged_fraction is None:
        tagged_fraction = labelled_fraction
    if tagged_fraction < labelled_fraction:
        raise ValueError(f"config.rewrite_sft.tagged_fraction = {tagged_fraction} is below labelled_fraction = "
                         f"{labelled_fraction}: the tagged queries include the labelled ones")
    queries = [q for q in world.split_queries(split) if is_labelled(q.query_id, labelled_fraction)]
    tags = [t for t in world.split_rewrite_tags(split) if is_labelled(t.query_id, tagged_fraction)]
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


def sft_data(config: ml_collections.ConfigDict, workdir: str, tokenizer: Any) -> SftData:
    """Multi-task SFT (the `rewrite_sft` stage), stage 1 of the paper. Two tasks share the model: rewrite
    generation (`query: … rewrite:` → the gold rewrite) and query-rewrite relevance tagging (`query: …
    rewrite: … tag:` → relevant | partial | irrelevant). Each batch mixes them by `config.rewrite_sft.task_mix`
    (1:1 by default; a zero weight gives single-task SFT). Rewrites have no CoT nodes, so nothing is masked.
    On real data (`config.data.source = "esci"`) the rows are `real_sft_examples`, in the prompt style of
    `config.data.prompt_style`. The policy is saved as stage `sft`, where the `rl` stage and its judge look
    for it."""
    del workdir
    cfg = config.rewrite_sft
    counts = task_counts(cfg.task_mix, config.optim.batch_size)
    if source(config) == "esci":
        examples = real_sft_examples(config, tokenizer, cfg.labelled_fraction)
    else:
        examples = sft_examples(prepare.load_world(config), "train", cfg.labelled_fraction, cfg.tagged_fraction)
    encoded = {task: batching.encode_sft(tokenizer, *examples[task], config.data.max_prompt_len,
                                         config.data.max_response_len, nodes=())
               for task in SFT_TASKS if counts[task]}
    for task, arrays in encoded.items():
        if not len(arrays["tokens"]):
            raise ValueError(f"config.rewrite_sft.task_mix gives task {task!r} weight but the data has "
                             f"no {task} examples in its train split")
    logging.info("rewrite SFT: %s rows per batch from %s examples", counts,
                 {task: len(arrays["tokens"]) for task, arrays in encoded.items()})
    # One table of both tasks' rows (padded to the same shapes), so a batch is a set of row indices that
    # each process can slice to the rows it loads.
    data = {k: np.concatenate([arrays[k] for arrays in encoded.values()]) for k in next(iter(encoded.values()))}
    offsets = dict(zip(encoded, np.cumsum([0] + [len(arrays["tokens"]) for arrays in encoded.values()])))

    def sample_rows(step: int) -> np.ndarray:
        rng = np.random.default_rng([config.seed, 1, step])
        rows = []
        for task, arrays in encoded.items():
            size = len(arrays["tokens"])
            rows.append(offsets[task] + rng.choice(size, counts[task], replace=counts[task] > size))
        return np.concatenate(rows)

    # No CoT nodes in these responses (node ids all -1) and no masking: every response token is trained.
    return SftData(data, sample_rows, cfg.num_steps, cfg.log_every,
                   mask=dict(label_node=0, num_nodes=1, p_mask=0.0, mask_unit="token"))


def rl_task(config: ml_collections.ConfigDict, workdir: str, spec) -> RewriteTask:
    """The task over the `index` stage's index; the tagging judge is a frozen copy of the SFT policy."""
    del spec  # a rewrite is a one-node graph: every token gets the rollout's advantage
    world = prepare.load_world(config) if source(config) == "world" else None
    return RewriteTask.from_workdir(config, world, workdir,
                                    load_sft_params=lambda: artifacts.policy_params(config, workdir))


register_task("rewrite", rl_task=rl_task, sft_data=sft_data)
