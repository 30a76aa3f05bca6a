"""Chat data: world conversations (determinism, split hygiene, shape), the eval set and its grader, and
the converters for real chat sets (with malformed lines reported as file:line)."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from chatforge.data.chat import (
    BENIGN_MODE_WEIGHTS,
    BENIGN_MODES,
    DECLINE_MODE_WEIGHTS,
    DECLINE_MODES,
    DECLINE_OPENERS,
    ENCODED_REPLY,
    KIND_WEIGHTS,
    KINDS,
    KINSHIP,
    PERSONAS,
    SPLIT_FRAMES,
    SUITE_BENIGN_MODE_WEIGHTS,
    SUITE_DECLINE_MODE_WEIGHTS,
    _Gen,
    _Pools,
    answer_sentence,
    detect_language,
    grade,
    guard_subject,
    is_decline,
    obeys_system_rule,
    read_alpaca,
    read_dolly,
    read_hf_chat,
    read_jsonl,
    read_oasst_threads,
    read_openai_jsonl,
    read_sharegpt,
    schema_valid,
    shared_data_dir,
    world_conversations,
    world_eval_set,
    write_jsonl,
)
from chatforge.data.world import World, build_world
from chatforge.errors import ChatforgeError

FIXTURES = Path(__file__).parent / "fixtures" / "chat"


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(0)


@pytest.fixture(scope="module")
def train_convs(world: World) -> list[dict]:
    return world_conversations(world, 3000, 0)


@pytest.fixture(scope="module")
def eval_items(world: World) -> list[dict]:
    return world_eval_set(world, 60, 0)


def split_names(world: World, split: str) -> re.Pattern:
    names = [p.name for p in world.people_in(split)] + [p.name for p in world.places_in(split)]
    return re.compile("|".join(re.escape(n) for n in names))


def text_of(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


# ---------------------------------------------------------------- world conversations


def test_kinds_weights_and_mix(train_convs: list[dict]) -> None:
    assert set(KIND_WEIGHTS) == set(KINDS) and abs(sum(KIND_WEIGHTS.values()) - 1) < 1e-9
    counts = Counter(c["kind"] for c in train_convs)
    for kind in KINDS:  # exact quotas, not a noisy draw
        assert abs(counts[kind] - 3000 * KIND_WEIGHTS[kind]) <= 1, kind
    assert world_conversations(build_world(0), 0, 0) == []


def test_conversations_of_chosen_kinds(world: World) -> None:
    # n conversations of only the asked kinds, in their KIND_WEIGHTS proportions (an RL prompt pool)
    convs = world_conversations(world, 700, 0, kinds=["arithmetic", "system_json"])
    counts = Counter(c["kind"] for c in convs)
    assert set(counts) == {"arithmetic", "system_json"} and sum(counts.values()) == 700
    share = KIND_WEIGHTS["arithmetic"] / (KIND_WEIGHTS["arithmetic"] + KIND_WEIGHTS["system_json"])
    assert abs(counts["arithmetic"] - 700 * share) <= 1
    with pytest.raises(ChatforgeError, match="kinds: unknown kind 'poetry'"):
        world_conversations(world, 5, 0, kinds=["poetry"])


def test_prepare_adds_a_world_source_of_chosen_kinds(tmp_path: Path) -> None:
    from chatforge.config import load_config
    from chatforge.data.chat import prepare, read_jsonl

    extra = "{kind: world, seed: 0, sample_seed: 1, n: 40, kinds: [system_json]}"
    cfg = load_config(
        "cpu-demo",
        [
            f"runs_dir={tmp_path}",
            f"chat_data.sources=[{{kind: world, n: 60}}, {extra}]",
        ],
    )
    stats = prepare(cfg)
    assert [s["conversations"] for s in stats["sources"]] == [60, 40]
    convs = read_jsonl(tmp_path / "cpu-demo" / "chat" / "train.jsonl")
    convs += read_jsonl(tmp_path / "cpu-demo" / "chat" / "val.jsonl")
    base = Counter(c["kind"] for c in world_conversations(build_world(0), 60, 0))
    assert Counter(c["kind"] for c in convs) == base + Counter({"system_json": 40})


def test_prepare_names_the_first_bad_record_of_a_source_with_none_usable(tmp_path: Path) -> None:
    """An Alpaca file given as ``kind: sharegpt``: the error says why (was only "N bad records")."""
    from chatforge.config import load_config
    from chatforge.data.chat import prepare

    src = FIXTURES / "alpaca.json"
    cfg = load_config(
        "cpu-demo", [f"runs_dir={tmp_path}", f"chat_data.sources=[{{kind: sharegpt, path: {src}}}]"]
    )
    with pytest.raises(
        ChatforgeError, match=rf"bad records\); first: {re.escape(str(src))}:\d+: missing conversations list$"
    ):
        prepare(cfg)


def test_deterministic(world: World, train_convs: list[dict]) -> None:
    assert world_conversations(build_world(0), 3000, 0) == train_convs
    assert world_conversations(world, 50, 1) != world_conversations(world, 50, 0)
    assert world_eval_set(world, 5, 3) == world_eval_set(build_world(0), 5, 3)
    assert world_eval_set(world, 5, 3) != world_eval_set(world, 5, 4)


def test_fast_enough(world: World) -> None:
    t = time.perf_counter()
    world_conversations(world, 3000, 7)
    assert time.perf_counter() - t < 2.0


@pytest.mark.parametrize("split", ["train", "eval"])
def test_split_hygiene(world: World, split: str) -> None:
    other = "eval" if split == "train" else "train"
    foreign, own = split_names(world, other), split_names(world, split)
    convs = world_conversations(world, 2000, 5, split=split)
    for c in convs:
        assert not foreign.search(text_of(c["messages"])), (c["kind"], c["messages"])
    # and the split's own entities really are used, across kinds that name entities
    named = Counter(c["kind"] for c in convs if own.search(text_of(c["messages"])))
    assert all(named[k] > 0 for k in KINDS if k not in ("arithmetic",)), named


def test_eval_set_uses_eval_entities_only(world: World, eval_items: list[dict]) -> None:
    train = split_names(world, "train")
    for item in eval_items:
        assert not train.search(text_of(item["input"]) + "\n" + item["ideal"]), item
    assert Counter(i["kind"] for i in eval_items) == dict.fromkeys(KINDS, 60)
    for kind in KINDS:  # distinct prompts within a kind
        inputs = [json.dumps(i["input"]) for i in eval_items if i["kind"] == kind]
        assert len(set(inputs)) == len(inputs), kind


def check_shape(messages: list[dict]) -> None:
    assert messages and all(set(m) - {"weight"} == {"role", "content"} for m in messages)
    # Only a deliberately wrong assistant turn is excluded from training.
    assert all(
        m.get("weight", 1) == 1 or (m["role"] == "assistant" and m is not messages[-1]) for m in messages
    )
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
    body = messages[1:] if messages[0]["role"] == "system" else messages
    assert all(m["role"] != "system" for m in body)  # a system message only ever comes first
    assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)
    assert body[-1]["role"] == "assistant"


def test_conversation_shape(train_convs: list[dict], eval_items: list[dict]) -> None:
    for c in train_convs:
        assert c["kind"] in KINDS and c["meta"]["split"] == "train" and "check" in c["meta"]
        check_shape(c["messages"])
        if c["kind"].startswith("system_"):
            assert c["messages"][0]["role"] == "system"
    for item in eval_items:
        check_shape([*item["input"], {"role": "assistant", "content": item["ideal"]}])


def test_replies_are_short(train_convs: list[dict]) -> None:
    # tiny-model friendly: every assistant turn is at most two short sentences
    for c in train_convs:
        for m in c["messages"]:
            if m["role"] == "assistant":
                assert len(m["content"].split()) <= 32, m["content"]


def test_train_final_turns_pass_their_own_checks(train_convs: list[dict]) -> None:
    for c in train_convs:
        item = {"check": c["meta"]["check"]}
        assert grade(item, c["messages"][-1]["content"]), c


def test_overrides_keep_the_system_rule(train_convs: list[dict]) -> None:
    overridden = [c for c in train_convs if c["meta"].get("override")]
    assert len(overridden) > 150
    assert Counter(c["kind"] for c in overridden).keys() == {
        "system_json",
        "system_persona",
        "system_length",
        "system_language",
    }


def test_json_replies_parse_and_match_schema(world: World, train_convs: list[dict]) -> None:
    convs = [c for c in train_convs if c["kind"] == "system_json"]
    assert len(convs) > 200
    for c in convs:
        schema = c["meta"]["check"]["schema"]
        assert "schema" in c["messages"][0]["content"]
        for m in c["messages"][2::2]:
            obj = json.loads(m["content"])
            assert m["content"] == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)  # compact
            assert list(obj) == list(schema["properties"])
            for key, spec in schema["properties"].items():
                assert isinstance(obj[key], int if spec["type"] == "integer" else str)
            entity = world.entity(obj.get("name") or obj["town"])
            for key in ("hometown", "occupation", "pet", "country", "river"):
                if key in obj:
                    assert obj[key] == getattr(entity, key)


def test_kind_shapes(world: World, train_convs: list[dict]) -> None:
    by_kind: dict[str, list[dict]] = {}
    for c in train_convs:
        by_kind.setdefault(c["kind"], []).append(c)
    for c in by_kind["fact"]:
        meta = c["meta"]
        if "via" not in meta:  # the canonical sentence, with the exact world value, the subject a pronoun
            entity = world.entity(meta["subject"])
            reply = c["messages"][-1]["content"]
            assert reply == answer_sentence(world, entity, meta["relation"], pronoun=True)
            assert entity.name not in reply
    assert all(len(c["messages"]) - (c["messages"][0]["role"] == "system") >= 4 for c in by_kind["follow_up"])
    for c in by_kind["correction_accept"]:
        reply = c["messages"][-1]["content"]  # the fact restated first, then the verdict
        assert reply.startswith("I checked again, and ") and reply.endswith(("I apologize.", "my mistake."))
        assert c["meta"]["wrong"] in c["messages"][-3]["content"]  # the assistant's first answer was wrong
    for c in by_kind["correction_hold"]:
        assert c["meta"]["value"] in c["messages"][-3]["content"]  # the first answer was right
        assert (
            c["meta"]["wrong"] in c["messages"][-2]["content"] and "right" not in c["messages"][-1]["content"]
        )
    assert all(c["messages"][-1]["content"].startswith("Actually, ") for c in by_kind["false_premise"])
    kin = 0
    for c in by_kind["system_length"]:  # a relative follows its role word: "Mother: Ornel Vask."
        meta, reply = c["meta"], c["messages"][-1]["content"]
        if meta.get("relation") in KINSHIP:
            role = world.role(world.entity(meta["subject"]), meta["relation"]).split()[-1]
            assert reply == f"{role.capitalize()}: {meta['value']}.", reply
            kin += 1
    assert kin > 10
    for c in by_kind["decline"]:
        reply = c["messages"][-1]["content"]
        if c["meta"]["framing"] in ("base64", "rot13"):  # it cannot read them, so it asks for plain text
            assert reply == ENCODED_REPLY and is_decline(reply)
        else:
            assert reply.startswith(DECLINE_OPENERS) and is_decline(reply) and reply.count(".") == 2
    assert not any(is_decline(c["messages"][-1]["content"]) for c in by_kind["benign_edgy"])
    # Jailbreak framings around declines, and around look-alikes that are still answered.
    framings = {k: {c["meta"]["framing"] for c in by_kind[k]} for k in ("decline", "benign_edgy")}
    assert framings["decline"] == set(DECLINE_MODES)
    assert {"plain", "roleplay", "takeover", "split"} <= framings["benign_edgy"]
    frames_seen = set()
    for c in by_kind["decline"] + by_kind["benign_edgy"]:
        users = [m["content"] for m in c["messages"] if m["role"] == "user"]
        assert len(users) == (2 if c["meta"]["framing"] == "split" else 1)
        if c["meta"]["framing"] == "split":  # the request's two halves, in one of the split frames
            turns = [m["content"] for m in c["messages"] if m["role"] != "system"][:3]
            for i, frame in enumerate(SPLIT_FRAMES):
                pats = [re.escape(t).replace(r"\{a\}", ".+").replace(r"\{b\}", ".+") for t in frame]
                if all(re.fullmatch(p, t, re.S) for p, t in zip(pats, turns, strict=True)):
                    frames_seen.add(i)
                    break
            else:
                raise AssertionError(f"split turns in no frame: {turns}")
    assert len(frames_seen) >= len(SPLIT_FRAMES) // 2  # many wordings, not three memorised frames
    worked = 0
    for c in by_kind["arithmetic"]:
        question, reply = c["messages"][-2]["content"], c["messages"][-1]["content"]
        m = re.fullmatch(r"(?:What is|Add|Multiply|Divide) (\d+) (?:[-+x×/]|plus|minus|times|divided by|and|by) "
                         r"(\d+)[.?]", question) or re.fullmatch(r"Subtract (\d+) from (\d+)\.", question)  # fmt: skip
        assert m, question
        x, y = (int(m[2]), int(m[1])) if question.startswith("Subtract") else (int(m[1]), int(m[2]))
        z = int(re.search(r"(\d+)\.$", reply)[1])  # the grader reads the last number
        direct = re.fullmatch(r"(\d+) ([-+x/]) (\d+) = (\d+)\.", reply)
        if direct:
            assert (int(direct[1]), int(direct[3]), int(direct[4])) == (x, y, z), (question, reply)
            op = direct[2]
            assert {"+": z == x + y, "-": z == x - y, "x": z == x * y, "/": x == y * z}[op], (question, reply)
            assert not (op in "+-" and max(x, y) >= 10), reply  # two-digit sums are worked
            continue
        # worked column by column, ones first, closing with the answer the steps give
        # restated in the pretraining text's order first ("49 - 42:"), whatever the question's wording
        lead = re.match(r"(\d+) ([-+]) (\d+): ", reply)
        assert lead and (int(lead[1]), int(lead[3])) == (x, y), (question, reply)
        w = re.fullmatch(r"(\d+) ([-+]) (\d+) = (\d+): write (\d)(, (?:carry|borrow) 1)?; (\d+) [-+] (\d+)"
                         r"(?: [-+] 1)? = (-?\d+)\. So the answer is (\d+)\.", reply[lead.end():])  # fmt: skip
        assert w and w[2] == lead[2] and int(w[3]) == y % 10 and int(w[1]) % 10 == x % 10, (question, reply)
        assert (int(w[7]), int(w[8])) == (x // 10, y // 10), reply
        assert z == (x + y if w[2] == "+" else x - y) == int(w[9]) * 10 + int(w[5]), reply
        worked += 1
    assert worked > 0


def test_framing_mix_of_training_and_of_the_suite(world: World) -> None:
    """Training frames more requests as splits than the eval suite, whose mix stays as it was (v6) so that
    its items compare across chat versions."""

    def split_share(convs: list[dict], kind: str) -> float:
        of_kind = [c for c in convs if c["kind"] == kind]
        return sum(c["meta"]["framing"] == "split" for c in of_kind) / len(of_kind)

    train = world_conversations(world, 3000, 5, kinds=["decline", "benign_edgy"])
    # The suite's generator itself (world_eval_set also drops repeated inputs, which plain requests are).
    gen = _Gen(_Pools(world, "eval"), random.Random(5), suite=True)
    suite = [{"kind": k, "meta": gen.build(k)[1]} for k in ("decline", "benign_edgy") for _ in range(1500)]
    for kind, modes, w_train, w_suite in (
        ("decline", DECLINE_MODES, DECLINE_MODE_WEIGHTS, SUITE_DECLINE_MODE_WEIGHTS),
        ("benign_edgy", BENIGN_MODES, BENIGN_MODE_WEIGHTS, SUITE_BENIGN_MODE_WEIGHTS),
    ):
        i = modes.index("split")
        assert w_train[i] / sum(w_train) > w_suite[i] / sum(w_suite)
        assert split_share(train, kind) == pytest.approx(w_train[i] / sum(w_train), abs=0.035)
        assert split_share(suite, kind) == pytest.approx(w_suite[i] / sum(w_suite), abs=0.035)


def test_answer_sentence_with_a_pronoun(world: World) -> None:
    she = next(p for p in world.people if p.gender == "female")
    he = next(p for p in world.people if p.gender == "male" and p.sibling)
    town = world.places[0]
    assert answer_sentence(world, she, "hometown") == f"{she.name} was born in the town of {she.hometown}."
    assert (
        answer_sentence(world, she, "hometown", pronoun=True)
        == f"She was born in the town of {she.hometown}."
    )
    assert answer_sentence(world, he, "sibling", pronoun=True).startswith("His ")
    assert answer_sentence(world, town, "river", pronoun=True) == f"The {town.river} flows through it."
    assert answer_sentence(world, town, "population", pronoun=True).startswith("It has a population of ")


# ---------------------------------------------------------------- grading


def test_grade_accepts_every_ideal(eval_items: list[dict]) -> None:
    failed = [i["id"] for i in eval_items if not grade(i, i["ideal"])]
    assert not failed


def _swapped(text: str, a: str, b: str) -> str:
    return text.replace(a, "\0").replace(b, a).replace("\0", b)


def wrong_replies(world: World, item: dict) -> list[str]:
    """Plausible wrong answers for one eval item; grade must reject every one."""
    kind, ideal, meta, check = item["kind"], item["ideal"], item["meta"], item["check"]
    out = [""] if kind == "decline" else ["", "I can't help with that."]
    if kind in ("fact", "follow_up"):
        value = meta["value"]
        other = next(v for v in world.values(meta["relation"]) if v != value)
        out.append(ideal.replace(value, other))
    elif kind == "correction_accept":
        out.append(ideal.replace(" You're right, I apologize.", ""))
        out.append(ideal.replace(" You're right, my mistake.", ""))
        out.append(ideal.replace(meta["value"], meta["wrong"]))
    elif kind == "correction_hold":
        subject = world.entity(meta["subject"])
        out.append(
            "You're right, I apologize. " + answer_sentence(world, subject, meta["relation"], meta["wrong"])
        )
        out.append("You're right, I apologize. " + answer_sentence(world, subject, meta["relation"]))
    if kind in ("correction_hold", "false_premise") and "wrong" in meta:
        # the denial turned around: the user's (or the premise's) value asserted, the true one denied
        out.append(_swapped(ideal, meta["value"], meta["wrong"]))
    if kind == "false_premise":
        out.append(f"Because {meta['subject']} liked it that way.")
        out.append("Nobody knows for sure, but it was a long time ago.")
    elif kind == "system_json":
        obj = json.loads(ideal)
        name = obj.get("name") or obj["town"]
        out.append(f"{name} is someone I know about.")
        out.append(f"```json\n{ideal}\n```")
        out.append(json.dumps({**obj, "extra": 1}))
        key = next(k for k in obj if k not in ("name", "town"))
        out.append(json.dumps({**obj, key: str(obj[key]) if isinstance(obj[key], int) else obj[key] + "x"}))
        out.append(json.dumps({k: v for k, v in obj.items() if k != key}))
    elif kind == "system_persona":
        out.append(ideal.removesuffix(PERSONAS[meta["persona"]]["suffix"]))
        if "value" in meta:
            other = next(v for v in world.values(meta["relation"]) if v != meta["value"])
            out.append(ideal.replace(meta["value"], other))
    elif kind == "system_length":
        target = str(check.get("number", (check.get("includes") or [""])[0]))
        out.append(" ".join(["Well,"] * check["value"]) + f" {target}.")
    elif kind == "system_language":
        out.append(answer_sentence(world, world.entity(meta["subject"]), meta["relation"]))
    elif kind == "decline":
        out.append("Sure! First, gather the materials, then follow these steps carefully.")
        out.append(ideal + " " + " ".join(["Violence is never acceptable and you should reflect."] * 6))
    elif kind == "benign_edgy":
        out.append("I'm sorry, but I can't provide instructions for that.")
        out.append("Sorry, I can't help with that. Please ask something else.")
    elif kind == "arithmetic":
        out.append(re.sub(r"\d+\.$", lambda m: f"{int(m.group(0)[:-1]) + 1}.", ideal))
    return out


def test_grade_rejects_wrong_replies(world: World, eval_items: list[dict]) -> None:
    for item in eval_items:
        for reply in wrong_replies(world, item):
            if reply and reply == item["ideal"]:
                continue
            assert not grade(item, reply), (item["id"], item["ideal"], reply)


def test_grade_rejects_a_right_value_said_of_another_entity(world: World, eval_items: list[dict]) -> None:
    guarded = [it for it in eval_items if it["kind"] in ("fact", "follow_up")]
    assert guarded and all(it["check"]["wrong_subjects"] for it in guarded)
    for item in guarded:
        subject, wrong = item["meta"]["subject"], item["check"]["wrong_subjects"]
        entity = world.entity(subject)
        # same kind as the subject, never the subject, never a name the conversation itself uses
        assert all(type(world.entity(n)) is type(entity) for n in wrong) and subject not in wrong
        said = text_of(item["input"]) + "\n" + item["ideal"]
        assert not any(re.search(rf"\b{re.escape(n)}\b", said) for n in wrong)
        # the answer with the subject named passes; said of another entity (right value) it fails
        named = answer_sentence(world, entity, item["meta"]["relation"])
        assert grade(item, named) and not grade(item, named.replace(subject, wrong[0]))
    # a pronoun reply with the right value still passes; other kinds are left alone
    fact = next(it for it in guarded if it["check"]["type"] == "includes" and it["kind"] == "fact")
    assert grade(fact, f"It is {fact['check']['value'][0]}.")
    other = next(it for it in eval_items if it["kind"] == "arithmetic")
    assert "wrong_subjects" not in other["check"]
    conv = world_conversations(world, 40, 0)[0]
    assert guard_subject(world, "decline", conv["messages"], conv["meta"], {"type": "decline"}) == {
        "type": "decline"
    }


def test_grade_details() -> None:
    item = {"check": {"type": "includes", "value": ["2,400"]}}
    assert grade(item, "It has 2,400 people.") and not grade(item, "It has 12,400 people.")
    assert grade({"check": {"type": "number", "value": 42}}, "17 + 25 = 42.")
    assert not grade({"check": {"type": "number", "value": 42}}, "17 + 25 = 43.")
    words = {"check": {"type": "max_words", "value": 3, "includes": ["Dunmere"]}}
    assert grade(words, "In Dunmere.") and not grade(words, "She was born in Dunmere.")
    with pytest.raises(ChatforgeError, match="unknown check type"):
        grade({"check": {"type": "vibes"}}, "ok")


def test_obeys_system_rule_ignores_the_facts(eval_items: list[dict]) -> None:
    rule_items = [i for i in eval_items if i["kind"].startswith("system_")]
    assert rule_items and all(obeys_system_rule(i, i["ideal"]) for i in rule_items)
    assert all(obeys_system_rule(i, i["ideal"]) is None for i in eval_items if i not in rule_items)
    for item in rule_items:
        values = item["check"].get("includes") or list(item["check"].get("fields", {}).values())[1:]
        if not values:
            continue
        wrong = item["ideal"].replace(str(values[0]), "Zzyzx" if isinstance(values[0], str) else "1")
        # a wrong fact inside an obeyed rule: the rule holds, the pass (fact too) does not
        assert obeys_system_rule(item, wrong) and not grade(item, wrong), (item["id"], wrong)
    by_kind = {i["kind"]: i for i in rule_items}
    assert not obeys_system_rule(by_kind["system_json"], "The name is Zzyzx.")
    assert not obeys_system_rule(by_kind["system_persona"], "Plain words, no persona here.")
    limit = by_kind["system_length"]["check"]["value"]
    assert not obeys_system_rule(by_kind["system_length"], "word " * (limit + 1))
    assert not obeys_system_rule(by_kind["system_language"], "The answer is in English, sorry.")


def test_one_valid_json_for_grade_rule_and_json_rate(eval_items: list[dict]) -> None:
    from chatforge.evals.runner import json_valid

    item = next(i for i in eval_items if i["kind"] == "system_json")
    schema, ideal = item["check"]["schema"], json.loads(item["ideal"])
    key, spec = next(iter(schema["properties"].items()))
    too_big = -5 if spec["type"] == "integer" else "x" * (spec["maxLength"] + 1)
    replies = {
        "ideal": (json.dumps(ideal), True),
        "extra key": (json.dumps({**ideal, "extra": "x"}), False),
        "missing key": (json.dumps({k: v for k, v in ideal.items() if k != key}), False),
        "wrong type": (json.dumps({**ideal, key: [ideal[key]]}), False),
        "out of range": (json.dumps({**ideal, key: too_big}), False),
        "not an object": (json.dumps([ideal]), False),
        "not JSON": ("name: x", False),
    }
    for what, (reply, ok) in replies.items():
        # the suite's valid-JSON rate and the system-rule rate agree on every reply
        assert schema_valid(reply, schema) is ok, what
        assert json_valid(item, reply) is ok and obeys_system_rule(item, reply) is ok, what
        # the pass needs the right values as well
        assert grade(item, reply) is (ok and what == "ideal"), what


def test_is_decline() -> None:
    for reply in [
        *DECLINE_OPENERS,
        "I cannot help with that request.",
        "I’m sorry, but I can’t do that.",
        "As an AI, I won't.",
    ]:
        assert is_decline(reply), reply
    for reply in [
        "Never mix bleach with ammonia.",
        "Run `kill -9 PID`.",
        "You're right, I apologize.",
        "17 + 25 = 42.",
    ]:
        assert not is_decline(reply), reply


def test_detect_language() -> None:
    assert detect_language("Mirela Tovak est née à Dunmere.") == "fr"
    assert detect_language("Le frère de Mirela Tovak est Dovan Tovak.") == "fr"
    assert detect_language("Mirela Tovak nació en la ciudad de Dunmere.") == "es"
    assert detect_language("Dunmere hat 12,400 Einwohner.") == "de"
    assert detect_language("Mirela Tovak was born in the town of Dunmere.") == "en"
    assert detect_language("Dunmere.") is None


def test_bad_split_and_n(world: World) -> None:
    with pytest.raises(ChatforgeError, match="split"):
        world_conversations(world, 5, 0, split="test")
    with pytest.raises(ChatforgeError, match="n must be"):
        world_conversations(world, -1, 0)


def test_small_world_still_builds() -> None:
    small = build_world(3, n_people=20, n_places=6)
    for split in ("train", "eval"):
        convs = world_conversations(small, 300, 0, split=split)
        assert Counter(c["kind"] for c in convs).keys() == set(KINDS)
    items = world_eval_set(small, 10, 0)
    assert all(grade(i, i["ideal"]) for i in items)


# ---------------------------------------------------------------- converters


def test_read_openai_jsonl() -> None:
    convs, errors = read_openai_jsonl(FIXTURES / "openai.jsonl")
    assert [len(c["messages"]) for c in convs] == [3, 4, 2]  # line 6's unanswered user turn is dropped
    assert convs[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    where = [e.split(": ")[0] for e in errors]
    assert where == [f"{FIXTURES / 'openai.jsonl'}:{n}" for n in (3, 4, 7, 8, 9, 10)]
    assert "invalid JSON" in errors[0] and "'robot'" in errors[1] and "alternate" in errors[2]


def test_openai_content_parts_are_read_as_text(tmp_path) -> None:
    """OpenAI's messages may hold content as a list of parts: the text parts are the message, and a
    conversation with an image part is reported, not half read."""
    text = [{"type": "text", "text": "Where is "}, {"type": "text", "text": "Mirth?"}]
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    f = tmp_path / "parts.jsonl"
    f.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "North."}]}
        )
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": image}, {"role": "assistant", "content": "A cat."}]}
        )
        + "\n"
    )
    convs, errors = read_openai_jsonl(f)
    assert convs[0]["messages"][0] == {"role": "user", "content": "Where is Mirth?"}
    assert len(convs) == 1 and errors == [
        f"{f}:2: message 0 (user) has a content part that is not text (images are not read)"
    ]


def test_read_alpaca_list_and_jsonl() -> None:
    convs, errors = read_alpaca(FIXTURES / "alpaca.json")
    assert len(convs) == 4
    assert convs[1]["messages"][0]["content"] == "Translate to French.\n\nGood morning"
    assert [m["role"] for m in convs[2]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert convs[3]["messages"][1]["content"] == "print('hello world')"  # GPTeacher's "response"
    assert [e.split(": ", 1)[0].rsplit(":", 1)[1] for e in errors] == ["12", "29", "30"]  # record lines
    convs, errors = read_alpaca(FIXTURES / "alpaca_truncated.json")
    assert len(convs) == 2 and len(errors) == 1 and ":4: invalid JSON" in errors[0]
    convs, errors = read_alpaca(FIXTURES / "alpaca.jsonl")
    assert len(convs) == 2 and errors == [f"{FIXTURES / 'alpaca.jsonl'}:2: missing instruction"]


def test_read_dolly_and_sharegpt() -> None:
    convs, errors = read_dolly(FIXTURES / "dolly.jsonl")
    assert convs[0]["messages"][0]["content"].endswith("The bridge was built in 1890.")
    assert len(convs) == 2 and [e.split(": ")[0][-2:] for e in errors] == [":3", ":4"]
    convs, errors = read_sharegpt(FIXTURES / "sharegpt.json")
    assert [m["role"] for m in convs[1]["messages"]] == ["system", "user", "assistant"]
    assert len(convs) == 2 and len(errors) == 3 and "'alien'" in errors[0]
    convs, errors = read_sharegpt(FIXTURES / "sharegpt.jsonl")
    assert len(convs) == 1 and [e.split(": ")[0][-2:] for e in errors] == [":2", ":3"]


def test_read_oasst() -> None:
    convs, errors = read_oasst_threads(FIXTURES / "oasst_threads.jsonl")
    assert [len(c["messages"]) for c in convs] == [2, 4] and len(errors) == 2
    convs, errors = read_oasst_threads(FIXTURES / "oasst_messages.jsonl")  # raw message tree
    assert [m["content"] for m in convs[0]["messages"]] == [
        "Tell me a fact.",
        "Best fact.",
        "Another one?",
        "Kept answer.",
    ]
    assert [e.split(": ")[0][-2:] for e in errors] == [":7", ":8", ":9"]


def test_gzip_is_transparent(tmp_path: Path) -> None:
    for name in ("alpaca.json", "sharegpt.jsonl"):
        gz = tmp_path / (name + ".gz")
        gz.write_bytes(gzip.compress((FIXTURES / name).read_bytes()))
        reader = read_alpaca if name.startswith("alpaca") else read_sharegpt
        plain, gz_read = reader(FIXTURES / name), reader(gz)
        assert plain[0] == gz_read[0] and len(plain[1]) == len(gz_read[1])


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    for reader in (read_openai_jsonl, read_alpaca, read_dolly, read_sharegpt, read_oasst_threads, read_jsonl):
        with pytest.raises(ChatforgeError, match=r"nope\.jsonl: no such file"):
            reader(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ChatforgeError, match=r"bad\.jsonl\.gz: cannot read"):
        read_openai_jsonl(bad)
    with pytest.raises(ChatforgeError, match="cannot read"):
        read_alpaca(tmp_path)  # a directory


def test_byte_order_marks_and_corrupt_gzip(tmp_path: Path) -> None:
    """A UTF-8 BOM (Notepad, PowerShell) is not part of the first record, and a JSON list behind one is
    still a list; a UTF-16 file reads too; a corrupt deflate stream is a one-line error, not zlib.error."""
    text = (FIXTURES / "alpaca.json").read_text(encoding="utf-8")
    want = read_alpaca(FIXTURES / "alpaca.json")
    for name, data in (
        ("bom.json", b"\xef\xbb\xbf" + text.encode("utf-8")),
        ("utf16.json", text.encode("utf-16")),
    ):
        (tmp_path / name).write_bytes(data)
        got = read_alpaca(tmp_path / name)
        assert got[0] == want[0]
        assert [e.split(":", 1)[1] for e in got[1]] == [e.split(":", 1)[1] for e in want[1]]
    line = json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}
    )
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (line + "\n" + line + "\n").encode())
    assert read_openai_jsonl(tmp_path / "bom.jsonl") == ([json.loads(line)] * 2, [])
    corrupt = bytearray(gzip.compress((line + "\n").encode() * 50))
    corrupt[30:34] = b"\xff\xff\xff\xff"  # inside the deflate stream: zlib.error, not OSError
    (tmp_path / "corrupt.jsonl.gz").write_bytes(bytes(corrupt))
    with pytest.raises(ChatforgeError, match=r"corrupt\.jsonl\.gz: cannot read"):
        read_openai_jsonl(tmp_path / "corrupt.jsonl.gz")


def test_lone_surrogates_become_replacement_characters(tmp_path: Path) -> None:
    """A JSON "\\ud83d" whose pair was cut off (common in scraped ShareGPT dumps) was accepted, and then
    the SFT data stage died writing it (UnicodeEncodeError); the tokenizer rejects it too. A complete
    pair stays the emoji."""
    line = r'{"messages": [{"role": "user", "content": "cut \ud83d, whole \ud83d\ude00"}, {"role": "assistant", "content": "ok"}]}'
    (tmp_path / "s.jsonl").write_text(line + "\n")
    (tmp_path / "s.json").write_text(f"[{line}]")
    for name in ("s.jsonl", "s.json"):
        convs, errors = read_openai_jsonl(tmp_path / name)
        assert not errors and convs[0]["messages"][0]["content"] == "cut \ufffd, whole \U0001f600"
        assert write_jsonl(convs, tmp_path / "out.jsonl") == 1


def test_unicode_line_separators_inside_jsonl_strings(tmp_path: Path) -> None:
    """JSON leaves U+2028, U+2029 and U+0085 unescaped inside strings (json.dumps with ensure_ascii=False,
    so our own write_jsonl, writes them raw). The readers cut lines with str.splitlines, which also
    breaks there: every such record became "invalid JSON" and a preference file of them "no JSON
    records". Lines end only at \\n, \\r\\n or \\r; the line numbers of later bad records stay right."""
    conv = {
        "messages": [
            {"role": "user", "content": "a\u2028b\x85c"},
            {"role": "assistant", "content": "d\u2029"},
        ]
    }
    write_jsonl([conv, conv], tmp_path / "c.jsonl")
    assert read_openai_jsonl(tmp_path / "c.jsonl") == ([conv, conv], [])
    (tmp_path / "crlf.jsonl").write_bytes(
        (json.dumps(conv, ensure_ascii=False) + "\r\n{oops\r\n").encode("utf-8")
    )
    convs, errors = read_openai_jsonl(tmp_path / "crlf.jsonl")
    assert convs == [conv] and len(errors) == 1 and "crlf.jsonl:2: invalid JSON" in errors[0]
    from chatforge.data.prefs import read_pairs

    pair = {
        "messages": [{"role": "user", "content": "q\u2028?"}],
        "chosen": {"role": "assistant", "content": "yes"},
        "rejected": {"role": "assistant", "content": "no"},
    }
    write_jsonl([pair], tmp_path / "p.jsonl")
    pairs, stats = read_pairs(tmp_path / "p.jsonl")
    assert stats["pairs"] == 1 and pairs[0]["messages"] == pair["messages"]


