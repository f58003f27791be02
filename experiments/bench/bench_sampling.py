"""Sampling throughput: our KV-cache sampler vs transformers `generate`, on the same weights and prompts.

    python experiments/bench/bench_sampling.py                       # small preset, batch 16 and 64
    python experiments/bench/bench_sampling.py --batches 16 --reps 7

Both sides decode the same left-padded prompts (`--prompt_len` columns, 32 to 64 real tokens a row) for
exactly `--new_tokens` tokens (no EOS can stop a row), greedy and sampled (temperature 1, top-k 50, top-p
0.95), on one Qwen2-architecture model: our params, exported with `models/hf.py` and loaded by
`transformers` as a `Qwen2ForCausalLM`. Timings are whole calls (prefill included), alternating ours and
theirs, medians over `--reps`; throughput counts new tokens. Greedy decoding also checks that the two
sides compute the same thing: the share of rows whose tokens agree, and the mean agreeing prefix (random
fp32 weights give near-ties, so an occasional late divergence is rounding, not a bug).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

from graphgrpo_jax import sampling  # noqa: E402
from graphgrpo_jax.models import decoder  # noqa: E402

# Knobs shared by both sides; HF applies them in the same order (temperature, top-k, top-p).
MODES = {"greedy": sampling.GREEDY, "sampled": sampling.SamplingParams(temperature=1.0, top_k=50, top_p=0.95)}


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [B, P] (pad id 0) of P/2..P real tokens, and their mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, size=(batch, prompt_len)).astype(np.int32)
    mask = np.arange(prompt_len)[None] >= rng.integers(0, prompt_len // 2 + 1, size=(batch, 1))
    return np.where(mask, tokens, 0).astype(np.int32), mask


def our_sampler(params: decoder.Params, config: decoder.DecoderConfig, tokens: np.ndarray, mask: np.ndarray,
                new_tokens: int, knobs: sampling.SamplingParams) -> Callable[[], jax.Array]:
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    never = config.vocab_size  # an EOS id outside the vocabulary: every row runs all steps

    def run() -> jax.Array:
        return sampling.generate(params, config, tokens, mask, jax.random.key(0), max_new_tokens=new_tokens,
                                 eos_ids=never, pad_id=0, sampling=knobs).tokens
    return run


def hf_sampler(model, tokens: np.ndarray, mask: np.ndarray, new_tokens: int,
               knobs: sampling.SamplingParams) -> Callable[[], "torch.Tensor"]:  # noqa: F821
    import torch
    import transformers

    ids = torch.from_numpy(tokens.astype(np.int64)).to(model.device)
    attention = torch.from_numpy(mask.astype(np.int64)).to(model.device)
    greedy = float(knobs.temperature) == 0.0
    options = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=float(knobs.temperature), top_k=int(knobs.top_k), top_p=float(knobs.top_p))
    generation = transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                               eos_token_id=None, pad_token_id=0, **options)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=attention, generation_config=generation)
        return out[:, tokens.shape[1]:]
    return run


def run(preset: str, batches: Sequence[int], prompt_len: int, new_tokens: int, reps: int,
        peers: bool) -> tuple[list[list[str]], list[str]]:
    """Table rows and notes; `peers=False` times our side only."""
    config, params = common.policy(preset)
    model = None
    if peers:
        import torch
        torch.manual_seed(0)
        model = common.torch_twin(params, config, tempfile.mkdtemp(prefix="bench_sampling_"))
    rows, notes = [], []
    for batch in batches:
        tokens, mask = random_prompts(batch, prompt_len, config.vocab_size)
        for mode, knobs in MODES.items():
            sides = {"ours": our_sampler(params, config, tokens, mask, new_tokens, knobs)}
            if peers:
                sides["generate"] = hf_sampler(model, tokens, mask, new_tokens, knobs)
            timing = common.timed_pairs(sides, reps)
            new = batch * new_tokens
            ours = timing["ours"]
            row = [f"B={batch}, {mode}", f"{ours.first_s:.1f}", f"{ours.median_s:.3f}",
                   f"{new / ours.median_s:,.0f}"]
            if peers:
                theirs = timing["generate"]
                row += [f"{theirs.median_s:.3f}", f"{new / theirs.median_s:,.0f}",
                        common.ratio(ours.median_s, theirs.median_s)]
                if mode == "greedy":
                    share, prefix = common.greedy_agreement(np.asarray(sides["ours"]()),
                                                           sides["generate"]().cpu().numpy())
                    notes.append(f"Greedy agreement at B={batch}: {share:.0%} of rows identical, mean agreeing "
                                 f"prefix {prefix:.1f} of {new_tokens} tokens.")
            rows.append(row)
            print("| " + " | ".join(row) + " |", flush=True)  # progress: a full run takes minutes
    return rows, notes


HEADER = ["setting", "ours: first call s", "ours: median s", "ours: new tokens/s",
          "generate: median s", "generate: new tokens/s", "ours vs generate"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no_peers", action="store_true", help="time our sampler only")
    parser.add_argument("--no_save", action="store_true", help="print only; do not append to results/")
    args = parser.parse_args(argv)
    peers = common.peers_available() and not args.no_peers
    rows, notes = run(args.preset, args.batches, args.prompt_len, args.new_tokens, args.reps, peers)
    header = HEADER if peers else HEADER[:4]
    common.report("sampling", "python experiments/bench/bench_sampling.py " + " ".join(sys.argv[1:]),
                  common.markdown_table(header, rows),
                  [f"{args.preset} preset, prompt {args.prompt_len} (left-padded, {args.prompt_len // 2}–"
                   f"{args.prompt_len} real tokens) + {args.new_tokens} new tokens, fp32; medians of "
                   f"{args.reps}, ours and generate alternating; sampled = temperature 1, top-k 50, top-p 0.95.",
                   *notes], results_dir=None if args.no_save else common.RESULTS_DIR)


if __name__ == "__main__":
    main()
