"""Readers for real Amazon ESCI rows (Shopping Queries Dataset, Reddy et al. 2022).

Two layouts:
- *official*: the examples parquet (`example_id, query, query_id, product_id, product_locale, esci_label,
  small_version, large_version, split`) joined on `(product_id, product_locale)` with a products file:
  the official products parquet (`product_id, product_title, product_brand, product_color,
  product_locale, ...`), the same columns as JSON lines, or Vespa feed documents
  (`{"put": ..., "fields": {"id", "title", "brand", "color", "locale"}}`), optionally zstd-compressed.
- *flat*: one JSON object per line with `query_id, query, product_id, product_title` and the label as
  `esci_label` (E/S/C/I or the full name) and/or `relevance` (3/2/1/0, which must agree).

Optional product text is kept as read where a row has it: `product_brand`, `product_color`,
`product_description` (HTML in official ESCI) and `product_bullet_point` (the official column; `product_bullets`
is accepted too); a missing one is "".

Examples are split into train/test by a hash of the query id, so all judgements of a query land in one
split and a query keeps its split when rows are added. Teacher chains of thought produced by any external
LLM can be joined from a JSONL of `{"example_id": ..., "cot": ...}`. Rows without an `example_id` get
`"<query_id>:<product_id>"` (`":<k>"` appended for the k-th repeat of the pair in file order).

A bad row (missing title, unknown label, missing field, a field of the wrong type, unreadable line) raises
`EsciFormatError` naming the file, row (counted from 1; the line number in JSON lines) and field, or is
skipped and counted under its reason when `skip_bad_rows` is set. Nothing is coerced: `query` and
`product_title` must be strings, ids strings or integers, the optional product texts strings or null; other
fields are ignored; blank lines are not rows. An unreadable file, and a file with no readable row (empty, or
every row skipped), always raise.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from graphgrpo_jax.data.cot import LABELS

ESCI_CODES: dict[str, str] = {"E": "Exact", "S": "Substitute", "C": "Complement", "I": "Irrelevant"}
RELEVANCE_GRADES: dict[int, str] = {3: "Exact", 2: "Substitute", 1: "Complement", 0: "Irrelevant"}
SPLITS: tuple[str, ...] = ("train", "test")

_EXAMPLE_COLUMNS = ("example_id", "query", "query_id", "product_id", "esci_label")
_VESPA_FIELDS = {"id": "product_id", "title": "product_title", "brand": "product_brand",
                 "color": "product_color", "locale": "product_locale", "description": "product_description",
                 "bullets": "product_bullet_point"}
_PRODUCT_TEXT_COLUMNS = ("product_title", "product_brand", "product_color", "product_description",
                         "product_bullet_point", "product_bullets")


class EsciFormatError(ValueError):
    """A row or file that cannot be read; the message names file, row and field."""

    def __init__(self, path: str | pathlib.Path, row: int | None, field: str | None, problem: str):
        self.path, self.row, self.field, self.problem = str(path), row, field, problem
        where = str(path) + (f", row {row}" if row is not None else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass(frozen=True)
class EsciExample:
    example_id: str
    query_id: str
    query: str
    product_id: str
    product_title: str
    label: str  # one of cot.LABELS
    split: str  # train | test, by query id
    product_brand: str = ""
    product_color: str = ""
    esci_split: str = ""  # the official `split` column, where the file has one
    teacher_cot: str | None = None
    product_description: str = ""  # as read (official ESCI holds HTML here)
    product_bullet_point: str = ""  # as read; `product_bullets` in a row is read into this field too


@dataclasses.dataclass(frozen=True)
class EsciData:
    examples: tuple[EsciExample, ...]
    skipped: dict[str, int]  # reason -> rows skipped

    def split(self, name: str) -> list[EsciExample]:
        return [example for example in self.examples if example.split == name]


def query_split(query_id: str, test_fraction: float) -> str:
    """`test` for a stable pseudo-random `test_fraction` of query ids (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(str(query_id).encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def normalise_label(value: Any) -> str | None:
    """`"E"`/`"Exact"` -> `"Exact"`; None for anything else."""
    if isinstance(value, str):
        value = value.strip()
        return ESCI_CODES.get(value.upper()) or (value if value in LABELS else None)
    return None


# Product text fields a row may carry (absent or null: empty); other unknown fields are ignored.
OPTIONAL_TEXT_FIELDS = ("product_brand", "product_color", "product_description", "product_bullet_point",
                        "product_bullets")


def _is_text(value: Any, id_field: bool) -> bool:
    """Strings; for id fields also integers (ESCI's ids are numbers in some exports), never bools or lists."""
    return isinstance(value, str) or (id_field and isinstance(value, int) and not isinstance(value, bool))


class BadRows:
    """One file's bad rows, raised or counted: the policy every reader of this package follows (and what
    `json_lines` reports unreadable lines to).

    `bad(row, field, problem)` raises `EsciFormatError` naming file, row and field, or with `skip_bad_rows`
    counts the row under its reason in `skipped` (and logs it); `check_read(num_read, which)` logs the counts
    and refuses a file with no readable row, empty or every row skipped.
    """

    def __init__(self, path: pathlib.Path, skip_bad_rows: bool):
        self.path, self.skip_bad_rows = path, skip_bad_rows
        self.skipped: collections.Counter[str] = collections.Counter()

    def bad(self, row: int, field: str | None, problem: str) -> None:
        error = EsciFormatError(self.path, row, field, problem)
        if not self.skip_bad_rows:
            raise error
        self.skipped[f"{field}: {problem}" if field else problem] += 1
        logging.warning("skipping %s", error)

    def check_read(self, num_read: int, which: str = "") -> dict[str, int]:
        """The skip counts (reason -> rows, sorted); an error when nothing was read. `which` says what rows
        were asked for (" of locale 'us'")."""
        if self.skipped:
            logging.warning("%s: skipped %d bad rows: %s", self.path, sum(self.skipped.values()),
                            dict(self.skipped))
        if not num_read:  # an empty file, or every row bad: never zero rows without a word
            raise EsciFormatError(self.path, None, None, f"no readable rows{which}" + (
                f": all {sum(self.skipped.values())} skipped ({dict(self.skipped)})" if self.skipped else
                " (an empty file?)"))
        return dict(sorted(self.skipped.items()))


class _RowReader(BadRows):
    """Turns raw rows into examples, raising or counting the bad ones."""

    def __init__(self, path: pathlib.Path, test_fraction: float, skip_bad_rows: bool):
        super().__init__(path, skip_bad_rows)
        self.test_fraction = test_fraction
        self.examples: list[EsciExample] = []
        self._pair_counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, row: int, record: Mapping[str, Any], esci_split: str = "") -> None:
        text_fields = {}
        for field in ("query_id", "query", "product_id", "product_title"):
            value = record.get(field)
            if value is not None and not _is_text(value, id_field=field.endswith("_id")):
                self.bad(row, field, f"expected {'a string or an integer' if field.endswith('_id') else 'a string'}"
                                     f", got a {type(value).__name__}")
                return
            text = "" if value is None else " ".join(str(value).split())
            if not text:
                self.bad(row, field, "missing")
                return
            text_fields[field] = text
        for field in (*OPTIONAL_TEXT_FIELDS, "example_id"):
            value = record.get(field)
            if value is not None and not _is_text(value, id_field=field == "example_id"):
                self.bad(row, field, f"expected a string or null, got a {type(value).__name__}")
                return
        label = self._label(row, record)
        if label is None:
            return
        pair = (text_fields["query_id"], text_fields["product_id"])
        example_id = record.get("example_id")
        if example_id is None:
            repeat = self._pair_counts[pair]
            example_id = ":".join(pair) + (f":{repeat}" if repeat else "")
        self._pair_counts[pair] += 1
        self.examples.append(EsciExample(
            example_id=str(example_id), label=label,
            split=query_split(text_fields["query_id"], self.test_fraction),
            product_brand=str(record.get("product_brand") or ""),
            product_color=str(record.get("product_color") or ""),
            product_description=str(record.get("product_description") or ""),
            product_bullet_point=str(record.get("product_bullet_point") or record.get("product_bullets") or ""),
            esci_split=esci_split, **text_fields))

    def _label(self, row: int, record: Mapping[str, Any]) -> str | None:
        """The label from `esci_label` and/or `relevance`; None (after `bad`) when absent or wrong."""
        code, grade = record.get("esci_label"), record.get("relevance")
        label = normalise_label(code) if code is not None else None
        graded = RELEVANCE_GRADES.get(grade) if type(grade) is int else None
        if code is None and grade is None:
            self.bad(row, "esci_label", "missing")
        elif code is not None and label is None:
            self.bad(row, "esci_label", f"unknown label {code!r}; expected one of {sorted(ESCI_CODES)}")
        elif grade is not None and graded is None:
            self.bad(row, "relevance", f"unknown grade {grade!r}; expected 0-3")
        elif label is not None and graded is not None and graded != label:
            self.bad(row, "relevance", f"grade {grade} contradicts esci_label {code!r}")
        else:
            return label or graded
        return None

    def result(self, teacher_cot: Mapping[str, str] | None, which: str = "") -> EsciData:
        """The examples read; `which` says what rows were asked for (" of locale 'us'") when none are found."""
        examples = self.examples
        if teacher_cot:
            examples = [dataclasses.replace(e, teacher_cot=teacher_cot.get(e.example_id)) for e in examples]
        skipped = self.check_read(len(examples), which)
        return EsciData(tuple(examples), skipped)


def json_lines(path: pathlib.Path, reader: BadRows | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number from 1, object) per non-blank line; an unreadable line is a bad row of `reader` (None:
    an error)."""
    _require_file(path)
    suffixes = path.suffixes
    compression = "zstd" if suffixes and suffixes[-1] in (".zst", ".zstd") else None
    try:
        with pa.input_stream(str(path), compression=compression) as stream:
            data = stream.read()
    except (OSError, pa.ArrowException) as error:
        raise EsciFormatError(path, None, None, f"cannot read file: {error}") from error
    # Lines end at b"\n" only (JSON escapes every other line break, but U+2028 may appear raw inside a string),
    # and each is decoded strictly: a byte that is not UTF-8 is a bad row, never a replacement character.
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            if reader is None or not reader.skip_bad_rows:
                raise EsciFormatError(path, number, None, f"not UTF-8 (byte {error.start} of the line: "
                                                          f"{raw[error.start:error.start + 1]!r})") from error
            reader.bad(number, None, "not UTF-8")  # counted under one reason
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            if not isinstance(value, dict):
                raise ValueError(f"a JSON {type(value).__name__}, not an object")
        except ValueError as error:
            problem = f"invalid JSON line (truncated file?): {error}"
            if reader is None:
                raise EsciFormatError(path, number, None, problem) from error
            reader.bad(number, None, problem)
            continue
        yield number, value


def _require_file(path: pathlib.Path) -> None:
    if not path.is_file():
        raise EsciFormatError(path, None, None, "no such file")


def _read_parquet(path: pathlib.Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    _require_file(path)
    try:
        table = pq.read_table(str(path))
    except (OSError, pa.ArrowException) as error:
        raise EsciFormatError(path, None, None, f"cannot read parquet (truncated file?): {error}") from error
    missing = [column for column in required if column not in table.column_names]
    if missing:
        raise EsciFormatError(path, None, missing[0], f"missing columns {missing}; found {table.column_names}")
    return table.to_pylist()


def _read_products(path: pathlib.Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Products keyed by (product_id, locale); "" stands for a file without locales."""
    if path.suffix == ".parquet":
        rows = enumerate(_read_parquet(path, ("product_id", "product_title")), start=1)
    else:
        rows = json_lines(path, reader=None)
    products: dict[tuple[str, str], dict[str, Any]] = {}
    for _, row in rows:
        if "fields" in row:  # a Vespa feed document
            row = {_VESPA_FIELDS[key]: value for key, value in row["fields"].items() if key in _VESPA_FIELDS}
        key = (str(row.get("product_id")), str(row.get("product_locale") or ""))
        products.setdefault(key, row)
    return products


def read_teacher_cot(path: str | pathlib.Path) -> dict[str, str]:
    """example_id -> chain of thought, from JSON lines `{"example_id": ..., "cot": ...}`."""
    path = pathlib.Path(path)
    cot: dict[str, str] = {}
    for number, row in json_lines(path, reader=None):
        for field in ("example_id", "cot"):
            if row.get(field) is None or (field == "cot" and not isinstance(row[field], str)):
                raise EsciFormatError(path, number, field, "missing" if row.get(field) is None else "not text")
        cot[str(row["example_id"])] = row["cot"]
    return cot


def read_official(examples_path: str | pathlib.Path, products_path: str | pathlib.Path, *,
                  locale: str | None = None, test_fraction: float = 0.2, skip_bad_rows: bool = False,
                  teacher_cot_path: str | pathlib.Path | None = None) -> EsciData:
    """Official ESCI examples joined with product titles; `locale` keeps one locale ("us")."""
    examples_path = pathlib.Path(examples_path)
    products = _read_products(pathlib.Path(products_path))
    reader = _RowReader(examples_path, test_fraction, skip_bad_rows)
    for row, example in enumerate(_read_parquet(examples_path, _EXAMPLE_COLUMNS), start=1):
        example_locale = str(example.get("product_locale") or "")
        if locale is not None and example_locale != locale:
            continue
        product_id = str(example.get("product_id"))
        product = products.get((product_id, example_locale)) or products.get((product_id, ""))
        if product is None:
            reader.bad(row, "product_title", f"missing: product {product_id!r} is not in {products_path}")
            continue
        record = {**{key: example.get(key) for key in _EXAMPLE_COLUMNS},
                  **{key: product.get(key) for key in _PRODUCT_TEXT_COLUMNS}}
        reader.add(row, record, esci_split=str(example.get("split") or ""))
    return reader.result(read_teacher_cot(teacher_cot_path) if teacher_cot_path else None,
                         which=f" of locale {locale!r}" if locale is not None else "")


def read_flat_jsonl(path: str | pathlib.Path, *, test_fraction: float = 0.2, skip_bad_rows: bool = False,
                    teacher_cot_path: str | pathlib.Path | None = None) -> EsciData:
    """ESCI pairs as flat JSON lines (rows are numbered by line, from 1)."""
    path = pathlib.Path(path)
    reader = _RowReader(path, test_fraction, skip_bad_rows)
    for number, record in json_lines(path, reader):
        reader.add(number, record, esci_split=str(record.get("split") or ""))
    return reader.result(read_teacher_cot(teacher_cot_path) if teacher_cot_path else None)
