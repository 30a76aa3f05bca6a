"""The feedback database, the preference export, the Bradley–Terry leaderboard and rater statistics."""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from chatforge.cli import main as cli
from chatforge.config import ServeConfig
from chatforge.data.prefs import read_pairs
from chatforge.serve.api import create_app
from chatforge.serve.db import Database
from chatforge.serve.feedback import Pair, export, leaderboard, rater_stats
from serve_util import fresh_database, make_checkpoints, running, throwaway_postgres

PROMPT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who builds clocks?"}]
# A vote as the web UI posts it to /ui/votes.
UI_VOTE = {
    "prompt": PROMPT,
    "answer_a": "Ada.",
    "answer_b": "Bob.",
    "model_a": "sft",
    "model_b": "base",
    "a_left": True,
    "rater": "r1",
}


def _vote(db: Database, winner: str, rater: str = "r1", a_left: bool = True, **kw) -> int:
    fields = dict(
        prompt=PROMPT,
        answer_a="Ada.",
        answer_b="Bob.",
        model_a="sft",
        model_b="base",
        sampling={"temperature": 0.7, "max_tokens": 64},
        seed_a=1,
        seed_b=2,
        a_left=a_left,
        winner=winner,
        rater=db.rater_id(rater),
    )
    fields.update(kw)
    return db.add_vote(**fields)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server URL: $CHATFORGE_TEST_PG_URL (e.g. postgresql+psycopg://user:pw@127.0.0.1/db),
    else a throwaway cluster started for this module; skips when neither is possible."""
    if os.environ.get("CHATFORGE_TEST_PG_URL"):
        yield os.environ["CHATFORGE_TEST_PG_URL"]
        return
    with throwaway_postgres() as url:
        if url is None:
            pytest.skip("no PostgreSQL here (initdb/pg_ctl, psycopg, or a non-root user to run them)")
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each DB test runs on a SQLite file and on a fresh database of a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fb.db'}"
    server = request.getfixturevalue("postgres")
    if os.environ.get("CHATFORGE_TEST_PG_URL"):
        return server  # a given server: use its database as is
    return fresh_database(server, "t_" + re.sub(r"\W", "_", request.node.name).lower()[-50:])


def test_conversations_ratings_and_votes_persist(db_url: str) -> None:
    url = db_url
    db = Database(url)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "model": "sft"}]
    cid = db.save_conversation(None, "hi", "Be kind.", msgs, rater=db.rater_id("me"))
    assert db.rate_message(cid, 1, -1, "too short")
    assert not db.rate_message(cid, 0, 1)  # only assistant messages get thumbs
    # a regenerate rewrites the thread: the kept turn keeps nothing stale, the new reply is unrated
    db.save_conversation(cid, "hi", "Be kind.", [*msgs[:1], {"role": "assistant", "content": "hey"}])
    vid = _vote(db, "a", rater="me", conversation_id=cid)
    db.close()
    db = Database(url)  # a new connection sees it all
    conv = db.conversation(cid)
    assert conv["system"] == "Be kind." and [m["content"] for m in conv["messages"]] == ["hi", "hey"]
    assert conv["messages"][1]["rating"] == 0
    assert db.conversations(db.rater_id("me"))[0]["id"] == cid
    (v,) = [v for v in db.votes() if v.id == vid]
    assert v.prompt == PROMPT and v.rater == db.rater_id("me") != "me" and v.sampling["temperature"] == 0.7
    with pytest.raises(ValueError):
        _vote(db, "left")
    db.close()


def test_export_round_trips_to_the_preference_format(db_url: str, tmp_path: Path) -> None:
    url = db_url
    db = Database(url)
    _vote(db, "a")
    _vote(db, "b", answer_a="A2", answer_b="B2")
    _vote(db, "tie")
    _vote(db, "both_bad")
    _vote(db, "a", answer_b=" ")  # the other answer came back empty (Stop pressed): no preference
    db.close()
    out = tmp_path / "prefs.jsonl"
    assert cli(["feedback", "export", "--db", url, "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2
    assert export(Database(url), tmp_path / "again.jsonl")["empty_answer_votes"] == 1
    assert recs[0]["messages"] == PROMPT  # the system message is part of the prompt
    assert recs[0]["chosen"] == {"role": "assistant", "content": "Ada."}
    assert recs[0]["rejected"] == {"role": "assistant", "content": "Bob."}
    assert recs[1]["chosen"]["content"] == "B2" and recs[1]["rejected"]["content"] == "A2"
    assert {r["source"] for r in recs} == {"ui-vote"} and all(len(r["rater"]) == 16 for r in recs)
    pairs, stats = read_pairs(out)  # what `chatforge reward` reads from reward.pref_files
    assert stats["malformed"] == 0 and [p["messages"] for p in pairs] == [PROMPT, PROMPT]


def test_concurrent_votes_through_the_server_all_land(db_url: str) -> None:
    """Votes posted at once from many clients are all stored: none lost to a race or a dropped write."""
    app = create_app(None, cfg=ServeConfig(rate_limit_rpm=0), db=db_url)
    body = {
        "prompt": PROMPT,
        "answer_a": "Ada.",
        "answer_b": "Bob.",
        "model_a": "sft",
        "model_b": "base",
        "sampling": {"temperature": 0.7},
        "seed_a": 1,
        "seed_b": 2,
        "winner": "a",
    }
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:

        def post(i: int) -> int:
            vote = {**body, "a_left": i % 2 == 0, "rater": f"r{i % 4}", "winner": ("a", "b", "tie")[i % 3]}
            return client.post("/ui/votes", json=vote).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, range(48)))
    assert statuses == [200] * 48
    db = Database(db_url)
    votes = db.votes()
    db.close()
    assert len(votes) == 48 and sorted(v.winner for v in votes).count("tie") == 16
    assert len({v.rater for v in votes}) == 4


def _simulate(n: int, strengths: dict[str, float], raters: dict[str, str], seed: int = 0) -> list[Pair]:
    """Votes between random pairs; "honest" raters follow Bradley–Terry, "left" always click left,
    "random" flip a coin."""
    rng = random.Random(seed)
    models = list(strengths)
    pairs = []
    for i in range(n):
        a, b = rng.sample(models, 2)
        rater = list(raters)[i % len(raters)]
        a_left = rng.random() < 0.5
        kind = raters[rater]
        if kind == "honest":
            a_wins = rng.random() < strengths[a] / (strengths[a] + strengths[b])
        elif kind == "left":
            a_wins = a_left
        else:
            a_wins = rng.random() < 0.5
        winner = "tie" if kind == "honest" and rng.random() < 0.05 else ("a" if a_wins else "b")
        pairs.append(Pair(a, b, winner, rater, a_left))
    return pairs


def test_leaderboard_ranks_the_better_version_first() -> None:
    pairs = _simulate(400, {"rlhf": 6.0, "sft": 2.0, "base": 0.5}, {"r1": "honest", "r2": "honest"})
    board = leaderboard(pairs, n_boot=100)
    assert [r["model"] for r in board] == ["rlhf", "sft", "base"]
    for r in board:
        assert r["ci_low"] < r["rating"] < r["ci_high"]
    assert board[0]["ci_low"] > board[1]["ci_high"]  # clearly better: the intervals do not overlap
    # true gap rlhf/sft = 400*log10(3) ~ 191 Elo
    assert 100 < board[0]["rating"] - board[1]["rating"] < 300


def test_rater_stats_spot_biased_and_careless_raters() -> None:
    raters = {"h1": "honest", "h2": "honest", "h3": "honest", "lefty": "left", "coin": "random"}
    pairs = _simulate(1000, {"rlhf": 8.0, "sft": 2.0, "base": 0.5}, raters, seed=1)
    stats = {r["rater"]: r for r in rater_stats(pairs)}
    for h in ("h1", "h2", "h3"):
        assert stats[h]["agreement"] > 0.7 and stats[h]["weight"] > 0.8 and not stats[h]["flagged"]
    assert (
        stats["lefty"]["left_rate"] == 1.0 and stats["lefty"]["flagged"] and stats["lefty"]["weight"] == 0.1
    )
    assert stats["coin"]["agreement"] < 0.65 and stats["coin"]["weight"] < 0.6
    # Down-weighting: a loud biased rater distorts the plain fit less once weighted
    weights = {r: s["weight"] for r, s in stats.items()}
    plain = {r["model"]: r["rating"] for r in leaderboard(pairs, n_boot=0)}
    weighted = {r["model"]: r["rating"] for r in leaderboard(pairs, n_boot=0, weights=weights)}
    assert weighted["rlhf"] - weighted["base"] > plain["rlhf"] - plain["base"]


def test_feedback_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["feedback", "leaderboard", "--name", "nothing-here", "--set", f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no feedback database" in err
    assert cli(["feedback", "raters", "--db", "nosuchdriver://x"]) == 2


def test_bad_votes_are_clear_400s_and_deleting_a_conversation_keeps_its_votes(
    db_url: str, tmp_path: Path
) -> None:
    """Each of these used to store a pair `chatforge reward` drops, or answer a 500 with SQL in it
    (PostgreSQL: out-of-range integers, over-long names; both: unknown conversation ids, and deleting a
    conversation that has votes)."""
    app = create_app(None, cfg=ServeConfig(rate_limit_rpm=0), db=db_url)
    good = {**UI_VOTE, "winner": "b"}
    bad = [
        ({"conversation_id": 12345}, 404, "no conversation 12345"),
        ({"conversation_id": 2**40}, 400, "conversation_id"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [*PROMPT, {"role": "assistant", "content": "x"}]}, 400, "prompt"),
        ({"seed_a": 2**40}, 400, "seed_a"),
        ({"seed_b": True}, 400, "seed_b"),
        ({"model_a": "m" * 101}, 400, "model_a"),
        ({"model_b": ""}, 400, "model_b"),
    ]
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for change, status, words in bad:
            r = client.post("/ui/votes", json={**good, **change})
            assert r.status_code == status and words in r.json()["error"]["message"], (change, r.text)
        msgs = [{"role": "user", "content": "Who builds clocks?"}, {"role": "assistant", "content": "Bob."}]
        cid = client.post("/ui/conversations", json={"messages": msgs, "rater": "r1"}).json()["id"]
        r = client.post("/ui/votes", json={**good, "conversation_id": cid, "seed_a": -5, "seed_b": 2**31 - 1})
        assert r.status_code == 200
        r = client.delete(f"/ui/conversations/{cid}")
        assert r.status_code == 200 and r.json() == {"deleted": True}
        assert client.get(f"/ui/conversations/{cid}").status_code == 404
    app.state.db.close()
    db = Database(db_url)
    (vote,) = db.votes()
    db.close()
    assert vote.conversation_id is None and (vote.seed_a, vote.seed_b) == (-5, 2**31 - 1)
    out = tmp_path / "prefs.jsonl"
    assert cli(["feedback", "export", "--db", db_url, "--out", str(out)]) == 0
    pairs, stats = read_pairs(out)
    assert stats["malformed"] == 0 and len(pairs) == 1 and pairs[0]["chosen"]["content"] == "Bob."


def test_rollback_goes_back_to_another_loaded_version(db_url: str, tmp_path: Path, one_thread: None) -> None:
    """A version promoted twice made the next rollback a no-op; a rollback to a version this server had
    not loaded (promoted by an earlier run on the same database) left it with no active version at all:
    `model: "default"` answered 404."""
    ck = make_checkpoints(tmp_path, ("old", "new"))
    admin = {"Authorization": "Bearer k"}
    ask = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    first = create_app(
        {"old": ck["old"], "new": ck["new"]}, cfg=ServeConfig(max_batch=2), db=db_url, admin_key="k"
    )
    with running(first) as url, httpx.Client(base_url=url, timeout=30, headers=admin) as client:
        assert client.post("/admin/promote", json={"name": "new"}).json() == {"active": "new"}
        assert client.post("/admin/promote", json={"name": "new"}).json() == {
            "active": "new"
        }  # a double click
        assert client.post("/admin/rollback").json() == {"active": "old"}
        assert client.post("/v1/chat/completions", json=ask).json()["model"] == "old"
        assert client.post("/admin/promote", json={"name": "new"}).json() == {"active": "new"}
    first.state.db.close()
    # The next run serves "new" only: "old", the version before it, is not there to go back to.
    second = create_app({"new": ck["new"]}, cfg=ServeConfig(max_batch=2), db=db_url, admin_key="k")
    with running(second) as url, httpx.Client(base_url=url, timeout=30, headers=admin) as client:
        r = client.post("/admin/rollback")
        assert r.status_code == 400 and "'old'" in r.json()["error"]["message"]
        assert "not loaded" in r.json()["error"]["message"]
        assert client.get("/ui/config").json()["active"] == "new"
        assert client.post("/v1/chat/completions", json=ask).json()["model"] == "new"
        history = client.get("/admin/versions").json()["history"]
    second.state.db.close()
    assert [h["version"] for h in history] == ["old", "new", "new", "new"]
    assert [h["rolled_back_at"] is not None for h in history] == [False, True, True, False]


def test_api_key_rate_limits_must_fit_the_column(db_url: str) -> None:
    """A negative limit was stored and meant "unlimited"; 2**40 was stored on SQLite and overflowed
    PostgreSQL's integer column (a 500). Both are 400s naming the field; the largest allowed limit is
    stored and read back on both databases."""
    app = create_app(None, cfg=ServeConfig(rate_limit_rpm=0), db=db_url, admin_key="adm")
    admin = {"Authorization": "Bearer adm"}
    with running(app) as url, httpx.Client(base_url=url, timeout=30, headers=admin) as client:
        for rpm in (-5, -1, 2**31, 2**40):
            r = client.post("/admin/keys", json={"name": "k", "rate_limit_rpm": rpm})
            assert r.status_code == 400, (rpm, r.text)
            err = r.json()["error"]
            assert err["param"] == "rate_limit_rpm" and "from 0" in err["message"], err
        assert not app.state.db.has_api_keys()  # nothing was stored
        for rpm in (0, 60, 2**31 - 1):
            r = client.post("/admin/keys", json={"name": "k", "rate_limit_rpm": rpm})
            assert r.status_code == 200, r.text
            assert app.state.db.find_api_key(r.json()["key"]).rate_limit_rpm == rpm
    with pytest.raises(ValueError, match="rate_limit_rpm"):
        app.state.db.create_api_key("k", -5)
    app.state.db.close()


def test_export_counts_identical_answers_as_no_pair(db_url: str, tmp_path: Path) -> None:
    """Two samples that came out the same (greedy, or a short answer) voted A or B are no preference:
    `chatforge reward` skips such a pair as a tie, so the export's `pairs` must not count it."""
    db = Database(db_url)
    _vote(db, "a")
    _vote(db, "a", answer_a="Ada.", answer_b="Ada.")
    _vote(db, "b", answer_a="Bob.", answer_b="Bob.")
    db.close()
    out = tmp_path / "prefs.jsonl"
    summary = export(Database(db_url), out)
    assert summary["pairs"] == 1 and summary["identical_answer_votes"] == 2
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["chosen"]["content"] == "Ada."
    pairs, stats = read_pairs(out)
    assert len(pairs) == 1 and stats["malformed"] == 0


def test_export_leaves_out_votes_whose_prompt_reward_cannot_read(db_url: str, tmp_path: Path) -> None:
    """A vote whose prompt has an empty turn (the UI saves a reply stopped before its first token, and a
    later compare-mode prompt carries it) or turns out of order (an API client's) was exported as a line
    that `chatforge reward` counts as malformed. They are still stored (the leaderboard uses them), but
    the export counts them and writes only pairs that read back."""
    app = create_app(None, cfg=ServeConfig(rate_limit_rpm=0), db=db_url)
    good = {**UI_VOTE, "winner": "a"}
    u, a = "user", "assistant"
    odd = [
        [
            {"role": u, "content": "Hi"},
            {"role": a, "content": ""},
            {"role": u, "content": "Who builds clocks?"},
        ],
        [{"role": u, "content": "Hi"}, {"role": u, "content": "Who builds clocks?"}],
        [{"role": u, "content": "  "}],
        [
            {"role": u, "content": "Hi"},
            {"role": "system", "content": "Be brief."},
            {"role": u, "content": "Hi"},
        ],
    ]
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for prompt in [PROMPT, *odd]:
            assert client.post("/ui/votes", json={**good, "prompt": prompt}).status_code == 200
    app.state.db.close()
    out = tmp_path / "prefs.jsonl"
    assert cli(["feedback", "export", "--db", db_url, "--out", str(out)]) == 0
    pairs, stats = read_pairs(out)
    assert stats["malformed"] == 0 and [p["messages"] for p in pairs] == [PROMPT]
    summary = export(Database(db_url), tmp_path / "again.jsonl")
    assert summary["pairs"] == 1 and summary["unusable_prompt_votes"] == len(odd)
    assert "has no text" in summary["unusable_reasons"][0]
