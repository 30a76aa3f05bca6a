"""The OpenAI wire format: request models, error shapes and response pieces (no model code here)."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


_SURROGATE = re.compile("[\ud800-\udfff]")


def no_lone_surrogates(x: Any) -> Any:
    """``x`` (parsed JSON) with each unpaired UTF-16 surrogate (``"\\ud83c"`` alone: valid JSON, what a
    JavaScript string cut in the middle of an emoji encodes to) replaced by U+FFFD, as a browser's UTF-8
    encoder does. Such a string cannot be encoded as UTF-8: the tokenizer and the database fail on it."""
    if isinstance(x, str):
        return x if x.isascii() or not _SURROGATE.search(x) else _SURROGATE.sub("\ufffd", x)
    if isinstance(x, list):
        return [no_lone_surrogates(v) for v in x]
    if isinstance(x, dict):
        return {no_lone_surrogates(k): no_lone_surrogates(v) for k, v in x.items()}
    return x


class _Lenient(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send vendor extras); known ones
    # are strict: "stream": "yes" or "n": "2" is a 400, not silently coerced.
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's spec makes most optional fields nullable ("n": null, "stream": null, "logprobs": null,
        # "echo": null, ...) and clients send explicit nulls: an optional field given null gets its default.
        if isinstance(data, dict) and None in data.values():
            fields = cls.model_fields
            data = {
                k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()
            }
        return data


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # Read only to refuse them (this server has no tools): dropped, the turn would read as empty text.
    tool_calls: Any = None
    function_call: Any = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return no_lone_surrogates(data)

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's, but vLLM's and handy
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # {token id as a string: bias in [-100, 100]}
    user: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    # Not supported (no tool calling): read only to refuse a request that asks for them.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)  # only a no-op value is accepted (see the server)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(tokens: list[str], lps: list, tops: list, start: int = 0) -> dict[str, Any]:
    """``/v1/completions``' logprobs: each token's text, logprob and top alternatives, and where it starts
    in the text (counted from ``start``: a streamed chunk continues where the last one ended)."""
    offsets = []
    for t in tokens:
        offsets.append(start)
        start += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


class ChatChunks:
    """The server-sent events of one streamed chat completion. Every chunk shares its head and tail, so
    they are encoded once and only each choice per token (streaming is on the hot path)."""

    def __init__(self, cid: str, created: int, model: str, include_usage: bool) -> None:
        self.base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": model,
        }
        self.head = "data: " + json.dumps(self.base, separators=(",", ":"))[:-1] + ',"choices":['
        # With include_usage every chunk carries "usage": null and a last chunk carries the totals.
        self.tail = '],"usage":null}\n\n' if include_usage else "]}\n\n"

    def __call__(self, delta: dict, j: int, finish: str | None = None, lps: list | None = None) -> str:
        ch = {
            "index": j,
            "delta": delta,
            "logprobs": {"content": lps} if lps else None,
            "finish_reason": finish,
        }
        return self.head + json.dumps(ch, ensure_ascii=False) + self.tail

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        obj = {**self.base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
        return f"data: {json.dumps(obj)}\n\n"


FinishReason = Literal["stop", "length", "content_filter"]
