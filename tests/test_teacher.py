"""The teacher file (read, write, join) and the rule teacher, on hand-worked pairs and the real ESCI rows."""

import collections
import json
import pathlib

import pytest

from graphgrpo_jax.data import cot, esci, teacher

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
GRADED = SHARED_DATA / "esci-graded-subset" / "esci_pairs.jsonl"
VESPA = SHARED_DATA / "esci-vespa-sample" / "esci_pairs.jsonl"

EXACT_NODES = {"qs": "running shoes", "qa": "brand=nike; color=red", "ps": "running shoe",
               "pa": "brand=nike; color=red; gender=men", "ms": "match", "ma": "match", "y": "Exact"}
IRRELEVANT_NODES = {"qs": "lip balm", "qa": "none", "ps": "fan", "pa": "brand=panasonic",
                    "ms": "mismatch", "ma": "match", "y": "Irrelevant"}


def example(example_id, label, query="q", title="t"):
    return esci.EsciExample(example_id=example_id, query_id="1", query=query, product_id=example_id,
                            product_title=title, label=label, split="train")


def row(example_id="a", **node_changes):
    nodes = {**EXACT_NODES, **node_changes}
    return {"example_id": example_id, "teacher": "hand", "nodes": {k: v for k, v in nodes.items() if v is not None}}


def write_lines(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8") for line in lines) + b"\n")
    return path


# --------------------------------------------------------------------------------------------------
# The rule teacher on hand-worked pairs
# --------------------------------------------------------------------------------------------------

def test_exact_pair_reads_subject_colour_brand_and_gender():
    nodes = teacher.rule_teacher("red nike running shoes", "Nike Men's Air Zoom Pegasus Running Shoe, Red", "Exact")
    assert "running shoe" in nodes["qs"]
    assert nodes == EXACT_NODES


def test_substitute_with_a_missing_attribute_is_a_subject_match():
    # The title keeps the subject and the brand but not the colour: 1 of 2 attributes -> ma partial.
    nodes = teacher.rule_teacher("red nike running shoes", "Nike Men's Air Zoom Pegasus Running Shoe, Blue",
                                 "Substitute")
    assert nodes["qa"] == "brand=nike; color=red"
    assert nodes["pa"] == "brand=nike; color=blue; gender=men"
    assert (nodes["ms"], nodes["ma"], nodes["y"]) == ("match", "partial", "Substitute")


def test_substitute_with_every_attribute_present_is_a_substitute_type():
    # Catalogue brand and colour; no query attributes, subject word "radio" in the title: the words say
    # (match, match), which is Exact, so the nearest Substitute pair is (partial, match).
    annotation = teacher.annotate_rule("bmw radio", "Rimoody Car Stereo Radio", "Substitute",
                                       brand="Rimoody", color="Black")
    assert annotation.nodes == {"qs": "bmw radio", "qa": "none", "ps": "radio", "pa": "brand=rimoody; color=black",
                                "ms": "partial", "ma": "match", "y": "Substitute"}
    assert annotation.evidence == ("match", "match") and annotation.against_evidence


def test_complement_keeps_a_product_name_in_the_subject():
    # "iPhone" opens the title and the title goes on in the query's words: a product name, not a brand.
    nodes = teacher.rule_teacher("iphone 12", "iPhone 12 case", "Complement")
    assert nodes == {"qs": "iphone 12", "qa": "none", "ps": "iphone 12 case", "pa": "none",
                     "ms": "complement", "ma": "match", "y": "Complement"}


def test_irrelevant_pair_takes_the_overlapping_title_phrase():
    nodes = teacher.rule_teacher("skull muffin baking pan",
                                 "Amazon Basics Silicone, Non-Stick, Food Safe Baking Mat - Pack of 2", "Irrelevant")
    assert nodes == {"qs": "skull muffin baking pan", "qa": "none", "ps": "baking mat",
                     "pa": "brand=amazon; quantity=2 pack", "ms": "mismatch", "ma": "match", "y": "Irrelevant"}


def test_attribute_words_leave_the_subject():
    nodes = teacher.rule_teacher("womens xl black t shirt 2 pack", "Hanes Women's T-Shirt, 10 oz, Pack of 3, Navy Blue",
                                 "Substitute")
    assert nodes["qs"] == "t-shirt"
    assert nodes["qa"] == "color=black; gender=women; quantity=2 pack; size=xl"
    assert nodes["ps"] == "t-shirt"
    assert nodes["pa"] == "brand=hanes; color=navy blue; gender=women; quantity=3 pack; size=10 oz"
    # Gender is met, colour, quantity and size are not: (match, partial).
    assert (nodes["ms"], nodes["ma"]) == ("match", "partial")


def test_hair_dye_query_head_ends_before_its_first_preposition():
    title = "Clairol Natural Instincts Semi-Permanent Hair Dye, 2 Black Hair Color, 3 Count"
    nodes = teacher.rule_teacher("hair dye for dark hair without bleach", title, "Exact")
    assert (nodes["qs"], nodes["ps"]) == ("hair dye", "hair dye")
    assert nodes["pa"] == "brand=clairol; color=black; quantity=3 count"


def test_a_catalogue_colour_that_is_no_colour_gives_way_to_the_title_colour():
    for junk in ("Standard 3GB+32GB (S-DIN 8inch)", "dvd", "0"):
        nodes = teacher.rule_teacher("car radio", "ATOTO Car Radio, Black", "Substitute", brand="ATOTO", color=junk)
        assert nodes["pa"] == "brand=atoto; color=black"
    nodes = teacher.rule_teacher("car radio", "ATOTO Car Radio, Black", "Substitute", brand="ATOTO", color="Matte Red")
    assert nodes["pa"] == "brand=atoto; color=matte red"


def test_texts_empty_after_cleaning_fall_back_to_a_word():
    annotation = teacher.annotate_rule("red", "!!!", "Irrelevant")
    assert annotation.nodes == {"qs": "red", "qa": "color=red", "ps": "!!!", "pa": "none",
                                "ms": "mismatch", "ma": "mismatch", "y": "Irrelevant"}
    assert annotation.fallbacks == ("qs_empty", "ps_empty")
    assert teacher.rule_teacher("<>", "<<>>", "Exact")["qs"] == "query"
    assert teacher.rule_teacher("<>", "<<>>", "Exact")["ps"] == "product"


def test_odd_titles_give_short_renderable_values():
    odd_titles = ("Widget " + "x" * 5000, "ヴァセリン ペトロリュームジェリー リップ", "a;b=c <d> e\n\tf", "  ", "🙂 🙂")
    for title in odd_titles:
        nodes = teacher.rule_teacher("lip balm; cheap=yes", title, "Substitute", brand="=;", color="<red>")
        assert all(len(value) <= 60 for value in nodes.values())
        assert cot.parse(cot.render(nodes)).values == nodes


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="no \\(ms, ma\\) pair gives label"):
        teacher.rule_teacher("q", "t", "E")


