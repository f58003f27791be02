"""Teacher chains of thought for real ESCI rows: the teacher file, its join, and a weak rule teacher.

SFT on real ESCI pairs needs a target for every reasoning node (METHOD.md A1), but ESCI gives only the
label. The node texts come from a *teacher file*, JSON lines, one object per pair::

    {"example_id": "123", "teacher": "rule-silver-v1",
     "nodes": {"qs": "running shoes", "qa": "brand=nike; color=red", "ps": "running shoe",
               "pa": "brand=nike; color=red; gender=men", "ms": "match", "ma": "match", "y": "Exact"}}

`example_id` is `EsciExample.example_id`; `teacher` (optional) names who wrote the row. Every node value
must be one `cot.render` accepts (non-empty, trimmed, free of '<' '>'), a categorical node must hold an
allowed value, `qa`/`pa` must be attribute lists in canonical form (`cot.format_attributes`: "key=value;
key=value" sorted by key, or "none"), and `y` must be what the label rule gives for `(ms, ma)`, so a row
that passes is a target SFT can render as it is. A bad row raises `EsciFormatError` naming file, line
(from 1) and field, or is skipped and counted under its reason with `skip_bad_rows`.

`join_teacher` attaches the nodes to examples. A row whose teacher label differs from the human label
keeps the human label as gold and loses the teacher's nodes (they argue for another label, so training
on them would teach the chain to contradict its own answer): it becomes label-only, like a row the file
does not cover, and `missing` decides whether label-only rows are kept (SFT trains their label alone) or
dropped.

`rule_teacher` is a built-in **weak silver teacher**: deterministic rules over surface text, no model.
Its readings (qs, qa, ps, pa) come from the query and title words (a colour lexicon, size/quantity
patterns, gender words, the title's first token as a brand); its match nodes (ms, ma) are *chosen so that
the label rule gives the human label*, preferring the pair closest to the lexical evidence. So the chain
is well formed and agrees with its label, but its match nodes are not independent judgements: it cannot
be used to measure node accuracy, only to give SFT a well-formed chain to imitate. Where the label forces
a match node against the evidence (an Exact pair whose title lacks the query's colour), the readings stay
as read and the chain is locally inconsistent; `annotate_rule` marks those rows (`against_evidence`).

CLI: `python -m graphgrpo_jax.data.teacher --input=ESCI.jsonl --out=teacher.jsonl` annotates a flat ESCI
JSONL (`esci.read_flat_jsonl`) with the rule teacher and prints counts.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from graphgrpo_jax.data import cot
from graphgrpo_jax.data.esci import EsciExample, EsciFormatError, read_flat_jsonl

ATTRIBUTE_NODES: tuple[str, ...] = ("qa", "pa")  # nodes holding a `cot.format_attributes` list
MISSING_MODES: tuple[str, ...] = ("label_only", "drop")
RULE_TEACHER_NAME = "rule-silver-v1"


# --------------------------------------------------------------------------------------------------
# The teacher file
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TeacherFile:
    nodes_by_id: dict[str, dict[str, str]]  # example_id -> node -> value
    skipped: dict[str, int]  # reason -> rows skipped


class Problem(NamedTuple):
    """What is wrong with a row: `reason` is stable (the skip-count key), `detail` says which value."""

    field: str | None
    reason: str
    detail: str = ""


def check_nodes(values: Any, *, nodes: Sequence[str] = cot.NODES,
                allowed: Mapping[str, Sequence[str] | None] = cot.DEFAULT_ALLOWED,
                rule: Sequence[Sequence[str]] = cot.DEFAULT_LABEL_RULE) -> Problem | None:
    """The first problem of a `nodes` object, or None when SFT can render it as it is."""
    if not isinstance(values, Mapping):
        return Problem("nodes", "not an object", f": got a JSON {type(values).__name__}")
    for name in sorted(values, key=str):
        if name not in nodes:
            return Problem(f"nodes.{name}", "unknown node", f"; expected {list(nodes)}")
    for node in nodes:
        field = f"nodes.{node}"
        if node not in values:
            return Problem(field, "missing")
        value = values[node]
        if not isinstance(value, str):
            return Problem(field, "not a string", f": got {value!r}")
        # The conditions of `cot.render`, spelled out so each gets its own count.
        if not value:
            return Problem(field, "empty")
        if value != value.strip():
            return Problem(field, "not trimmed", f": {value!r}")
        if "<" in value or ">" in value:
            return Problem(field, "contains '<' or '>'", f": {value!r}")
        choices = allowed.get(node)
        if choices is not None and value not in choices:
            return Problem(field, "not an allowed value", f": {value!r} not in {list(choices)}")
        if node in ATTRIBUTE_NODES:
            attributes = cot.parse_attributes(value)
            if attributes is None:
                return Problem(field, "malformed attribute list",
                               f": {value!r}; expected 'key=value; key=value' or 'none'")
            if cot.format_attributes(attributes) != value:
                return Problem(field, "attribute list not in canonical form",
                               f": {value!r}; expected {cot.format_attributes(attributes)!r}")
    if all(node in nodes for node in ("ms", "ma", cot.LABEL_NODE)):
        ms, ma, label = values["ms"], values["ma"], values[cot.LABEL_NODE]
        ruled = _rule_label(rule, ms, ma)
        if ruled is None:
            return Problem(f"nodes.{cot.LABEL_NODE}", "label rule has no row", f" for (ms={ms}, ma={ma})")
        if ruled != label:
            return Problem(f"nodes.{cot.LABEL_NODE}", "contradicts the label rule",
                           f": (ms={ms}, ma={ma}) gives {ruled}, not {label}")
    return None


def _rule_label(rule: Sequence[Sequence[str]], ms: str, ma: str) -> str | None:
    try:
        return cot.apply_label_rule(rule, ms, ma)
    except ValueError:
        return None


def _check_example_id(example_id: Any) -> Problem | None:
    if example_id is None:
        return Problem("example_id", "missing")
    if not isinstance(example_id, str):
        return Problem("example_id", "not a string", f": got {example_id!r}")
    if not example_id.strip():
        return Problem("example_id", "empty")
    return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook: a repeated key would silently hide one of the values."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _read_row(raw: bytes, first: bool, *, nodes: Sequence[str], allowed: Mapping[str, Sequence[str] | None],
              rule: Sequence[Sequence[str]]) -> tuple[str, dict[str, str]] | Problem:
    """(example_id, nodes) of one line, or its problem."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")  # strict: no replacement characters
    except UnicodeDecodeError as error:
        return Problem(None, "invalid UTF-8", f" at byte {error.start} of the line")
    try:
        row = json.loads(line, object_pairs_hook=_unique_keys)
    except ValueError as error:
        return Problem(None, "invalid JSON", f" (truncated file?): {error}")
    if not isinstance(row, dict):
        return Problem(None, "not a JSON object", f": got a JSON {type(row).__name__}")
    problem = _check_example_id(row.get("example_id"))
    if problem:
        return problem
    if "teacher" in row and not isinstance(row["teacher"], str):
        return Problem("teacher", "not a string", f": got {row['teacher']!r}")
    if row.get("nodes") is None:
        return Problem("nodes", "missing")
    problem = check_nodes(row["nodes"], nodes=nodes, allowed=allowed, rule=rule)
    if problem:
        return problem
    return row["example_id"], {node: row["nodes"][node] for node in nodes}


