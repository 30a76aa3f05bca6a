"""Preference data: world pairs are well-formed and split-clean; converters count ties and bad records."""

import gzip
import json

import pytest

from chatforge.data import chat, prefs
from chatforge.data.world import build_world
from chatforge.errors import ChatforgeError


@pytest.fixture(scope="module")
def world():
    return build_world(0)


def test_world_pairs_are_well_formed_and_cover_every_category(world) -> None:
    pairs = prefs.world_pairs(world, 300, seed=0, split="train")
    assert len(pairs) == 300
    assert {p["category"] for p in pairs} == set(prefs.CATEGORIES)
    for p in pairs:
        assert p["messages"] and p["messages"][-1]["role"] == "user"
        assert p["chosen"]["role"] == p["rejected"]["role"] == "assistant"
        assert p["chosen"]["content"] != p["rejected"]["content"]
        assert p["source"].startswith("world:") and p["rater"]
    assert prefs.world_pairs(world, 50, 0, "train") == prefs.world_pairs(world, 50, 0, "train")


def test_heldout_pairs_use_only_eval_entities(world) -> None:
    held = prefs.world_pairs(world, 200, seed=1, split="eval")
    train_names = {p.name for p in world.people_in("train")} | {p.name for p in world.places_in("train")}
    eval_names = {p.name for p in world.people_in("eval")} | {p.name for p in world.places_in("eval")}
    seen_eval = False
    for p in held:
        text = json.dumps(p)
        assert not any(n in text for n in train_names), "a train-split entity leaked into held-out pairs"
        seen_eval |= any(n in text for n in eval_names)
    assert seen_eval


def test_the_grader_agrees_with_the_world_labels(world) -> None:
    """Chosen fact replies pass the exact grader and rejected ones fail it (ground truth), including a
    rejected reply about another entity of the same kind (its name, where the chosen reply says "she")."""
    from chatforge.data.chat import grade, guard_subject, world_conversations

    convs = world_conversations(world, 60, seed=3, split="train")
    facts = [c for c in convs if c["kind"] == "fact"]
    maker = prefs._PairMaker(world, "train", __import__("random").Random(0))
    checked, other_subject = 0, 0
    for c in facts:
        made = maker.make(c)
        if made and made[0] == "fact":
            item = {"check": guard_subject(world, "fact", c["messages"], c["meta"], c["meta"]["check"])}
            assert grade(item, c["messages"][-1]["content"])
            assert not grade(item, made[1]), (c["messages"], made[1])
            other_subject += any(n in made[1] for n in item["check"]["wrong_subjects"])
            checked += 1
    assert checked and 0 < other_subject < checked


def _write(path, lines: list[str]) -> str:
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_hh_rlhf_transcripts(tmp_path) -> None:
    good = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Paris.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: No idea.",
    }
    tie = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: A"}
    diverged = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: R\n\nAssistant: B"}
    f = _write(tmp_path / "hh.jsonl.gz", [json.dumps(good), json.dumps(tie), "{broken", json.dumps(diverged)])
    pairs, st = prefs.read_pairs(f)
    assert st["format"] == "hh" and st["records"] == 4
    assert (st["pairs"], st["ties"], st["malformed"]) == (1, 1, 2)
    assert st["errors"][0].startswith(f"{f}:3: invalid JSON")
    assert st["errors"][1].startswith(f"{f}:4: ")
    p = pairs[0]
    assert [m["role"] for m in p["messages"]] == ["user", "assistant", "user"]
    assert p["messages"][-1]["content"] == "Capital of France?"
    assert (p["chosen"]["content"], p["rejected"]["content"]) == ("Paris.", "No idea.")


