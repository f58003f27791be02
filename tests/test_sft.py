"""CoT random masking: labels are always supervised, about p_mask of the reasoning is not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphgrpo_jax.train import sft

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
