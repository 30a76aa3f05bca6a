"""Malformed requests to every route of the real server get a 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from chatforge.config import ServeConfig
from chatforge.serve.api import create_app
from serve_util import make_checkpoints, running

ADMIN = "admin-secret"
ASK = [{"role": "user", "content": "Who builds clocks?"}]
CHAT, CMPL = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one thread (see conftest)."""


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory):
    ck = make_checkpoints(tmp_path_factory.mktemp("ckpt"), ("base",))
    # default_max_tokens above max_tokens: a request that gives none must still be served (capped)
    cfg = ServeConfig(max_batch=4, max_tokens=32, default_max_tokens=256, max_n=2)
    app = create_app({"base": ck["base"]}, cfg=cfg, admin_key=ADMIN)
    with running(app) as u:
        yield u


def chat(**kw: Any) -> dict:
    return {"model": "base", "messages": ASK, "max_tokens": 2, **kw}


def cmpl(**kw: Any) -> dict:
    return {"model": "base", "prompt": "Ada", "max_tokens": 2, **kw}


# (method, path, JSON body or raw bytes, status, the error's param or None when any)
CASES: list[tuple[str, str, Any, int, str | None]] = [
    # bad JSON, not an object, empty, not UTF-8
    ("POST", CHAT, b"{not json", 400, None),
    ("POST", CHAT, b"[1, 2]", 400, None),
    ("POST", CHAT, b"", 400, None),
    ("POST", CHAT, b"\xff\xfe\x00", 400, None),
    ("POST", CMPL, b'{"model": "base", "prompt": ', 400, None),
    # wrong types
    ("POST", CHAT, chat(model=3), 400, "model"),
    ("POST", CHAT, chat(messages="hi"), 400, "messages"),
    ("POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("POST", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages.0.role"),
    ("POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("POST", CHAT, chat(temperature=3), 400, "temperature"),
    ("POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("POST", CHAT, chat(n="two"), 400, "n"),
    ("POST", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    ("POST", CHAT, chat(max_tokens=1.5), 400, "max_tokens"),
    ("POST", CHAT, chat(stream="yes"), 400, "stream"),
    ("POST", CHAT, chat(stop=7), 400, "stop"),
    ("POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("POST", CHAT, chat(seed=2**70), 400, "seed"),
    ("POST", CHAT, chat(response_format="json"), 400, "response_format"),
    ("POST", CHAT, chat(response_format={"type": "xml"}), 400, "response_format"),
    ("POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, None),
    # asked for and not supported (tools), or out of range: refused, never silently ignored
    ("POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("POST", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("POST", CHAT, chat(functions=[{"name": "f", "parameters": {}}]), 400, "functions"),
    ("POST", CHAT, chat(function_call={"name": "f"}), 400, "function_call"),
    ("POST", CHAT, chat(messages=[{"role": "user"}]), 400, "messages.0.content"),
    ("POST", CHAT, chat(messages=[{"role": "user", "content": None}]), 400, "messages.0.content"),
    (
        "POST",
        CHAT,
        chat(messages=[*ASK, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]}, *ASK]),
        400,
        "messages.1.tool_calls",
    ),
    ("POST", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("POST", CHAT, chat(logit_bias={"-1": 1}), 400, "logit_bias"),
    ("POST", CHAT, chat(logit_bias={"99999": 1}), 400, "logit_bias"),
    ("POST", CHAT, chat(logit_bias={"5": 101}), 400, "logit_bias"),
    ("POST", CHAT, chat(logit_bias={"5": "x"}), 400, None),
    ("POST", CHAT, chat(frequency_penalty=3), 400, "frequency_penalty"),
    ("POST", CHAT, chat(presence_penalty=-2.5), 400, "presence_penalty"),
    ("POST", CMPL, cmpl(best_of=3), 400, "best_of"),
    ("POST", CMPL, cmpl(best_of=0), 400, "best_of"),
    ("POST", CMPL, cmpl(logit_bias={"5": -101}), 400, "logit_bias"),
    ("POST", CMPL, cmpl(prompt=5), 400, "prompt"),
    ("POST", CMPL, cmpl(prompt=[[1, 2], "x"]), 400, "prompt"),
    ("POST", CMPL, cmpl(prompt=[-1]), 400, "prompt"),
    ("POST", CMPL, cmpl(prompt=[10**6]), 400, "prompt"),
    ("POST", CMPL, cmpl(prompt=[]), 400, "prompt"),
    ("POST", CMPL, cmpl(logprobs=99), 400, "logprobs"),
    ("POST", CMPL, cmpl(echo=True, stream=True), 400, "stream"),
    # unknown model
    ("POST", CHAT, chat(model="nope"), 404, "model"),
    ("POST", CMPL, cmpl(model="nope"), 404, "model"),
    ("GET", "/v1/models/nope", None, 404, "model"),
    # over-long context (the tiny models' context is 256 tokens)
    ("POST", CHAT, chat(messages=[{"role": "user", "content": "clocks " * 400}]), 400, "messages"),
    ("POST", CHAT, chat(max_tokens=None, max_completion_tokens=30, messages=[ASK[0]] * 40), 400, "messages"),
    ("POST", CMPL, cmpl(prompt=[5] * 300), 400, "messages"),
    # n / max_tokens over the server's limits
    ("POST", CHAT, chat(max_tokens=33), 400, "max_tokens"),
    ("POST", CHAT, chat(max_tokens=None, max_completion_tokens=33), 400, "max_tokens"),
    ("POST", CHAT, chat(max_tokens=10**30), 400, "messages"),
    ("POST", CHAT, chat(n=3), 400, "n"),
    ("POST", CHAT, chat(n=0), 400, "n"),
    ("POST", CMPL, cmpl(max_tokens=33), 400, "max_tokens"),
    ("POST", CMPL, cmpl(n=3), 400, "n"),
    # the UI's and admin's JSON routes
    ("POST", "/ui/votes", b"{bad", 400, None),
    ("POST", "/ui/votes", [1], 400, None),
    ("POST", "/ui/votes", {"winner": "a"}, 400, "prompt"),
    ("POST", "/ui/ratings", b"{bad", 400, None),
    ("POST", "/ui/ratings", {"conversation_id": "x", "index": 0, "rating": 1}, 400, "conversation_id"),
    ("POST", "/ui/conversations", b"\xff\xfe", 400, None),
    ("POST", "/ui/conversations", {"messages": "x"}, 400, "messages"),
    ("GET", "/ui/conversations/abc", None, 400, None),
    ("POST", "/admin/promote", b"{bad", 400, None),
    ("POST", "/admin/promote", {"name": "ghost"}, 404, "name"),
    ("POST", "/admin/versions", {"name": "x", "path": "/nonexistent"}, 400, None),
    ("POST", "/admin/keys", {"name": "k", "rate_limit_rpm": "x"}, 400, "rate_limit_rpm"),
    ("POST", "/admin/keys", {"name": "k", "rate_limit_rpm": -5}, 400, "rate_limit_rpm"),
    ("POST", "/admin/keys", {"name": "k", "rate_limit_rpm": 2**40}, 400, "rate_limit_rpm"),
    ("POST", "/admin/keys", {"name": "k", "rate_limit_rpm": True}, 400, "rate_limit_rpm"),
    ("POST", "/admin/keys", {"name": "k" * 101}, 400, "name"),
    # wrong method and route
    ("PUT", CHAT, {}, 405, None),
    ("GET", "/v1/nothing", None, 404, None),
]


@pytest.mark.parametrize(
    "method,path,body,status,param", CASES, ids=[f"{c[0]} {c[1]} {i}" for i, c in enumerate(CASES)]
)
def test_malformed_request_is_a_4xx_in_openai_shape(
    url: str, method: str, path: str, body: Any, status: int, param: str | None
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    if isinstance(body, bytes):
        kw: dict[str, Any] = {"content": body, "headers": {**headers, "content-type": "application/json"}}
    else:
        kw = {"json": body, "headers": headers} if body is not None else {"headers": headers}
    r = httpx.request(method, url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_the_server_still_answers_and_caps_the_default_max_tokens(url: str) -> None:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    r = c.chat.completions.create(model="base", messages=ASK, temperature=1.0, seed=1)  # no max_tokens
    assert r.usage.completion_tokens <= 32 and r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="base", prompt=[5] * 300, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"


def test_a_huge_prompt_is_refused_without_stalling_the_server(url: str) -> None:
    """A multi-megabyte message was tokenized before its length was checked: seconds holding the GIL,
    during which every other request and stream of the server stood still, for an answer that was a 400
    anyway. It is now refused from its size alone (more bytes than the context's tokens can cover)."""
    import threading
    import time

    huge = "clocks and wörds " * 400_000  # ~7 MB
    gaps: list[float] = []
    done = threading.Event()

    def ping() -> None:  # the server's latency seen by another client meanwhile
        with httpx.Client(base_url=url, timeout=60) as c:
            while not done.is_set():
                t = time.perf_counter()
                c.get("/health")
                gaps.append(time.perf_counter() - t)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        for path, body in (
            (CHAT, chat(messages=[{"role": "user", "content": huge}])),
            (CMPL, cmpl(prompt=huge)),
        ):
            r = httpx.post(url + path, json=body, timeout=120)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded" and "256 tokens" in err["message"]
    finally:
        done.set()
        pinger.join()
    assert max(gaps) < 1.5, max(gaps)


def test_unpaired_surrogates_are_served_not_500s(url: str) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud83c"), and a browser sends one whenever a string is
    cut inside an emoji (the UI's conversation title is the first message's first 60 characters). No
    UTF-8 encoder takes it: chat, completions and the UI's routes answered 500. Each is now U+FFFD, as a
    browser's own UTF-8 encoder makes it."""
    import json

    cut = "\\ud83c"  # the first half of "\U0001f389", as JSON.stringify writes it
    raw = {
        CHAT: f'{{"model": "base", "max_tokens": 2, "messages": [{{"role": "user", "content": "hi {cut}"}}]}}',
        CMPL: f'{{"model": "base", "max_tokens": 2, "prompt": "Ada {cut}", "stop": ["{cut}"]}}',
        "/ui/conversations": f'{{"title": "party {cut}", "messages": [{{"role": "user", "content": "a {cut}"}}]}}',
        "/ui/votes": (
            f'{{"prompt": [{{"role": "user", "content": "hi {cut}"}}], "answer_a": "x {cut}", "answer_b": "y",'
            ' "model_a": "base", "model_b": "base", "a_left": true, "winner": "a", "rater": "r"}'
        ),
    }
    with httpx.Client(base_url=url, timeout=30, headers={"content-type": "application/json"}) as c:
        for path, body in raw.items():
            r = c.post(path, content=body.encode())
            assert r.status_code == 200, (path, r.text)
        r = c.post(CHAT, content=raw[CHAT].replace('"max_tokens"', '"stream": true, "max_tokens"').encode())
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        cid = c.post("/ui/conversations", content=raw["/ui/conversations"].encode()).json()["id"]
        conv = c.get(f"/ui/conversations/{cid}").json()
    assert conv["title"] == "party \ufffd" and conv["messages"][0]["content"] == "a \ufffd"
    assert json.loads(raw[CHAT])["messages"][0]["content"] == "hi \ud83c"  # the test sends what it says


def test_a_version_name_longer_than_the_database_holds_is_refused(url: str, tmp_path: Path) -> None:
    """A 101-character version name was loaded and served, but its votes were refused ("model_a: 1 to 100
    characters") and, on PostgreSQL, registering it in the 100-character column was a 500 after the
    model had been loaded."""
    ck = make_checkpoints(tmp_path, ("extra",))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(url + "/admin/versions", json={"name": "v" * 101, "path": str(ck["extra"])}, headers=admin)
    assert r.status_code == 400 and "at most 100 characters" in r.json()["error"]["message"], r.text
    assert "v" * 101 not in httpx.get(url + "/ui/config").json()["versions"]
