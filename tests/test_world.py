"""The built-in world: determinism, consistency of the entity graph, and prose that agrees with facts()."""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from collections import defaultdict

import pytest

from chatforge.data.world import (
    KINSHIP,
    MAX_DOC_CHARS,
    MIN_DOC_CHARS,
    OCCUPATIONS,
    PERSON_TEMPLATES,
    PETS,
    PLACE_TEMPLATES,
    RECORD_FIELDS,
    RELATIONS,
    RESERVED_WORDS,
    ROLE,
    STEP_WORDS,
    Fact,
    Person,
    Place,
    World,
    WorldError,
    build_world,
    fact_value,
    pretrain_documents,
)


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(0)


@pytest.fixture(scope="module")
def docs(world: World) -> list[str]:
    return pretrain_documents(world, 4000, 0)


def names_regex(world: World) -> str:
    # Longest first so that a full name wins over any shorter alternative.
    return "|".join(re.escape(n) for n in sorted(world.names(), key=len, reverse=True))


def value_regex(value: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w,])" + re.escape(value) + r"(?![\w]|,\d)")


# ---------------------------------------------------------------- the world itself


def test_same_seed_same_world_and_docs() -> None:
    assert build_world(7) == build_world(7)
    assert build_world(7).facts() == build_world(7).facts()
    w = build_world(7)
    assert pretrain_documents(w, 300, 1) == pretrain_documents(build_world(7), 300, 1)


def test_other_seed_other_world_and_docs() -> None:
    a, b = build_world(1), build_world(2)
    assert set(a.names()).isdisjoint(b.names())
    assert pretrain_documents(a, 50, 0) != pretrain_documents(a, 50, 1)
    assert pretrain_documents(a, 50, 0) != pretrain_documents(b, 50, 0)


def test_sizes_and_lookups(world: World) -> None:
    assert len(world.people) == 120 and len(world.places) == 40
    p = world.people[5]
    assert world.person(p.name) is p and world.entity(p.name) is p
    town = world.place(p.hometown)
    assert isinstance(town, Place) and p in world.born_in(town.name)
    assert town in world.towns_in(town.country) and town in world.towns_on(town.river)
    assert set(world.values("pet")) <= set(PETS)
    assert set(world.values("occupation")) <= set(OCCUPATIONS)
    with pytest.raises(KeyError):
        world.entity_split("Nobody Atall")


def test_bad_arguments() -> None:
    with pytest.raises(WorldError):
        build_world(0, n_people=1)
    with pytest.raises(ValueError):
        build_world(0, n_places=1)
    with pytest.raises(ValueError):
        build_world(0, eval_fraction=1.0)


def test_names_unique_and_distinct(world: World) -> None:
    full = [p.name for p in world.people]
    assert len(set(full)) == len(full)
    firsts = [p.first for p in world.people]
    assert len(set(firsts)) == len(firsts)
    towns = [p.name for p in world.places]
    assert len(set(towns)) == len(towns)
    stems = [r.removesuffix(" River") for r in world.rivers]
    tokens = firsts + sorted({p.last for p in world.people}) + towns + world.countries + stems
    assert len(set(tokens)) == len(tokens)
    # No token inside another: a search for one name never finds a different one.
    lowered = [t.lower() for t in tokens]
    for i, a in enumerate(lowered):
        for b in lowered[i + 1 :]:
            assert a not in b and b not in a, (a, b)
    for t in tokens:
        assert re.fullmatch(r"[A-Z][a-z]+", t), t


def test_names_never_collide_with_relation_words(world: World) -> None:
    vocab = set(RELATIONS) | set(OCCUPATIONS) | set(PETS)
    vocab |= {w for roles in ROLE.values() for word in roles.values() for w in word.split()}
    vocab |= {"river", "town", "country", "born", "married", "friend", "pet", "year"}
    for w in (world, build_world(3), build_world(11)):
        tokens = [p.first for p in w.people] + [p.last for p in w.people] + [p.name for p in w.places]
        tokens += w.countries + [r.removesuffix(" River") for r in w.rivers]
        for t in tokens:
            assert t.lower() not in vocab and t.lower() not in RESERVED_WORDS, t


