"""``chatforge serve``: an OpenAI-compatible API, the web chat UI and the feedback database in one app.

Routes: ``/v1/models``, ``/v1/chat/completions`` (SSE streaming or not), ``/v1/completions`` (string or
token-id prompts, ``echo`` + ``logprobs`` for lm-eval), ``/health``, ``/metrics`` (Prometheus), ``/`` (the
web UI) with ``/ui/*`` (conversations, thumbs, compare-mode votes) and ``/admin/*`` (versions: add,
promote, rollback; API keys), which need ``Authorization: Bearer $CHATFORGE_ADMIN_KEY``.

Moderation hook (issue 8): ``create_app(..., policy=obj)`` where ``obj`` has
``check_input(messages: list[dict]) -> str | None`` and ``check_output(text: str) -> str | None``; each
returns None to allow, or a reason. A flagged input (a chat's messages, or a completion's prompt read as
one user turn) is answered with the policy's brief decline (from ``decide_input(messages).message`` when
the policy has it) and ``finish_reason: "content_filter"``; a
flagged output stops that choice with ``finish_reason: "content_filter"`` (a chat's output is checked by
``check_output_for(text, messages)`` when the policy has it, so the user's ``safety:`` line applies to the
replies too). Output is checked in chunks
(at a sentence end, every ``OUTPUT_CHECK_CHARS`` characters, and at the finish), not after every token:
a chunk is held back until the check has seen the whole text up to it, and a flagged chunk is never
sent (the text, and any logprobs, stop where the last clean chunk ended). Further routes
(``/v1/moderations``) come in as ``create_app(..., routes=[router])``, behind the same API-key check and
rate limit as the rest of ``/v1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatforge.config import RunConfig, ServeConfig
from chatforge.engine import Engine, SamplingParams, json_schema_of, sample_seed
from chatforge.errors import ChatforgeError
from chatforge.serve import protocol as P
from chatforge.serve.db import WINNERS, Database, api_key_problem
from chatforge.serve.protocol import APIError, bad_request
from chatforge.serve.scheduler import Cancelled
from chatforge.serve.scheduler import Request as GenRequest
from chatforge.serve.versions import Version, Versions

WEB_DIR = Path(__file__).parent / "web"
_TYPE_TAG = re.compile(r"(str|int|float|bool|dict|list|none)(\[.*\])?|.*[\[(].*")
AUTH_TTL = 2.0  # seconds an API-key lookup is trusted (see caller() in create_app)
OUTPUT_CHECK_CHARS = 64  # output moderation runs once per chunk of about this many characters (or a sentence)


class Policy(Protocol):
    """What the safety layer plugs in (see the module docstring)."""

    def check_input(self, messages: list[dict[str, Any]]) -> str | None: ...
    def check_output(self, text: str) -> str | None: ...


class Metrics:
    """Prometheus metrics in the app's own registry (so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chatforge_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("chatforge_request_seconds", "request latency", ["route"], registry=r)
        self.ttft = Histogram(
            "chatforge_time_to_first_token_seconds",
            "submit to first token",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.tokens = Counter("chatforge_generated_tokens", "tokens generated", ["model"], registry=r)
        self.batch = Histogram(
            "chatforge_batch_size", "sequences per model step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.step = Histogram(
            "chatforge_step_seconds",
            "model step time",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.waiting = Gauge("chatforge_waiting_sequences", "sequences waiting for a slot", registry=r)

    def observe_step(self, active: int, waiting: int, seconds: float) -> None:
        self.batch.observe(active)
        self.step.observe(seconds)
        self.waiting.set(waiting)


class CountRequests:
    """Pure ASGI middleware counting requests by route and status. (Starlette's ``@app.middleware``
    pipes every streamed chunk through an extra task and memory stream: real cost per token under load.)"""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)


class RateLimiter:
    """A token bucket per caller: ``rpm`` requests a minute, bursts up to ``rpm``."""

    def __init__(self, rpm: int) -> None:
        self.rpm = rpm
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, who: str, rpm: int | None = None) -> bool:
        rate = rpm or self.rpm
        if rate <= 0:
            return True
        t = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (float(rate), t))
            tokens = min(float(rate), tokens + (t - last) * rate / 60.0)
            if tokens < 1.0:
                self._buckets[who] = (tokens, t)
                return False
            self._buckets[who] = (tokens - 1.0, t)
            return True


# ---------------------------------------------------------------- request -> engine


def _flatten(content: str | list[P.ContentPart] | None, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for k, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"messages[{i}].content[{k}]: only text parts are supported, got {part.type!r}",
                f"messages.{i}.content",
            )
        parts.append(part.text)
    return "".join(parts)


def refuse_tools(req: P.ChatRequest) -> None:
    """A 400 for a request that asks for tool or function calling, which this server cannot do: answered
    with plain text instead, a client would wait for a tool call that never comes. Values that ask for
    nothing (null, [], "none", "auto" with no tools) are accepted, as clients send them by default."""
    for name in ("tools", "functions"):
        if getattr(req, name) not in (None, []):
            raise bad_request(f"{name}: tool and function calling are not supported by this server", name)
    for name in ("tool_choice", "function_call"):
        if getattr(req, name) not in (None, "none", "auto"):
            raise bad_request(
                f"{name}: tool and function calling are not supported by this server"
                " (leave it out, or use 'none')",
                name,
            )


