"""Plots of a run, from its metrics.jsonl and eval metrics (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps), np.asarray(values, np.float64)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window // 2, window - 1 - window // 2), mode="edge"), kernel, "valid")


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(rows: Sequence[dict], path: str, keys: Sequence[str] = ("rl/reward", "rl/accuracy"),
                    window: int = 5) -> str:
    """Raw (faint) and smoothed curves of `keys` over steps."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        steps, values = _series(rows, key)
        if len(steps):
            line, = ax.plot(steps, _smooth(values, window), label=key)
            ax.plot(steps, values, alpha=0.25, color=line.get_color())
    ax.set_xlabel("RL step")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def method_curves(runs: Mapping[str, Sequence[Sequence[dict]]], key: str, path: str, window: int = 9) -> str:
    """Per method, the smoothed `key` over steps averaged over its runs (seeds), min–max over runs shaded."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, method_runs in sorted(runs.items()):
        curves = [_series(rows, key) for rows in method_runs]
        curves = [(steps, _smooth(values, window)) for steps, values in curves if len(steps)]
        if not curves:
            continue
        length = min(len(steps) for steps, _ in curves)
        steps, stacked = curves[0][0][:length], np.stack([values[:length] for _, values in curves])
        line, = ax.plot(steps, stacked.mean(0), label=f"{method} ({len(curves)})")
        ax.fill_between(steps, stacked.min(0), stacked.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"{key} (smoothed, mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def phi_curves(rows: Sequence[dict], path: str) -> str:
    """φ per edge over steps."""
    keys = sorted({k for r in rows for k in r if k.startswith("phi/")})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        steps, values = _series(rows, key)
        ax.plot(steps, values, label=key[len("phi/"):])
    ax.set_xlabel("RL step")
    ax.set_ylabel("φ")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def node_advantage_spread(rows: Sequence[dict], nodes: Sequence[str], path: str) -> str:
    """Per-node advantage std over steps: how differently graph credit treats the nodes."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for node in nodes:
        steps, values = _series(rows, f"credit/adv_std/{node}")
        if len(steps):
            ax.plot(steps, _smooth(values, 5), label=node)
    ax.set_xlabel("RL step")
    ax.set_ylabel("std of node advantage")
    ax.legend(fontsize=8, ncol=4)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def paired_by_seed(values: Mapping[str, Mapping[str, Sequence[float]]], path: str) -> str:
    """One panel per metric ({metric: {row: [value per seed]}}): each seed's runs joined by a grey line, so a
    paired gain shows as lines that rise; the mean over seeds in black."""
    fig, axes = plt.subplots(1, len(values), figsize=(4.2 * len(values), 4.2), squeeze=False)
    for ax, (metric, rows) in zip(axes[0], values.items()):
        names = list(rows)
        table = np.asarray([rows[name] for name in names], np.float64)  # (row, seed)
        x = np.arange(len(names))
        ax.plot(x, table, color="0.6", lw=0.8, marker=".")
        ax.plot(x, table.mean(1), color="k", lw=2, marker="o", label=f"mean of {table.shape[1]} seeds")
        ax.set_xticks(x, [name.replace(", ", ",\n") for name in names], fontsize=7, rotation=20, ha="right")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def confusion_matrix(report: dict, path: str, title: str = "") -> str:
    """The confusion matrix of a classification report (rows gold, columns predicted + format failure)."""
    cm = report["confusion_matrix"]
    counts = np.asarray(cm["counts"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(counts.shape[1]), [c.replace("<format failure>", "format\nfailure") for c in cm["cols_pred"]],
                  fontsize=8)
    ax.set_yticks(range(counts.shape[0]), cm["rows_gold"], fontsize=8)
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > counts.max() / 2 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    return _save(fig, path)
