"""Relevance metrics against hand-worked values."""

import numpy as np
import pytest

from graphgrpo_jax.eval import classification


def test_report_matches_hand_computation():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, -1, 2]  # -1: a format failure
    r = classification.classification_report(gold, pred, ["E", "S", "I"])
    assert r["confusion_matrix"]["counts"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1]]
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["format_failure_rate"] == pytest.approx(1 / 6)
    assert r["per_class"]["E"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert r["per_class"]["S"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert r["per_class"]["I"]["f1"] == pytest.approx(2 / 3)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)


def test_macro_f1_ignores_absent_classes():
    r = classification.classification_report([0, 0, 1], [0, 1, 1], ["E", "S", "C"])
    assert r["per_class"]["C"]["support"] == 0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_binary_auc_by_pair_counting():
    assert classification.binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert classification.binary_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert np.isnan(classification.binary_auc([0.2, 0.3], [1, 1]))
    rng = np.random.default_rng(0)
    scores, labels = rng.random(200).round(1), rng.random(200) < 0.4  # rounding makes many ties
    pos, neg = scores[labels], scores[~labels]
    expected = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert classification.binary_auc(scores, labels) == pytest.approx(expected)


def test_auc_from_label_probabilities():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]])
    gold = [0, 1, 2, 2]
    r = classification.classification_report(gold, probs.argmax(1), ["E", "S", "I"], probs=probs,
                                             negative_class="I")
    assert r["auc"]["per_class"]["E"] == pytest.approx(1.0)
    assert r["auc"]["per_class"]["I"] == pytest.approx(1.0)
    # relevant (gold E,S) scored by 1 - p(I): 0.9, 0.8 vs irrelevant 0.2, 0.6 -> all pairs ordered
    assert r["auc"]["not_I"] == pytest.approx(1.0)
