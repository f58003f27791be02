"""Offline metrics of query rewriting (METHOD.md B): accuracy, recall@k and relevance@k.

* accuracy: the share of rewrites that keep the query's intent: `world.read_intent(rewrite)` gives
  exactly the query's gold (subject, attributes).
* recall@k: the share of the query's purchased products among the engine's top k for the rewrite,
  averaged over the queries with a purchase.
* relevance@k: the mean gold relevance grade to the *original* query of the k slots the engine fills for
  the rewrite, Exact 3 / Substitute 2 / Complement 1 / Irrelevant 0 by the world's label rule (an empty
  slot, when the engine finds fewer than k products, counts 0: a rewrite that retrieves nothing is not
  relevant).

The same metrics of the raw query and of the gold rewrite frame a policy's figures (the gold rewrite is
the ceiling of accuracy by construction, though not of recall or relevance: BM25 ranks by words).
Rewrites come from greedy decoding (`generate_rewrites`). For a policy trained on the tagging task,
`tag_accuracy` and `judge_metrics` report how well its tags (the `r_rel` judge) agree with the world's rule;
`score_judge_metrics` does the same for a judge that scores (the retrieval judge of the student).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graphgrpo_jax import sampling
from graphgrpo_jax.metrics import report_text
from graphgrpo_jax.data import batching, cot, prompts, rewrite_data, world as world_lib
from graphgrpo_jax.models import decoder
from graphgrpo_jax.rl import rollout
from graphgrpo_jax.search.engine import Retriever, ndcg_at_k, recall_at_k


def rewrite_metrics(world: world_lib.World, engine: Retriever, queries: Sequence[world_lib.Query],
                    rewrites: Sequence[str], k: int) -> dict[str, Any]:
    """accuracy, recall@k and relevance@k of `rewrites[i]` standing in for `queries[i]` (module docstring)."""
    if len(queries) != len(rewrites):
        raise ValueError(f"{len(queries)} queries but {len(rewrites)} rewrites")
    if not queries:
        raise ValueError("no queries to evaluate")
    hits = engine.search_batch(list(rewrites), k)
    recalls, relevances = [], []
    for query, query_hits in zip(queries, hits):
        retrieved = [product_id for product_id, _ in query_hits]
        recall = recall_at_k(retrieved, query.purchased_product_ids, k)
        if recall is not None:
            recalls.append(recall)
        grades = [world_lib.relevance_grade(world, query.subject, query.attributes, world.product_by_id[product_id])
                  for product_id in retrieved[:k]]
        relevances.append(sum(grades) / k)
    return {
        "num_examples": len(queries),
        "k": k,
        "accuracy": float(np.mean([world_lib.keeps_intent(world, q, r) for q, r in zip(queries, rewrites)])),
        "recall": float(np.mean(recalls)) if recalls else float("nan"),
        "relevance": float(np.mean(relevances)),
        "examples": [{"query": report_text(q.text), "rewrite": report_text(r), "gold_rewrite": q.gold_rewrite}
                     for q, r in list(zip(queries, rewrites))[:5]],
    }


def tag_accuracy(judge: Callable[[Sequence[str], Sequence[str]], np.ndarray],
                 tags: Sequence[world_lib.RewriteTag]) -> float:
    """The share of labelled (query, rewrite) pairs whose most probable tag under `judge` is the label."""
    probs = judge([t.query for t in tags], [t.rewrite for t in tags])
    return float(np.mean([cot.REWRITE_TAGS[i] == t.tag for i, t in zip(probs.argmax(1), tags)]))


def judge_metrics(judge: Callable[[Sequence[str], Sequence[str]], np.ndarray], world: world_lib.World,
                  queries: Sequence[world_lib.Query], rewrites: Sequence[str]) -> dict[str, float]:
    """How far the relevance judge behind `r_rel` can be trusted on a policy's own rewrites: its accuracy
    (argmax tag) against the world's rule and its mean P(relevant), next to the share truly relevant.
    A judge that the policy games rates its rewrites higher than the rule."""
    probs = judge([q.text for q in queries], list(rewrites))
    truth = [world_lib.true_tag(world, q, r) for q, r in zip(queries, rewrites)]
    return {
        "own_tag_accuracy": float(np.mean([cot.REWRITE_TAGS[i] == t for i, t in zip(probs.argmax(1), truth)])),
        "own_p_relevant": float(probs[:, cot.REWRITE_TAGS.index("relevant")].mean()),
        "own_truly_relevant": float(np.mean([t == "relevant" for t in truth])),
    }


def score_judge_metrics(judge: Callable[[Sequence[str], Sequence[str]], np.ndarray],
                        truth: Callable[[Sequence[str], Sequence[str]], np.ndarray],
                        queries: Sequence[world_lib.Query], rewrites: Sequence[str]) -> dict[str, float]:
    """A scoring judge (`[M]` in [0, 1]) on a policy's own rewrites against the true scores: both means and
    their correlation across queries. A judge that the policy games scores its rewrites above the truth."""
    texts = [q.text for q in queries]
    scores, true_scores = np.asarray(judge(texts, rewrites)), np.asarray(truth(texts, rewrites))
    spread = scores.std() > 0 and true_scores.std() > 0
    return {"own_score": float(scores.mean()), "own_true_score": float(true_scores.mean()),
            "score_truth_corr": float(np.corrcoef(scores, true_scores)[0, 1]) if spread else float("nan")}


def generate_rewrites(params: decoder.Params, model_config: decoder.DecoderConfig, tokenizer: Any,
                      queries: Sequence[str], *, max_prompt_len: int, max_new_tokens: int,
                      batch_size: int, prompt_style: str = "plain",
                      rewrite_format: str = "boolean") -> list[str | None]:
    """The policy's greedy rewrite of each query (the text before EOS; a truncated one as it stands), read by
    the prompt style (`prompts.read_rewrite`: None where a "chat" response has no readable answer).

    Queries run in chunks of `batch_size`, the last one padded, so the sampler compiles once.
    """
    pieces = rollout.TokenPieces(tokenizer)
    prompt_rows = prompts.rewrite_prompts(tokenizer, queries, style=prompt_style, rewrite_format=rewrite_format)
    rewrites: list[str | None] = []
    for start in range(0, len(prompt_rows), batch_size):
        chunk = prompt_rows[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        encoded = batching.encode_prompts(tokenizer, padded, max_prompt_len, truncate_prompts=prompt_style == "plain")
        out = jax.device_get(sampling.generate(
            params, model_config, jnp.asarray(encoded["tokens"]), jnp.asarray(encoded["attention_mask"], bool),
            jax.random.PRNGKey(0), max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id, sampling=sampling.GREEDY))
        texts, _ = rollout.decode_completions(pieces, out.tokens, out.lengths, out.truncated)
        rewrites += [prompts.read_rewrite(text, prompt_style) for text in texts[:len(chunk)]]
    return rewrites


def real_rewrite_metrics(pool: rewrite_data.ProductPool, engine: Retriever, queries: Sequence[rewrite_data.RewriteQuery],
                         rewrites: Sequence[str | None], k: int) -> dict[str, Any]:
    """recall@k, NDCG@k and judged relevance@k of `rewrites[i]` standing in for real `queries[i]` in the pool.

    * recall@k: of the query's Exact products in the pool (`target_ids`);
    * NDCG@k: graded gains, the human ESCI grade (Exact 3, Substitute 2, Complement 1, Irrelevant 0) where the
      pair is judged, 3 for a target known only from the query file;
    * relevance@k: the mean human grade / 3 of the *judged* products among the top k (an empty or unjudged
      slot is left out, so the figure is over `judged_share` of the k slots; there is no grader for the rest).

    A None rewrite (a format failure) retrieves nothing; `format_failure_rate` counts them.
    """
    if len(queries) != len(rewrites):
        raise ValueError(f"{len(queries)} queries but {len(rewrites)} rewrites")
    if not queries:
        raise ValueError("no queries to evaluate")
    hits = engine.search_batch([rewrite or "" for rewrite in rewrites], k)
    recalls, ndcgs, relevances, judged = [], [], [], []
    for query, query_hits in zip(queries, hits):
        retrieved = [product_id for product_id, _ in query_hits][:k]
        grades = pool.judgements.get(query.text, {})
        gains = {**{pid: 3.0 for pid in query.target_ids}, **{pid: float(g) for pid, g in grades.items()}}
        recalls.append(recall_at_k(retrieved, query.target_ids, k))
        ndcgs.append(ndcg_at_k(retrieved, gains, k))
        judged_grades = [grades[pid] for pid in retrieved if pid in grades]
        judged.append(len(judged_grades) / k)
        if judged_grades:
            relevances.append(np.mean(judged_grades) / 3.0)
    return {
        "num_examples": len(queries),
        "k": k,
        "recall": float(np.mean(recalls)),
        "ndcg": float(np.mean(ndcgs)),
        "relevance_judged": float(np.mean(relevances)) if relevances else float("nan"),
        "judged_share": float(np.mean(judged)),
        "format_failure_rate": float(np.mean([rewrite is None for rewrite in rewrites])),
        # Per query, for intervals over queries and paired differences between arms (experiments/rewrite_esci_results.py).
        "per_query": {"query": [report_text(q.text) for q in queries], "recall": [float(r) for r in recalls],
                      "ndcg": [float(n) for n in ndcgs]},
        "examples": [{"query": report_text(q.text), "rewrite": report_text(r) if r is not None else None}
                     for q, r in list(zip(queries, rewrites))[:5]],
    }
