"""A seeded synthetic e-commerce world: catalogue, queries, judged pairs, teacher CoT, rewriting data.

Why synthetic: every reasoning node has a known gold value, so graph credit can be checked against the
truth, and a tiny model trained from scratch on a CPU sees a complete, honest task in minutes.

The world, from the bottom up:
- *Taxonomy*: product types (the subject) in substitute groups (trail shoes ~ running shoes); a group can
  be an accessory of another (phone case -> smartphone), which makes the two groups complements, in both
  directions. Each group has an attribute schema (brand, color, size, material, gender, capacity, ...).
- *Catalogue*: products with random attribute values and titles rendered from templates, marketing
  words and model numbers. Titles use only catalogue words (the canonical type names and values).
- *Queries*: an intent (a subject plus 0-3 of a product's attributes) rendered with colloquial synonyms,
  abbreviations, fillers, typos and varied word order. Colloquial forms never occur in titles, so a
  keyword search misses what a rewrite into catalogue words (`gold_rewrite`) finds.
- *Splits*: products are divided into a training pool and a held-out pool; `test` and `ood` queries
  come from held-out products, have intents never used in `train`, and never repeat a misspelling seen
  in `train`. `test` shares the training synonym vocabulary (a model trained from scratch cannot know a
  word it never saw); `ood` uses surface forms reserved for it, reported on its own.
- *Relevance pairs*: per query, products drawn per label with a configured mix. The gold node values
  follow from the query intent and the product; the label follows from them by `DEFAULT_LABEL_RULE`:
  ms = match (same type) | partial (substitute type) | complement (accessory relation) | mismatch;
  ma over the query's attributes = match (all satisfied, or none asked) | partial (some) | mismatch (none);
  pa lists the product's values for the facets the query asks about.
- *Teacher chains of thought* for SFT: a configured share of training targets has one corrupted node,
  with or without its downstream consequences (ms from qs/ps, ma from qa/pa, y from ms/ma), so SFT is
  imperfect and RL has something to fix.
- *Rewriting data*: gold rewrites, query-rewrite relevance tags with generated negatives (rule in
  `rewrite_tag`), and a behaviour log of purchased products per query.

Everything is drawn from `numpy` generators seeded by `(seed, stream)` and iterated in a fixed order, so a
seed gives byte-identical JSON (`World.to_json`) in any process.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from graphgrpo_jax.data.cot import (  # re-exported: the world is the reference user of the schema
    DEFAULT_LABEL_RULE,
    LABELS,
    MA_VALUES,
    MS_VALUES,
    NODES,
    REWRITE_TAGS,
    apply_label_rule,
    format_attributes,
    parse_attributes,
    render,
)

__all__ = [
    "DEFAULT_LABEL_RULE", "LABELS", "MA_VALUES", "MS_VALUES", "NODES", "REWRITE_TAGS", "SPLITS",
    "Term", "ProductType", "Product", "Query", "RelevancePair", "RewriteTag", "World", "WorldConfig",
    "apply_label_rule", "attribute_match", "build_taxonomy", "build_world", "subject_match",
    "rewrite_tag", "render_rewrite", "word_tokens", "RELEVANCE_GRADES", "relevance_grade", "keeps_intent",
    "true_tag",
]

SPLITS: tuple[str, ...] = ("train", "test", "ood")
TRAIN_POOL, HELDOUT_POOL = "train", "heldout"


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Term:
    """A catalogue word with its colloquial forms: `synonyms` for train/test, `ood` for the ood split."""

    canonical: str
    synonyms: tuple[str, ...] = ()
    ood: tuple[str, ...] = ()


def _terms(spec: str) -> tuple[Term, ...]:
    """Parse lines `canonical: synonym, synonym | ood form, ood form` (the forms are optional)."""

    def forms(text: str) -> tuple[str, ...]:
        return tuple(form.strip() for form in text.split(",") if form.strip())

    terms = []
    for line in spec.strip().splitlines():
        canonical, _, rest = line.partition(":")
        in_distribution, _, ood = rest.partition("|")
        terms.append(Term(canonical.strip(), forms(in_distribution), forms(ood)))
    return tuple(terms)


def _by_name(*groups: tuple[Term, ...]) -> dict[str, Term]:
    return {term.canonical: term for group in groups for term in group}


_COLORS = _by_name(_terms("""
black: blk, jet | onyx
white: wht, ivory | snowy
red: rd, crimson | scarlet
blue: blu, azure | cobalt
grey: gray, gry | ashen
green: grn, olive | emerald
"""))
_MATERIALS = _by_name(_terms("""
foam: squishy, cushy | spongy
gel: jelly, gelly | gooey
cork: crk, bark | woody
silicone: silicon, rubbery | gummy
leather: lthr, hide | cowhide
plastic: poly, acrylic | resin
nylon: nyl, nylo | parachute fabric
canvas: cnvs, duck cloth | sailcloth
stainless steel: inox, ss | brushed metal
glass: pyrex, see through | crystal
paper: papr, disposable | pulp
mesh: netting, wire | lattice
bamboo: bmboo, cane | timber
cast iron: castiron, ci | wrought
nonstick: non stick, teflon | slick coat
down: feather, goose fill | plumage
synthetic: polyfill, synth | manmade stuffing
ceramic: ceramik, porcelain | stoneware
"""))


def _pick_terms(table: Mapping[str, Term], names: str) -> tuple[Term, ...]:
    return tuple(table[name.strip()] for name in names.split(","))


_BRANDS = {
    "footwear": _terms("strideon\npacewell\ntrekmark\nfleetfoot\nsoleria"),
    "phone": _terms("novaline\npixelon\nzentel\norbix"),
    "accessory": _terms("guardly\nvoltix\narmorix\nchargio"),
    "computer": _terms("compuvo\nlumatek\nbytera\nquillion"),
    "bag": _terms("satchelle\nruckwell\nbaggio\ntoteva"),
    "kitchen": _terms("brewsmith\nculinova\npanora\nkitchio"),
    "outdoor": _terms("summitra\ncampwell\nwildora\npeakline"),
    "pet": _terms("pawsome\nbarkley\nhoundly\nfurrow"),
}
_COLOR = tuple(_COLORS.values())
_GENDER = _terms("""
men: mens, guys | gents
women: womens, ladies | gals
kids: childrens, youth | tots
""")
_APPAREL_SIZE = _terms("""
small: sm, petite | tiny
medium: med, mid | midsize
large: lg, lrg | roomy
""")
_SHOE_SIZE = _terms("7\n8\n9\n10\n11\n12")
_STORAGE = _terms("""
64gb: 64 gig, 64g | 64 gigs
128gb: 128 gig, 128g | 128 gigs
256gb: 256 gig, 256g | 256 gigs
512gb: 512 gig, 512g | 512 gigs
""")
_POWER = _terms("""
20w: 20 watt, 20watt | 20 watts
45w: 45 watt, 45watt | 45 watts
65w: 65 watt, 65watt | 65 watts
""")
_TENT_SIZE = _terms("""
2 person: 2p, two man | duo
4 person: 4p, four man | quad
6 person: 6p, six man | sextet
""")
_WEIGHT = _terms("""
5 lb: 5 pound, 5lbs | 5 pounder
15 lb: 15 pound, 15lbs | 15 pounder
30 lb: 30 pound, 30lbs | 30 pounder
""")
_FLAVOR = _terms("""
chicken: chkn, poultry | fowl
beef: bf, steak | cow
salmon: slmn, fishy | seafood
lamb: lmb, mutton | sheep
""")
# A bare number needs a cue word in a query ("sz 9"); in titles and rewrites it is "size 9".
_SIZE_CUE = Term("size", ("sz",), ("us",))
# Query fillers (train/test, ood); titles never use them.
_FILLERS = ("cheap", "best", "buy", "affordable", "deal")
_OOD_FILLERS = ("gimme", "wanna get", "hunting")
_MARKETING = ("premium", "lightweight", "durable", "ultra", "pro", "classic", "deluxe", "essential",
              "signature", "advanced", "compact", "elite", "new")
_TITLE_TEMPLATES = (
    "{brand} {subject} {model}, {attributes}, {marketing}",
    "{marketing} {subject} by {brand} - {attributes} ({model})",
    "{brand} {model} {marketing} {subject} | {attributes}",
    "{brand} {subject} {attributes} - {marketing} {model}",
)
# Words that carry no facet; ignored when measuring the lexical gap.
STOPWORDS = frozenset({"for", "with", "by", "and", "the", "a", "in", "of"})


@dataclasses.dataclass(frozen=True)
class _Group:
    """Product types that substitute for each other, with one attribute schema."""

    name: str
    types: tuple[Term, ...]
    schema: tuple[tuple[str, tuple[Term, ...]], ...]
    accessory_of: tuple[str, ...] = ()


_GROUPS: tuple[_Group, ...] = (
    _Group("shoes", _terms("""
