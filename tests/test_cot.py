"""The CoT template: render/parse round trips, malformed text, token spans, the label rule, prompts."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphgrpo_jax.data import cot
from graphgrpo_jax.data.world import WorldConfig, build_world

GOLD = {"qs": "running shoes", "qa": "brand=strideon; color=red", "ps": "trail shoes",
        "pa": "brand=strideon; color=red", "ms": "partial", "ma": "match", "y": "Substitute"}
GOLD_TEXT = ("<qs>running shoes</qs><qa>brand=strideon; color=red</qa><ps>trail shoes</ps>"
             "<pa>brand=strideon; color=red</pa><ms>partial</ms><ma>match</ma><y>Substitute</y>")


@pytest.fixture(scope="module")
def micro_world():
    return build_world(WorldConfig(products_per_type=6, num_queries=60, corrupt_cot_share=0.5))


def test_render_label_last_and_first():
    assert cot.render(GOLD) == GOLD_TEXT
    first = cot.render(GOLD, label_position="first")
    assert first == "<y>Substitute</y>" + GOLD_TEXT[: GOLD_TEXT.index("<y>")]


def test_render_rejects_bad_values():
    with pytest.raises(ValueError, match="no value for node 'ma'"):
        cot.render({k: v for k, v in GOLD.items() if k != "ma"})
    for bad in ("", " padded", "a<b"):
        with pytest.raises(ValueError, match="'qs'"):
            cot.render({**GOLD, "qs": bad})
    with pytest.raises(ValueError, match="label_position"):
        cot.render(GOLD, label_position="middle")


def test_parse_hand_example_spans_include_tags():
    text = "  " + GOLD_TEXT + "\n"
    result = cot.parse(text)
    assert result.valid and result.errors == ()
    assert result.values == GOLD
    for node, value in GOLD.items():
        start, end = result.char_spans[node]
        assert text[start:end] == f"<{node}>{value}</{node}>"
        value_start, value_end = result.value_spans[node]
        assert text[value_start:value_end] == value
    assert result.char_spans["qs"] == (2, 2 + len("<qs>running shoes</qs>"))


def test_render_parse_identity_on_every_generated_example(micro_world):
    checked = 0
    for pair in micro_world.pairs:
        for values in (pair.gold, pair.teacher):
            for position in ("last", "first"):
                result = cot.parse(cot.render(values, label_position=position))
                assert result.valid, result.errors
                assert result.values == values
                checked += 1
        assert cot.parse(pair.teacher_cot).values == pair.teacher
    assert checked == 4 * len(micro_world.pairs) > 0


@pytest.mark.parametrize("text, error", [
    ("", "<qs> missing"),
    (GOLD_TEXT.replace("<ma>match</ma>", ""), "<ma> missing"),
    (GOLD_TEXT + "<y>Exact</y>", "<y> repeated"),
    (GOLD_TEXT.replace("<qs>running shoes</qs>", "<qs>running <qa>x</qa> shoes</qs>"), "nested"),
    (GOLD_TEXT.replace("</y>", ""), "<y> unclosed"),
    (GOLD_TEXT.replace("Substitute", "Maybe"), "'Maybe' not in"),
    (GOLD_TEXT.replace("partial", "sort of"), "<ms> value 'sort of' not in"),
    (GOLD_TEXT.replace("<qs>running shoes</qs>", "<qs> </qs>"), "<qs> empty"),
    (GOLD_TEXT.replace("running shoes", "running <b>shoes"), "contains '<'"),
    (GOLD_TEXT + " and some chatter", "text outside the tags"),
    ("</qs>" + GOLD_TEXT, "stray </qs>"),
    (GOLD_TEXT.replace("</qs>", "</ps>", 1), "</ps> closes <qs>"),
    ("\x00\xff\ufffd<<>>" * 3, "<y> missing"),
])
def test_parse_malformed_text_reports_what_is_wrong(text, error):
    result = cot.parse(text)
    assert not result.valid
    assert any(error in message for message in result.errors), result.errors


def test_parse_non_text_and_custom_schema():
    assert not cot.parse(b"<qs>x</qs>").valid  # bytes are not a response: reported, not raised
    result = cot.parse("<a>1</a><b>yes</b>", nodes=("a", "b"), allowed={"b": ("yes", "no")})
    assert result.valid and result.values == {"a": "1", "b": "yes"}
    assert cot.parse("<a>1</a><b>maybe</b>", nodes=("a", "b"), allowed={"b": ("yes", "no")}).errors == (
        "<b> value 'maybe' not in ['yes', 'no']",)


def test_label_rule_table_and_wildcards():
    expected = {("match", "match"): "Exact", ("match", "partial"): "Substitute",
                ("match", "mismatch"): "Substitute"}
    for ms in cot.MS_VALUES:
        for ma in cot.MA_VALUES:
            want = expected.get((ms, ma)) or {"partial": "Substitute", "complement": "Complement",
                                              "mismatch": "Irrelevant"}[ms]
            assert cot.apply_label_rule(cot.DEFAULT_LABEL_RULE, ms, ma) == want
    rule = (("match", "*", "yes"), ("*", "*", "no"))
    assert cot.apply_label_rule(rule, "match", "anything") == "yes"
    assert cot.apply_label_rule(rule, "mismatch", "match") == "no"
    with pytest.raises(ValueError, match="no row"):
        cot.apply_label_rule(rule[:1], "mismatch", "match")


def test_attribute_lists():
    assert cot.format_attributes({"color": "red", "brand": "x y"}) == "brand=x y; color=red"
    assert cot.format_attributes({}) == "none"
    assert cot.parse_attributes("brand=x y; color=red") == {"brand": "x y", "color": "red"}
    assert cot.parse_attributes("none") == {}
    for bad in ("brand", "brand=", "=red", "a=1; a=2", ""):
        assert cot.parse_attributes(bad) is None


def test_token_node_ids_first_character_rule():
    text = "<ms>match</ms><y>Exact</y>!"
    spans = cot.parse(text, nodes=("ms", "y"), allowed={}).char_spans
    assert spans == {"ms": (0, 14), "y": (14, 26)}
    # Tokens: "<ms>", "match", "</ms><", "y>", "Exact", "</y>!", then a special token with (0, 0).
    offsets = [(0, 4), (4, 9), (9, 15), (15, 17), (17, 22), (22, 27), (0, 0)]
    ids = cot.token_node_ids(spans, offsets, nodes=("ms", "y"))
    np.testing.assert_array_equal(ids, [0, 0, 0, 1, 1, 1, -1])
    assert ids.dtype == np.int32
    assert cot.token_node_ids({}, np.zeros((0, 2)), nodes=("ms",)).shape == (0,)


def test_prompts_are_single_line_and_fixed():
    assert cot.prompt_text("red  runners", "Strideon\nrunning shoes") == (
        "query: red runners product: Strideon running shoes judge:")
    assert cot.rewrite_prompt(" red runners ") == "query: red runners rewrite:"
    assert cot.tag_prompt("red runners", "red running shoes") == (
        "query: red runners rewrite: red running shoes tag:")


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------

_TAGS = [f"<{slash}{node}>" for node in cot.NODES for slash in ("", "/")]
_fragments = st.one_of(st.sampled_from(_TAGS), st.sampled_from(["match", "Exact", "<", ">", " ", "</"]),
                       st.text(max_size=6))
tag_soup = st.lists(_fragments, max_size=30).map("".join)


def _check_structure(text: str, result: cot.ParseResult) -> None:
    assert set(result.values) <= set(cot.NODES)
    assert set(result.values) == set(result.char_spans) == set(result.value_spans)
    previous_end = 0
    for node, (start, end) in sorted(result.char_spans.items(), key=lambda item: item[1]):
        assert previous_end <= start < end <= len(text)
        assert text[start:end].startswith(f"<{node}>") and text[start:end].endswith(f"</{node}>")
        value_start, value_end = result.value_spans[node]
        assert text[value_start:value_end].strip() == result.values[node]
        previous_end = end
    assert result.valid == (not result.errors)
    if result.valid:
        assert set(result.values) == set(cot.NODES)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), tag_soup))
def test_parse_never_raises_and_spans_are_consistent(text):
    _check_structure(text, cot.parse(text))


_value = st.text(alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)),
                 min_size=1, max_size=12).map(str.strip).filter(bool)


@settings(max_examples=200, deadline=None)
@given(values=st.fixed_dictionaries({node: _value for node in cot.NODES}),
       position=st.sampled_from(["last", "first"]), cuts=st.lists(st.integers(0, 400), max_size=40))
def test_token_spans_cover_exactly_the_node_characters(values, position, cuts):
    text = cot.render(values, label_position=position)
    result = cot.parse(text, allowed={})
    assert result.valid and result.values == values
    # A tokenization that splits at node boundaries (as when the tags are added tokens), plus random cuts.
    boundaries = {0, len(text)} | {b for span in result.char_spans.values() for b in span}
    points = sorted(boundaries | {c for c in cuts if c < len(text)})
    offsets = list(zip(points[:-1], points[1:]))
    ids = cot.token_node_ids(result.char_spans, offsets)
    for index, node in enumerate(cot.NODES):
        covered = [c for (start, end), i in zip(offsets, ids) if i == index for c in range(start, end)]
        assert covered == list(range(*result.char_spans[node]))
    # The rendered template has no characters outside the node spans.
    assert (ids >= 0).all()


def test_spans_match_an_independent_regex_reading(micro_world):
    for pair in micro_world.pairs[:50]:
        text = pair.teacher_cot
        result = cot.parse(text)
        for match in re.finditer(r"<(\w+)>([^<]*)</\1>", text):
            assert result.char_spans[match.group(1)] == match.span()
            assert result.values[match.group(1)] == match.group(2)