# --------------------------------------------------------------------------------------------------
# The rule teacher on every real row
# --------------------------------------------------------------------------------------------------

def _check_chains(examples):
    chains = []
    for e in examples:
        nodes = teacher.rule_teacher(e.query, e.product_title, e.label, brand=e.product_brand, color=e.product_color)
        parsed = cot.parse(cot.render(nodes))
        assert parsed.valid and parsed.values == nodes, (e.example_id, parsed.errors)
        for node in teacher.ATTRIBUTE_NODES:
            assert cot.format_attributes(cot.parse_attributes(nodes[node])) == nodes[node]
        assert cot.apply_label_rule(cot.DEFAULT_LABEL_RULE, nodes["ms"], nodes["ma"]) == e.label == nodes["y"]
        assert nodes == teacher.rule_teacher(e.query, e.product_title, e.label, brand=e.product_brand,
                                             color=e.product_color)
        chains.append(nodes)
    return chains


def test_every_graded_row_gets_a_well_formed_chain_that_agrees_with_its_label():
    if not GRADED.is_file():
        pytest.skip(f"real ESCI rows not found beside the repo: {GRADED}")
    examples = esci.read_flat_jsonl(GRADED).examples
    chains = _check_chains(examples)
    assert len(chains) == 802
    assert collections.Counter(c["y"] for c in chains) == {"Exact": 239, "Substitute": 248, "Complement": 20,
                                                          "Irrelevant": 295}
    pairs = collections.Counter((c["ms"], c["ma"]) for c in chains)
    assert pairs[("match", "match")] == 239 and pairs[("complement", "match")] + pairs[("complement", "partial")] \
        + pairs[("complement", "mismatch")] == 20


