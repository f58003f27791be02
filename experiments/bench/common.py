"""Shared pieces of the benchmarks: the model under test, the same weights on the peer's side, paired
timing, and the dated result tables.

Comparisons run both sides in one process and alternate them (ours, peer, ours, peer, ...), so load drift
on a shared machine hits both; each side's first call (compilation, allocator warm-up) is timed apart
from the medians. The peer side (PyTorch, transformers, TRL) lives in the optional `bench` extra; the
JAX side of every script runs without it.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs.common import model_config
from graphgrpo_jax.models import decoder, hf, lora

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def peers_available() -> bool:
    """True when PyTorch is importable (the `bench` extra); without it only our side runs."""
    return importlib.util.find_spec("torch") is not None


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def machine() -> str:
    """One line naming what the numbers were measured on (cores, CPU, library versions)."""
    device = jax.devices()[0]
    parts = [f"{os.cpu_count()} cores ({cpu_model()})", f"jax {jax.__version__} on {device.platform} "
             f"x{jax.device_count()}"]
    if peers_available():
        import torch
        import transformers
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                     f"transformers {transformers.__version__}")
        if importlib.util.find_spec("trl") is not None:
            import trl
            parts.append(f"trl {trl.__version__}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timing:
    first_s: float  # the untimed-in-the-median first call: compilation or warm-up included
    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def torch_device() -> str:
    """Where the peer runs: the GPU when JAX's default backend is one (so both sides share the card), else
    the CPU. On a GPU both sides multiply fp32 matrices in TF32, JAX's default there."""
    import torch
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        return "cuda"
    return "cpu"


def _finish(value: Any) -> None:
    """Waits for JAX's asynchronous dispatch, and for PyTorch's CUDA stream when it runs on the GPU."""
    jax.block_until_ready(value)
    torch = sys.modules.get("torch")  # no import search inside the timed region
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_pairs(sides: Mapping[str, Callable[[], Any]], reps: int) -> dict[str, Timing]:
    """Times each side once (warm-up), then `reps` rounds calling every side in turn."""
    first, times = {}, {name: [] for name in sides}
    for name, fn in sides.items():
        start = time.perf_counter()
        _finish(fn())
        first[name] = time.perf_counter() - start
    for _ in range(reps):
        for name, fn in sides.items():
            start = time.perf_counter()
            _finish(fn())
            times[name].append(time.perf_counter() - start)
    return {name: Timing(first[name], tuple(times[name])) for name in sides}


def greedy_agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(share of rows identical, mean length of the agreeing prefix) of two [B, N] token arrays."""
    same = ours == theirs
    prefix = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
    return float(same.all(1).mean()), float(prefix.mean())


def matmul_sides(n: int, peers: bool) -> dict[str, Callable[[], Any]]:
    """An n³ fp32 matmul in JAX (and in PyTorch): the machine's practical FLOP/s ceiling (2·n³ FLOP)."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    sides = {"jax": lambda: matmul(a, b)}
    if peers:
        import torch
        ta, tb = torch.randn(n, n, device=torch_device()), torch.randn(n, n, device=torch_device())
        sides["torch"] = lambda: torch.matmul(ta, tb)
    return sides


# --------------------------------------------------------------------------------------------------
# The model under test, on both sides
# --------------------------------------------------------------------------------------------------

def policy(preset: str, seed: int = 0) -> tuple[decoder.DecoderConfig, decoder.Params]:
    """A Qwen2-architecture decoder of a `configs/common.py` preset with random weights."""
    config = decoder.DecoderConfig.from_config(model_config(preset))
    params = jax.jit(decoder.init_params, static_argnums=0)(config, jax.random.key(seed))
    return config, params


def torch_twin(params: decoder.Params, config: decoder.DecoderConfig, folder: str | pathlib.Path,
               extra_config: Mapping[str, Any] | None = None):
    """The same weights as a transformers `Qwen2ForCausalLM` (fp32, eval mode, on `torch_device()`), through
    our HF export."""
    import transformers
    hf.save_hf(params, config, folder, extra_config=extra_config)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="float32")
    return model.to(torch_device()).eval()


def analytic_train_flops(config: decoder.DecoderConfig, params: decoder.Params, batch: int, length: int) -> float:
    """FLOP of one forward + backward: 6·N·tokens (N without the embedding lookup table, with the LM head)
    plus dense (unmasked) attention 12·L·B·T²·H·Dh. XLA's `cost_analysis` is not used: it counts a
    scanned layer stack's body once, not once per layer."""
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    if not config.tie_embeddings:
        num_params -= config.vocab_size * config.hidden_size  # the lookup table does no matmul
    attention = 12 * config.num_layers * batch * length ** 2 * config.num_heads * config.head_dim
    return 6 * num_params * batch * length + attention


def analytic_lora_train_flops(config: decoder.DecoderConfig, params: decoder.Params, batch: int,
                              length: int) -> float:
    """`analytic_train_flops` of a LoRA step: the frozen weights' matmuls run forward and in the input gradient
    (4·N per token), the adapters' in all three (6·N_adapters); attention as before."""
    base = lora.without_adapters(params)
    num_base = sum(x.size for x in jax.tree_util.tree_leaves(base))
    if not config.tie_embeddings:
        num_base -= config.vocab_size * config.hidden_size
    num_adapters = lora.count(decoder.with_adapters(base, config, jax.random.key(0)))[0]
    attention = 12 * config.num_layers * batch * length ** 2 * config.num_heads * config.head_dim
    return (4 * num_base + 6 * num_adapters) * batch * length + attention


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, command: str, table: str, notes: Sequence[str] = (),
           results_dir: pathlib.Path | None = RESULTS_DIR) -> str:
    """Prints a dated section (command, machine, load average, table, notes) and appends it to
    `results_dir/<name>.md` (nothing is written when `results_dir` is None)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = "\n".join([f"### {stamp}: `{command}`", "", f"{machine()}; load average {load_average()} "
                         f"(1/5/15 min) at the end of the run.", "", table, "", *notes]).rstrip() + "\n"
    print(section)
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        with open(results_dir / f"{name}.md", "a") as f:
            f.write(section + "\n")
    return section


def ratio(ours_s: float, peer_s: float) -> str:
    """How many times faster we are (peer time / our time)."""
    return f"{peer_s / ours_s:.2f}×"


def add_grpo_step_flags(parser) -> None:
    """The GRPO step's shape flags of `bench_grpo_step.py` and `bench_scaling.py` (defaults: the issue's sizes)."""
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--completion_len", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=32)
