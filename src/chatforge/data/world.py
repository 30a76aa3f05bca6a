"""The built-in world: a deterministic, seeded synthetic world and the pretraining prose about it.

Why it exists: every stage of the CPU pipeline needs ground truth that a fresh clone can regenerate in
seconds without a download. The world has invented people and towns whose facts a model can only learn
from our own text, so a stage's effect ("does the model now answer who Mirela Tovak's brother is?") is
measurable exactly.

Design:
- ``build_world`` makes people, towns, countries and rivers from one ``random.Random(seed)``; names are
  syllable-built, unique within the world and never a substring of one another.
- ``World.facts()`` is the single list of ground truth: every fact carries a natural question and a
  short exact answer. Prose, chat data, preference pairs and evals are all rendered from it, so they
  cannot disagree.
- ``pretrain_documents`` renders encyclopedia entries, stories, arithmetic and counting/comparison text.
  Entities are drawn from shuffled decks so that every fact is restated several times, each time with a
  randomly chosen template out of several per relation. With ``zipf`` > 0 they are drawn by fame instead
  (the k-th entity of a list with weight 1/k^zipf), as real text mentions a few names often and most rarely:
  a model then keeps learning rarer facts as it grows, and its loss falls as a power law for longer.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chatforge.errors import ChatforgeError

T = TypeVar("T")

MIN_DOC_CHARS = 200
MAX_DOC_CHARS = 1500

PERSON_RELATIONS: tuple[str, ...] = (
    "birth_year",
    "hometown",
    "occupation",
    "pet",
    "sibling",
    "parent",
    "child",
    "spouse",
    "friend",
)
PLACE_RELATIONS: tuple[str, ...] = ("country", "founded", "population", "river")
RELATIONS: tuple[str, ...] = PERSON_RELATIONS + PLACE_RELATIONS
# Relations whose value is another person; each is single-valued by construction (see _make_units).
KINSHIP: tuple[str, ...] = ("sibling", "parent", "child", "spouse", "friend")
INVERSE: dict[str, str] = {
    "sibling": "sibling",
    "parent": "child",
    "child": "parent",
    "spouse": "spouse",
    "friend": "friend",
}
# The word for the relative, by the relative's gender ("her brother", "his mother").
ROLE: dict[str, dict[str, str]] = {
    "sibling": {"female": "sister", "male": "brother"},
    "parent": {"female": "mother", "male": "father"},
    "child": {"female": "daughter", "male": "son"},
    "spouse": {"female": "wife", "male": "husband"},
    "friend": {"female": "best friend", "male": "best friend"},
}
PRONOUNS: dict[str, tuple[str, str, str]] = {  # subject, possessive, object
    "female": ("she", "her", "her"),
    "male": ("he", "his", "him"),
}

# What kind of value each relation has: later tasks draw same-kind distractors ("wrong fact" pairs).
VALUE_KIND: dict[str, str] = {
    "birth_year": "year",
    "hometown": "place",
    "occupation": "occupation",
    "pet": "pet",
    "sibling": "person",
    "parent": "person",
    "child": "person",
    "spouse": "person",
    "friend": "person",
    "country": "country",
    "founded": "year",
    "population": "number",
    "river": "river",
}

# Occupation -> what a person of that trade is seen doing in stories.
OCCUPATIONS: dict[str, str] = {
    "baker": "baking loaves of rye bread",
    "carpenter": "building a new oak table",
    "teacher": "marking a pile of school essays",
    "doctor": "visiting patients around the town",
    "potter": "shaping clay bowls on the wheel",
    "weaver": "weaving a long blue blanket",
    "blacksmith": "hammering horseshoes at the forge",
    "librarian": "sorting old books onto the shelves",
    "nurse": "caring for patients at the clinic",
    "farmer": "planting rows of barley",
    "painter": "painting a view of the hills",
    "sailor": "mending ropes on the boat",
    "miller": "grinding wheat into flour",
    "tailor": "sewing a fine wool coat",
    "architect": "drawing plans for a new bridge",
    "beekeeper": "collecting honey from the hives",
    "glassblower": "shaping a green glass vase",
    "clockmaker": "repairing a tiny pocket watch",
    "cartographer": "drawing a map of the coast",
    "musician": "practising a new song on the fiddle",
    "shepherd": "leading the sheep up the hill",
    "engineer": "fixing the pump at the water mill",
    "gardener": "pruning the roses in the park",
    "chemist": "mixing remedies behind the counter",
    "jeweller": "setting a stone into a silver ring",
    "bookbinder": "stitching the pages of a thick book",
    "brewer": "stirring a great vat of ale",
    "astronomer": "checking the lenses of a telescope",
    "fisher": "pulling in nets full of fish",
    "translator": "translating an old letter",
}
PETS: tuple[str, ...] = (
    "cat",
    "dog",
    "parrot",
    "tortoise",
    "rabbit",
    "goat",
    "hedgehog",
    "canary",
    "ferret",
    "goldfish",
    "pony",
    "owl",
    "lizard",
    "duck",
)

# ---------------------------------------------------------------- templates
# {s} subject (name, first name or pronoun), {p} its possessive, {o} its object form, {n} always the
# full name, {v} the value, {av} the value with its article, {r} the relative's role word (brother),
# {ri} the subject's role towards the relative (sister). Several per relation so a model learns the
# fact, not the sentence.
PERSON_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "{s} was born in {v}.",
        "{s} was born in the year {v}.",
        "{p} birth year is {v}.",
        "{s} came into the world in {v}.",
        "The year {v} is when {n} was born.",
        "{n}'s year of birth is {v}.",
        "In {v}, {n} was born.",
    ),
    "hometown": (
        "{s} was born in the town of {v}.",
        "{s} comes from {v}.",
        "{p} hometown is {v}.",
        "The town of {v} is {p} hometown.",
        "{s} is a native of {v}.",
        "{v} is the town where {n} was born.",
        "{s} was born and raised in {v}.",
    ),
    "occupation": (
        "{s} works as {av}.",
        "{s} is {av} by trade.",
        "{s} earns a living as {av}.",
        "By profession, {s} is {av}.",
        "{s} has worked as {av} for many years.",
        "Everyone knows {o} as {av}.",
        "{n} is {av}.",
    ),
    "pet": (
        "{s} has a pet {v}.",
        "{s} keeps {av} as a pet.",
        "{p} pet is {av}.",
        "{s} owns {av}.",
        "At home, {s} looks after {av}.",
        "{s} is the proud owner of {av}.",
        "The pet that {n} keeps is {av}.",
    ),
    "sibling": (
        "{s} has a {r} named {v}.",
        "{p} {r} is {v}.",
        "{v} is {p} {r}.",
        "{s} and {v} are siblings.",
        "{s} is {v}'s {ri}.",
        "{s} grew up with {p} {r}, {v}.",
        "{v} and {n} are siblings.",
    ),
    "parent": (
        "{p} {r} is {v}.",
        "{s} is the {ri} of {v}.",
        "{v} is {p} {r}.",
        "{s} is {v}'s {ri}.",
        "{s} was raised by {p} {r}, {v}.",
        "{v} is the {r} of {n}.",
    ),
    "child": (
        "{p} {r} is {v}.",
        "{s} is the {ri} of {v}.",
        "{v} is {p} {r}.",
        "{s} has a {r} named {v}.",
        "{s} is {v}'s {ri}.",
        "{v} is the {r} of {n}.",
    ),
    "spouse": (
        "{s} is married to {v}.",
        "{p} {r} is {v}.",
        "{s} and {v} are married.",
        "{v} is {p} {r}.",
        "{s} is the {ri} of {v}.",
        "{s} married {v}.",
    ),
    "friend": (
        "{p} best friend is {v}.",
        "{s} and {v} are best friends.",
        "{v} is {p} best friend.",
        "{s} is best friends with {v}.",
        "{s} counts {v} as {p} best friend.",
        "The best friend of {n} is {v}.",
    ),
}
PLACE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "country": (
        "{s} is a town in {v}.",
        "{s} lies in {v}.",
        "{s} is located in {v}.",
        "The town of {n} is in {v}.",
        "{v} is the country where {n} is found.",
        "{s} belongs to the country of {v}.",
        "{n} is one of the towns of {v}.",
    ),
    "founded": (
        "{s} was founded in {v}.",
        "The town of {n} was founded in the year {v}.",
        "{n} dates back to {v}, when it was founded.",
        "In {v}, {n} was founded.",
        "The founding of {n} took place in {v}.",
        "{s} has stood since its founding in {v}.",
    ),
    "population": (
        "{s} has a population of {v}.",
        "{v} people live in {n}.",
        "The population of {n} is {v}.",
        "{s} is home to {v} people.",
        "{s} has {v} inhabitants.",
        "There are {v} residents in {n}.",
    ),
    "river": (
        "The {v} flows through {s}.",
        "{s} lies on the {v}.",
        "{s} is built on the banks of the {v}.",
        "The river that runs through {n} is the {v}.",
        "{s} sits beside the {v}.",
        "The {v} passes through the town of {n}.",
    ),
}
# Intros that state birth year, hometown and occupation at once ({y}, {t}, {av}; {S} = pronoun).
PERSON_INTROS: tuple[str, ...] = (
    "{n} (born {y}) is {av} from {t}.",
    "{n} is {av} who was born in {t} in {y}.",
    "Born in {t} in {y}, {n} works as {av}.",
    "{n} was born in {y} in the town of {t} and works as {av}.",
    "{n}, born in {t} in {y}, is {av} by trade.",
    "{n} is {av}. {S} was born in {y} in {t}.",
    "{n} is {av} from {t}, born in the year {y}.",
)
PLACE_INTROS: tuple[str, ...] = (
    "{n} is a town in {c} on the {r}.",
    "{n} is a town in {c}, founded in {f}.",
    "Founded in {f}, {n} is a town of {pop} people in {c}.",
    "{n} is a town on the {r}, founded in the year {f}.",
    "{n} is a town in {c} with a population of {pop}.",
)
_PLACE_INTRO_SLOTS = {"country": "c", "river": "r", "founded": "f", "population": "pop"}
QUESTIONS: dict[str, str] = {
    "birth_year": "In what year was {s} born?",
    "hometown": "In which town was {s} born?",
    "occupation": "What does {s} do for a living?",
    "pet": "What kind of pet does {s} have?",
    "sibling": "Who is {s}'s {r}?",
    "parent": "Who is {s}'s {r}?",
    "child": "Who is {s}'s {r}?",
    "spouse": "Who is {s} married to?",
    "friend": "Who is {s}'s best friend?",
    "country": "Which country is {s} in?",
    "founded": "In what year was {s} founded?",
    "population": "What is the population of {s}?",
    "river": "Which river flows through {s}?",
}

OPENINGS: tuple[str, ...] = (
    "One spring morning,",
    "On a cold winter day,",
    "Early one summer,",
    "One autumn afternoon,",
    "On a quiet Sunday,",
    "After a long week of rain,",
    "On the first warm day of the year,",
)
STORY_ENDINGS: tuple[str, ...] = (
    "They talked until the sun went down.",
    "In the evening they shared a simple dinner and many stories.",
    "It was a day that neither of them would forget.",
    "By nightfall everyone was tired but happy.",
    "Later they agreed to meet again before the winter.",
    "The walk home under the stars was quiet and peaceful.",
)
ITEMS: tuple[str, ...] = (
    "apples",
    "pears",
    "books",
    "coins",
    "candles",
    "eggs",
    "stones",
    "shells",
    "cups",
    "letters",
    "buttons",
    "plums",
    "marbles",
    "pencils",
)
STEP_WORDS: dict[int, str] = {2: "twos", 3: "threes", 5: "fives", 10: "tens"}

# ---------------------------------------------------------------- names
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_ONSETS += ("br", "dr", "gr", "kr", "st", "tr", "th", "sh", "fl", "gl", "j", "w")
_JOINS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "m", "d", "k")
_FEMALE_ENDS = ("a", "ia", "ena", "ira", "ella", "ina", "ora", "eth", "ys", "ine", "ila", "essa")
_MALE_ENDS = ("an", "or", "ek", "ul", "os", "im", "en", "ard", "io", "as", "ur", "orn")
_LAST_ENDS = ("ak", "ov", "ell", "ar", "is", "ett", "orn", "ani", "esk", "uin", "enko", "oss", "ec", "aro")
_PLACE_ENDS = ("mere", "ford", "holt", "wick", "by", "ton", "vale", "stead", "haven", "moor", "brook")
_PLACE_ENDS += ("dale", "port", "ham", "well", "crest", "field", "bury")
_RIVER_ENDS = ("el", "an", "is", "wen", "ora", "eth", "ay", "und", "ine", "ar")
_COUNTRY_ENDS = ("ia", "ora", "and", "esh", "avia", "eth", "ary", "onia", "ica", "una")

# Common English words outside the templates that a syllable name must never spell.
_EXTRA_WORDS = re.findall(
    r"[a-z]+",
    """
