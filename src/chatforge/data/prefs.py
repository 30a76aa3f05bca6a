"""Preference pairs: ``{"messages": [...prompt...], "chosen": {...}, "rejected": {...}, "source", "rater"}``.

One format for everything a reward model or DPO learns from: synthetic pairs from the built-in world
(ground truth decides which reply is better), public human-preference sets (HH-RLHF transcripts,
OpenAssistant rankings, UltraFeedback-style rated answers, WebGPT comparisons, TRL's chosen/rejected
format), and votes from the web UI.

World pairs are built from ``data/chat.py``'s conversations, so the chosen reply is exactly the SFT reply
shape and the rejected one differs in one behaviour:

- ``fact``: right vs wrong fact (a same-kind wrong value from the same split, or the same answer about
  another entity of the same kind: the asked subject swapped out);
- ``system``: obeys vs ignores the system message (JSON / persona / word limit / language);
- ``decline``: a brief decline vs a lecture, and a decline vs going along with a harmful request;
- ``refusal``: a plain answer vs a needless refusal of an edgy-but-benign request;
- ``concise``: the short answer vs the same answer padded with filler.

Train pairs use train-split entities and held-out pairs use eval-split entities (the world's own split,
as in the chat eval), from a separate random stream. Converters count ties and malformed records, skip
them, and report bad lines as ``file:line: reason``.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatforge.data import chat
from chatforge.data.world import Person, World, build_world, fact_value
from chatforge.errors import ChatforgeError

Messages = list[dict[str, str]]
CATEGORIES: tuple[str, ...] = ("fact", "system", "decline", "refusal", "concise")

# Filler that makes a correct answer worse: the "concise vs padded" pairs.
PAD_OPENERS: tuple[str, ...] = (
    "Great question! I'm happy to help you with that. ",
    "What a wonderful question, thank you for asking! ",
    "Sure thing! Let me think about this carefully for you. ",
)
PAD_CLOSERS: tuple[str, ...] = (
    " I hope this helps, and please let me know if you have any other questions at all!",
    " Feel free to ask me anything else you would like to know about this or any other topic.",
    " Is there anything else I can help you with today? I'm always here for you.",
)
# A decline that moralises at length (fails the brief-decline check: over 40 words).
LECTURES: tuple[str, ...] = (
    "I absolutely cannot help with that. What you are asking for is deeply unethical, dangerous and "
    "very likely illegal, and it could cause serious harm to real people. Please take a moment to reflect "
    "on why you want to do this, consider the consequences for everyone involved, and think about the "
    "kind of person you want to be. I strongly urge you to reconsider.",
    "I'm sorry, but I can't help with that. Requests like this are harmful and wrong. Hurting other "
    "people, damaging their property or invading their privacy is never acceptable, and I would be "
    "failing in my responsibilities if I assisted. You should know that actions like these have serious "
    "moral and legal consequences, and I encourage you to seek help.",
)
# Going along with a harmful request (kept non-actionable on purpose).
COMPLIANCE: tuple[str, ...] = (
    "Sure, here is how you could do that. First, make sure nobody is watching, then",
    "Of course! The easiest way to do it is to plan carefully so that you are not caught, and then",
)
NEEDLESS_REFUSALS: tuple[str, ...] = (
    "I can't help with that. It sounds dangerous.",
    "Sorry, I can't help with that request.",
    "I'm sorry, but I can't assist with anything that might cause harm.",
)


def _pair(messages: Messages, chosen: str, rejected: str, source: str, category: str, **meta: Any) -> dict:
    return {
        "messages": messages,
        "chosen": {"role": "assistant", "content": chosen},
        "rejected": {"role": "assistant", "content": rejected},
        "source": source,
        "rater": "world-ground-truth",
        "category": category,
        **meta,
    }


class _PairMaker:
    """Turns one world conversation into a preference pair on its final assistant turn."""

    def __init__(self, world: World, split: str, rng: random.Random) -> None:
        self.w = world
        self.rng = rng
        self.pools = chat._Pools(world, split)  # same split hygiene as the chat data

    def _wrong_answer(self, meta: dict, ideal: str) -> str:
        value = meta["value"]
        entity = self.w.entity(meta["subject"])
        wrong = self.pools.wrong(self.rng, entity, meta["relation"], value)
        return ideal.replace(value, wrong)

    def _wrong_subject(self, subject: str, relation: str, ideal: str) -> str:
        """The answer about another entity of the same kind: what a chat model that falls back on a name
        it was tuned on says ("Zoflosmoor has a population of 8,000." when asked about Reirdale)."""
        entity = self.w.entity(subject)
        pool = self.pools.people if isinstance(entity, Person) else self.pools.places
        others = [
            e
            for e in pool
            if e.name != subject and (v := fact_value(e, relation)) is not None and self.pools.ok(v)
        ]
        if not others:  # a tiny split: make another kind of pair
            raise chat._NoOption
        other = self.rng.choice(others)
        if subject in ideal:
            return ideal.replace(subject, other.name)
        return chat.answer_sentence(self.w, other, relation)  # named, where the ideal says "she"

    def _padded(self, ideal: str) -> str:
        return self.rng.choice(PAD_OPENERS) + ideal + self.rng.choice(PAD_CLOSERS)

    def make(self, conv: dict) -> tuple[str, str] | None:
        """(category, rejected reply) for ``conv``'s final assistant turn, or None for kinds not used."""
        kind, meta = conv["kind"], conv["meta"]
        ideal = conv["messages"][-1]["content"]
        rng = self.rng
        if kind in ("fact", "follow_up"):
            if rng.random() < 0.7 and meta.get("value") and meta["value"] in ideal:
                subject = meta.get("subject") or ""
                try:
                    if subject and meta.get("relation") and rng.random() < 0.4:
                        return "fact", self._wrong_subject(subject, meta["relation"], ideal)
                    return "fact", self._wrong_answer(meta, ideal)
                except chat._NoOption:
                    pass
            return "concise", self._padded(ideal)
        if kind == "arithmetic":
            if rng.random() < 0.5:
                c = meta["answer"]
                return "fact", ideal.replace(f"= {c}.", f"= {c + rng.choice((-3, -2, -1, 1, 2, 10))}.")
            return "concise", self._padded(ideal)
        if kind == "system_json":
            fields = meta["check"].get("fields", {})
            prose = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields.items())
            return "system", f"Sure! Here is what I know: {prose}."
        if kind == "system_persona":
            suffix = chat.PERSONAS[meta["persona"]]["suffix"]
            return "system", ideal.removesuffix(suffix)
        if kind == "system_length":
            body = ideal
            if meta.get("relation") and meta.get("subject"):
                body = chat.answer_sentence(
                    self.w, self.w.entity(meta["subject"]), meta["relation"], pronoun=True
                )
            return "system", self._padded(body)
        if kind == "system_language":
            e = self.w.entity(meta["subject"])
            return "system", chat.answer_sentence(self.w, e, meta["relation"], pronoun=True)
        if kind == "decline":
            if rng.random() < 0.6:
                return "decline", rng.choice(LECTURES)
            return "decline", rng.choice(COMPLIANCE)
        if kind == "benign_edgy":
            return "refusal", rng.choice(NEEDLESS_REFUSALS)
        if kind == "correction_hold":  # caving in to a wrong correction
            caved = chat.answer_sentence(
                self.w, self.w.entity(meta["subject"]), meta["relation"], meta["wrong"], pronoun=True
            )
            return "fact", chat.recheck_reply(caved, chat.ACCEPT_VERDICTS[0])
        return None


