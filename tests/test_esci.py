"""ESCI readers on the real shared samples, and on corrupted copies of them."""

import collections
import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graphgrpo_jax.data import esci

CODES = {"E": "Exact", "S": "Substitute", "C": "Complement", "I": "Irrelevant"}
GRADES = {3: "Exact", 2: "Substitute", 1: "Complement", 0: "Irrelevant"}


@pytest.fixture(scope="module")
def vespa(shared_data):
    return shared_data / "esci-vespa-sample"


@pytest.fixture(scope="module")
def graded(shared_data):
    return shared_data / "esci-graded-subset" / "esci_pairs.jsonl"


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_official_schema_sample(vespa):
    data = esci.read_official(vespa / "test-sample.parquet", vespa / "sample-products.jsonl")
    assert len(data.examples) == 16 and data.skipped == {}
    assert collections.Counter(e.label for e in data.examples) == {"Exact": 3, "Substitute": 6, "Irrelevant": 7}
    assert {e.query_id for e in data.examples} == {"535"}
    assert {e.query for e in data.examples} == {"06 bmw 325i radio oem not navigation system"}
    assert {e.esci_split for e in data.examples} == {"test"}
    # Titles, brands and labels agree with the flat join shipped beside the sample.
    joined = {str(row["example_id"]): row for row in read_lines(vespa / "esci_pairs.jsonl")}
    for example in data.examples:
        row = joined[example.example_id]
        assert example.product_title == " ".join(row["product_title"].split())
        assert (example.product_brand, example.label) == (row["product_brand"], CODES[row["esci_label"]])
    compressed = esci.read_official(vespa / "test-sample.parquet", vespa / "sample-products.jsonl.zstd")
    assert compressed == data
    with pytest.raises(esci.EsciFormatError, match="no readable rows of locale 'es'"):
        esci.read_official(vespa / "test-sample.parquet", vespa / "sample-products.jsonl", locale="es")


def test_flat_graded_subset(graded):
    data = esci.read_flat_jsonl(graded)
    rows = read_lines(graded)
    assert len(data.examples) == len(rows) == 802
    assert len({e.query_id for e in data.examples}) == 294
    assert collections.Counter(e.label for e in data.examples) == {
        "Exact": 239, "Substitute": 248, "Complement": 20, "Irrelevant": 295}
    for example, row in zip(data.examples, rows):
        assert example.label == GRADES[row["relevance"]] == CODES[row["esci_label"]]
        assert (example.query_id, example.product_id) == (str(row["query_id"]), row["product_id"])
    ids = [e.example_id for e in data.examples]
    assert len(set(ids)) == len(ids)
    assert ids[0] == f"{rows[0]['query_id']}:{rows[0]['product_id']}"
    assert any(i.count(":") == 2 for i in ids)  # a repeated (query, product) pair gets a suffix


def test_split_by_query_id(graded):
    data = esci.read_flat_jsonl(graded, test_fraction=0.2)
    train_queries = {e.query_id for e in data.split("train")}
    test_queries = {e.query_id for e in data.split("test")}
    assert not train_queries & test_queries
    assert len(train_queries) + len(test_queries) == 294
    assert 0.13 <= len(test_queries) / 294 <= 0.27
    for query_id in train_queries | test_queries:  # an independent reading of the documented hash
        position = int(hashlib.sha256(query_id.encode()).hexdigest()[:16], 16) / 16**16
        assert (query_id in test_queries) == (position < 0.2)
    assert {e.split for e in esci.read_flat_jsonl(graded, test_fraction=0.0).examples} == {"train"}


def test_teacher_cot_join(graded, tmp_path):
    rows = read_lines(graded)
    first = f"{rows[0]['query_id']}:{rows[0]['product_id']}"
    cot_path = tmp_path / "cot.jsonl"
    cot_path.write_text(json.dumps({"example_id": first, "cot": "<y>Exact</y>"}) + "\n"
                        + json.dumps({"example_id": "not-an-example", "cot": "x"}) + "\n")
    data = esci.read_flat_jsonl(graded, teacher_cot_path=cot_path)
    assert data.examples[0].teacher_cot == "<y>Exact</y>"
    assert sum(e.teacher_cot is not None for e in data.examples) == 1
    cot_path.write_text(json.dumps({"example_id": first}) + "\n")
    with pytest.raises(esci.EsciFormatError, match=r"cot.jsonl, row 1, field 'cot': missing"):
        esci.read_flat_jsonl(graded, teacher_cot_path=cot_path)


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("field, value, reason", [
    ("product_title", "", "product_title: missing"),
    ("product_title", None, "product_title: missing"),
    ("esci_label", "X", "esci_label: unknown label 'X'; expected one of ['C', 'E', 'I', 'S']"),
    ("relevance", 1, "relevance: grade 1 contradicts esci_label 'S'"),
])
def test_flat_bad_row_raises_or_is_counted(graded, tmp_path, field, value, reason):
    rows = read_lines(graded)
    assert rows[4]["esci_label"] == "S"
    rows[4][field] = value
    path = tmp_path / "pairs.jsonl"
    write_lines(path, rows)
    with pytest.raises(esci.EsciFormatError) as error:
        esci.read_flat_jsonl(path)
    assert (error.value.path, error.value.row, error.value.field) == (str(path), 5, field)
    assert str(error.value).startswith(f"{path}, row 5, field {field!r}")
    data = esci.read_flat_jsonl(path, skip_bad_rows=True)
    assert len(data.examples) == 801 and data.skipped == {reason: 1}