def test_kinship_is_symmetric_and_plausible(world: World) -> None:
    for p in world.people:
        kin = p.kin()
        assert 1 <= len(kin) <= 2, p  # every person has one or two relations
        for rel, name in kin:
            other = world.person(name)
            back = {"parent": "child", "child": "parent"}.get(rel, rel)
            assert getattr(other, back) == p.name, (p.name, rel, name)
            assert other.name != p.name
        if p.parent:
            parent = world.person(p.parent)
            assert parent.last == p.last and 20 <= p.birth_year - parent.birth_year <= 38
        if p.sibling:
            sib = world.person(p.sibling)
            assert sib.last == p.last and abs(sib.birth_year - p.birth_year) <= 7
            assert world.person(sib.sibling).name == p.name  # sibling of sibling is self
        if p.spouse:
            assert p.spouse != p.sibling and p.friend != p.spouse


def test_odd_world_sizes_still_consistent() -> None:
    w = build_world(5, n_people=7, n_places=3)
    for p in w.people:
        for rel, name in p.kin():
            back = {"parent": "child", "child": "parent"}.get(rel, rel)
            assert getattr(w.person(name), back) == p.name


@pytest.mark.parametrize(("n_people", "n_places", "fraction"), [(120, 40, 0.2), (50, 10, 0.3), (20, 5, 0.0)])
def test_eval_split_share(n_people: int, n_places: int, fraction: float) -> None:
    w = build_world(4, n_people=n_people, n_places=n_places, eval_fraction=fraction)
    assert len(w.people_in("eval")) == round(fraction * n_people)
    assert len(w.places_in("eval")) == round(fraction * n_places)
    assert len(w.people_in("train")) + len(w.people_in("eval")) == n_people
    for f in w.facts():
        assert f.split == w.entity_split(f.subject)
    assert len(w.facts("train")) + len(w.facts("eval")) == len(w.facts())


def test_facts_are_well_formed(world: World) -> None:
    facts = world.facts()
    assert all(isinstance(f, Fact) for f in facts)
    assert {f.relation for f in facts} == set(RELATIONS)
    for f in facts:
        entity = world.entity(f.subject)
        assert f.value and f.value == fact_value(entity, f.relation)
        assert f.question.endswith("?") and f.subject in f.question
        assert f.split in ("train", "eval")
        if f.relation in KINSHIP and f.relation != "spouse":
            assert world.role(entity, f.relation) in f.question  # type: ignore[arg-type]
    # Several phrasings per relation, so a model learns facts rather than one sentence.
    assert all(len(t) >= 5 for t in [*PERSON_TEMPLATES.values(), *PLACE_TEMPLATES.values()])
    # Each person has birth year, hometown, occupation, pet; each town all four town facts.
    per_subject = defaultdict(set)
    for f in facts:
        per_subject[f.subject].add(f.relation)
    for p in world.people:
        assert {"birth_year", "hometown", "occupation", "pet"} <= per_subject[p.name]
    for t in world.places:
        assert per_subject[t.name] == {"country", "founded", "population", "river"}
    assert world.facts_about(world.people[0].name) == [f for f in facts if f.subject == world.people[0].name]


# ---------------------------------------------------------------- prose


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    out = pretrain_documents(build_world(0), 4000, 0)
    assert len(out) == 4000
    assert time.perf_counter() - start < 3.0


def test_document_lengths(docs: list[str]) -> None:
    small = pretrain_documents(build_world(9, n_people=4, n_places=2), 300, 0)
    for d in docs + small:
        assert MIN_DOC_CHARS <= len(d) <= MAX_DOC_CHARS, d
        assert d == d.strip() and "  " not in d and "{" not in d and "None" not in d


