"""A real BM25 search engine over a product catalogue (tantivy), and retrieval metrics.

The rewriting task scores a rewrite by what a search engine retrieves for it (METHOD.md B, `r_conv`),
so the engine must rank like a production keyword engine and must never crash on model output.

* `SearchEngine.build(products, directory)` indexes `id`, `title` and any extra text fields into
  `directory` (tantivy files under `index/`, the id list and settings in `engine.json`);
  `SearchEngine.open(directory)` reopens it. The build is written beside the target and renamed into
  place, so an interrupted build never leaves a half-written index behind.
* Queries use tantivy's query language: terms (OR by default), `AND`/`OR`/`NOT`, parentheses, `+`/`-`,
  quoted phrases and `field:term` for the catalogue's text fields; the ESCI rewrite data writes
  `(a OR b) AND c`. Three repairs keep real queries' structure: `NOT x` becomes `-x` (tantivy
  reads `a AND NOT b` as matching nothing, Lucene as `+a -b`), apostrophes in words (`women's`,
  `girls'`) are escaped, since tantivy would read them as phrase quotes, and `field:` prefixes naming
  fields the catalogue lacks (`brand:`, `price:`) are dropped, keeping their values. A query the parser
  still rejects (unbalanced parentheses or quotes, operators alone, ranges without a field, ...) is
  searched as its plain words; one with no indexable word (empty, punctuation only) matches nothing.
  Of the 5,403 Rec-R1 teacher rewrites (ESCI), 11 fall back, all with price filters or unbalanced
  parentheses. Words are stemmed (`en_stem`: lowercase + English Snowball stemmer) unless the build
  asks for another tokenizer.
* `search_batch` runs the queries one after another on one searcher and answers repeated queries
  (common among a group's rewrites) once. Measured on a 2-core machine, a thread pool was slower than
  this loop: a query takes well under a millisecond, which is less than the hand-off costs.

Scaling past one machine: anything with `search_batch(queries, k) -> [[(product_id, score), ...]]`
is a `Retriever`. An OpenSearch / Elasticsearch backend maps onto this engine as follows: one document
per product with `_id` = product id and each text field mapped as `text` with the `english` analyzer
(or `standard` for tantivy's `default` tokenizer); the index's default similarity is BM25 with
k1 = 1.2 and b = 0.75, the constants tantivy uses; each query is a `query_string` query over the text
fields with `default_operator: OR` (the same AND/OR/NOT/parentheses/quotes grammar), sent in batches
through `_msearch` with `size = k`, and hits come back as (`_id`, `_score`). Rankings agree up to
analyzer details and the lossy doc-length encoding both engines use; scores differ by the constant
factor k1 + 1 = 2.2 that Lucene dropped from BM25 in version 8.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import tantivy

from graphgrpo_jax import fileio

Hit = tuple[str, float]  # (product id, BM25 score)

MANIFEST = "engine.json"
FORMAT = "graphgrpo_jax.search.engine/1"
_ROW_FIELD = "_row"  # fast column mapping a tantivy document back to its product id
_WRITER_HEAP_BYTES = 128_000_000
TOKENIZERS = ("en_stem", "default", "whitespace")  # tantivy's built-in analyzers
_FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# A `name:` prefix, tantivy's field syntax; prefixes naming anything but a text field are dropped.
_FIELD_PREFIX = re.compile(r"([^\s:()\[\]{}\"'+\-!^~*\\]+):")
# Every character with a meaning in tantivy's query grammar; the plain-words fallback blanks them.
_QUERY_SYNTAX = re.compile(r"[+\-^`:{}\"'\[\]()!\\*~<>=?/&|]")
_OPERATORS = frozenset({"AND", "OR", "NOT"})
# `NOT x` as a standalone operator; tantivy reads `a AND NOT b` as `a AND (nothing but not b)`, which
# matches nothing (tantivy issue #1980), while `a AND -b` means what Lucene's `a AND NOT b` means.
_NOT_OPERATOR = re.compile(r"(?<![^\s(])NOT\s+(?=[^\s)])")
_APOSTROPHE_INSIDE_WORD = re.compile(r"(?<=\w)'(?=\w)")  # women's, don't
_APOSTROPHE_AFTER_WORD = re.compile(r"(?<=\w)'")  # girls', but also the end of 'high yield'


@runtime_checkable
class Retriever(Protocol):
    """What reward functions and evaluators need from a search backend."""

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """The top `k` (product id, score) hits of each query, best first."""
        ...


class SearchEngine:
    """A persisted, read-only BM25 index over a product catalogue; implements `Retriever`."""

    def __init__(self, index: tantivy.Index, text_fields: Sequence[str], product_ids: Sequence[str]):
        self._index = index
        self._searcher = index.searcher()
        self.text_fields = tuple(text_fields)
        self._product_ids = list(product_ids)
        if self._searcher.num_docs != len(self._product_ids):
            raise ValueError(
                f"search index holds {self._searcher.num_docs} documents but its manifest lists "
                f"{len(self._product_ids)} product ids"
            )

    def __len__(self) -> int:
        return len(self._product_ids)

    @classmethod
    def build(
        cls,
        products: Iterable[Mapping[str, Any]],
        directory: str | os.PathLike,
        extra_fields: Sequence[str] = (),
        *,
        tokenizer: str = "en_stem",
        overwrite: bool = False,
    ) -> SearchEngine:
        """Indexes products (`id`, `title`, and the `extra_fields`, e.g. brand, color, bullets).

        `id` must be a unique non-empty string and `title` a string; a missing or None extra field
        counts as empty text (ESCI leaves brand and colour blank for many products). `overwrite`
        replaces an index built here before, never any other directory.
        """
        directory = pathlib.Path(directory)
        text_fields = ("title", *extra_fields)
        if len(set(text_fields)) != len(text_fields) or "id" in text_fields:
            raise ValueError(f"extra_fields {list(extra_fields)} repeat 'title' or 'id' or each other")
        for name in text_fields:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"extra field name {name!r}: use letters, digits and '_', letter first")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer {tokenizer!r}: choose one of tantivy's built-in {TOKENIZERS}")
        if directory.exists():
            if not overwrite:
                raise FileExistsError(f"{directory} already exists; pass overwrite=True to rebuild it")
            if not (directory / MANIFEST).is_file():
                raise FileExistsError(f"{directory} exists and is not a search index; not replacing it")

        product_ids, documents = _validated_catalogue(products, text_fields)

        schema = tantivy.SchemaBuilder()
        schema.add_integer_field(_ROW_FIELD, stored=False, indexed=False, fast=True)
        for name in text_fields:
            schema.add_text_field(name, stored=False, tokenizer_name=tokenizer)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.build-", dir=directory.parent))
        try:
            (staging / "index").mkdir()
            index = tantivy.Index(schema.build(), path=str(staging / "index"))
            # One writer thread: one segment and a deterministic order among equal scores.
            writer = index.writer(heap_size=_WRITER_HEAP_BYTES, num_threads=1)
            for row, texts in enumerate(documents):
                writer.add_document(tantivy.Document(**{_ROW_FIELD: row}, **texts))
            writer.commit()
            writer.wait_merging_threads()
            manifest = dict(format=FORMAT, text_fields=text_fields, tokenizer=tokenizer)
            (staging / MANIFEST).write_text(json.dumps(dict(manifest, product_ids=product_ids)))
            fileio.move_into_place(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> SearchEngine:
        """Reopens an index written by `build`."""
        directory = pathlib.Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no search index at {directory}: {MANIFEST} is missing")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        index = tantivy.Index.open(str(directory / "index"))
        return cls(index, manifest["text_fields"], manifest["product_ids"])

    def search(self, query: str, k: int) -> list[Hit]:
        """The top `k` products for `query`, best first; never raises on the query's text."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        hits, _ = self._run(query, k)
        rows = self._searcher.fast_field_values(_ROW_FIELD, [address for _, address in hits])
        return [(self._product_ids[row], score) for (score, _), row in zip(hits, rows)]

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """`search` for each query; a query repeated in the batch is searched once."""
        answers: dict[str, list[Hit]] = {}
        for query in queries:
            if query not in answers:
                answers[query] = self.search(query, k)
        return [list(answers[query]) for query in queries]

    def is_well_formed(self, query: str) -> bool:
        """Whether `query` is searched with its own syntax rather than as plain words.

        The repairs described in the module docstring (`NOT x` as `-x`, escaped word apostrophes,
        unknown `field:` prefixes dropped) still count as well-formed. A rule-based reward can use
        this as its syntax check.
        """
        return self._run(query, 1)[1]

    def _run(self, query: str, k: int) -> tuple[list[tuple[float, tantivy.DocAddress]], bool]:
        """(tantivy hits, whether the query kept its syntax): as written if possible, else plain words."""
        for candidate in self._repaired(query):
            try:  # parsing rejects bad syntax; searching rejects e.g. `title:*` (needs a fast field)
                return self._search_text(candidate, k), True
            except ValueError:
                continue
        words = [word.lower() for word in _QUERY_SYNTAX.sub(" ", query).split() if word not in _OPERATORS]
        try:
            return self._search_text(" ".join(words), k), False
        except ValueError:  # no word survives tokenization (e.g. only punctuation or emoji)
            return [], False

    def _search_text(self, text: str, k: int) -> list[tuple[float, tantivy.DocAddress]]:
        parsed = self._index.parse_query(text, list(self.text_fields))
        return self._searcher.search(parsed, k, count=False).hits

    def _repaired(self, query: str) -> list[str]:
        """The query with unknown `field:` prefixes dropped, `NOT x` as `-x` and word apostrophes
        escaped, in two strengths.

        `'` also quotes phrases in tantivy (`'high yield'`), so an apostrophe closing a word
        (`girls'`) is escaped only if the query fails to parse otherwise.
        """
        if not query.strip():
            return []
        known = set(self.text_fields)
        query = _FIELD_PREFIX.sub(lambda field: field.group(0) if field.group(1) in known else "", query)
        query = _NOT_OPERATOR.sub("-", query)
        inside_words = _APOSTROPHE_INSIDE_WORD.sub(r"\\'", query)
        after_words = _APOSTROPHE_AFTER_WORD.sub(r"\\'", inside_words)
        return [inside_words] if after_words == inside_words else [inside_words, after_words]


