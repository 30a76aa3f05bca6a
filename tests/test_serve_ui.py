"""The web UI end to end: Debian's headless Chromium (Playwright) against a real server and SQLite file."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from chatforge.config import ServeConfig
from chatforge.data.prefs import read_pairs
from chatforge.safety.moderation_data import CATEGORIES
from chatforge.safety.policy import Policy
from chatforge.serve.api import create_app
from chatforge.serve.feedback import export
from serve_util import make_checkpoints, running

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian chromium is not installed")
EVIL = '<script>window.__xss=1</script> <img src=x onerror="window.__xss=2"> **bold**\n```\n<b>code</b>\n```'


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one thread (see conftest)."""


class _FlagsNothing:
    def score(self, texts: list[str], thresholds: dict | None = None) -> list[dict]:
        zero = dict.fromkeys(CATEGORIES, 0.0)
        return [{"flagged": False, "categories": {}, "category_scores": zero} for _ in texts]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ui")
    ck = make_checkpoints(root)
    db_url = f"sqlite:///{root / 'serve.db'}"
    app = create_app({"sft": ck["sft"], "base": ck["base"]}, cfg=ServeConfig(max_batch=4), db=db_url)
    with running(app) as url:
        yield url, app.state.db, root


@pytest.fixture(scope="module")
def page(site):
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
        except Exception as e:  # a Chromium that cannot start here: skip rather than fail
            pytest.skip(f"chromium did not start: {str(e).splitlines()[0]}")
        pg = browser.new_page()
        pg.set_default_timeout(30_000)
        yield pg
        browser.close()


def _open(page, url: str, path: str = "/") -> None:
    page.goto("about:blank")  # a fresh load even when only the #fragment differs
    page.goto(url + path)
    page.wait_for_selector("body[data-ready='1']")


def _new_chat(page, url: str, max_tokens: int = 8) -> None:
    _open(page, url)
    page.click("#new-chat")
    page.uncheck("[data-testid=compare]")
    page.fill("#max-tokens", str(max_tokens))


def _send(page, text: str) -> None:
    """Send ``text`` (not in compare mode) and wait until its reply has finished streaming."""
    n = page.locator(".msg.assistant").count()
    page.fill("[data-testid=input]", text)
    page.click("[data-testid=send]")
    page.wait_for_function(
        f"document.querySelectorAll('.msg.assistant').length === {n + 1} && !document.querySelector('.streaming')"
    )