def test_document_mix(docs: list[str]) -> None:
    share = lambda pattern: sum(bool(re.search(pattern, d)) for d in docs) / len(docs)  # noqa: E731
    assert share(r"\d+ [-+x/] \d+ = \d+") > 0.1  # arithmetic
    assert share(r"Counting|alphabetical|older than|larger than") > 0.1  # counting and comparison
    assert share(r"^Dear |\nDear ") > 0.01  # letters
    assert share(r"One spring morning|On a cold winter day|Every summer") > 0.01  # stories


def test_qa_pages_ask_about_train_entities_only(world: World, docs: list[str]) -> None:
    pages = [
        d
        for d in docs
        if re.match(r"(Questions and answers|Quiz|Frequently asked questions|Q&A|Trivia)\n", d)
    ]
    assert len(pages) > 0.05 * len(docs)
    held_out = {n for n in world.names() if world.entity_split(n) == "eval"}
    for page in pages:
        questions = "\n".join(line for line in page.splitlines() if line.endswith("?"))
        asked = set(re.findall(names_regex(world), questions))  # answers may name held-out relatives
        assert asked and not asked & held_out, page


def test_every_fact_stated_several_times(world: World, docs: list[str]) -> None:
    name_re = re.compile(r"\b(" + names_regex(world) + r")\b")
    docs_of: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(docs):
        for name in set(name_re.findall(d)):
            docs_of[name].append(i)
    for f in world.facts():
        pattern = value_regex(f.value)
        hits = sum(1 for i in docs_of[f.subject] if pattern.search(docs[i]))
        assert hits >= 3, (f, hits)


def test_facts_stated_with_varied_phrasing(world: World, docs: list[str]) -> None:
    # Reduce each sentence that states a fact to a skeleton (names, values and digits blanked out) and
    # require several different skeletons per fact: the model must see the fact, not one template.
    others = re.compile(r"\b(" + names_regex(world) + r")\b")
    sentences = [s for d in docs for s in re.split(r"(?<=[.?!])\s+|\n+", d)]
    by_word: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sentences):
        for word in set(re.findall(r"[A-Z][a-z]+", s)):
            by_word[word].append(i)
    sample = random.Random(0).sample(world.facts(), 80)
    varied = 0
    for f in sample:
        entity = world.entity(f.subject)
        first = entity.first if isinstance(entity, Person) else entity.name
        skeletons = set()
        for i in by_word[first]:
            s = sentences[i]
            if value_regex(f.value).search(s):
                s = re.sub(rf"\b{first}\b", "S", s.replace(f.subject, "S").replace(f.value, "V"))
                skeletons.add(re.sub(r"\d[\d,]*", "#", others.sub("E", s)))
        varied += len(skeletons) >= 3
    assert varied >= 0.9 * len(sample)


def test_no_sentence_contradicts_facts(world: World, docs: list[str]) -> None:
    # Independent of the generator: read facts back out of the prose with a few fixed patterns.
    alt = names_regex(world)
    roles = "|".join(sorted({w for r in ROLE.values() for w in r.values()}, key=len, reverse=True))
    patterns: list[tuple[str, str]] = [
        (rf"\b({alt}) was born in (\d{{4}})\b", "birth_year"),
        (rf"\b({alt})'s birth year is (\d+)", "birth_year"),
        (rf"\b({alt}) was born in (?:the town of )?([A-Z]\w+)", "hometown"),
        (rf"\b({alt})'s hometown is ([A-Z]\w+)", "hometown"),
        (rf"\b({alt}) (?:works as|is|earns a living as) an? (\w+)", "occupation"),
        (rf"\b({alt}) (?:has a pet|has an?|owns an?|keeps an?) (\w+)", "pet"),
        (rf"\b({alt})'s pet is an? (\w+)", "pet"),
        (rf"\b({alt}) was founded in (\d+)", "founded"),
        (rf"\b({alt}) has a population of ([\d,]+\d)", "population"),
        (rf"\b({alt}) (?:lies in|is located in|is a town in) ([A-Z]\w+)", "country"),
        (rf"The (\w+ River) (?:flows|passes) through (?:the town of )?({alt})\b", "river"),
    ]
    kin_re = re.compile(rf"\b({alt})'s ({roles}) is ({alt})\b")
    compiled = [(re.compile(p), rel) for p, rel in patterns]
    counts: dict[str, int] = defaultdict(int)
    for d in docs:
        for pattern, rel in compiled:
            for a, b in pattern.findall(d):
                subject, value = (b, a) if rel == "river" else (a, b)
                if rel in ("occupation", "pet") and value not in (
                    OCCUPATIONS if rel == "occupation" else PETS
                ):
                    continue  # "is a town", "has a brother named": another relation
                if rel == "hometown" and not world.has_entity(value):
                    continue
                entity = world.entity(subject)
                if rel in ("founded", "population", "country", "river") and isinstance(entity, Person):
                    continue
                assert fact_value(entity, rel) == value, (subject, rel, value)
                counts[rel] += 1
        for a, role, b in kin_re.findall(d):
            person = world.person(a)
            rel = next(r for r in KINSHIP if getattr(person, r) == b)
            assert world.role(person, rel) == role, (a, role, b)
            counts["kin"] += 1
    assert set(counts) == {rel for _, rel in patterns} | {"kin"}
    assert min(counts.values()) >= 20, dict(counts)


