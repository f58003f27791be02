"""Training step: our jitted SFT step vs a PyTorch forward + backward + AdamW of the same HF model.

    python experiments/bench/bench_train_step.py                   # small preset, batch 16 x 128
    python experiments/bench/bench_train_step.py --batch 32 --reps 7 --microbatches 1 2 4 8
    python experiments/bench/bench_train_step.py --preset smollm2-135m --batch 8 --reps 3 --microbatches 1 \
        --lora_rank 16                                              # the real policy's shapes, full vs LoRA

Ours is `train/sft.make_train_step` (mean next-token NLL, global-norm clipping at 1, AdamW b2 0.95, no
weight decay), jitted with the state donated; by default it is timed twice, in one pass over the batch
and in 4 microbatches of rows (`--microbatches`, gradient accumulation: the same update). Theirs is the
loop a PyTorch user writes around the same weights loaded as `Qwen2ForCausalLM` (exported with
`models/hf.py`): `model(ids, labels=ids).loss`, `backward()`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW`
with the same settings. Both see one fixed
batch of random tokens, alternate, and report medians over `--reps`; the first losses must agree (same
weights, same data), which the table's notes show. Achieved FLOP/s (analytic 6·N·tokens + attention) is
also given as a share of an n³ fp32 matmul timed in the same run, the machine's practical peak.

`--lora_rank r` adds our LoRA step (rank r, alpha 2r, every projection adapted; `models/lora.py`) on the same
weights and batch, whose target is at most 0.6x the full step's time: its backward pass computes no weight
gradient of the frozen weights (4·N + 6·N_adapters FLOP per token instead of 6·N).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

from graphgrpo_jax.models import decoder, lora  # noqa: E402
from graphgrpo_jax.train import sft, state as state_lib  # noqa: E402

OPTIM = ml_collections.ConfigDict(dict(learning_rate=1e-4, grad_clip=1.0, b1=0.9, b2=0.95, weight_decay=0.0))


def sft_batch(batch: int, length: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random full-length rows; every token after the first is supervised (what `labels=ids` means in HF)."""
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length)).astype(np.int32)
    loss_mask = np.ones((batch, length), bool)
    loss_mask[:, 0] = False  # nothing predicts the first token
    return {"tokens": tokens, "attention_mask": np.ones((batch, length), bool), "loss_mask": loss_mask,
            "node_ids": np.full((batch, length), -1, np.int32)}


def our_step(params: decoder.Params, config: decoder.DecoderConfig, batch: dict[str, np.ndarray],
             microbatches: int = 1) -> tuple[Callable[[], jax.Array], list[float]]:
    """A closure running one jitted SFT step on its own copy of the params; records each loss.
    `microbatches` > 1: the same update over slices of the batch's rows (gradient accumulation). A config with
    `lora_rank` trains the params' adapters only (params of the base model get fresh ones)."""
    params = decoder.with_adapters(params, config, jax.random.key(1))
    optimizer = state_lib.make_optimizer(OPTIM, num_steps=1)
    step = jax.jit(sft.make_train_step(config, optimizer, label_node=0, num_nodes=1, p_mask=0.0,
                                       mask_unit="token", microbatches=microbatches), donate_argnums=0)
    state = {"value": state_lib.create_state(jax.tree_util.tree_map(jnp.copy, params), optimizer,
                                             jax.random.key(0))}
    batch = jax.device_put(batch)
    losses = []

    def run() -> jax.Array:
        state["value"], metrics = step(state["value"], batch)
        losses.append(metrics["sft/loss"])
        return metrics["sft/loss"]
    return run, losses


def torch_step(model, batch: dict[str, np.ndarray]) -> tuple[Callable[[], None], list[float]]:
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM.learning_rate, betas=(OPTIM.b1, OPTIM.b2),
                                  weight_decay=OPTIM.weight_decay)
    ids = torch.from_numpy(batch["tokens"].astype(np.int64)).to(model.device)
    losses = []

    def run() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return run, losses


def torch_lora_step(model, batch: dict[str, np.ndarray], rank: int, alpha: float, targets: Sequence[str]):
    """`torch_step` of a PEFT LoRA model around `model` (adapters on `targets`, no dropout, PEFT's init: B = 0)."""
    import peft

    lora_config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                                  bias="none", task_type="CAUSAL_LM")
    return torch_step(peft.get_peft_model(model, lora_config), batch)


def _side_name(microbatches: int, lora_rank: int = 0) -> str:
    parts = ["ours"] + ([f"LoRA r={lora_rank}"] if lora_rank else []) + (
        [f"{microbatches} microbatches"] if microbatches > 1 else [])
    return ", ".join(parts)


