"""Real query-rewriting data: ESCI queries with their Exact products and teacher rewrites, and the product pool
that rewrites are searched in.

**Query files** (the Rec-R1 layout, `../shared/data/esci-query-rewrite-recr1/{train,val,test}.jsonl`): one JSON
object per line with `query` (a non-empty string), `target_asins` (a list of product-id strings: the query's
Exact products; repeats are dropped, file order kept), optionally `data_source` (string) and `sft_text` (string
or null: a teacher's whole ChatML transcript, see below). Other fields are ignored; blank lines are not rows; whitespace in
the query and ids is folded as in `esci`. A
bad row raises `EsciFormatError` naming file, line and field, or is skipped and counted under its reason with
`skip_bad_rows`; nothing is coerced; bytes that are not UTF-8 are a bad row; an empty file is an error.

**Teacher transcripts.** `sft_text` holds the system and user turns (the query in triple backticks) and the
assistant's `<think>…</think>` reasoning and `<answer>{"query": "<Boolean rewrite>"}</answer>`. The prompt's
query must be the row's query (after whitespace folding): a transcript of another query is a bad row. A
transcript whose assistant turn has no parseable answer (Rec-R1: 1 of 4,510 train rows has no `<answer>`, 4
answers are not JSON) keeps its row with `teacher=None`, counted in `RewriteData.teacherless` by reason: the row
still serves RL, which needs no teacher.

**Two rewrite formats**, both read by the tantivy engine (`search/engine.py`) as they are: `boolean`, the
teacher's own query, in which `AND`/`OR`/parentheses are the engine's operators (`(a OR b) AND c` retrieves
products that match c and a or b, BM25-ranked over the matching terms); `plain`, the Boolean query's content
words in order without repeats (`a b c`), which the engine reads as a disjunction ranked by BM25 (tantivy's
default operator is OR).

**Splits** (`read_splits`): the test file's queries are the test split; the train file must not contain any of
them (an error naming the line: training on a test query leaks); rows of the val file whose query is a test
query are dropped and counted (Rec-R1's val file holds all 798 test queries with their teacher rewrites, so a
val row of a test query must never reach training).

**The product pool** (`read_pool`): every product with a title in the given ESCI pair files (flat JSON lines,
`esci.read_flat_jsonl`), keyed by product id, with title, brand, colour and bullets where the file has them,
and the human judgements of each (query, product) pair. A product id read with two titles (the graded ESCI
subset has 19: one ASIN's US and Spanish listings, e.g. "Amazon Basics Silicone, Non-Stick, Food Safe Baking
Mat" and "Amazon Basics - Tapete de silicona para hornear") keeps the first title read and is listed in
`ProductPool.title_conflicts`; its judgements are kept as they are. A query's *pool targets* are
its Exact products in the pool: the Exact judgements of the pool files, and the `target_asins` of query files
(all Exact by construction) that the pool holds.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from graphgrpo_jax.data import esci

REWRITE_FORMATS: tuple[str, ...] = ("boolean", "plain")
POOL_FIELDS: tuple[str, ...] = ("brand", "color", "bullets")  # indexed beside the title
GRADE_OF_LABEL: dict[str, int] = {label: grade for grade, label in esci.RELEVANCE_GRADES.items()}

# Words keep inner apostrophes and hyphens (women's, usb-c); `field:` prefixes and the boolean operators of
# the engine's query language are syntax, not words.
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_FIELD_PREFIX = re.compile(r"\b[A-Za-z_]\w*:")
OPERATORS = frozenset({"AND", "OR", "NOT"})

_ASSISTANT_TURN = "<|im_start|>assistant\n"
_PROMPT_QUERY = re.compile(r"```(.*?)```", re.S)
_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def rewrite_words(rewrite: str) -> list[str]:
    """The lowercased content words of a rewrite: boolean operators and `field:` prefixes dropped."""
    words = _WORD.findall(_FIELD_PREFIX.sub(" ", rewrite))
    return [word.lower() for word in words if word not in OPERATORS]


# A phrase in double quotes, or in single quotes that are not apostrophes (tantivy reads both as phrases).
_PHRASE = re.compile(r'"([^"]*)"|(?<!\w)\'([^\']*)\'(?!\w)')


def rewrite_terms(rewrite: str) -> list[str]:
    """The search terms of a rewrite, lowercased: a quoted phrase is one term (its words joined by spaces), every
    other content word is one. `"HD TV" OR 'LED TV'` has two terms, `red shoes red shoes` four, `men's` one."""
    terms, start = [], 0
    for phrase in _PHRASE.finditer(rewrite):
        terms += rewrite_words(rewrite[start:phrase.start()])
        words = rewrite_words(phrase.group(1) if phrase.group(1) is not None else phrase.group(2))
        terms += [" ".join(words)] if words else []
        start = phrase.end()
    return terms + rewrite_words(rewrite[start:])


def plain_rewrite(boolean_query: str) -> str:
    """The `plain` format of a Boolean rewrite: its content words in order, each once."""
    return " ".join(dict.fromkeys(rewrite_words(boolean_query)))


def answer_query(text: str) -> str | None:
    """The rewrite inside a response's last `<answer>{"query": "..."}</answer>`; None when there is none, the
    answer is not a JSON object, or its `query` is not a non-empty string. Never raises on model output."""
    answers = _ANSWER.findall(text)
    if not answers:
        return None
    try:
        value = json.loads(answers[-1])
    except ValueError:
        return None
    query = value.get("query") if isinstance(value, dict) else None
    return query.strip() if isinstance(query, str) and query.strip() else None


def answer_text(rewrite: str) -> str:
    """A rewrite written as the teacher writes its answer (what `answer_query` reads back)."""
    return "<answer>" + json.dumps({"query": rewrite}, ensure_ascii=False) + "</answer>"


@dataclasses.dataclass(frozen=True)
class TeacherRewrite:
    """A teacher's rewrite of one query: its reasoning and its Boolean query."""

    think: str  # the reasoning inside <think> tags ("" when the transcript has none)
    rewrite: str  # the Boolean query of the answer

    def target(self, rewrite_format: str) -> str:
        """The rewrite in `rewrite_format` ("boolean" or "plain")."""
        check_format(rewrite_format)
        return self.rewrite if rewrite_format == "boolean" else plain_rewrite(self.rewrite)


