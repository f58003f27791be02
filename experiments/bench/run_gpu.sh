#!/usr/bin/env bash
# The GPU checks of experiments/bench in one go, sized to finish in about five minutes on one H100:
#   bash experiments/bench/run_gpu.sh [results folder]
# 1. the sharded SFT step and sampler on the mesh (small preset, fp32) against the same work on the host
#    CPU, then their throughput at a real shape (Qwen2.5-0.5B, bf16 activations);
# 2. our sampler vs transformers `generate`, and our train step vs a PyTorch step, both sides on the GPU;
# 3. our whole GRPO step (TRL's trainer is not timed here: it needs its own install).
# Each bench appends its dated table to experiments/bench/results/; the tables and a log are copied to the
# results folder (default: $OUT, else /tmp/gpu_check) so they survive a throwaway machine.
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
bench=experiments/bench
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# JAX and PyTorch share the card in the peer benches; JAX's default 75% preallocation would starve torch.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}

step() {  # step SECONDS ARGS...: one bench with a time limit, its output kept in the log
  local limit=$1; shift
  echo "=== $* (limit ${limit}s)"
  timeout "$limit" python3 "$@" || echo "=== FAILED ($?): $*"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, torch, transformers as t; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', t.__version__)"
  step 150 $bench/bench_mesh.py --check_cpu
  step 180 $bench/bench_mesh.py --preset qwen2.5-0.5b --dtype bfloat16 --batch 32 --length 512 \
    --sample_batch 64 --prompt_len 128 --new_tokens 128
  step 90 $bench/bench_sampling.py
  step 60 $bench/bench_train_step.py
  step 60 $bench/bench_grpo_step.py --no_peers
} 2>&1 | tee "$out/log"
cp $bench/results/{mesh,sampling,train_step,grpo_step}.md "$out/" 2>/dev/null
exit 0
