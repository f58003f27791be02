"""Property tests of the ESCI JSONL reader over generated files of valid and malformed rows: a malformed row
is an error naming file, line and field (strict) or a counted skip (`skip_bad_rows`); a valid row is never
dropped or changed; an empty file, or one with no readable row, is an error in both modes."""

import json
import pathlib
import tempfile

import pytest
from hypothesis import given, settings, strategies as st

from graphgrpo_jax.data import esci

LABELS = {"E": "Exact", "S": "Substitute", "C": "Complement", "I": "Irrelevant"}
WORDS = st.text(alphabet="abcdefghij xyz0123456789-é", min_size=1, max_size=40).filter(lambda text: text.split())


@st.composite
def valid_rows(draw):
    title = draw(st.one_of(WORDS, st.just("lamp " * 40_000)))  # a 200 kB title is data, kept whole
    return {"query_id": draw(st.one_of(WORDS, st.integers(0, 10**6))), "query": draw(WORDS),
            "product_id": draw(WORDS), "product_title": title, "esci_label": draw(st.sampled_from(sorted(LABELS))),
            "product_brand": draw(st.one_of(st.none(), WORDS)), "extra_field": draw(st.integers())}


# (kind, field the error must name or None, how the row is broken)
MALFORMED = {
    "list query_id": ("query_id", lambda row: json.dumps({**row, "query_id": [1, 2]}).encode()),
    "bool query_id": ("query_id", lambda row: json.dumps({**row, "query_id": True}).encode()),
    "number query": ("query", lambda row: json.dumps({**row, "query": 3.5}).encode()),
    "dict title": ("product_title", lambda row: json.dumps({**row, "product_title": {"t": "x"}}).encode()),
    "list brand": ("product_brand", lambda row: json.dumps({**row, "product_brand": ["x"]}).encode()),
    "missing title": ("product_title", lambda row: json.dumps({k: v for k, v in row.items()
                                                               if k != "product_title"}).encode()),
    "blank query": ("query", lambda row: json.dumps({**row, "query": "   "}).encode()),
    "unknown label": ("esci_label", lambda row: json.dumps({**row, "esci_label": "X"}).encode()),
    "truncated line": (None, lambda row: json.dumps(row).encode()[:-7]),
    "not utf-8": (None, lambda row: json.dumps(row).encode().replace(b'"query":', b'"query\xff":', 1)),
    "json array": (None, lambda row: b"[1, 2]"),
}