def test_prompts_with_empty_or_out_of_order_turns_are_malformed(tmp_path) -> None:
    """An HH transcript with an empty Human turn, or an OASST pairs context with two user turns in a row,
    became a pair whose prompt breaks our chat rules: the same pair in our own format is rejected
    ("message 0 (user) has no text"). Every format's prompt is now checked the same way."""
    hh = [
        {"chosen": "\n\nHuman: \n\nAssistant: Hi there.", "rejected": "\n\nHuman: \n\nAssistant: Go away."},
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: \n\nHuman: Well?\n\nAssistant: Sorry, hello.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: \n\nHuman: Well?\n\nAssistant: What.",
        },
        {"chosen": "\n\nHuman: Q\n\nAssistant: Good.", "rejected": "\n\nHuman: Q\n\nAssistant: Bad."},
    ]
    f = _write(tmp_path / "hh.jsonl.gz", [json.dumps(r) for r in hh])
    pairs, st = prefs.read_pairs(f)
    assert (st["pairs"], st["malformed"]) == (1, 2) and pairs[0]["messages"][0]["content"] == "Q"
    assert "has no text" in st["errors"][0] and st["errors"][1].startswith(f"{f}:2: ")
    ctx = [{"role": "prompter", "text": "One"}, {"role": "prompter", "text": "Two"}]
    f2 = tmp_path / "oasst_pairs.jsonl"
    f2.write_text(json.dumps({"context": ctx, "chosen": "a", "rejected": "b"}) + "\n")
    pairs, st = prefs.read_pairs(f2, fmt="oasst_pairs")
    assert (st["pairs"], st["malformed"]) == (0, 1) and "do not alternate" in st["errors"][0]


def test_ranked_answers_give_all_pairs_and_skip_ties(tmp_path) -> None:
    rec = {
        "instruction": "Name a colour.",
        "completions": [
            {"response": "Blue.", "overall_score": 9},
            {"response": "Dunno", "overall_score": 2},
            {"response": "Red!", "overall_score": 9},
        ],
    }
    all_tied = {"prompt": "x", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]}
    f = tmp_path / "uf.jsonl"
    f.write_text(
        json.dumps(rec)
        + "\n"
        + json.dumps(all_tied)
        + "\n"
        + json.dumps({"prompt": "y", "completions": [1]})
        + "\n"
    )
    pairs, st = prefs.read_pairs(f)
    assert st["format"] == "ranked" and (st["pairs"], st["ties"], st["malformed"]) == (2, 1, 1)
    assert {(p["chosen"]["content"], p["rejected"]["content"]) for p in pairs} == {
        ("Blue.", "Dunno"),
        ("Red!", "Dunno"),
    }


def test_ranked_record_mixing_score_and_rank_is_malformed(tmp_path) -> None:
    """A record whose completions carry ``score`` on some and ``rank`` on others was read wholly as
    ranks (lower is better), so the scored answers' preference flipped: 9 lost to 2."""
    mixed = {
        "prompt": "Name a colour.",
        "completions": [
            {"text": "Blue.", "score": 9},
            {"text": "Dunno", "score": 2},
            {"text": "Red!", "rank": 0},
        ],
    }
    ranks = {
        "prompt": "Name a shape.",
        "completions": [{"text": "Circle.", "rank": 0}, {"text": "Eh", "rank": 1}],
    }
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps(ranks) + "\n" + json.dumps(mixed) + "\n")
    pairs, st = prefs.read_pairs(f, fmt="ranked")
    assert [(p["chosen"]["content"], p["rejected"]["content"]) for p in pairs] == [("Circle.", "Eh")]
    assert st["malformed"] == 1 and st["errors"] == [
        f"{f}:2: completions mix rating fields (rank, score); use one per record"
    ]