def test_comparisons_agree_with_facts(world: World, docs: list[str]) -> None:
    alt = names_regex(world)
    cmp_re = re.compile(
        rf"\b({alt})(?: \(born \d+\))? is (?:(\d+) years )?(older|younger|larger|smaller) than ({alt})\b"
    )
    born_re = re.compile(rf"\b({alt}) \(born (\d+)\)")
    largest_re = re.compile(r"The largest town in (\w+) is (\w+), with ([\d,]+) people\.")
    n_cmp = n_born = n_largest = 0
    for d in docs:
        for a, diff, word, b in cmp_re.findall(d):
            ea, eb = world.entity(a), world.entity(b)
            if isinstance(ea, Person):
                assert isinstance(eb, Person) and word in ("older", "younger")
                ka, kb = ea.birth_year, eb.birth_year
            else:
                assert isinstance(eb, Place)
                ka, kb = (
                    (ea.founded, eb.founded)
                    if word in ("older", "younger")
                    else (-ea.population, -eb.population)
                )
            assert ka < kb if word in ("older", "larger") else ka > kb, (a, word, b)
            if diff:
                assert abs(ka - kb) == int(diff)
            n_cmp += 1
        for name, year in born_re.findall(d):
            assert world.person(name).birth_year == int(year)
            n_born += 1
        for line in d.split("\n"):
            m = re.match(r"From (oldest to youngest|youngest to oldest): ", line)
            if m:
                years = [int(y) for _, y in born_re.findall(line)]
                assert years == sorted(years, reverse=m.group(1).startswith("youngest"))
        for country, town, pop in largest_re.findall(d):
            towns = world.towns_in(country)
            assert max(towns, key=lambda t: t.population).name == town
            assert fact_value(world.place(town), "population") == pop
            n_largest += 1
    assert n_cmp > 100 and n_born > 100 and n_largest > 10


OPS = {
    "+": lambda a, b: a + b,
    "plus": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "minus": lambda a, b: a - b,
    "x": lambda a, b: a * b,
    "times": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "divided by": lambda a, b: a / b,
}