def read_teacher_file(path: str | pathlib.Path, *, nodes: Sequence[str] = cot.NODES,
                      allowed: Mapping[str, Sequence[str] | None] = cot.DEFAULT_ALLOWED,
                      rule: Sequence[Sequence[str]] = cot.DEFAULT_LABEL_RULE,
                      skip_bad_rows: bool = False) -> TeacherFile:
    """example_id -> node values from a teacher file; see the module docstring for what a row must hold.

    Lines are split at '\\n' only (a raw U+2028 inside a JSON string is legal and must not split a row);
    blank lines are skipped silently. A repeated example_id is a bad row (the first one is kept).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise EsciFormatError(path, None, None, "no such file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise EsciFormatError(path, None, None, f"cannot read file: {error}") from error
    nodes_by_id: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    skipped: collections.Counter[str] = collections.Counter()
    rows = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        rows += 1
        result = _read_row(raw, number == 1, nodes=nodes, allowed=allowed, rule=rule)
        if not isinstance(result, Problem) and result[0] in first_line:
            result = Problem("example_id", "duplicated", f": {result[0]!r} first seen on line {first_line[result[0]]}")
        if isinstance(result, Problem):
            error = EsciFormatError(path, number, result.field, result.reason + result.detail)
            if not skip_bad_rows:
                raise error
            skipped[f"{result.field}: {result.reason}" if result.field else result.reason] += 1
            logging.warning("skipping %s", error)
            continue
        example_id, values = result
        nodes_by_id[example_id] = values
        first_line[example_id] = number
    if rows == 0:
        raise EsciFormatError(path, None, None, "empty teacher file: no rows")
    if not nodes_by_id:  # every row skipped: a join with nothing would look like a file of label-only rows
        raise EsciFormatError(path, None, None, f"no readable rows: all {rows} skipped ({dict(skipped)})")
    if skipped:
        logging.warning("%s: skipped %d bad rows: %s", path, sum(skipped.values()), dict(skipped))
    return TeacherFile(nodes_by_id, dict(sorted(skipped.items())))


def write_teacher_file(path: str | pathlib.Path, nodes_by_id: Mapping[str, Mapping[str, str]], teacher: str, *,
                       nodes: Sequence[str] = cot.NODES,
                       allowed: Mapping[str, Sequence[str] | None] = cot.DEFAULT_ALLOWED,
                       rule: Sequence[Sequence[str]] = cot.DEFAULT_LABEL_RULE) -> None:
    """Writes a teacher file atomically (a reader never sees half a file), rows sorted by example_id.

    Every row is checked as `read_teacher_file` would check it, so what is written can be read back.
    """
    if not isinstance(teacher, str) or not teacher or teacher != teacher.strip():
        raise ValueError(f"teacher must be a non-empty trimmed name, got {teacher!r}")
    if not nodes_by_id:
        raise ValueError("no rows to write: an empty teacher file is unreadable by design")
    for example_id, values in nodes_by_id.items():
        problem = _check_example_id(example_id) or check_nodes(values, nodes=nodes, allowed=allowed, rule=rule)
        if problem:
            raise ValueError(f"example {example_id!r}, field {problem.field!r}: {problem.reason}{problem.detail}")
    lines = [json.dumps({"example_id": example_id, "teacher": teacher,
                         "nodes": {node: nodes_by_id[example_id][node] for node in nodes}}, ensure_ascii=False)
             for example_id in sorted(nodes_by_id)]
    _write_atomically(pathlib.Path(path), "".join(line + "\n" for line in lines))


def _write_atomically(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private (0600); a teacher file is shared data
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Joining a teacher file with examples
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TeacherExample:
    example: EsciExample
    nodes: dict[str, str] | None  # None: label-only (SFT supervises the human label alone)

    @property
    def label_only(self) -> bool:
        return self.nodes is None


@dataclasses.dataclass(frozen=True)
class JoinResult:
    rows: tuple[TeacherExample, ...]
    # joined, without_teacher, label_disagrees (each example is in exactly one of these three),
    # kept, dropped (label-only rows removed by missing="drop"), teacher_ids_unused.
    counts: dict[str, int]


def join_teacher(examples: Iterable[EsciExample], teacher: TeacherFile, *, missing: str = "label_only") -> JoinResult:
    """Each example with its teacher nodes; rows without usable nodes are label-only or dropped.

    The human label stays the gold label. A teacher whose `y` disagrees with it loses its nodes and the
    row is counted under `label_disagrees` and treated like a row without a teacher.
    """
    if missing not in MISSING_MODES:
        raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
    counts = collections.Counter({"joined": 0, "without_teacher": 0, "label_disagrees": 0, "dropped": 0})
    rows: list[TeacherExample] = []
    seen: set[str] = set()
    for example in examples:
        seen.add(example.example_id)
        values = teacher.nodes_by_id.get(example.example_id)
        if values is None:
            counts["without_teacher"] += 1
        elif values.get(cot.LABEL_NODE, example.label) != example.label:
            counts["label_disagrees"] += 1
            values = None
        else:
            counts["joined"] += 1
        if values is None and missing == "drop":
            counts["dropped"] += 1
            continue
        rows.append(TeacherExample(example, None if values is None else dict(values)))
    counts["kept"] = len(rows)
    counts["teacher_ids_unused"] = len(set(teacher.nodes_by_id) - seen)
    return JoinResult(tuple(rows), dict(counts))


# --------------------------------------------------------------------------------------------------
# The rule teacher: lexicons
# --------------------------------------------------------------------------------------------------

_COLORS = frozenset("""
black white red blue green yellow orange purple pink brown gray grey silver gold beige ivory tan navy
teal turquoise maroon burgundy khaki olive charcoal violet lavender magenta cyan aqua coral
multicolor multicolored multicolour multicoloured multi-color multi-colored
""".split())
_COLOR_ALIASES = {"grey": "gray", "multicolored": "multicolor", "multicolour": "multicolor",
                  "multicoloured": "multicolor", "multi-color": "multicolor", "multi-colored": "multicolor"}
_COLOR_MODIFIERS = frozenset("dark light bright pale deep hot royal sky navy".split())

# "male"/"female" are left out: in titles they are mostly connector genders ("6AN Male Flare").
_GENDERS = {
    **dict.fromkeys("men mens men's man man's".split(), "men"),
    **dict.fromkeys("women womens women's woman woman's ladies lady ladies'".split(), "women"),
    **dict.fromkeys("boy boys boy's".split(), "boys"),
    **dict.fromkeys("girl girls girl's".split(), "girls"),
    **dict.fromkeys("kid kids kid's kids' children children's childrens child youth".split(), "kids"),
    **dict.fromkeys("toddler toddlers".split(), "toddler"),
    **dict.fromkeys("baby babies infant infants newborn".split(), "baby"),
    "unisex": "unisex",
}
_LETTER_SIZES = {"xxs": "xxs", "xs": "xs", "x-small": "xs", "xl": "xl", "xxl": "xxl", "xxxl": "xxxl",
                 "2xl": "xxl", "3xl": "xxxl", "4xl": "4xl", "5xl": "5xl", "x-large": "xl", "xx-large": "xxl",
                 "xxx-large": "xxxl"}
# Bed sizes count only in a text about beds ("queen" alone is too often something else).
_BED_SIZES = {"king": "king", "kingsize": "king", "queen": "queen", "queensize": "queen", "twin": "twin",
              "twinsize": "twin"}
_BED_WORDS = frozenset("bed beds mattress mattresses sheet sheets frame frames comforter duvet quilt pillow "
                       "pillows bedding foundation headboard topper bedspread".split())

_STOPWORDS = frozenset("a an the and or of for with to in on by at from & + x".split())
# The query's head phrase ends before the first of these (not at its first word).
_CUT_WORDS = frozenset("for with without w under over on in to from by near that which not no except but "
                       "like vs versus than compatible".split())
# First title tokens that are ordinary words, not brands.
_NOT_BRANDS = frozenset("""
a an the this that these those my your our his her their its i i'm im you we he she it they me us
some all any every each no not never only just enough more most very so too do don't does make made be
is are was when what who why how if well one two three first best top new old big small large mini
little great good happy funny cute quality premium professional heavy duty ultra super extra max plus
upgraded improved original genuine official authentic classic deluxe luxury natural organic pure real
full half instant rechargeable portable adjustable waterproof wireless electric digital smart magnetic
liquid paper plastic metal wood wooden steel stainless aluminum aluminium silicone cotton leather glass
kraft self personalized custom fashion beauty care car office home kitchen garden business gift price
mounting marking merchandise sturdy refined flashing learning renewed replacement compatible universal
set pack kit lot case box bag bags pair pairs lightweight durable soft hard hot cold warm cool people
someone everyone everything nothing life world world's where
""".split()) | _COLORS | frozenset(_GENDERS) | frozenset(_LETTER_SIZES) | frozenset(_BED_SIZES)

_NUMBER = r"\d+-\d+/\d+|\d+/\d+|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"  # 4-1/8, 1/2, 1,000, 0.5
_UNITS = {  # unit spelling -> canonical unit
    **dict.fromkeys(["fl oz", "fl. oz", "floz", "fl.oz"], "fl oz"),
    **dict.fromkeys(["oz", "ounce", "ounces"], "oz"),
    **dict.fromkeys(["lb", "lbs", "pound", "pounds"], "lb"),
    **dict.fromkeys(["kg", "kgs"], "kg"), "mg": "mg", "mcg": "mcg",
    **dict.fromkeys(["g", "gr", "gram", "grams"], "g"), "ml": "ml",
    **dict.fromkeys(["l", "liter", "liters", "litre", "litres"], "l"),
    **dict.fromkeys(["gal", "gallon", "gallons"], "gal"), **dict.fromkeys(["qt", "quart", "quarts"], "qt"),
    **dict.fromkeys(["inch", "inches", '"'], "in"), **dict.fromkeys(["ft", "feet", "foot"], "ft"),
    "mm": "mm", "cm": "cm", "m": "m", **dict.fromkeys(["yd", "yard", "yards"], "yd"),
}
_CAPACITY_UNITS = {"gb": "gb", "tb": "tb", "mb": "mb", "mah": "mah"}
_UNIT_PATTERN = "|".join(re.escape(unit) for unit in sorted(_UNITS, key=len, reverse=True))
# (key, pattern, value from the match); applied in order, each match blanked before the next pattern.
_MEASURES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("quantity", re.compile(rf"\b(?:pack|set|box|case|bag|lot) of ({_NUMBER})\b"), "{0} pack"),
    ("quantity", re.compile(rf"(?<![\w.])({_NUMBER})\s*-?\s*(?:packs?|pks?|pck)\b"), "{0} pack"),
    ("quantity", re.compile(rf"(?<![\w.])({_NUMBER})\s*-?\s*(?:counts?|ct|pcs|pc|pieces?|pairs?)\b"), "{0} count"),
    ("capacity", re.compile(rf"(?<![\w.])({_NUMBER})\s*-?\s*(gb|tb|mb|mah)\b"), "{0} {1}"),
    ("size", re.compile(rf"(?<![\w.])({_NUMBER})\s*-?\s*({_UNIT_PATTERN})(?![\w])"), "{0} {1}"),
    ("size", re.compile(rf"\bsize\s*:?\s*({_NUMBER}|xxs|xs|s|m|l|xl|xxl|xxxl|[2-5]xl|small|medium|large)\b"),
     "{0}"),
)
_SEGMENT_SPLIT = re.compile(r"[,;|()\[\]{}]|\s[-–—]+\s|\s/\s")
_TOKEN = re.compile(r"[^\s,;:|()\[\]{}<>\"!?*=]+")
_EDGE_PUNCTUATION = "'.-/~`^_"
_MAX_SUBJECT_WORDS = 6
_MAX_PRODUCT_SUBJECT_WORDS = 5
_MAX_VALUE_CHARS = 60
_MAX_CATALOGUE_COLOR_WORDS = 3


# --------------------------------------------------------------------------------------------------
# The rule teacher: reading a text
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Reading:
    """A text cut into segments of plain words, and the attribute values taken out of it."""

    segments: tuple[tuple[str, ...], ...]
    attributes: dict[str, tuple[str, ...]]  # key -> values, in text order, without repeats
    words: frozenset[str]  # every word of the text, attribute words included


def _normalise(text: str) -> str:
    """Lower case, compatibility forms folded, one spelling for quotes and t-shirts."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = text.replace("’", "'").replace("‘", "'").replace("″", '"').replace("”", '"').replace("“", '"')
    text = re.sub(r"\bt[\s-]?shirts?\b|\btee shirts?\b", "t-shirt", text)
    return re.sub(r"(?<!\d)/|/(?!\d)", " / ", text)