def test_webgpt_and_oasst_formats(tmp_path) -> None:
    wg = [
        {
            "text": ["## Human:\nWhy?\n\n## Assistant:\nBecause A.", "## Human:\nWhy?\n\n## Assistant:\nB."],
            "score": [0.0, 1.0],
        },
        {
            "text": ["## Human:\nQ\n\n## Assistant:\nx", "## Human:\nQ\n\n## Assistant:\ny"],
            "score": [0.5, 0.5],
        },
    ]
    f = tmp_path / "webgpt.json"
    f.write_text(json.dumps(wg))
    pairs, st = prefs.read_pairs(f)
    assert (st["format"], st["pairs"], st["ties"]) == ("webgpt", 1, 1)
    assert pairs[0]["chosen"]["content"] == "B." and pairs[0]["messages"] == [
        {"role": "user", "content": "Why?"}
    ]
    msgs = [
        {"message_id": "q", "parent_id": None, "role": "prompter", "text": "Hi?"},
        {"message_id": "a", "parent_id": "q", "role": "assistant", "text": "Best", "rank": 0},
        {"message_id": "b", "parent_id": "q", "role": "assistant", "text": "Worst", "rank": 2},
        {"message_id": "c", "parent_id": "q", "role": "assistant", "text": "Mid", "rank": 1},
    ]
    f2 = tmp_path / "oasst.jsonl"
    f2.write_text("\n".join(json.dumps(m) for m in msgs) + "\n")
    pairs, st = prefs.read_pairs(f2)
    assert st["format"] == "oasst_messages" and st["pairs"] == 3
    assert ("Best", "Worst") in {(p["chosen"]["content"], p["rejected"]["content"]) for p in pairs}


def test_oasst_messages_with_a_missing_text_or_a_loop(tmp_path) -> None:
    """A raw oasst1 message without text is a malformed record (file:line), not a KeyError or a pair
    whose reply is None; a message that is its own parent is one too, and cannot hang the reader."""
    recs = [
        {"message_id": "p", "parent_id": None, "role": "prompter", "text": "Question?"},
        {"message_id": "a", "parent_id": "p", "role": "assistant", "text": "Best.", "rank": 0},
        {"message_id": "b", "parent_id": "p", "role": "assistant", "text": "Worse.", "rank": 1},
        {"message_id": "c", "parent_id": "p", "role": "assistant", "rank": 2},
        {"message_id": "d", "parent_id": "p", "role": "assistant", "text": None, "rank": 3},
        {"message_id": "s", "parent_id": "s", "role": "prompter", "text": "Me?"},
        {"message_id": "s1", "parent_id": "s", "role": "assistant", "text": "One.", "rank": 0},
        {"message_id": "s2", "parent_id": "s", "role": "assistant", "text": "Two.", "rank": 1},
    ]
    path = _write(tmp_path / "msgs.jsonl.gz", [json.dumps(r) for r in recs])
    pairs, st = prefs.read_pairs(path)
    assert st["format"] == "oasst_messages" and st["malformed"] == 3
    assert [e.split(".gz:")[1] for e in st["errors"]] == [
        "4: text is missing or empty",
        "5: text is missing or empty",
        "6: the message is its own parent",
    ]
    assert [(p["chosen"]["content"], p["rejected"]["content"]) for p in pairs] == [("Best.", "Worse.")]
    assert pairs[0]["messages"] == [{"role": "user", "content": "Question?"}]


