"""CoT random masking: labels are always supervised, about p_mask of the reasoning is not. The SFT step's
loss against the decoder's log-probs, and its microbatched form against one pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from graphgrpo_jax.models import decoder
from graphgrpo_jax.train import sft, state as state_lib

NUM_NODES, LABEL = 7, 6


def _batch(rng: np.random.Generator, batch: int = 64, length: int = 96):
    """Prompt (-2), then runs of node tokens, glue tokens (-1) and padding, like a real SFT batch."""
    node_ids = np.full((batch, length), -2, np.int32)
    loss_mask = np.zeros((batch, length), bool)
    for b in range(batch):
        t = int(rng.integers(5, 15))
        for node in rng.permutation(NUM_NODES):
            n = int(rng.integers(1, 6))
            node_ids[b, t:t + n] = node
            t += n
        node_ids[b, t] = -1  # end of sequence: outside every node span
        loss_mask[b, node_ids[b] != -2] = True
    return jnp.asarray(loss_mask), jnp.asarray(node_ids)


@pytest.mark.parametrize("unit", ["token", "node"])
def test_label_tokens_are_never_masked_and_p_mask_of_reasoning_is(unit):
    loss_mask, node_ids = _batch(np.random.default_rng(0))
    p_mask = 0.3
    shares = []
    for seed in range(5):
        kept = np.asarray(sft.cot_random_mask(jax.random.PRNGKey(seed), loss_mask, node_ids, label_node=LABEL,
                                              num_nodes=NUM_NODES, p_mask=p_mask, unit=unit))
        lm, ids = np.asarray(loss_mask), np.asarray(node_ids)
        assert kept[ids == LABEL].all()
        assert kept[ids == -1].all()  # glue / EOS stays supervised
        assert not kept[~lm].any()  # prompt and padding never enter the loss
        reasoning = lm & (ids >= 0) & (ids != LABEL)
        shares.append(1 - kept[reasoning].mean())
        if unit == "node":  # whole nodes go together
            for b in range(ids.shape[0]):
                for node in range(LABEL):
                    assert len(set(kept[b, ids[b] == node])) == 1
    assert np.mean(shares) == pytest.approx(p_mask, abs=0.03)


def test_zero_p_mask_changes_nothing():
    loss_mask, node_ids = _batch(np.random.default_rng(1), batch=4)
    kept = sft.cot_random_mask(jax.random.PRNGKey(0), loss_mask, node_ids, label_node=LABEL,
                               num_nodes=NUM_NODES, p_mask=0.0)
    np.testing.assert_array_equal(kept, loss_mask)


def test_unknown_unit_is_refused():
    loss_mask, node_ids = _batch(np.random.default_rng(2), batch=2)
    with pytest.raises(ValueError, match="mask_unit"):
        sft.cot_random_mask(jax.random.PRNGKey(0), loss_mask, node_ids, label_node=LABEL, num_nodes=NUM_NODES,
                            p_mask=0.3, unit="span")


# --------------------------------------------------------------------------------------------------
# The SFT step, in one pass and in microbatches
# --------------------------------------------------------------------------------------------------

MODEL = decoder.DecoderConfig(arch="qwen2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=64, qkv_bias=True, max_seq_len=64)


def _sft_batch(rows: int = 8, length: int = 56) -> dict:
    rng = np.random.default_rng(3)
    loss_mask, node_ids = _batch(rng, batch=rows, length=length)
    return {"tokens": rng.integers(2, MODEL.vocab_size, (rows, length)).astype(np.int32),
            "attention_mask": np.arange(length)[None] >= rng.integers(0, 4, (rows, 1)),
            "loss_mask": np.asarray(loss_mask), "node_ids": np.asarray(node_ids)}


@functools.cache
def _one_step(microbatches: int) -> tuple[dict, dict, dict]:
    """(state after one step, its metrics, the state before) on `_sft_batch()`."""
    batch = _sft_batch()
    optimizer = optax.sgd(1.0)  # params move by the gradient itself (Adam's first step is ~lr·sign(g))
    state = state_lib.create_state(decoder.init_params(MODEL, jax.random.key(0)), optimizer, jax.random.key(1))
    step = sft.make_train_step(MODEL, optimizer, label_node=LABEL, num_nodes=NUM_NODES, p_mask=0.3,
                               mask_unit="token", microbatches=microbatches)
    return jax.device_get(jax.jit(step)(state, batch)) + (jax.device_get(state),)


def test_loss_is_the_mean_nll_of_the_kept_tokens():
    batch = _sft_batch()
    _, metrics, state = _one_step(1)
    kept = sft.cot_random_mask(jax.random.split(state["rng"])[1], batch["loss_mask"], batch["node_ids"],
                               label_node=LABEL, num_nodes=NUM_NODES, p_mask=0.3)
    logp = np.asarray(decoder.token_log_probs(state["params"], MODEL, batch["tokens"], batch["attention_mask"]))
    kept = np.asarray(kept)
    assert metrics["sft/supervised_tokens"] == kept.sum() < batch["loss_mask"].sum()
    np.testing.assert_allclose(metrics["sft/loss"], -logp[kept].mean(), rtol=1e-6)


def test_microbatches_give_the_one_pass_update():
    (whole, whole_metrics, start), (sliced, sliced_metrics, _) = _one_step(1), _one_step(4)  # 4 slices of 2 rows
    for key, value in whole_metrics.items():
        np.testing.assert_allclose(sliced_metrics[key], value, rtol=1e-5, err_msg=key)
    before, after, after_sliced = (_named_leaves(s["params"]) for s in (start, whole, sliced))
    assert max(np.abs(before[name] - after[name]).max() for name in before) > 1e-2  # the comparison means something
    for name in before:
        np.testing.assert_allclose(before[name] - after_sliced[name], before[name] - after[name], rtol=1e-4,
                                   atol=1e-8, err_msg=name)


def _named_leaves(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_summed_value_and_grad_refuses_a_split_that_does_not_divide():
    with pytest.raises(ValueError, match="microbatches=3 of blocks of 1 rows must divide the batch.s rows \\[8\\]"):
        state_lib.summed_value_and_grad(lambda p, b: (p * b).sum(), jnp.ones(()), jnp.ones((8, 2)), 3)
