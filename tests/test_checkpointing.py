"""Checkpoints: exact round trips, keep-N, and resuming past a killed or corrupted save."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from graphgrpo_jax import checkpointing


def _state(seed: int) -> dict:
    k1, k2, rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {"dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jax.random.normal(k2, (3,))},
              "scale": jnp.arange(5, dtype=jnp.bfloat16)}
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    # One real update so the moments and the count are not at their initial values.
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state, "rng": rng}


def _assert_identical(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
    state = _state(0)
    with checkpointing.Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
        assert ckpt.save(7, state, {"data_position": 7}, force=True)
        ckpt.wait()
        restored = ckpt.restore_latest(jax.tree_util.tree_map(jnp.zeros_like, state))
    assert restored.step == 7
    assert restored.meta["data_position"] == 7
    _assert_identical(restored.state, state)


def test_keeps_newest_n_and_respects_save_every(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path), max_to_keep=2, save_every=2, async_save=False) as ckpt:
        saved = [ckpt.save(step, _state(step)) for step in range(1, 7)]
        assert saved == [False, True, False, True, False, True]
        assert ckpt.all_steps() == [4, 6]
        _assert_identical(ckpt.restore_latest(_state(0)).state, _state(6))


def test_nothing_to_restore(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.restore_latest(_state(0)) is None


@pytest.mark.parametrize("damage", ["in_progress", "corrupted", "emptied"])
def test_resume_skips_a_killed_save(tmp_path, damage):
    with checkpointing.Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(1, _state(1), force=True)
        ckpt.save(2, _state(2), force=True)
    newest = tmp_path / "2"
    if damage == "in_progress":
        # What a save killed mid-write leaves: orbax's temporary folder, never renamed to its step.
        os.rename(newest, tmp_path / "2.orbax-checkpoint-tmp-1234")
    elif damage == "corrupted":
        for path in newest.rglob("*"):
            if path.is_file() and path.stat().st_size > 0 and "state" in str(path):
                path.write_bytes(b"\x00garbage")
    else:
        shutil.rmtree(newest / "state")
    with checkpointing.Checkpointer(str(tmp_path), async_save=False) as ckpt:
        restored = ckpt.restore_latest(_state(0))
        assert restored.step == 1
        _assert_identical(restored.state, _state(1))
        # The resumed run can save step 2 again.
        assert ckpt.save(2, _state(5), force=True)
        _assert_identical(ckpt.restore_latest(_state(0)).state, _state(5))


def test_zero_size_leaves_round_trip(tmp_path):
    """A graph without edges has a φ of shape (0,): orbax cannot store it, the checkpointer rebuilds it."""
    state = dict(_state(3), phi=jnp.zeros((0,), jnp.float32))
    with checkpointing.Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(1, state, force=True)
        restored = ckpt.restore_latest(state)
    _assert_identical(restored.state, state)


def test_asking_for_another_state_fails_and_keeps_the_checkpoint(tmp_path):
    """A mismatched request (e.g. a multi-head student's tree for a single-head checkpoint) is the caller's
    error: it must name the difference and leave the good checkpoint in place, not set it aside as damaged."""
    state = _state(4)
    with checkpointing.Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(3, state, force=True)
    other = dict(state, params=dict(state["params"], head={"kernel": jnp.zeros((3, 2))}))
    with checkpointing.Checkpointer(str(tmp_path), async_save=False) as ckpt:
        with pytest.raises(ValueError, match=r"step 3 .* different state tree .*not stored: params/head/kernel"):
            ckpt.restore_latest(other)
        assert ckpt.all_steps() == [3]
        _assert_identical(ckpt.restore_latest(state).state, state)


def test_partial_restore_reads_only_the_params(tmp_path):
    """Readers of a finished stage (artifacts.policy_params) restore params without rebuilding the optimizer."""
    state = _state(2)
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(5, state, force=True)
        ckpt.wait()
    like = {"params": jax.eval_shape(lambda: state["params"])}
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        restored = ckpt.restore_latest(like, partial=True)
    assert restored.step == 5 and set(restored.state) == {"params"}
    _assert_identical(restored.state["params"], state["params"])
    # Asking for a subtree that was never stored is a named error, and the step is kept.
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(ValueError, match="not stored: params/extra"):
            ckpt.restore_latest({"params": {**like["params"], "extra": jax.ShapeDtypeStruct((2,), jnp.float32)}},
                                partial=True)
        assert ckpt.all_steps() == [5]