def test_oasst_threads_missing_an_ancestor_are_skipped_and_reported(tmp_path) -> None:
    """A prompt whose parent (or an earlier message) is deleted or not in the dump used to become a pair
    on the turns that were left: a follow-up question without the conversation it follows. And raw
    message dumps skipped the chat rules every other format's prompt obeys (two user turns in a row)."""

    def msg(mid: str, parent: str | None, role: str, text: str, **kw) -> dict:
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, **kw}

    recs = [
        msg("q", None, "prompter", "Name a fruit."),
        msg("a", "q", "assistant", "Apple.", rank=0, deleted=True),
        msg("b", "q", "assistant", "Pear.", rank=0),
        msg("b2", "q", "assistant", "Rock.", rank=1),
        msg("f", "a", "prompter", "Why that one?"),  # its parent is deleted
        msg("f1", "f", "assistant", "It is crisp.", rank=0),
        msg("f2", "f", "assistant", "No idea.", rank=1),
        msg("m", "gone", "prompter", "And then?"),  # its parent is not in the file
        msg("m1", "m", "assistant", "Then this.", rank=0),
        msg("m2", "m", "assistant", "Nothing.", rank=1),
        msg("u", "q", "prompter", "A second question in a row?"),  # user after user
        msg("u1", "u", "assistant", "Yes.", rank=0),
        msg("u2", "u", "assistant", "No.", rank=1),
    ]
    f = tmp_path / "msgs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs, st = prefs.read_pairs(f)
    assert [(p["messages"], p["chosen"]["content"], p["rejected"]["content"]) for p in pairs] == [
        ([{"role": "user", "content": "Name a fruit."}], "Pear.", "Rock.")
    ]
    assert (st["incomplete_threads"], st["malformed"]) == (2, 1)
    assert st["errors"] == [
        f"{f}:5: an earlier message of its thread (a) is deleted; its ranked replies are skipped",
        f"{f}:8: an earlier message of its thread (gone) is missing; its ranked replies are skipped",
        f"{f}:11: roles do not alternate user/assistant (got user where assistant belongs)",
    ]
    # The thread reader starts every thread at a root; the replies it cannot reach are now reported.
    convs, errors = chat.read_oasst_threads(f)
    assert [[m["content"] for m in c["messages"]] for c in convs] == [["Name a fruit.", "Pear."]]
    assert errors == [
        f"{f}:5: 2 message(s) reply to a deleted or missing parent (here a); "
        "they and the replies below them are skipped"
    ]


def test_unhashable_ids_and_roles_are_malformed_not_a_traceback(tmp_path) -> None:
    """A parent_id or a role that is a list or an object (a hand-edited or mangled dump) raised
    TypeError (unhashable type) out of read_pairs and read_oasst_threads instead of a file:line report."""
    recs = [
        {"message_id": "q", "parent_id": None, "role": "prompter", "text": "Hi?"},
        {"message_id": "a", "parent_id": "q", "role": "assistant", "text": "Hello.", "rank": 0},
        {"message_id": "b", "parent_id": "q", "role": "assistant", "text": "What.", "rank": 1},
        {"message_id": "c", "parent_id": ["q"], "role": "assistant", "text": "Odd.", "rank": 2},
    ]
    f = tmp_path / "msgs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs, st = prefs.read_pairs(f)
    assert [(p["chosen"]["content"], p["rejected"]["content"]) for p in pairs] == [("Hello.", "What.")]
    assert st["malformed"] == 1 and st["errors"] == [f"{f}:4: parent_id is not a string"]
    convs, errors = chat.read_oasst_threads(f)
    assert len(convs) == 1 and errors == [f"{f}:4: parent_id is not a string"]
    f2 = tmp_path / "pairs.jsonl"
    f2.write_text(
        json.dumps({"context": [{"role": ["prompter"], "text": "q"}], "chosen": "a", "rejected": "b"})
    )
    _, st = prefs.read_pairs(f2, fmt="oasst_pairs")
    assert st["malformed"] == 1 and "unknown role ['prompter']" in st["errors"][0]


def test_trl_preference_shapes(tmp_path) -> None:
    """TRL's shapes: UltraFeedback-binarized (a string prompt, message lists that repeat it), an implicit
    prompt (the messages both lists share), plain strings; mismatched lists are malformed, equal replies ties."""
    q = [{"role": "user", "content": "Name a river."}]
    good, bad = {"role": "assistant", "content": "The Lune."}, {"role": "assistant", "content": "Blue."}
    lines = [
        json.dumps(
            {"prompt": "Name a river.", "chosen": [*q, good], "rejected": [*q, bad], "score_chosen": 8.0}
        ),
        json.dumps({"chosen": [*q, good], "rejected": [*q, bad]}),
        json.dumps({"prompt": "Name a river.", "chosen": "The Lune.", "rejected": "Blue."}),
        json.dumps({"prompt": q, "chosen": [good], "rejected": [bad]}),
        json.dumps({"chosen": [*q, good], "rejected": [{"role": "user", "content": "Other?"}, bad]}),
        json.dumps({"prompt": "Name a river.", "chosen": "Same.", "rejected": "Same."}),
    ]
    pairs, st = prefs.read_pairs(_write(tmp_path / "uf.jsonl", lines))
    assert st["format"] == "trl" and st["pairs"] == 4 and st["ties"] == 1 and st["malformed"] == 1
    assert all(p["messages"] == q for p in pairs)
    assert {(p["chosen"]["content"], p["rejected"]["content"]) for p in pairs} == {("The Lune.", "Blue.")}
    assert "uf.jsonl:5: chosen and rejected do not share" in st["errors"][0]


