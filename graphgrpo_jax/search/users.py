"""Simulated shoppers on result pages: position-biased examination, relevance-dependent clicks, purchases.

The offline A/B test (`search/ab.py`) needs users whose behaviour responds to what a search stack shows
them the way real shoppers do, with knobs whose values are known, so that the simulation itself can be
checked (its click and purchase rates must match the configured probabilities) and an arm's effect can be
read as a change in behaviour. The model is the position-based click model (Craswell et al., 2008) with
a purchase step:

* examination: the slot at rank r (1-based) is looked at with probability r^(-examination_decay),
  independently of the other slots (rank 1 always, rank 10 with 0.1 at the default decay 1);
* click: an examined product is clicked with a probability that depends on its true ESCI label,
  `click.Exact ≫ click.Substitute > click.Complement > click.Irrelevant` by default;
* purchase: a clicked product that matches the query's intent (its label is Exact: the right type with
  every asked attribute) is bought with probability `purchase_given_click`; nothing else is bought.

Pages are given as label ids `[S, K]` (index into `LABELS`, `EMPTY` for a slot the page leaves empty), so
a whole session stream is simulated with a few vectorised numpy draws from one seeded generator.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections
import numpy as np

from graphgrpo_jax.data.cot import LABELS

EMPTY = -1  # label id of a slot the page leaves empty (fewer than k results)
EXACT = LABELS.index("Exact")


def default_user_config() -> ml_collections.ConfigDict:
    """The `config.users` section."""
    return ml_collections.ConfigDict(dict(
        examination_decay=1.0,  # P(examine rank r) = r ** -decay
        click=dict(Exact=0.6, Substitute=0.25, Complement=0.1, Irrelevant=0.02),  # P(click | examined, label)
        purchase_given_click=0.3,  # P(buy | clicked, intent-matching product)
    ))


def validate_user_config(cfg: ml_collections.ConfigDict) -> None:
    """Fails with the offending `config.users` field."""
    if not np.isfinite(cfg.examination_decay) or cfg.examination_decay < 0:
        raise ValueError(f"config.users.examination_decay = {cfg.examination_decay!r}: must be finite and >= 0")
    if set(cfg.click) != set(LABELS):
        raise ValueError(f"config.users.click has labels {sorted(cfg.click)}; it needs exactly {list(LABELS)}")
    for label in LABELS:
        if not 0.0 <= cfg.click[label] <= 1.0:
            raise ValueError(f"config.users.click.{label} = {cfg.click[label]!r}: must be a probability")
    if not 0.0 <= cfg.purchase_given_click <= 1.0:
        raise ValueError(f"config.users.purchase_given_click = {cfg.purchase_given_click!r}: must be a probability")


def examination_probabilities(cfg: ml_collections.ConfigDict, k: int) -> np.ndarray:
    """[k] P(the slot at rank r = 1..k is examined)."""
    return np.arange(1, k + 1, dtype=np.float64) ** -float(cfg.examination_decay)


def click_probabilities(cfg: ml_collections.ConfigDict) -> np.ndarray:
    """[len(LABELS) + 1] P(click | examined) per label id, with the empty slot (id -1, the last entry) at 0."""
    return np.array([cfg.click[label] for label in LABELS] + [0.0], np.float64)


class Behaviour(NamedTuple):
    """What each simulated session did with each slot of its page, all [S, K] bool."""

    examined: np.ndarray
    clicked: np.ndarray
    purchased: np.ndarray


def simulate(cfg: ml_collections.ConfigDict, page_labels: np.ndarray, rng: np.random.Generator) -> Behaviour:
    """One user session per row of `page_labels` ([S, K] label ids, `EMPTY` for an empty slot)."""
    page_labels = np.asarray(page_labels)
    if page_labels.ndim != 2:
        raise ValueError(f"page_labels must be [sessions, k], got shape {page_labels.shape}")
    if page_labels.size and (page_labels.min() < EMPTY or page_labels.max() >= len(LABELS)):
        raise ValueError(f"page_labels must hold label ids in [{EMPTY}, {len(LABELS) - 1}], got values "
                         f"{np.unique(page_labels).tolist()}")
    sessions, k = page_labels.shape
    examined = rng.random((sessions, k)) < examination_probabilities(cfg, k)
    examined &= page_labels != EMPTY
    clicked = examined & (rng.random((sessions, k)) < click_probabilities(cfg)[page_labels])
    purchased = clicked & (page_labels == EXACT) & (rng.random((sessions, k)) < cfg.purchase_given_click)
    return Behaviour(examined=examined, clicked=clicked, purchased=purchased)