def test_catalogue_brand_and_colour_are_used():
    if not VESPA.is_file():
        pytest.skip(f"real ESCI rows not found beside the repo: {VESPA}")
    examples = esci.read_flat_jsonl(VESPA).examples
    chains = _check_chains(examples)
    assert len(chains) == 16
    for e, nodes in zip(examples, chains):
        pa = cot.parse_attributes(nodes["pa"])
        if e.product_brand.strip():
            assert pa["brand"] == " ".join(e.product_brand.lower().split())
        if e.product_color.lower() in ("black", "blue"):
            assert pa["color"] == e.product_color.lower()
        assert not {"dvd", "0", "multi"} & set(pa.get("color", "").split())  # junk catalogue colours


# --------------------------------------------------------------------------------------------------
# The teacher file
# --------------------------------------------------------------------------------------------------

def test_write_then_read_round_trips(tmp_path):
    path = tmp_path / "out" / "teacher.jsonl"
    unicode_nodes = {**IRRELEVANT_NODES, "qs": "crème brûlée\u2028lip balm"}  # U+2028 must not split a row
    nodes_by_id = {"b": unicode_nodes, "a": EXACT_NODES, "10": EXACT_NODES}
    teacher.write_teacher_file(path, nodes_by_id, "hand")
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 4
    assert [json.loads(line)["example_id"] for line in lines[:-1]] == ["10", "a", "b"]
    assert "crème brûlée" in lines[2] and all(json.loads(line)["teacher"] == "hand" for line in lines[:-1])
    assert list(json.loads(lines[0])["nodes"]) == list(cot.NODES)
    assert sorted(p.name for p in path.parent.iterdir()) == ["teacher.jsonl"]  # no temporary left behind
    read = teacher.read_teacher_file(path)
    assert read == teacher.TeacherFile(nodes_by_id={"10": EXACT_NODES, "a": EXACT_NODES, "b": unicode_nodes},
                                       skipped={})


def test_write_refuses_what_read_would_refuse_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "teacher.jsonl"
    teacher.write_teacher_file(path, {"a": EXACT_NODES}, "hand")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="'nodes.y': contradicts the label rule"):
        teacher.write_teacher_file(path, {"a": EXACT_NODES, "b": {**EXACT_NODES, "y": "Irrelevant"}}, "hand")
    with pytest.raises(ValueError, match="no rows"):
        teacher.write_teacher_file(path, {}, "hand")
    with pytest.raises(ValueError, match="teacher must be"):
        teacher.write_teacher_file(path, {"a": EXACT_NODES}, " ")
    with pytest.raises(ValueError, match="'example_id': not a string"):
        teacher.write_teacher_file(path, {1: EXACT_NODES}, "hand")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.jsonl"]


BAD_ROWS = [  # (line, field, skip-count key)
    ("not json", None, "invalid JSON"),
    ('{"example_id": "x", "example_id": "y", "nodes": {}}', None, "invalid JSON"),  # a repeated key
    ("[1, 2]", None, "not a JSON object"),
    (json.dumps({"nodes": EXACT_NODES}), "example_id", "example_id: missing"),
    (json.dumps({"example_id": 7, "nodes": EXACT_NODES}), "example_id", "example_id: not a string"),
    (json.dumps({"example_id": " ", "nodes": EXACT_NODES}), "example_id", "example_id: empty"),
    (json.dumps({"example_id": "x", "teacher": 5, "nodes": EXACT_NODES}), "teacher", "teacher: not a string"),
    (json.dumps({"example_id": "x"}), "nodes", "nodes: missing"),
    (json.dumps({"example_id": "x", "nodes": ["match"]}), "nodes", "nodes: not an object"),
    (json.dumps(row("x", zz="1")), "nodes.zz", "nodes.zz: unknown node"),
    (json.dumps(row("x", pa=None)), "nodes.pa", "nodes.pa: missing"),
    (json.dumps(row("x", ms=1)), "nodes.ms", "nodes.ms: not a string"),
    (json.dumps(row("x", ms="maybe")), "nodes.ms", "nodes.ms: not an allowed value"),
    (json.dumps(row("x", y="exact")), "nodes.y", "nodes.y: not an allowed value"),
    (json.dumps(row("x", qs="")), "nodes.qs", "nodes.qs: empty"),
    (json.dumps(row("x", qs=" running shoes")), "nodes.qs", "nodes.qs: not trimmed"),
    (json.dumps(row("x", ps="shoe <b>")), "nodes.ps", "nodes.ps: contains '<' or '>'"),
    (json.dumps(row("x", qa="color")), "nodes.qa", "nodes.qa: malformed attribute list"),
    (json.dumps(row("x", pa="color=red; color=blue")), "nodes.pa", "nodes.pa: malformed attribute list"),
    (json.dumps(row("x", qa="color=red; brand=nike")), "nodes.qa", "nodes.qa: attribute list not in canonical form"),
    (json.dumps(row("x", qa="brand=nike;color=red")), "nodes.qa", "nodes.qa: attribute list not in canonical form"),
    (json.dumps(row("x", y="Substitute")), "nodes.y", "nodes.y: contradicts the label rule"),
    (json.dumps(row("good")), "example_id", "example_id: duplicated"),
    (b'{"example_id": "x\xff", "nodes": {}}', None, "invalid UTF-8"),
]