@st.composite
def files(draw):
    """Lines of a JSONL file: (bytes, expected row or None for a blank line, malformed kind or None)."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.sampled_from(["valid", "valid", "blank", "malformed"]))
        row = draw(valid_rows())
        if choice == "valid":
            lines.append((json.dumps(row).encode(), row, None))
        elif choice == "blank":
            lines.append((draw(st.sampled_from([b"", b"   ", b"\t"])), None, None))
        else:
            kind = draw(st.sampled_from(sorted(MALFORMED)))
            lines.append((MALFORMED[kind][1](row), None, kind))
    return lines


def write(lines) -> pathlib.Path:
    handle = tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False)
    with handle:
        handle.write(b"\n".join(raw for raw, _, _ in lines) + (b"\n" if lines else b""))
    return pathlib.Path(handle.name)


def expected_example(row):
    text = {field: " ".join(str(row[field]).split()) for field in ("query_id", "query", "product_id",
                                                                    "product_title")}
    return text, LABELS[row["esci_label"]], row["product_brand"] or ""


def check_valid_rows_kept(examples, lines):
    wanted = [expected_example(row) for _, row, kind in lines if row is not None and kind is None]
    got = [({field: getattr(e, field) for field in ("query_id", "query", "product_id", "product_title")},
            e.label, e.product_brand) for e in examples]
    assert got == wanted


@settings(max_examples=60, deadline=None)
@given(files())
def test_strict_reader_fails_on_the_first_bad_row_naming_it_or_keeps_every_row(lines):
    path = write(lines)
    bad = [(number, kind) for number, (_, _, kind) in enumerate(lines, start=1) if kind]
    valid = [row for _, row, kind in lines if row is not None and kind is None]
    try:
        if bad:
            with pytest.raises(esci.EsciFormatError) as raised:
                esci.read_flat_jsonl(path)
            number, kind = bad[0]
            assert (raised.value.path, raised.value.row, raised.value.field) == (str(path), number, MALFORMED[kind][0])
            assert str(path) in str(raised.value) and f"row {number}" in str(raised.value)
        elif not valid:
            with pytest.raises(esci.EsciFormatError, match="no readable rows"):
                esci.read_flat_jsonl(path)
        else:
            data = esci.read_flat_jsonl(path)
            check_valid_rows_kept(data.examples, lines)
            assert data.skipped == {}
    finally:
        path.unlink()


@settings(max_examples=60, deadline=None)
@given(files())
def test_skipping_reader_counts_every_bad_row_and_keeps_every_valid_one(lines):
    path = write(lines)
    num_bad = sum(kind is not None for _, _, kind in lines)
    valid = [row for _, row, kind in lines if row is not None and kind is None]
    try:
        if not valid:
            with pytest.raises(esci.EsciFormatError, match="no readable rows"):
                esci.read_flat_jsonl(path, skip_bad_rows=True)
            return
        data = esci.read_flat_jsonl(path, skip_bad_rows=True)
        check_valid_rows_kept(data.examples, lines)
        assert sum(data.skipped.values()) == num_bad
    finally:
        path.unlink()


def test_an_empty_file_is_an_error_in_both_modes(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    for skip in (False, True):
        with pytest.raises(esci.EsciFormatError, match=r"empty.jsonl: no readable rows \(an empty file\?\)"):
            esci.read_flat_jsonl(path, skip_bad_rows=skip)


# Teacher files (data/teacher.py): the same contract.
NODES = ({"qs": "running shoes", "qa": "brand=nike", "ps": "running shoe", "pa": "brand=nike", "ms": "match",
          "ma": "match", "y": "Exact"},
         {"qs": "lip balm", "qa": "none", "ps": "fan", "pa": "brand=panasonic", "ms": "mismatch", "ma": "match",
          "y": "Irrelevant"})
TEACHER_MALFORMED = {
    "list id": ("example_id", lambda row: json.dumps({**row, "example_id": ["a"]}).encode()),
    "no nodes": ("nodes", lambda row: json.dumps({k: v for k, v in row.items() if k != "nodes"}).encode()),
    "unknown label": ("nodes.y", lambda row: json.dumps({**row, "nodes": {**row["nodes"], "y": "Maybe"}}).encode()),
    "number teacher": ("teacher", lambda row: json.dumps({**row, "teacher": 7}).encode()),
    "truncated line": (None, lambda row: json.dumps(row).encode()[:-3]),
    "not utf-8": (None, lambda row: json.dumps(row).encode().replace(b'"nodes"', b'"nod\xc3es"', 1)),
}


@st.composite
def teacher_files(draw):
    lines = []
    for index in range(draw(st.integers(0, 6))):
        row = {"example_id": f"{index}-{draw(WORDS)}", "teacher": "rule", "nodes": draw(st.sampled_from(NODES))}
        kind = draw(st.one_of(st.none(), st.none(), st.sampled_from(sorted(TEACHER_MALFORMED))))
        lines.append((TEACHER_MALFORMED[kind][1](row) if kind else json.dumps(row).encode(), row, kind))
    return lines


@settings(max_examples=60, deadline=None)
@given(teacher_files(), st.booleans())
def test_teacher_file_reader_names_or_counts_bad_rows_and_keeps_good_ones(lines, skip):
    from graphgrpo_jax.data import teacher

    path = write(lines)
    bad = [(number, kind) for number, (_, _, kind) in enumerate(lines, start=1) if kind]
    good = {row["example_id"]: row["nodes"] for _, row, kind in lines if kind is None}
    try:
        if not good or (bad and not skip):
            with pytest.raises(esci.EsciFormatError) as raised:
                teacher.read_teacher_file(path, skip_bad_rows=skip)
            if bad and not skip:
                number, kind = bad[0]
                assert (raised.value.path, raised.value.row, raised.value.field) == (
                    str(path), number, TEACHER_MALFORMED[kind][0])
            return
        read = teacher.read_teacher_file(path, skip_bad_rows=skip)
        assert read.nodes_by_id == good
        assert sum(read.skipped.values()) == len(bad)
    finally:
        path.unlink()


# Rewrite query files (data/rewrite_data.py, the Rec-R1 layout): the same contract.
def transcript(query: str, answer: str = '{"query": "(a OR b) AND c"}') -> str:
    return (f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nBelow is the query:\n```{query}```\n"
            f"<|im_end|>\n<|im_start|>assistant\n<think>\nreasons\n</think>\n<answer>{answer}</answer>")


QUERY_MALFORMED = {
    "list query": ("query", lambda row: json.dumps({**row, "query": ["a"]}).encode()),
    "blank query": ("query", lambda row: json.dumps({**row, "query": " "}).encode()),
    "string targets": ("target_asins", lambda row: json.dumps({**row, "target_asins": "B01"}).encode()),
    "number target": ("target_asins", lambda row: json.dumps({**row, "target_asins": ["B01", 7]}).encode()),
    "no targets": ("target_asins", lambda row: json.dumps({k: v for k, v in row.items()
                                                          if k != "target_asins"}).encode()),
    "number source": ("data_source", lambda row: json.dumps({**row, "data_source": 3}).encode()),
    "dict transcript": ("sft_text", lambda row: json.dumps({**row, "sft_text": {"t": 1}}).encode()),
    "another query's transcript": ("sft_text", lambda row: json.dumps(
        {**row, "sft_text": transcript(row["query"] + " other")}).encode()),
    "truncated line": (None, lambda row: json.dumps(row).encode()[:-5]),
    "not utf-8": (None, lambda row: json.dumps(row).encode().replace(b'"query"', b'"que\xffry"', 1)),
}
ANSWERS = ('{"query": "(a OR b) AND c"}', "no json here", '{"query": 3}', "")


@st.composite
def query_files(draw):
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        query = draw(WORDS)
        row = {"query": query, "target_asins": draw(st.lists(WORDS, max_size=3)), "data_source": "esci_train",
               "sft_text": draw(st.one_of(st.none(), st.sampled_from(ANSWERS).map(lambda a: transcript(query, a))))}
        kind = draw(st.one_of(st.none(), st.none(), st.just("blank"), st.sampled_from(sorted(QUERY_MALFORMED))))
        raw = b"  " if kind == "blank" else QUERY_MALFORMED[kind][1](row) if kind else json.dumps(row).encode()
        lines.append((raw, row, kind))
    return lines


@settings(max_examples=60, deadline=None)
@given(query_files(), st.booleans())
def test_rewrite_query_reader_names_or_counts_bad_rows_and_keeps_good_ones(lines, skip):
    from graphgrpo_jax.data import rewrite_data

    path = write(lines)
    bad = [(number, kind) for number, (_, _, kind) in enumerate(lines, start=1) if kind not in (None, "blank")]
    good = [row for _, row, kind in lines if kind is None]
    try:
        if not good or (bad and not skip):
            with pytest.raises(esci.EsciFormatError) as raised:
                rewrite_data.read_queries(path, split="train", skip_bad_rows=skip)
            if bad and not skip:
                number, kind = bad[0]
                assert (raised.value.path, raised.value.row, raised.value.field) == (
                    str(path), number, QUERY_MALFORMED[kind][0])
            return
        read = rewrite_data.read_queries(path, split="train", skip_bad_rows=skip)
        assert [(q.text, q.target_ids) for q in read.queries] == [
            (" ".join(row["query"].split()), tuple(dict.fromkeys(" ".join(t.split()) for t in row["target_asins"])))
            for row in good]
        teachers = [q.teacher.rewrite if q.teacher else None for q in read.queries]
        assert teachers == [("(a OR b) AND c" if row["sft_text"] and ANSWERS[0] in row["sft_text"] else None)
                            for row in good]
        assert sum(read.teacherless.values()) == sum(t is None for t, row in zip(teachers, good) if row["sft_text"])
        assert sum(read.skipped.values()) == len(bad)
    finally:
        path.unlink()
