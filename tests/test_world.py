"""The synthetic world: determinism, label mix, the label rule, splits, teacher corruption, rewriting data."""

import collections
import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from graphgrpo_jax.data import world as W
from graphgrpo_jax.data.cot import LABELS, REWRITE_TAGS, parse, render

MICRO = W.WorldConfig(products_per_type=16, num_queries=160, pairs_per_query=4, tags_per_query=3,
                      corrupt_cot_share=0.3, corrupt_propagate_share=0.5)
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    return W.build_world(MICRO)


@pytest.fixture(scope="module")
def plain_world():
    """Every facet colloquial, no typos: the lexical gap and the ood forms are checkable word by word."""
    return W.build_world(W.WorldConfig(products_per_type=8, num_queries=200, synonym_rate=1.0, typo_rate=0.0,
                                       seed=5))


# ------------------------------------------------------------------------------------------------
# Independent re-implementations of the documented rules
# ------------------------------------------------------------------------------------------------

def reference_subject_match(types: dict, query_subject: str, product_subject: str) -> str:
    """From group membership and accessory links, not from the substitutes/complements lists."""
    if query_subject == product_subject:
        return "match"
    if types[query_subject]["group"] == types[product_subject]["group"]:
        return "partial"
    if (product_subject in types[query_subject]["accessory_of"]
            or query_subject in types[product_subject]["accessory_of"]):
        return "complement"
    return "mismatch"


def reference_attribute_match(query_attributes: dict, product_attributes: dict) -> str:
    hits = [product_attributes.get(key) == value for key, value in query_attributes.items()]
    if all(hits):
        return "match"
    return "partial" if any(hits) else "mismatch"


def reference_label(ms: str, ma: str) -> str:
    if ms == "match":
        return "Exact" if ma == "match" else "Substitute"
    return {"partial": "Substitute", "complement": "Complement", "mismatch": "Irrelevant"}[ms]


def attribute_text(attributes: dict) -> str:
    return "; ".join(f"{key}={attributes[key]}" for key in sorted(attributes)) or "none"


def type_table(world):
    return {t["name"]: t for t in world.to_dict()["product_types"]}