a an and are as at be by for from he her him his i in is it its me my of on or our she so that the
their them they this to was we were with you your all any but can did do had has have if into just
like more most no not now one only out over said some than then there these those up use very what
when where which while who why will would about after again also back been before both could each
even first how many may much must new off old other own same see should such take tell too two way
well year years day days man men woman women home house town city river country world name names
mother father sister brother son daughter wife husband friend friends parent child children sibling
born birth hometown occupation pet spouse founded population founding people person place places
dear love yours number numbers count counting plus minus times divided equals answer question sum
half double total left more less larger smaller older younger largest smallest sorted order letter
letters word words fair boat journey dinner table garden market morning evening night winter summer
spring autumn sunday week rain snow tea bread road hill hills park shop school dog cat owl duck pony
goat rose rosa maria anna john mary james david peter paul mark luke adam eve noah sara sarah lena
nina tina dora mira vera olga ivan igor boris elena maya mila lara kira ida ada ana ella bella
""",
)


def _template_words() -> set[str]:
    texts: list[str] = [*OPENINGS, *STORY_ENDINGS, *ITEMS, *PETS, *PERSON_INTROS, *PLACE_INTROS]
    texts += [*OCCUPATIONS, *OCCUPATIONS.values(), *QUESTIONS.values(), *RELATIONS]
    for table in (PERSON_TEMPLATES, PLACE_TEMPLATES):
        for templates in table.values():
            texts.extend(templates)
    for roles in ROLE.values():
        texts.extend(roles.values())
    words = {w for text in texts for w in re.findall(r"[a-z]+", text.lower())}
    return words | set(_EXTRA_WORDS) | set(STEP_WORDS.values())


# Every word the prose uses around names: a generated name that equals one would be ambiguous.
RESERVED_WORDS: frozenset[str] = frozenset(_template_words())


class WorldError(ChatforgeError, ValueError):
    """Bad arguments to ``build_world`` (too few entities, eval fraction out of range)."""


# ---------------------------------------------------------------- data model


@dataclass(frozen=True)
class Fact:
    """One ground-truth statement with a natural question and its short exact answer."""

    subject: str
    relation: str
    value: str
    question: str
    split: str  # "train" or "eval": the split of the subject entity


@dataclass(frozen=True)
class Person:
    name: str  # "First Last", unique within the world
    first: str
    last: str
    gender: str  # "female" or "male": only for pronouns and kinship words
    birth_year: int
    hometown: str  # a Place name
    occupation: str
    pet: str
    split: str
    sibling: str | None = None
    parent: str | None = None
    child: str | None = None
    spouse: str | None = None
    friend: str | None = None

    def kin(self) -> list[tuple[str, str]]:
        """(relation, person name) for each kinship relation this person has."""
        return [(rel, getattr(self, rel)) for rel in KINSHIP if getattr(self, rel) is not None]


@dataclass(frozen=True)
class Place:
    name: str  # a town, unique within the world
    country: str
    founded: int
    population: int
    river: str  # "Ornel River"
    split: str


def format_population(n: int) -> str:
    """The one spelling of a population used in facts and prose ("12,400")."""
    return f"{n:,}"


def fact_value(entity: Person | Place, relation: str) -> str | None:
    """The exact answer string for one relation of one entity, or None where it has none."""
    if isinstance(entity, Person):
        if relation == "birth_year":
            return str(entity.birth_year)
        if relation in PERSON_RELATIONS:
            return getattr(entity, relation)
        return None
    if relation == "founded":
        return str(entity.founded)
    if relation == "population":
        return format_population(entity.population)
    if relation in PLACE_RELATIONS:
        return getattr(entity, relation)
    return None


# The fields of a data record (``_Prose.records``), each an attribute of Person / Place named after its
# relation, written as stored (years and populations as integers, a missing relative as None): the names
# a JSON reply uses (data/chat.py), plus population and kin (a short reply starts with the relative's name).
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "person": ("hometown", "occupation", "birth_year", "pet", *KINSHIP),
    "place": ("country", "river", "founded", "population"),
}
# Share of each record format. Mostly lookup logs: a held-out name's two spellings (" Name" in the query,
# "Name" in the JSON) are paired nowhere else. With a third of them the base copied the name for 83 of 120
# people and the SFT's JSON replies named someone else in 37% of held-out samples; with 0.65: 103-107 of
# 120, 13-21% named someone else, JSON rule and fact 55% -> 67-83% (three SFT runs).
RECORD_FORMATS: dict[str, float] = {"json": 0.15, "lookup": 0.65, "csv": 0.2}


@dataclass
class World:
    """People, towns, countries and rivers, with lookups and the ground-truth fact list."""

    seed: int
    people: list[Person]
    places: list[Place]
    countries: list[str]
    rivers: list[str]
    _people: dict[str, Person] = field(init=False, repr=False, compare=False)
    _places: dict[str, Place] = field(init=False, repr=False, compare=False)
    _facts: list[Fact] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._people = {p.name: p for p in self.people}
        self._places = {p.name: p for p in self.places}
        self._facts = [f for e in [*self.people, *self.places] for f in self._entity_facts(e)]

    # lookups
    def person(self, name: str) -> Person:
        return self._people[name]

    def place(self, name: str) -> Place:
        return self._places[name]

    def entity(self, name: str) -> Person | Place:
        if name in self._people:
            return self._people[name]
        return self._places[name]

    def has_entity(self, name: str) -> bool:
        return name in self._people or name in self._places

    def entity_split(self, name: str) -> str:
        """'train' or 'eval' for a person or town; KeyError for anything else."""
        return self.entity(name).split

    def names(self) -> list[str]:
        """All person and town names, people first."""
        return [p.name for p in self.people] + [p.name for p in self.places]

    def people_in(self, split: str) -> list[Person]:
        return [p for p in self.people if p.split == split]

    def places_in(self, split: str) -> list[Place]:
        return [p for p in self.places if p.split == split]

    def born_in(self, town: str) -> list[Person]:
        return [p for p in self.people if p.hometown == town]

    def towns_in(self, country: str) -> list[Place]:
        return [p for p in self.places if p.country == country]

    def towns_on(self, river: str) -> list[Place]:
        return [p for p in self.places if p.river == river]

    def role(self, person: Person, relation: str) -> str:
        """The word for ``person``'s relative under ``relation`` ("sister", "father", "best friend")."""
        return ROLE[relation][self.person(getattr(person, relation)).gender]

    # facts
    def facts(self, split: str | None = None) -> list[Fact]:
        """Every fact, people first then towns, in a stable order; optionally one split only."""
        return [f for f in self._facts if split is None or f.split == split]

    def facts_about(self, name: str) -> list[Fact]:
        return [f for f in self._facts if f.subject == name]

    def values(self, relation: str) -> list[str]:
        """Distinct values a relation takes in this world, sorted (a pool for distractors)."""
        return sorted({f.value for f in self._facts if f.relation == relation})

    def _entity_facts(self, entity: Person | Place) -> list[Fact]:
        relations = PERSON_RELATIONS if isinstance(entity, Person) else PLACE_RELATIONS
        out = []
        for rel in relations:
            value = fact_value(entity, rel)
            if value is None:
                continue
            role = ROLE[rel][self._people[value].gender] if rel in KINSHIP else ""
            question = QUESTIONS[rel].format(s=entity.name, r=role)
            out.append(Fact(entity.name, rel, value, question, entity.split))
        return out


