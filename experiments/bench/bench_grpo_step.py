"""A whole GRPO step, ours vs TRL's `GRPOTrainer`: same model, prompts, group, lengths, reward, β = 0.

    python experiments/bench/bench_grpo_step.py                    # small preset, 8 prompts x 8, 64 tokens
    python experiments/bench/bench_grpo_step.py --prompts 16 --reps 7
    python experiments/bench/bench_grpo_step.py --hf_checkpoint models/SmolLM2-135M-Instruct --prompts 2 \
        --group 4 --completion_len 32 --prompt_len 64 --reps 3 --lora_rank 16   # real weights, LoRA both sides

A step is: sample G completions of each prompt, decode them, score them on the host, compute group
advantages, and take one AdamW step on the clipped policy loss. Ours is the path of `train/rl.py`
(`sampling.generate` → `rollout.assemble` → `spec.encode_rollouts` → the jitted `make_update`, with
outcome credit, i.e. plain GRPO, and each group's prompt prefilled and scored once); TRL's is
`GRPOTrainer.train()` on the same weights (exported through `models/hf.py`), the same tokenizer and
prompts, and the same reward function. Option values are set identically on both sides (TRL's names):
β = 0, μ = 1, ε = 0.2 both ways, loss_type `dapo`,
group-scaled rewards, truncated completions kept, temperature 1, top-k 50, top-p 0.95, learning rate
1e-5 with global-norm clipping at 1. Completions stop at EOS on both sides (random weights rarely emit it).

The two sides alternate inside TRL's own loop: a trainer callback runs and times one of our steps after
each of TRL's, and a TRL step is the wall time between two of our steps (data loading, generation,
scoring, loss, backward, optimizer, its bookkeeping). The first step of each side is the warm-up.

`--hf_checkpoint` runs both sides on a checkpoint folder's weights and tokenizer (e.g. the SmolLM2-135M-Instruct
that `python -m graphgrpo_jax.models.gguf` imports) instead of a preset's random weights and the world's BPE;
`--lora_rank r` trains rank-r adapters (alpha 2r, every projection) on both sides: ours (`models/lora.py`) and
TRL's through PEFT (`peft_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

from graphgrpo_jax import sampling, tokenization  # noqa: E402
from graphgrpo_jax.data import cot, prepare, world as world_lib  # noqa: E402
from graphgrpo_jax.graph import credit as credit_lib, spec as spec_lib  # noqa: E402
from graphgrpo_jax.models import decoder, hf, lora  # noqa: E402
from graphgrpo_jax.rl import grpo, rollout  # noqa: E402
from graphgrpo_jax.train import rl, state as state_lib  # noqa: E402

KNOBS = sampling.SamplingParams(temperature=1.0, top_k=50, top_p=0.95)
LEARNING_RATE = 1e-5


def letter_share(text: str) -> float:
    """The reward of both sides: the share of letters in a completion (cheap, and spread within a group)."""
    return sum(c.isalpha() for c in text) / max(len(text), 1)


def tokenizer_and_prompts(vocab_size: int, folder: str, max_len: int) -> tuple[object, list[str]]:
    """The project's byte-level BPE trained on the synthetic world, and the world's relevance prompts
    of at most `max_len` tokens."""
    world = world_lib.build_world()
    tokenizer = tokenization.train_tokenizer(prepare.corpus(world), vocab_size, folder,
                                             extra_special_tokens=cot.node_tags())
    return tokenizer, world_prompts(tokenizer, max_len, world)


class LetterShareTask:
    """A task for `rollout.assemble`: the `letter_share` reward, no CoT nodes (outcome GRPO)."""

    def __init__(self, spec: spec_lib.GraphSpec):
        self.spec = spec

    def score(self, rows: np.ndarray, texts: list[str], offsets: list[np.ndarray]) -> rollout.Scored:
        return rollout.Scored(
            rewards=np.asarray([letter_share(t) for t in texts], np.float32),
            node_values=np.full((len(texts), self.spec.num_nodes), -1, np.int32),
            node_ids=[np.full(len(o), -1, np.int32) for o in offsets],
            gold_label=None, format_valid=np.ones(len(texts), bool))


def grpo_options(group: int, completion_len: int) -> ml_collections.ConfigDict:
    cfg = grpo.default_grpo_config()
    cfg.update(num_generations=group, epsilon=0.2, epsilon_high=0.2, beta=0.0, loss_type="dapo",
               scale_rewards="group", num_iterations=1, mask_truncated_completions=False,
               max_completion_length=completion_len)
    grpo.validate_grpo_config(cfg)
    return cfg


def our_grpo_step(params: decoder.Params, config: decoder.DecoderConfig, tokenizer, prompts: Sequence[str], *,
                  num_prompts: int, group: int, completion_len: int, prompt_len: int,
                  phases: dict[str, list[float]] | None = None, share_prompts: bool = True,
                  microbatches: int = 1) -> Callable[[], dict]:
    """A closure taking one whole GRPO step on its own copy of the params, prompts in order, per call.

    `share_prompts=False` runs every row's prompt in full, as TRL does (for A/B tests of the sharing);
    `microbatches` > 1 runs the update's forward and backward over that many slices of whole groups.

    With `phases`, each call appends the seconds it spent sampling, on the host (decode, reward,
    layout, graph encoding) and updating to `phases["sample"]`, `["host"]` and `["update"]`.
    """
    spec = spec_lib.graph_spec(spec_lib.default_graph_config())
    settings = credit_lib.CreditSettings(variant="outcome")
    optimizer = state_lib.make_optimizer(ml_collections.ConfigDict(
        dict(learning_rate=LEARNING_RATE, grad_clip=1.0, b1=0.9, b2=0.999, weight_decay=0.0)), num_steps=1)
    # As the RL stage does: log-probs of the completions only (TRL's GRPOTrainer keeps those logits only, too),
    # and each group's prompt run once, in the sampler's prefill and in the update (TRL repeats it G times).
    update = rl.make_update(config, grpo_options(group, completion_len), spec, settings, optimizer,
                            prompt_len=prompt_len, share_prompts=share_prompts, microbatches=microbatches)
    state = state_lib.create_state(jax.tree_util.tree_map(jnp.copy, params), optimizer, jax.random.key(0))
    phi = jnp.asarray(spec.phi_init, jnp.float32)
    tokens, mask = tokenization.encode_batch(tokenizer, prompts, prompt_len)
    task, pieces = LetterShareTask(spec), rollout.TokenPieces(tokenizer)
    step = {"count": 0}

    def run() -> dict:
        marks = [time.perf_counter()]
        first = step["count"] * num_prompts % len(prompts)
        rows = np.repeat(np.arange(first, first + num_prompts) % len(prompts), group)
        state["rng"], sample_rng = jax.random.split(state["rng"])
        out = jax.device_get(sampling.generate(state["params"], config, jnp.asarray(tokens[rows]),
                                               jnp.asarray(mask[rows]), sample_rng, max_new_tokens=completion_len,
                                               eos_ids=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                               sampling=KNOBS, group_size=group if share_prompts else 1))
        marks.append(time.perf_counter())
        batch = rollout.assemble(task, pieces, rows, tokens[rows], mask[rows], out.tokens, out.lengths,
                                 out.truncated)
        graph = spec_lib.encode_rollouts(spec, batch.scored.rewards, batch.scored.node_values, None, group,
                                         max_rollouts=len(rows) + 1)
        marks.append(time.perf_counter())
        state["params"], state["opt_state"], _, metrics = update(state["params"], state["opt_state"], phi,
                                                                 batch.arrays(), graph, None)
        metrics = jax.device_get(metrics)
        marks.append(time.perf_counter())
        step["count"] += 1
        if phases is not None:
            for name, start, end in zip(("sample", "host", "update"), marks, marks[1:]):
                phases.setdefault(name, []).append(end - start)
        return metrics
    return run


def trl_trainer(params: decoder.Params, config: decoder.DecoderConfig, tokenizer, prompts: Sequence[str], *,
                num_prompts: int, group: int, completion_len: int, steps: int, callbacks: Sequence, folder: str,
                lora: tuple[int, float, Sequence[str]] | None = None):
    """TRL's GRPOTrainer on the same weights, tokenizer, prompts (in order) and reward as ours; `lora`
    (rank, alpha, target modules) trains PEFT adapters instead of the weights."""
    import datasets
    import trl

    model = common.torch_twin(params, config, pathlib.Path(folder) / "model",
                              extra_config=dict(eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    options = grpo_options(group, completion_len)
    args = trl.GRPOConfig(
        output_dir=str(pathlib.Path(folder) / "trl"), use_cpu=True, report_to="none", save_strategy="no",
        seed=0, max_steps=steps, per_device_train_batch_size=num_prompts * group, gradient_accumulation_steps=1,
        num_generations=group, max_completion_length=completion_len, temperature=float(KNOBS.temperature),
        top_k=int(KNOBS.top_k), top_p=float(KNOBS.top_p), beta=options.beta, epsilon=options.epsilon,
        epsilon_high=options.epsilon_high, loss_type=options.loss_type, scale_rewards=options.scale_rewards,
        num_iterations=options.num_iterations, mask_truncated_completions=options.mask_truncated_completions,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, shuffle_dataset=False, logging_steps=steps, disable_tqdm=True,
        # TRL 1.16 defaults to activation checkpointing and bf16 autocast. Ours recomputes no activations and
        # runs fp32 (this CPU has no bf16 units: autocast made TRL's backward ~30x slower), so TRL does too.
        activation_checkpointing=False, bf16=False)

    def reward(completions: list[str], **kwargs) -> list[float]:
        return [letter_share(text) for text in completions]

    dataset = datasets.Dataset.from_dict({"prompt": list(prompts)})
    peft_config = None
    if lora is not None:
        import peft
        rank, alpha, targets = lora
        peft_config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                                      bias="none", task_type="CAUSAL_LM")
    return trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                           processing_class=tokenizer, callbacks=list(callbacks), peft_config=peft_config)


def alternating_callback(ours: Callable[[], dict], times: dict[str, list[float]]):
    """A TrainerCallback that runs one of our steps after each TRL step, timing both."""
    import transformers

    class Alternate(transformers.TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            start = time.perf_counter()
            times["trl"].append(start - self.mark)
            ours()
            self.mark = time.perf_counter()
            times["ours"].append(self.mark - start)

    return Alternate()


def checkpoint_policy(folder: str) -> tuple[decoder.DecoderConfig, decoder.Params, object]:
    """(config, params, tokenizer) of a Hugging Face checkpoint folder, in fp32."""
    config = decoder.DecoderConfig.from_config(hf.config_from_hf(folder))
    config = dataclasses.replace(config, dtype="float32", param_dtype="float32")
    return config, jax.device_put(hf.load_params(folder, config)), tokenization.load_tokenizer(folder)


def world_prompts(tokenizer, max_len: int, world: world_lib.World | None = None) -> list[str]:
    """The (default) world's relevance prompts of at most `max_len` tokens of `tokenizer`."""
    prompts = [cot.prompt_text(p.query, p.product_title) for p in (world or world_lib.build_world()).pairs]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    return [p for p, n in zip(prompts, lengths) if n <= max_len]


