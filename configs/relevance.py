r"""Relevance experiments (Graph-GRPO, paper A): world → tokenizer → CoT-masked SFT → Graph-GRPO → eval.

Run:
  python -m graphgrpo_jax.main --config=configs/relevance.py:cpu --workdir=runs/relevance_cpu

Variants:
  cpu    (default) tiny model, synthetic world, the whole pipeline on a laptop CPU.
  micro  the same pipeline shrunk to seconds per stage (tests).
  smoke  the decoder on a synthetic bigram language (checks the loop, checkpoints and metrics).
  eval_file  eval-only: judge an ESCI-format JSONL with a finished run's checkpoints (train/evaluate.py):
             --config.eval.input_path=FILE --config.eval.checkpoint_workdir=RUN [--config.eval.policies=...]
Override any field on the command line, e.g. `--config.credit.variant=outcome`; the paper-faithful
credit setting is `--config.credit.norm=node --config.credit.kappa=1` with φ = 0.5 on every edge.
"""

import ml_collections
from ml_collections import config_dict

from configs import common, defaults
from graphgrpo_jax.graph import controller, credit, spec
from graphgrpo_jax.rl import grpo


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    # Stages run in order; each reads what earlier ones wrote to the workdir.
    config.stages = ("data", "sft", "rl", "eval", "report")
    # A small model trained from scratch: big enough that CoT-masked SFT reaches ~0.7 test accuracy on the
    # world (imperfect, so RL has something to fix), small enough for the whole run on a 2-core CPU.
    config.model = common.model_config("tiny", hidden_size=128, head_dim=32, mlp_dim=384)
    # A Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer): its weights start SFT, its
    # config.json fixes the model's shapes and its tokenizer replaces the trained one; "" trains from scratch.
    checkpoint = config_dict.FieldReference("", field_type=str)
    config.model.hf_checkpoint = checkpoint
    config.mesh = common.mesh_config("single")

    config.world = ml_collections.ConfigDict(dict(
        seed=0, num_queries=1500, pairs_per_query=4, products_per_type=16, corrupt_cot_share=0.2))
    config.tokenizer = ml_collections.ConfigDict(dict(vocab_size=1024, hf_checkpoint=checkpoint))
    # Where the relevance examples come from: "world" (the synthetic world above) or "esci" (config.data.esci);
    # prompts in the "plain" format of a model trained from scratch or through the checkpoint's "chat" template;
    # the answer a tagged chain of thought ("cot") or one plain label word ("label": zero-shot baselines).
    config.data = ml_collections.ConfigDict(dict(max_prompt_len=48, max_response_len=64, source="world",
                                                 prompt_style="plain", answer="cot", esci=defaults.esci_data()))

    config.optim = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=20, schedule="cosine", grad_clip=1.0, weight_decay=0.0,
        batch_size=32, microbatches=4))  # SFT steps in 4 slices of 8 rows: the same update, 15-30% faster on CPU
    config.checkpoint = ml_collections.ConfigDict(dict(save_every=100, max_to_keep=2))

    # CoT random masking (METHOD.md A4): label always supervised, p_mask of the reasoning left out.
    config.sft = ml_collections.ConfigDict(dict(
        num_steps=800, p_mask=0.3, mask_unit="token", label_position="last", log_every=20))

    # Graph-GRPO (METHOD.md A2, A3, C).
    config.graph = spec.default_graph_config()
    config.credit = credit.default_credit_config()
    config.controller = controller.default_controller_config()
    config.grpo = grpo.default_grpo_config()
    config.grpo.num_generations = 8
    config.grpo.max_completion_length = config.data.max_response_len
    config.rl = ml_collections.ConfigDict(dict(
        num_steps=80, prompts_per_step=8, temperature=1.0, top_k=0, top_p=1.0, r_format=-1.0, log_every=1))
    # 1e-4: the best of the credit ablation's LR sweep for Graph-GRPO and outcome GRPO alike (experiments/README.md).
    # microbatches: the update's forward and backward over slices of whole groups; the same update, less
    # memory, and on this CPU a faster one (the bench's GRPO update, 64 rows: 2.00 s -> 1.51 s in 4 slices).
    config.rl_optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, warmup_steps=0, schedule="constant", grad_clip=1.0, weight_decay=0.0,
        microbatches=4))

    # Graph-node multi-head distillation into MiniLM-L6 (METHOD.md A5); not in the default stages yet:
    # add "distill" to config.stages (about 10 minutes of CPU).
    config.distill = defaults.distill()
    # Add "export" to config.stages for the trained policy as a Hugging Face folder (<workdir>/export/rl).
    config.export = defaults.export()

    config.eval = ml_collections.ConfigDict(dict(
        policies=("sft", "rl"), splits=("test", "ood"), max_examples=256, batch_size=64,
        # The eval-only mode (`eval_file` stage, variant `eval_file`): an ESCI-format JSONL judged by the
        # checkpoints of a finished run ("" = this workdir); rows "all" or a query-id split "train"/"test";
        # skip_bad_rows: count and skip malformed rows (per reason, in the eval JSON) instead of failing.
        input_path="", checkpoint_workdir="", input_split="all", input_test_fraction=0.2, skip_bad_rows=False))

    # Synthetic-language smoke run of the decoder and the training loop.
    config.lm_smoke = ml_collections.ConfigDict(dict(num_steps=60, seq_len=32, vocab_size=64, log_every=5))

    if variant == "micro":
        config.model.update(hidden_size=64, head_dim=16, mlp_dim=128)
        config.world.update(num_queries=80, pairs_per_query=2)
        config.sft.update(num_steps=6, log_every=2)
        config.rl.update(num_steps=2, prompts_per_step=2)
        config.rl_optim.microbatches = 2
        config.grpo.num_generations = 4
        config.optim.batch_size = 8
        config.eval.update(max_examples=8, batch_size=8)
        config.checkpoint.save_every = 2
        config.distill.update(max_length=32, batch_size=8, num_steps=4, log_every=2)
    elif variant == "smoke":
        config.stages = ("lm_smoke",)
        config.lm_smoke.num_steps = 10
        config.optim.update(warmup_steps=2, schedule="constant", batch_size=16)
    elif variant == "eval_file":
        config.stages = ("eval_file",)
        config.eval.policies = ("rl",)
    elif variant != "cpu":
        raise ValueError(f"unknown variant {variant!r} of configs/relevance.py; choose cpu, micro, smoke or "
                         f"eval_file")
    return config
