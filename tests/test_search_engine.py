"""Search engine: ranking on a hand-made catalogue, persistence, hostile queries, retrieval metrics."""

import json
import math
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphgrpo_jax.search.engine import Retriever, SearchEngine, ndcg_at_k, recall_at_k

CATALOGUE = [
    {"id": "P01", "title": "Nike Air Zoom running shoes for men", "brand": "Nike", "color": "black"},
    {"id": "P02", "title": "Ultraboost running shoe, women", "brand": "Adidas", "color": "white"},
    {"id": "P03", "title": "Merino wool trail running socks", "brand": "Smartwool", "color": None},
    {"id": "P04", "title": "Stainless steel coffee mug 16 oz travel", "brand": "Yeti"},
    {"id": "P05", "title": "Ceramic coffee mug", "brand": None, "color": "blue"},
    {"id": "P06", "title": "USB-C charging cable 6 ft", "brand": "Anker", "color": "black"},
    {"id": "P07", "title": "Wireless phone charger pad", "brand": "Anker", "color": "white"},
    {"id": "P08", "title": "Leather phone case for iPhone 13", "brand": "Otterbox"},
    {"id": "P09", "title": "Yoga mat, non slip, extra thick", "brand": "Gaiam", "color": "purple"},
    {"id": "P10", "title": "Women's running shorts with pockets", "brand": "Nike", "color": "red"},
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("catalogue") / "engine"
    return SearchEngine.build(CATALOGUE, directory, extra_fields=("brand", "color"))


def ids(hits):
    return [product_id for product_id, _ in hits]


# ----------------------------------------------------------------------------------------- ranking


def test_ranks_the_expected_products(engine):
    # Both mugs match both words; the shorter title ranks first (BM25 length normalisation).
    assert ids(engine.search("coffee mug", 10)) == ["P05", "P04"]
    # Stemming: "mugs" finds "mug", "shoe" finds "shoes".
    assert ids(engine.search("mugs", 10)) == ["P05", "P04"]
    assert set(ids(engine.search("shoe", 10))) == {"P01", "P02"}
    # Extra fields are searched too.
    assert set(ids(engine.search("anker", 10))) == {"P06", "P07"}
    assert ids(engine.search("purple", 10)) == ["P09"]


def test_boolean_syntax(engine):
    assert set(ids(engine.search("(nike OR adidas) AND shoes", 10))) == {"P01", "P02"}
    assert set(ids(engine.search("running AND NOT shoes", 10))) == {"P03", "P10"}
    assert ids(engine.search("running -shoes -socks", 10)) == ["P10"]
    assert ids(engine.search("brand:anker AND cable", 10)) == ["P06"]
    assert ids(engine.search('"phone case"', 10)) == ["P08"]
    assert ids(engine.search("(women's OR ladies) AND shorts", 10)) == ["P10"]


def test_top_k_is_a_prefix_of_the_full_ranking(engine):
    full = engine.search("running shoes nike", 10)
    assert len(full) == 4
    assert engine.search("running shoes nike", 2) == full[:2]
    assert [score for _, score in full] == sorted((score for _, score in full), reverse=True)


def test_bm25_scores_match_the_formula(tmp_path):
    """Title-only index, no stemming: scores equal BM25 (k1 = 1.2, b = 0.75) computed by hand."""
    titles = {pid: product["title"] for pid, product in ((p["id"], p) for p in CATALOGUE)}
    products = [{"id": pid, "title": title} for pid, title in titles.items()]
    engine = SearchEngine.build(products, tmp_path / "plain", tokenizer="default")
    tokens = {pid: re.findall(r"[a-z0-9]+", title.lower()) for pid, title in titles.items()}
    avgdl = sum(map(len, tokens.values())) / len(tokens)

    def bm25(terms, pid):
        score = 0.0
        for term in terms:
            df = sum(term in doc for doc in tokens.values())
            tf = Counter(tokens[pid])[term]
            idf = math.log(1 + (len(tokens) - df + 0.5) / (df + 0.5))
            score += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(tokens[pid]) / avgdl))
        return score

    for query in ("running shoes", "coffee mug", "phone", "women running"):
        hits = engine.search(query, 10)
        assert hits, query
        for pid, score in hits:
            assert score == pytest.approx(bm25(query.split(), pid), rel=1e-5), (query, pid)