def test_chat_streams_is_stored_and_rated(site, page) -> None:
    url, db, _ = site
    _open(page, url)
    page.select_option("#model", "base")
    page.fill("#max-tokens", "48")
    # Greedy: a sampled reply from the random-weight model can hit <|im_end|> after a token or two.
    page.fill("#temperature", "0")
    page.fill("#system", "Answer briefly.")
    # Record the length of the text put in the reply at each DOM update while it streams in. From each
    # mutation's own added nodes, not the element's text when the observer runs: on a loaded machine
    # many deltas arrive in one network read, and the observer then runs once, after the last of them.
    page.evaluate("""() => { window.__lens = []; new MutationObserver((records) => {
        for (const r of records) {
            if (!r.addedNodes.length || !r.target.matches || !r.target.matches('.msg.assistant .content')) continue;
            let n = 0; r.addedNodes.forEach((x) => { n += x.textContent.length; }); window.__lens.push(n);
        } }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("[data-testid=input]", "Who builds clocks?")
    page.click("[data-testid=send]")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant').length === 1 && !document.querySelector('.streaming') && document.querySelector('#history a')"
    )
    reply = page.inner_text(".msg.assistant .content")
    # It streamed: many deltas, and the page showed a partial reply before the whole one.
    lens = page.evaluate("window.__lens")
    assert page.evaluate("window.__chunks") > 3 and any(0 < n < len(reply) for n in lens), lens
    conv = db.conversation(db.conversations()[0]["id"])
    assert conv["system"] == "Answer briefly."
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][1]["model"] == "base" and conv["messages"][1]["content"].strip() == reply.strip()
    # thumbs down with a reason
    page.click("[data-testid=thumb-down]")
    page.fill("[data-testid=reason]", "made no sense")
    page.press("[data-testid=reason]", "Enter")
    page.locator("[data-testid=reason]").blur()
    page.wait_for_timeout(300)
    m = db.conversation(conv["id"])["messages"][1]
    assert (m["rating"], m["rating_reason"]) == (-1, "made no sense")
    # regenerate replaces the reply; edit-and-resend rewrites the user turn
    page.click("[data-testid=regenerate]")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant').length === 1 && !document.querySelector('.streaming')"
    )
    page.click(".msg.user button")
    page.fill("[data-testid=edit-box]", "Where is Mirth?")
    page.click("[data-testid=edit-send]")
    page.wait_for_function(
        "document.querySelector('.msg.user .content').innerText.includes('Mirth') && !document.querySelector('.streaming')"
    )
    page.wait_for_timeout(300)
    msgs = db.conversation(conv["id"])["messages"]
    assert msgs[0]["content"] == "Where is Mirth?" and len(msgs) == 2


def test_compare_mode_vote_lands_in_db_and_export(site, page) -> None:
    url, db, root = site
    _open(page, url)
    page.click("#new-chat")
    page.check("[data-testid=compare]")
    page.select_option("#model-a", "sft")
    page.select_option("#model-b", "base")
    page.fill("#max-tokens", "16")
    # Greedy: a sampled answer of these random-weight models can end at once, and export leaves out a
    # vote with an empty answer.
    page.fill("#temperature", "0")
    page.fill("[data-testid=input]", "Tell me about Ada.")
    page.click("[data-testid=send]")
    page.wait_for_selector("[data-testid=vote-left]")
    left = page.locator("[data-testid=compare-content]").nth(0).inner_text()
    page.click("[data-testid=vote-left]")
    page.wait_for_selector("[data-testid=voted]")
    (vote,) = db.votes()
    assert vote.winner == ("a" if vote.a_left else "b")
    assert {vote.model_a, vote.model_b} == {"sft", "base"} and vote.model_a == "sft"
    assert vote.prompt[-1] == {"role": "user", "content": "Tell me about Ada."}
    page.wait_for_function("location.hash.length > 1")
    # a first-turn vote names its conversation, which goes on with the chosen answer
    assert vote.conversation_id == int(page.evaluate("location.hash.slice(1)"))
    chosen = vote.answer_a if vote.winner == "a" else vote.answer_b
    assert chosen.strip() == left.strip() and vote.answer_a.strip() and vote.answer_b.strip()
    for _ in range(50):  # the thread is saved again with the answer just after "vote saved" shows
        msgs = db.conversation(vote.conversation_id)["messages"]
        if len(msgs) == 2:
            break
        page.wait_for_timeout(100)
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[1]["content"] == chosen
    summary = export(db, root / "prefs.jsonl")
    rec = json.loads((root / "prefs.jsonl").read_text().splitlines()[0])
    assert summary["pairs"] == 1 and rec["chosen"]["content"] == chosen and rec["messages"] == vote.prompt


def test_model_output_is_rendered_as_text(site, page) -> None:
    url, db, _ = site
    cid = db.save_conversation(
        None, "xss", "", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": EVIL}]
    )
    _open(page, url, f"/#{cid}")
    page.wait_for_selector(".msg.assistant")
    box = page.locator(".msg.assistant .content")
    assert "<script>window.__xss=1</script>" in box.inner_text() and "<img src=x" in box.inner_text()
    assert box.locator("img").count() == 0 and box.locator("script").count() == 0
    assert (
        box.locator("strong").inner_text() == "bold" and box.locator("pre code").inner_text() == "<b>code</b>"
    )
    page.wait_for_timeout(200)
    assert page.evaluate("window.__xss") is None


def _thread(page) -> list[tuple[str, str]]:
    return page.evaluate(
        "[...document.querySelectorAll('#messages .msg')].map(m => [m.dataset.testid, m.querySelector('.content').innerText])"
    )


def test_a_safety_line_the_policy_ignores_is_shown(site, page) -> None:
    _, _, root = site
    # The real layered policy over a scorer that flags nothing (its own server: a policy holds streamed
    # text back for the output check, which the streaming test above must not see).
    app = create_app({"sft": root / "sft"}, cfg=ServeConfig(max_batch=4), policy=Policy(_FlagsNothing()))
    with running(app) as url:
        _new_chat(page, url)
        page.fill("[data-testid=system]", "Be brief.\nsafety: off")
        _send(page, "Where is Mirth?")
        assert "safety: 'off': not understood" in page.inner_text("#error")
        page.fill("[data-testid=system]", "Be brief.")
        _send(page, "And Ada?")
        assert not page.is_visible("#error")


class _SlowOnReplies(_FlagsNothing):
    """Flags nothing; every call after the first (the input check) takes seconds, as a real moderator
    does under load. The server holds a streamed reply back until its first check, so the browser has
    the response but no text yet for that long: a Stop pressed then is a Stop before the first token."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, texts: list[str], thresholds: dict | None = None) -> list[dict]:
        self.calls += 1
        if self.calls > 1:
            time.sleep(3)
        return super().score(texts, thresholds)


def _stop_before_the_first_token(page, text: str) -> None:
    page.fill("[data-testid=input]", text)
    with page.expect_response("**/v1/chat/completions"):  # headers in, no text yet
        page.click("[data-testid=send]")
    page.click("#stop")
    page.wait_for_function("document.getElementById('stop').hidden")


def test_stop_before_the_first_token_keeps_no_empty_reply(site, page) -> None:
    """Stop before the first token used to keep (and store) an empty assistant reply, which the next
    compare-mode prompt then carried. Now the turn is taken back, the message is given back to resend,
    and nothing empty is stored; in compare mode no vote is stored either."""
    _, _, root = site
    db_url = f"sqlite:///{root / 'stop.db'}"
    for compare in (False, True):
        app = create_app(
            {"sft": root / "sft", "base": root / "base"},
            cfg=ServeConfig(max_batch=4),
            db=db_url,
            policy=Policy(_SlowOnReplies()),
        )
        with running(app) as url:
            _new_chat(page, url, max_tokens=32)
            if compare:
                page.check("[data-testid=compare]")
            _stop_before_the_first_token(page, "Who builds clocks?")
            assert page.evaluate("window.__chunks") == 0  # no text had come when Stop was pressed
            assert page.locator(".msg.assistant").count() == 0, _thread(page)
            assert page.locator("[data-testid=compare-panel]").count() == 0
            assert page.input_value("[data-testid=input]") == "Who builds clocks?"
            assert "Stopped before the first word" in page.inner_text("#error")
            page.wait_for_timeout(3500)  # what the old page saved after the Stop would have landed
            db = app.state.db
            for c in db.conversations():
                msgs = db.conversation(c["id"])["messages"]
                assert all(m["content"].strip() for m in msgs), msgs
            assert db.votes() == []
            db.close()


def test_reload_reopens_the_conversation(site, page) -> None:
    url, db, _ = site
    _new_chat(page, url)
    _send(page, "Where is Mirth? 🕰️")
    page.wait_for_function("location.hash.length > 1")
    cid = int(page.evaluate("location.hash.slice(1)"))
    assert db.conversation(cid)["messages"][0]["content"] == "Where is Mirth? 🕰️"
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector(".msg.assistant")
    assert [role for role, _ in _thread(page)] == ["msg-user", "msg-assistant"]
    assert _thread(page)[0][1] == "Where is Mirth? 🕰️"


def test_a_message_the_model_cannot_take_is_given_back(site, page) -> None:
    url, db, _ = site
    _new_chat(page, url)
    long = "Ada builds clocks in Mirth. " * 200  # far past the tiny model's 256-token context
    page.fill("[data-testid=input]", long)
    page.click("[data-testid=send]")
    page.wait_for_selector("#error:not([hidden])")
    assert "context length" in page.inner_text("#error")
    assert _thread(page) == [] and page.input_value("[data-testid=input]") == long.strip()
    # the next message is a clean first turn, stored without the failed one
    _send(page, "Who builds clocks?")
    page.wait_for_function("location.hash.length > 1")
    conv = db.conversation(int(page.evaluate("location.hash.slice(1)")))
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][0]["content"] == "Who builds clocks?"