def _tokens(text: str) -> list[str]:
    words = (token.strip(_EDGE_PUNCTUATION) for token in _TOKEN.findall(text))
    return [word for word in words if any(char.isalnum() for char in word)]


def _clean_number(number: str) -> str:
    number = number.replace(",", "")
    return "0" + number if number.startswith(".") else number


def _read(text: str) -> _Reading:
    """Segments of words with colours, sizes, quantities and gender words taken out as attributes."""
    normal = _normalise(text)
    found: list[tuple[int, str, str]] = []  # (position, key, value)
    for key, pattern, template in _MEASURES:
        def take(match: re.Match[str], key: str = key, template: str = template) -> str:
            groups = [_clean_number(match.group(1))] + [_UNITS.get(g, _CAPACITY_UNITS.get(g, g))
                                                        for g in match.groups()[1:]]
            if key == "size" and template == "{0}":
                groups = [_LETTER_SIZES.get(groups[0], groups[0])]
            found.append((match.start(), key, template.format(*groups)))
            return " " * (match.end() - match.start())
        normal = pattern.sub(take, normal)
    all_words = _tokens(_normalise(text))
    about_beds = any(word in _BED_WORDS for word in all_words)
    segments: list[tuple[str, ...]] = []
    offset = 0
    for part in _SEGMENT_SPLIT.split(normal):
        start = normal.index(part, offset) if part else offset
        offset = start + len(part)
        words = _tokens(part)
        kept: list[str] = []
        index = 0
        while index < len(words):
            word, following = words[index], words[index + 1] if index + 1 < len(words) else ""
            position = start + index  # only the order matters
            if word in _COLOR_MODIFIERS and following in _COLORS:
                found.append((position, "color", f"{word} {_COLOR_ALIASES.get(following, following)}"))
                index += 2
                continue
            if word in _COLORS:
                found.append((position, "color", _COLOR_ALIASES.get(word, word)))
            elif word in _GENDERS:
                found.append((position, "gender", _GENDERS[word]))
            elif word in _LETTER_SIZES:
                found.append((position, "size", _LETTER_SIZES[word]))
            elif about_beds and word in _BED_SIZES:
                found.append((position, "size", _BED_SIZES[word]))
                if following == "size":
                    index += 1
            else:
                kept.append(word)
            index += 1
        if kept:
            segments.append(tuple(kept))
    attributes: dict[str, list[str]] = {}
    for _, key, value in sorted(found, key=lambda item: item[0]):
        value = _value(value)
        if value and value not in attributes.setdefault(key, []):
            attributes[key].append(value)
    return _Reading(tuple(segments), {key: tuple(values) for key, values in attributes.items() if values},
                    frozenset(all_words))


