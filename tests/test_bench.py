"""Smoke runs of the peer benchmarks (experiments/bench/) at tiny sizes, one repetition.

Our side always runs; the PyTorch / transformers / TRL side only where the `bench` extra is installed,
and then both sides must compute the same thing: identical greedy tokens and equal first training
losses from the same exported weights.
"""

import dataclasses
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench"))
import bench_grpo_step  # noqa: E402
import bench_sampling  # noqa: E402
import bench_scaling  # noqa: E402
import bench_train_step  # noqa: E402
import common  # noqa: E402

needs_peers = pytest.mark.skipif(not common.peers_available(), reason="torch (the bench extra) is not installed")


def test_analytic_train_flops_of_the_tiny_preset():
    config, params = common.policy("tiny")
    # Per layer: norms 2·64, q 64·64 + 64, k and v 64·32 + 32 each, o 64·64, MLP 3·64·128 -> 37,120;
    # two layers, the final norm and the (tied) 1024 x 64 head: N = 139,840.
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 139_840
    batch, length = 2, 8
    expected = 6 * 139_840 * batch * length + 12 * 2 * batch * length ** 2 * 4 * 16
    assert common.analytic_train_flops(config, params, batch, length) == expected == 13_621_248


def test_timed_pairs_alternates_and_takes_medians():
    calls = []
    timing = common.timed_pairs({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3)
    assert calls == ["a", "b"] * 4
    assert all(len(t.times_s) == 3 and t.median_s == sorted(t.times_s)[1] for t in timing.values())


def test_prompts_are_left_padded_and_agreement_counts_prefixes():
    tokens, mask = bench_sampling.random_prompts(batch=6, prompt_len=10, vocab_size=50)
    assert mask[:, -1].all() and (mask.sum(1) >= 5).all()
    assert (np.diff(mask.astype(int), axis=1) >= 0).all()  # padding only on the left
    assert ((tokens == 0) == ~mask).all()
    ours = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6]])
    theirs = np.array([[1, 2, 3], [1, 9, 3], [7, 5, 6]])
    assert common.greedy_agreement(ours, theirs) == (pytest.approx(1 / 3), pytest.approx(4 / 3))


def test_scaling_settings_double_one_knob_at_a_time():
    base = dict(num_prompts=8, group=8, completion_len=64)
    got = bench_scaling.settings(base, [1, 2])
    assert got == [("base", 1, base), ("group", 2, {**base, "group": 16}),
                   ("num_prompts", 2, {**base, "num_prompts": 16}),
                   ("completion_len", 2, {**base, "completion_len": 128})]


def test_letter_share_reward():
    assert bench_grpo_step.letter_share("ab1 ") == 0.5
    assert bench_grpo_step.letter_share("") == 0.0


def test_sampling_ours_runs():
    rows, notes = bench_sampling.run("tiny", batches=[2], prompt_len=8, new_tokens=4, reps=1, peers=False)
    assert [row[0] for row in rows] == ["B=2, greedy", "B=2, sampled"] and notes == []
    for row in rows:
        # Throughput = 2 rows × 4 new tokens / the median, which the table rounds to 3 decimals.
        seconds, throughput = float(row[2]), float(row[3].replace(",", ""))
        assert 2 * 4 / (seconds + 5e-4) - 0.5 <= throughput <= 2 * 4 / max(seconds - 5e-4, 1e-9) + 0.5


def test_train_step_ours_runs():
    rows, notes = bench_train_step.run("tiny", batch_size=2, length=8, matmul_n=64, reps=1, peers=False,
                                       microbatches=(1, 2))
    assert [row[0] for row in rows] == ["train step, ours (jax)", "train step, ours, 2 microbatches (jax)",
                                        "matmul 64³ fp32, jax"]
    assert float(rows[0][4]) > 0 and "0.0 GFLOP per step" in notes[0]  # 0.014 GFLOP


def test_train_step_lora_side_runs_and_reports_its_ratio():
    rows, notes = bench_train_step.run("tiny", batch_size=2, length=8, matmul_n=64, reps=1, peers=False,
                                       lora_rank=4)
    assert [row[0] for row in rows] == ["train step, ours (jax)", "train step, ours, LoRA r=4 (jax)",
                                        "matmul 64³ fp32, jax"]
    assert notes[0].startswith("**LoRA r=4 step / full step (ours): ") and "target <= 0.6x" in notes[0]
    config, params = common.policy("tiny")
    lora_config = dataclasses.replace(config, lora_rank=4)
    full = common.analytic_train_flops(config, params, 2, 8)
    adapted = common.analytic_lora_train_flops(lora_config, params, 2, 8)
    assert 4 / 6 * full < adapted < full  # frozen weights skip a third of their matmuls; adapters add a little