def world_pairs(world: World, n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` preference pairs about ``world``'s ``split`` entities (deterministic in its arguments)."""
    if n < 0:
        raise ChatforgeError(f"n must be >= 0, got {n}")
    rng = random.Random(f"chatforge-prefs:{world.seed}:{seed}:{split}")
    maker = _PairMaker(world, split, rng)
    out: list[dict] = []
    batch = 0
    while len(out) < n:
        convs = chat.world_conversations(world, max(2 * n, 64), seed=10_000 + 97 * seed + batch, split=split)
        batch += 1
        for conv in convs:
            made = maker.make(conv)
            if made is None:
                continue
            category, rejected = made
            ideal = conv["messages"][-1]["content"]
            if rejected == ideal:
                continue
            prompt = [{k: v for k, v in m.items() if k in ("role", "content")} for m in conv["messages"][:-1]]
            out.append(
                _pair(
                    prompt,
                    ideal,
                    rejected,
                    f"world:seed={world.seed}:{split}",
                    category,
                    kind=conv["kind"],
                    split=split,
                )
            )
            if len(out) == n:
                break
        if batch > 50:
            raise ChatforgeError(f"cannot build {n} preference pairs from this world's {split} split")
    return out


# ---------------------------------------------------------------- converters for public sets


class _Skip(Exception):
    """A record that is well-formed but carries no preference (a tie, identical replies)."""


# A malformed record (the message says why): the chat readers' own, so that ``chat._records`` (which
# reads our JSONL / JSON-list files, gzipped or not) and ``chat._check_messages`` report the same way.
_Bad = chat._Bad


def _text(x: Any, what: str) -> str:
    if not isinstance(x, str) or not x.strip():
        raise _Bad(f"{what} is missing or empty")
    return x.strip()


def parse_transcript(text: str, human: str = "\n\nHuman:", assistant: str = "\n\nAssistant:") -> Messages:
    """An Anthropic-style transcript ("\\n\\nHuman: ... \\n\\nAssistant: ...") as chat messages."""
    if not isinstance(text, str):
        raise _Bad("transcript is not a string")
    s = text if text.startswith(human) or text.startswith(assistant) else human + " " + text
    msgs: Messages = []
    pos = 0
    while pos < len(s):
        if s.startswith(human, pos):
            role, pos = "user", pos + len(human)
        elif s.startswith(assistant, pos):
            role, pos = "assistant", pos + len(assistant)
        else:
            raise _Bad("transcript does not alternate Human/Assistant turns")
        nxt = [i for i in (s.find(human, pos), s.find(assistant, pos)) if i >= 0]
        end = min(nxt) if nxt else len(s)
        content = s[pos:end].strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] += "\n\n" + content
        else:
            msgs.append({"role": role, "content": content})
        pos = end
    if not msgs or msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise _Bad("transcript does not end with an assistant turn")
    return msgs


def _from_hh(rec: dict) -> dict:
    chosen, rejected = parse_transcript(rec.get("chosen")), parse_transcript(rec.get("rejected"))
    if chosen[:-1] != rejected[:-1]:
        raise _Bad("chosen and rejected transcripts differ before the last assistant turn")
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        raise _Bad("an empty final assistant turn")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise _Skip
    return {"messages": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _from_webgpt(rec: dict) -> dict:
    if "text" in rec and "score" in rec:  # the DSP export: two "## Human: ... ## Assistant: ..." texts
        texts, scores = rec["text"], rec["score"]
        if not (isinstance(texts, list) and isinstance(scores, list) and len(texts) == len(scores) == 2):
            raise _Bad("expected 'text' and 'score' lists of two")
        a = parse_transcript(texts[0], "## Human:", "## Assistant:")
        b = parse_transcript(texts[1], "## Human:", "## Assistant:")
        if a[:-1] != b[:-1]:
            raise _Bad("the two answers are to different questions")
        prompt, answers = a[:-1], [a[-1]["content"], b[-1]["content"]]
    else:  # openai/webgpt_comparisons: question.full_text, answer_0/1, score_0/1
        q = rec.get("question")
        qtext = q.get("full_text") if isinstance(q, dict) else q
        prompt = [{"role": "user", "content": _text(qtext, "question")}]
        answers = [_text(rec.get("answer_0"), "answer_0"), _text(rec.get("answer_1"), "answer_1")]
        scores = [rec.get("score_0"), rec.get("score_1")]
    if not all(isinstance(x, int | float) for x in scores):
        raise _Bad("scores must be numbers")
    if scores[0] == scores[1] or answers[0] == answers[1]:
        raise _Skip
    best = 0 if scores[0] > scores[1] else 1
    return {"messages": prompt, "chosen": answers[best], "rejected": answers[1 - best]}


def _ranked_to_pairs(prompt: Messages, answers: list[tuple[str, float]], higher_better: bool) -> list[dict]:
    """k rated answers -> every (better, worse) pair; equal ratings are ties and give no pair."""
    out = []
    for i, (ta, sa) in enumerate(answers):
        for tb, sb in answers[i + 1 :]:
            if sa == sb or ta == tb:
                continue
            a_wins = (sa > sb) == higher_better
            out.append({"messages": prompt, "chosen": ta if a_wins else tb, "rejected": tb if a_wins else ta})
    return out


def _from_oasst_pair(rec: dict) -> dict:
    ctx = rec.get("context")
    if not isinstance(ctx, list) or not ctx:
        raise _Bad("context is missing or empty")
    prompt = []
    for i, m in enumerate(ctx):
        if not isinstance(m, dict):
            raise _Bad(f"context[{i}] is not an object")
        role = "user" if m.get("role") == "prompter" else m.get("role")  # may be any JSON value
        if role not in ("user", "assistant", "system"):
            raise _Bad(f"context[{i}]: unknown role {m.get('role')!r}")
        prompt.append({"role": role, "content": _text(m.get("text", m.get("content")), f"context[{i}] text")})
    if prompt[-1]["role"] != "user":
        raise _Bad("context does not end with a user turn")
    chosen, rejected = _text(rec.get("chosen"), "chosen"), _text(rec.get("rejected"), "rejected")
    cr, rr = rec.get("chosen_rank"), rec.get("rejected_rank")
    if chosen == rejected or (cr is not None and cr == rr):
        raise _Skip
    return {"messages": prompt, "chosen": chosen, "rejected": rejected}


def _from_ranked(rec: dict) -> list[dict]:
    """UltraFeedback-style: a prompt and k answers each with a score (or an OASST-style rank)."""
    if isinstance(rec.get("messages"), list):
        prompt = chat._check_messages(rec["messages"], prompt=True)
    else:
        q = rec.get("prompt", rec.get("instruction", rec.get("question")))
        prompt = [{"role": "user", "content": _text(q, "prompt")}]
    answers_raw = rec.get("completions", rec.get("responses", rec.get("answers")))
    if not isinstance(answers_raw, list) or len(answers_raw) < 2:
        raise _Bad("expected a list of at least two completions")
    answers: list[tuple[str, float]] = []
    keys: set[str] = set()
    for i, a in enumerate(answers_raw):
        if not isinstance(a, dict):
            raise _Bad(f"completions[{i}] is not an object")
        text = _text(a.get("response", a.get("text", a.get("content"))), f"completions[{i}] text")
        key = next((k for k in ("overall_score", "score", "rating", "rank") if k in a), None)
        score = a[key] if key else None
        if not isinstance(score, int | float) or isinstance(score, bool):
            raise _Bad(f"completions[{i}] has no numeric score")
        keys.add(key)  # type: ignore[arg-type]
        answers.append((text, float(score)))
    # Scores are "higher is better", ranks "lower is better", and two score fields may use different
    # scales: answers rated by different fields cannot be compared, so the record says which it mixes.
    if len(keys) > 1:
        raise _Bad(f"completions mix rating fields ({', '.join(sorted(keys))}); use one per record")
    pairs = _ranked_to_pairs(prompt, answers, higher_better=keys != {"rank"})
    if not pairs:
        raise _Skip
    return pairs


def _oasst_message_pairs(path: Path) -> tuple[list[dict], dict]:
    """Raw oasst1 message dumps: every prompter message with >= 2 ranked replies -> all rank pairs."""
    stats = {"records": 0, "pairs": 0, "ties": 0, "malformed": 0, "incomplete_threads": 0, "errors": []}
    nodes: dict[str, dict] = {}
    lines: dict[str, int] = {}
    deleted: set[str] = set()
    for lineno, rec in chat._records(path):
        stats["records"] += 1
        if isinstance(rec, _Bad) or not isinstance(rec, dict) or not isinstance(rec.get("message_id"), str):
            reason = rec if isinstance(rec, _Bad) else "not an oasst message (no message_id)"
        elif rec.get("parent_id") is not None and not isinstance(rec["parent_id"], str):
            reason = "parent_id is not a string"  # a list or object would not hash
        elif rec.get("deleted"):
            deleted.add(rec["message_id"])
            continue
        elif not isinstance(rec.get("text"), str) or not rec["text"].strip():
            reason = "text is missing or empty"
        elif rec["message_id"] == rec.get("parent_id"):
            reason = "the message is its own parent"
        else:
            nodes[rec["message_id"]] = rec
            lines[rec["message_id"]] = lineno
            continue
        stats["malformed"] += 1
        stats["errors"].append(f"{path}:{lineno}: {reason}")
    kids: dict[str, list[dict]] = {}
    for m in nodes.values():
        if m.get("parent_id") in nodes:
            kids.setdefault(m["parent_id"], []).append(m)

    def thread(mid: str) -> Messages:
        """The thread from its root to ``mid``; _Bad when an ancestor is gone, as the prompt would
        otherwise start mid-conversation without the turns it answers."""
        out: Messages = []
        seen: set[str] = set()
        while mid:
            if mid in seen:  # a parent_id loop (duplicate ids): no root to start from
                raise _Bad("its parent_id chain loops, so the thread has no root")
            if mid not in nodes:
                gone = "deleted" if mid in deleted else "missing"
                raise _Bad(f"an earlier message of its thread ({mid}) is {gone}")
            seen.add(mid)
            m = nodes[mid]
            out.append({"role": "user" if m.get("role") == "prompter" else "assistant", "content": m["text"]})
            mid = m.get("parent_id") or ""
        return out[::-1]

    pairs: list[dict] = []
    for pid, children in kids.items():
        if nodes[pid].get("role") != "prompter":
            continue
        ranked = [(c["text"], float(c["rank"])) for c in children if isinstance(c.get("rank"), int | float)]
        if len(ranked) < 2:
            continue
        try:
            prompt = thread(pid)
        except _Bad as e:  # counted apart from malformed records: each message is well-formed
            stats["incomplete_threads"] += 1
            stats["errors"].append(f"{path}:{lines[pid]}: {e}; its ranked replies are skipped")
            continue
        try:  # the chat rules every other format's prompt obeys (alternating turns, ...)
            prompt = chat._check_messages(prompt, prompt=True)
        except _Bad as e:
            stats["malformed"] += 1
            stats["errors"].append(f"{path}:{lines[pid]}: {e}")
            continue
        got = _ranked_to_pairs(prompt, ranked, higher_better=False)
        n_possible = len(ranked) * (len(ranked) - 1) // 2
        stats["ties"] += n_possible - len(got)
        pairs += got
    stats["pairs"] = len(pairs)
    stats["errors"].sort(key=lambda err: int(err[len(str(path)) + 1 :].split(":", 1)[0]))  # file order
    return pairs, stats


FORMATS: tuple[str, ...] = ("prefs", "hh", "webgpt", "oasst_pairs", "oasst_messages", "ranked", "trl")


def detect_format(rec: dict) -> str:
    if isinstance(rec.get("chosen"), dict) and "messages" in rec:
        return "prefs"
    if isinstance(rec.get("chosen"), list) or ({"prompt", "chosen", "rejected"} <= set(rec)):
        return "trl"
    if isinstance(rec.get("chosen"), str) and "Human:" in rec["chosen"]:
        return "hh"
    if "context" in rec and "chosen" in rec:
        return "oasst_pairs"
    if "message_id" in rec:
        return "oasst_messages"
    if ("text" in rec and "score" in rec) or "answer_0" in rec:
        return "webgpt"
    if any(k in rec for k in ("completions", "responses", "answers")):
        return "ranked"
    raise ChatforgeError(
        f"cannot tell the preference format from keys {sorted(rec)[:8]} (known: {', '.join(FORMATS)})"
    )


def _from_prefs(rec: dict) -> dict:
    prompt = chat._check_messages(rec.get("messages"), prompt=True)
    out = {"messages": prompt}
    for side in ("chosen", "rejected"):
        m = rec.get(side)
        if not isinstance(m, dict) or m.get("role", "assistant") != "assistant":
            raise _Bad(f"{side} must be an assistant message object")
        out[side] = _text(m.get("content"), f"{side}.content")
    if out["chosen"] == out["rejected"]:
        raise _Skip
    # `chatforge feedback export --weighted` writes each rater's reliability; the RM's loss uses it
    w = rec.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < math.inf:
        raise _Bad(f"weight must be a number >= 0, got {w!r}")
    if w != 1.0:
        out["weight"] = float(w)
    if isinstance(rec.get("rater"), str) and rec["rater"]:
        out["rater"] = rec["rater"]
    return out


def pair_problem(rec: dict) -> str | None:
    """Why ``chatforge reward`` would not learn from this record of our own preference format: the reason
    it counts it malformed, ``"identical"`` for two equal replies (a tie it skips), or None when usable."""
    try:
        _from_prefs(rec)
    except _Bad as e:
        return str(e)
    except _Skip:
        return "identical"
    return None


def _from_trl(rec: dict) -> dict:
    """TRL's preference shapes (UltraFeedback-binarized and most Hub preference sets): ``chosen`` and
    ``rejected`` as strings or message lists, with an explicit ``prompt`` (a string or messages, which
    the lists may repeat) or an implicit one (the messages the two lists share before their replies)."""

    def messages(x: Any, what: str) -> Messages:
        if isinstance(x, str):
            return [{"role": "assistant", "content": x}]
        if isinstance(x, list) and x and all(isinstance(m, dict) for m in x):
            return x
        raise _Bad(f"{what} must be a string or a list of messages")

    chosen, rejected = messages(rec.get("chosen"), "chosen"), messages(rec.get("rejected"), "rejected")
    p = rec.get("prompt")
    if p is None:
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            raise _Bad("chosen and rejected do not share the messages before their replies")
    else:
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else messages(p, "prompt")
    replies = []
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[: len(prompt)] == prompt and len(msgs) > len(prompt):
            msgs = msgs[len(prompt) :]  # the list repeats the prompt (UltraFeedback-binarized does)
        if len(msgs) != 1 or msgs[0].get("role", "assistant") != "assistant":
            raise _Bad(f"{side} must end with one assistant reply after the prompt")
        replies.append(_text(msgs[0].get("content"), f"{side}.content"))
    if replies[0] == replies[1]:
        raise _Skip
    return {
        "messages": chat._check_messages(prompt, prompt=True),
        "chosen": replies[0],
        "rejected": replies[1],
    }


_CONVERTERS: dict[str, Callable[[dict], dict | list[dict]]] = {
    "prefs": _from_prefs,
    "hh": _from_hh,
    "webgpt": _from_webgpt,
    "oasst_pairs": _from_oasst_pair,
    "ranked": _from_ranked,
    "trl": _from_trl,
}


def read_pairs(
    path: str | os.PathLike, fmt: str = "auto", source: str | None = None
) -> tuple[list[dict], dict]:
    """Any supported preference file -> (pairs in our format, stats).

    ``stats``: ``records``, ``pairs``, ``ties`` (no preference: equal scores or identical replies) and
    ``malformed`` (skipped), with the first 20 reasons as ``file:line: reason`` in ``errors``; raw OASST
    message dumps add ``incomplete_threads``: prompts skipped because an earlier message of their thread is
    deleted or missing.
    """
    p = Path(path)
    if fmt not in ("auto", *FORMATS):
        raise ChatforgeError(f"fmt: must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    records = list(chat._records(p))
    if fmt == "auto":
        first = next((r for _, r in records if isinstance(r, dict)), None)
        if first is None:
            raise ChatforgeError(f"{p}: no JSON records found")
        try:
            fmt = detect_format(first)
        except ChatforgeError as e:  # reward.pref_files lists several files: say which one
            raise ChatforgeError(f"{p}: {e}") from None
    src = source or f"{fmt}:{p.name}"
    if fmt == "oasst_messages":
        raw, stats = _oasst_message_pairs(p)
    else:
        conv = _CONVERTERS[fmt]
        raw = []
        stats = {"records": 0, "pairs": 0, "ties": 0, "malformed": 0, "errors": []}
        for lineno, rec in records:
            stats["records"] += 1
            try:
                if isinstance(rec, _Bad):
                    raise rec
                if not isinstance(rec, dict):
                    raise _Bad("record is not a JSON object")
                got = conv(rec)
                got = got if isinstance(got, list) else [got]
                for r in got:  # the prompt obeys our chat rules whatever the format (no empty turns...)
                    r["messages"] = chat._check_messages(r["messages"], prompt=True)
                raw += got
            except _Skip:
                stats["ties"] += 1
            except _Bad as e:
                stats["malformed"] += 1
                stats["errors"].append(f"{p}:{lineno}: {e}")
        stats["pairs"] = len(raw)
    stats["errors"] = stats["errors"][:20]
    pairs = [
        {
            "messages": r["messages"],
            "chosen": {"role": "assistant", "content": r["chosen"]},
            "rejected": {"role": "assistant", "content": r["rejected"]},
            "source": src,
            "rater": r.get("rater", "human"),
            **({"weight": r["weight"]} if "weight" in r else {}),
        }
        for r in raw
    ]
    return pairs, {"format": fmt, **stats}


def thread_key(messages: Messages) -> str:
    """The root of a conversation: its messages up to and including the first user turn."""
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages) - 1)
    return json.dumps([[m.get("role"), m.get("content")] for m in messages[: first_user + 1]])


def split_by_prompt(pairs: list[dict], held_out: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train / held-out split that keeps all pairs of one conversation on the same side (no prompt leaks).

    Pairs are grouped by ``thread_key``, not by the whole prompt: OASST ranks replies at every depth of a
    thread, so a later prompt quotes an earlier pair's replies, and both must fall on the same side."""
    pair_keys = [thread_key(p["messages"]) for p in pairs]
    keys = sorted(set(pair_keys))
    random.Random(seed).shuffle(keys)
    test_keys = set(keys[: max(1, int(len(keys) * held_out))]) if held_out > 0 else set()
    train = [p for p, k in zip(pairs, pair_keys) if k not in test_keys]
    test = [p for p, k in zip(pairs, pair_keys) if k in test_keys]
    return train, test


def shared_pair_files() -> dict[str, list[Path]]:
    """The real preference sets in ``../shared/data`` that exist here (empty when the folder is absent)."""
    root = chat.shared_data_dir()
    found = {
        "oasst1": sorted(root.glob("oasst1-en/*pairs*.jsonl*")),
        "webgpt": sorted(root.glob("webgpt-comparisons/*.json*")),
        "hh-rlhf": [
            p for p in sorted(root.glob("hh-rlhf-train-samples/*.jsonl*")) if "red-team" not in p.name
        ],
    }
    return {k: v for k, v in found.items() if v}


def prepared(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The (train, held-out) pairs that ``prepare`` wrote under ``<run>/prefs``."""
    return chat.read_jsonl(run_dir / "prefs" / "train.jsonl"), chat.read_jsonl(
        run_dir / "prefs" / "heldout.jsonl"
    )


def prepare(cfg: Any) -> dict:
    """Write ``<run>/prefs/{train,heldout}.jsonl``: world pairs (train-split / eval-split entities) plus
    any ``reward.pref_files`` (split by prompt). Returns counts per source and category."""
    rc = cfg.reward
    out_dir = Path(cfg.run_dir) / "prefs"
    world_seed = next((s.seed for s in cfg.chat_data.sources if s.kind == "world"), 0)
    train: list[dict] = []
    held: list[dict] = []
    stats: dict[str, Any] = {"sources": []}
    if rc.world_pairs:
        world = build_world(world_seed)
        train += world_pairs(world, rc.world_pairs, rc.pairs_seed, "train")
        held += world_pairs(world, max(1, rc.world_pairs // 8), rc.pairs_seed + 1, "eval")
        stats["sources"].append(
            {"source": f"world:seed={world_seed}", "train": len(train), "heldout": len(held)}
        )
    for f in rc.pref_files:
        pairs, st = read_pairs(f)
        if not pairs:
            cut = st.get("incomplete_threads", 0)
            more = f", {cut} threads missing earlier messages" if cut else ""
            raise ChatforgeError(
                f"{f}: no usable preference pairs ({st['malformed']} malformed, {st['ties']} ties{more})"
            )
        tr, te = split_by_prompt(pairs, rc.heldout_fraction, rc.pairs_seed)
        train += tr
        held += te
        stats["sources"].append({"source": f, "train": len(tr), "heldout": len(te), **st})
    if not train:
        raise ChatforgeError("reward: no preference pairs (set reward.world_pairs or reward.pref_files)")
    stats["train"] = chat.write_jsonl(train, out_dir / "train.jsonl")
    stats["heldout"] = chat.write_jsonl(held, out_dir / "heldout.jsonl")
    return stats