def check_format(rewrite_format: str) -> None:
    if rewrite_format not in REWRITE_FORMATS:
        raise ValueError(f"rewrite format {rewrite_format!r}: choose one of {REWRITE_FORMATS}")


@dataclasses.dataclass(frozen=True)
class RewriteQuery:
    """One real query as the rewrite stages see it."""

    text: str
    target_ids: tuple[str, ...]  # its Exact products (distinct, file order)
    split: str  # "train" | "val" | "test"
    data_source: str = ""
    teacher: TeacherRewrite | None = None

    @property
    def purchased_product_ids(self) -> tuple[str, ...]:
        """What the conversion reward `r_conv` reads as the query's purchases: its Exact products here (ESCI
        has no purchases; Exact products stand in for them)."""
        return self.target_ids


@dataclasses.dataclass(frozen=True)
class RewriteData:
    """The rows of one query file, with what was skipped and which rows have no usable teacher rewrite."""

    path: str
    queries: tuple[RewriteQuery, ...]
    skipped: dict[str, int]  # reason -> bad rows skipped
    teacherless: dict[str, int]  # reason -> kept rows whose transcript has no usable answer


def _fold(text: str) -> str:
    return " ".join(text.split())


def parse_transcript(text: str) -> tuple[str | None, TeacherRewrite | None, str]:
    """(the user prompt's query, the teacher's rewrite, why there is none) of a ChatML teacher transcript.

    The prompt's query is the last triple-backtick span before the assistant turn (None when there is no
    assistant turn or no such span); the rewrite is None when the assistant turn has no parseable answer.
    """
    prompt, turn, reply = text.partition(_ASSISTANT_TURN)
    if not turn:
        return None, None, "no assistant turn"
    spans = _PROMPT_QUERY.findall(prompt)
    query = _fold(spans[-1]) if spans else None
    if not _ANSWER.search(reply):
        return query, None, "no <answer> block"
    rewrite = answer_query(reply)
    if rewrite is None:
        return query, None, 'answer is not JSON with a non-empty "query" string'
    think = _THINK.search(reply)
    return query, TeacherRewrite(think=think.group(1).strip() if think else "", rewrite=rewrite), ""