def _value(text: str) -> str:
    """A node or attribute value: one short line, lower case, nothing `render` or an attribute list
    refuses (a pathological title must not become a 5,000-character target)."""
    return " ".join(re.sub(r"[<>;=]", " ", text).split()).lower()[:_MAX_VALUE_CHARS].strip()


def _stem(word: str) -> str:
    """A crude singular, so "shoes" meets "shoe" and "t-shirt" meets "tshirt"."""
    word = word.replace("-", "").replace("'", "")
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _content_stems(words: Iterable[str]) -> set[str]:
    return {_stem(word) for word in words if word not in _STOPWORDS}


def _looks_like_model(word: str) -> bool:
    """Model numbers ("fv-0511vq1", "tp03", "2252109"); ordinals ("3rd") are words."""
    digits = sum(char.isdigit() for char in word)
    if not digits or re.fullmatch(r"\d+(?:st|nd|rd|th)", word):
        return False
    return any(char.isalpha() for char in word) or digits >= 4


def _title_brand(title: str, brand: str, query_words: frozenset[str]) -> tuple[str, ...]:
    """The product's brand as words: the catalogue's `brand`, else the title's first token when it is not
    an ordinary word or a number, and the title does not go on in the query's words ("iPhone 12 case" for
    "iphone 12" is a product name, not a brand)."""
    if _value(brand):
        return tuple(_tokens(_normalise(brand)))
    opening = _tokens(_normalise(title))[:2]
    first_token = _normalise(title).split(maxsplit=1)[:1]
    first = _tokens(first_token[0]) if first_token else []
    if len(first) != 1 or not opening or opening[0] != first[0]:
        return ()
    word = first[0]
    if not word[0].isalpha() or len(word) < 2 or word in _NOT_BRANDS:
        return ()
    if word in query_words and len(opening) == 2 and opening[1] in query_words:
        return ()
    return (word,)