def _validated_catalogue(
    products: Iterable[Any], text_fields: Sequence[str]
) -> tuple[list[str], list[dict[str, str]]]:
    """(ids, {field: text} per product), checked in full before anything is written.

    Errors name the row and field: `id` must be a unique non-empty string, `title` a string, and an
    extra field a string or missing/None (read as empty).
    """
    product_ids: list[str] = []
    documents: list[dict[str, str]] = []
    first_row_of: dict[str, int] = {}
    for row, product in enumerate(products):
        if not isinstance(product, Mapping):
            raise ValueError(f"product row {row}: expected a mapping, got {type(product).__name__}")
        where = f"product row {row}, field"
        product_id = product.get("id")
        if not isinstance(product_id, str) or not product_id:
            raise ValueError(f"{where} 'id': expected a non-empty string, got {product_id!r}")
        if product_id in first_row_of:
            raise ValueError(f"{where} 'id': {product_id!r} repeats row {first_row_of[product_id]}")
        if not isinstance(product.get("title"), str):
            raise ValueError(f"{where} 'title': expected a string, got {product.get('title')!r}")
        texts = {}
        for name in text_fields:
            value = product.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where} {name!r}: expected a string, got {value!r}")
            texts[name] = value or ""
        first_row_of[product_id] = row
        product_ids.append(product_id)
        documents.append(texts)
    return product_ids, documents