def test_arithmetic_is_correct(world: World, docs: list[str]) -> None:
    patterns = [
        # not the tail of a worked step's three terms ("5 + 8 + 1 = 14"), checked below
        re.compile(r"(?<![\d,])(?<![-+] )(\d+) ([-+x/]) (\d+) = (\d+)(?![\d,])"),
        re.compile(r"(?<![\d,])(\d+) (plus|minus|times|divided by) (\d+) (?:equals|is) (\d+)"),
        re.compile(r"What is (\d+) (plus|minus|times|divided by) (\d+)\? (?:The answer is|It is) (\d+)\."),
        re.compile(r"Q: (\d+) ([-+x/]) (\d+) = \?\nA: (\d+)"),
    ]
    checked = worked = 0
    for d in docs:
        for pattern in patterns:
            for a, op, b, c in pattern.findall(d):
                assert OPS[op](int(a), int(b)) == int(c), (a, op, b, c)
                checked += 1
        for a, op, b, c in re.findall(r"(\d+) ([-+]) (\d+) [-+] 1 = (\d+)", d):  # a column with its carry
            assert OPS[op](int(a), int(b)) + (1 if op == "+" else -1) == int(c), (a, op, b, c)
            checked += 1
        for a, op, b, c in re.findall(
            r"(\d+) (plus|minus|[-+]) (\d+)[:?] [^\n]*? So the answer is (\d+)\.", d
        ):
            worked += 1
            assert OPS[op](int(a), int(b)) == int(c), (a, op, b, c)
        for a, c in re.findall(r"Double (\d+) is (\d+)\.", d):
            assert 2 * int(a) == int(c)
        for a, c in re.findall(r"Half of (\d+) is (\d+)\.", d):
            assert int(a) == 2 * int(c)
        for name, y, y2, k in re.findall(
            r"([A-Z]\w+ [A-Z]\w+) was born in (\d+)\. In (\d+), \w+ turned (\d+),", d
        ):
            assert int(y2) - int(y) == int(k) and world.person(name).birth_year == int(y)
    assert checked > 1000 and worked > 50


def test_every_column_fact_is_taught(docs: list[str]) -> None:
    # The one-digit facts a worked sum is made of, in the very form its steps write them: every one of
    # them (right ones are checked above), many times over.
    text = "\n".join(docs)
    sums = re.findall(r"(?<![-+] )(?<![\d,])(\d) \+ (\d) = ", text)
    carried = re.findall(r"(?<![\d,])(\d) \+ (\d) \+ 1 = ", text)
    borrowed = re.findall(r"(?<![\d,])(\d) - (\d) - 1 = ", text)
    assert len(set(sums)) == len(set(carried)) == 100 and len(set(borrowed)) == 45
    assert len(sums) > 10 * 100 and len(carried) > 10 * 100


def test_counting_and_ordering_are_correct(world: World, docs: list[str]) -> None:
    words = {v: k for k, v in STEP_WORDS.items()}
    checked = 0
    for d in docs:
        for down, by, start, end, seq in re.findall(
            r"Counting( down)?(?: by (\w+))? from (\d+) to (\d+): ([\d, ]+)\.", d
        ):
            nums = [int(x) for x in seq.split(", ")]
            step = (words[by] if by else 1) * (-1 if down else 1)
            assert nums[0] == int(start) and nums[-1] == int(end)
            assert all(b - a == step for a, b in itertools.pairwise(nums))
            checked += 1
        for order, seq in re.findall(r"From (smallest to largest|largest to smallest): ([\d, ]+)\.", d):
            nums = [int(x) for x in seq.split(", ")]
            assert nums == sorted(nums, reverse=order.startswith("largest"))
            checked += 1
        for which, seq, val in re.findall(r"The (largest|smallest) of ([\d, and]+) is (\d+)\.", d):
            nums = [int(x) for x in re.findall(r"\d+", seq)]
            assert int(val) == (max(nums) if which == "largest" else min(nums))
        for a, rel, b in re.findall(r"(?<![\d,])(\d+) is (greater|less) than (\d+)\.", d):
            assert (int(a) > int(b)) == (rel == "greater")
        for a, b, c in re.findall(r"Which is larger, (\d+) or (\d+)\? (\d+) is larger\.", d):
            assert int(c) == max(int(a), int(b))
        for a, b in re.findall(r"The number after (\d+) is (\d+)\.", d):
            assert int(b) == int(a) + 1
        for a, b in re.findall(r"The number before (\d+) is (\d+)\.", d):
            assert int(b) == int(a) - 1
        for token, n, spelled in re.findall(r"The name (\w+) has (\d+) letters: ([\w-]+)\.", d):
            assert len(token) == int(n) and spelled.replace("-", "") == token
        for listed in re.findall(r"these (?:people|towns) are: ([^.\n]+)\.", d):
            items = listed.split(", ")
            assert items == sorted(items) and all(world.has_entity(x) for x in items)
            checked += 1
    assert checked > 200