def _find(words: Sequence[str], phrase: Sequence[str]) -> int:
    """Index of `phrase` as a run of `words`, else -1."""
    for start in range(len(words) - len(phrase) + 1):
        if tuple(words[start:start + len(phrase)]) == tuple(phrase):
            return start
    return -1


def _without(words: Sequence[str], phrase: Sequence[str]) -> list[str]:
    start = _find(words, phrase) if phrase else -1
    return list(words) if start < 0 else list(words[:start]) + list(words[start + len(phrase):])


def _trim_stopwords(words: Sequence[str]) -> list[str]:
    words = list(words)
    while words and words[0] in _STOPWORDS:
        words.pop(0)
    while words and words[-1] in _STOPWORDS:
        words.pop()
    return words


def _head_phrase(words: Sequence[str]) -> list[str]:
    """Words before the first cut word that is not the first word ("hair dye for dark hair" -> "hair dye")."""
    words = _trim_stopwords(words)
    for index, word in enumerate(words):
        if index and word in _CUT_WORDS:
            words = words[:index]
            break
    return _trim_stopwords(words)


def _first_word(text: str, default: str) -> str:
    """The fallback reading when cleaning left nothing: the text's first word, the text, or `default`."""
    words = _tokens(_normalise(text))
    return (_value(words[0]) if words else "") or _value(text) or default