def run(preset: str, batch_size: int, length: int, matmul_n: int, reps: int, peers: bool,
        microbatches: Sequence[int] = (1,), lora_rank: int = 0) -> tuple[list[list[str]], list[str]]:
    """Table rows and notes; one "ours" side per entry of `microbatches` (1: the whole batch in one pass), and
    with `lora_rank` one LoRA side per entry too."""
    config, params = common.policy(preset)
    lora_config = dataclasses.replace(config, lora_rank=lora_rank, lora_alpha=2.0 * lora_rank)
    batch = sft_batch(batch_size, length, config.vocab_size)
    sides, our_losses, side_flops = {}, {}, {}
    full_flops = common.analytic_train_flops(config, params, batch_size, length)
    for slices in microbatches:
        sides[_side_name(slices)], our_losses[slices] = our_step(params, config, batch, slices)
        side_flops[_side_name(slices)] = full_flops
        if lora_rank:
            name = _side_name(slices, lora_rank)
            sides[name], _ = our_step(params, lora_config, batch, slices)
            side_flops[name] = common.analytic_lora_train_flops(lora_config, params, batch_size, length)
    if peers:
        import torch
        torch.manual_seed(0)
        theirs, their_losses = torch_step(common.torch_twin(params, config, tempfile.mkdtemp(prefix="bench_train_")),
                                          batch)
        sides["torch"] = theirs
        if lora_rank:
            twin = common.torch_twin(params, config, tempfile.mkdtemp(prefix="bench_train_lora_"))
            sides[f"torch, PEFT LoRA r={lora_rank}"], their_lora_losses = torch_lora_step(
                twin, batch, lora_rank, lora_config.lora_alpha, lora_config.lora_targets)
            side_flops[f"torch, PEFT LoRA r={lora_rank}"] = side_flops[_side_name(microbatches[0], lora_rank)]
    timing = common.timed_pairs(sides, reps)
    matmul = common.timed_pairs(common.matmul_sides(matmul_n, peers), reps)
    matmul_flops = {name: 2 * matmul_n ** 3 / t.median_s for name, t in matmul.items()}
    rows = []
    for side, t in timing.items():
        framework = "torch" if side.startswith("torch") else "jax"
        achieved = side_flops.get(side, full_flops) / t.median_s
        rows.append([f"train step, {side} ({framework})", f"{t.first_s:.1f}", f"{t.median_s:.3f}",
                     f"{batch_size * length / t.median_s:,.0f}", f"{achieved / 1e9:.1f}",
                     f"{achieved / matmul_flops[framework]:.0%} of the {framework} matmul"])
    for framework, t in matmul.items():
        rows.append([f"matmul {matmul_n}³ fp32, {framework}", f"{t.first_s:.1f}", f"{t.median_s:.3f}", "",
                     f"{matmul_flops[framework] / 1e9:.1f}", ""])
    notes = [f"{preset} preset, batch {batch_size} × {length}, fp32, {full_flops / 1e9:.1f} GFLOP per step (6N + "
             f"attention); medians of {reps}, sides alternating."]
    if lora_rank:
        trainable = lora.count(decoder.with_adapters(params, lora_config, jax.random.key(1)))[0]
    for slices in microbatches if lora_rank else ():
        full, adapted = timing[_side_name(slices)].median_s, timing[_side_name(slices, lora_rank)].median_s
        verdict = "meets" if adapted <= 0.6 * full else f"misses by {adapted / full - 0.6:.2f}x of the full step"
        notes.insert(0, f"**LoRA r={lora_rank} step / full step ({_side_name(slices)}): {adapted / full:.2f}x** "
                        f"({verdict}: target <= 0.6x); {trainable:,} trainable params; the LoRA rows' GFLOP/s "
                        f"count 4N + 6N_adapters per token.")
    if peers:
        ratios = ", ".join(f"{side} {common.ratio(timing[side].median_s, timing['torch'].median_s)}"
                           for side in timing if not side.startswith("torch") and "LoRA" not in side)
        notes.insert(0, f"**ours vs torch: {ratios}** (torch median / our median).")
        if lora_rank:
            peft_side = f"torch, PEFT LoRA r={lora_rank}"
            ours_lora = [_side_name(slices, lora_rank) for slices in microbatches]
            lora_ratios = ", ".join(f"{side} {common.ratio(timing[side].median_s, timing[peft_side].median_s)}"
                                    for side in ours_lora)
            notes.insert(1, f"**ours vs PEFT LoRA: {lora_ratios}** (PEFT median / our median); first-step loss "
                            f"{their_lora_losses[0]:.6f} (PEFT, B = 0: the full model's).")
        for slices, losses in our_losses.items():
            notes.append(f"Same work ({_side_name(slices)}): first-step loss {float(losses[0]):.6f} vs "
                         f"{their_losses[0]:.6f} (torch), last {float(losses[-1]):.6f} vs {their_losses[-1]:.6f}.")
    return rows, notes


HEADER = ["what", "first call s", "median s", "tokens/s", "GFLOP/s", "share of peak"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--matmul_n", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 4],
                        help="our step once per value: the batch in that many slices of rows (1: one pass)")
    parser.add_argument("--lora_rank", type=int, default=0, help="> 0: also time our LoRA step of this rank")
    parser.add_argument("--no_peers", action="store_true", help="time our step only")
    parser.add_argument("--no_save", action="store_true", help="print only; do not append to results/")
    args = parser.parse_args(argv)
    peers = common.peers_available() and not args.no_peers
    rows, notes = run(args.preset, args.batch, args.length, args.matmul_n, args.reps, peers, args.microbatches,
                      args.lora_rank)
    common.report("train_step", "python experiments/bench/bench_train_step.py " + " ".join(sys.argv[1:]),
                  common.markdown_table(HEADER, rows), notes,
                  results_dir=None if args.no_save else common.RESULTS_DIR)


if __name__ == "__main__":
    main()