def test_a_file_in_no_known_format_is_named(tmp_path) -> None:
    path = _write(tmp_path / "red-team.jsonl.gz", [json.dumps({"transcript": "x", "rating": 2})])
    with pytest.raises(ChatforgeError, match=r"red-team\.jsonl\.gz: cannot tell the preference format from"):
        prefs.read_pairs(path)


def test_our_own_format_reads_back_with_every_prompt_whole(world, tmp_path) -> None:
    """The pairs a run writes (and `chatforge feedback export` writes) train the RM via reward.pref_files:
    the prompt must come back ending with the user turn the replies answer, single-turn ones included."""
    pairs = prefs.world_pairs(world, 300, 0, "train")
    assert any(len(p["messages"]) == 1 for p in pairs) and any(len(p["messages"]) > 2 for p in pairs)
    f = tmp_path / "ours.jsonl"
    chat.write_jsonl(pairs, f)
    back, st = prefs.read_pairs(f)
    assert st["malformed"] == 0 and st["pairs"] == len(pairs)
    assert [p["messages"] for p in back] == [p["messages"] for p in pairs]
    assert [p["chosen"] for p in back] == [p["chosen"] for p in pairs]
    bad = {**pairs[0], "messages": [*pairs[0]["messages"], {"role": "assistant", "content": "Hi."}]}
    chat.write_jsonl([bad], f)
    assert "does not end with a user turn" in prefs.read_pairs(f)[1]["errors"][0]


def test_a_raters_weight_and_name_read_back(tmp_path) -> None:
    """`chatforge feedback export --weighted` writes each vote's rater and weight: both reach the RM's
    pairs (the weight scales the pair's loss); a weight that is not a number >= 0 is a malformed record."""
    rec = {
        "messages": [{"role": "user", "content": "Which river?"}],
        "chosen": {"role": "assistant", "content": "The Lune."},
        "rejected": {"role": "assistant", "content": "A river."},
    }
    lines = [
        json.dumps({**rec, "rater": "r-careless", "weight": 0.25}),
        json.dumps(rec),
        json.dumps({**rec, "weight": "high"}),
        json.dumps({**rec, "weight": -1}),
    ]
    back, st = prefs.read_pairs(_write(tmp_path / "votes.jsonl", lines))
    assert [(p["rater"], p.get("weight", 1.0)) for p in back] == [("r-careless", 0.25), ("human", 1.0)]
    assert st["malformed"] == 2 and "votes.jsonl:3: weight must be a number >= 0" in st["errors"][0]


def test_split_by_prompt_keeps_prompts_on_one_side(world) -> None:
    pairs = prefs.world_pairs(world, 200, 0, "train")
    tr, te = prefs.split_by_prompt(pairs, 0.2, seed=0)
    key = lambda p: json.dumps(p["messages"], sort_keys=True)  # noqa: E731
    assert tr and te and not ({key(p) for p in tr} & {key(p) for p in te})


@pytest.mark.skipif(not prefs.shared_pair_files(), reason="../shared/data is not present")
def test_real_preference_sets_convert() -> None:
    for _name, files in prefs.shared_pair_files().items():
        for f in files:
            pairs, st = prefs.read_pairs(f)
            assert pairs, f"{f}: no pairs"
            assert st["malformed"] <= 0.05 * st["records"], (f, st["errors"][:3])
            assert all(p["chosen"]["content"] != p["rejected"]["content"] for p in pairs)