def _query_subject(reading: _Reading, brand: tuple[str, ...]) -> tuple[list[str], bool]:
    """(subject words, whether the brand was taken out of them): the brand leaves the subject only when a
    word with letters stays ("nike running shoes" -> "running shoes", but "iphone 12" stays whole)."""
    words = [word for segment in reading.segments for word in segment]
    if brand and _find(words, brand) >= 0:
        rest = _head_phrase(_without(words, brand))
        if any(char.isalpha() for word in rest for char in word):
            return rest[-_MAX_SUBJECT_WORDS:], True
    return _head_phrase(words)[-_MAX_SUBJECT_WORDS:], False


def _product_subject(reading: _Reading, drop: tuple[str, ...], query_words: frozenset[str],
                     query_stems: set[str]) -> tuple[list[str], str | None]:
    """(subject words, fallback used or None): the title run that best overlaps the query subject, else
    the last words of the title's first phrase."""
    segments = []
    for segment in reading.segments:
        words = _without(segment, drop) if drop else list(segment)
        words = [word for word in words if word in query_words or not _looks_like_model(word)]
        if words:
            segments.append(words)
    hits = [[index for index, word in enumerate(words) if word not in _STOPWORDS and _stem(word) in query_stems]
            for words in segments]
    best = max(range(len(segments)), key=lambda i: (len(hits[i]), -i), default=None)
    if best is not None and hits[best]:
        words, positions = segments[best], hits[best]
        start, end = positions[0], positions[-1]
        if end - start + 1 > _MAX_PRODUCT_SUBJECT_WORDS:  # the densest window of the allowed width
            start = max(positions, key=lambda p: (sum(p <= q < p + _MAX_PRODUCT_SUBJECT_WORDS for q in positions), -p))
            end = max(q for q in positions if q < start + _MAX_PRODUCT_SUBJECT_WORDS)
        # Noun phrases end in their head: take up to two plain words after the last hit.
        for _ in range(2):
            if (end + 1 < len(words) and end - start + 1 < _MAX_PRODUCT_SUBJECT_WORDS
                    and words[end + 1] not in _CUT_WORDS and words[end + 1] not in _STOPWORDS):
                end += 1
        return _trim_stopwords(words[start:end + 1]), None
    for words in segments:
        head = _head_phrase(words)
        if head:
            return _trim_stopwords(head[-3:]), "ps_without_overlap"
    return [], "ps_empty"