class _QueryReader(esci.BadRows):
    """Turns a query file's raw rows into `RewriteQuery`s, raising or counting the bad ones."""

    def __init__(self, path: pathlib.Path, split: str, skip_bad_rows: bool):
        super().__init__(path, skip_bad_rows)
        self.split = split
        self.teacherless: collections.Counter[str] = collections.Counter()
        self.queries: list[RewriteQuery] = []

    def add(self, row: int, record: Mapping[str, Any]) -> None:
        query = record.get("query")
        if not isinstance(query, str) or not query.strip():
            return self.bad(row, "query", "missing" if query is None or isinstance(query, str)
                            else f"expected a string, got a {type(query).__name__}")
        query = _fold(query)
        targets = record.get("target_asins")
        if not isinstance(targets, list):
            return self.bad(row, "target_asins", "missing" if targets is None
                            else f"expected a list of product ids, got a {type(targets).__name__}")
        if not all(isinstance(target, str) and target.strip() for target in targets):
            wrong = next(t for t in targets if not (isinstance(t, str) and t.strip()))
            return self.bad(row, "target_asins", f"expected non-empty product-id strings, got {wrong!r}")
        source = record.get("data_source", "")
        if not isinstance(source, str):
            return self.bad(row, "data_source", f"expected a string, got a {type(source).__name__}")
        text = record.get("sft_text")
        teacher = None
        if text is not None:
            if not isinstance(text, str):
                return self.bad(row, "sft_text", f"expected a string or null, got a {type(text).__name__}")
            prompt_query, teacher, why = parse_transcript(text)
            if prompt_query is not None and prompt_query != query:
                return self.bad(row, "sft_text", f"the transcript's query {_short(prompt_query)!r} is not the "
                                                 f"row's query {_short(query)!r}")
            if teacher is None:
                self.teacherless[why] += 1
        self.queries.append(RewriteQuery(text=query, target_ids=tuple(dict.fromkeys(_fold(t) for t in targets)),
                                         split=self.split, data_source=source, teacher=teacher))

    def result(self) -> RewriteData:
        skipped = self.check_read(len(self.queries))
        return RewriteData(str(self.path), tuple(self.queries), skipped, dict(sorted(self.teacherless.items())))


