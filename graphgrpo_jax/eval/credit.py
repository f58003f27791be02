"""Credit diagnostics: does a credit rule blame the reasoning step that is actually wrong?

The synthetic world knows every node's gold value, so each rollout's nodes are right or wrong. For
each credit variant, over the *candidate* nodes of a rollout (parsed nodes other than the root: the
root of a wrong-label rollout is wrong by definition, and its credit is the outcome itself):

* blame precision@1: among rollouts whose label is wrong and that have at least one wrong candidate,
  the share whose lowest-credit candidate is wrong. Ties (credits within `tie_tol` of the minimum)
  are broken deterministically towards the node closest to the root (lowest topological level),
  then the earliest in spec order: when a reading inherits its match node's credit (consumer
  evidence, φ = 1), the shared number is evidence about the match node, so that node is blamed.
* tie-expected precision: the same, with the pick uniformly random among the tied minimum nodes.
* random baseline: the expected precision of a uniformly random candidate.
* correlation: Pearson's r between a node's credit and its correctness (1 right, 0 wrong) over all
  candidate nodes of all rollouts (NaN when either side has no spread).

Outcome credit (c = R on every node) ties everywhere, so its precision@1 only says how the ties
resolve, and its tie-expected precision equals the random baseline: it cannot localise blame. METHOD.md
A2' found blame precision high for every evidence rule yet unrelated to faster learning: a diagnostic,
not a success metric.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import jraph
import numpy as np

from graphgrpo_jax.graph import credit as graph_credit
from graphgrpo_jax.graph.spec import GraphSpec


@dataclasses.dataclass(frozen=True)
class CreditDiagnostics:
    blame_precision_at_1: float
    blame_precision_tie_expected: float
    blame_random_baseline: float
    credit_correctness_corr: float
    num_blamed: int  # wrong-label rollouts with at least one wrong candidate node


def node_correctness(node_values: np.ndarray, gold_node_values: np.ndarray) -> np.ndarray:
    """`[N, V]` bool: the parsed value id equals the gold one (a missing node, -1, is not right)."""
    node_values, gold_node_values = np.asarray(node_values), np.asarray(gold_node_values)
    if node_values.shape != gold_node_values.shape:
        raise ValueError(f"node_values {node_values.shape} and gold_node_values "
                         f"{gold_node_values.shape} differ in shape")
    return (node_values >= 0) & (node_values == gold_node_values)


def credit_diagnostics(spec: GraphSpec, credits: np.ndarray, node_correct: np.ndarray,
                       label_correct: np.ndarray, present: np.ndarray,
                       tie_tol: float = 1e-6) -> CreditDiagnostics:
    """Blame precision and credit/correctness correlation of one variant's `[N, V]` credits."""
    credits = np.asarray(credits, np.float64)
    node_correct, present = np.asarray(node_correct, bool), np.asarray(present, bool)
    label_correct = np.asarray(label_correct, bool)
    shape = (label_correct.shape[0], spec.num_nodes)
    for name, array in (("credits", credits), ("node_correct", node_correct), ("present", present)):
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}; expected {shape} (nodes {spec.nodes})")

    candidate = present & (np.arange(spec.num_nodes) != spec.root)
    wrong = candidate & ~node_correct
    blamed = ~label_correct & wrong.any(axis=1)

    lowest = np.min(np.where(candidate, credits, np.inf), axis=1, keepdims=True)
    tied = candidate & (credits <= lowest + tie_tol)
    priority = np.empty(spec.num_nodes, np.int64)  # rank: closest to the root first, then spec order
    priority[np.lexsort((np.arange(spec.num_nodes), spec.levels))] = np.arange(spec.num_nodes)
    pick = np.argmin(np.where(tied, priority, spec.num_nodes), axis=1)
    hit = wrong[np.arange(shape[0]), pick]
    tie_expected = (tied & wrong).sum(axis=1) / np.maximum(tied.sum(axis=1), 1)
    random_pick = wrong.sum(axis=1) / np.maximum(candidate.sum(axis=1), 1)

    def mean_over_blamed(x: np.ndarray) -> float:
        return float(np.mean(x[blamed])) if blamed.any() else float("nan")

    x, y = credits[candidate], node_correct[candidate].astype(np.float64)
    spread = x.size > 1 and np.std(x) > 0 and np.std(y) > 0
    corr = float(np.corrcoef(x, y)[0, 1]) if spread else float("nan")
    return CreditDiagnostics(
        blame_precision_at_1=mean_over_blamed(hit),
        blame_precision_tie_expected=mean_over_blamed(tie_expected),
        blame_random_baseline=mean_over_blamed(random_pick),
        credit_correctness_corr=corr,
        num_blamed=int(blamed.sum()),
    )


def diagnose_variants(spec: GraphSpec, graph: jraph.GraphsTuple, phi: np.ndarray,
                      node_correct: np.ndarray, label_correct: np.ndarray, present: np.ndarray,
                      settings: graph_credit.CreditSettings,
                      variants: Sequence[str] | None = None) -> dict[str, CreditDiagnostics]:
    """`credit_diagnostics` of each variant's credits on one encoded batch (first N graphs)."""
    num_rollouts = np.asarray(label_correct).shape[0]
    results = {}
    for variant in variants or graph_credit.variant_names():
        out = graph_credit.node_credit(graph, jnp.asarray(phi, jnp.float32), spec=spec,
                                       settings=dataclasses.replace(settings, variant=variant))
        credits = np.asarray(out.credits)[:num_rollouts]
        results[variant] = credit_diagnostics(spec, credits, node_correct, label_correct, present)
    return results
