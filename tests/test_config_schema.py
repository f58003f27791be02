"""The declared config schema (`config_validation.SCHEMA`): every rule bites, every config field is covered, the
choices written out for heavy modules match those modules, and a misspelled field gets the nearest names."""

import importlib
import json
import subprocess
import sys

import ml_collections
import pytest

from graphgrpo_jax import config_validation as cv

CONFIGS = {"relevance": ("cpu", "micro", "smoke", "eval_file"), "rewrite": ("cpu", "micro", "gpu", "smollm2_esci", "smollm2_esci_gpu"),
           "smollm2_esci": ("cpu", "micro", "gpu"), "relevance_pod": ("gpu8", "v5p_128")}

# Fields no SCHEMA rule checks, and what checks them instead.
NOT_IN_SCHEMA = {
    "stages": "validate(stages=main.STAGES)",
    "data.esci.teacher": "a teacher mode or a teacher file: _cross_field_errors and data_file_errors",
    "data.esci.path": "data_file_errors", "eval.input_path": "stage_file_errors",
    "eval.checkpoint_workdir": "stage_file_errors", "distill.esci_path": "stage_file_errors",
    "rewrite.student_workdir": "stage_file_errors", "model.hf_checkpoint": "checkpoint_errors",
    "tokenizer.hf_checkpoint": "checkpoint_errors (the same folder as the model's)",
    "variant": "a name", "model.preset": "a name", "mesh.preset": "a name", "distill.run_name": "a name",
    "mesh.coordinator_address": "mesh.maybe_initialize_distributed", "mesh.num_processes": "the same",
    "mesh.process_id": "the same",
    **{f"rewrite_data.{field}": "data_file_errors" for field in ("train_path", "val_path", "test_path", "pool_paths")},
}
NOT_IN_SCHEMA_SECTIONS = {"graph.": "graph.spec.graph_spec (run by _settings_errors)"}


def all_configs():
    for name, variants in CONFIGS.items():
        module = importlib.import_module(f"configs.{name}")
        for variant in variants:
            yield f"{name}:{variant}", module.get_config(variant)


def config_with(path):
    """A shipped config holding `path`, as a plain nested dict (so a test may give a field any type)."""
    for _, config in all_configs():
        if cv.get_field(config, path, None) is not None or path in cv.field_paths(config):
            return json.loads(config.to_json_best_effort())
    raise AssertionError(f"no shipped config has config.{path}: a rule on no field is dead, remove it")


def set_field(tree, path, value):
    *sections, leaf = path.split(".")
    for section in sections:
        tree = tree[section]
    tree[leaf] = value


def bad_values(rule):
    if isinstance(rule, cv.Choice):
        return [("no_such_choice",) if rule.many else "no_such_choice"] + (["no_such_choice"] if rule.many else [])
    if isinstance(rule, cv.Range):
        values = ["text"]
        if rule.low is not None:
            values.append(rule.low - 1 if rule.low_inclusive else rule.low)
        if rule.high is not None:
            values.append(rule.high + 1)
        if rule.integer:
            values.append(float(rule.low if rule.low is not None else 0) + 1.5)
        return values
    return ["text", [1, 2]]


@pytest.mark.parametrize("rule", cv.SCHEMA, ids=lambda rule: rule.path)
def test_every_rule_rejects_a_bad_value_naming_its_field(rule):
    for bad in bad_values(rule):
        tree = config_with(rule.path)
        set_field(tree, rule.path, bad)
        with pytest.raises(cv.ConfigError, match=f"config.{rule.path} = "):
            cv.validate(ml_collections.ConfigDict(tree), check_files=False)


def test_every_shipped_config_passes_and_every_field_has_a_check():
    from graphgrpo_jax import main

    ruled = {rule.path for rule in cv.SCHEMA}
    unchecked = set()
    for name, config in all_configs():
        cv.validate(config, stages=main.STAGES, check_files=False)
        unchecked |= {path for path in cv.field_paths(config) if path not in ruled and path not in NOT_IN_SCHEMA
                      and not path.startswith(tuple(NOT_IN_SCHEMA_SECTIONS))}
    assert not unchecked, f"config fields with no rule in config_validation.SCHEMA: {sorted(unchecked)}"


