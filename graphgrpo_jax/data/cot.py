"""The tagged chain-of-thought template: node vocabularies, the label rule, render, parse, prompts.

A relevance response is one tagged span per reasoning node (METHOD.md A1)::

    <qs>running shoes</qs><qa>color=red</qa><ps>trail shoes</ps><pa>color=red</pa><ms>partial</ms>
    <ma>match</ma><y>Substitute</y>

`render` writes node values into that template and `parse` reads any text back. The parser never
raises: malformed generations (missing, repeated, nested or unclosed tags, unknown labels, stray text,
empty output, arbitrary bytes) are the normal case early in RL, and each one must become a counted format
failure with a reason, not a crash of the training loop.

Spans. `ParseResult.char_spans[node]` is the half-open character range of the whole element, *tags
included* (`<ms>match</ms>`): the RL loop credits a node's advantage to every token that writes the node,
and the tags are written by the policy as much as the value is. `ParseResult.value_spans[node]` is the
range of the text between the tags. `token_node_ids` assigns a token to the node whose span holds the
token's first character; when the tokenizer splits at tag boundaries (e.g. the tags are added tokens),
the tokens of a node cover exactly its characters.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

# The reasoning nodes in template order: query subject, query attributes, product subject, product
# attributes, subject match, attribute match, label.
NODES: tuple[str, ...] = ("qs", "qa", "ps", "pa", "ms", "ma", "y")
LABEL_NODE = "y"
# `partial` subject match means the product is a substitute type (trail shoes for running shoes).
MS_VALUES: tuple[str, ...] = ("match", "partial", "complement", "mismatch")
# `match`: every query attribute satisfied (or the query has none); `partial`: some; `mismatch`: none.
MA_VALUES: tuple[str, ...] = ("match", "partial", "mismatch")
LABELS: tuple[str, ...] = ("Exact", "Substitute", "Complement", "Irrelevant")
# Categorical nodes and their allowed values; reading nodes (qs, qa, ps, pa) are free text.
DEFAULT_ALLOWED: dict[str, tuple[str, ...] | None] = {
    "qs": None, "qa": None, "ps": None, "pa": None,
    "ms": MS_VALUES, "ma": MA_VALUES, "y": LABELS,
}
# Attribute lists are written "key=value; key=value" sorted by key, or NO_ATTRIBUTES when empty.
NO_ATTRIBUTES = "none"
ATTRIBUTE_SEPARATOR = "; "

WILDCARD = "*"
# (ms, ma, y) rows, first match wins; ESCI semantics: the right product type with every requested
# attribute is Exact, the right type with a wrong attribute or a substitute type is Substitute, an
# accessory type is Complement, anything else is Irrelevant. Data, not code, so a config can replace it.
DEFAULT_LABEL_RULE: tuple[tuple[str, str, str], ...] = (
    ("match", "match", "Exact"),
    ("match", "partial", "Substitute"),
    ("match", "mismatch", "Substitute"),
    ("partial", WILDCARD, "Substitute"),
    ("complement", WILDCARD, "Complement"),
    ("mismatch", WILDCARD, "Irrelevant"),
)

# Rewriting task: tags of a (query, rewrite) pair.
REWRITE_TAGS: tuple[str, ...] = ("relevant", "partial", "irrelevant")

_TAG_RE = re.compile(r"<(/?)([A-Za-z_][A-Za-z0-9_]*)>")


def apply_label_rule(rule: Sequence[Sequence[str]], ms: str, ma: str) -> str:
    """The label of the first `(ms, ma, y)` row matching `(ms, ma)`; `"*"` matches anything."""
    for rule_ms, rule_ma, label in rule:
        if rule_ms in (ms, WILDCARD) and rule_ma in (ma, WILDCARD):
            return label
    raise ValueError(f"label rule has no row for ms={ms!r}, ma={ma!r}")


def format_attributes(attributes: Mapping[str, str]) -> str:
    """`{"color": "red", "brand": "x"}` -> `"brand=x; color=red"`; `{}` -> `"none"`."""
    if not attributes:
        return NO_ATTRIBUTES
    return ATTRIBUTE_SEPARATOR.join(f"{key}={attributes[key]}" for key in sorted(attributes))


def parse_attributes(text: str) -> dict[str, str] | None:
    """Inverse of `format_attributes`; None when `text` is not a well-formed attribute list."""
    text = text.strip()
    if text == NO_ATTRIBUTES:
        return {}
    attributes: dict[str, str] = {}
    for item in text.split(";"):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value or key in attributes:
            return None
        attributes[key] = value
    return attributes


def node_tags(nodes: Sequence[str] = NODES) -> list[str]:
    """`<v>` and `</v>` of every node: added to every policy tokenizer as whole tokens."""
    return [tag for node in nodes for tag in (f"<{node}>", f"</{node}>")]


LABEL_POSITIONS = ("last", "first")  # where the label span sits in the chain (`sft.label_position`)
MASK_UNITS = ("token", "node")  # what CoT random masking drops from the SFT loss (`sft.mask_unit`)


def render(values: Mapping[str, str], nodes: Sequence[str] = NODES, label_position: str = "last",
           label_node: str = LABEL_NODE) -> str:
    """Write node values into the tagged template, the label span last (default) or first (A4)."""
    if label_position not in LABEL_POSITIONS:
        raise ValueError(f"label_position must be one of {LABEL_POSITIONS}, got {label_position!r}")
    order = list(nodes)
    if label_position == "first":
        if label_node not in order:
            raise ValueError(f"label node {label_node!r} is not among nodes {order}")
        order.remove(label_node)
        order.insert(0, label_node)
    parts = []
    for node in order:
        if node not in values:
            raise ValueError(f"no value for node {node!r}")
        value = values[node]
        if not value or value != value.strip() or "<" in value or ">" in value:
            raise ValueError(f"node {node!r} value {value!r} must be non-empty, trimmed and free of '<' '>'")
        parts.append(f"<{node}>{value}</{node}>")
    return "".join(parts)


@dataclasses.dataclass(frozen=True)
class ParseResult:
    """Node values read from a response, where they are, and what is wrong with it."""

    values: dict[str, str]
    char_spans: dict[str, tuple[int, int]]  # whole element, tags included
    value_spans: dict[str, tuple[int, int]]  # text between the tags
    errors: tuple[str, ...]

    @property
    def valid(self) -> bool:
        """Every node present exactly once, well formed, with an allowed value, nothing else."""
        return not self.errors

    def missing(self, nodes: Sequence[str] = NODES) -> list[str]:
        return [node for node in nodes if node not in self.values]


def parse(text: str, nodes: Sequence[str] = NODES,
          allowed: Mapping[str, Sequence[str] | None] | None = None) -> ParseResult:
    """Read node values from any text; never raises.

    Only tags of known nodes are markup; anything else is content. The first complete element of a node
    gives its value (whitespace-trimmed); an element broken by a nested or mismatched tag gives none.
    Errors record missing, repeated, nested, unclosed and stray tags, empty or '<'/'>'-bearing values,
    values outside `allowed` (default `DEFAULT_ALLOWED`) and non-space text outside every element.
    """
    allowed = DEFAULT_ALLOWED if allowed is None else allowed
    if not isinstance(text, str):
        return ParseResult({}, {}, {}, (f"response is {type(text).__name__}, not text",))
    known = set(nodes)
    values: dict[str, str] = {}
    char_spans: dict[str, tuple[int, int]] = {}
    value_spans: dict[str, tuple[int, int]] = {}
    errors: list[str] = []
    seen: set[str] = set()
    open_node: str | None = None
    open_start = open_end = 0
    outside_from = 0  # start of the current stretch of text outside every element
    stray_text = False

    def note_outside(end: int) -> None:
        nonlocal stray_text
        if text[outside_from:end].strip():
            stray_text = True

    for match in _TAG_RE.finditer(text):
        is_close, node = match.group(1) == "/", match.group(2)
        if node not in known:
            continue
        if open_node is None:
            note_outside(match.start())
            if is_close:
                errors.append(f"stray </{node}>")
                outside_from = match.end()
                continue
            open_node, open_start, open_end = node, match.start(), match.end()
            continue
        if not is_close:
            errors.append(f"<{node}> nested inside <{open_node}>")
            seen.add(open_node)
            open_node, open_start, open_end = node, match.start(), match.end()
            continue
        if node != open_node:
            errors.append(f"</{node}> closes <{open_node}>")
            seen.add(open_node)
            open_node, outside_from = None, match.end()
            continue
        if node in seen:
            errors.append(f"<{node}> repeated")
        else:
            value = text[open_end:match.start()]
            values[node] = value.strip()
            char_spans[node] = (open_start, match.end())
            value_spans[node] = (open_end, match.start())
        seen.add(node)
        open_node, outside_from = None, match.end()
    if open_node is not None:
        errors.append(f"<{open_node}> unclosed")
        seen.add(open_node)
    else:
        note_outside(len(text))
    if stray_text:
        errors.append("text outside the tags")

    for node in nodes:
        if node not in seen:
            errors.append(f"<{node}> missing")
        if node not in values:
            continue
        value = values[node]
        if not value:
            errors.append(f"<{node}> empty")
        elif "<" in value or ">" in value:
            errors.append(f"<{node}> value {value!r} contains '<' or '>'")
        elif allowed.get(node) is not None and value not in allowed[node]:
            errors.append(f"<{node}> value {value!r} not in {list(allowed[node])}")
    return ParseResult(values, char_spans, value_spans, tuple(errors))


def token_node_ids(char_spans: Mapping[str, tuple[int, int]], offsets: Sequence[Sequence[int]] | np.ndarray,
                   nodes: Sequence[str] = NODES) -> np.ndarray:
    """Index (in `nodes`) of the node whose span holds each token's first character, else -1.

    `offsets` are a fast tokenizer's `(start, end)` character offsets; empty tokens (special tokens,
    `(0, 0)`) belong to no node.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    ids = np.full(len(offsets), -1, dtype=np.int32)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for index, node in enumerate(nodes):
        if node in char_spans:
            span_start, span_end = char_spans[node]
            ids[(starts >= span_start) & (starts < span_end) & (ends > starts)] = index
    return ids


def _clean(text: str) -> str:
    """One line, single spaces: titles from real data carry newlines and runs of spaces."""
    return " ".join(str(text).split())


def prompt_text(query: str, product_title: str) -> str:
    """The relevance prompt: fixed and instruction-free, for a small model trained from scratch."""
    return f"query: {_clean(query)} product: {_clean(product_title)} judge:"


def rewrite_prompt(query: str) -> str:
    """The rewrite-generation prompt; the response is the rewrite."""
    return f"query: {_clean(query)} rewrite:"


def tag_prompt(query: str, rewrite: str) -> str:
    """The query-rewrite relevance-tagging prompt; the response is one of `REWRITE_TAGS`."""
    return f"query: {_clean(query)} rewrite: {_clean(rewrite)} tag:"
