"""Atomic, resumable checkpoints with orbax.

A checkpoint holds one pytree (`state`: params, optimizer state, RNG key, step, φ, ...) and a small JSON
`meta` (data position, config hash, anything a resume needs that is not an array). Orbax writes each step
into a temporary folder and renames it when complete, so a save killed half-way leaves no step behind;
`restore_latest` additionally falls back to older steps when the newest one cannot be read (a folder
corrupted after the fact, a partial copy), so a run always resumes from the newest *good* checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore_latest` returns."""

    step: int
    state: Any
    meta: dict


def _is_empty(x: Any) -> bool:
    return x is not None and math.prod(x.shape) == 0


def _without_empty(tree: Any) -> Any:
    """Zero-size arrays (e.g. the φ of a graph without edges) as None: orbax refuses them, they hold no data."""
    return jax.tree_util.tree_map(lambda x: None if _is_empty(x) else x, tree)


def _leaf_paths(tree: Any) -> set[str]:
    """Leaf paths as "a/b/0" strings, whatever the containers (dicts, named tuples, orbax metadata)."""
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return {"/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
    """Saves every `save_every` steps, keeps the newest `max_to_keep`, restores the newest good one."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 1,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save),
        )

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        """Saves `state` (any pytree of arrays) and `meta` (JSON) as `step`; returns whether it saved."""
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_without_empty(state)),
                                    meta=ocp.args.JsonSave(dict(meta or {}, step=step))),
            force=True,
        )

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore_latest(self, like: Any, *, partial: bool = False) -> Restored | None:
        """Restores the newest readable step into the structure, shapes, dtypes and shardings of `like`.

        `like` is a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`). With `partial`,
        `like` may name only some subtrees of the stored state (e.g. `{"params": ...}`), and only those are
        read. Steps that fail to restore are skipped with a warning, newest first. Returns None when there is
        nothing.
        """
        self.wait()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        for step in reversed(self.all_steps()):
            if partial:  # orbax would hand back a leaf it does not hold as the abstract leaf asked for
                mismatch = self._structure_mismatch(step, abstract, partial=True)
                if mismatch:
                    raise ValueError(f"checkpoint step {step} in {self.directory} lacks part of the state asked "
                                     f"for ({mismatch}); nothing was moved")
                target = _without_empty(abstract)
                state_args = ocp.args.PyTreeRestore(
                    item=target, partial_restore=True,
                    restore_args=jax.tree_util.tree_map(
                        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding or jax.sharding.SingleDeviceSharding(
                            jax.devices()[0]), global_shape=x.shape, dtype=x.dtype),
                        target))
            else:
                state_args = ocp.args.StandardRestore(_without_empty(abstract))
            try:
                out = self._manager.restore(
                    step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 - any unreadable step falls back to the previous one
                mismatch = self._structure_mismatch(step, abstract, partial)
                if mismatch:  # the caller asked for another state, the files are fine: keep them
                    raise ValueError(f"checkpoint step {step} in {self.directory} holds a different state tree "
                                     f"than the one asked for ({mismatch}); nothing was moved") from err
                logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                                step, self.directory, type(err).__name__, err)
                self._set_aside(step)
                continue
            state = jax.tree_util.tree_map(
                lambda a, x: jnp.zeros(a.shape, a.dtype) if _is_empty(a) else x, abstract, out["state"],
                is_leaf=lambda x: x is None)
            return Restored(step=step, state=state, meta=dict(out["meta"]))
        return None

    def stored_paths(self, step: int | None = None) -> set[str]:
        """The leaf paths ("params/layers/...") of the state stored at `step` (default: the newest); empty when
        there is no step or its metadata cannot be read (a damaged step)."""
        steps = self.all_steps()
        step = steps[-1] if step is None and steps else step
        if step is None:
            return set()
        reader = ocp.CheckpointManager(self.directory, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        try:
            return _leaf_paths(reader.item_metadata(step)["state"])
        except Exception:  # noqa: BLE001 - unreadable metadata: a damaged step
            return set()
        finally:
            reader.close()

    def _structure_mismatch(self, step: int, abstract: Any, partial: bool = False) -> str:
        """What differs between the leaves stored at `step` and those of `abstract` ("" when they agree or
        the step's metadata cannot be read, i.e. when the step itself is damaged)."""
        stored = self.stored_paths(step)
        wanted = _leaf_paths(_without_empty(abstract))
        if not stored or stored == wanted or (partial and wanted <= stored):
            return ""
        missing, extra = sorted(wanted - stored), [] if partial else sorted(stored - wanted)
        return "; ".join(f"{what} {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}"
                         for what, paths in (("not stored:", missing), ("stored but not asked for:", extra))
                         if paths)

    def _set_aside(self, step: int) -> None:
        """Renames an unreadable step's folder so the resumed run can save that step again."""
        folder = os.path.join(self.directory, str(step))
        if os.path.isdir(folder):
            aside = f"{folder}.unreadable"
            suffix = 0
            while os.path.exists(aside):
                suffix += 1
                aside = f"{folder}.unreadable-{suffix}"
            os.rename(folder, aside)
            logging.warning("moved unreadable checkpoint %s to %s", folder, aside)
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until an async save has been committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