@pytest.mark.parametrize("line,field,reason", BAD_ROWS, ids=[reason for _, _, reason in BAD_ROWS])
def test_each_bad_row_names_file_line_and_field(tmp_path, line, field, reason):
    # Line 1 good, line 2 blank (still counted as a line), line 3 bad, line 4 good.
    path = write_lines(tmp_path / "teacher.jsonl", [json.dumps(row("good")), "", line, json.dumps(row("last"))])
    with pytest.raises(esci.EsciFormatError) as caught:
        teacher.read_teacher_file(path)
    assert (caught.value.path, caught.value.row, caught.value.field) == (str(path), 3, field)
    assert str(path) in str(caught.value) and "row 3" in str(caught.value)
    skipped = teacher.read_teacher_file(path, skip_bad_rows=True)
    assert skipped.skipped == {reason: 1}
    assert skipped.nodes_by_id == {"good": EXACT_NODES, "last": EXACT_NODES}


def test_skip_bad_rows_counts_each_reason_and_keeps_good_rows(tmp_path):
    lines = [json.dumps(row("a")), "oops", json.dumps(row("b", y="Irrelevant")), json.dumps(row("a")),
             json.dumps(row("c", **IRRELEVANT_NODES)), "  ", json.dumps(row("d", ms="maybe")), "oops again",
             b"\xc3\x28", json.dumps(row("e"))]
    path = write_lines(tmp_path / "teacher.jsonl", lines)
    read = teacher.read_teacher_file(path, skip_bad_rows=True)
    assert read.skipped == {"invalid JSON": 2, "nodes.y: contradicts the label rule": 1,
                            "example_id: duplicated": 1, "nodes.ms: not an allowed value": 1, "invalid UTF-8": 1}
    assert read.nodes_by_id == {"a": EXACT_NODES, "c": IRRELEVANT_NODES, "e": EXACT_NODES}


def test_invalid_utf8_is_an_error_not_a_replacement_character(tmp_path):
    good = json.dumps(row("good", qs="crème"), ensure_ascii=False).encode("utf-8")
    path = write_lines(tmp_path / "teacher.jsonl", [good, good.replace(b"good", b"bad").replace(b"\xc3\xa8", b"\xe8")])
    with pytest.raises(esci.EsciFormatError, match="invalid UTF-8") as caught:
        teacher.read_teacher_file(path)
    assert (caught.value.row, caught.value.field) == (2, None)
    assert teacher.read_teacher_file(path, skip_bad_rows=True).nodes_by_id == {"good": {**EXACT_NODES, "qs": "crème"}}


def test_blank_lines_crlf_and_a_byte_order_mark_are_tolerated(tmp_path):
    path = tmp_path / "teacher.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row("a")).encode() + b"\r\n\r\n   \n\t\r\n"
                     + json.dumps(row("b")).encode() + b"\r\n\n")
    read = teacher.read_teacher_file(path)
    assert read == teacher.TeacherFile({"a": EXACT_NODES, "b": EXACT_NODES}, {})