# ------------------------------------------------------------------------------------------- metrics


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def recall_at_k(retrieved_ids: Sequence[str], relevant_ids: Iterable[str], k: int) -> float | None:
    """Share of the relevant products found in the top k: |top-k ∩ relevant| / |relevant|.

    None when there are no relevant products (the reward does not apply to that query).
    """
    _check_k(k)
    relevant = set(relevant_ids)
    if not relevant:
        return None
    return len(relevant.intersection(retrieved_ids[:k])) / len(relevant)


def ndcg_at_k(retrieved_ids: Sequence[str], gains: Mapping[str, float], k: int) -> float | None:
    """NDCG@k with linear gain: Σ_r gain(d_r) / log2(r + 1) over ranks r = 1..k, over the same sum
    for the k highest gains. Products absent from `gains` gain 0; a repeated product gains only at its
    first rank. None when no product has a positive gain (nothing to rank, the reward does not apply).

    Linear, not exponential (2^g − 1), gain: graded ESCI gains are small integers (E/S/C/I → 3/2/1/0 or
    similar), where linear gain keeps a Substitute worth two thirds of an Exact rather than three
    sevenths.
    """
    _check_k(k)
    for product_id, gain in gains.items():
        if not math.isfinite(gain) or gain < 0:
            raise ValueError(f"gain of product {product_id!r} is {gain!r}; gains must be finite and >= 0")
    ideal = sorted((gain for gain in gains.values() if gain > 0), reverse=True)[:k]
    if not ideal:
        return None
    seen: set[str] = set()
    dcg = 0.0
    for rank, product_id in enumerate(retrieved_ids[:k], start=1):
        if product_id not in seen:
            seen.add(product_id)
            dcg += gains.get(product_id, 0.0) / math.log2(rank + 1)
    ideal_dcg = sum(gain / math.log2(rank + 1) for rank, gain in enumerate(ideal, start=1))
    return dcg / ideal_dcg