running shoes: runners, jogging kicks | road trainers
trail shoes: dirt kicks, hiking sneaks | mountain trainers
walking shoes: walkers, strolling kicks | everyday trainers
"""), (("brand", _BRANDS["footwear"]), ("color", _COLOR), ("gender", _GENDER), ("size", _SHOE_SIZE))),
    _Group("socks", _terms("""
athletic socks: sport sox, ankle sox | footies
compression socks: squeeze sox, support sox | tight hosiery
"""), (("brand", _BRANDS["footwear"]), ("color", _COLOR), ("gender", _GENDER), ("size", _APPAREL_SIZE)),
        accessory_of=("shoes",)),
    _Group("insoles", _terms("""
shoe insoles: inserts, footbeds | sole cushions
arch supports: orthotics, foot orthos | podiatry wedges
"""), (("brand", _BRANDS["footwear"]), ("material", _pick_terms(_MATERIALS, "foam, gel, cork")),
       ("size", _SHOE_SIZE)), accessory_of=("shoes",)),
    _Group("phones", _terms("""
smartphone: cell, mobile | handset
flip phone: clamshell, folding cell | senior dialer
"""), (("brand", _BRANDS["phone"]), ("capacity", _STORAGE), ("color", _COLOR))),
    _Group("phone cases", _terms("""
phone case: cover, skin | shell
phone wallet: folio, card cover | billfold
"""), (("brand", _BRANDS["accessory"]), ("color", _COLOR),
       ("material", _pick_terms(_MATERIALS, "silicone, leather, plastic"))), accessory_of=("phones",)),
    _Group("chargers", _terms("""
phone charger: charging brick, wall plug | juicer
power bank: battery pack, portable juice | recharge pod
"""), (("brand", _BRANDS["accessory"]), ("color", _COLOR), ("power", _POWER)), accessory_of=("phones",)),
    _Group("computers", _terms("""
laptop: notebook, lappy | travel pc
chromebook: chrome book, cbook | school netbook
tablet: tab, slate | e-reader
"""), (("brand", _BRANDS["computer"]), ("capacity", _STORAGE), ("color", _COLOR))),
    _Group("laptop bags", _terms("""
laptop bag: messenger, computer satchel | attache
laptop sleeve: computer pouch, zip pouch | padded envelope
"""), (("brand", _BRANDS["bag"]), ("color", _COLOR),
       ("material", _pick_terms(_MATERIALS, "nylon, leather, canvas"))), accessory_of=("computers",)),
    _Group("pointing devices", _terms("""
wireless mouse: cordless clicker, bt clicker | rodent
trackball: roller ball, thumb roller | orb pointer
"""), (("brand", _BRANDS["computer"]), ("color", _COLOR)), accessory_of=("computers",)),
    _Group("coffee machines", _terms("""
coffee maker: drip pot, brewer | joe dripper
espresso machine: barista rig, cappuccino rig | crema station
"""), (("brand", _BRANDS["kitchen"]), ("color", _COLOR),
       ("material", _pick_terms(_MATERIALS, "stainless steel, glass, plastic")))),
    _Group("coffee filters", _terms("""
coffee filters: drip papers, brew papers | percolator liners
reusable filter: permanent basket, gold basket | eco sieve
"""), (("brand", _BRANDS["kitchen"]), ("material", _pick_terms(_MATERIALS, "paper, mesh, bamboo"))),
        accessory_of=("coffee machines",)),
    _Group("pans", _terms("""
frying pan: skillet, fry skillet | sauteuse
wok: stirfryer, asian skillet | kadai
saucepan: pot, sauce pot | simmerer
"""), (("brand", _BRANDS["kitchen"]), ("color", _COLOR),
       ("material", _pick_terms(_MATERIALS, "cast iron, nonstick, stainless steel")))),
    _Group("utensils", _terms("""
spatula: turner, pancake flipper | fish slice
cooking tongs: grabbers, grill grabbers | pincers
"""), (("brand", _BRANDS["kitchen"]), ("color", _COLOR),
       ("material", _pick_terms(_MATERIALS, "silicone, bamboo, stainless steel"))), accessory_of=("pans",)),
    _Group("tents", _terms("""
