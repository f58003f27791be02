"""The resumable training loop every stage (SFT, RL, distillation) runs its step function in.

A stage supplies a pure `step_fn(state, batch) -> (state, metrics)` (jitted by the caller, with its own
shardings) and a `batch_fn(step) -> batch` that is a deterministic function of the step. The data position
is therefore the step itself: restoring the state at step k and calling `batch_fn(k)` next continues the
run exactly where it stopped, bit for bit, on the same devices.

`state` is any pytree of arrays (by convention a dict with `params`, `opt_state`, `rng`, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from absl import logging

from graphgrpo_jax import artifacts, checkpointing, metrics as metrics_lib

StepFn = Callable[[Any, Any], tuple[Any, Mapping[str, Any]]]


def fit(
    state: Any,
    step_fn: StepFn,
    batch_fn: Callable[[int], Any],
    *,
    num_steps: int,
    workdir: str,
    stage: str,
    save_every: int = 0,
    max_to_keep: int = 2,
    log_every: int = 1,
    eval_fn: Callable[[Any, int], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    progress_keys: Sequence[str] = (),
    async_save: bool = True,
) -> Any:
    """Runs `step_fn` from the newest checkpoint of `stage` (or from `state`) up to `num_steps`.

    Metrics go to `<workdir>/<stage>/` (TensorBoard + metrics.jsonl), checkpoints to
    `<workdir>/checkpoints/<stage>/`, every `save_every` steps (0: only at the end) and always at the end.
    `eval_fn(state, step)` runs every `eval_every` steps and at the end; its scalars are logged too.
    """
    with checkpointing.Checkpointer(artifacts.checkpoint_dir(workdir, stage), max_to_keep=max_to_keep,
                                    save_every=save_every, async_save=async_save) as ckpt, \
            metrics_lib.MetricsWriter(workdir, stage) as writer:
        start = 0
        restored = ckpt.restore_latest(state)
        if restored is not None:
            state, start = restored.state, restored.step
            logging.info("%s: resumed from step %d", stage, start)
        timer, last_logged = metrics_lib.StepTimer(), start
        with metrics_lib.progress(total=num_steps, initial=start, desc=stage) as bar:
            for step in range(start + 1, num_steps + 1):
                state, step_metrics = step_fn(state, batch_fn(step - 1))
                scalars = dict(step_metrics)
                if eval_fn is not None and eval_every and step % eval_every == 0 and step != num_steps:
                    scalars.update(eval_fn(state, step))
                if step % log_every == 0 or step == num_steps:
                    scalars["time/step_s"] = timer.lap() / (step - last_logged)
                    last_logged = step
                    values = writer.write_scalars(step, scalars)
                    bar.set_postfix(metrics_lib.postfix(values, progress_keys))
                ckpt.save(step, state, {"data_position": step})
                bar.update(1)
        if eval_fn is not None and start < num_steps:
            writer.write_scalars(num_steps, eval_fn(state, num_steps))
        ckpt.save(num_steps, state, {"data_position": num_steps}, force=True)
        ckpt.wait()
    return jax.block_until_ready(state)
