#!/usr/bin/env bash
# The real-checkpoint relevance variant (configs/relevance_pod.py:gpu8: its mesh, batch and sequence sizes,
# learning rates, bf16 compute over fp32 master weights) rehearsed end to end on the machine at hand, from a
# stand-in checkpoint of a preset's shape (random weights + a world BPE, experiments/standin_checkpoint.py):
#   bash experiments/bench/run_pod_rehearsal.sh [results folder] [extra --config flags...]
#   PRESET=qwen2.5-0.5b SFT_STEPS=20 RL_STEPS=3 (the defaults)
# It measures what a real run would meet (compile and step times, GPU memory, checkpoint writes), not
# accuracy. The run's report, per-step metrics, a log and GPU memory samples go to the results folder
# (default: $OUT, else /tmp/pod_rehearsal).
set -u -o pipefail
out=${1:-${OUT:-/tmp/pod_rehearsal}}
shift $(( $# > 0 ? 1 : 0 ))
preset=${PRESET:-qwen2.5-0.5b}
work=${WORK:-/tmp/pod_rehearsal_run}
mkdir -p "$out"
rm -rf "$work"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # so the memory samples show what the run really holds

# The preset's shape as overrides of the variant's model (its dtypes and remat stay the variant's).
shape=$(python3 -c "
from configs import common
model = common.model_config('$preset')
print(' '.join(f'--config.model.{k}={model[k]}' for k in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads',
      'num_kv_heads', 'head_dim', 'mlp_dim', 'rope_theta', 'qkv_bias', 'tie_embeddings')))") || exit 1

{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  python3 experiments/standin_checkpoint.py --preset="$preset" --out="$work/checkpoint" || exit 1
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -l 1 >"$out/gpu_memory_mib.txt" &
    sampler=$!
  fi
  start=$(date +%s)
  python3 -m graphgrpo_jax.main --config=configs/relevance_pod.py:gpu8 \
      --config.model.hf_checkpoint="$work/checkpoint" $shape \
      --config.sft.num_steps="${SFT_STEPS:-20}" --config.sft.log_every=1 --config.rl.num_steps="${RL_STEPS:-3}" \
      --config.eval.max_examples=256 --config.checkpoint.save_every=0 --workdir="$work/run" "$@"
  echo "=== main: exit $?, $(( $(date +%s) - start )) s wall"
  [ -n "${sampler:-}" ] && kill "$sampler"
  for f in report.md report.json config.json sft/metrics.jsonl rl/metrics.jsonl eval/metrics.json; do
    [ -f "$work/run/$f" ] && cp "$work/run/$f" "$out/$(echo "$f" | tr / _)"
  done
  [ -f "$out/gpu_memory_mib.txt" ] && echo "peak GPU memory: $(sort -n "$out/gpu_memory_mib.txt" | tail -1) MiB"
} 2>&1 | grep -v "checkpoint_manager.py\|checkpoint.py:\|async_checkpointer\|multihost\|standard_logger" \
  | tee "$out/log"