def test_empty_and_missing_files_are_errors(tmp_path):
    for content in (b"", b"\n  \n\r\n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        with pytest.raises(esci.EsciFormatError, match="empty teacher file") as caught:
            teacher.read_teacher_file(path, skip_bad_rows=True)
        assert (caught.value.path, caught.value.row) == (str(path), None)
    with pytest.raises(esci.EsciFormatError, match="no such file") as caught:
        teacher.read_teacher_file(tmp_path / "absent.jsonl")
    assert caught.value.path == str(tmp_path / "absent.jsonl")


def test_a_custom_node_set_and_label_rule(tmp_path):
    nodes = ("ms", "y")
    rule = (("match", "*", "Exact"), ("*", "*", "Irrelevant"))
    path = write_lines(tmp_path / "teacher.jsonl", [
        json.dumps({"example_id": "a", "nodes": {"ms": "match", "y": "Exact"}}),
        json.dumps({"example_id": "b", "nodes": {"ms": "partial", "y": "Irrelevant"}})])
    # Without `ma` among the nodes the label rule is not checked; `qs` etc. are not required.
    assert teacher.read_teacher_file(path, nodes=nodes, rule=rule).nodes_by_id == {
        "a": {"ms": "match", "y": "Exact"}, "b": {"ms": "partial", "y": "Irrelevant"}}
    with pytest.raises(esci.EsciFormatError) as caught:
        teacher.read_teacher_file(path)  # the default nodes want qs first
    assert (caught.value.row, caught.value.field) == (1, "nodes.qs")


# --------------------------------------------------------------------------------------------------
# Joining
# --------------------------------------------------------------------------------------------------

def _join_fixture():
    examples = [example("e1", "Exact"), example("e2", "Irrelevant"), example("e3", "Exact"),
                example("e4", "Substitute"), example("e5", "Complement")]
    nodes = {"e1": EXACT_NODES, "e2": IRRELEVANT_NODES, "e3": IRRELEVANT_NODES,  # e3: teacher says Irrelevant
             "x8": EXACT_NODES, "x9": IRRELEVANT_NODES}
    return examples, teacher.TeacherFile(nodes, {})


def test_join_keeps_label_only_rows():
    examples, teacher_file = _join_fixture()
    joined = teacher.join_teacher(examples, teacher_file)
    assert joined.counts == {"joined": 2, "without_teacher": 2, "label_disagrees": 1, "dropped": 0, "kept": 5,
                             "teacher_ids_unused": 2}
    assert [r.example.example_id for r in joined.rows] == ["e1", "e2", "e3", "e4", "e5"]
    assert [r.nodes for r in joined.rows] == [EXACT_NODES, IRRELEVANT_NODES, None, None, None]
    assert [r.label_only for r in joined.rows] == [False, False, True, True, True]
    assert joined.rows[2].example.label == "Exact"  # the human label stays gold
    joined.rows[0].nodes["qs"] = "changed"
    assert teacher_file.nodes_by_id["e1"]["qs"] == "running shoes"  # rows hold copies


def test_join_can_drop_label_only_rows():
    examples, teacher_file = _join_fixture()
    joined = teacher.join_teacher(examples, teacher_file, missing="drop")
    assert joined.counts == {"joined": 2, "without_teacher": 2, "label_disagrees": 1, "dropped": 3, "kept": 2,
                             "teacher_ids_unused": 2}
    assert [(r.example.example_id, r.nodes) for r in joined.rows] == [("e1", EXACT_NODES), ("e2", IRRELEVANT_NODES)]
    with pytest.raises(ValueError, match="missing must be one of"):
        teacher.join_teacher(examples, teacher_file, missing="keep")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def test_cli_annotates_a_flat_file(tmp_path, capsys):
    labels = {3: "E", 2: "S", 1: "C", 0: "I"}
    titles = ["Nike Men's Running Shoe, Red", "Adidas Trail Running Shoe, Blue", "Shoe Laces, 2 Pack",
              "Panasonic Ventilation Fan"]
    rows = [{"query_id": q, "query": f"red running shoes {q}", "product_id": f"P{q}{k}", "product_title": titles[k],
             "relevance": 3 - k, "esci_label": labels[3 - k]}
            for q in range(4) for k in range(4)]
    rows[0].update(product_brand="Nike", product_color="Red")
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "teacher.jsonl"
    assert teacher.main([f"--input={source}", f"--out={out}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == 16 and printed["repeated_example_ids"] == 0 and printed["skipped_input_rows"] == {}
    assert printed["labels"] == {"Complement": 4, "Exact": 4, "Irrelevant": 4, "Substitute": 4}
    assert sum(printed["ms_ma"].values()) == 16 and printed["ms_ma"]["match,match"] == 4
    read = teacher.read_teacher_file(out)
    assert sorted(read.nodes_by_id) == sorted(f"{q}:P{q}{k}" for q in range(4) for k in range(4))
    assert read.nodes_by_id["0:P00"]["pa"] == "brand=nike; color=red; gender=men"
    assert {json.loads(line)["teacher"] for line in out.read_text().splitlines()} == {teacher.RULE_TEACHER_NAME}
    joined = teacher.join_teacher(esci.read_flat_jsonl(source).examples, read)
    assert joined.counts["joined"] == 16 and joined.counts["teacher_ids_unused"] == 0