def run(preset: str, num_prompts: int, group: int, completion_len: int, prompt_len: int, reps: int,
        peers: bool, microbatches: int = 1, hf_checkpoint: str = "",
        lora_rank: int = 0) -> tuple[list[list[str]], list[str]]:
    folder = tempfile.mkdtemp(prefix="bench_grpo_")
    if hf_checkpoint:
        config, params, tokenizer = checkpoint_policy(hf_checkpoint)
        prompts, model = world_prompts(tokenizer, prompt_len), f"checkpoint {pathlib.Path(hf_checkpoint).name}"
    else:
        config, params, model = *common.policy(preset), f"{preset} preset"
        tokenizer, prompts = tokenizer_and_prompts(config.vocab_size, str(pathlib.Path(folder) / "tokenizer"),
                                                   prompt_len)
    base_config = config
    if lora_rank:
        config = dataclasses.replace(config, lora_rank=lora_rank, lora_alpha=2.0 * lora_rank)
        params = decoder.with_adapters(params, config, jax.random.key(1))
    prompts = prompts[:num_prompts * (reps + 1)]
    phases = {}
    ours = our_grpo_step(params, config, tokenizer, prompts, num_prompts=num_prompts, group=group,
                         completion_len=completion_len, prompt_len=prompt_len, phases=phases,
                         microbatches=microbatches)
    if peers:
        import torch
        torch.manual_seed(0)
        times = {"trl": [], "ours": []}
        trainer = trl_trainer(lora.without_adapters(params), base_config, tokenizer, prompts,
                              num_prompts=num_prompts, group=group, completion_len=completion_len, steps=reps + 1,
                              callbacks=[alternating_callback(ours, times)], folder=folder,
                              lora=(config.lora_rank, config.lora_alpha, config.lora_targets) if lora_rank else None)
        trainer.train()
        timing = {name: common.Timing(t[0], tuple(t[1:])) for name, t in times.items()}
    else:
        timing = common.timed_pairs({"ours": ours}, reps)
    rollouts = num_prompts * group
    rows = [[side, f"{t.first_s:.1f}", f"{t.median_s:.2f}", f"{rollouts / t.median_s:.1f}",
             f"{rollouts * completion_len / t.median_s:,.0f}"] for side, t in timing.items()]
    notes = [f"{model}; {num_prompts} prompts × {group} generations, up to {completion_len} completion "
             f"tokens, prompts left-padded to {prompt_len} on our side (TRL pads to the batch's longest); "
             f"β = 0, μ = 1; our update in {microbatches} slice(s) of whole groups; medians of {reps} steps "
             f"after one warm-up step each, sides alternating"
             + (f"; LoRA rank {lora_rank}, alpha {2 * lora_rank}, every projection, both sides (TRL through PEFT)."
                if lora_rank else "."),
             "Our step, median seconds by phase: " + ", ".join(
                 f"{name} {statistics.median(t[1:]):.2f}" for name, t in phases.items()) + "."]
    if peers:
        notes.insert(0, f"**ours vs TRL: {common.ratio(timing['ours'].median_s, timing['trl'].median_s)}** "
                        f"(TRL median step / our median step).")
    return rows, notes


HEADER = ["side", "first step s", "median step s", "rollouts/s", "completion tokens/s (upper bound)"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_grpo_step_flags(parser)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--microbatches", type=int, default=1,
                        help="our update's forward and backward over this many slices of whole groups")
    parser.add_argument("--hf_checkpoint", default="", help="a checkpoint folder: its weights and tokenizer")
    parser.add_argument("--lora_rank", type=int, default=0, help="> 0: LoRA adapters of this rank, both sides")
    parser.add_argument("--no_peers", action="store_true", help="time our step only")
    parser.add_argument("--no_save", action="store_true", help="print only; do not append to results/")
    args = parser.parse_args(argv)
    peers = common.peers_available() and not args.no_peers
    rows, notes = run(args.preset, args.prompts, args.group, args.completion_len, args.prompt_len, args.reps,
                      peers, args.microbatches, args.hf_checkpoint, args.lora_rank)
    common.report("grpo_step", "python experiments/bench/bench_grpo_step.py " + " ".join(sys.argv[1:]),
                  common.markdown_table(HEADER, rows), notes,
                  results_dir=None if args.no_save else common.RESULTS_DIR)


if __name__ == "__main__":
    main()
