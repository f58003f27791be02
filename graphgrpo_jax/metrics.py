"""Metrics: TensorBoard event files + a JSONL log in the workdir, and progress bars for long loops.

Every scalar goes to both sinks: TensorBoard for browsing, `metrics.jsonl` for scripts and reports (one
JSON object per write: `{"step": s, "tag": value, ...}`). Only process 0 of a multi-host run writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import tqdm


def _to_float(value: Any) -> float:
    return float(np.asarray(jax.device_get(value)).reshape(()))


class MetricsWriter:
    """Writes scalars to `<workdir>/<subdir>/events.*` (TensorBoard) and `<workdir>/<subdir>/metrics.jsonl`."""

    def __init__(self, workdir: str, subdir: str = "", *, enabled: bool | None = None):
        self.logdir = os.path.join(workdir, subdir) if subdir else workdir
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.jsonl_path = os.path.join(self.logdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported lazily: only the writing process needs it

            os.makedirs(self.logdir, exist_ok=True)
            self._tb = SummaryWriter(self.logdir, flush_secs=10)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
        """Logs `scalars` at `step`; arrays are fetched from device once. Returns the floats written."""
        values = {k: _to_float(v) for k, v in jax.device_get(dict(scalars)).items()}
        if not self.enabled:
            return values
        for tag, value in values.items():
            self._tb.add_scalar(tag, value, global_step=step)
        record = {"step": int(step), **{k: (v if math.isfinite(v) else repr(v)) for k, v in values.items()}}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return values

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


REPORT_TEXT_CHARS = 2000  # a report shows a text field up to this length; the data keeps it whole


def report_text(text: str, limit: int = REPORT_TEXT_CHARS) -> str:
    """`text` as a report shows it: whole when short, else its first `limit` characters and how many were left
    out, so a 1 MB title in the data is never a 1 MB report."""
    return text if len(text) <= limit else f"{text[:limit]}…[+{len(text) - limit} chars]"


def read_jsonl(path: str) -> list[dict]:
    """Reads a metrics.jsonl file back (used by reports and tests)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class StepTimer:
    """Wall-clock seconds per step, measured between consecutive `lap()` calls."""

    def __init__(self):
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def progress(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0,
             desc: str = "", enabled: bool | None = None) -> tqdm.tqdm:
    """A tqdm progress bar, shown by process 0 only; update the key metrics with `bar.set_postfix`."""
    show = jax.process_index() == 0 if enabled is None else enabled
    return tqdm.tqdm(iterable, total=total, initial=initial, desc=desc, disable=not show,
                     dynamic_ncols=True, mininterval=1.0)


def postfix(values: Mapping[str, float], keys: Iterable[str]) -> dict[str, str]:
    """The few metrics worth showing on a progress bar, compactly formatted."""
    return {k.split("/")[-1]: f"{values[k]:.4g}" for k in keys if k in values}