# ---------------------------------------------------------------- building the world


def worked_answer(a: int, op: str, b: int) -> str:
    """An arithmetic answer, in the chat replies and some pretraining lines. Sums and differences of
    two-digit numbers are worked column by column, ones first ("7 + 7 = 14: write 4, carry 1; 5 + 8 + 1 =
    14. So the answer is 144."): said in one go the model must write the tens digit before it has worked
    out the carry (held-out two-digit sums: 0% right). Each step is a one-digit fact, and the answer copies
    the last step's result and the written digit. It is not an equation ("So 57 + 87 = 144."): a base
    drilled on one-digit equations computed there instead of copying (13 of 145 sums assembled right).
    Single-digit sums, times tables and divisions are answered directly ("5 x 10 = 50.")."""
    if op not in "+-":
        c = a * b if op == "x" else a // b
        return f"{a} {op} {b} = {c}."
    c = a + b if op == "+" else a - b
    if a < 10 and b < 10:
        return f"{a} {op} {b} = {c}."
    a1, b1, a10, b10 = a % 10, b % 10, a // 10, b // 10
    # One shape for both: the ones column (its top digit takes the borrowed ten), then the tens column
    # with the carry or borrow as "+ 1" / "- 1".
    if op == "+":
        flag, word = int(a1 + b1 >= 10), "carry"
        top, ones, tens = a1, a1 + b1, a10 + b10 + flag
    else:
        flag, word = int(a1 < b1), "borrow"
        top = a1 + 10 * flag
        ones, tens = top - b1, a10 - b10 - flag
    step1 = f"{top} {op} {b1} = {ones}: write {ones % 10}" + (f", {word} 1" if flag else "")
    step2 = f"{a10} {op} {b10}" + (f" {op} 1" if flag else "") + f" = {tens}"
    return f"{step1}; {step2}. So the answer is {c}."


def capitalize_first(text: str) -> str:
    """``text`` with its first letter upper-cased and the rest kept (``str.capitalize`` lowers the rest)."""
    return text[:1].upper() + text[1:]


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _syllables(rng: random.Random, n: int) -> str:
    # 1 in 5 names opens on a vowel ("Orivan") for variety; otherwise strict consonant-vowel pairs.
    head = rng.choice("aeiou") if rng.random() < 0.2 else ""
    return head + "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n))


def _first_name(rng: random.Random, gender: str) -> str:
    ends = _FEMALE_ENDS if gender == "female" else _MALE_ENDS
    return _syllables(rng, rng.choice((1, 1, 2))) + rng.choice(_JOINS) + rng.choice(ends)


def _last_name(rng: random.Random) -> str:
    return _syllables(rng, rng.choice((1, 2))) + rng.choice(_JOINS) + rng.choice(_LAST_ENDS)


def _town_name(rng: random.Random) -> str:
    return _syllables(rng, rng.choice((1, 1, 2))) + rng.choice(_CODAS) + rng.choice(_PLACE_ENDS)


def _river_name(rng: random.Random) -> str:
    return _syllables(rng, rng.choice((1, 2))) + rng.choice(_JOINS) + rng.choice(_RIVER_ENDS)


def _country_name(rng: random.Random) -> str:
    return _syllables(rng, 2) + rng.choice(_JOINS) + rng.choice(_COUNTRY_ENDS)


def _fresh(
    rng: random.Random, make: Callable[[random.Random], str], used: set[str], lo: int = 4, hi: int = 10
) -> str:
    """A new name token: not a reserved word, and no substring of (or containing) any used token.

    The substring rule keeps "Kalford" and "Skalford" apart, so a name search never hits another.
    """
    for _ in range(10_000):
        low = make(rng).lower()
        if not lo <= len(low) <= hi or low in RESERVED_WORDS:
            continue
        if any(low in u or u in low for u in used):
            continue
        used.add(low)
        return low.capitalize()
    raise WorldError("could not invent enough distinct names; use a smaller world")


def _round_population(x: float) -> int:
    step = 100 if x >= 10_000 else 10
    return max(step, round(x / step) * step)


