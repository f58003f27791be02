"""Tasks: what the policy is asked, how its answers are read and how they are rewarded.

A task is one module holding its prompts, parser, rewards and scoring (DESIGN.md: "a task is a prompt
format + parser + rewards + evaluator chosen by config"). The RL loop, SFT and eval know no task by name:
they look `config.task` up here: the `sft` stage asks the task for its SFT rows (`sft_data`), the `rl` stage
builds the task (`rl_task`) and talks to it through the small `Task` protocol below.

Built-in tasks (each module registers itself when imported, and is imported on first use, so that a
relevance run never loads the search engine the rewrite task needs):

* `relevance` (`tasks/relevance.py`): query–product relevance judged through the tagged chain of thought.
* `rewrite` (`tasks/rewrite.py`): query rewriting on a fused reward of rules, relevance and conversion.

A new task calls `register_task("name", rl_task=..., sft_data=...)` in a module the run imports.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from graphgrpo_jax.rl.rollout import Scored

_BUILT_IN = {"relevance": "graphgrpo_jax.tasks.relevance", "rewrite": "graphgrpo_jax.tasks.rewrite"}


class Task(Protocol):
    """What the RL loop needs of a task: its prompts, encoded, and a scorer of decoded completions."""

    name: str

    def encode_prompts(self, tokenizer: Any, max_prompt_len: int) -> dict[str, np.ndarray]:
        """The task's RL prompts, in `batching.encode_prompts`' left-padded layout (rows = prompt index)."""

    def score(self, rows: np.ndarray, texts: list[str], offsets: list[np.ndarray]) -> Scored:
        """Rewards, node values and token node ids of completions `texts` of prompts `rows` (`rollout.Scored`)."""


@dataclasses.dataclass(frozen=True)
class SftData:
    """A task's SFT rows and how the `sft` stage draws and masks them."""

    rows: dict[str, np.ndarray]  # `batching.encode_sft` arrays, [N, T] each
    sample_rows: Callable[[int], np.ndarray]  # step -> the rows of its global batch (the same on every process)
    num_steps: int
    log_every: int
    mask: dict[str, Any]  # `sft.make_train_step`'s CoT-masking keywords: label_node, num_nodes, p_mask, mask_unit


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """A registered task: `rl_task(config, workdir, spec) -> Task` and `sft_data(config, workdir, tokenizer)`;
    `workdir` holds what the task reads from earlier stages."""

    rl_task: Callable[[Any, str, Any], Task]
    sft_data: Callable[[Any, str, Any], SftData]


_REGISTRY: dict[str, TaskEntry] = {}


def register_task(name: str, *, rl_task: Callable[[Any, str, Any], Task],
                  sft_data: Callable[[Any, str, Any], SftData]) -> TaskEntry:
    if name in _REGISTRY:
        raise ValueError(f"a task named {name!r} is already registered")
    _REGISTRY[name] = TaskEntry(rl_task, sft_data)
    return _REGISTRY[name]


def task_names() -> tuple[str, ...]:
    return tuple(sorted(set(_REGISTRY) | set(_BUILT_IN)))


def get_task(name: str) -> TaskEntry:
    """The task registered as `name`, importing a built-in task's module on first use."""
    if name not in _REGISTRY and name in _BUILT_IN:
        importlib.import_module(_BUILT_IN[name])
    if name not in _REGISTRY:
        raise ValueError(f"config.task = {name!r}: no such task; choose one of {task_names()}")
    return _REGISTRY[name]


def task_of(config: Any) -> TaskEntry:
    """The task `config.task` names (default "relevance")."""
    return get_task(config.get("task", "relevance"))