def _short(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters for an error message (the data keeps it whole)."""
    return text if len(text) <= limit else text[:limit] + "…"


def read_queries(path: str | os.PathLike, *, split: str, skip_bad_rows: bool = False) -> RewriteData:
    """The rows of one query file (JSON lines, numbered from 1), each tagged with `split`."""
    path = pathlib.Path(path)
    reader = _QueryReader(path, split, skip_bad_rows)
    for number, record in esci.json_lines(path, reader):
        reader.add(number, record)
    return reader.result()


@dataclasses.dataclass(frozen=True)
class RewriteSplits:
    train: RewriteData
    val: RewriteData  # without the rows of test queries
    test: RewriteData
    val_test_rows: tuple[RewriteQuery, ...]  # the val file's rows of test queries, dropped from val

    @property
    def val_rows_of_test_queries(self) -> int:
        return len(self.val_test_rows)


def read_splits(train_path: str | os.PathLike, val_path: str | os.PathLike, test_path: str | os.PathLike, *,
                skip_bad_rows: bool = False) -> RewriteSplits:
    """The three query files as splits, with no test query in train or val (see the module docstring)."""
    test = read_queries(test_path, split="test", skip_bad_rows=skip_bad_rows)
    test_queries = {q.text for q in test.queries}
    train_path = pathlib.Path(train_path)
    train = read_queries(train_path, split="train", skip_bad_rows=skip_bad_rows)
    for row, query in enumerate(train.queries, start=1):
        if query.text in test_queries:
            raise ValueError(f"{train_path}: query {query.text!r} (row {row} of those read) is also a test query "
                             f"of {test_path}; training on it would leak the test split")
    val = read_queries(val_path, split="val", skip_bad_rows=skip_bad_rows)
    kept = tuple(q for q in val.queries if q.text not in test_queries)
    return RewriteSplits(train=train, val=dataclasses.replace(val, queries=kept), test=test,
                         val_test_rows=tuple(q for q in val.queries if q.text in test_queries))


@dataclasses.dataclass(frozen=True)
class ProductPool:
    """The products rewrites are searched in, and the human judgements of (query, product) pairs."""

    products: tuple[dict[str, str], ...]  # {"id", "title", *POOL_FIELDS}, for `SearchEngine.build`
    judgements: Mapping[str, Mapping[str, int]]  # query -> product id -> grade 0-3 (3 = Exact)
    title_conflicts: tuple[str, ...]  # product ids read with more than one title (the first one read is kept)

    @functools.cached_property
    def ids(self) -> frozenset[str]:
        return frozenset(product["id"] for product in self.products)

    def targets(self, text: str, listed: Sequence[str] = ()) -> tuple[str, ...]:
        """The Exact products of query `text` held in the pool: its judged Exact products, then those of
        `listed` (a query file's `target_ids`) that the pool holds."""
        judged = [pid for pid, grade in self.judgements.get(text, {}).items() if grade == 3]
        return tuple(dict.fromkeys(judged + [pid for pid in listed if pid in self.ids]))


def read_pool(paths: Sequence[str | os.PathLike]) -> ProductPool:
    """Every product with a title in the ESCI pair files `paths` (flat JSON lines), strictly read."""
    products: dict[str, dict[str, str]] = {}
    judgements: dict[str, dict[str, int]] = collections.defaultdict(dict)
    conflicts: dict[str, None] = {}
    for path in paths:
        for example in esci.read_flat_jsonl(path).examples:
            product = {"id": example.product_id, "title": example.product_title, "brand": example.product_brand,
                       "color": example.product_color, "bullets": example.product_bullet_point}
            known = products.setdefault(example.product_id, product)
            if known["title"] != product["title"]:
                conflicts[example.product_id] = None
            judgements[_fold(example.query)][example.product_id] = GRADE_OF_LABEL[example.label]
    return ProductPool(tuple(products.values()), dict(judgements), tuple(conflicts))


POOL_SPLITS: tuple[str, ...] = ("rl", "test")


def pool_split(query: str, *, seed: int, rl_fraction: float) -> str:
    """"rl" for a stable pseudo-random `rl_fraction` of query texts (sha256 of seed and text), else "test": the
    pool queries GRPO trains on and those it is evaluated on."""
    if not 0.0 <= rl_fraction <= 1.0:
        raise ValueError(f"rl_fraction = {rl_fraction}: must be in [0, 1]")
    digest = hashlib.sha256(f"{seed}:{query}".encode("utf-8")).digest()
    return "rl" if int.from_bytes(digest[:8], "big") / 2**64 < rl_fraction else "test"


def pool_queries(pool: ProductPool, files: Iterable[RewriteData]) -> list[RewriteQuery]:
    """The queries with at least one Exact product in the pool, each once, their `target_ids` the pool targets:
    the pool files' own queries (split "pool"), merged with the same queries of `files` (their targets in the
    pool added; the first file's split and teacher kept)."""
    merged: dict[str, RewriteQuery] = {}
    for data in files:
        for query in data.queries:
            targets = pool.targets(query.text, query.target_ids)
            known = merged.get(query.text)
            if targets and known is None:
                merged[query.text] = dataclasses.replace(query, target_ids=targets)
            elif targets:
                merged[query.text] = dataclasses.replace(
                    known, target_ids=tuple(dict.fromkeys(known.target_ids + targets)))
    for text in pool.judgements:
        targets = pool.targets(text)
        if targets and text not in merged:
            merged[text] = RewriteQuery(text=text, target_ids=targets, split="pool")
    return list(merged.values())


def and_clauses(boolean_query: str) -> list[str]:
    """The top-level `AND` clauses of a Boolean query (outside parentheses and quotes), stripped; one clause
    for a query without a top-level `AND`."""
    clauses, depth, quote, start = [], 0, "", 0
    for position, char in enumerate(boolean_query):
        if quote:
            quote = "" if char == quote else quote
        elif char == '"':
            quote = char
        elif char in "()":
            depth += 1 if char == "(" else -1
        elif depth == 0 and boolean_query.startswith(" AND ", position):
            clauses.append(boolean_query[start:position].strip())
            start = position + len(" AND ")
    return [clause for clause in clauses + [boolean_query[start:].strip()] if clause]


def constructed_tags(queries: Sequence[RewriteQuery], rewrite_format: str, *, seed: int) -> list[tuple[str, str, str]]:
    """(query, rewrite, tag) rows for the tagging task of multi-task SFT, built from teacher rewrites (there are
    no human judgements of rewrites): per query with a teacher rewrite,

    * `relevant`: its own teacher rewrite;
    * `partial`: that rewrite without its last top-level `AND` clause (a required constraint dropped: it
      retrieves part of what the query asks for), where it has two clauses or more;
    * `irrelevant`: the teacher rewrite of another query (a seeded derangement of the queries).

    These are labels by construction, not judgements: the judge they train tells a query's own rewrite from
    a weakened one and from another query's.
    """
    check_format(rewrite_format)
    taught = [q for q in queries if q.teacher is not None]
    if len(taught) < 2:
        raise ValueError(f"constructed tags need two queries with teacher rewrites or more, got {len(taught)}")
    order = sorted(range(len(taught)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # a cycle: nobody maps to itself
    rows = []
    for index, query in enumerate(taught):
        rows.append((query.text, query.teacher.target(rewrite_format), "relevant"))
        clauses = and_clauses(query.teacher.rewrite)
        if len(clauses) > 1:
            weakened = TeacherRewrite(think="", rewrite=" AND ".join(clauses[:-1]))
            rows.append((query.text, weakened.target(rewrite_format), "partial"))
        rows.append((query.text, taught[other[index]].teacher.target(rewrite_format), "irrelevant"))
    return rows