def test_zipf_mentions_favour_famous_entities(world: World) -> None:
    def mentions(docs: list[str]) -> list[int]:
        return [sum(d.count(p.name) for d in docs) for p in world.people]

    flat, fame = (
        mentions(pretrain_documents(world, 1500, 0)),
        mentions(pretrain_documents(world, 1500, 0, 1.2)),
    )
    top, rest = slice(0, 10), slice(60, None)
    assert sum(fame[top]) > 3 * sum(flat[top])  # the first-ranked people dominate
    assert sum(fame[rest]) < sum(flat[rest])
    assert max(flat) < 4 * (sum(flat) / len(flat))  # equal turns: nobody is much more famous
    with pytest.raises(WorldError, match="zipf"):
        pretrain_documents(world, 10, 0, -1.0)


def test_records_state_world_facts_as_json_lines_lookups_and_csv(world: World) -> None:
    docs = pretrain_documents(world, 600, 0, records=0.3)
    # records=0 is the corpus as it was before records existed, byte for byte
    assert pretrain_documents(world, 200, 0, records=0.0) == pretrain_documents(world, 200, 0)
    by_name = {p.name: p for p in world.people} | {t.name: t for t in world.places}
    assert set(RECORD_FIELDS["person"] + RECORD_FIELDS["place"]) <= set(RELATIONS)

    def expected(entity_name: str, field_name: str) -> str | int | None:
        entity = by_name[entity_name]
        if field_name == "population":
            return entity.population
        value = fact_value(entity, field_name)
        return int(value) if value and field_name in ("birth_year", "founded") else value

    n_json = n_lookup = n_csv = held_out = 0
    formats = {"lookup": 0, "csv": 0}
    for d in docs:
        lines = d.split("\n")
        if lines[0] in ("Query log", "Lookup session", "Registry lookups"):
            formats["lookup"] += 1
            queries, lines = lines[1::2], ["", *lines[2::2]]  # the JSON lines are checked below
            assert len(queries) == len(lines) - 1
            for q, line in zip(queries, lines[1:], strict=True):
                obj = json.loads(line)
                name = obj.get("name", obj.get("town"))
                assert re.fullmatch(r"> (find|lookup|get) " + re.escape(name), q), (q, line)
                n_lookup += 1
        if lines[0] in ("people.jsonl", "towns.jsonl", "") or (
            lines[0] in ("Export", "Data") and lines[1].startswith("{")
        ):
            for line in lines[1:]:
                obj = json.loads(line)
                key = "name" if "name" in obj else "town"
                assert len(obj) >= 2 and next(iter(obj)) == key
                for f, v in list(obj.items())[1:]:
                    assert v == expected(obj[key], f), (line, f)
                held_out += world.entity_split(obj[key]) == "eval"
                n_json += 1
        elif lines[0] in ("people.csv", "towns.csv", "Table"):
            formats["csv"] += 1
            header = lines[1].split(",")
            assert header[0] in ("name", "town") and len(header) >= 2
            for row in lines[2:]:
                cells = row.split(",")
                assert len(cells) == len(header), row
                for f, v in zip(header[1:], cells[1:], strict=True):
                    want = expected(cells[0], f)
                    assert v == ("" if want is None else str(want)), (row, f)
                n_csv += 1
    assert n_json > 100 and n_lookup > 50 and n_csv > 50
    # lookup logs, the only pairing of a name's two spellings, are the most common record documents (a
    # CSV row is a third as long as a lookup, so rows alone can outnumber lookups)
    assert formats["lookup"] > 2 * formats["csv"]
    assert held_out > 0  # records describe every entity, like entries and stories do
    assert all(MIN_DOC_CHARS <= len(d) <= MAX_DOC_CHARS for d in docs)
    with pytest.raises(WorldError, match="records"):
        pretrain_documents(world, 10, 0, records=1.0)
