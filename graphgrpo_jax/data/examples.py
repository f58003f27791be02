"""One shape of relevance example, produced by the synthetic world and by real ESCI files alike.

Stages (SFT, RL, eval) read `RelevanceExample`s, never the world or an ESCI reader, so a run on real data
is the same code path as a run on the synthetic world. An example carries what a prompt shows (query and
`product_text`), the gold label, its split and, where a teacher wrote one, the chain of thought SFT imitates
(`nodes`); `nodes=None` marks a *label-only* row (SFT can supervise its label alone). Only the synthetic
world knows the true node values (`gold_nodes`), which node diagnostics need.

Real ESCI rows (`esci_examples`) are re-split three ways by a seeded hash of the query id, so every judgement
of a query lands in one split (a query seen in training must not be judged again in eval). This split differs
from `esci.read_flat_jsonl`'s own train/test split (unseeded, two-way), which is ignored here. The teacher is
joined on *every* row, val and test included: eval reads only the gold label, and one rule for all rows keeps
the join counts simple to read.

Teacher modes: `"rule"` runs the built-in weak rule teacher (`teacher.annotate_examples`) in memory;
its chains always agree with the human label, so it leaves no row label-only. `"none"` makes every row
label-only. Anything else is the path of a teacher file (`teacher.read_teacher_file`), joined with
`teacher.join_teacher`: rows it does not cover, or whose teacher label disagrees with the human label, are
label-only, or dropped with `missing="drop"`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from graphgrpo_jax.data import cot, esci
from graphgrpo_jax.data import teacher as teacher_lib
from graphgrpo_jax.data import world as world_lib

SOURCES: tuple[str, ...] = ("world", "esci")  # where examples come from: the synthetic world or real ESCI rows
SPLITS: tuple[str, ...] = ("train", "val", "test")
TEACHER_MODES: tuple[str, ...] = ("rule", "none")  # or the path of a teacher file
PRODUCT_FIELDS: tuple[str, ...] = ("title", "brand", "color", "description", "bullets")
PRODUCT_FIELD_SEPARATOR = " | "

# Where each product field lives on `EsciExample`.
_FIELD_ATTRIBUTES = {"title": "product_title", "brand": "product_brand", "color": "product_color",
                     "description": "product_description", "bullets": "product_bullet_point"}
_HTML_FIELDS = frozenset({"description", "bullets"})  # official ESCI stores these as HTML
_HTML_TAG = re.compile(r"<[^<>]*>")


@dataclasses.dataclass(frozen=True)
class RelevanceExample:
    """One judged (query, product) pair as every stage sees it."""

    example_id: str
    query_id: str
    query: str
    product_text: str  # what the prompt shows of the product (see `product_text()`)
    label: str  # one of cot.LABELS: the gold label (the human label for ESCI)
    split: str  # "train" | "val" | "test" for ESCI; the world's own split names ("train", "test", "ood")
    nodes: Mapping[str, str] | None = None  # teacher CoT node values (the SFT target); None = label-only
    gold_nodes: Mapping[str, str] | None = None  # true node values (synthetic world only)

    def __post_init__(self) -> None:
        if self.label not in cot.LABELS:
            raise ValueError(f"example {self.example_id!r}: label {self.label!r} is not one of {cot.LABELS}")

    @property
    def label_only(self) -> bool:
        return self.nodes is None

    def prompt(self) -> str:
        return cot.prompt_text(self.query, self.product_text)

    def target(self, label_position: str = "last") -> str | None:
        """The rendered teacher chain SFT trains on; None for a label-only row (the caller decides how
        to supervise its label)."""
        return None if self.nodes is None else cot.render(self.nodes, label_position=label_position)


# --------------------------------------------------------------------------------------------------
# The synthetic world
# --------------------------------------------------------------------------------------------------

def world_examples(world: Any, split: str) -> list[RelevanceExample]:
    """The world's judged pairs of one split (`world.SPLITS`), in the world's order, with teacher and
    gold nodes; prompts and targets are the ones the stages built from the pairs directly."""
    if split not in world_lib.SPLITS:
        raise ValueError(f"unknown world split {split!r}; the world has {world_lib.SPLITS}")
    return [RelevanceExample(example_id=pair.pair_id, query_id=pair.query_id, query=pair.query,
                             product_text=pair.product_title, label=pair.label, split=pair.split,
                             nodes=dict(pair.teacher), gold_nodes=dict(pair.gold))
            for pair in world.split_pairs(split)]


# --------------------------------------------------------------------------------------------------
# Splitting by query
# --------------------------------------------------------------------------------------------------

def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Both fractions finite and >= 0, with room left for train."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1 so train keeps queries, "
                         f"got {val_fraction} + {test_fraction}")


def query_split(query_id: str, *, seed: int, val_fraction: float, test_fraction: float) -> str:
    """"test", "val" or "train" for a query: a point in [0, 1) from sha256 of f"{seed}:{query_id}" (not
    Python's salted hash, so every process agrees) falls in [0, test), [test, test + val) or the rest."""
    check_fractions(val_fraction, test_fraction)
    digest = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


# --------------------------------------------------------------------------------------------------
# What the prompt shows of a product
# --------------------------------------------------------------------------------------------------

def check_product_fields(fields: Sequence[str]) -> tuple[str, ...]:
    """The fields as a tuple, or an error saying what is wrong with them."""
    if isinstance(fields, str):
        raise TypeError(f"product fields must be a sequence of names such as ('title',), got the string {fields!r}")
    fields = tuple(fields)
    unknown = [field for field in fields if field not in PRODUCT_FIELDS]
    if unknown:
        raise ValueError(f"unknown product fields {unknown}; allowed: {list(PRODUCT_FIELDS)}")
    if "title" not in fields:
        raise ValueError(f"product fields must include 'title', got {list(fields)}")
    if len(set(fields)) != len(fields):
        raise ValueError(f"product fields repeat a name: {list(fields)}")
    return fields


def product_text(example: esci.EsciExample, fields: Sequence[str]) -> str:
    """The configured product fields in the given order, joined by " | ": the title as it is, every
    other field as "name: value" and left out when empty, e.g. ("title", "brand", "color") ->
    "Title | brand: X | color: Y". Whitespace is collapsed to single spaces, and description and bullets
    lose their HTML tags and entities (the prompt should carry words, not markup). ("title",) gives the
    title alone, so title-only prompts are those of `cot.prompt_text(query, title)`."""
    parts = []
    for field in check_product_fields(fields):
        value = str(getattr(example, _FIELD_ATTRIBUTES[field]))
        if field in _HTML_FIELDS:
            value = html.unescape(_HTML_TAG.sub(" ", value))
        value = " ".join(value.split())
        if field == "title":
            parts.append(value)
        elif value:
            parts.append(f"{field}: {value}")
    return PRODUCT_FIELD_SEPARATOR.join(parts)


# --------------------------------------------------------------------------------------------------
# Real ESCI rows
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExampleSet:
    """Examples of every split, with the counts that say how they were made.

    `counts`: rows (read), skipped (bad rows skipped in total; `skipped_reasons` breaks them down),
    train / val / test (examples kept per split), label_only (kept rows without nodes), the join counts
    of `teacher.join_teacher` (joined, without_teacher, label_disagrees, dropped, kept,
    teacher_ids_unused; joined + without_teacher + label_disagrees == rows, kept + dropped == rows) and,
    with the rule teacher only, rule_against_evidence (chains whose match nodes the label forced).
    """

    examples: tuple[RelevanceExample, ...]
    counts: dict[str, int]
    skipped_reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> list[RelevanceExample]:
        """The examples of one split, possibly none; a name that is no split raises (a typo is not empty)."""
        if name not in SPLITS and all(example.split != name for example in self.examples):
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [example for example in self.examples if example.split == name]


def _teacher_file(mode: str | os.PathLike, rows: Sequence[esci.EsciExample]) -> tuple[teacher_lib.TeacherFile,
                                                                                         dict[str, int]]:
    """The teacher nodes for `rows` under a teacher mode, and counts only that mode has."""
    if mode == "rule":
        nodes_by_id, summary = teacher_lib.annotate_examples(rows)
        return teacher_lib.TeacherFile(nodes_by_id, {}), {"rule_against_evidence": summary["against_evidence"]}
    if mode == "none":
        return teacher_lib.TeacherFile({}, {}), {}
    return teacher_lib.read_teacher_file(mode), {}


def _check_teacher_mode(mode: Any) -> None:
    if not isinstance(mode, (str, os.PathLike)):
        raise TypeError(f"teacher must be one of {TEACHER_MODES} or a teacher file path, got {mode!r}")
    if mode not in TEACHER_MODES and not pathlib.Path(mode).is_file():
        raise ValueError(f"teacher must be one of {TEACHER_MODES} or the path of a teacher file; "
                         f"no such file: {str(mode)!r}")


def esci_examples(path: str | os.PathLike, *, teacher: str | os.PathLike = "rule", missing: str = "label_only",
                  seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                  product_fields: Sequence[str] = ("title",), skip_bad_rows: bool = False) -> ExampleSet:
    """Relevance examples from a flat ESCI JSONL (`esci.read_flat_jsonl`), split three ways by query
    (`query_split`) and joined with a teacher (see the module docstring for the modes).

    Arguments are checked before the file is read. An empty split is no error here (the caller decides);
    a set with no example at all is, since no stage can run on it.
    """
    check_fractions(val_fraction, test_fraction)
    fields = check_product_fields(product_fields)
    if missing not in teacher_lib.MISSING_MODES:
        raise ValueError(f"missing must be one of {teacher_lib.MISSING_MODES}, got {missing!r}")
    _check_teacher_mode(teacher)

    data = esci.read_flat_jsonl(path, skip_bad_rows=skip_bad_rows)
    teacher_file, mode_counts = _teacher_file(teacher, data.examples)
    joined = teacher_lib.join_teacher(data.examples, teacher_file, missing=missing)
    examples = tuple(_relevance_example(row.example, row.nodes, fields, seed, val_fraction, test_fraction)
                     for row in joined.rows)
    counts = {"rows": len(data.examples), "skipped": sum(data.skipped.values()),
              **{split: sum(example.split == split for example in examples) for split in SPLITS},
              "label_only": sum(example.label_only for example in examples), **joined.counts, **mode_counts}
    if not examples:
        raise ValueError(f"{path}: no examples left (teacher={str(teacher)!r}, missing={missing!r}); counts {counts}")
    return ExampleSet(examples, counts, dict(data.skipped))


def _relevance_example(row: esci.EsciExample, nodes: Mapping[str, str] | None, fields: tuple[str, ...], seed: int,
                       val_fraction: float, test_fraction: float) -> RelevanceExample:
    return RelevanceExample(
        example_id=row.example_id, query_id=row.query_id, query=row.query, product_text=product_text(row, fields),
        label=row.label,
        split=query_split(row.query_id, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction),
        nodes=None if nodes is None else dict(nodes))

