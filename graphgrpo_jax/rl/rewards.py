"""Reward functions for both tasks, registered by name, with rewrite-reward fusion and TRL aggregation.

Every reward has one signature, TRL's with explicit per-rollout contexts::

    fn(completions: Sequence[str], contexts: Sequence[Mapping], **kwargs) -> np.ndarray  # [N] float64

Rollouts come in contiguous groups of `group_size` completions per prompt, and `contexts[i]` carries
what rollout i's reward needs (the context keys each reward reads are listed in its docstring; a
missing key is a `KeyError` naming reward, row and key). **NaN means "does not apply"** (TRL's
`None`): `r_conv` of a query nobody bought from, for instance.

Registered rewards (METHOD.md A2 and B):

* `relevance_outcome`: 1 right label, 0 wrong, `r_format` (default -1) unparseable.
* `r_rule`: 1 if the rewrite passes every rule check (`rule_violations`), else 0.
* `r_conv`: recall@k (or NDCG@k) of the query's purchased products among the engine's hits.
* `r_rel`: a relevance judge's credit in [0, 1]: `p(relevant) + 0.5 * p(partial)` of a tagging judge, or
  the relevance score of a judge that grades what the rewrite retrieves.
* `rewrite_fused`: the three rewrite rewards fused by `fuse_rewrite_rewards` (rFusion by default).

Several rewards combine TRL's way with `aggregate` (`sum_then_normalize` / `normalize_then_sum`,
`reward_weights`), which also returns TRL's per-function logs.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from graphgrpo_jax.data import cot
from graphgrpo_jax.data.rewrite_data import rewrite_terms, rewrite_words
from graphgrpo_jax.graph import credit
from graphgrpo_jax.search.engine import Retriever, ndcg_at_k, recall_at_k


class RewardFunction(Protocol):
    """`[N]` rewards, NaN where the reward does not apply, for N completions and their contexts."""

    def __call__(self, completions: Sequence[str], contexts: Sequence[Mapping[str, Any]],
                 **kwargs: Any) -> np.ndarray: ...


_REGISTRY: dict[str, RewardFunction] = {}


def register_reward(name: str) -> Callable[[Callable[..., Any]], RewardFunction]:
    """Registers a reward under `name`, wrapped so that every reward checks its batch the same way:
    as many contexts as completions in, a float64 `[N]` array out."""

    def decorate(fn: Callable[..., Any]) -> RewardFunction:
        if name in _REGISTRY:
            raise ValueError(f"a reward named {name!r} is already registered")

        @functools.wraps(fn)
        def checked(completions: Sequence[str], contexts: Sequence[Mapping[str, Any]],
                    **kwargs: Any) -> np.ndarray:
            if len(completions) != len(contexts):
                raise ValueError(f"reward {name!r}: {len(completions)} completions but "
                                 f"{len(contexts)} contexts")
            values = np.asarray(fn(completions, contexts, **kwargs), dtype=np.float64)
            if values.shape != (len(completions),):
                raise ValueError(f"reward {name!r} returned shape {values.shape}, "
                                 f"expected ({len(completions)},)")
            return values

        _REGISTRY[name] = checked
        return checked

    return decorate


def get_reward(name: str) -> RewardFunction:
    if name not in _REGISTRY:
        raise KeyError(f"no reward named {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered_rewards() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _column(contexts: Sequence[Mapping[str, Any]], key: str, reward: str) -> list[Any]:
    """`contexts[i][key]` for every row, or a KeyError naming the reward, the row and the key."""
    column = []
    for row, context in enumerate(contexts):
        if key not in context:
            raise KeyError(f"reward {reward!r} reads contexts[{row}][{key!r}]; "
                           f"row {row} has keys {sorted(context)}")
        column.append(context[key])
    return column


# ------------------------------------------------------------------------------------ relevance (A)


def parse_completions(completions: Sequence[str], nodes: Sequence[str] = cot.NODES,
                      allowed: Mapping[str, Sequence[str] | None] | None = None) -> list[cot.ParseResult]:
    """Parses each completion once; hand the result to `relevance_outcome(parses=...)` and to credit."""
    return [cot.parse(text, nodes, allowed) for text in completions]


def _gold_label(value: Any, labels: Sequence[str], row: int) -> str:
    """A gold label as a string: given as one (JSONL, the world) or as its index (TFDS ClassLabel)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= value < len(labels):
            raise ValueError(f"contexts[{row}]['label'] = {value} is no index into labels {list(labels)}")
        return labels[value]
    if isinstance(value, str) and value in labels:
        return value
    raise ValueError(f"contexts[{row}]['label'] = {value!r} is not one of {list(labels)}")


