"""The real-checkpoint variant end to end: `configs/relevance_pod.py:gpu8` with its model and tokenizer read
from a small local Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer.json, like a
downloaded Qwen2.5 folder but tiny), shrunk to the micro sizes and run on the fake 8-device CPU mesh.

It checks what the pod variant promises: the data stage uses the checkpoint's tokenizer (plus the CoT
tags), SFT starts from the checkpoint's weights and really moves them at the variant's fine-tuning learning
rate (fp32 master weights, bf16 compute), and RL and evaluation run on top.
"""

import json

import jax
import numpy as np
import pytest

from configs import common, relevance, relevance_pod
from experiments import standin_checkpoint
from graphgrpo_jax import artifacts, main, tokenization
from graphgrpo_jax.data import cot, prepare

# A Qwen2-architecture checkpoint small enough for CPU tests; its vocabulary has spare rows beyond the
# tokenizer, as Qwen2.5's does (151,936 rows for 151,665 tokens).
CHECKPOINT_MODEL = dict(vocab_size=1088, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=64, rope_theta=1_000_000.0, max_seq_len=256)
TOKENIZER_SIZE = 1024


def _checkpoint(folder, world_corpus):
    """A Hugging Face checkpoint folder: random bf16 weights and a BPE tokenizer without CoT tags."""
    model = common.model_config("tiny", **CHECKPOINT_MODEL, dtype="bfloat16", param_dtype="bfloat16")
    standin_checkpoint.write_checkpoint(folder, model, world_corpus, TOKENIZER_SIZE, seed=7)
    return folder


def _pod_config(checkpoint):
    config = relevance_pod.get_config("gpu8")
    micro = relevance.get_config("micro")
    config.model.update(CHECKPOINT_MODEL)
    config.model.hf_checkpoint = str(checkpoint)  # the variant's one override: weights and tokenizer
    for section in ("world", "data", "sft", "rl", "eval", "checkpoint"):
        config[section].update(micro[section].to_dict())
    config.grpo.update(num_generations=4, max_completion_length=micro.data.max_response_len)
    config.optim.update(batch_size=8, warmup_steps=2)  # keeps the variant's fine-tuning learning rate
    config.rl_optim.warmup_steps = 1
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pod_variant")
    world = prepare.load_world(relevance.get_config("micro"))
    checkpoint = _checkpoint(root / "checkpoint", prepare.corpus(world))
    config = _pod_config(checkpoint)
    main.run(config, str(root / "work"))
    return config, checkpoint, root / "work"


def test_the_variant_is_what_the_pod_runs(run):
    config, _, _ = run
    pod = relevance_pod.get_config("gpu8")
    assert config.mesh.to_dict() == pod.mesh.to_dict() and jax.device_count() == 8
    assert (config.model.dtype, config.model.param_dtype, config.model.remat) == ("bfloat16", "float32", True)
    assert config.optim.learning_rate == pod.optim.learning_rate == 1e-5
    assert config.tokenizer.hf_checkpoint == config.model.hf_checkpoint


def test_the_data_stage_uses_the_checkpoints_tokenizer(run):
    config, checkpoint, workdir = run
    original = tokenization.load_tokenizer(checkpoint)
    tokenizer = artifacts.load_tokenizer(config, str(workdir))
    tags = cot.node_tags()
    assert len(tokenizer) == len(original) + len(tags) <= config.model.vocab_size
    assert [tokenizer.convert_tokens_to_ids(tag) for tag in tags] == list(range(len(original),
                                                                               len(original) + len(tags)))
    text = "red cotton shirt for men, size L"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]


def test_sft_fine_tunes_the_checkpoints_weights(run):
    config, _, workdir = run
    # What SFT starts from: the checkpoint's weights, the CoT tags' rows set from their text.
    imported = jax.tree_util.tree_leaves(jax.device_get(artifacts.pretrained_params(config)))
    tuned = jax.tree_util.tree_leaves(jax.device_get(artifacts.policy_params(config, str(workdir), "sft")))
    assert all(leaf.dtype == np.float32 for leaf in tuned)
    # Six Adam steps at lr 1e-5 move each weight by at most ~6e-5: the params are the checkpoint's ...
    assert max(float(np.abs(a - b).max()) for a, b in zip(imported, tuned)) < 1e-4
    # ... and nearly all of them moved (bf16 weights would have rounded most of these updates away).
    moved = sum(int((a != b).sum()) for a, b in zip(imported, tuned)) / sum(a.size for a in imported)
    assert moved > 0.9


def test_rl_and_eval_run_on_top(run):
    _, _, workdir = run
    summary = json.loads((workdir / "report.json").read_text())
    assert summary["rl"]["steps"] == 2
    assert summary["eval"]["rl/test"]["num_examples"] == 8
