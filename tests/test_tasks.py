"""The task registry and the relevance task's SFT rows: the loops know tasks only through `tasks/`."""

import ast
import pathlib

import ml_collections
import numpy as np
import pytest

from configs import relevance as relevance_configs
from graphgrpo_jax import tasks, tokenization
from graphgrpo_jax.data import batching, cot, examples, prepare
from graphgrpo_jax.tasks import relevance

ROOT = pathlib.Path(__file__).resolve().parents[1]
VALUES = {"qs": "running shoes", "qa": "color=red", "ps": "trail shoes", "pa": "color=red", "ms": "partial",
          "ma": "match", "y": "Substitute"}


def _example(nodes, label="Substitute"):
    return examples.RelevanceExample(example_id="e", query_id="q", query="red runners",
                                     product_text="Acme trail shoes red", label=label, split="train", nodes=nodes)


def test_built_in_tasks_load_on_first_use_and_unknown_names_fail():
    assert set(tasks.task_names()) >= {"relevance", "rewrite"}
    assert tasks.get_task("relevance").rl_task is relevance.rl_task
    with pytest.raises(ValueError, match=r"config.task = 'ranking'.*relevance.*rewrite"):
        tasks.get_task("ranking")
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task("relevance", rl_task=relevance.rl_task, sft_data=relevance.sft_data)


def test_a_registered_task_is_what_the_loops_get():
    entry = tasks.register_task("echo_for_test", rl_task=lambda c, w, s: "rl", sft_data=lambda c, w, t: "sft")
    try:
        assert tasks.task_of({"task": "echo_for_test"}) is entry
        assert tasks.task_of({}) is tasks.get_task("relevance")  # the default task
    finally:
        tasks._REGISTRY.pop("echo_for_test")


@pytest.mark.parametrize("stage", ["sft.py", "rl.py"])
def test_the_training_loops_name_no_task(stage):
    """In code (names, attributes, imports, string constants), not in docstrings."""
    tree = ast.parse((ROOT / "graphgrpo_jax" / "train" / stage).read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.update(node.name.split("."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            words.update(node.module.split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    named = words & {"relevance", "rewrite", "RelevanceTask", "RewriteTask", "load_world", "world"}
    assert not named, f"train/{stage} names {sorted(named)}: tasks are looked up in tasks/"


def test_label_only_rows_train_the_label_alone():
    assert relevance.sft_response(_example(None, "Exact")) == "<y>Exact</y>"
    assert relevance.sft_response(_example(VALUES)) == cot.render(VALUES)
    assert relevance.sft_response(_example(VALUES), "first").startswith("<y>Substitute</y><qs>")


def test_sft_rows_of_the_world_are_the_teacher_chains(tmp_path):
    tiny_config = relevance_configs.get_config("micro")
    world = prepare.load_world(tiny_config)
    pairs = world.split_pairs("train")
    tokenizer = tokenization.train_tokenizer(prepare.corpus(world), tiny_config.tokenizer.vocab_size, tmp_path / "tok",
                                             extra_special_tokens=cot.node_tags())
    data = relevance.sft_data(tiny_config, str(tmp_path), tokenizer)
    expected = batching.encode_sft(tokenizer, [cot.prompt_text(p.query, p.product_title) for p in pairs],
                                   [cot.render(p.teacher, label_position=tiny_config.sft.label_position)
                                    for p in pairs], tiny_config.data.max_prompt_len,
                                   tiny_config.data.max_response_len)
    for key in ("tokens", "loss_mask", "node_ids"):
        np.testing.assert_array_equal(data.rows[key], expected[key])
    rows = data.sample_rows(3)
    assert len(rows) == tiny_config.optim.batch_size and len(set(rows)) == len(rows)
    np.testing.assert_array_equal(rows, data.sample_rows(3))  # a function of the step
    assert data.num_steps == tiny_config.sft.num_steps
    assert data.mask == dict(label_node=cot.NODES.index("y"), num_nodes=len(cot.NODES),
                             p_mask=tiny_config.sft.p_mask, mask_unit=tiny_config.sft.mask_unit)


@pytest.mark.parametrize("text, answer, label", [
    (cot.render(VALUES), "cot", "Substitute"),
    ("<qs>running shoes</qs><y>Exact</y>", "cot", None),  # a chain with nodes missing is a format failure
    ("Exact", "label", "Exact"),
    ("The answer is: irrelevant.", "label", "Irrelevant"),
    ("Substitute or Complement", "label", "Substitute"),  # the first label word
    ("inexact", "label", None),  # whole words only
    ("", "label", None),
])
def test_read_label(text, answer, label):
    assert relevance.read_label(text, answer) == label


def test_plain_answers_train_the_label_word():
    assert relevance.sft_response(_example(VALUES), answer="label") == "Substitute"
    assert relevance.sft_response(_example(None, "Exact"), answer="label") == "Exact"
    with pytest.raises(ValueError, match="config.data.answer = 'json'"):
        relevance.answer_format(ml_collections.ConfigDict({"data": {"answer": "json"}}))