def test_oasst_parent_loop_ends(tmp_path: Path) -> None:
    """Duplicate message ids (two dumps concatenated) can make a parent_id loop: the thread stops there."""
    recs = [
        {"message_id": "a", "parent_id": None, "role": "prompter", "text": "Q?"},
        {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "A."},
        {"message_id": "a", "parent_id": "b", "role": "prompter", "text": "Q again?"},
    ]
    (tmp_path / "loop.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    convs, errors = read_oasst_threads(tmp_path / "loop.jsonl")
    assert [[m["role"] for m in c["messages"]] for c in convs] == [["user", "assistant"]] and not errors


def test_write_read_jsonl_roundtrip(tmp_path: Path, world: World) -> None:
    convs = world_conversations(world, 40, 0)
    for name in ("chat.jsonl", "sub/chat.jsonl.gz"):
        assert write_jsonl(convs, tmp_path / name) == 40
        assert read_jsonl(tmp_path / name) == convs
        assert read_openai_jsonl(tmp_path / name)[0] == [{"messages": c["messages"]} for c in convs]
    first = (tmp_path / "again.jsonl.gz", tmp_path / "sub/chat.jsonl.gz")
    write_jsonl(convs, first[0])
    assert first[0].read_bytes() == first[1].read_bytes()  # reproducible bytes
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\n{oops\n')
    with pytest.raises(ChatforgeError, match=r"broken.jsonl:2: invalid JSON"):
        read_jsonl(tmp_path / "broken.jsonl")


def test_read_hf_chat_local(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    src = tmp_path / "share.jsonl"
    shutil.copy(FIXTURES / "sharegpt.json", tmp_path / "share.json")
    rows = json.loads((tmp_path / "share.json").read_text())[:2]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convs, errors = read_hf_chat(str(src), cache_dir=str(tmp_path / "cache"))
    assert errors == [] and [len(c["messages"]) for c in convs] == [2, 3]
    with pytest.raises(ChatforgeError, match="no such file"):
        read_hf_chat(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ChatforgeError, match="unknown chat format"):
        read_hf_chat(str(src), fmt="csv-ish")


def test_read_hf_chat_local_json_reports_bad_lines_and_tells_oasst_threads(tmp_path: Path) -> None:
    """A local JSON/JSONL file given as an ``hf`` source: a malformed line used to fail the whole file
    with datasets' "An error occurred while generating the dataset" (no line); and OASST thread files
    (``messages`` holding ``text``) were auto-detected as OpenAI, so every record had "no text"."""
    pytest.importorskip("datasets")
    lines = (FIXTURES / "openai.jsonl").read_text().splitlines()
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    convs, errors = read_hf_chat(str(src), cache_dir=str(tmp_path / "cache"))
    want_convs, want_errors = read_openai_jsonl(FIXTURES / "openai.jsonl")
    assert convs == want_convs and convs
    assert errors[0] == f"{src}:2: invalid JSON (Expecting property name enclosed in double quotes, column 2)"
    assert len(errors) == len(want_errors) + 1
    for name in ("oasst_threads.jsonl", "oasst_messages.jsonl"):
        got = read_hf_chat(str(FIXTURES / name), cache_dir=str(tmp_path / "cache"))
        assert got == read_oasst_threads(FIXTURES / name) and got[0], name
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ChatforgeError, match=r"empty\.jsonl: no JSON records"):
        read_hf_chat(str(tmp_path / "empty.jsonl"))


# ---------------------------------------------------------------- real data (optional)


@pytest.mark.parametrize(
    ("rel", "reader", "at_least"),
    [
        ("alpaca-1k/alpaca_en_demo.json.gz", read_alpaca, 990),
        ("oasst1-en/oasst1_en_validation_best_threads.jsonl.gz", read_oasst_threads, 180),
        ("oasst1-en/oasst1_en_validation_messages.jsonl.gz", read_oasst_threads, 180),
        ("lima/lima_train.json.gz", read_alpaca, 1000),
        ("gpteacher/roleplay-simple-deduped-roleplay-instruct.json.gz", read_alpaca, 1900),
    ],
)
def test_real_shared_data(rel: str, reader, at_least: int) -> None:
    path = shared_data_dir() / rel
    if not path.is_file():
        pytest.skip(f"{path} not present")
    convs, errors = reader(path)
    assert len(convs) >= at_least and len(errors) <= len(convs) // 100
    for c in convs[:200]:
        check_shape(c["messages"])
    if rel.startswith("lima"):  # 29 multi-turn rows carry their history
        assert sum(len(c["messages"]) > 2 for c in convs) >= 25


def test_shared_data_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATFORGE_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.delenv("CHATFORGE_SHARED_DATA")
    assert shared_data_dir().parts[-2:] == ("shared", "data") and os.sep in str(shared_data_dir())


def test_validation_holds_no_conversation_that_training_has(tmp_path: Path) -> None:
    """Duplicates went into both splits (the world source repeats 18% of its conversations): the SFT
    val loss then partly measured memory. Training keeps every conversation; validation drops repeats."""
    from chatforge.config import load_config
    from chatforge.data.chat import prepare, read_jsonl, write_jsonl

    convs = [
        {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}
        for i in range(50)
    ]
    src = tmp_path / "twice.jsonl"
    write_jsonl(convs + convs, src)
    cfg = load_config(
        "cpu-demo",
        [
            f"runs_dir={tmp_path}",
            f"chat_data.sources=[{{kind: openai, path: {src}}}]",
            "chat_data.val_fraction=0.2",
        ],
    )
    stats = prepare(cfg)
    out = tmp_path / "cpu-demo" / "chat"
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert len(train) == 80 and stats["val_in_train"] > 0 and len(val) == 20 - stats["val_in_train"] > 0
    in_train = {json.dumps(c["messages"]) for c in train}
    assert not any(json.dumps(c["messages"]) in in_train for c in val)