@register_reward("relevance_outcome")
def relevance_outcome(completions: Sequence[str], contexts: Sequence[Mapping[str, Any]], *,
                      parses: Sequence[cot.ParseResult] | None = None, r_format: float = -1.0,
                      nodes: Sequence[str] = cot.NODES, label_node: str = cot.LABEL_NODE,
                      allowed: Mapping[str, Sequence[str] | None] | None = None) -> np.ndarray:
    """Outcome `R_i` (METHOD.md A2.1): 1 right label, 0 wrong, `r_format` when the CoT is unparseable.

    Reads `contexts[i]["label"]`: the gold label, a string or its index in the label vocabulary
    (`allowed[label_node]`, ESCI's four labels by default). Pass `parses` (from `parse_completions`,
    with the same `nodes` / `allowed`) to reuse the rollout's parse; otherwise completions are parsed
    here. "Unparseable" is `ParseResult.valid` False: any format error fails the whole response.
    """
    allowed = cot.DEFAULT_ALLOWED if allowed is None else allowed
    labels = allowed.get(label_node)
    if label_node not in nodes or labels is None:
        raise ValueError(f"label node {label_node!r} must be among nodes {list(nodes)} and have a "
                         f"label vocabulary in `allowed`")
    if parses is None:
        parses = parse_completions(completions, nodes, allowed)
    elif len(parses) != len(completions):
        raise ValueError(f"{len(parses)} parses for {len(completions)} completions")
    gold = [_gold_label(value, labels, row)
            for row, value in enumerate(_column(contexts, "label", "relevance_outcome"))]
    return np.array([
        r_format if not parse.valid else float(parse.values[label_node] == label)
        for parse, label in zip(parses, gold)
    ])


# ------------------------------------------------------------------------------------ rewriting (B)

DEFAULT_MIN_WORDS = 1
DEFAULT_MAX_WORDS = 32
DEFAULT_MAX_CHARS = 256
DEFAULT_MAX_WORD_REPEATS = 2  # a word written three times is a degenerate loop, twice can be boolean

RULE_CHECKS = ("empty", "unbalanced", "malformed", "copy", "too_short", "too_long", "repetition")


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def _balanced(text: str) -> bool:
    """Parentheses nest properly and double quotes pair up (single quotes are apostrophes too)."""
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0 and text.count('"') % 2 == 0


def rule_violations(rewrite: str, query: str, *, engine: Any = None,
                    min_words: int = DEFAULT_MIN_WORDS, max_words: int = DEFAULT_MAX_WORDS,
                    max_chars: int = DEFAULT_MAX_CHARS,
                    max_word_repeats: int = DEFAULT_MAX_WORD_REPEATS) -> tuple[str, ...]:
    """The `RULE_CHECKS` a rewrite fails, in that order; empty when it passes all of them.

    * `empty`: no content word (blank, punctuation or operators only).
    * `unbalanced`: parentheses that do not nest or an odd number of double quotes.
    * `malformed`: the engine would search it as plain words rather than with its own syntax
      (`engine.is_well_formed`, checked only when the engine has that method, e.g. `SearchEngine`;
      it catches what balance cannot, such as a dangling `shoes AND`).
    * `copy`: the query itself up to case and whitespace.
    * `too_short` / `too_long`: fewer than `min_words`, more than `max_words` content words, or more
      than `max_chars` characters (a single 10k-character "word" is too long too).
    * `repetition`: a search term (a word, or a quoted phrase as a whole: `rewrite_terms`) more than
      `max_word_repeats` times, or a bigram of consecutive terms twice (`red shoes red shoes`). Terms, not
      words: the Boolean rewrites of the ESCI teacher list phrase variants (`"HD TV" OR "LED TV" OR "4K TV"`),
      which a count of words would call a loop (31% of its 4,505 rewrites; by terms 5.2% still repeat, e.g.
      `HBO Subscription OR HBO Streaming Service OR HBO Shows OR …`).
    """
    words = rewrite_words(rewrite)
    failed = set()
    if not words:
        failed.add("empty")
    if not _balanced(rewrite):
        failed.add("unbalanced")
    syntax_check = getattr(engine, "is_well_formed", None)
    if syntax_check is not None and not syntax_check(rewrite):
        failed.add("malformed")
    if _normalised(rewrite) == _normalised(query):
        failed.add("copy")
    if len(words) < min_words:
        failed.add("too_short")
    if len(words) > max_words or len(rewrite) > max_chars:
        failed.add("too_long")
    terms = rewrite_terms(rewrite)
    bigrams = Counter(zip(terms, terms[1:]))
    if (terms and max(Counter(terms).values()) > max_word_repeats) or any(n > 1 for n in bigrams.values()):
        failed.add("repetition")
    return tuple(check for check in RULE_CHECKS if check in failed)


