"""Classification metrics for relevance judgements: accuracy, macro-F1, per-class P/R/F1, AUC, confusion.

Pure numpy over integer label ids. A prediction of -1 means "no valid label" (a format failure): it is
counted wrong for every class and reported as the format-failure rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(gold: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes + 1] counts; rows are gold, the last column counts format failures."""
    gold, pred = np.asarray(gold, np.int64), np.asarray(pred, np.int64)
    cols = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    matrix = np.zeros((num_classes, num_classes + 1), np.int64)
    np.add.at(matrix, (gold, cols), 1)
    return matrix


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC as the Mann–Whitney statistic (ties count half); NaN when a class is absent."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties (1-based).
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_report(gold: Sequence[int], pred: Sequence[int], class_names: Sequence[str],
                          probs: np.ndarray | None = None, negative_class: str | None = None) -> dict:
    """All relevance metrics as a JSON-ready dict.

    `probs` [N, C] (label probabilities, e.g. from forced decoding) adds one-vs-rest AUC per class and
    their macro mean; with `negative_class` (e.g. "Irrelevant") it also adds the binary AUC of
    "relevant vs negative_class" scored by 1 − p(negative_class).
    """
    gold, pred = np.asarray(gold, np.int64), np.asarray(pred, np.int64)
    num_classes = len(class_names)
    matrix = confusion_matrix(gold, pred, num_classes)
    tp = np.diag(matrix[:, :num_classes]).astype(np.float64)
    predicted = matrix[:, :num_classes].sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = support > 0
    report = {
        "num_examples": int(len(gold)),
        "accuracy": float(tp.sum() / max(len(gold), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "format_failure_rate": float(matrix[:, num_classes].sum() / max(len(gold), 1)),
        "per_class": {name: {"precision": float(precision[c]), "recall": float(recall[c]),
                             "f1": float(f1[c]), "support": int(support[c])}
                      for c, name in enumerate(class_names)},
        "confusion_matrix": {"rows_gold": list(class_names), "cols_pred": [*class_names, "<format failure>"],
                             "counts": matrix.tolist()},
    }
    if probs is not None:
        probs = np.asarray(probs, np.float64)
        per_class_auc = {name: binary_auc(probs[:, c], gold == c) for c, name in enumerate(class_names)}
        finite = [v for v in per_class_auc.values() if np.isfinite(v)]
        report["auc"] = {"per_class": per_class_auc, "macro": float(np.mean(finite)) if finite else float("nan")}
        if negative_class is not None:
            neg = list(class_names).index(negative_class)
            report["auc"][f"not_{negative_class}"] = binary_auc(1.0 - probs[:, neg], gold != neg)
    return report