def _satisfied(key: str, value: str, product: dict[str, tuple[str, ...]], title_words: frozenset[str]) -> bool:
    """Whether the product shows a query attribute: same value under the key, or its words in the title."""
    if value in product.get(key, ()):
        return True
    return key in ("brand", "color") and all(word in title_words for word in _tokens(value))


def _attribute_list(attributes: Mapping[str, Sequence[str]],
                    first: Mapping[str, Sequence[str]] | None = None) -> str:
    """`format_attributes` of up to two values per key, those in `first` (the query's) put first."""
    shown = {}
    for key, values in attributes.items():
        preferred = [value for value in values if value in (first or {}).get(key, ())]
        ordered = preferred + [value for value in values if value not in preferred]
        shown[key] = ", ".join(ordered[:2])
    return cot.format_attributes({key: value for key, value in shown.items() if value})


_LEVELS = {"match": 0, "partial": 1, "mismatch": 2}  # ms `complement` sits beside this scale, one step off


def _distance(ms: str, ma: str, evidence: tuple[str, str]) -> float:
    """How far a (ms, ma) pair is from the lexical evidence; a forced ma costs a little more than a
    forced ms, so a Substitute with every attribute present reads as a substitute type (partial, match)."""
    ms_cost = abs(_LEVELS[ms] - _LEVELS[evidence[0]]) if ms in _LEVELS else 1.0
    return ms_cost + 1.1 * abs(_LEVELS[ma] - _LEVELS[evidence[1]])


@dataclasses.dataclass(frozen=True)
class RuleAnnotation:
    nodes: dict[str, str]
    evidence: tuple[str, str]  # (ms, ma) as the words alone suggest
    fallbacks: tuple[str, ...]  # which readings needed a fallback ("ps_without_overlap", "qs_empty", ...)

    @property
    def against_evidence(self) -> bool:
        """The label forced a match node the words do not support."""
        return (self.nodes["ms"], self.nodes["ma"]) != self.evidence


