"""A search stack with pluggable stages: query → rewrite → retrieve → relevance → top-k page.

The offline A/B test compares configurations of the whole stack, so every stage is a plain function
chosen by a declarative `ArmSpec` and each stage's wall time is measured:

* rewrite: a `Rewriter` maps the users' queries to the text sent to the engine (the identity for the raw
  query; the SFT or GRPO policy's greedy rewrite via `eval.rewrite.generate_rewrites`).
* retrieve: the engine's top `depth` products for the rewrite; with `union`, the rewrite's and the raw
  query's results interleaved (rewrite first, then raw, alternating; a product already taken is
  skipped), so a rewrite that drifts from the intent cannot hide what the raw query found.
* relevance: a `RelevanceScorer` (the distilled student, or the policy) gives P(label | user query,
  title) for every candidate, read against the *user's* query, not the rewrite: relevance is to the
  intent. Scored pairs are deduplicated within a batch.
* rank: optionally drop candidates whose P(Irrelevant) ≥ `threshold` (`filter`), then reorder by the
  expected relevance grade Σ_label grade·P(label) with Exact 3 ... Irrelevant 0 (`rerank="relevance"`,
  stable: ties keep the retrieval order) or at random (`rerank="random"`, a deliberately bad arm), and
  cut to k. A filtered page may hold fewer than k products.

Latency is reported per stage as milliseconds per query of the batch the stage ran on (stages run
batched, as a serving system that groups requests would).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphgrpo_jax.data.cot import LABELS
from graphgrpo_jax.search.engine import Retriever

Rewriter = Callable[[Sequence[str]], list[str]]
# (user queries, product titles) -> [N, len(LABELS)] P(label), rows aligned with the pairs.
RelevanceScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]

RERANK_MODES = ("none", "relevance", "random")
STAGES = ("rewrite", "retrieve", "relevance", "rank")
# Expected-grade weights of the relevance reranker, in LABELS order (Exact 3 ... Irrelevant 0).
GRADES = np.array([3.0, 2.0, 1.0, 0.0])
IRRELEVANT = LABELS.index("Irrelevant")


def raw_query(queries: Sequence[str]) -> list[str]:
    """The identity rewriter: the engine sees what the user typed."""
    return list(queries)


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """One configuration of the stack; the names of `rewriter` and `relevance` index the callables
    handed to `run_pipeline` (`relevance="none"` skips the relevance stage)."""

    rewriter: str = "raw"
    union: bool = False
    relevance: str = "none"
    filter: bool = False
    threshold: float = 0.5
    rerank: str = "none"
    k: int = 10
    depth: int = 10

    def __post_init__(self):
        if self.k < 1 or self.depth < self.k:
            raise ValueError(f"arm needs 1 <= k <= depth, got k={self.k}, depth={self.depth}")
        if self.rerank not in RERANK_MODES:
            raise ValueError(f"arm rerank={self.rerank!r}: choose one of {RERANK_MODES}")
        if self.relevance == "none" and (self.filter or self.rerank == "relevance"):
            raise ValueError("arm filters or reranks by relevance but has relevance='none'")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"arm threshold={self.threshold!r}: must be in (0, 1]")

    @classmethod
    def from_mapping(cls, name: str, values: Mapping[str, Any]) -> ArmSpec:
        """From a config entry; errors name the arm."""
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"config.arms.{name}: unknown fields {unknown}; known: {sorted(fields)}")
        try:
            return cls(**dict(values))
        except ValueError as error:
            raise ValueError(f"config.arms.{name}: {error}") from None


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """Pages of one arm for a batch of queries, and what produced them."""

    pages: list[list[str]]  # per query: product ids, best first, at most k
    rewrites: list[str]  # the text each query was searched with
    milliseconds_per_query: dict[str, float]  # per stage in STAGES (0 for a skipped stage), and "total"


def interleave(first: Sequence[str], second: Sequence[str], depth: int) -> list[str]:
    """Alternate between two rankings (first, second, first, ...), skipping ids already taken, up to `depth`."""
    merged: list[str] = []
    seen: set[str] = set()
    for i in range(max(len(first), len(second))):
        for ranking in (first, second):
            if i < len(ranking) and ranking[i] not in seen:
                seen.add(ranking[i])
                merged.append(ranking[i])
    return merged[:depth]


def retrieve(engine: Retriever, queries: Sequence[str], rewrites: Sequence[str], depth: int,
             union: bool) -> list[list[str]]:
    """Candidate ids per query: the rewrite's top `depth`, interleaved with the raw query's under `union`."""
    ids = [[product_id for product_id, _ in hits] for hits in engine.search_batch(list(rewrites), depth)]
    if not union:
        return ids
    raw = [[product_id for product_id, _ in hits] for hits in engine.search_batch(list(queries), depth)]
    return [interleave(rewritten, original, depth) for rewritten, original in zip(ids, raw)]


def score_candidates(scorer: RelevanceScorer, queries: Sequence[str], candidates: Sequence[Sequence[str]],
                     titles: Mapping[str, str]) -> list[np.ndarray]:
    """[len(candidates[i]), len(LABELS)] P(label) per query, each distinct (query, product) scored once."""
    pairs = sorted({(query, product_id) for query, ids in zip(queries, candidates) for product_id in ids})
    if not pairs:
        return [np.zeros((0, len(LABELS))) for _ in candidates]
    probs = np.asarray(scorer([query for query, _ in pairs], [titles[product_id] for _, product_id in pairs]))
    if probs.shape != (len(pairs), len(LABELS)):
        raise ValueError(f"relevance scorer returned shape {probs.shape} for {len(pairs)} pairs; expected "
                         f"({len(pairs)}, {len(LABELS)}) probabilities in LABELS order")
    row = {pair: i for i, pair in enumerate(pairs)}
    return [probs[[row[(query, product_id)] for product_id in ids]].reshape(len(ids), len(LABELS))
            for query, ids in zip(queries, candidates)]


def rank(spec: ArmSpec, candidates: Sequence[str], probs: np.ndarray | None, rng: np.random.Generator) -> list[str]:
    """The page: candidates filtered by P(Irrelevant) and reordered as `spec` says, cut to k."""
    order = np.arange(len(candidates))
    if spec.filter:
        order = order[probs[:, IRRELEVANT] < spec.threshold]
    if spec.rerank == "relevance":
        order = order[np.argsort(-(probs[order] @ GRADES), kind="stable")]
    elif spec.rerank == "random":
        order = rng.permutation(order)
    return [candidates[i] for i in order[:spec.k]]


def run_pipeline(spec: ArmSpec, queries: Sequence[str], *, engine: Retriever, rewriters: Mapping[str, Rewriter],
                 scorers: Mapping[str, RelevanceScorer], titles: Mapping[str, str], seed: int = 0) -> PipelineResult:
    """Every stage of `spec` on a batch of user queries, timed; `seed` drives random reranking only."""
    if spec.rewriter not in rewriters:
        raise ValueError(f"arm rewriter {spec.rewriter!r} is not available; have {sorted(rewriters)}")
    if spec.relevance != "none" and spec.relevance not in scorers:
        raise ValueError(f"arm relevance {spec.relevance!r} is not available; have {sorted(scorers)} or 'none'")
    seconds = dict.fromkeys(STAGES, 0.0)

    start = time.perf_counter()
    rewrites = list(rewriters[spec.rewriter](queries))
    seconds["rewrite"] = time.perf_counter() - start
    if len(rewrites) != len(queries):
        raise ValueError(f"rewriter {spec.rewriter!r} returned {len(rewrites)} rewrites for {len(queries)} queries")

    start = time.perf_counter()
    candidates = retrieve(engine, queries, rewrites, spec.depth, spec.union)
    seconds["retrieve"] = time.perf_counter() - start

    probs: list[np.ndarray | None] = [None] * len(queries)
    if spec.relevance != "none":
        start = time.perf_counter()
        probs = score_candidates(scorers[spec.relevance], queries, candidates, titles)
        seconds["relevance"] = time.perf_counter() - start

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    pages = [rank(spec, ids, p, rng) for ids, p in zip(candidates, probs)]
    seconds["rank"] = time.perf_counter() - start

    per_query = {stage: 1000.0 * value / max(len(queries), 1) for stage, value in seconds.items()}
    per_query["total"] = sum(per_query.values())
    return PipelineResult(pages=pages, rewrites=rewrites, milliseconds_per_query=per_query)