@register_reward("r_rule")
def r_rule(completions: Sequence[str], contexts: Sequence[Mapping[str, Any]], *, engine: Any = None,
           min_words: int = DEFAULT_MIN_WORDS, max_words: int = DEFAULT_MAX_WORDS,
           max_chars: int = DEFAULT_MAX_CHARS,
           max_word_repeats: int = DEFAULT_MAX_WORD_REPEATS) -> np.ndarray:
    """1.0 if the rewrite passes every check of `rule_violations` (their product), else 0.0.

    Reads `contexts[i]["query"]`. Never NaN: every rewrite can be checked.
    """
    queries = _column(contexts, "query", "r_rule")
    return np.array([
        float(not rule_violations(rewrite, query, engine=engine, min_words=min_words,
                                  max_words=max_words, max_chars=max_chars,
                                  max_word_repeats=max_word_repeats))
        for rewrite, query in zip(completions, queries)
    ])


CONVERSION_METRICS = ("recall", "ndcg")


def _product_ids(value: Any, row: int) -> list[str]:
    """Purchased ids as strings; TFDS hands text sequences back as bytes, which would never match."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"contexts[{row}]['purchased_product_ids'] is one string {value!r}, "
                        f"expected a sequence of product ids")
    return [item.decode() if isinstance(item, bytes) else str(item) for item in value]


@register_reward("r_conv")
def r_conv(completions: Sequence[str], contexts: Sequence[Mapping[str, Any]], *, engine: Retriever,
           k: int = 10, metric: str = "recall") -> np.ndarray:
    """Search-engine feedback: how well the rewrite retrieves what the query's users bought.

    Reads `contexts[i]["purchased_product_ids"]` (a sequence of product ids). `metric="recall"`:
    recall@k of the purchases among the top-k hits; `"ndcg"`: NDCG@k with gain 1 per purchased
    product. NaN when the query has no purchase. One `search_batch` call per batch, over the distinct
    rewrites of the rows that apply (a group's rollouts often repeat a rewrite).
    """
    if metric not in CONVERSION_METRICS:
        raise ValueError(f"r_conv metric {metric!r}: choose one of {CONVERSION_METRICS}")
    purchases = [_product_ids(value, row) for row, value in
                 enumerate(_column(contexts, "purchased_product_ids", "r_conv"))]
    applies = [row for row, bought in enumerate(purchases) if bought]
    distinct = list(dict.fromkeys(completions[row] for row in applies))
    hits_of = dict(zip(distinct, engine.search_batch(distinct, k))) if distinct else {}
    values = np.full(len(completions), np.nan)
    for row in applies:
        retrieved = [product_id for product_id, _ in hits_of[completions[row]]]
        if metric == "recall":
            values[row] = recall_at_k(retrieved, purchases[row], k)
        else:
            values[row] = ndcg_at_k(retrieved, dict.fromkeys(purchases[row], 1.0), k)
    return values


Judge = Callable[[Sequence[str], Sequence[str]], Any]
# Credit per judged tag, in `cot.REWRITE_TAGS` order: a partial rewrite is worth half a relevant one.
REWRITE_TAG_CREDIT = np.array([1.0, 0.5, 0.0])
_PROBABILITY_TOLERANCE = 1e-3


def judge_credit(answer: Any, num_pairs: int) -> np.ndarray:
    """`[num_pairs]` credit in [0, 1] from a judge's answer, or a ValueError naming the first bad row.

    Two kinds of judge answer: `[num_pairs, 3]` distributions over `cot.REWRITE_TAGS` (a tagging judge),
    whose credit is the expected tag credit `REWRITE_TAG_CREDIT`; or `[num_pairs]` scores in [0, 1] (a
    judge that grades something else, e.g. the products the rewrite retrieves), taken as they are.
    """
    answer = np.asarray(answer, dtype=np.float64)
    if answer.shape == (num_pairs,):
        bad = ~np.isfinite(answer) | (answer < -_PROBABILITY_TOLERANCE) | (answer > 1 + _PROBABILITY_TOLERANCE)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"judge row {row} is not a relevance score in [0, 1]: {answer[row]}")
        return np.clip(answer, 0.0, 1.0)
    expected = (num_pairs, len(cot.REWRITE_TAGS))
    if answer.shape != expected:
        raise ValueError(f"judge returned shape {answer.shape}, expected {expected} (one distribution over "
                         f"{cot.REWRITE_TAGS} per pair) or ({num_pairs},) (one score in [0, 1] per pair)")
    bad = ~np.all(np.isfinite(answer), axis=1)
    bad |= np.any(answer < -_PROBABILITY_TOLERANCE, axis=1)
    bad |= np.abs(answer.sum(axis=1) - 1.0) > _PROBABILITY_TOLERANCE
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"judge row {row} is not a distribution over {cot.REWRITE_TAGS}: {answer[row]}")
    return answer @ REWRITE_TAG_CREDIT


@register_reward("r_rel")
def r_rel(completions: Sequence[str], contexts: Sequence[Mapping[str, Any]], *,
          judge: Judge) -> np.ndarray:
    """Relevance judge: its credit in [0, 1] for each (query, rewrite) pair (`judge_credit`).

    Reads `contexts[i]["query"]`. `judge(queries, rewrites)` answers with tag distributions `[M, 3]`
    (the policy's own tagging task on a frozen copy), whose expected tag credit
    `p(relevant) + 0.5 * p(partial)` is the reward, or with scores `[M]` (a retrieval judge: the graded
    relevance of what the rewrite retrieves, by the distilled student). It is called once, on the
    distinct (query, rewrite) pairs. The expectation rather than the argmax keeps the reward graded, so
    a group whose rewrites all get the same tag still has a spread.
    """
    queries = _column(contexts, "query", "r_rel")
    pairs = list(zip(queries, completions))
    distinct = list(dict.fromkeys(pairs))
    if not distinct:
        return np.zeros(0)
    credit = judge_credit(judge([q for q, _ in distinct], [r for _, r in distinct]), len(distinct))
    credit_of = dict(zip(distinct, credit))
    return np.array([credit_of[pair] for pair in pairs])


# ------------------------------------------------------------------------------------------- fusion

FUSION_MODES = ("rfusion", "product", "min", "rel", "conv", "rule")
# Which rewrite rewards each fusion mode reads; the others need not be computed.
FUSION_INPUTS: dict[str, tuple[str, ...]] = {
    "rfusion": ("rule", "rel", "conv"), "product": ("rule", "rel", "conv"), "min": ("rule", "rel", "conv"),
    "rel": ("rel",), "conv": ("conv",), "rule": ("rule",),
}


def fuse_rewrite_rewards(r_rule: np.ndarray, r_rel: np.ndarray, r_conv: np.ndarray,
                         mode: str = "rfusion", *, w_rel: float = 0.5, w_conv: float = 0.5) -> np.ndarray:
    """One reward per rewrite from the three rewrite rewards (METHOD.md B).

    * `rfusion`: `r_rule · (w_rel·r_rel + w_conv·r_conv)`;
    * `product`: `r_rule · r_rel · r_conv`;  `min`: `r_rule · min(r_rel, r_conv)`;
    * `rel`, `conv`, `rule`: that reward alone, ungated, for ablations.

    NaN ("does not apply") is handled term by term: a NaN `r_rule` gates nothing (factor 1); a NaN
    `r_rel` or `r_conv` drops out of the product or the min, and out of rFusion's sum with the other
    weight scaled up so the weights keep their total (`r_rule · r_rel · (w_rel + w_conv) / w_rel` when
    `r_conv` is NaN). Where no term applies (or, in rFusion, none with a positive weight), NaN.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"fusion mode {mode!r}: choose one of {FUSION_MODES}")
    if min(w_rel, w_conv) < 0 or w_rel + w_conv <= 0:
        raise ValueError(f"fusion weights w_rel={w_rel}, w_conv={w_conv} must be >= 0 with a positive sum")
    r_rule, r_rel, r_conv = (np.asarray(r, dtype=np.float64) for r in (r_rule, r_rel, r_conv))
    if not r_rule.shape == r_rel.shape == r_conv.shape or r_rule.ndim != 1:
        raise ValueError(f"rewrite rewards must be [N] arrays of one length, got shapes "
                         f"{r_rule.shape}, {r_rel.shape}, {r_conv.shape}")
    if mode in ("rel", "conv", "rule"):
        return {"rel": r_rel, "conv": r_conv, "rule": r_rule}[mode].copy()

    terms = np.stack([r_rel, r_conv], axis=1)
    applies = ~np.isnan(terms)
    gate = np.where(np.isnan(r_rule), 1.0, r_rule)
    with np.errstate(invalid="ignore", divide="ignore"):
        if mode == "rfusion":
            weights = np.where(applies, [w_rel, w_conv], 0.0)
            weighted_sum = np.sum(weights * np.where(applies, terms, 0.0), axis=1)
            scale = (w_rel + w_conv) / np.sum(weights, axis=1)  # exactly 1 where both apply
            mixed = weighted_sum * scale  # 0 * inf -> NaN where no weighted term applies
        elif mode == "product":
            mixed = np.where(applies.any(axis=1), np.prod(np.where(applies, terms, 1.0), axis=1), np.nan)
        else:
            mixed = np.where(applies.any(axis=1), np.min(np.where(applies, terms, np.inf), axis=1), np.nan)
    return gate * mixed


def rewrite_reward_components(completions: Sequence[str], contexts: Sequence[Mapping[str, Any]], *,
                              mode: str = "rfusion", engine: Retriever | None = None,
                              judge: Judge | None = None, w_rel: float = 0.5, w_conv: float = 0.5,
                              k: int = 10, metric: str = "recall",
                              **rule_kwargs: Any) -> dict[str, np.ndarray]:
    """`r_rule`, `r_rel`, `r_conv` and their fusion `fused`, each `[N]`, for logging each part.

    Only the rewards `mode` reads are computed (see `FUSION_INPUTS`); the others are NaN, so `rule`
    needs neither engine nor judge. `engine` also serves `r_rule`'s syntax check when it has one;
    `rule_kwargs` go to `r_rule` (`min_words`, `max_words`, `max_chars`, `max_word_repeats`).
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"fusion mode {mode!r}: choose one of {FUSION_MODES}")
    needed = FUSION_INPUTS[mode]
    not_applicable = np.full(len(completions), np.nan)
    if "conv" in needed and engine is None:
        raise ValueError(f"fusion mode {mode!r} reads r_conv, which needs a search engine")
    if "rel" in needed and judge is None:
        raise ValueError(f"fusion mode {mode!r} reads r_rel, which needs a relevance judge")
    parts = {
        "r_rule": (r_rule(completions, contexts, engine=engine, **rule_kwargs)
                   if "rule" in needed else not_applicable),
        "r_rel": r_rel(completions, contexts, judge=judge) if "rel" in needed else not_applicable,
        "r_conv": (r_conv(completions, contexts, engine=engine, k=k, metric=metric)
                   if "conv" in needed else not_applicable),
    }
    parts["fused"] = fuse_rewrite_rewards(parts["r_rule"], parts["r_rel"], parts["r_conv"], mode,
                                          w_rel=w_rel, w_conv=w_conv)
    return parts


@register_reward("rewrite_fused")
def rewrite_fused(completions: Sequence[str], contexts: Sequence[Mapping[str, Any]],
                  **kwargs: Any) -> np.ndarray:
    """The fused rewrite reward (`rewrite_reward_components(...)["fused"]`); same kwargs and keys
    (`query`, `purchased_product_ids`)."""
    return rewrite_reward_components(completions, contexts, **kwargs)["fused"]


# -------------------------------------------------------------------------------------- aggregation

AGGREGATION_MODES = ("sum_then_normalize", "normalize_then_sum")


def reward_stats(rewards: Mapping[str, Any]) -> dict[str, float]:
    """TRL's per-function logs over the rows each reward applies to, plus the share where it does not.

    `rewards/<name>/mean` and `/std` (unbiased, as TRL's `nanstd`) are NaN when fewer rows than they
    need apply; `rewards/<name>/not_applicable` is the NaN share.
    """
    stats = {}
    for name, values in rewards.items():
        values = np.asarray(values, dtype=np.float64)
        scored = values[~np.isnan(values)]
        stats[f"rewards/{name}/mean"] = float(np.mean(scored)) if scored.size else float("nan")
        stats[f"rewards/{name}/std"] = float(np.std(scored, ddof=1)) if scored.size > 1 else float("nan")
        stats[f"rewards/{name}/not_applicable"] = float(np.mean(np.isnan(values))) if values.size else 0.0
    return stats


def normalize_within_groups(values: np.ndarray, group_size: int, eps: float = credit.CreditSettings.eps
                            ) -> np.ndarray:
    """(value − its group's mean) / (the group's unbiased std + `eps`) over the rows that apply, by
    `credit.group_moments`, the statistics the advantages are computed from: NaN rows stay NaN and are left
    out of their group's mean and std, as TRL's `nanmean` / `nanstd` leave them out. A group with fewer than
    two scored rows or no spread gets 0 on its scored rows (no signal), as the advantages do."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size % group_size:
        raise ValueError(f"values of shape {values.shape} do not split into groups of {group_size}")
    scored = ~np.isnan(values)
    moments = credit.group_moments(jnp.asarray(values, jnp.float32), jnp.arange(values.size) // group_size,
                                   values.size // group_size, jnp.asarray(scored))
    mean, std, spread = (np.asarray(x) for x in moments)
    normalised = np.where(spread, (values - mean) / (std + eps), 0.0)
    return np.where(scored, normalised, np.nan)


def aggregate(rewards: Mapping[str, Any], weights: Mapping[str, float] | None, group_size: int,
              mode: str = "sum_then_normalize", *, eps: float = credit.CreditSettings.eps
              ) -> tuple[np.ndarray, dict[str, float]]:
    """One reward `[N]` from several reward functions, as TRL's `multi_objective_aggregation`.

    * `sum_then_normalize` (TRL's default): the weighted sum of the raw rewards, skipping NaN
      (`nansum`); the credit computation normalises it as usual afterwards (`config.grpo.scale_rewards`).
    * `normalize_then_sum` (GDPO): each reward normalised within its group first
      (`normalize_within_groups`, with `eps`: `config.credit.eps`), then the weighted sum, skipping NaN. TRL
      then normalises this sum over the whole batch whatever `scale_rewards` says; its group means are
      already 0, so that is `scale_rewards = "batch"`.

    `weights` maps every reward name to its weight (TRL's `reward_weights`); None weighs all 1. A row
    where every reward is NaN gets 0, and `rewards/unscorable` counts such rows (TRL warns about
    them). Returns the aggregate and `reward_stats` of the raw rewards plus that count.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"multi_objective_aggregation {mode!r}: choose one of {AGGREGATION_MODES}")
    if not rewards:
        raise ValueError("aggregate needs at least one reward")
    names = list(rewards)
    weights = dict.fromkeys(names, 1.0) if weights is None else weights
    if set(weights) != set(names):
        raise KeyError(f"reward weights name {sorted(weights)} but the rewards are {sorted(names)}")
    columns = [np.asarray(rewards[name], dtype=np.float64) for name in names]
    for name, column in zip(names, columns):
        if column.ndim != 1 or column.shape != columns[0].shape:
            raise ValueError(f"reward {name!r} has shape {column.shape}; every reward must be [N], "
                             f"shaped as the first one ({names[0]!r}: {columns[0].shape})")
    if len(columns[0]) % group_size:
        raise ValueError(f"{len(columns[0])} rewards per function do not split into groups of {group_size}")
    table = np.stack(columns, axis=1)
    if mode == "normalize_then_sum":
        table = np.stack([normalize_within_groups(column, group_size, eps) for column in table.T], axis=1)
    weight_row = np.array([weights[name] for name in names], dtype=np.float64)
    unscorable = np.isnan(table).all(axis=1)
    combined = np.nansum(table * weight_row, axis=1)
    stats = reward_stats(rewards)
    stats["rewards/unscorable"] = float(unscorable.sum())
    return combined, stats