def annotate_rule(query: str, product_title: str, label: str, *, brand: str = "", color: str = "",
                  rule: Sequence[Sequence[str]] = cot.DEFAULT_LABEL_RULE) -> RuleAnnotation:
    """The rule teacher's chain for one pair, with the evidence and fallbacks behind it."""
    candidates = [(ms, ma) for ms in cot.MS_VALUES for ma in cot.MA_VALUES
                  if _rule_label(rule, ms, ma) == label]
    if not candidates:
        raise ValueError(f"no (ms, ma) pair gives label {label!r} under the label rule")
    fallbacks: list[str] = []
    query_reading, title_reading = _read(query), _read(product_title)
    brand_words = _title_brand(product_title, brand, query_reading.words)
    subject, took_brand = _query_subject(query_reading, brand_words)
    query_attributes = dict(query_reading.attributes)
    if took_brand:
        query_attributes["brand"] = (_value(" ".join(brand_words)),)
    if not subject:
        fallbacks.append("qs_empty")
    qs = _value(" ".join(subject)) or _first_word(query, "query")

    product_attributes = dict(title_reading.attributes)
    if brand_words:
        product_attributes["brand"] = (_value(" ".join(brand_words)),)
    # The catalogue's colour when it reads as one ("matte black"; not "dvd", "0" or "standard 3gb+32gb
    # (s-din 8inch)", all real values), else the title's.
    catalogue_color = _value(color)
    if (len(catalogue_color.split()) <= _MAX_CATALOGUE_COLOR_WORDS
            and any(word in _COLORS for word in _tokens(catalogue_color))):
        product_attributes["color"] = (_COLOR_ALIASES.get(catalogue_color, catalogue_color),)
    query_stems = _content_stems(qs.split())
    # The brand stays in the product subject when the query uses it as its subject ("iphone 12").
    brand_in_subject = bool(brand_words) and not took_brand and _find(qs.split(), brand_words) >= 0
    drop = () if brand_in_subject else brand_words
    product_words, fallback = _product_subject(title_reading, drop, frozenset(qs.split()), query_stems)
    if fallback:
        fallbacks.append(fallback)
    ps = _value(" ".join(product_words)) or _first_word(product_title, "product")

    title_words = title_reading.words | frozenset(_tokens(_normalise(brand + " " + color)))
    overlap = len(query_stems & _content_stems(title_words)) / max(len(query_stems), 1)
    ms_evidence = "match" if overlap >= 0.5 else "partial" if overlap > 0 else "mismatch"
    wanted = [(key, value) for key, values in query_attributes.items() for value in values]
    met = sum(_satisfied(key, value, product_attributes, title_words) for key, value in wanted)
    ma_evidence = "match" if met == len(wanted) else "mismatch" if met == 0 else "partial"
    evidence = (ms_evidence, ma_evidence)
    ms, ma = min(candidates, key=lambda pair: _distance(*pair, evidence))
    nodes = {"qs": qs, "qa": _attribute_list(query_attributes), "ps": ps,
             "pa": _attribute_list(product_attributes, first=query_attributes), "ms": ms, "ma": ma, "y": label}
    problem = check_nodes(nodes, rule=rule)
    if problem:  # a bug here, never the data's fault
        raise AssertionError(f"rule teacher wrote a bad chain for {query!r} / {product_title!r}: {problem}")
    return RuleAnnotation(nodes, evidence, tuple(fallbacks))


def rule_teacher(query: str, product_title: str, label: str, *, brand: str = "", color: str = "",
                 rule: Sequence[Sequence[str]] = cot.DEFAULT_LABEL_RULE) -> dict[str, str]:
    """The weak silver teacher's node values for one pair (see the module docstring for what they mean)."""
    return annotate_rule(query, product_title, label, brand=brand, color=color, rule=rule).nodes


def annotate_examples(examples: Iterable[EsciExample]) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """(example_id -> nodes, summary counts) of the rule teacher over examples; a repeated id keeps its
    first row."""
    nodes_by_id: dict[str, dict[str, str]] = {}
    labels: collections.Counter[str] = collections.Counter()
    pairs: collections.Counter[str] = collections.Counter()
    fallbacks: collections.Counter[str] = collections.Counter()
    against = repeated = with_fallback = 0
    for example in examples:
        if example.example_id in nodes_by_id:
            repeated += 1
            continue
        annotation = annotate_rule(example.query, example.product_title, example.label,
                                   brand=example.product_brand, color=example.product_color)
        nodes_by_id[example.example_id] = annotation.nodes
        labels[example.label] += 1
        pairs[f"{annotation.nodes['ms']},{annotation.nodes['ma']}"] += 1
        fallbacks.update(annotation.fallbacks)
        with_fallback += bool(annotation.fallbacks)
        against += annotation.against_evidence
    summary = {"rows": len(nodes_by_id), "repeated_example_ids": repeated, "labels": dict(sorted(labels.items())),
               "ms_ma": dict(sorted(pairs.items())), "fallbacks": dict(sorted(fallbacks.items())),
               "rows_with_a_fallback": with_fallback, "against_evidence": against}
    return nodes_by_id, summary


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Annotates a flat ESCI JSONL with the rule teacher, writes the teacher file, prints counts."""
    parser = argparse.ArgumentParser(prog="python -m graphgrpo_jax.data.teacher", description=main.__doc__)
    parser.add_argument("--input", required=True, help="ESCI pairs as flat JSON lines (esci.read_flat_jsonl)")
    parser.add_argument("--out", required=True, help="teacher file to write")
    parser.add_argument("--teacher", default=RULE_TEACHER_NAME, help="name written into every row")
    parser.add_argument("--skip_bad_rows", action="store_true", help="skip and count bad input rows")
    args = parser.parse_args(argv)
    data = read_flat_jsonl(args.input, skip_bad_rows=args.skip_bad_rows)
    nodes_by_id, summary = annotate_examples(data.examples)
    write_teacher_file(args.out, nodes_by_id, args.teacher)
    print(json.dumps({"input": str(args.input), "out": str(args.out), "skipped_input_rows": data.skipped,
                      **summary}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