def test_search_batch_equals_single_searches(engine):
    queries = ["coffee mug", "shoe", "coffee mug", "", "(nike OR adidas) AND shoes"]
    batch = engine.search_batch(queries, 3)
    assert batch == [engine.search(query, 3) for query in queries]
    batch[0].append(("X", 0.0))  # answers to repeated queries are separate lists
    assert batch[2] == engine.search("coffee mug", 3)
    assert isinstance(engine, Retriever)


def test_k_must_be_positive(engine):
    with pytest.raises(ValueError, match="k must be >= 1"):
        engine.search("mug", 0)


# ----------------------------------------------------------------------------------------- persistence


def test_reopens_from_disk(engine, tmp_path):
    directory = tmp_path / "engine"
    built = SearchEngine.build(CATALOGUE, directory, extra_fields=("brand", "color"))
    reopened = SearchEngine.open(directory)
    assert len(reopened) == len(CATALOGUE) and reopened.text_fields == ("title", "brand", "color")
    for query in ("coffee mug", "brand:anker AND cable", "running"):
        assert reopened.search(query, 5) == built.search(query, 5) == engine.search(query, 5)
    assert json.loads((directory / "engine.json").read_text())["product_ids"][:2] == ["P01", "P02"]


def test_rebuild_needs_overwrite_and_replaces(tmp_path):
    directory = tmp_path / "engine"
    SearchEngine.build(CATALOGUE, directory)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        SearchEngine.build(CATALOGUE, directory)
    rebuilt = SearchEngine.build([{"id": "Z1", "title": "coffee grinder"}], directory, overwrite=True)
    assert ids(rebuilt.search("coffee", 5)) == ["Z1"]
    assert ids(SearchEngine.open(directory).search("coffee", 5)) == ["Z1"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["engine"]  # no staging left behind


def test_refuses_to_replace_a_directory_that_is_not_an_index(tmp_path):
    (tmp_path / "workdir").mkdir()
    (tmp_path / "workdir" / "checkpoint").write_text("precious")
    with pytest.raises(FileExistsError, match="not a search index"):
        SearchEngine.build(CATALOGUE, tmp_path / "workdir", overwrite=True)
    with pytest.raises(FileNotFoundError, match="engine.json"):
        SearchEngine.open(tmp_path / "workdir")


@pytest.mark.parametrize(
    "products, message",
    [
        ([{"title": "mug"}], "row 0, field 'id'"),
        ([{"id": "", "title": "mug"}], "row 0, field 'id'"),
        ([{"id": "A", "title": "mug"}, {"id": "B", "title": None}], "row 1, field 'title'"),
        (
            [{"id": "A", "title": "mug"}, {"id": "A", "title": "cup"}],
            "row 1, field 'id': 'A' repeats row 0",
        ),
        ([{"id": "A", "title": "mug", "brand": ["x"]}], "row 0, field 'brand'"),
        (["A mug"], "row 0: expected a mapping"),
    ],
)
def test_bad_products_name_row_and_field(tmp_path, products, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SearchEngine.build(products, tmp_path / "engine", extra_fields=("brand",))
    assert list(tmp_path.iterdir()) == []  # the failed build left nothing


def test_bad_build_options(tmp_path):
    with pytest.raises(ValueError, match="extra field name 'brand name'"):
        SearchEngine.build(CATALOGUE, tmp_path / "a", extra_fields=("brand name",))
    with pytest.raises(ValueError, match="repeat"):
        SearchEngine.build(CATALOGUE, tmp_path / "b", extra_fields=("title",))
    with pytest.raises(ValueError, match="tokenizer 'porter'"):
        SearchEngine.build(CATALOGUE, tmp_path / "c", tokenizer="porter")


# ----------------------------------------------------------------------------------------- hostile queries


@pytest.mark.parametrize(
    "query, expected",
    [
        ("", []),
        ("   \t\n", []),
        ("AND OR", []),
        ("NOT", []),
        ("(coffee mug", ["P05", "P04"]),
        ("coffee mug)", ["P05", "P04"]),
        ('"coffee mug', ["P05", "P04"]),
        ("coffee AND", ["P05", "P04"]),
        ("foo:mug", ["P05", "P04"]),  # unknown field: its value is still searched
        ("price:[1 TO 5] AND mug", ["P05", "P04"]),
        ("title:*", []),  # "title" as a plain word matches nothing here
        ("_row:[0 TO 100]", []),  # the internal column cannot be queried
        ("id:P01", []),
        ("x" * 10_000, []),
        ("!!! ??? ::: \\ ^ ~ *?", []),
        ("☕😀 coffee mug", ["P05", "P04"]),
        ("咖啡杯", []),
    ],
)
def test_malformed_queries_never_crash(engine, query, expected):
    assert ids(engine.search(query, 10)) == expected


def test_long_query_is_searched(engine):
    query = " ".join(["mug"] * 2500)  # 10k characters
    assert len(query) >= 9_999 and ids(engine.search(query, 10)) == ["P05", "P04"]


def test_well_formedness(engine):
    for query in ("(a OR b) AND c", "a AND NOT b", "women's shoes", "brand:anker", "brand:X AND model:Y"):
        assert engine.is_well_formed(query), query
    for query in ("", "(a OR b", "AND OR", "price:[1 TO 5]", '"unclosed', "-"):
        assert not engine.is_well_formed(query), query


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_a_safe_query(engine, query):
    hits = engine.search(query, 3)
    assert len(hits) <= 3
    assert all(pid in {p["id"] for p in CATALOGUE} and math.isfinite(score) for pid, score in hits)


# ----------------------------------------------------------------------------------------- metrics


def test_recall_at_k_hand_worked():
    retrieved = ["a", "b", "c", "d"]
    assert recall_at_k(retrieved, ["b", "d", "x"], 2) == pytest.approx(1 / 3)
    assert recall_at_k(retrieved, ["b", "d", "x", "d"], 4) == pytest.approx(2 / 3)  # duplicates count once
    assert recall_at_k(retrieved, ["a"], 10) == 1.0
    assert recall_at_k([], ["a"], 10) == 0.0
    assert recall_at_k(retrieved, [], 10) is None


def test_ndcg_at_k_hand_worked():
    gains = {"a": 1.0, "b": 0.0, "c": 3.0, "d": 2.0}
    # DCG = 1/log2(2) + 0/log2(3) + 3/log2(4) = 2.5; ideal = 3 + 2/log2(3) + 1/2.
    assert ndcg_at_k(["a", "b", "c"], gains, 3) == pytest.approx(2.5 / (3.5 + 2 / math.log2(3)))
    assert ndcg_at_k(["a", "b", "c"], gains, 1) == pytest.approx(1 / 3)
    assert ndcg_at_k(["c", "d", "a", "b"], gains, 4) == pytest.approx(1.0)
    # A repeated product gains only at its first rank: (3 + 0 + 2/2) / (3 + 2/log2(3)).
    assert ndcg_at_k(["c", "c", "d"], {"c": 3.0, "d": 2.0}, 3) == pytest.approx(4 / (3 + 2 / math.log2(3)))
    assert ndcg_at_k(["x", "y"], gains, 2) == 0.0
    assert ndcg_at_k(["a"], {"a": 0.0}, 5) is None
    assert ndcg_at_k(["a"], {}, 5) is None


def test_metric_arguments_are_checked():
    with pytest.raises(ValueError, match="'a'"):
        ndcg_at_k(["a"], {"a": -1.0}, 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at_k(["a"], ["a"], 0)


# ----------------------------------------------------------------------------------------- real ESCI rows


def test_real_esci_queries_find_their_exact_products(shared_data, tmp_path):
    """The graded ESCI subset as a catalogue: BM25 on the raw query finds most Exact products."""
    subset = json.loads((shared_data / "esci-graded-subset" / "esci_subset.json").read_text())
    titles = {p["product_id"]: p["product_text"] for query in subset for p in query["products"]}
    products = [{"id": pid, "title": title} for pid, title in titles.items()]
    engine = SearchEngine.build(products, tmp_path / "esci")
    recalls, ndcgs = [], []
    results = engine.search_batch([query["query"] for query in subset], 10)
    for query, hits in zip(subset, results):
        exact = [p["product_id"] for p in query["products"] if p["relevance"] == 3]
        recalls.append(recall_at_k(ids(hits), exact, 10))
        ndcgs.append(ndcg_at_k(ids(hits), {p["product_id"]: p["relevance"] for p in query["products"]}, 10))
    recalls = [r for r in recalls if r is not None]
    ndcgs = [n for n in ndcgs if n is not None]
    # 800 candidates and 1-40 judged products per query: a random top 10 would score about 0.01.
    assert len(recalls) > 90 and sum(recalls) / len(recalls) > 0.5
    assert len(ndcgs) > 150 and sum(ndcgs) / len(ndcgs) > 0.5