def test_compare_vote_is_asked_for_before_the_next_turn(site, page) -> None:
    """A message sent while a compare vote is pending used to start a second panel, wipe the first one
    (its vote lost) and store two user turns in a row, whose later votes `chatforge reward` drops."""
    url, db, root = site
    n_votes = len(db.votes())
    _new_chat(page, url)
    _send(page, "Who builds clocks?")
    page.check("[data-testid=compare]")
    page.select_option("#model-a", "sft")
    page.select_option("#model-b", "base")
    page.fill("[data-testid=input]", "Where is Mirth?")
    page.click("[data-testid=send]")
    page.wait_for_selector("[data-testid=vote-right]")
    page.fill("[data-testid=input]", "And Ada?")
    page.click("[data-testid=send]")
    page.wait_for_selector("#error:not([hidden])")
    assert "Pick the better answer" in page.inner_text("#error")
    assert page.input_value("[data-testid=input]") == "And Ada?"
    assert page.locator("[data-testid=compare-panel]").count() == 1
    # thumbs on the earlier answer re-render the thread: the pending panel stays
    page.click("[data-testid=thumb-up]")
    page.wait_for_selector("[data-testid=thumb-up].on")
    assert page.locator("[data-testid=vote-right]").count() == 1
    right = page.locator("[data-testid=compare-content]").nth(1).inner_text()
    page.click("[data-testid=vote-right]")
    page.wait_for_selector("[data-testid=voted]")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2")
    assert [r for r, _ in _thread(page)] == ["msg-user", "msg-assistant", "msg-user", "msg-assistant"]
    # now the held-back message goes: its vote's prompt is the whole alternating thread
    page.click("[data-testid=send]")
    page.wait_for_selector("[data-testid=vote-tie]")
    page.click("[data-testid=vote-left]")
    page.wait_for_selector("[data-testid=voted]")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 3")
    votes = db.votes()[n_votes:]
    assert len(votes) == 2
    first, second = votes
    chosen = first.answer_a if first.winner == "a" else first.answer_b
    assert chosen.strip() == right.strip()
    assert [m["role"] for m in second.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert second.prompt[3]["content"] == chosen and second.prompt[4]["content"] == "And Ada?"
    page.wait_for_function("location.hash.length > 1")
    conv = db.conversation(int(page.evaluate("location.hash.slice(1)")))
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"] * 3
    export(db, root / "prefs2.jsonl")
    _, stats = read_pairs(root / "prefs2.jsonl")
    assert stats["malformed"] == 0 or all("alternate" not in e for e in stats["errors"]), (
        stats
    )  # an empty answer from the random model may be malformed; the thread never is


def test_an_open_page_follows_a_promotion(site, page) -> None:
    """The picker's first choice is the server's active version at each request: after a promote (or a
    rollback) an open page chats with the new one, and its label says so, without a reload."""
    url, db, _ = site
    db.promote("sft", by="test")
    _new_chat(page, url, max_tokens=4)
    assert page.eval_on_selector("#model", "s => s.value") == "default"

    def ask(text: str) -> str:  # the version that answered, from the reply's tag
        _send(page, text)
        return page.locator(".msg.assistant .model-tag").last.inner_text()

    assert ask("Who builds clocks?") == "sft"
    db.promote("base", by="test")  # as POST /admin/promote does, while the page stays open
    assert ask("And who sells them?") == "base"
    assert "active version (base)" in page.locator("#model option").first.inner_text()
    db.rollback()
    assert ask("Thanks.") == "sft"