camping tent: campsite shelter, family shelter | bivouac
backpacking tent: ultralight shelter, trek shelter | bivy
"""), (("brand", _BRANDS["outdoor"]), ("capacity", _TENT_SIZE), ("color", _COLOR))),
    _Group("sleeping gear", _terms("""
sleeping bag: sleep sack, bedroll | slumber cocoon
sleeping pad: sleep mat, roll mat | ground cushion
"""), (("brand", _BRANDS["outdoor"]), ("color", _COLOR),
       ("material", _pick_terms(_MATERIALS, "down, synthetic"))), accessory_of=("tents",)),
    _Group("camp lights", _terms("""
camping lantern: camp lamp, camp light | glow beacon
headlamp: head torch, forehead light | spelunker beam
"""), (("brand", _BRANDS["outdoor"]), ("color", _COLOR)), accessory_of=("tents",)),
    _Group("dog food", _terms("""
dry dog food: kibble, crunchy chow | pooch pellets
wet dog food: canned chow, pup stew | pooch pate
"""), (("brand", _BRANDS["pet"]), ("flavor", _FLAVOR), ("weight", _WEIGHT))),
    _Group("dog bowls", _terms("""
dog bowl: pup dish, feeding dish | pooch platter
slow feeder: puzzle dish, anti gulp dish | maze platter
"""), (("brand", _BRANDS["pet"]), ("color", _COLOR),
       ("material", _pick_terms(_MATERIALS, "stainless steel, plastic, ceramic"))), accessory_of=("dog food",)),
)

MAX_PRODUCT_TYPES = sum(len(group.types) for group in _GROUPS)


@dataclasses.dataclass(frozen=True)
class ProductType:
    """A subject: its name (catalogue words), colloquial forms, attribute schema and relations."""

    term: Term
    group: str
    schema: tuple[tuple[str, tuple[Term, ...]], ...]
    substitutes: tuple[str, ...]
    complements: tuple[str, ...]
    accessory_of: tuple[str, ...]  # the types this one is an accessory for (titles may mention them)

    @property
    def name(self) -> str:
        return self.term.canonical

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.schema)

    def values(self, key: str) -> tuple[Term, ...]:
        return dict(self.schema)[key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "group": self.group,
            "attributes": {key: [term.canonical for term in terms] for key, terms in self.schema},
            "substitutes": list(self.substitutes), "complements": list(self.complements),
            "accessory_of": list(self.accessory_of),
        }


def build_taxonomy(num_product_types: int | None = None) -> tuple[ProductType, ...]:
    """The first `num_product_types` types in catalogue order, relations restricted to those kept."""
    count = MAX_PRODUCT_TYPES if num_product_types is None else num_product_types
    if not 2 <= count <= MAX_PRODUCT_TYPES:
        raise ValueError(f"num_product_types must be in [2, {MAX_PRODUCT_TYPES}], got {count}")
    kept = [(group, term) for group in _GROUPS for term in group.types][:count]
    kept_names = {term.canonical for _, term in kept}
    groups = {group.name: group for group in _GROUPS}
    accessory_groups = {group.name: set(group.accessory_of) for group in _GROUPS}

    def names_in(group_names: Iterable[str], exclude: str) -> tuple[str, ...]:
        return tuple(term.canonical for name in sorted(group_names) for term in groups[name].types
                     if term.canonical in kept_names and term.canonical != exclude)

    types = []
    for group, term in kept:
        complement_groups = accessory_groups[group.name] | {
            other for other, mains in accessory_groups.items() if group.name in mains}
        types.append(ProductType(
            term=term, group=group.name, schema=group.schema,
            substitutes=names_in([group.name], exclude=term.canonical),
            complements=names_in(complement_groups, exclude=term.canonical),
            accessory_of=names_in(group.accessory_of, exclude=term.canonical)))
    return tuple(types)


# --------------------------------------------------------------------------------------------------
# Rules (the documented semantics; tests re-implement them independently)
# --------------------------------------------------------------------------------------------------

def subject_match(types: Mapping[str, ProductType], query_subject: str, product_subject: str) -> str:
    """ms: `match` same type, `partial` substitute type, `complement` accessory relation, else `mismatch`."""
    if query_subject == product_subject:
        return "match"
    query_type = types.get(query_subject)
    if query_type is None:
        return "mismatch"
    if product_subject in query_type.substitutes:
        return "partial"
    if product_subject in query_type.complements:
        return "complement"
    return "mismatch"


def attribute_match(query_attributes: Mapping[str, str], product_attributes: Mapping[str, str]) -> str:
    """ma: `match` when every query attribute is satisfied (or none is asked), `partial` some, else `mismatch`."""
    if not query_attributes:
        return "match"
    satisfied = sum(product_attributes.get(key) == value for key, value in query_attributes.items())
    if satisfied == len(query_attributes):
        return "match"
    return "partial" if satisfied else "mismatch"


def rewrite_tag(types: Mapping[str, ProductType], query_subject: str, query_attributes: Mapping[str, str],
                rewrite_subject: str, rewrite_attributes: Mapping[str, str]) -> str:
    """`relevant`: the rewrite keeps the intent exactly; `partial`: same or substitute subject but a facet
    dropped, added or changed; `irrelevant`: a complement or unrelated subject."""
    if query_subject == rewrite_subject and dict(query_attributes) == dict(rewrite_attributes):
        return "relevant"
    if subject_match(types, query_subject, rewrite_subject) in ("match", "partial"):
        return "partial"
    return "irrelevant"


def render_rewrite(subject: str, attributes: Mapping[str, str], order: Sequence[str] | None = None,
                   subject_first: bool = False) -> str:
    """A rewrite in catalogue words: attribute values (sorted by key unless `order`) then the subject."""
    keys = sorted(attributes) if order is None else list(order)
    words = [_catalogue_phrase(key, attributes[key]) for key in keys]
    return " ".join([subject, *words] if subject_first else [*words, subject])


def word_tokens(text: str) -> list[str]:
    """Lowercased alphanumeric runs: what a Lucene-style keyword engine indexes."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _catalogue_phrase(key: str, value: str) -> str:
    return f"size {value}" if key == "size" and value.isdigit() else value


def _title_phrase(key: str, value: str) -> str:
    if key == "gender":
        return f"for {value}"
    if key == "flavor":
        return f"{value} flavor"
    return _catalogue_phrase(key, value)