def _make_places(
    rng: random.Random, n_places: int, used: set[str]
) -> tuple[list[dict], list[str], list[str]]:
    n_countries = max(2, min(8, round(n_places / 6)))
    n_rivers = max(2, n_places // 3)
    countries = [_fresh(rng, _country_name, used, 6, 10) for _ in range(n_countries)]
    rivers = [_fresh(rng, _river_name, used, 4, 8) + " River" for _ in range(n_rivers)]
    # Every country and river gets at least one town; the rest are spread at random.
    country_of = [countries[i % n_countries] for i in range(n_places)]
    river_of = [rivers[i % n_rivers] for i in range(n_places)]
    rng.shuffle(country_of)
    rng.shuffle(river_of)
    places: list[dict] = []
    seen_pop: set[int] = set()
    seen_year: set[int] = set()
    for i in range(n_places):
        # Distinct founding years and populations so that comparisons never tie.
        founded = rng.randint(800, 1900)
        while founded in seen_year:
            founded = rng.randint(800, 1900)
        pop = _round_population(math.exp(rng.uniform(math.log(600), math.log(400_000))))
        while pop in seen_pop:
            pop = _round_population(math.exp(rng.uniform(math.log(600), math.log(400_000))))
        seen_year.add(founded)
        seen_pop.add(pop)
        name = _fresh(rng, _town_name, used, 7, 11)
        places.append(
            {
                "name": name,
                "country": country_of[i],
                "founded": founded,
                "population": pop,
                "river": river_of[i],
            }
        )
    return places, countries, rivers


def _make_units(rng: random.Random, n_people: int) -> list[tuple[str, int, int]]:
    """Pairs (kind, a, b) over people indices: each person is in exactly one primary pair.

    Each relation is single-valued (nobody has two siblings or two best friends), so every kinship fact
    has one exact answer. Parent/child pairs are the whole family: the parent has exactly one child.
    """
    order = list(range(n_people))
    rng.shuffle(order)
    units = []
    for i in range(0, n_people - 1, 2):
        kind = rng.choices(("sibling", "parent", "spouse", "friend"), weights=(25, 20, 25, 30))[0]
        units.append((kind, order[i], order[i + 1]))
    return units


def build_world(seed: int, n_people: int = 120, n_places: int = 40, eval_fraction: float = 0.2) -> World:
    """A deterministic world: the same arguments always give the same world, other seeds another."""
    if n_people < 2 or n_places < 2:
        raise WorldError(f"world needs at least 2 people and 2 places, got {n_people} and {n_places}")
    if n_places > 1000:  # founding years are distinct, and there are only so many of them
        raise WorldError(f"world supports at most 1000 places, got {n_places}")
    if not 0.0 <= eval_fraction < 1.0:
        raise WorldError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rng = random.Random(seed)
    used: set[str] = set()
    place_rows, countries, rivers = _make_places(rng, n_places, used)
    town_names = [p["name"] for p in place_rows]

    # People start as rows; kinship pairs then fix surnames, birth years and links both ways.
    rows: list[dict] = []
    for _ in range(n_people):
        rows.append(
            {
                "gender": rng.choice(("female", "male")),
                "birth_year": rng.randint(1935, 2004),
                "hometown": rng.choice(town_names),
                "occupation": rng.choice(list(OCCUPATIONS)),
                "pet": rng.choice(PETS),
                "last": None,
            }
        )
    units = _make_units(rng, n_people)
    for kind, a, b in units:
        ra, rb = rows[a], rows[b]
        if kind == "sibling":
            ra["last"] = rb["last"] = _fresh(rng, _last_name, used)
            rb["birth_year"] = min(2008, ra["birth_year"] + rng.choice((-1, 1)) * rng.randint(1, 7))
            if rng.random() < 0.8:  # siblings usually share a birthplace
                rb["hometown"] = ra["hometown"]
        elif kind == "parent":
            ra["last"] = rb["last"] = _fresh(rng, _last_name, used)
            ra["birth_year"] = rng.randint(1935, 1975)
            rb["birth_year"] = ra["birth_year"] + rng.randint(20, 38)
            if rng.random() < 0.6:
                rb["hometown"] = ra["hometown"]
        elif kind == "spouse":
            rb["birth_year"] = max(1935, min(2004, ra["birth_year"] + rng.randint(-6, 6)))
        ra["last"] = ra["last"] or _fresh(rng, _last_name, used)
        rb["last"] = rb["last"] or _fresh(rng, _last_name, used)
    for row in rows:
        row["last"] = row["last"] or _fresh(rng, _last_name, used)  # the odd person out, if any
        row["first"] = _fresh(rng, lambda r, g=row["gender"]: _first_name(r, g), used, 4, 9)
        row["name"] = f"{row['first']} {row['last']}"
        for rel in KINSHIP:
            row[rel] = None
    for kind, a, b in units:
        if kind == "parent":  # a is the parent, b the child
            rows[a]["child"], rows[b]["parent"] = rows[b]["name"], rows[a]["name"]
        else:
            rows[a][kind], rows[b][kind] = rows[b]["name"], rows[a]["name"]

    # A second relation for about half the people: best friends across different pairs.
    pair_of = {i: u for u in units for i in u[1:]}
    lonely = [i for i, row in enumerate(rows) if row["friend"] is None]
    rng.shuffle(lonely)
    if len(rows) % 2 == 1:  # the unpaired person must get a friend, so put them first
        odd = next(i for i in range(len(rows)) if i not in pair_of)
        lonely.remove(odd)
        lonely.insert(0, odd)
    want = max(2, len(lonely) // 4 * 2)  # an even number, about half of them
    picked: list[int] = []
    for i in lonely:
        if len(picked) >= want:
            break
        if len(picked) % 2 == 1 and i in pair_of and pair_of[i] == pair_of.get(picked[-1]):
            continue  # these two are already siblings, spouses or parent and child
        picked.append(i)
    for a, b in zip(picked[0::2], picked[1::2]):
        rows[a]["friend"] = rows[b]["name"]
        rows[b]["friend"] = rows[a]["name"]

    eval_people = set(rng.sample(range(n_people), round(eval_fraction * n_people)))
    eval_places = set(rng.sample(range(n_places), round(eval_fraction * n_places)))
    people = [
        Person(
            name=r["name"],
            first=r["first"],
            last=r["last"],
            gender=r["gender"],
            birth_year=r["birth_year"],
            hometown=r["hometown"],
            occupation=r["occupation"],
            pet=r["pet"],
            split="eval" if i in eval_people else "train",
            sibling=r["sibling"],
            parent=r["parent"],
            child=r["child"],
            spouse=r["spouse"],
            friend=r["friend"],
        )
        for i, r in enumerate(rows)
    ]
    places = [Place(**row, split="eval" if i in eval_places else "train") for i, row in enumerate(place_rows)]
    return World(seed=seed, people=people, places=places, countries=countries, rivers=rivers)


# ---------------------------------------------------------------- prose


class _Doc:
    """Accumulates sentences, lines and paragraphs without ever passing MAX_DOC_CHARS."""

    def __init__(self) -> None:
        self.text = ""

    def __len__(self) -> int:
        return len(self.text)

    def add(self, chunk: str, sep: str = " ") -> bool:
        sep = sep if self.text else ""
        if len(self.text) + len(sep) + len(chunk) > MAX_DOC_CHARS:
            return False
        self.text += sep + chunk
        return True


def _join(items: Sequence[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


class _Prose:
    def __init__(self, world: World, rng: random.Random, zipf: float = 0.0) -> None:
        self.w = world
        self.rng = rng
        self.zipf = zipf
        self._decks: dict[str, list] = {}
        self._fame: dict[int, list[float]] = {}

    def _next(self, key: str, items: Sequence[T]) -> T:
        """Draw from a shuffled deck that refills when empty: every entity gets its turn equally often.
        With ``zipf`` > 0, the k-th item (in the world's own order, which is random) has weight 1/k^zipf."""
        if self.zipf > 0:
            cum = self._fame.get(len(items))
            if cum is None:
                cum = list(itertools.accumulate(1.0 / (k + 1) ** self.zipf for k in range(len(items))))
                self._fame[len(items)] = cum
            return self.rng.choices(items, cum_weights=cum)[0]
        deck = self._decks.get(key)
        if not deck:
            deck = list(items)
            self.rng.shuffle(deck)
            self._decks[key] = deck
        return deck.pop()

    # -- single sentences, all rendered from fact_value so prose and facts() cannot disagree
    def pfact(self, person: Person, rel: str, mode: str = "full") -> str:
        value = fact_value(person, rel)
        assert value is not None
        if mode == "pronoun":
            s, p, o = PRONOUNS[person.gender]
        elif mode == "first":
            s, p, o = person.first, person.first + "'s", person.first
        else:
            s, p, o = person.name, person.name + "'s", person.name
        r = ri = ""
        if rel in KINSHIP:
            r = ROLE[rel][self.w.person(value).gender]
            ri = ROLE[INVERSE[rel]][person.gender]
        template = self.rng.choice(PERSON_TEMPLATES[rel])
        if "{s}" in template:  # "Mirela counts Dovan as her best friend", not "... as Mirela's best friend"
            p = PRONOUNS[person.gender][1]
        av = _with_article(value)
        return capitalize_first(template.format(s=s, p=p, o=o, n=person.name, v=value, av=av, r=r, ri=ri))

    def tfact(self, place: Place, rel: str, mode: str = "name") -> str:
        value = fact_value(place, rel)
        s, p = (place.name, place.name + "'s") if mode == "name" else ("it", "its")
        template = self.rng.choice(PLACE_TEMPLATES[rel])
        return capitalize_first(template.format(s=s, p=p, o=s, n=place.name, v=value))

    def any_pfact(self, person: Person, mode: str = "full") -> str:
        rels = [r for r in PERSON_RELATIONS if fact_value(person, r) is not None]
        return self.pfact(person, self.rng.choice(rels), mode)

    def any_tfact(self, place: Place) -> str:
        return self.tfact(place, self.rng.choice(PLACE_RELATIONS))

    def pad(self, doc: _Doc, people: Sequence[Person] = ()) -> None:
        """Top a short document up to MIN_DOC_CHARS with facts about the people involved (or anyone)."""
        pool = list(people) or self.w.people
        while len(doc) < MIN_DOC_CHARS:
            doc.add(self.any_pfact(self.rng.choice(pool)))

    def kin(self, person: Person) -> list[tuple[str, Person]]:
        return [(rel, self.w.person(name)) for rel, name in person.kin()]

    # -- encyclopedia entries
    def _title(self, doc: _Doc, name: str) -> str:
        """Maybe a heading; returns the separator for the first body sentence."""
        x = self.rng.random()
        if x < 0.3:
            doc.add(name)
        elif x < 0.45:
            doc.add(self.rng.choice(("About ", "Entry: ", "Profile of ")) + name)
        else:
            return " "
        return "\n\n"

    def person_entry(self) -> str:
        rng = self.rng
        person: Person = self._next("entry-person", self.w.people)
        doc = _Doc()
        sep = self._title(doc, person.name)
        rels = [r for r in PERSON_RELATIONS if fact_value(person, r) is not None]
        if rng.random() < 0.5:
            s = PRONOUNS[person.gender][0]
            intro = rng.choice(PERSON_INTROS).format(
                n=person.name,
                y=person.birth_year,
                t=person.hometown,
                av=_with_article(person.occupation),
                S=capitalize_first(s),
            )
            rest = [r for r in rels if r not in ("birth_year", "hometown", "occupation")]
        else:
            first = rng.choice(rels)
            intro = self.pfact(person, first, "full")
            rest = [r for r in rels if r != first]
        doc.add(intro, sep)
        rng.shuffle(rest)
        for rel in rest:
            doc.add(self.pfact(person, rel, rng.choice(("full", "first", "pronoun", "pronoun"))))
        # Extras about the people and town around the subject, always by full name (no stray pronouns).
        extras = [self.any_pfact(other) for _, other in self.kin(person)]
        extras.append(self.any_tfact(self.w.place(person.hometown)))
        rng.shuffle(extras)
        target = rng.randint(MIN_DOC_CHARS, 900)
        sep = "\n\n" if rng.random() < 0.5 else " "
        for sentence in extras:
            if len(doc) >= target:
                break
            doc.add(sentence, sep)
            sep = " "
        self.pad(doc, [person])
        return doc.text

    def place_entry(self) -> str:
        rng = self.rng
        place: Place = self._next("entry-place", self.w.places)
        doc = _Doc()
        sep = self._title(doc, place.name)
        pop = format_population(place.population)
        rels = list(PLACE_RELATIONS)
        if rng.random() < 0.5:
            intro = rng.choice(PLACE_INTROS)
            doc.add(intro.format(n=place.name, c=place.country, r=place.river, f=place.founded, pop=pop), sep)
            rest = [r for r in rels if "{" + _PLACE_INTRO_SLOTS[r] + "}" not in intro]
        else:
            first = rng.choice(rels)
            doc.add(self.tfact(place, first), sep)
            rest = [r for r in rels if r != first]
        rng.shuffle(rest)
        for rel in rest:
            doc.add(self.tfact(place, rel, rng.choice(("name", "name", "it"))))
        extras: list[str] = []
        natives = self.w.born_in(place.name)
        if natives:
            names = [p.name for p in rng.sample(natives, min(len(natives), 4))]
            extras.append(
                rng.choice(
                    (
                        "People born in {n} include {l}.",
                        "{n} is the hometown of {l}.",
                        "Among those born in {n} are {l}.",
                    )
                ).format(n=place.name, l=_join(names))
            )
            for name in names[:2]:
                extras.append(
                    self.pfact(self.w.person(name), rng.choice(("occupation", "birth_year", "pet")))
                )
        neighbours = [p.name for p in self.w.towns_on(place.river) if p.name != place.name]
        if neighbours:
            extras.append(f"The {place.river} also flows through {_join(neighbours[:4])}.")
        others = [p.name for p in self.w.towns_in(place.country) if p.name != place.name]
        if others:
            extras.append(f"Other towns in {place.country} include {_join(others[:4])}.")
        sep = "\n\n" if rng.random() < 0.5 else " "
        for sentence in extras:
            doc.add(sentence, sep)
            sep = " "
        self.pad(doc, natives)
        return doc.text

    def overview(self) -> str:
        """A country or a river with its towns: states town facts from the other direction."""
        rng = self.rng
        doc = _Doc()
        if rng.random() < 0.5:
            country: str = self._next("country", self.w.countries)
            towns = self.w.towns_in(country)
            n = len(towns)
            listed = _join([t.name for t in towns])
            doc.add(f"{country} is a country with {n} town{'s' * (n > 1)}: {listed}.")
        else:
            river: str = self._next("river", self.w.rivers)
            towns = self.w.towns_on(river)
            doc.add(f"The {river} flows through {_join([t.name for t in towns])}.")
        for town in rng.sample(towns, len(towns)):
            doc.add(self.any_tfact(town))
        while len(doc) < MIN_DOC_CHARS and doc.add(self.any_tfact(rng.choice(self.w.places))):
            pass
        return doc.text

    # -- stories
    def story(self) -> str:
        rng = self.rng
        person: Person = self._next("story", self.w.people)
        kinds = [self._visit, self._letter, self._pet_story, self._work_day, self._gathering, self._fair]
        if len(self.w.towns_on(self.w.place(person.hometown).river)) >= 2:
            kinds.append(self._journey)
        doc = _Doc()
        involved = rng.choice(kinds)(doc, person)
        self.pad(doc, involved)
        return doc.text

    def _relative(self, person: Person) -> tuple[str, Person] | None:
        kin = self.kin(person)
        return self.rng.choice(kin) if kin else None

    def _visit(self, doc: _Doc, p: Person) -> list[Person]:
        rng = self.rng
        rel = self._relative(p)
        if rel is None:
            return self._work_day(doc, p)
        relation, q = rel
        s, pp, _ = PRONOUNS[p.gender]
        qp = PRONOUNS[q.gender][1]
        role = ROLE[relation][q.gender]
        role_back = ROLE[INVERSE[relation]][p.gender]
        if rng.random() < 0.5:
            doc.add(
                f"{rng.choice(OPENINGS)} {p.name}, {_with_article(p.occupation)} from {p.hometown}, "
                f"set out to visit {pp} {role} {q.name}."
            )
        else:
            doc.add(f"{rng.choice(OPENINGS)} {p.name} decided to visit {pp} {role}, {q.name}.")
        if q.hometown != p.hometown:
            river = self.w.place(q.hometown).river
            doc.add(f"The way to {q.hometown}, where {q.first} was born, follows the {river}.")
        else:
            doc.add(f"Since both of them were born in {p.hometown}, the walk was a short one.")
        doc.add(
            rng.choice(
                (
                    f"{p.first} took {pp} {p.pet} along.",
                    f"{capitalize_first(pp)} {p.pet} came along for the trip.",
                )
            )
        )
        doc.add(f"When {s} arrived, {q.first} was busy {OCCUPATIONS[q.occupation]}.")
        doc.add(f'"Welcome, {p.first}," said {q.first}. "It is good to see my {role_back} again."')
        extra = rng.choice(
            (
                f"Over tea, {q.first} talked about {qp} {q.pet}.",
                f"{q.first} was born in {q.birth_year}, and {p.first} teased {PRONOUNS[q.gender][2]} "
                f"about getting old.",
                self.pfact(q, "occupation", "first"),
            )
        )
        doc.add(extra)
        doc.add(rng.choice(STORY_ENDINGS))
        return [p, q]

    def _letter(self, doc: _Doc, p: Person) -> list[Person]:
        rng = self.rng
        rel = self._relative(p)
        if rel is None:
            return self._pet_story(doc, p)
        relation, q = rel
        role_back = ROLE[INVERSE[relation]][p.gender]
        doc.add(f"A letter from {p.name} to {q.name}")
        doc.add(f"Dear {q.first},", "\n\n")
        body = [
            f"My {p.pet} is asleep next to me as I write.",
            f"Work keeps me busy, as always; being {_with_article(p.occupation)} means "
            f"{OCCUPATIONS[p.occupation]} most days.",
            f"How is life as {_with_article(q.occupation)}?",
            f"Please give my love to your {q.pet}.",
        ]
        if q.hometown != p.hometown:
            body.append(f"I often think of {q.hometown}, the town where you were born.")
        rng.shuffle(body)
        body.insert(0, f"I am writing to you from {p.hometown}, the town where I was born.")
        sep = "\n\n"
        for line in body[: rng.randint(3, len(body))]:
            doc.add(line, sep)
            sep = " "
        closing = rng.choice(("Your", "With love from your", "All the best from your"))
        doc.add(f"{closing} {role_back},\n{p.name}", "\n\n")
        return [p, q]

    def _pet_story(self, doc: _Doc, p: Person) -> list[Person]:
        rng = self.rng
        s, pp, _ = PRONOUNS[p.gender]
        river = self.w.place(p.hometown).river
        doc.add(f"{p.name} has {_with_article(p.pet)}.")
        doc.add(
            rng.choice(("One morning", "One evening", "Last week")) + f" the {p.pet} was nowhere to be found."
        )
        doc.add(f"{p.first} searched all over {p.hometown}, the town where {s} was born.")
        involved = [p]
        rel = self._relative(p)
        if rel is not None:
            relation, q = rel
            doc.add(f"{q.name}, {pp} {ROLE[relation][q.gender]}, came to help with the search.")
            involved.append(q)
        where = rng.choice(
            (
                f"sleeping under a bench by the {river}",
                "hiding in a basket of laundry",
                "sitting on the roof of the bakery",
                "curled up in the garden shed",
            )
        )
        doc.add(f"At last they found the {p.pet} {where}.")
        doc.add(f"{p.first} carried the {p.pet} home and gave it a good dinner.")
        return involved

    def _work_day(self, doc: _Doc, p: Person) -> list[Person]:
        rng = self.rng
        s, pp, o = PRONOUNS[p.gender]
        place = self.w.place(p.hometown)
        doc.add(
            f"{p.name} is {_with_article(p.occupation)} in {p.hometown}, the town where {s} was born in {p.birth_year}."
        )
        doc.add(f"Every morning {s} starts work early, {OCCUPATIONS[p.occupation]}.")
        doc.add(self.tfact(place, rng.choice(PLACE_RELATIONS)))
        doc.add(f"{capitalize_first(pp)} {p.pet} keeps {o} company while {s} works.")
        involved = [p]
        rel = self._relative(p)
        if rel is not None:
            relation, q = rel
            doc.add(f"In the afternoon, {pp} {ROLE[relation][q.gender]} {q.name} stopped by to say hello.")
            doc.add(self.pfact(q, rng.choice(("occupation", "pet", "birth_year")), "first"))
            involved.append(q)
        doc.add(
            rng.choice(("When the work was done, " + s + " went home for supper.", rng.choice(STORY_ENDINGS)))
        )
        return involved

    def _gathering(self, doc: _Doc, p: Person) -> list[Person]:
        rng = self.rng
        pp, o = PRONOUNS[p.gender][1:]
        kin = self.kin(p)
        if not kin:
            return self._work_day(doc, p)
        doc.add(f"{rng.choice(OPENINGS)} {p.name} invited the people closest to {o} to dinner.")
        involved = [p]
        for relation, q in kin:
            doc.add(
                f"{q.name}, {pp} {ROLE[relation][q.gender]}, arrived {rng.choice(('first', 'early', 'late', 'on time'))}."
            )
            doc.add(self.pfact(q, rng.choice(("occupation", "hometown", "pet", "birth_year")), "first"))
            involved.append(q)
            # One more step out: the relative's own relatives make multi-hop chains.
            for rel2, r2 in self.kin(q):
                if r2.name != p.name and rng.random() < 0.6:
                    qp = PRONOUNS[q.gender][1]
                    doc.add(f"{q.first} brought {qp} {ROLE[rel2][r2.gender]}, {r2.name}.")
                    involved.append(r2)
        doc.add(rng.choice(STORY_ENDINGS))
        return involved

    def _fair(self, doc: _Doc, p: Person) -> list[Person]:
        rng = self.rng
        town = self.w.place(p.hometown)
        doc.add(f"Every summer, the town of {town.name} holds a fair on the banks of the {town.river}.")
        doc.add(self.tfact(town, rng.choice(("country", "founded", "population"))))
        natives = [p] + [x for x in self.w.born_in(town.name) if x.name != p.name]
        natives = natives[:1] + rng.sample(natives[1:], min(2, len(natives) - 1))
        for x in natives:
            doc.add(
                f"{x.name}, {_with_article(x.occupation)} born in {town.name} in {x.birth_year}, "
                f"spent the day {OCCUPATIONS[x.occupation]}."
            )
        doc.add(
            rng.choice(
                (
                    f"When the lanterns were lit, the whole of {town.name} sang together.",
                    "The fair ended with music and dancing late into the night.",
                )
            )
        )
        return natives

    def _journey(self, doc: _Doc, p: Person) -> list[Person]:
        rng = self.rng
        home = self.w.place(p.hometown)
        towns = [t for t in self.w.towns_on(home.river) if t.name != home.name]
        stops = rng.sample(towns, min(3, len(towns)))
        doc.add(f"The {home.river} flows through {_join([home.name] + [t.name for t in stops])}.")
        doc.add(
            f"{p.name}, {_with_article(p.occupation)} born in {home.name} in {p.birth_year}, "
            f"once travelled down the river by boat."
        )
        for town in stops:
            doc.add(f"{p.first} stopped in {town.name}.")
            doc.add(
                self.tfact(town, rng.choice(("country", "founded", "population")), rng.choice(("name", "it")))
            )
        doc.add(f"The journey took many days, and {p.first} never forgot it.")
        return [p]

    # -- question-and-answer pages (train-split entities only)
    def qa_page(self) -> str:
        """A quiz or FAQ page about train-split entities: questions with answers stated in prose.

        Seeing knowledge asked for as well as stated during pretraining is what lets fine-tuning later
        extract facts about entities that were only ever described (Allen-Zhu & Li, Physics of LMs 3.1);
        held-out entities never appear here, so the eval still measures that transfer.
        """
        rng = self.rng
        doc = _Doc()
        doc.add(rng.choice(("Questions and answers", "Quiz", "Frequently asked questions", "Q&A", "Trivia")))
        people = self.w.people_in("train")
        places = self.w.places_in("train")
        if not people or not places:  # a toy world with everything held out
            return self.counting()
        target = rng.randint(MIN_DOC_CHARS + 20, 900)
        q_tag, a_tag = rng.choice((("Q:", "A:"), ("Question:", "Answer:"), ("-", "")))
        while len(doc) < target:
            if rng.random() < 0.75:
                entity: Person | Place = self._next("qa-person", people)
                rels = [r for r in PERSON_RELATIONS if fact_value(entity, r) is not None]
            else:
                entity = self._next("qa-place", places)
                rels = list(PLACE_RELATIONS)
            for rel in rng.sample(rels, min(len(rels), rng.randint(1, 3))):
                role = ROLE[rel][self.w.person(fact_value(entity, rel)).gender] if rel in KINSHIP else ""
                question = QUESTIONS[rel].format(s=entity.name, r=role)
                if isinstance(entity, Person):
                    answer = self.pfact(entity, rel, rng.choice(("full", "full", "pronoun")))
                else:
                    answer = self.tfact(entity, rel, rng.choice(("name", "it")))
                line = f"{q_tag} {question}\n{a_tag} {answer}".replace("\n ", "\n")
                if not doc.add(line, "\n\n"):
                    return doc.text
        return doc.text

    # -- data records
    def records(self) -> str:
        """A data dump: JSON lines, a lookup log (a query line, then the JSON record) or a CSV table of
        entities, every field a fact of the world.

        Prose puts a value after a space (" ferret"); a JSON or CSV field puts it after a quote or comma
        ("ferret"), which BPE encodes with other tokens. Seeing every entity's facts in that form too is
        what lets a chat model recall a held-out entity's facts inside a JSON reply, and the lookup log
        pairs a name's two spellings (" Shura" then "Shura"), which a JSON reply to a question must copy.
        """
        rng = self.rng
        doc = _Doc()
        people_side = rng.random() < 0.7
        key, side = ("name", "person") if people_side else ("town", "place")
        rels = RECORD_FIELDS[side]
        entities: Sequence[Person | Place] = self.w.people if people_side else self.w.places
        plural = "people" if people_side else "towns"
        fmt = rng.choices(list(RECORD_FORMATS), weights=list(RECORD_FORMATS.values()))[0]
        heading = {
            "json": (f"{plural}.jsonl", "Export", "Data"),
            "lookup": ("Query log", "Lookup session", "Registry lookups"),
            "csv": (f"{plural}.csv", "Table"),
        }[fmt]
        doc.add(rng.choice(heading))
        verb = rng.choice(("find", "lookup", "get"))
        cols = rng.sample(rels, rng.randint(1, len(rels)))
        if fmt == "csv":
            doc.add(",".join([key, *cols]), "\n")
        target = rng.randint(MIN_DOC_CHARS + 40, 1200)
        while len(doc) < target:
            entity = self._next(f"record-{side}", entities)
            values = {rel: getattr(entity, rel) for rel in rels}
            if fmt != "csv":  # each line its own fields, in its own order
                has = [f for f, v in values.items() if v is not None]
                picked = rng.sample(has, rng.randint(1, len(has)))
                line = json.dumps({key: entity.name} | {f: values[f] for f in picked}, separators=(",", ":"))
                if fmt == "lookup":  # the name asked for as prose writes it (" Name"), then as JSON does
                    line = f"> {verb} {entity.name}\n{line}"
            else:  # an entity without that relative leaves its cell empty
                line = ",".join([entity.name, *("" if values[c] is None else str(values[c]) for c in cols)])
            if not doc.add(line, "\n"):
                break
        return doc.text

    # -- arithmetic
    def arithmetic(self) -> str:
        rng = self.rng
        doc = _Doc()
        if rng.random() < 0.4:
            doc.add(
                rng.choice(
                    ("Arithmetic practice", "Sums with answers", "Maths exercises", "Practice problems")
                )
            )
        target = rng.randint(MIN_DOC_CHARS + 20, 800)
        while len(doc) < target:
            line = self._word_problem() if rng.random() < 0.25 else self._equation()
            if not doc.add(line, "\n"):
                break
        return doc.text

    def _drill(self) -> str:
        """A drill line of one-column facts, exactly as the steps of a worked sum write them, and times
        tables ("7 + 6 = 13; 4 + 8 + 1 = 13; 12 - 7 = 5; 6 - 2 - 1 = 3; 7 x 8 = 56."). Scattered among the
        equations they were too rare: a base pretrained on them got 10 of the 100 one-digit sums right,
        and its SFT wrote "2 + 7 = 10" inside otherwise right worked replies (ones column right 49%, tens
        31%)."""
        rng = self.rng
        facts = []
        for _ in range(rng.randint(5, 8)):
            kind = rng.randrange(5)
            if kind == 0:  # ones column of a sum
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                facts.append(f"{a} + {b} = {a + b}")
            elif kind == 1:  # tens column with the carry
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                facts.append(f"{a} + {b} + 1 = {a + b + 1}")
            elif kind == 2:  # ones column of a difference, borrowed ten included
                b, c = rng.randint(0, 9), rng.randint(0, 9)
                facts.append(f"{b + c} - {b} = {c}")
            elif kind == 3:  # tens column after a borrow
                a = rng.randint(1, 9)
                b = rng.randint(0, a - 1)
                facts.append(f"{a} - {b} - 1 = {a - b - 1}")
            else:  # times tables, which the drilled sums would otherwise crowd out
                a, b = rng.randint(1, 12), rng.randint(1, 12)
                facts.append(f"{a} x {b} = {a * b}")
        return "; ".join(facts) + "."

    def _equation(self) -> str:
        rng = self.rng
        op = rng.choice("+-x/")
        if rng.random() < 1 / 3:  # times tables too: drilled sums alone crowded them out (SFT 69% -> 38%)
            return self._drill()
        # A third of the sums and differences are one column's ("8 + 6 = 14", "12 - 7 = 5"): the facts a
        # worked sum is made of, which random two-digit operands hardly ever show (a base trained without
        # them wrote "9 + 1 = 14: write 4, carry 1; ...": 3 of 100 worked sums right).
        one_column = rng.random() < 1 / 3
        if op == "+":
            a, b = (
                (rng.randint(0, 9), rng.randint(0, 9))
                if one_column
                else (rng.randint(0, 99), rng.randint(0, 99))
            )
            c, word = a + b, "plus"
        elif op == "-":
            if one_column:
                b = rng.randint(0, 9)
                a = b + rng.randint(0, 9)
            else:
                a = rng.randint(0, 120)
                b = rng.randint(0, a)
            c, word = a - b, "minus"
        elif op == "x":
            a, b = rng.randint(1, 12), rng.randint(1, 12)
            c, word = a * b, "times"
        else:
            b, c = rng.randint(1, 12), rng.randint(1, 12)
            a, word = b * c, "divided by"
        form = rng.randrange(8)
        if form == 5 and op in "+-":
            return f"Double {a} is {2 * a}." if op == "+" else f"Half of {2 * a} is {a}."
        if op in "+-" and max(a, b) >= 10:
            # Two-digit sums (but the doublings) are all worked, as SFT's replies work them: the steps
            # teach the column facts and the copy of each operand's digits. With a quarter of them worked
            # (383 in the corpus) one pretraining seed learned the tens-digit copy (56 of 60 sums) and
            # another did not (0 of 60: "1 + 0" for 59 + 63); with all, four seeds of four did (53-59).
            # Said in one go, a two-digit sum teaches a 4-layer model nothing it can use.
            lead = (f"{a} {word} {b}:", f"{a} {op} {b}:", f"What is {a} {word} {b}?")[form % 3]
            return f"{lead} {worked_answer(a, op, b)}"
        if form in (0, 5):
            return f"{a} {op} {b} = {c}"
        if form == 1:
            return f"{a} {word} {b} {rng.choice(('equals', 'is'))} {c}."
        if form == 2:
            return f"What is {a} {word} {b}? {rng.choice(('The answer is', 'It is'))} {c}."
        if form == 3:
            return f"Q: {a} {op} {b} = ?\nA: {c}"
        return f"{a} {op} {b} = {c}, so {a} {word} {b} is {c}."

    def _word_problem(self) -> str:
        rng = self.rng
        p: Person = rng.choice(self.w.people)
        s, pp, _ = PRONOUNS[p.gender]
        items = rng.choice(ITEMS)
        kind = rng.randrange(5)
        if kind == 0:
            a, b = rng.randint(2, 40), rng.randint(2, 30)
            return f"{p.name} has {a} {items}. {capitalize_first(s)} gets {b} more. Now {s} has {a + b} {items}, because {a} + {b} = {a + b}."
        if kind == 1:
            a = rng.randint(5, 60)
            b = rng.randint(2, a - 1)
            if p.friend:
                to = f"{pp} best friend {p.friend}"
            elif p.kin():
                rel, name = p.kin()[0]
                to = f"{pp} {ROLE[rel][self.w.person(name).gender]} {name}"
            else:
                to = "a neighbour"
            return f"{p.name} had {a} {items} and gave {b} of them to {to}. {capitalize_first(s)} has {a - b} left, because {a} - {b} = {a - b}."
        if kind == 2:
            a, b = rng.randint(2, 9), rng.randint(2, 12)
            return (
                f"{p.name}, the {p.occupation}, fills {a} baskets with {b} {items} each. That makes {a * b} "
                f"{items} in all, because {a} x {b} = {a * b}."
            )
        if kind == 3:
            b, each = rng.randint(2, 6), rng.randint(2, 10)
            return f"{p.name} shares {b * each} {items} equally among {b} friends. Each friend gets {each}, because {b * each} / {b} = {each}."
        k = rng.randint(1, max(1, min(60, 2024 - p.birth_year)))
        y = p.birth_year
        return f"{p.name} was born in {y}. In {y + k}, {s} turned {k}, because {y + k} - {y} = {k}."

    # -- counting, ordering, comparison
    def counting(self) -> str:
        rng = self.rng
        doc = _Doc()
        if rng.random() < 0.4:
            doc.add(
                rng.choice(
                    (
                        "Counting and comparing",
                        "Numbers in order",
                        "Bigger and smaller",
                        "Putting things in order",
                    )
                )
            )
        makers = [self._count, self._count, self._compare_numbers, self._sort_numbers, self._letters]
        makers += [self._alphabetical, self._compare_people, self._order_people, self._compare_towns]
        target = rng.randint(MIN_DOC_CHARS + 20, 800)
        while len(doc) < target:
            if not doc.add(rng.choice(makers)(), "\n"):
                break
        return doc.text

    def _count(self) -> str:
        rng = self.rng
        step = rng.choice((1, 1, 1, 2, 3, 5, 10))
        length = rng.randint(5, 14)
        if rng.random() < 0.3:
            end = step * rng.randint(1, 5) if step > 1 else rng.randint(0, 60)
            start = end + step * (length - 1)
            seq = list(range(start, end - 1, -step))
            by = f" by {STEP_WORDS[step]}" if step > 1 else ""
            return f"Counting down{by} from {start} to {end}: {', '.join(map(str, seq))}."
        start = step * rng.randint(0, 10) if step > 1 else rng.randint(0, 80)
        seq = list(range(start, start + step * length, step))
        by = f" by {STEP_WORDS[step]}" if step > 1 else ""
        return f"Counting{by} from {seq[0]} to {seq[-1]}: {', '.join(map(str, seq))}."

    def _compare_numbers(self) -> str:
        rng = self.rng
        a, b = rng.sample(range(0, 200), 2)
        hi, lo = max(a, b), min(a, b)
        form = rng.randrange(5)
        if form == 0:
            return f"{hi} is greater than {lo}."
        if form == 1:
            return f"{lo} is less than {hi}."
        if form == 2:
            return f"Which is larger, {a} or {b}? {hi} is larger."
        if form == 3:
            return f"The number after {a} is {a + 1}."
        return f"The number before {hi} is {hi - 1}."

    def _sort_numbers(self) -> str:
        rng = self.rng
        nums = rng.sample(range(0, 100), rng.randint(3, 7))
        if rng.random() < 0.3:
            which, val = rng.choice((("largest", max(nums)), ("smallest", min(nums))))
            return f"The {which} of {_join([str(n) for n in nums])} is {val}."
        if rng.random() < 0.5:
            return f"From smallest to largest: {', '.join(map(str, sorted(nums)))}."
        return f"From largest to smallest: {', '.join(map(str, sorted(nums, reverse=True)))}."

    def _letters(self) -> str:
        rng = self.rng
        p = rng.choice(self.w.people)
        token = rng.choice((p.first, p.last, p.hometown))
        return f"The name {token} has {len(token)} letters: {'-'.join(token)}."

    def _alphabetical(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            names = [p.name for p in rng.sample(self.w.people, min(len(self.w.people), rng.randint(3, 6)))]
            return f"In alphabetical order, these people are: {', '.join(sorted(names))}."
        names = [p.name for p in rng.sample(self.w.places, min(len(self.w.places), rng.randint(3, 6)))]
        return f"Sorted alphabetically, these towns are: {', '.join(sorted(names))}."

    def _compare_people(self) -> str:
        rng = self.rng
        a, b = rng.sample(self.w.people, 2)
        if a.birth_year == b.birth_year:
            return f"{a.name} and {b.name} were both born in {a.birth_year}."
        old, young = (a, b) if a.birth_year < b.birth_year else (b, a)
        form = rng.randrange(3)
        if form == 0:
            return (
                f"{old.name} was born in {old.birth_year} and {young.name} was born in {young.birth_year}, "
                f"so {old.name} is older than {young.name}."
            )
        if form == 1:
            return (
                f"{young.name} (born {young.birth_year}) is younger than {old.name} (born {old.birth_year})."
            )
        diff = young.birth_year - old.birth_year
        return (
            f"{old.name} is {diff} years older than {young.name}: {old.first} was born in {old.birth_year}, "
            f"{young.first} in {young.birth_year}."
        )

    def _order_people(self) -> str:
        rng = self.rng
        group = rng.sample(self.w.people, min(len(self.w.people), rng.randint(3, 5)))
        group.sort(key=lambda p: (p.birth_year, p.name))
        if rng.random() < 0.5:
            return (
                "From oldest to youngest: "
                + ", ".join(f"{p.name} (born {p.birth_year})" for p in group)
                + "."
            )
        group.reverse()
        return "From youngest to oldest: " + ", ".join(f"{p.name} (born {p.birth_year})" for p in group) + "."

    def _compare_towns(self) -> str:
        rng = self.rng
        a, b = rng.sample(self.w.places, 2)
        form = rng.randrange(4)
        if form == 0:
            big, small = (a, b) if a.population > b.population else (b, a)
            return (
                f"{big.name} has {format_population(big.population)} people and {small.name} has "
                f"{format_population(small.population)}, so {big.name} is larger than {small.name}."
            )
        if form == 1:
            big, small = (a, b) if a.population > b.population else (b, a)
            return (
                f"With {format_population(small.population)} inhabitants, {small.name} is smaller than "
                f"{big.name}, which has {format_population(big.population)}."
            )
        if form == 2:
            old, new = (a, b) if a.founded < b.founded else (b, a)
            return f"{old.name} was founded in {old.founded} and {new.name} in {new.founded}, so {old.name} is older than {new.name}."
        towns = self.w.towns_in(a.country)
        if len(towns) < 2:
            return f"{a.name} is the only town in {a.country}."
        top = max(towns, key=lambda t: t.population)
        return (
            f"The largest town in {a.country} is {top.name}, with {format_population(top.population)} people."
        )


# Bumped whenever pretrain_documents writes different text for the same config: the speedrun's stage
# hash includes it, so pulling such a change re-runs the stages built on the text instead of keeping them.
# 2: worked two-digit sums and one-column facts in the arithmetic documents. 3: drill lines of one-column
# facts and times tables; worked sums close with "So the answer is N." 4: most data records are lookup logs.
# 5: every two-digit sum and difference is worked (a quarter were), after a "+"/"What is" lead too.
TEXT_VERSION = 5


def text_version(sources: Iterable[Any]) -> dict[str, int]:
    """``{"world_text": TEXT_VERSION}`` for data sources that include the built-in world, else ``{}``:
    what a stage or scaling-run hash adds so that other text for the same config re-runs it."""
    return {"world_text": TEXT_VERSION} if any(s.kind == "world" for s in sources) else {}


# Share of each kind of document; entries and stories carry the facts, the rest teaches skills.
DOC_KINDS: dict[str, float] = {
    "person_entry": 0.22,
    "place_entry": 0.08,
    "overview": 0.03,
    "story": 0.22,
    "qa_page": 0.10,
    "arithmetic": 0.18,
    "counting": 0.17,
}


def pretrain_documents(
    world: World, n_docs: int, seed: int, zipf: float = 0.0, records: float = 0.0
) -> list[str]:
    """``n_docs`` plain-English documents (MIN_DOC_CHARS..MAX_DOC_CHARS characters) about ``world``.

    Deterministic in (world, n_docs, seed, zipf, records). Every fact is stated exactly as
    ``world.facts()`` has it. ``zipf`` > 0 draws the documents' main entities by fame (weight 1/k^zipf)
    instead of in equal turns. ``records`` is the share of data records (JSON lines, lookup logs, CSV
    tables) among the documents; the other kinds keep their proportions (0: exactly the corpus from before
    records existed).
    """
    if zipf < 0:
        raise WorldError(f"zipf must be >= 0, got {zipf}")
    if not 0 <= records < 1:
        raise WorldError(f"records must be in [0, 1), got {records}")
    rng = random.Random(f"chatforge-pretrain:{world.seed}:{seed}")  # str seeds are hashed stably
    prose = _Prose(world, rng, zipf)
    makers: dict[str, Callable[[], str]] = {
        "person_entry": prose.person_entry,
        "place_entry": prose.place_entry,
        "overview": prose.overview,
        "story": prose.story,
        "arithmetic": prose.arithmetic,
        "counting": prose.counting,
        "qa_page": prose.qa_page,
        "records": prose.records,
    }
    shares = dict(DOC_KINDS)
    if records:  # only then: a records-free corpus stays byte-identical to the one before records existed
        shares = {k: v * (1 - records) / sum(DOC_KINDS.values()) for k, v in DOC_KINDS.items()}
        shares["records"] = records
    kinds = rng.choices(list(shares), weights=list(shares.values()), k=n_docs)
    return [makers[kind]() for kind in kinds]