def chat_messages(req: P.ChatRequest) -> list[dict[str, str]]:
    """The request's messages in our chat format (``developer`` is the system role of newer models)."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in P.ROLES:
            raise bad_request(
                f"messages[{i}].role: must be one of {', '.join(P.ROLES)}, got {m.role!r}",
                f"messages.{i}.role",
            )
        for f in ("tool_calls", "function_call"):
            if getattr(m, f) not in (None, []):
                raise bad_request(
                    f"messages[{i}].{f}: tool and function calls are not supported by this server",
                    f"messages.{i}.{f}",
                )
        # As OpenAI: content may be left out only by an assistant message with tool calls, which this
        # server refuses above; a missing content is an error, not an empty turn.
        if m.content is None:
            raise bad_request(f"messages[{i}].content: required", f"messages.{i}.content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": _flatten(m.content, i)})
    return out


class Limits:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg

    def params(
        self,
        req: P.SamplingFields,
        max_tokens: int | None,
        prompt_len: int,
        context: int,
        logprobs: bool = False,
        top_logprobs: int = 0,
        response_format: dict | None = None,
        vocab_size: int = 0,
    ) -> SamplingParams:
        cfg = self.cfg
        if req.n > cfg.max_n:
            raise bad_request(f"n: at most {cfg.max_n} choices per request, got {req.n}", "n")
        if prompt_len == 0:
            raise bad_request("the prompt is empty", "messages")
        room = context - prompt_len
        # max_tokens 0 needs no room: scoring a prompt that fills the context (lm-eval's echo +
        # logprobs) is fine, as in the engine; only a default of at least one token needs one.
        if (room <= 0) if max_tokens is None else (room < 0 or max_tokens > room):
            asked = max_tokens if max_tokens is not None else 1
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested"
                f" {prompt_len + asked} tokens ({prompt_len} in the messages, {asked} in the completion)."
                " Please reduce the length of the messages or completion.",
                "messages",
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, cfg.max_tokens, room)
        if max_tokens > cfg.max_tokens:
            raise bad_request(
                f"max_tokens: at most {cfg.max_tokens} on this server, got {max_tokens}", "max_tokens"
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise bad_request("stop: up to 4 non-empty strings", "stop")
        try:
            json_schema_of(response_format)
        except ValueError as e:
            raise bad_request(str(e), "response_format") from None
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            n=req.n,
            seed=req.seed,
            stop=stop,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            response_format=response_format,
            logit_bias=logit_bias_of(req.logit_bias, vocab_size),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
        )


def logit_bias_of(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` ({"token id": bias}) as the engine's {id: bias}; a 400 for a key that is
    no token id of this model or a bias outside [-100, 100]."""
    if not raw:
        return None
    out = {}
    for key, bias in raw.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise bad_request(
                f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})", "logit_bias"
            )
        if not -100 <= bias <= 100:
            raise bad_request(
                f"logit_bias: bias for token {key} must be in [-100, 100], got {bias}", "logit_bias"
            )
        out[int(key)] = float(bias)
    return out


def surely_too_long(engine: Engine, texts: list[str], context: int) -> int | None:
    """The byte length of ``texts`` when it cannot fit in ``context`` tokens whatever their tokens, else
    None: checked before tokenizing, which holds the GIL (the whole server stops: every stream) for
    seconds on a multi-megabyte request that is refused anyway. A token never covers more than the
    longest entry of the vocabulary (``Tokenizer.max_token_chars``, one character per byte); the factor
    4 leaves room for a normalizer that composes characters.
    """
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return size if size > 4 * engine.tokenizer.max_token_chars * context else None


# The safety policy's notes on a request (JSON list of strings), e.g. a "safety:" line it did not apply.
SAFETY_NOTES_HEADER = "X-Chatforge-Safety-Notes"


def legacy_top_logprobs(tok: Any, pairs: Any) -> dict[str, float]:
    """``/v1/completions``' top_logprobs entry: text -> logprob from (id, logprob) pairs, best first. Two
    ids can decode to the same text (each half of a split UTF-8 character is "\ufffd"): the best keeps
    its place instead of being overwritten by a worse one."""
    out: dict[str, float] = {}
    for i, lp in pairs:
        out.setdefault(tok.decode([i]), lp)
    return out