def test_choices_written_out_match_the_modules_that_read_them():
    from graphgrpo_jax import artifacts
    from graphgrpo_jax.models import decoder
    from graphgrpo_jax.rl import rewards
    from graphgrpo_jax.tasks import rewrite
    from graphgrpo_jax.train import distill, evaluate, export

    assert cv.SFT_AND_RL_POLICIES == distill.POLICIES
    assert set(cv.EVAL_POLICIES) == set(evaluate.FILE_POLICIES)
    assert cv.DISTILL_TEACHERS == distill.TEACHERS
    assert cv.STUDENT_HEADS == tuple(artifacts.STUDENT_NODE_VALUES)
    assert cv.EXPORT_DTYPES == export.DTYPES
    assert cv.REWRITE_JUDGES == rewrite.JUDGES
    assert cv.REWRITE_RL_QUERIES == rewrite.RL_QUERIES
    assert cv.FUSION_MODES == rewards.FUSION_MODES
    assert cv.FUSIONS_READING_REL == tuple(m for m in rewards.FUSION_MODES if "rel" in rewards.FUSION_INPUTS[m])
    assert cv.REWRITE_WORLD_ONLY_JUDGES == rewrite.WORLD_ONLY_JUDGES
    assert cv.CONVERSION_METRICS == rewards.CONVERSION_METRICS
    assert cv.LORA_TARGETS == decoder.LORA_TARGETS
    from graphgrpo_jax import main
    assert set(cv.RL_STAGES) <= set(main.STAGES)


def test_cross_field_rules_of_the_stages_that_run():
    config = importlib.import_module("configs.relevance").get_config("cpu")
    config.eval.splits = ("val",)  # the world has train / test / ood
    config.eval.policies = ("student",)
    with pytest.raises(cv.ConfigError) as raised:
        cv.validate(config, check_files=False)
    assert "config.eval.splits = ('val',): config.data.source = 'world' has the splits" in str(raised.value)
    assert "the eval stage judges ('sft', 'rl', 'base'), not ['student']" in str(raised.value)
    config.stages = ("data", "sft")  # neither is checked when the eval stage does not run
    cv.validate(config, check_files=False)


def test_files_of_the_stages_that_run_are_checked(tmp_path):
    config = importlib.import_module("configs.relevance").get_config("eval_file")
    config.eval.input_path = str(tmp_path / "missing.jsonl")
    config.eval.checkpoint_workdir = str(tmp_path)  # a folder, but no finished run in it
    with pytest.raises(cv.ConfigError) as raised:
        cv.validate(config)
    assert f"config.eval.input_path = '{tmp_path / 'missing.jsonl'}': no such file" in str(raised.value)
    assert "config.eval.checkpoint_workdir" in str(raised.value) and "holds no config.json" in str(raised.value)
    config.stages = ("data",)
    cv.validate(config, check_files=True)


def test_unknown_field_suggests_the_nearest_names():
    config = importlib.import_module("configs.relevance").get_config("cpu")
    assert cv.unknown_field_error(config, "model.hf_checkpoint") is None
    assert cv.unknown_field_error(config, "model.hf_ckpt") == (
        "config.model.hf_ckpt: config.model has no field 'hf_ckpt'; did you mean config.model.hf_checkpoint?")
    assert "did you mean config.model?" in cv.unknown_field_error(config, "modle.hf_checkpoint")
    wrong_section = cv.unknown_field_error(config, "rl.num_generations")  # the field lives in grpo
    assert "config.rl has no field 'num_generations'" in wrong_section
    assert "config.grpo.num_generations" in wrong_section
    assert "is a value, not a section" in cv.unknown_field_error(config, "seed.value")
    assert cv.unknown_field_error(config, "model.zzzzzz") == "config.model.zzzzzz: config.model has no field 'zzzzzz'"


def test_main_names_a_misspelled_override_before_any_work(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "graphgrpo_jax.main", "--config=configs/relevance.py:micro",
         f"--workdir={tmp_path}", "--config.model.hf_ckpt=x"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "config.model has no field 'hf_ckpt'; did you mean config.model.hf_checkpoint?" in run.stderr
    assert not any(tmp_path.iterdir())
