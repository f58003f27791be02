"""Default sections of the options that stages read, kept apart from the stages themselves.

A config file builds its sections from here and from the light `default_*_config` functions of graph/ and rl/,
so loading a config (`--config=configs/relevance.py`, a notebook, a test) loads no training stage, no search
engine, no checkpoint library and no tokenizer library. The stage that reads a section validates it.
"""

import ml_collections


def esci_data() -> ml_collections.ConfigDict:
    """`config.data.esci`: real relevance rows for SFT, RL and eval when `config.data.source = "esci"`
    (tasks/relevance.py reads them through data/examples.py)."""
    return ml_collections.ConfigDict(dict(
        path="",  # a flat ESCI JSONL: query, product_title, esci_label or relevance (data/esci.py)
        # The CoT targets: "rule" (the built-in weak silver teacher, data/teacher.py), "none" (label-only SFT),
        # or the path of a teacher file (one line per pair: example_id and the seven node texts; README).
        teacher="rule",
        missing="label_only",  # rows without a usable teacher chain: "label_only" (SFT trains the label) or "drop"
        split_seed=0,  # train / val / test by query id (no query in two splits)
        val_fraction=0.1,
        test_fraction=0.2,
        product_fields=("title",),  # what the prompt shows: title, brand, color, description, bullets
        skip_bad_rows=False,  # True: count and skip malformed rows instead of failing on the first
    ))


def distill() -> ml_collections.ConfigDict:
    """`config.distill`: graph-node multi-head distillation (train/distill.py validates it)."""
    return ml_collections.ConfigDict(dict(
        run_name="distill",  # stage name of checkpoints and metrics; one per student trained in a workdir
        policy="rl",  # the policy checkpoint ("sft" or "rl") that teaches
        teacher="forced",  # forced | samples | gold (the world's node labels, no policy)
        num_samples=8,  # samples per pair (teacher="samples")
        sample_temperature=1.0,
        sample_smoothing=0.5,  # pseudo-count per value (teacher="samples")
        heads=("y", "ms", "ma"),  # ("y",): the single-head student
        loss_weights=dict(y=1.0, ms=1.0, ma=1.0),  # λ_v
        temperature=2.0,  # T
        ce_weight=1.0,  # weight of CE(gold y)
        sources=("world",),  # training pairs: world (train split, with teacher) and/or esci (CE only)
        esci_path="",  # flat ESCI JSONL (e.g. shared/data/esci-graded-subset/esci_pairs.jsonl); "" for none
        esci_test_fraction=0.2,  # share of ESCI query ids held out for evaluation
        max_length=48,  # student tokens per pair: every synthetic pair, 3 in 4 ESCI graded-subset pairs
        batch_size=32,
        num_steps=150,
        log_every=10,
        optim=dict(learning_rate=1e-4, warmup_steps=15, schedule="cosine", grad_clip=1.0, weight_decay=0.01),
    ))


def rewrite() -> ml_collections.ConfigDict:
    """`config.rewrite`: reward options of the rewrite task (tasks/rewrite.py, rl/rewards.py)."""
    return ml_collections.ConfigDict(dict(
        fusion="rfusion",  # rfusion | product | min | rel | conv | rule (rewards.FUSION_MODES)
        w_rel=0.5,
        w_conv=0.5,
        k=10,  # r_conv's cut-off
        conv_metric="recall",  # recall | ndcg
        # r_rule's bounds; the defaults of `rl.rewards.rule_violations` (tests/test_architecture.py keeps them equal).
        rule=dict(min_words=1, max_words=32, max_chars=256, max_word_repeats=2),
        # r_rel's judge (JUDGES): "tagger" (TagJudge) or "rule" (RuleJudge, an oracle for ablations) judge the
        # rewrite's words; "student" or "retrieval_rule" (an oracle) grade the top `k` products it retrieves
        # (RetrievalJudge). "student" reads the `distill` stage's student from `student_workdir` ("" = here).
        judge="tagger",
        judge_batch_size=32,  # tagger: (query, rewrite) pairs per call (3 rows each); student: pairs per call
        student_workdir="",
        # The training queries RL rewrites: "all", or "unlabelled", those without a teacher rewrite in SFT
        # (see `labelled_fraction` in config.rewrite_sft), which RL learns from only through the rewards.
        rl_queries="all",
    ))


def export() -> ml_collections.ConfigDict:
    """`config.export`: the `export` stage's Hugging Face folders (train/export.py)."""
    return ml_collections.ConfigDict(dict(
        policies=("rl",),  # "sft" and/or "rl": each to <workdir>/export/<policy>/
        dtype="float32",  # float32 | bfloat16: the safetensors' dtype
    ))