def _prompt_logprobs(engine: Engine, ids: list[int], k: int) -> tuple[list[float | None], list[dict | None]]:
    """Log-probability of each prompt token given the ones before it, from one forward pass."""
    with torch.inference_mode(), engine._autocast():
        logits = engine.model(torch.tensor([ids], device=engine.device))[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    target = torch.tensor(ids[1:], device=logp.device)
    picked = logp.gather(-1, target[:, None])[:, 0].tolist()
    tops: list[dict | None] = [None]
    if k:
        vals, idx = torch.topk(logp, k, dim=-1)
        tok = engine.tokenizer
        for vs, ix in zip(vals.tolist(), idx.tolist()):
            tops.append(legacy_top_logprobs(tok, zip(ix, vs)))
    else:
        tops += [None] * len(picked)
    return [None, *picked], tops


# ---------------------------------------------------------------- the app


def create_app(
    versions: dict[str, str | Path] | None = None,
    *,
    cfg: ServeConfig | None = None,
    db: Database | str | None = None,
    admin_key: str | None = None,
    policy: Policy | None = None,
    active: str | None = None,
    routes: Sequence[APIRouter] = (),
) -> FastAPI:
    """The server for ``versions`` ({name: checkpoint dir}); the first (or ``active``) one is promoted
    when the database has no earlier promotion of a loaded version. ``db`` is a Database or a URL
    (default: in-memory SQLite). ``admin_key`` defaults to the environment variable ``cfg.admin_key_env``.
    ``routes`` (e.g. ``/v1/moderations``) are served behind the API-key check and rate limit.
    """
    cfg = cfg or ServeConfig()
    if not isinstance(db, Database):
        db = Database(db or "sqlite://")
    admin_key = admin_key if admin_key is not None else os.environ.get(cfg.admin_key_env) or None
    metrics = Metrics()
    registry = Versions(db, cfg.max_batch, cfg.max_len, cfg.device, observer=metrics, compile=cfg.compile)
    for name, path in (versions or {}).items():
        registry.add(name, path)
    if active is not None:
        registry.promote(active, by="startup")
    limits = Limits(cfg)
    limiter = RateLimiter(cfg.rate_limit_rpm)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        registry.close()

    app = FastAPI(title="chatforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.versions, app.state.db, app.state.metrics, app.state.cfg = registry, db, metrics, cfg

    # ------------------------------------------------------------ errors, in OpenAI's shape

    @app.exception_handler(APIError)
    async def _api_error(_r: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_r: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        # Drop "body" and pydantic's union-member tags ("str", "list[int]", ...) from the location.
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _TYPE_TAG.fullmatch(str(x))]
        if err.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
            return JSONResponse(bad_request(msg).body(), status_code=400)
        param = ".".join(loc) or None
        msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return JSONResponse(bad_request(msg, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(ChatforgeError)
    async def _chatforge_error(_r: Request, e: ChatforgeError) -> JSONResponse:
        return JSONResponse(bad_request(str(e)).body(), status_code=400)

    @app.exception_handler(Cancelled)
    async def _cancelled(_r: Request, e: Cancelled) -> JSONResponse:
        # The client went away mid-request (watch_disconnect cancelled it): nobody reads this answer, but
        # the handler must end, or it waits forever and holds up the server's shutdown. 499 as in nginx.
        return JSONResponse(
            APIError(499, "the client closed the request", "cancelled").body(), status_code=499
        )

    @app.exception_handler(Exception)
    async def _internal(_r: Request, e: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
        return JSONResponse(err.body(), status_code=500)

    app.add_middleware(CountRequests, metrics=metrics)

    # ------------------------------------------------------------ auth

    # Key lookups are cached for AUTH_TTL s: caller() runs on the event loop before every request, and a
    # database query there stalls every stream under load. Keys made or revoked through this server's
    # admin routes take effect at once (the cache is cleared); by another process, within AUTH_TTL.
    auth_cache: dict[str, tuple[float, Any]] = {}

    def auth_lookup(what: str, fetch: Callable[[], Any]) -> Any:
        now = time.monotonic()
        hit = auth_cache.get(what)
        if hit is None or hit[0] < now:
            if len(auth_cache) > 10_000:  # many distinct wrong keys: do not grow without bound
                auth_cache.clear()
            hit = auth_cache[what] = (now + AUTH_TTL, fetch())
        return hit[1]

    def caller(request: Request) -> str:
        """Check the API key (when keys are in use) and the rate limit; returns who is calling."""
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        who, rpm = f"ip:{request.client.host if request.client else '?'}", None
        if cfg.require_api_key or auth_lookup("", db.has_api_keys):
            row = auth_lookup("key:" + key, lambda: db.find_api_key(key)) if key else None
            if row is None:
                msg = "Incorrect API key provided." if key else "You didn't provide an API key."
                raise APIError(401, msg, "invalid_request_error", None, "invalid_api_key")
            who, rpm = f"key:{row.id}", row.rate_limit_rpm or None
        if not limiter.allow(who, rpm):
            raise APIError(
                429,
                "Rate limit reached for requests; try again shortly.",
                "requests",
                None,
                "rate_limit_exceeded",
            )
        return who

    def admin(request: Request) -> None:
        if admin_key is None:
            raise APIError(
                403, f"admin routes are disabled: set ${cfg.admin_key_env} on the server", "permission_error"
            )
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), admin_key.encode()):
            raise APIError(
                401, "admin key missing or wrong", "invalid_request_error", None, "invalid_api_key"
            )

    def version_of(name: str) -> Version:
        try:
            return registry.get(name)
        except KeyError:
            raise APIError(
                404,
                f"The model '{name}' does not exist (see /v1/models)",
                "invalid_request_error",
                "model",
                "model_not_found",
            ) from None

    # ------------------------------------------------------------ generation plumbing

    async def first_batch(v: Version, req: GenRequest) -> tuple[Any, AsyncIterator]:
        """(the first batch of ``req``'s events or None when there is none, the rest of its batches), so
        that an engine refusal is a 400 before any response starts; any failure frees its slots."""
        batches = req.batches()
        try:
            return await batches.__anext__(), batches
        except StopAsyncIteration:
            return None, batches
        except ValueError as e:  # the engine refused the request (prompt, schema)
            v.scheduler.cancel(req)
            raise bad_request(str(e)) from None
        except BaseException:
            v.scheduler.cancel(req)
            raise

    async def check_schema(v: Version, params: SamplingParams) -> None:
        schema = json_schema_of(params.response_format)
        if schema is None:
            return
        fut = v.scheduler.call(lambda: v.engine._grammars().matcher(schema))
        try:
            await asyncio.wrap_future(fut)
        except ValueError as e:  # the grammar engine cannot enforce it: never fall back to free text
            raise bad_request(str(e), "response_format", "invalid_json_schema") from None

    def token_info(engine: Engine, t: int, lp: float, top: list[tuple[int, float]] | None) -> dict:
        table = engine._token_bytes()
        tok = engine.tokenizer

        def one(i: int, v: float) -> dict:
            b = table[i] if table is not None and i < len(table) else tok.decode([i]).encode()
            return {"token": tok.decode([i]), "logprob": v, "bytes": list(b)}

        d = one(t, lp)
        d["top_logprobs"] = [one(i, v) for i, v in (top or [])]
        return d

    class Choice:
        """One sample's accumulated state while it streams."""

        def __init__(self, messages: list[dict] | None = None) -> None:
            self.messages = messages  # the chat request's, for the user's "safety:" line (None: a prompt)
            self.text = ""  # released: passed the output check
            self.held = ""  # decoded but not yet checked
            self.tokens = 0
            self.logprobs: list[dict] = []
            self.raw_lps: list[float] = []
            self.raw_tops: list[dict] = []
            self.ids: list[int] = []
            self.ok_ids = 0  # tokens covered by released text (their logprobs may be sent)
            self.sent_lps = 0  # logprob entries already streamed
            self.finish: str | None = None

        def new_logprobs(self) -> list[dict]:
            """Logprob entries of released tokens not streamed yet."""
            out = self.logprobs[self.sent_lps : self.ok_ids]
            self.sent_lps = max(self.sent_lps, self.ok_ids)
            return out

    def output_flagged(text: str, messages: list[dict] | None) -> bool:
        """The output check, under the request's own ``safety:`` line when the policy reads one
        (``check_output_for``): a user who asked to decline violence gets violent replies stopped too,
        not only violent requests declined."""
        per_request = getattr(policy, "check_output_for", None)
        if messages is not None and per_request is not None:
            return per_request(text, messages) is not None
        assert policy is not None
        return policy.check_output(text) is not None

    def apply_event(v: Version, c: Choice, ev: Any, want_lp: bool) -> str:
        """Fold one engine event into ``c``; returns the text to hand out (policy applied)."""
        if ev.token_id is not None:
            c.tokens += 1
            c.ids.append(ev.token_id)
            metrics.tokens.labels(v.name).inc()
            if want_lp and ev.logprob is not None:
                c.logprobs.append(token_info(v.engine, ev.token_id, ev.logprob, ev.top_logprobs))
                c.raw_lps.append(ev.logprob)
                c.raw_tops.append(legacy_top_logprobs(v.engine.tokenizer, ev.top_logprobs or []))
        c.held += ev.text
        if policy is not None and not ev.finished:
            # Checking re-scores the whole text with the moderation model: once per chunk, not per token.
            h = c.held
            if len(h) < OUTPUT_CHECK_CHARS and not h.rstrip(" ").endswith((".", "!", "?", "\n", ":", ";")):
                return ""
        out = ""
        if c.held:
            if policy is not None and output_flagged(c.text + c.held, c.messages):
                c.finish = "content_filter"
                c.held = ""
                del c.ids[c.ok_ids :], c.logprobs[c.ok_ids :], c.raw_lps[c.ok_ids :], c.raw_tops[c.ok_ids :]
                return ""
            out, c.held = c.held, ""
            c.text += out
        c.ok_ids = len(c.ids)
        if ev.finished:
            c.finish = ev.finish_reason
        return out

    async def watch_disconnect(request: Request, v: Version, gen: GenRequest) -> None:
        while True:
            await asyncio.sleep(0.05)
            if await request.is_disconnected():
                v.scheduler.cancel(gen)
                return

    # ------------------------------------------------------------ OpenAI routes

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "active": registry.active_name(),
            "versions": {
                n: {"active": registry.get(n).scheduler.active, "waiting": registry.get(n).scheduler.waiting}
                for n in registry.names()
            },
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        caller(request)
        act = registry.active_name()
        data = []
        for n in registry.names():
            v = registry.get(n)
            data.append(
                {
                    "id": n,
                    "object": "model",
                    "created": 0,
                    "owned_by": "chatforge",
                    "active": n == act,
                    "path": v.path,
                    "context_length": v.context,
                }
            )
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request) -> dict:
        caller(request)
        v = version_of(name)
        return {"id": v.name, "object": "model", "created": 0, "owned_by": "chatforge"}

    def input_decline(messages: list[dict]) -> tuple[str | None, dict[str, str]]:
        """The policy's brief decline for a flagged input (None when the input may go to the model), and
        the headers that carry the policy's notes: a ``safety:`` line it ignored, a user threshold that
        would have loosened it. Without them a user who wrote "safety: off" would never learn it did
        nothing."""
        assert policy is not None
        decide = getattr(policy, "decide_input", None)  # safety.policy.Policy: a decline worded for users
        if decide is not None:
            d = decide(messages)
            notes = {SAFETY_NOTES_HEADER: json.dumps(d.notes)} if d.notes else {}
            return (None if d.allowed else d.message or f"I can't help with that ({d.reason()})."), notes
        reason = policy.check_input(messages)
        return (None if reason is None else f"I can't help with that ({reason})."), {}

    def declined(
        body: P.ChatRequest, name: str, text: str, prompt_tokens: int, headers: dict[str, str]
    ) -> Response:
        """A flagged request is answered, not errored: the decline as the reply of every choice, with
        ``finish_reason: "content_filter"``, so clients show it like any other answer."""
        cid, created = P.new_id("chatcmpl"), P.now()
        n = body.n or 1
        if not body.stream:
            base = {"id": cid, "created": created, "model": name, "system_fingerprint": name}
            choices = [
                {
                    "index": j,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "content_filter",
                }
                for j in range(n)
            ]
            usage = P.usage(prompt_tokens, 0)
            return JSONResponse(
                {**base, "object": "chat.completion", "choices": choices, "usage": usage}, headers=headers
            )

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk = P.ChatChunks(cid, created, name, include_usage)
        parts = [chunk({"role": "assistant", "content": text}, j) for j in range(n)]
        parts += [chunk({}, j, "content_filter") for j in range(n)]
        if include_usage:
            parts.append(chunk.usage(prompt_tokens, 0))
        return StreamingResponse(
            iter(["".join(parts) + "data: [DONE]\n\n"]), media_type="text/event-stream", headers=headers
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatRequest, request: Request) -> Response:
        caller(request)
        refuse_tools(body)
        v = version_of(body.model)
        messages = chat_messages(body)
        size = surely_too_long(v.engine, [m["content"] for m in messages], v.context)
        if size is not None:
            raise bad_request(
                f"This model's maximum context length is {v.context} tokens. However, your messages are"
                f" {size} bytes long, more tokens than that. Please reduce the length of the messages.",
                "messages",
                "context_length_exceeded",
            )
        prompt = v.engine.tokenizer.encode_chat_prompt(messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise bad_request("top_logprobs: needs logprobs: true", "top_logprobs")
        params = limits.params(
            body,
            max_tokens,
            len(prompt),
            v.context,
            body.logprobs,
            top,
            body.response_format,
            v.engine.vocab_size,
        )
        await check_schema(v, params)
        # After validation: a request the server would refuse is a 400 whether or not its input is flagged.
        decline, notes = input_decline(messages) if policy is not None else (None, {})
        if decline is not None:
            return declined(body, v.name, decline, len(prompt), notes)
        gen = v.scheduler.submit(prompt, params)
        first, batches = await first_batch(v, gen)
        metrics.ttft.observe(time.perf_counter() - gen.submitted)
        cid, created = P.new_id("chatcmpl"), P.now()
        name = v.name
        choices = [Choice(messages) for _ in range(params.n)]
        usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk = P.ChatChunks(cid, created, name, usage)

        async def all_batches() -> AsyncIterator[list[tuple[int, Any]]]:
            if first is not None:
                yield first
            async for items in batches:
                yield items

        if body.stream:

            async def sse() -> AsyncIterator[str]:
                try:
                    # One write per batch of events: a handler that fell behind catches up in one send.
                    parts = [chunk({"role": "assistant", "content": ""}, j) for j in range(params.n)]
                    async for items in all_batches():
                        for j, ev in items:
                            c = choices[j]
                            if c.finish is not None:
                                continue  # content_filter stopped it; the other samples go on
                            delta = apply_event(v, c, ev, body.logprobs)
                            lps = c.new_logprobs() if body.logprobs else None
                            if delta or lps:
                                parts.append(chunk({"content": delta}, j, None, lps))
                            if c.finish is not None:
                                parts.append(chunk({}, j, c.finish))
                        if parts:
                            yield "".join(parts)
                            parts = []
                        if all(c.finish is not None for c in choices):
                            break  # every sample done (content_filter included): stop generating them
                    if usage:
                        parts.append(chunk.usage(len(prompt), sum(c.tokens for c in choices)))
                    yield "".join(parts) + "data: [DONE]\n\n"
                finally:  # a client that went away (or any error) frees its slots at once
                    v.scheduler.cancel(gen)

            return StreamingResponse(
                sse(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **notes},
            )

        watcher = asyncio.create_task(watch_disconnect(request, v, gen))
        try:
            async for items in all_batches():
                for j, ev in items:
                    if choices[j].finish is None:
                        apply_event(v, choices[j], ev, body.logprobs)
                if all(c.finish is not None for c in choices):
                    break  # every sample done: a reply the output check stopped is not generated on
        finally:
            watcher.cancel()
            v.scheduler.cancel(gen)
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "system_fingerprint": name,
                "choices": [
                    {
                        "index": j,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": {"content": c.logprobs} if body.logprobs else None,
                        "finish_reason": c.finish,
                    }
                    for j, c in enumerate(choices)
                ],
                "usage": P.usage(len(prompt), sum(c.tokens for c in choices)),
            },
            headers=notes,
        )

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        caller(request)
        v = version_of(body.model)
        tok = v.engine.tokenizer
        raw = body.prompt
        if isinstance(raw, str) or (raw and all(isinstance(x, int) for x in raw)):
            prompts = [raw]
        else:
            prompts = list(raw)  # type: ignore[arg-type]
        if not prompts:
            raise bad_request("prompt: must not be empty", "prompt")
        ids_list: list[list[int]] = []
        for i, p in enumerate(prompts):
            size = surely_too_long(v.engine, [p], v.context) if isinstance(p, str) else None
            if size is not None:
                raise bad_request(
                    f"This model's maximum context length is {v.context} tokens. However, prompt[{i}] is"
                    f" {size} bytes long, more tokens than that. Please reduce the length of the prompt.",
                    "prompt",
                    "context_length_exceeded",
                )
            ids = tok.encode_plain(p) if isinstance(p, str) else list(p)
            if any(not 0 <= t < v.engine.vocab_size for t in ids):
                raise bad_request(f"prompt[{i}]: token ids must be in [0, {v.engine.vocab_size})", "prompt")
            ids_list.append(ids)
        if body.suffix:
            raise bad_request("suffix: not supported", "suffix")
        if body.best_of not in (None, 1, body.n):  # best_of == n returns every candidate: no choosing
            raise bad_request(
                "best_of: not supported by this server (leave it out, or use 1; ask for n samples instead)",
                "best_of",
            )
        k = body.logprobs or 0
        plist = [
            limits.params(
                body,
                body.max_tokens,
                len(ids),
                v.context,
                body.logprobs is not None,
                k,
                None,
                v.engine.vocab_size,
            )
            for ids in ids_list
        ]
        if body.seed is not None:
            # Prompt i's samples draw from the seed of stream i*n, as Engine.generate does: with one shared
            # seed, sample j of every prompt got the same random stream (equal prompts, equal answers).
            plist = [
                dataclasses.replace(p, seed=sample_seed(body.seed, i * body.n)) for i, p in enumerate(plist)
            ]
        if body.stream and (body.echo or len(ids_list) > 1):
            raise bad_request("stream: supported for one prompt without echo", "stream")
        # The input check, as for a chat: a raw prompt is read as one user turn. A flagged prompt is
        # answered with the decline (finish_reason "content_filter") and never reaches the model. Not
        # for scoring (echo with logprobs: lm-eval's loglikelihood), which reads the prompt's own scores;
        # what such a request generates is still checked on output.
        prompt_texts = [tok.decode(ids) for ids in ids_list]
        declines: list[str | None] = [None] * len(ids_list)
        notes: dict[str, str] = {}
        if policy is not None and not (body.echo and body.logprobs is not None):
            for i, text in enumerate(prompt_texts):
                declines[i], said = input_decline([{"role": "user", "content": text}])
                notes = notes or said
        cid, created = P.new_id("cmpl"), P.now()
        head = {"id": cid, "object": "text_completion", "created": created, "model": v.name}
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)

        def sse_event(choices: list[dict], **extra: Any) -> str:
            """One server-sent event of this completion's stream."""
            return f"data: {json.dumps({**head, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

        def choice_chunk(j: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
            """One choice of a completion (a whole one, or a streamed chunk of one)."""
            return {"index": j, "text": text, "logprobs": logprobs, "finish_reason": finish}

        if body.stream and declines[0] is not None:
            n = range(body.n)
            parts = [sse_event([choice_chunk(j, declines[0], None, None)]) for j in n]
            parts += [sse_event([choice_chunk(j, "", None, "content_filter")]) for j in n]
            if include_usage:
                parts.append(sse_event([], usage=P.usage(len(ids_list[0]), 0)))
            return StreamingResponse(
                iter(["".join(parts) + "data: [DONE]\n\n"]), media_type="text/event-stream", headers=notes
            )
        gens = [
            None if d is not None else v.scheduler.submit(ids, p)
            for ids, p, d in zip(ids_list, plist, declines)
        ]
        if body.stream:
            gen = gens[0]
            assert gen is not None
            first, batches = await first_batch(v, gen)
            choices = [Choice() for _ in range(body.n)]
            want_lp = body.logprobs is not None
            offsets = [0] * body.n  # text_offset of each choice's next token, as in the non-streamed answer

            def chunk_logprobs(j: int, c: Choice) -> dict | None:
                """The legacy logprobs of ``c``'s released tokens not sent yet (None without logprobs)."""
                if not want_lp:
                    return None
                lo, hi = c.sent_lps, c.ok_ids
                c.sent_lps = max(lo, hi)
                toks = [tok.decode([t]) for t in c.ids[lo:hi]]
                tops = c.raw_tops[lo:hi] if k else [None] * len(toks)
                lp = P.completion_logprobs(toks, c.raw_lps[lo:hi], tops, offsets[j])
                offsets[j] += sum(map(len, toks))
                return lp

            async def sse() -> AsyncIterator[str]:
                async def all_batches() -> AsyncIterator[list[tuple[int, Any]]]:
                    if first is not None:
                        yield first
                    async for items in batches:
                        yield items

                try:
                    async for items in all_batches():
                        parts = []
                        for j, ev in items:
                            c = choices[j]
                            if c.finish is not None:
                                continue
                            delta = apply_event(v, c, ev, want_lp)
                            lp = chunk_logprobs(j, c)
                            if delta or c.finish or (lp and lp["tokens"]):
                                parts.append(sse_event([choice_chunk(j, delta, lp, c.finish)]))
                        if parts:
                            yield "".join(parts)
                    if include_usage:
                        yield sse_event([], usage=P.usage(len(gen.prompt), sum(c.tokens for c in choices)))
                    yield "data: [DONE]\n\n"
                finally:
                    v.scheduler.cancel(gen)

            return StreamingResponse(sse(), media_type="text/event-stream", headers=notes)

        watchers = [asyncio.create_task(watch_disconnect(request, v, g)) for g in gens if g is not None]
        out = []
        completion_tokens = 0
        try:
            echoes: list[tuple[list[float | None], list[dict | None]] | None] = []
            for ids in ids_list:
                if body.echo and body.logprobs is not None:
                    fut = v.scheduler.call(lambda ids=ids: _prompt_logprobs(v.engine, ids, k))
                    echoes.append(await asyncio.wrap_future(fut))
                else:
                    echoes.append(None)
            for i, (ids, gen) in enumerate(zip(ids_list, gens)):
                choices = [Choice() for _ in range(body.n)]
                if gen is None:  # declined by the input check
                    for c in choices:
                        c.text, c.finish = declines[i] or "", "content_filter"
                else:
                    try:
                        async for j, ev in gen.events():
                            if choices[j].finish is None:
                                apply_event(v, choices[j], ev, body.logprobs is not None)
                    except ValueError as e:
                        raise bad_request(f"prompt[{i}]: {e}", "prompt") from None
                prompt_text = prompt_texts[i]
                for j, c in enumerate(choices):
                    completion_tokens += c.tokens
                    text = (prompt_text if body.echo else "") + c.text
                    lp = None
                    if body.logprobs is not None:
                        toks, tlps, ttops = [], [], []
                        if body.echo:
                            plp, ptop = echoes[i]  # type: ignore[misc]
                            toks += [tok.decode([t]) for t in ids]
                            tlps += plp
                            ttops += ptop
                        toks += [tok.decode([t]) for t in c.ids]
                        tlps += c.raw_lps
                        ttops += c.raw_tops if k else [None] * len(c.ids)
                        lp = P.completion_logprobs(toks, tlps, ttops)
                    out.append(choice_chunk(i * body.n + j, text, lp, c.finish))
        finally:
            for w in watchers:
                w.cancel()
            for g in gens:
                if g is not None:
                    v.scheduler.cancel(g)
        return JSONResponse(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": v.name,
                "choices": out,
                "usage": P.usage(sum(map(len, ids_list)), completion_tokens),
            },
            headers=notes,
        )

    # ------------------------------------------------------------ web UI + its storage

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/ui/config")
    def ui_config(request: Request) -> dict:
        return {
            "versions": registry.names(),
            "active": registry.active_name(),
            "auth": cfg.require_api_key or db.has_api_keys(),
            "limits": {"max_tokens": cfg.max_tokens, "max_n": cfg.max_n},
        }

    async def json_body(request: Request) -> Any:
        try:
            return P.no_lone_surrogates(json.loads(await request.body()))
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise bad_request(f"the request body is not valid JSON ({e})") from None

    def body_of(data: Any, fields: dict[str, type | tuple[type, ...]]) -> dict:
        if not isinstance(data, dict):
            raise bad_request("expected a JSON object")
        for f, tp in fields.items():
            if f in data and data[f] is not None and not isinstance(data[f], tp):
                raise bad_request(f"{f}: wrong type", f)
        return data

    @app.get("/ui/conversations")
    def ui_conversations(request: Request, rater: str = "") -> dict:
        caller(request)
        return {"data": db.conversations(db.rater_id(rater))}

    @app.get("/ui/conversations/{conv_id}")
    def ui_conversation(conv_id: int, request: Request) -> dict:
        caller(request)
        conv = db.conversation(conv_id)
        if conv is None:
            raise APIError(404, f"no conversation {conv_id}", "not_found_error")
        return conv

    @app.post("/ui/conversations")
    async def ui_save(request: Request) -> dict:
        caller(request)
        data = body_of(
            await json_body(request), {"id": int, "title": str, "system": str, "messages": list, "rater": str}
        )
        msgs = data.get("messages") or []
        for i, m in enumerate(msgs):
            if not (
                isinstance(m, dict)
                and m.get("role") in ("user", "assistant")
                and isinstance(m.get("content"), str)
            ):
                raise bad_request(
                    f"messages[{i}]: expected {{role: user|assistant, content: str}}", f"messages.{i}"
                )
        try:
            cid = await asyncio.to_thread(
                db.save_conversation,
                data.get("id"),
                data.get("title") or "",
                data.get("system") or "",
                msgs,
                db.rater_id(data.get("rater") or ""),
            )
        except KeyError:
            raise APIError(404, f"no conversation {data.get('id')}", "not_found_error") from None
        return {"id": cid}

    @app.delete("/ui/conversations/{conv_id}")
    def ui_delete(conv_id: int, request: Request) -> dict:
        caller(request)
        return {"deleted": db.delete_conversation(conv_id)}

    @app.post("/ui/ratings")
    async def ui_rate(request: Request) -> dict:
        caller(request)
        data = body_of(
            await json_body(request), {"conversation_id": int, "index": int, "rating": int, "reason": str}
        )
        if data.get("rating") not in (-1, 0, 1):
            raise bad_request("rating: must be -1, 0 or 1", "rating")
        ok = await asyncio.to_thread(
            db.rate_message,
            data.get("conversation_id", -1),
            data.get("index", -1),
            data["rating"],
            (data.get("reason") or "")[:2000],
        )
        if not ok:
            raise APIError(404, "no assistant message at that conversation and index", "not_found_error")
        return {"ok": True}

    @app.post("/ui/votes")
    async def ui_vote(request: Request) -> dict:
        caller(request)
        data = body_of(
            await json_body(request),
            {
                "prompt": list,
                "answer_a": str,
                "answer_b": str,
                "model_a": str,
                "model_b": str,
                "sampling": dict,
                "seed_a": int,
                "seed_b": int,
                "a_left": bool,
                "winner": str,
                "rater": str,
                "conversation_id": int,
            },
        )
        for f in ("prompt", "answer_a", "answer_b", "model_a", "model_b", "a_left", "winner", "rater"):
            if data.get(f) is None:
                raise bad_request(f"{f}: required", f)
        if data["winner"] not in WINNERS:
            raise bad_request(f"winner: must be one of {', '.join(WINNERS)}", "winner")
        for i, m in enumerate(data["prompt"]):
            if not (
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
            ):
                raise bad_request(f"prompt[{i}]: expected {{role, content}}", f"prompt.{i}")
        # The prompt is what both answers answer: it ends with the user's turn (else the export writes a
        # pair that `chatforge reward` can only drop as malformed).
        if not data["prompt"] or data["prompt"][-1]["role"] != "user":
            raise bad_request("prompt: must end with the user message that the answers reply to", "prompt")
        # What the columns hold (else PostgreSQL answers a 500): model names up to 100 characters,
        # seeds and ids 32-bit integers (the UI draws its seeds below 2**31 - 1).
        for f in ("model_a", "model_b"):
            if not 0 < len(data[f]) <= 100:
                raise bad_request(f"{f}: 1 to 100 characters", f)
        for f in ("seed_a", "seed_b", "conversation_id"):
            if data.get(f) is not None and (isinstance(data[f], bool) or not -(2**31) <= data[f] < 2**31):
                raise bad_request(f"{f}: must be a 32-bit integer", f)
        cid = data.get("conversation_id")
        if cid is not None and not await asyncio.to_thread(db.has_conversation, cid):
            raise APIError(404, f"no conversation {cid}", "not_found_error", "conversation_id")
        fields = {
            k: data.get(k)
            for k in (
                "prompt",
                "answer_a",
                "answer_b",
                "model_a",
                "model_b",
                "seed_a",
                "seed_b",
                "a_left",
                "winner",
                "conversation_id",
            )
        }
        fields["sampling"] = data.get("sampling") or {}
        fields["rater"] = db.rater_id(data["rater"])
        vid = await asyncio.to_thread(lambda: db.add_vote(**fields))
        return {"id": vid}

    # ------------------------------------------------------------ admin

    @app.get("/admin/versions")
    def admin_versions(request: Request) -> dict:
        admin(request)
        return {
            "active": registry.active_name(),
            "loaded": {n: registry.get(n).path for n in registry.names()},
            "history": [
                {
                    "version": p.version,
                    "promoted_at": p.promoted_at.isoformat(),
                    "by": p.by,
                    "rolled_back_at": p.rolled_back_at.isoformat() if p.rolled_back_at else None,
                }
                for p in db.promotion_history()
            ],
        }

    @app.post("/admin/versions")
    async def admin_add(request: Request) -> dict:
        admin(request)
        data = body_of(await json_body(request), {"name": str, "path": str, "promote": bool})
        if not data.get("name") or not data.get("path"):
            raise bad_request("name and path: required")
        await asyncio.to_thread(registry.add, data["name"], data["path"], bool(data.get("promote")))
        return {"active": registry.active_name(), "versions": registry.names()}

    @app.post("/admin/promote")
    async def admin_promote(request: Request) -> dict:
        admin(request)
        data = body_of(await json_body(request), {"name": str})
        try:
            registry.promote(data.get("name") or "", by="admin")
        except KeyError:
            raise APIError(
                404, f"no loaded version {data.get('name')!r}", "not_found_error", "name"
            ) from None
        return {"active": registry.active_name()}

    @app.post("/admin/rollback")
    def admin_rollback(request: Request) -> dict:
        admin(request)
        registry.rollback()
        return {"active": registry.active_name()}

    @app.post("/admin/keys")
    async def admin_key_create(request: Request) -> dict:
        admin(request)
        data = body_of(await json_body(request), {"name": str, "rate_limit_rpm": int})
        name, rpm = data.get("name") or "key", data.get("rate_limit_rpm")
        rpm = 0 if rpm is None else rpm
        problem = api_key_problem(name, rpm)
        if problem is not None:
            raise bad_request(problem[1], problem[0])
        key = db.create_api_key(name, rpm)
        auth_cache.clear()
        return {"key": key, "prefix": key[:10]}

    @app.delete("/admin/keys/{prefix}")
    def admin_key_revoke(prefix: str, request: Request) -> dict:
        admin(request)
        revoked = db.revoke_api_key(prefix)
        auth_cache.clear()
        return {"revoked": revoked}

    # Added with app.include_router after create_app, /v1/moderations answered without a key or a limit.
    for router in routes:
        app.include_router(router, dependencies=[Depends(caller)])
    return app