# ------------------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_world_in_another_process(world):
    again = W.build_world(MICRO).to_json()
    assert again == world.to_json()
    digest = hashlib.sha256(again.encode()).hexdigest()
    script = ("import hashlib; from graphgrpo_jax.data import world as W; "
              "cfg = W.WorldConfig(products_per_type=16, num_queries=160, pairs_per_query=4, tags_per_query=3, "
              "corrupt_cot_share=0.3, corrupt_propagate_share=0.5); "
              "print(hashlib.sha256(W.build_world(cfg).to_json().encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # string hashing differs; the world must not
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == digest
    assert W.build_world(W.WorldConfig(**{**vars(MICRO), "seed": 1})).to_json() != again


def test_sizes_and_splits(world):
    counts = collections.Counter(q.split for q in world.queries)
    assert counts == {"train": 120, "test": 24, "ood": 16}  # 160 queries, 15% test, 10% ood
    assert len(world.products) == 16 * W.MAX_PRODUCT_TYPES
    assert len(world.pairs) == 4 * 160
    assert len({p.pair_id for p in world.pairs}) == len(world.pairs)


def test_label_counts_follow_the_mix(world):
    mix = dict(zip(LABELS, MICRO.label_mix))
    for split in W.SPLITS:
        pairs = world.split_pairs(split)
        counts = collections.Counter(pair.label for pair in pairs)
        for label in LABELS:
            assert abs(counts[label] - mix[label] * len(pairs)) <= max(2, 0.05 * len(pairs)), (split, counts)
    other_mix = W.build_world(W.WorldConfig(**{**vars(MICRO), "label_mix": (0.1, 0.1, 0.4, 0.4)}))
    counts = collections.Counter(pair.label for pair in other_mix.split_pairs("train"))
    assert counts == {"Exact": 48, "Substitute": 48, "Complement": 192, "Irrelevant": 192}


def test_every_gold_node_and_label_follows_the_documented_rule(world):
    types = type_table(world)
    for pair in world.pairs:
        query = world.query_by_id[pair.query_id]
        product = world.product_by_id[pair.product_id]
        facets = {key: product.attributes[key] for key in query.attributes if key in product.attributes}
        ms = reference_subject_match(types, query.subject, product.product_type)
        ma = reference_attribute_match(query.attributes, product.attributes)
        assert pair.gold == {"qs": query.subject, "qa": attribute_text(query.attributes),
                             "ps": product.product_type, "pa": attribute_text(facets),
                             "ms": ms, "ma": ma, "y": reference_label(ms, ma)}
        assert pair.label == pair.gold["y"]
        assert (pair.query, pair.product_title) == (query.text, product.title)
    # Every cell of the rule is exercised.
    assert {(p.gold["ms"], p.gold["ma"]) for p in world.pairs} >= {
        ("match", "match"), ("match", "partial"), ("match", "mismatch"), ("partial", "match"),
        ("complement", "mismatch"), ("mismatch", "mismatch"), ("mismatch", "partial")}


def test_titles_show_the_product_type_and_attributes(world):
    for product in world.products:
        words = W.word_tokens(product.title)
        for phrase in (product.product_type, *product.attributes.values()):
            assert " ".join(W.word_tokens(phrase)) in " ".join(words), (phrase, product.title)


def test_teacher_corruption(world):
    train = world.split_pairs("train")
    corrupted = [pair for pair in train if pair.corrupted_node]
    assert len(corrupted) == round(0.3 * len(train))
    assert sum(pair.corruption_propagated for pair in corrupted) == round(0.5 * len(corrupted))
    assert not any(pair.corrupted_node for pair in world.pairs if pair.split != "train")
    downstream = {"qs": {"ms", "y"}, "ps": {"ms", "y"}, "qa": {"ma", "y"}, "pa": {"ma", "y"},
                  "ms": {"y"}, "ma": {"y"}, "y": set()}
    for pair in train:
        assert pair.teacher_cot == render(pair.teacher)
        assert parse(pair.teacher_cot).valid
        if not pair.corrupted_node:
            assert pair.teacher == pair.gold
            continue
        node, teacher = pair.corrupted_node, pair.teacher
        assert teacher[node] != pair.gold[node]
        changed = {n for n in pair.gold if teacher[n] != pair.gold[n]}
        if not pair.corruption_propagated:
            assert changed == {node}
            continue
        assert changed <= {node} | downstream[node]
        # Downstream nodes follow the rule from the corrupted readings.
        if node in ("qs", "ps"):
            assert teacher["ms"] == reference_subject_match(type_table(world), teacher["qs"], teacher["ps"])
        if node in ("qa", "pa"):
            qa, pa = W.parse_attributes(teacher["qa"]), W.parse_attributes(teacher["pa"])
            assert teacher["ma"] == ("match" if not qa else reference_attribute_match(qa, pa))
        if node != "y":
            assert teacher["y"] == reference_label(teacher["ms"], teacher["ma"])
    assert {pair.corrupted_node for pair in corrupted} == set(W.NODES)


def test_held_out_intents_products_and_typos(world):
    intent = lambda q: (q.subject, tuple(sorted(q.attributes.items())))  # noqa: E731
    train_intents = {intent(q) for q in world.split_queries("train")}
    test_intents = {intent(q) for q in world.split_queries("test")}
    ood_intents = {intent(q) for q in world.split_queries("ood")}
    assert not train_intents & test_intents and not train_intents & ood_intents
    assert not test_intents & ood_intents
    for pair in world.pairs:
        pool = world.product_by_id[pair.product_id].pool
        assert pool == ("train" if pair.split == "train" else "heldout")
    train_typos = {q.typo for q in world.split_queries("train") if q.typo}
    held_out_typos = {q.typo for q in world.queries if q.typo and q.split != "train"}
    assert train_typos and held_out_typos and not train_typos & held_out_typos
    for query in world.queries:
        if query.typo:
            assert query.typo in query.text.split()


def test_purchases_are_exact_products_of_the_query_pool(world):
    for query in world.queries:
        assert 1 <= len(query.purchased_product_ids) <= MICRO.max_purchases_per_query
        for product_id in query.purchased_product_ids:
            product = world.product_by_id[product_id]
            assert product.product_type == query.subject
            assert all(product.attributes[k] == v for k, v in query.attributes.items())
            assert product.pool == ("train" if query.split == "train" else "heldout")


def test_lexical_gap_queries_miss_titles_rewrites_hit_them(plain_world):
    world = plain_world
    title_words = {word for product in world.products for word in W.word_tokens(product.title)}
    brands = {value for product in world.products for value in [product.attributes["brand"]]}
    for query in world.queries:
        for word in W.word_tokens(query.text):
            assert word not in title_words or word in brands or word.isdigit() or word in W.STOPWORDS, (
                word, query.text)
        # The gold rewrite is in catalogue words: every purchased title contains all of them.
        rewrite_words = set(W.word_tokens(query.gold_rewrite))
        for product_id in query.purchased_product_ids:
            assert rewrite_words <= set(W.word_tokens(world.product_by_id[product_id].title))
        assert world.read_intent(query.gold_rewrite) == (query.subject, query.attributes)


def test_ood_queries_use_forms_never_seen_in_train_or_test(plain_world):
    world = plain_world
    ood_forms, shared_forms = set(), set()
    for ptype in world.product_types:
        terms = [ptype.term] + [term for _, terms in ptype.schema for term in terms]
        for term in terms:
            ood_forms.update(term.ood)
            shared_forms.update(term.synonyms)
    assert not ood_forms & shared_forms

    def has_form(text, forms):
        padded = f" {text} "
        return any(f" {form} " in padded for form in forms)

    ood = world.split_queries("ood")
    assert ood and all(has_form(q.text, ood_forms | {"us"}) for q in ood)
    for query in world.queries:
        if query.split != "ood":
            assert not has_form(query.text, ood_forms - shared_forms), query.text


def test_rewrite_tags_follow_the_rule_and_the_mix(world):
    types = type_table(world)
    for tag in world.rewrite_tags:
        query = world.query_by_id[tag.query_id]
        if (tag.rewrite_subject, tag.rewrite_attributes) == (query.subject, query.attributes):
            expected = "relevant"
        elif types[tag.rewrite_subject]["group"] == types[query.subject]["group"]:
            expected = "partial"
        else:
            expected = "irrelevant"
        assert tag.tag == expected
        assert world.read_intent(tag.rewrite) == (tag.rewrite_subject, tag.rewrite_attributes)
        assert tag.rewrite != query.text
    for split in W.SPLITS:
        tags = world.split_rewrite_tags(split)
        counts = collections.Counter(tag.tag for tag in tags)
        asked = 3 * len(world.split_queries(split))
        assert len(tags) >= 0.95 * asked
        for name in REWRITE_TAGS:
            assert abs(counts[name] - asked / 3) <= max(2, 0.06 * asked), (split, counts)
    per_query = collections.Counter((t.query_id, t.rewrite) for t in world.rewrite_tags)
    assert max(per_query.values()) == 1


def test_read_intent_hand_examples(world):
    assert world.read_intent("strideon red size 9 trail shoes for women") == (
        "trail shoes", {"brand": "strideon", "color": "red", "gender": "women", "size": "9"})
    assert world.read_intent("black running shoes") == ("running shoes", {"color": "black"})
    assert world.read_intent("red runners") is None


def test_small_taxonomy_keeps_relations_inside():
    types = W.build_taxonomy(5)
    names = {t.name for t in types}
    assert [t.name for t in types] == ["running shoes", "trail shoes", "walking shoes", "athletic socks",
                                       "compression socks"]
    for ptype in types:
        assert set(ptype.substitutes) | set(ptype.complements) <= names - {ptype.name}
    assert types[0].complements == ("athletic socks", "compression socks")
    assert types[3].accessory_of == ("running shoes", "trail shoes", "walking shoes")
    small = W.build_world(W.WorldConfig(num_product_types=5, products_per_type=6, num_queries=40,
                                        label_mix=(0.4, 0.3, 0.3, 0.0)))
    assert {p.label for p in small.pairs} == {"Exact", "Substitute", "Complement"}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="typo_rate"):
        W.build_world(W.WorldConfig(typo_rate=1.5))
    with pytest.raises(ValueError, match="label_mix"):
        W.build_world(W.WorldConfig(label_mix=(1.0, 0.0)))
    with pytest.raises(ValueError, match="num_product_types"):
        W.build_world(W.WorldConfig(num_product_types=1))
    with pytest.raises(ValueError, match="unknown WorldConfig fields"):
        W.WorldConfig.from_mapping({"seeds": 1})
    cfg = W.WorldConfig.from_mapping({"seed": 3, "label_mix": [1, 1, 1, 1]})
    assert cfg.label_mix == (1, 1, 1, 1) and hash(cfg)


def test_colloquial_vocabulary_is_disjoint_from_catalogue_words():
    """Word by word: ood forms are new to train/test, and no colloquial word is a catalogue word."""
    catalogue, shared, ood = set(), set(), set()
    for ptype in W.build_taxonomy():
        for term in [ptype.term] + [term for _, terms in ptype.schema for term in terms]:
            catalogue.update(W.word_tokens(term.canonical))
            shared.update(w for form in term.synonyms for w in W.word_tokens(form))
            ood.update(w for form in term.ood for w in W.word_tokens(form))
    words = lambda forms: {w for w in forms if not w.isdigit()}  # noqa: E731  numbers are shared
    assert not words(shared) & catalogue
    assert not words(ood) & catalogue
    assert not words(ood) & words(shared)