# --------------------------------------------------------------------------------------------------
# Config and records
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Size and difficulty knobs of the world; every field is JSON-serialisable."""

    seed: int = 0
    # Size.
    num_product_types: int | None = None  # None: all types of the built-in taxonomy
    products_per_type: int = 32
    num_queries: int = 1000
    pairs_per_query: int = 4
    tags_per_query: int = 3
    max_purchases_per_query: int = 2
    # Label mix of the relevance pairs, in `LABELS` order, and of the rewrite tags, in `REWRITE_TAGS` order.
    label_mix: tuple[float, ...] = (0.4, 0.25, 0.15, 0.2)
    tag_mix: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    # Difficulty.
    attribute_count_weights: tuple[float, ...] = (0.2, 0.35, 0.3, 0.15)  # P(0..3 query attributes)
    synonym_rate: float = 0.8  # chance a facet is written colloquially rather than in catalogue words
    typo_rate: float = 0.15  # chance a query has one misspelt word
    filler_rate: float = 0.2  # chance a query carries a filler word ("cheap", "best")
    hard_negative_rate: float = 0.5  # chance an Irrelevant product shares a value with the query
    substitute_same_type_share: float = 0.5  # Substitutes that are the right type with a wrong attribute
    compatibility_mention_rate: float = 0.5  # accessory titles naming the type they fit
    # Imperfect teacher chains of thought (training split only).
    corrupt_cot_share: float = 0.2
    corrupt_propagate_share: float = 0.5  # of the corrupted ones, those whose downstream nodes follow
    corrupt_nodes: tuple[str, ...] = NODES
    # Splits.
    test_fraction: float = 0.15
    ood_fraction: float = 0.1
    heldout_product_fraction: float = 0.25

    def validate(self) -> None:
        """Fail with the offending field's name."""
        for name in ("products_per_type", "num_queries", "pairs_per_query", "tags_per_query",
                     "max_purchases_per_query"):
            if getattr(self, name) < (2 if name == "products_per_type" else 1):
                raise ValueError(f"WorldConfig.{name} is too small: {getattr(self, name)}")
        for name in ("synonym_rate", "typo_rate", "filler_rate", "hard_negative_rate",
                     "substitute_same_type_share", "compatibility_mention_rate", "corrupt_cot_share",
                     "corrupt_propagate_share", "test_fraction", "ood_fraction", "heldout_product_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name, size in (("label_mix", len(LABELS)), ("tag_mix", len(REWRITE_TAGS)),
                           ("attribute_count_weights", 4)):
            weights = np.asarray(getattr(self, name), dtype=np.float64)
            if weights.shape != (size,) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"WorldConfig.{name} needs {size} non-negative weights, got {weights}")
        if self.test_fraction + self.ood_fraction >= 1.0:
            raise ValueError("WorldConfig.test_fraction + ood_fraction must leave training queries")
        unknown = sorted(set(self.corrupt_nodes) - set(NODES))
        if unknown or not self.corrupt_nodes:
            raise ValueError(f"WorldConfig.corrupt_nodes must be a non-empty subset of {NODES}, got {unknown}")
        build_taxonomy(self.num_product_types)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> WorldConfig:
        """From a dict or ConfigDict; lists become tuples so the config stays hashable."""
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown WorldConfig fields {unknown}; known: {sorted(fields)}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value
                      for key, value in dict(values).items()})


@dataclasses.dataclass(frozen=True)
class Product:
    product_id: str
    product_type: str
    attributes: dict[str, str]
    title: str
    pool: str  # TRAIN_POOL or HELDOUT_POOL


@dataclasses.dataclass(frozen=True)
class Query:
    query_id: str
    text: str
    subject: str
    attributes: dict[str, str]
    split: str
    gold_rewrite: str
    purchased_product_ids: tuple[str, ...]
    source_product_id: str  # the product the intent was read from
    typo: str | None  # the misspelt word, if any


@dataclasses.dataclass(frozen=True)
class RelevancePair:
    pair_id: str
    query_id: str
    product_id: str
    split: str
    query: str
    product_title: str
    gold: dict[str, str]  # node -> gold value
    label: str  # gold label, == gold["y"]
    teacher: dict[str, str]  # node -> teacher value (differs from gold where corrupted)
    teacher_cot: str  # `teacher` rendered with the label last
    corrupted_node: str | None
    corruption_propagated: bool


@dataclasses.dataclass(frozen=True)
class RewriteTag:
    tag_id: str
    query_id: str
    split: str
    query: str
    rewrite: str
    tag: str
    rewrite_subject: str
    rewrite_attributes: dict[str, str]