# ---------------------------------------------------------------- `chatforge serve`


def resolve_versions(cfg: RunConfig, model: str | None, extra: list[str]) -> dict[str, str]:
    """{name: path}: ``--model`` (or the run's sft, else base) as "main", then ``--versions name=path``."""
    sc = cfg.serve
    out: dict[str, str] = {}
    main = model or sc.model
    if not main:
        for stage in ("sft", "base"):
            if (cfg.run_dir / stage / "config.json").is_file():
                main = str(cfg.run_dir / stage)
                break
    if main:
        out[Path(main).name if not extra and not sc.versions else "main"] = main
    for item in [*sc.versions, *extra]:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ChatforgeError(f"--versions {item!r}: expected name=path, e.g. sft=runs/cpu-demo/sft")
        out[name] = path
    if not out:
        raise ChatforgeError(f"nothing to serve: no checkpoint in {cfg.run_dir} (pass --model DIR)")
    for name, path in out.items():
        if not (Path(path) / "config.json").is_file():
            raise ChatforgeError(f"version {name!r}: {path} is not a checkpoint directory (no config.json)")
    return out


def run(cfg: RunConfig, model: str | None = None, versions: list[str] | None = None) -> dict:
    """Serve until interrupted (blocking); returns what was served."""
    import uvicorn

    sc = cfg.serve
    vs = resolve_versions(cfg, model, versions or [])
    db_url = sc.db_url or f"sqlite:///{cfg.run_dir / 'serve.db'}"
    if db_url.startswith("sqlite:///"):
        Path(db_url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    from chatforge.safety.policy import serving_policy

    policy, moderations = serving_policy(cfg)  # input/output moderation + /v1/moderations (issue 8)
    app = create_app(vs, cfg=sc, db=db_url, policy=policy, routes=[moderations] if moderations else [])
    print(f"chatforge serve: http://{sc.host}:{sc.port}/  versions: {', '.join(vs)}  db: {db_url}")
    uvicorn.run(app, host=sc.host, port=sc.port, log_level="warning")
    return {"versions": vs, "db_url": db_url}
