r"""Relevance experiments at scale: Qwen2.5-1.5B-Instruct on one 8-GPU host or a TPU pod slice.

The pipeline, stages and methods are those of `configs/relevance.py` (its `cpu` variant); this file
changes the model (a Hugging Face checkpoint, bf16 compute over fp32 master weights, rematerialised
layers), the device mesh, and the batch and sequence sizes. Sharding: see `graphgrpo_jax/mesh.py`
(vocab, heads and MLP over `tensor`, embeddings over `fsdp`, batches over `data` x `fsdp`).
`tests/test_pod_variant.py` runs the `gpu8` variant end to end on a tiny local checkpoint folder.

Checkpoint: download Qwen/Qwen2.5-1.5B-Instruct (config.json, model.safetensors, tokenizer files)
once, yourself, to a local folder, e.g. `huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct
--local-dir models/Qwen2.5-1.5B-Instruct`, and point `--config.model.hf_checkpoint` at it (relative
paths are relative to the launch directory). On a pod every worker needs its own copy. Nothing is
fetched from a hub at run time.

Workdir: checkpoints of a multi-host run are written collectively (each process writes its shards), so
on a pod `--workdir` must be a folder every worker sees: a gcsfuse mount of a bucket or an NFS share.

Variants and launch commands:

  gpu8     one host with 8 GPUs (e.g. 8x H100 80GB); mesh fsdp=8.
    python -m graphgrpo_jax.main --config=configs/relevance_pod.py:gpu8 \
        --config.model.hf_checkpoint=models/Qwen2.5-1.5B-Instruct --workdir=runs/relevance_gpu8

  v5e_64   TPU v5e-64 (accelerator type v5litepod-64): 16 hosts x 4 chips (16 GB HBM each); mesh
           data=4, fsdp=8, tensor=2.
  v5p_128  TPU v5p-128: 16 hosts x 4 chips (95 GB HBM each, one JAX device per chip); mesh data=8,
           fsdp=4, tensor=2.
    Every worker runs the same command; JAX finds the other workers itself (config.mesh.distributed):
    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="
        cd graphgrpo_jax && . .venv/bin/activate &&
        python -m graphgrpo_jax.main --config=configs/relevance_pod.py:v5p_128 \
            --config.model.hf_checkpoint=$HOME/models/Qwen2.5-1.5B-Instruct \
            --workdir=/mnt/gcs/runs/relevance_v5p_128"
    (Set up each worker first with the same --worker=all: clone the repo, `pip install -e .
    'jax[tpu]==0.10.2'`, copy the checkpoint, mount the bucket.)

Other processes (a SLURM or Kubernetes job, a hand-made cluster) join the same way through JAX's own
environment detection, or explicitly with `--config.mesh.coordinator_address=HOST:PORT
--config.mesh.num_processes=N --config.mesh.process_id=I`.
"""

import ml_collections
from ml_collections import config_dict

from configs import common, relevance

# Per variant: mesh axis sizes (-1: the rest), whether to join a multi-host job, and the global batch
# sizes (SFT sequences, RL prompts per step; both multiples of data x fsdp).
_VARIANTS = {
    "gpu8": dict(mesh=dict(data=1, fsdp=-1, tensor=1), distributed=False, sft_batch=64, rl_prompts=32),
    "v5e_64": dict(mesh=dict(data=4, fsdp=8, tensor=2), distributed=True, sft_batch=256, rl_prompts=64),
    "v5p_128": dict(mesh=dict(data=-1, fsdp=4, tensor=2), distributed=True, sft_batch=512, rl_prompts=128),
}


def get_config(variant: str = "gpu8") -> ml_collections.ConfigDict:
    if variant not in _VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/relevance_pod.py; choose one of "
                         f"{sorted(_VARIANTS)}")
    setup = _VARIANTS[variant]
    config = relevance.get_config("cpu")
    config.variant = variant

    # The model: the exact shapes of the public checkpoint; weights and tokenizer come from its folder.
    # The SFT stage starts from these weights (instead of a random init) and the data stage uses the
    # checkpoint's tokenizer (instead of training one); one override sets both.
    checkpoint = config_dict.FieldReference("models/Qwen2.5-1.5B-Instruct")
    config.model = common.model_config("qwen2.5-1.5b", remat=True)
    config.model.hf_checkpoint = checkpoint
    config.tokenizer.hf_checkpoint = checkpoint

    config.mesh = ml_collections.ConfigDict(dict(
        setup["mesh"], preset=variant, distributed=setup["distributed"],
        coordinator_address=config_dict.placeholder(str), num_processes=config_dict.placeholder(int),
        process_id=config_dict.placeholder(int)))

    # Sequence budgets in Qwen tokens.
    config.data.update(max_prompt_len=128, max_response_len=256)
    config.grpo.max_completion_length = config.data.max_response_len

    # Fine-tuning a pretrained model: small learning rates, a longer SFT.
    config.optim.update(learning_rate=1e-5, warmup_steps=50, schedule="cosine", batch_size=setup["sft_batch"],
                        microbatches=1)
    config.sft.update(num_steps=1000, log_every=10)
    config.rl.update(num_steps=300, prompts_per_step=setup["rl_prompts"], log_every=1)
    config.rl_optim.update(learning_rate=1e-6, warmup_steps=10, microbatches=1)
    config.eval.update(max_examples=2048, batch_size=setup["sft_batch"])
    config.checkpoint.update(save_every=100, max_to_keep=3)
    return config