@dataclasses.dataclass(frozen=True)
class World:
    config: WorldConfig
    product_types: tuple[ProductType, ...]
    products: tuple[Product, ...]
    queries: tuple[Query, ...]
    pairs: tuple[RelevancePair, ...]
    rewrite_tags: tuple[RewriteTag, ...]

    @functools.cached_property
    def types(self) -> dict[str, ProductType]:
        return {ptype.name: ptype for ptype in self.product_types}

    @functools.cached_property
    def product_by_id(self) -> dict[str, Product]:
        return {product.product_id: product for product in self.products}

    @functools.cached_property
    def query_by_id(self) -> dict[str, Query]:
        return {query.query_id: query for query in self.queries}

    def split_queries(self, split: str) -> list[Query]:
        return [query for query in self.queries if query.split == split]

    def split_pairs(self, split: str) -> list[RelevancePair]:
        return [pair for pair in self.pairs if pair.split == split]

    def split_rewrite_tags(self, split: str) -> list[RewriteTag]:
        return [tag for tag in self.rewrite_tags if tag.split == split]

    def read_intent(self, text: str) -> tuple[str, dict[str, str]] | None:
        """Read (subject, attributes) from text in catalogue words, e.g. a generated rewrite.

        The longest type name found wins (the earliest on ties); then, per attribute of that type, the
        earliest value found outside the subject's words. None when no type name occurs.
        """
        tokens = word_tokens(text)
        found_types = [(-len(name_tokens), start, name) for name in self.types
                       for name_tokens in [word_tokens(name)] for start in _occurrences(tokens, name_tokens)]
        if not found_types:
            return None
        negative_length, start, subject = min(found_types)
        length = -negative_length
        rest = tokens[:start] + ["\0"] + tokens[start + length:]
        attributes = {}
        for key, terms in self.types[subject].schema:
            found = [(min(hits), term.canonical) for term in terms
                     if (hits := _occurrences(rest, word_tokens(term.canonical)))]
            if found:
                attributes[key] = min(found)[1]
        return subject, attributes

    def to_dict(self) -> dict[str, Any]:
        """Plain containers for JSON; records are flat, so shallow copies suffice (and are fast)."""
        return {
            "config": dataclasses.asdict(self.config),
            "product_types": [ptype.to_dict() for ptype in self.product_types],
            **{name: [dict(vars(record)) for record in getattr(self, name)]
               for name in ("products", "queries", "pairs", "rewrite_tags")},
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, ASCII; equal worlds give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _occurrences(tokens: Sequence[str], pattern: Sequence[str]) -> list[int]:
    width = len(pattern)
    return [i for i in range(len(tokens) - width + 1) if list(tokens[i:i + width]) == list(pattern)]


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------

# Independent random streams, so that changing one knob (say the corrupted share) leaves the rest alone.
_STREAMS = {"catalogue": 0, "queries": 1, "pairs": 2, "corruption": 3, "rewrite_tags": 4}


def _rng(cfg: WorldConfig, stream: str) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _STREAMS[stream]])


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _quota(total: int, mix: Sequence[float]) -> list[int]:
    """Largest-remainder split of `total` by `mix` (ties to the earlier entry)."""
    weights = np.asarray(mix, dtype=np.float64) / np.sum(mix)
    raw = weights * total
    counts = np.floor(raw).astype(int)
    order = sorted(range(len(mix)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def _draw_index(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """An index drawn with probability proportional to `weights` (not all zero)."""
    threshold = rng.random() * sum(weights)
    for index, weight in enumerate(weights):
        threshold -= weight
        if threshold < 0 and weight > 0:
            return index
    return max(i for i, weight in enumerate(weights) if weight > 0)


def _allocate(rng: np.random.Generator, capacity: np.ndarray, slots: int, mix: Sequence[float]) -> np.ndarray:
    """How many items of each category every row gets: `counts[row, category]`.

    Rows have `slots` places and at most `capacity[row, category]` items of a category; the column
    totals should follow `mix` exactly. Categories are served scarcest first (quota over capacity), each
    spreading its quota over rows at random in proportion to their capacity; places still free at the
    end (quota unreachable) take any category with capacity left, drawn by `mix`.
    """
    rows, categories = capacity.shape
    quota = _quota(rows * slots, mix)
    counts = np.zeros_like(capacity)
    free = np.full(rows, slots)
    supply = capacity.sum(axis=0)
    for category in sorted(range(categories), key=lambda c: (-quota[c] / max(supply[c], 1), c)):
        tickets = np.repeat(np.arange(rows), capacity[:, category])
        need = quota[category]
        for row in tickets[rng.permutation(len(tickets))].tolist():
            if need == 0:
                break
            if free[row] > 0:
                counts[row, category] += 1
                free[row] -= 1
                need -= 1
    for row in np.flatnonzero(free).tolist():
        while free[row] > 0:
            weights = [m if counts[row, c] < capacity[row, c] else 0.0 for c, m in enumerate(mix)]
            if not any(weights):
                break
            counts[row, _draw_index(rng, weights)] += 1
            free[row] -= 1
    return counts


def _make_catalogue(cfg: WorldConfig, types: Sequence[ProductType]) -> tuple[Product, ...]:
    rng = _rng(cfg, "catalogue")
    products = []
    for ptype in types:
        heldout_count = int(np.clip(round(cfg.heldout_product_fraction * cfg.products_per_type),
                                    1, cfg.products_per_type - 1))
        heldout = set(rng.permutation(cfg.products_per_type)[:heldout_count].tolist())
        for index in range(cfg.products_per_type):
            attributes = {key: _pick(rng, terms).canonical for key, terms in ptype.schema}
            products.append(Product(
                product_id=f"p{len(products):05d}", product_type=ptype.name, attributes=attributes,
                title=_render_title(rng, ptype, attributes, cfg.compatibility_mention_rate),
                pool=HELDOUT_POOL if index in heldout else TRAIN_POOL))
    return tuple(products)


def _render_title(rng: np.random.Generator, ptype: ProductType, attributes: Mapping[str, str],
                  compatibility_mention_rate: float) -> str:
    letters = "ABCDEFGHJKLMNPRSTVWXZ"
    model = _pick(rng, letters) + _pick(rng, letters) + str(int(rng.integers(100, 10_000)))
    phrases = [_title_phrase(key, attributes[key]) for key in sorted(attributes) if key != "brand"]
    phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    marketing_words = rng.choice(len(_MARKETING), size=int(rng.integers(1, 3)), replace=False)
    subject = ptype.name
    if ptype.accessory_of and rng.random() < compatibility_mention_rate:
        subject += f" compatible with {_pick(rng, ptype.accessory_of)}"
    title = _pick(rng, _TITLE_TEMPLATES).format(
        brand=attributes["brand"].capitalize(), model=model, subject=subject,
        attributes=_pick(rng, (", ", " ")).join(phrases),
        marketing=" ".join(_MARKETING[i].capitalize() for i in marketing_words))
    return " ".join(title.split())


class _Pool:
    """The products of one pool, indexed by type and by attribute value."""

    def __init__(self, products: Iterable[Product]):
        self.by_type: dict[str, list[Product]] = {}
        self.by_value: dict[tuple[str, str], list[Product]] = {}
        for product in products:
            self.by_type.setdefault(product.product_type, []).append(product)
            for item in product.attributes.items():
                self.by_value.setdefault(item, []).append(product)

    def of_types(self, names: Iterable[str]) -> list[Product]:
        return [product for name in names for product in self.by_type.get(name, [])]


def _split_sizes(cfg: WorldConfig) -> dict[str, int]:
    test = round(cfg.num_queries * cfg.test_fraction)
    ood = round(cfg.num_queries * cfg.ood_fraction)
    if cfg.num_queries - test - ood < 1:
        raise ValueError(f"WorldConfig.num_queries={cfg.num_queries} leaves no training queries")
    return {"train": cfg.num_queries - test - ood, "test": test, "ood": ood}


def _satisfies(product: Product, attributes: Mapping[str, str]) -> bool:
    return all(product.attributes.get(key) == value for key, value in attributes.items())


_MAX_INTENT_ATTEMPTS = 200


def _make_queries(cfg: WorldConfig, types: Sequence[ProductType],
                  products: Sequence[Product]) -> tuple[Query, ...]:
    rng = _rng(cfg, "queries")
    pools = {name: _Pool(p for p in products if p.pool == name) for name in (TRAIN_POOL, HELDOUT_POOL)}
    vocabulary = _vocabulary_words(types)
    intent_split: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
    training_typos: set[str] = set()
    count_weights = np.asarray(cfg.attribute_count_weights, dtype=np.float64)
    queries = []
    for split, size in _split_sizes(cfg).items():
        pool = pools[TRAIN_POOL if split == "train" else HELDOUT_POOL].by_type
        for _ in range(size):
            for _ in range(_MAX_INTENT_ATTEMPTS):
                ptype = _pick(rng, types)
                source = _pick(rng, pool[ptype.name])
                weights = count_weights[: len(ptype.keys) + 1]
                count = int(rng.choice(len(weights), p=weights / weights.sum()))
                keys = sorted(ptype.keys[i] for i in rng.choice(len(ptype.keys), size=count, replace=False))
                attributes = {key: source.attributes[key] for key in keys}
                intent = (ptype.name, tuple(attributes.items()))
                if intent_split.setdefault(intent, split) == split:
                    break
            else:
                raise ValueError(f"could not draw a {split} intent unseen in other splits after "
                                 f"{_MAX_INTENT_ATTEMPTS} tries: raise products_per_type or num_product_types")
            text, typo = _render_query(rng, cfg, ptype, attributes, split, vocabulary,
                                       forbidden_typos=training_typos if split != "train" else set())
            if typo is not None and split == "train":
                training_typos.add(typo)
            exact = [p.product_id for p in pool[ptype.name] if _satisfies(p, attributes)]
            purchases = rng.choice(len(exact), size=min(len(exact), int(rng.integers(
                1, cfg.max_purchases_per_query + 1))), replace=False)
            queries.append(Query(
                query_id=f"q{len(queries):05d}", text=text, subject=ptype.name, attributes=attributes,
                split=split, gold_rewrite=render_rewrite(ptype.name, attributes),
                purchased_product_ids=tuple(sorted(exact[i] for i in purchases)),
                source_product_id=source.product_id, typo=typo))
    return tuple(queries)


def _surface(rng: np.random.Generator, term: Term, split: str, synonym_rate: float, force_ood: bool) -> str:
    """A term as a shopper writes it: colloquial with `synonym_rate`, forms reserved by split."""
    forms = term.ood if split == "ood" else term.synonyms
    if forms and (force_ood or rng.random() < synonym_rate):
        return _pick(rng, forms)
    return term.canonical


def _render_query(rng: np.random.Generator, cfg: WorldConfig, ptype: ProductType,
                  attributes: Mapping[str, str], split: str, vocabulary: set[str],
                  forbidden_typos: set[str]) -> tuple[str, str | None]:
    facets: list[tuple[Term, Term | None]] = [(ptype.term, None)]  # (term, cue word for bare numbers)
    for key in attributes:
        term = next(t for t in ptype.values(key) if t.canonical == attributes[key])
        facets.append((term, _SIZE_CUE if key == "size" and term.canonical.isdigit() else None))
    # The ood split must show at least one unseen surface form.
    forced = -1
    if split == "ood":
        with_ood = [i for i, (term, cue) in enumerate(facets) if term.ood or cue is not None]
        forced = _pick(rng, with_ood)
    phrases = []
    for i, (term, cue) in enumerate(facets):
        if cue is not None:
            phrases.append(f"{_surface(rng, cue, split, cfg.synonym_rate, i == forced)} {term.canonical}")
        else:
            phrases.append(_surface(rng, term, split, cfg.synonym_rate, i == forced))
    subject, attribute_phrases = phrases[0], [phrases[i] for i in 1 + rng.permutation(len(phrases) - 1)]
    before = int(rng.integers(len(attribute_phrases) + 1))
    words = [*attribute_phrases[:before], subject, *attribute_phrases[before:]]
    if rng.random() < cfg.filler_rate:
        filler = _pick(rng, _OOD_FILLERS if split == "ood" else _FILLERS)
        words.insert(0 if rng.random() < 0.5 else len(words), filler)
    tokens = " ".join(words).split()
    typo = None
    if rng.random() < cfg.typo_rate:
        candidates = [i for i, token in enumerate(tokens) if len(token) >= 4 and token.isalpha()]
        if candidates:
            index = _pick(rng, candidates)
            typo = _misspell(rng, tokens[index], vocabulary | forbidden_typos)
            if typo is not None:
                tokens[index] = typo
    return " ".join(tokens), typo


_MAX_TYPO_ATTEMPTS = 10


def _misspell(rng: np.random.Generator, word: str, forbidden: set[str]) -> str | None:
    """One keyboard slip (deletion, swap, doubling, substitution) giving a word not in `forbidden`."""
    for _ in range(_MAX_TYPO_ATTEMPTS):
        i = int(rng.integers(1, len(word) - 1))  # keep the first letter, as people mostly do
        operation = int(rng.integers(4))
        if operation == 0:
            typo = word[:i] + word[i + 1:]
        elif operation == 1:
            typo = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif operation == 2:
            typo = word[:i] + word[i] + word[i:]
        else:
            typo = word[:i] + chr(ord("a") + int(rng.integers(26))) + word[i + 1:]
        if typo != word and typo not in forbidden:
            return typo
    return None


def _vocabulary_words(types: Sequence[ProductType]) -> set[str]:
    """Every word of every catalogue and colloquial form: a typo must not land on a real word."""
    words = set(_MARKETING) | set(STOPWORDS) | {"size", "flavor", "compatible", *word_tokens(" ".join(
        _SIZE_CUE.synonyms + _SIZE_CUE.ood + _FILLERS + _OOD_FILLERS))}
    for ptype in types:
        terms = [ptype.term] + [term for _, terms in ptype.schema for term in terms]
        for term in terms:
            words.update(word_tokens(" ".join((term.canonical, *term.synonyms, *term.ood))))
    return words


def _gold_values(types: Mapping[str, ProductType], query: Query, product: Product) -> dict[str, str]:
    facets = {key: product.attributes[key] for key in query.attributes if key in product.attributes}
    ms = subject_match(types, query.subject, product.product_type)
    ma = attribute_match(query.attributes, facets)
    return {"qs": query.subject, "qa": format_attributes(query.attributes), "ps": product.product_type,
            "pa": format_attributes(facets), "ms": ms, "ma": ma,
            "y": apply_label_rule(DEFAULT_LABEL_RULE, ms, ma)}


def _related(types: Mapping[str, ProductType], query: Query) -> set[str]:
    """The query's subject with its substitutes and complements: everything not `mismatch`."""
    ptype = types[query.subject]
    return {ptype.name, *ptype.substitutes, *ptype.complements}


def _candidates(types: Mapping[str, ProductType], query: Query, pool: _Pool) -> dict[str, list[list[Product]]]:
    """Per label, the candidate products of a query within its pool, as one or two kinds.

    Substitute: the right type with a wrong attribute, or a substitute type. Irrelevant: unrelated
    products sharing an attribute value with the query (hard negatives), or any unrelated product.
    """
    ptype = types[query.subject]
    same = pool.by_type.get(query.subject, [])
    related = _related(types, query)
    hard = {p.product_id: p for item in sorted(query.attributes.items())
            for p in pool.by_value.get(item, []) if p.product_type not in related}
    return {
        "Exact": [[p for p in same if _satisfies(p, query.attributes)]],
        "Substitute": [[p for p in same if not _satisfies(p, query.attributes)], pool.of_types(ptype.substitutes)],
        "Complement": [pool.of_types(ptype.complements)],
        "Irrelevant": [list(hard.values()), pool.of_types(name for name in types if name not in related)],
    }


def _capacity(kinds: Sequence[Sequence[Product]], label: str, limit: int) -> int:
    """Distinct products available for a label, counted up to `limit` (hard negatives are a subset)."""
    largest = kinds[-1] if label == "Irrelevant" else [p for kind in kinds for p in kind]
    return min(limit, len(largest))


def _pick_unused(rng: np.random.Generator, kind: Sequence[Product], used: set[str]) -> Product | None:
    for _ in range(8):  # a few rejections are cheaper than filtering a long list
        product = _pick(rng, kind)
        if product.product_id not in used:
            return product
    rest = [product for product in kind if product.product_id not in used]
    return _pick(rng, rest) if rest else None


def _make_pairs(cfg: WorldConfig, types: Mapping[str, ProductType], products: Sequence[Product],
                queries: Sequence[Query]) -> list[RelevancePair]:
    rng = _rng(cfg, "pairs")
    pools = {name: _Pool(p for p in products if p.pool == name) for name in (TRAIN_POOL, HELDOUT_POOL)}
    # Chance of drawing from the first kind of a label (same-type substitutes, hard negatives).
    first_kind_rate = {"Substitute": cfg.substitute_same_type_share, "Irrelevant": cfg.hard_negative_rate}
    pairs = []
    for split in SPLITS:
        split_queries = [query for query in queries if query.split == split]
        pool = pools[TRAIN_POOL if split == "train" else HELDOUT_POOL]
        candidates = [_candidates(types, query, pool) for query in split_queries]
        capacity = np.array([[_capacity(c[label], label, cfg.pairs_per_query) for label in LABELS]
                             for c in candidates], dtype=np.int64).reshape(len(split_queries), len(LABELS))
        counts = _allocate(rng, capacity, cfg.pairs_per_query, cfg.label_mix)
        quota = _quota(len(split_queries) * cfg.pairs_per_query, cfg.label_mix)
        if counts.sum(axis=0).tolist() != quota:
            logging.warning("%s pairs: label counts %s miss the quota %s of the mix (too few products per "
                            "query pool: raise products_per_type or heldout_product_fraction)",
                            split, dict(zip(LABELS, counts.sum(axis=0).tolist())), dict(zip(LABELS, quota)))
        for query, query_candidates, row in zip(split_queries, candidates, counts.tolist()):
            labels = [label for label, count in zip(LABELS, row) for _ in range(count)]
            used: set[str] = set()
            for index in rng.permutation(len(labels)).tolist():
                label = labels[index]
                kinds = [kind for kind in query_candidates[label]
                         if any(p.product_id not in used for p in kind)]
                rate = first_kind_rate.get(label, 1.0)
                kind = kinds[0] if len(kinds) == 1 or rng.random() < rate else kinds[1]
                product = _pick_unused(rng, kind, used)
                used.add(product.product_id)
                gold = _gold_values(types, query, product)
                if gold["y"] != label:
                    raise AssertionError(f"drew {label} but the rule gives {gold['y']}: {gold}")
                pairs.append(RelevancePair(
                    pair_id=f"r{len(pairs):06d}", query_id=query.query_id, product_id=product.product_id,
                    split=split, query=query.text, product_title=product.title, gold=gold,
                    label=label, teacher=gold, teacher_cot=render(gold),
                    corrupted_node=None, corruption_propagated=False))
    return pairs


def _corrupt_teachers(cfg: WorldConfig, types: Mapping[str, ProductType],
                      pairs: list[RelevancePair]) -> list[RelevancePair]:
    """Corrupt one node in an exact share of the training pairs (a propagated share of those)."""
    rng = _rng(cfg, "corruption")
    train = [i for i, pair in enumerate(pairs) if pair.split == "train"]
    chosen = rng.choice(len(train), size=round(cfg.corrupt_cot_share * len(train)), replace=False)
    propagated = round(cfg.corrupt_propagate_share * len(chosen))
    pairs = list(pairs)
    for rank, position in enumerate(chosen.tolist()):
        pair = pairs[train[position]]
        node = _pick(rng, cfg.corrupt_nodes)
        teacher = _corrupt(rng, types, pair.gold, node, propagate=rank < propagated)
        pairs[train[position]] = dataclasses.replace(
            pair, teacher=teacher, teacher_cot=render(teacher), corrupted_node=node,
            corruption_propagated=rank < propagated)
    return pairs


def _corrupt(rng: np.random.Generator, types: Mapping[str, ProductType], gold: Mapping[str, str],
             node: str, propagate: bool) -> dict[str, str]:
    values = dict(gold)
    if node in ("qs", "ps"):
        values[node] = _pick(rng, [name for name in types if name != gold[node]])
    elif node in ("qa", "pa"):
        schema_type = types[gold["qs" if node == "qa" else "ps"]]
        values[node] = format_attributes(_perturb_attributes(rng, schema_type, parse_attributes(gold[node])))
    else:
        vocabulary = {"ms": MS_VALUES, "ma": MA_VALUES, "y": LABELS}[node]
        values[node] = _pick(rng, [value for value in vocabulary if value != gold[node]])
    if propagate:
        if node in ("qs", "ps"):
            values["ms"] = subject_match(types, values["qs"], values["ps"])
        if node in ("qa", "pa"):
            values["ma"] = attribute_match(parse_attributes(values["qa"]), parse_attributes(values["pa"]))
        if node != "y":
            values["y"] = apply_label_rule(DEFAULT_LABEL_RULE, values["ms"], values["ma"])
    return values


def _perturb_attributes(rng: np.random.Generator, ptype: ProductType,
                        attributes: Mapping[str, str]) -> dict[str, str]:
    """Change, drop or add one facet (drawn from the type's schema), so the result always differs."""
    attributes = dict(attributes)
    changeable = [key for key in attributes if key in ptype.keys and len(ptype.values(key)) > 1]
    spare = [key for key in ptype.keys if key not in attributes]
    operations = (["change"] if changeable else []) + (["drop"] if attributes else []) + (["add"] if spare else [])
    operation = _pick(rng, operations)
    if operation == "change":
        key = _pick(rng, changeable)
        attributes[key] = _pick(rng, [t.canonical for t in ptype.values(key) if t.canonical != attributes[key]])
    elif operation == "drop":
        del attributes[_pick(rng, sorted(attributes))]
    else:
        key = _pick(rng, spare)
        attributes[key] = _pick(rng, ptype.values(key)).canonical
    return attributes


def _make_rewrite_tags(cfg: WorldConfig, types: Mapping[str, ProductType],
                       queries: Sequence[Query]) -> list[RewriteTag]:
    rng = _rng(cfg, "rewrite_tags")
    tags = []
    for split in SPLITS:
        split_queries = [query for query in queries if query.split == split]
        wordings = [_relevant_rewrites(query) for query in split_queries]
        # A query has few wordings of its own intent; partial and irrelevant rewrites are plentiful.
        capacity = np.array([[min(cfg.tags_per_query, len(w)), cfg.tags_per_query,
                              cfg.tags_per_query if len(types) > len(_related(types, query)) else 0]
                             for query, w in zip(split_queries, wordings)],
                            dtype=np.int64).reshape(len(split_queries), len(REWRITE_TAGS))
        counts = _allocate(rng, capacity, cfg.tags_per_query, cfg.tag_mix)
        for query, relevant, row in zip(split_queries, wordings, counts.tolist()):
            seen = {query.text}
            wanted = [tag for tag, count in zip(REWRITE_TAGS, row) for _ in range(count)]
            for index in rng.permutation(len(wanted)).tolist():
                if wanted[index] == "relevant":
                    fresh = [text for text in relevant if text not in seen]
                    text = fresh[0] if fresh and fresh[0] == query.gold_rewrite else _pick(rng, fresh)
                    rewrite = (text, query.subject, dict(query.attributes))
                else:
                    rewrite = _negative_rewrite(rng, types, query, wanted[index], seen)
                if rewrite is None:
                    continue
                text, subject, attributes = rewrite
                seen.add(text)
                tag = rewrite_tag(types, query.subject, query.attributes, subject, attributes)
                if tag != wanted[index]:
                    raise AssertionError(f"drew {wanted[index]} but the rule gives {tag}: {text}")
                tags.append(RewriteTag(
                    tag_id=f"t{len(tags):06d}", query_id=query.query_id, split=split, query=query.text,
                    rewrite=text, tag=tag, rewrite_subject=subject, rewrite_attributes=attributes))
    return tags


def _relevant_rewrites(query: Query) -> list[str]:
    """Every wording of the query's own intent in catalogue words, gold first, copies of the query left out."""
    wordings = [query.gold_rewrite]
    for order in itertools.permutations(sorted(query.attributes)):
        for subject_first in (False, True):
            text = render_rewrite(query.subject, query.attributes, order=order, subject_first=subject_first)
            if text not in wordings:
                wordings.append(text)
    return [text for text in wordings if text != query.text]


_MAX_NEGATIVE_ATTEMPTS = 10


def _negative_rewrite(rng: np.random.Generator, types: Mapping[str, ProductType], query: Query, tag: str,
                      seen: set[str]) -> tuple[str, str, dict[str, str]] | None:
    """A `partial` or `irrelevant` rewrite in catalogue words, new for this query; None if none is found.

    partial: a substitute subject, or a facet changed, dropped or added; irrelevant: a complement or an
    unrelated subject, keeping the facets it has.
    """
    ptype = types[query.subject]
    unrelated = [name for name in types if name not in _related(types, query)]
    for _ in range(_MAX_NEGATIVE_ATTEMPTS):
        subject, attributes = query.subject, dict(query.attributes)
        if tag == "partial" and ptype.substitutes and rng.random() < 0.3:
            subject = _pick(rng, ptype.substitutes)
        elif tag == "partial":
            attributes = _perturb_attributes(rng, ptype, attributes)
        else:
            subject = _pick(rng, _pick(rng, [names for names in (ptype.complements, unrelated) if names]))
            other = types[subject]
            attributes = {key: value for key, value in attributes.items()
                          if key in other.keys and value in [t.canonical for t in other.values(key)]}
        order = [sorted(attributes)[i] for i in rng.permutation(len(attributes))]
        text = render_rewrite(subject, attributes, order=order, subject_first=bool(rng.random() < 0.5))
        if text not in seen:
            return text, subject, attributes
    return None


def build_world(cfg: WorldConfig | Mapping[str, Any] | None = None) -> World:
    """Generate the whole world for a config; the same config gives the same world, byte for byte."""
    if cfg is None:
        cfg = WorldConfig()
    elif not isinstance(cfg, WorldConfig):
        cfg = WorldConfig.from_mapping(cfg)
    cfg.validate()
    product_types = build_taxonomy(cfg.num_product_types)
    types = {ptype.name: ptype for ptype in product_types}
    products = _make_catalogue(cfg, product_types)
    queries = _make_queries(cfg, product_types, products)
    pairs = _corrupt_teachers(cfg, types, _make_pairs(cfg, types, products, queries))
    rewrite_tags = _make_rewrite_tags(cfg, types, queries)
    return World(config=cfg, product_types=product_types, products=products, queries=queries,
                 pairs=tuple(pairs), rewrite_tags=tuple(rewrite_tags))


# --------------------------------------------------------------------------------------------------
# The world's rules on rewrites and retrieved products (oracles for rewrite metrics and ablation judges)
# --------------------------------------------------------------------------------------------------

# Gold relevance grade of each ESCI label (NDCG-style gains).
RELEVANCE_GRADES: dict[str, int] = {"Exact": 3, "Substitute": 2, "Complement": 1, "Irrelevant": 0}


def relevance_grade(world: World, subject: str, attributes: Mapping[str, str], product: Product) -> int:
    """The grade of `product` for the intent (subject, attributes), by the world's label rule."""
    ms = subject_match(world.types, subject, product.product_type)
    ma = attribute_match(attributes, product.attributes)
    return RELEVANCE_GRADES[apply_label_rule(DEFAULT_LABEL_RULE, ms, ma)]


def keeps_intent(world: World, query: Query, rewrite: str) -> bool:
    """The rewrite names exactly the query's gold (subject, attributes)."""
    return world.read_intent(rewrite) == (query.subject, dict(query.attributes))


def true_tag(world: World, query: Query, rewrite: str) -> str:
    """The tag of (query, rewrite) by the world's rule (`world.rewrite_tag`); a rewrite that names no
    product type is irrelevant."""
    intent = world.read_intent(rewrite)
    if intent is None:
        return "irrelevant"
    return rewrite_tag(world.types, query.subject, query.attributes, *intent)