def test_truncated_jsonl(graded, tmp_path):
    text = graded.read_text()
    path = tmp_path / "pairs.jsonl"
    path.write_text(text[: len(text) // 2])  # cut inside a line
    with pytest.raises(esci.EsciFormatError, match=r"row \d+: invalid JSON line \(truncated file\?\)"):
        esci.read_flat_jsonl(path)
    data = esci.read_flat_jsonl(path, skip_bad_rows=True)
    complete_lines = text[: len(text) // 2].count("\n")
    assert len(data.examples) == complete_lines
    assert sum(data.skipped.values()) == 1


@pytest.fixture()
def official_copy(vespa, tmp_path):
    shutil.copy(vespa / "test-sample.parquet", tmp_path / "examples.parquet")
    shutil.copy(vespa / "sample-products.jsonl", tmp_path / "products.jsonl")
    return tmp_path / "examples.parquet", tmp_path / "products.jsonl"


def test_official_missing_product_and_unknown_label(official_copy):
    examples_path, products_path = official_copy
    products = read_lines(products_path)
    missing_id = products[2]["fields"]["id"]
    write_lines(products_path, products[:2] + products[3:])
    table = pq.read_table(examples_path)
    labels = table.column("esci_label").to_pylist()
    labels[0] = "Q"
    pq.write_table(table.set_column(table.column_names.index("esci_label"), "esci_label", pa.array(labels)),
                   examples_path)
    with pytest.raises(esci.EsciFormatError, match=r"row 1, field 'esci_label': unknown label 'Q'"):
        esci.read_official(examples_path, products_path)
    data = esci.read_official(examples_path, products_path, skip_bad_rows=True)
    row_of_missing = [r["product_id"] for r in table.to_pylist()].index(missing_id)
    assert row_of_missing != 0
    assert len(data.examples) == 14
    assert data.skipped == {"esci_label: unknown label 'Q'; expected one of ['C', 'E', 'I', 'S']": 1,
                            f"product_title: missing: product {missing_id!r} is not in {products_path}": 1}


def test_official_truncated_or_incomplete_files(official_copy):
    examples_path, products_path = official_copy
    data = examples_path.read_bytes()
    examples_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(esci.EsciFormatError, match=r"examples.parquet: cannot read parquet"):
        esci.read_official(examples_path, products_path, skip_bad_rows=True)
    pq.write_table(pa.table({"query": ["q"], "product_id": ["p"]}), examples_path)
    with pytest.raises(esci.EsciFormatError, match=r"field 'example_id': missing columns"):
        esci.read_official(examples_path, products_path)
    with pytest.raises(esci.EsciFormatError, match="absent.jsonl: no such file"):
        esci.read_official(examples_path, products_path.with_name("absent.jsonl"))


def test_bytes_that_are_not_utf8_are_a_bad_row_not_replacement_characters(tmp_path):
    good = {"query_id": 1, "query": "tea", "product_id": "A", "product_title": "green tea", "esci_label": "E"}
    bad = dict(good, product_id="B", product_title="caf\u00e9")
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join([json.dumps(good).encode(), json.dumps(bad, ensure_ascii=False).encode("latin-1"),
                                   json.dumps(dict(good, product_id="C", product_title="a\u2028b"),
                                              ensure_ascii=False).encode()]) + b"\n")
    with pytest.raises(esci.EsciFormatError, match=r"pairs.jsonl, row 2: not UTF-8 \(byte \d+ of the line: b'\\xe9'\)"):
        esci.read_flat_jsonl(path)
    data = esci.read_flat_jsonl(path, skip_bad_rows=True)
    assert data.skipped == {"not UTF-8": 1}
    # A raw U+2028 inside a JSON string is text, not a line break: the third row is read whole (its title then
    # gets the readers' usual whitespace cleaning), where splitlines() used to cut it into two broken lines.
    assert [e.product_title for e in data.examples] == ["green tea", "a b"]