def test_grpo_step_ours_runs():
    rows, notes = bench_grpo_step.run("tiny", num_prompts=2, group=2, completion_len=4, prompt_len=32, reps=1,
                                      peers=False, microbatches=2)
    assert [row[0] for row in rows] == ["ours"] and "our update in 2 slice(s)" in notes[0]
    # Rollouts/s = 4 rollouts / the median step, which the table rounds to 2 decimals (rollouts/s to 1).
    seconds, rollouts_per_s = float(rows[0][2]), float(rows[0][3])
    assert 4 / (seconds + 5e-3) - 0.05 <= rollouts_per_s <= 4 / max(seconds - 5e-3, 1e-9) + 0.05
    assert "sample" in notes[-1] and "update" in notes[-1]


def _world_checkpoint(folder, make_chat_checkpoint):
    from graphgrpo_jax.data import prepare, world as world_lib
    return make_chat_checkpoint(folder, prepare.corpus(world_lib.build_world())[:400], 600)


def test_grpo_step_on_a_checkpoint_with_lora_runs(tmp_path, make_chat_checkpoint):
    folder = _world_checkpoint(tmp_path / "checkpoint", make_chat_checkpoint)
    rows, notes = bench_grpo_step.run("tiny", num_prompts=2, group=2, completion_len=4, prompt_len=48, reps=1,
                                      peers=False, hf_checkpoint=str(folder), lora_rank=2)
    assert [row[0] for row in rows] == ["ours"]
    assert notes[0].startswith("checkpoint checkpoint;") and "LoRA rank 2, alpha 4" in notes[0]


@needs_peers
def test_peer_grpo_step_with_peft_lora_runs(tmp_path, make_chat_checkpoint):
    pytest.importorskip("peft", reason="peft (the bench extra) is not installed")
    folder = _world_checkpoint(tmp_path / "checkpoint", make_chat_checkpoint)
    rows, notes = bench_grpo_step.run("tiny", num_prompts=2, group=2, completion_len=4, prompt_len=48, reps=1,
                                      peers=True, hf_checkpoint=str(folder), lora_rank=2)
    assert [row[0] for row in rows] == ["trl", "ours"] and notes[0].startswith("**ours vs TRL")


@needs_peers
def test_peer_generate_decodes_the_same_greedy_tokens(tmp_path):
    config, params = common.policy("tiny")
    model = common.torch_twin(params, config, tmp_path)
    tokens, mask = bench_sampling.random_prompts(batch=3, prompt_len=8, vocab_size=config.vocab_size)
    ours = bench_sampling.our_sampler(params, config, tokens, mask, 6, bench_sampling.MODES["greedy"])()
    theirs = bench_sampling.hf_sampler(model, tokens, mask, 6, bench_sampling.MODES["greedy"])()
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


@needs_peers
def test_peft_lora_step_starts_from_our_lora_loss(tmp_path):
    pytest.importorskip("peft", reason="peft (the bench extra) is not installed")
    config, params = common.policy("tiny")
    lora_config = dataclasses.replace(config, lora_rank=4, lora_alpha=8.0)
    batch = bench_train_step.sft_batch(2, 8, config.vocab_size)
    ours, our_losses = bench_train_step.our_step(params, lora_config, batch)
    theirs, their_losses = bench_train_step.torch_lora_step(common.torch_twin(params, config, tmp_path), batch, 4,
                                                            8.0, lora_config.lora_targets)
    ours(), theirs()
    np.testing.assert_allclose(float(our_losses[0]), their_losses[0], rtol=1e-5)  # B = 0 on both sides


@needs_peers
def test_peer_train_step_starts_from_the_same_loss(tmp_path):
    config, params = common.policy("tiny")
    batch = bench_train_step.sft_batch(2, 8, config.vocab_size)
    ours, our_losses = bench_train_step.our_step(params, config, batch, microbatches=2)
    theirs, their_losses = bench_train_step.torch_step(common.torch_twin(params, config, tmp_path), batch)
    for _ in range(2):
        ours(), theirs()
    # Near-uniform predictions from 0.02-scale random weights: about log(vocab); the same data and weights
    # give the same loss, and the same optimizer keeps them together after a step.
    assert float(our_losses[0]) == pytest.approx(np.log(config.vocab_size), rel=0.01)
    np.testing.assert_allclose(np.asarray(our_losses, float), their_losses, rtol=1e-5)


@needs_peers
def test_grpo_step_peer_runs():
    rows, notes = bench_grpo_step.run("tiny", num_prompts=2, group=2, completion_len=4, prompt_len=32, reps=1,
                                      peers=True)
    assert [row[0] for row in rows] == ["trl", "ours"] and notes[0].startswith("**ours vs TRL")
