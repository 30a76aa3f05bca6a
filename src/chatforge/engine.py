"""The one generation engine: batched prefill and decode over the KV cache, with sampling controls.

Everything runs through one step machine, :class:`EngineSession`: each cache slot holds one sequence with
its own length, new sequences join between steps (their prompts are prefilled in the step they join,
without touching the other slots), and every step decodes all running sequences together, one token
each. ``Engine.generate``, ``Engine.stream`` and ``Engine.stream_events`` are thin loops over a session;
a continuous-batching scheduler drives one directly (``engine.start(...)``, then ``add`` / ``step`` /
``remove``).

Per sequence: temperature (0 = greedy), top-k, top-p, a seed, stop strings, stop token ids, logprobs with
``top_logprobs`` alternatives, ``logit_bias`` / ``presence_penalty`` / ``frequency_penalty`` (OpenAI's:
added to the logits before the grammar mask, temperature and top-k/top-p; logprobs stay the model's own),
and ``response_format`` for JSON output. JSON constraints go through
llguidance: a token mask from the grammar is applied to the logits before sampling, so temperature /
top-k / top-p act within the allowed tokens, and the sequence stops (finish reason ``"stop"``) as soon as
the JSON value is complete. If ``max_new_tokens`` runs out first, the finish reason is ``"length"`` and
the text is an unfinished JSON prefix. JSON is written compactly (``separators=(",", ":")``, no
whitespace), the style of our chat data.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import json
import math
import operator
import secrets
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from chatforge.model import GPT, DecodeWeights, KVCache


def sample_seed(seed: int, offset: int) -> int:
    """The seed of random stream ``offset`` under a request's ``seed``: ``seed`` itself for stream 0, else
    a hash of both. (``seed + offset`` made seed=2's first sample seed=1's second: two requests with
    nearby seeds shared most of their samples, and RL's consecutive iterations their random streams.)"""
    if offset == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{offset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch.Generator seed


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    n: int = 1  # samples per prompt
    # Per-sample generators: sample j of prompt i draws sample_seed(sample_seed(seed, i * n), j).
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None = the tokenizer's end markers
    logprobs: bool = False  # log-probability of each chosen token under the model (before temperature)
    top_logprobs: int = 0  # also the k most likely tokens at each position (implies logprobs)
    # OpenAI shapes: {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {...}}}
    # (or {"type": "json_schema", "schema": {...}}); None or {"type": "text"} = unconstrained.
    response_format: dict | None = None
    # OpenAI's: {token id: bias in [-100, 100]} added to that token's logit at every step, and
    # -(frequency_penalty * count + presence_penalty * (count > 0)) for each token generated so far.
    # They shape the choice only: a grammar mask still wins, logprobs are the model's own.
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if not 0 <= self.temperature < math.inf:  # NaN too: it made every token's probability NaN
            raise ValueError("temperature must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0 or self.n < 1:
            raise ValueError("top_k must be >= 0 and n >= 1")
        if self.top_logprobs < 0:
            raise ValueError("top_logprobs must be >= 0")
        for t, b in (self.logit_bias or {}).items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"logit_bias: token ids must be integers >= 0, got {t!r}")
            if not -100 <= b <= 100:  # NaN fails too
                raise ValueError(f"logit_bias: biases must be in [-100, 100], got {b!r} for token {t}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        json_schema_of(self.response_format)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


def json_schema_of(response_format: dict | None) -> dict | None:
    """The JSON schema that an OpenAI-style ``response_format`` asks for; None = no constraint."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}  # OpenAI's JSON mode: any JSON object
    if kind == "json_schema":
        spec = response_format.get("json_schema", response_format)
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError(
                'response_format {"type": "json_schema"} needs a schema object: '
                '{"type": "json_schema", "json_schema": {"schema": {...}}}'
            )
        return schema
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob), best first


@dataclass
class TokenEvent:
    """What one step did to one sequence."""

    request_id: Hashable
    token_id: int | None  # the token appended; None when the step ended it without one (a stop token)
    text: str  # new text, possibly "" (incomplete UTF-8, or held back as a possible stop-string start)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" once finished
    completion: Completion | None = None  # the whole result, on the finishing event


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


# ---------------------------------------------------------------- detokenizing


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_bytes_table(tokenizer: Any, vocab_size: int) -> list[bytes] | None:
    """Each id's bytes, such that joining them and decoding UTF-8 equals ``tokenizer.decode``.

    None when the tokenizer is not a byte-level BPE from HF ``tokenizers`` (then text is re-decoded).
    """
    from tokenizers import decoders

    inner = getattr(tokenizer, "_tok", tokenizer)
    if not isinstance(getattr(inner, "decoder", None), decoders.ByteLevel):
        return None
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    added = {i: t.content for i, t in inner.get_added_tokens_decoder().items()}
    table = []
    for i in range(vocab_size):
        s = added.get(i) or inner.id_to_token(i)
        if s is None:
            table.append(b"")  # ids past the tokenizer (the model's vocab is padded): decode drops them
            continue
        try:
            table.append(bytes(char_to_byte[c] for c in s))
        except KeyError:  # what tokenizers' ByteLevel decoder does with a token it cannot map
            table.append(s.encode())
    return table


class _Detokenizer:
    """Text deltas token by token, without re-decoding the sequence (quadratic) at every step."""

    def __init__(self, table: list[bytes] | None, tokenizer: Any) -> None:
        self._table = table
        self._tok = tokenizer
        if table is not None:
            # Holds an incomplete UTF-8 sequence until its last byte arrives.
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        else:
            self._ids: list[int] = []
            self._text = ""

    def push(self, token_id: int) -> str:
        if self._table is not None:
            return self._utf8.decode(self._table[token_id]) if token_id < len(self._table) else ""
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            return ""
        delta, self._text = text[len(self._text) :], text
        return delta

    def flush(self) -> str:
        if self._table is not None:
            return self._utf8.decode(b"", final=True)
        text = self._tok.decode(self._ids)
        delta, self._text = text[len(self._text) :], text
        return delta


# ---------------------------------------------------------------- JSON constraints


class _Grammars:
    """llguidance over our tokenizer: JSON schemas -> matchers (one per sequence), cached by schema."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        import llguidance

        self._llg = llguidance
        to_str = getattr(tokenizer, "to_str", None) or tokenizer._tok.to_str
        # From the tokenizer.json text, so llguidance sees the exact byte-level vocabulary and special
        # tokens; n_vocab is the model's (padded) size, the extra ids are never allowed.
        self.tokenizer = llguidance.LLTokenizer(to_str(), n_vocab=vocab_size, eos_token=eos_ids)
        self.eos_ids = frozenset(eos_ids)
        self._cache: dict[str, Any] = {}

    def matcher(self, schema: dict) -> Any:
        key = json.dumps(schema)  # property order matters: the grammar emits properties in that order
        template = self._cache.get(key)
        if template is None:
            llg = self._llg
            try:
                # Compact JSON, like our chat data; no whitespace also keeps weak models from wandering.
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"whitespace_flexible": False}
                )
            except ValueError as e:
                raise ValueError(f"response_format: invalid JSON schema: {e}") from None
            template = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"response_format: unsupported JSON schema: {template.get_error()}")
            if len(self._cache) >= 256:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = template
        return template.deep_copy()


# ---------------------------------------------------------------- the step machine


@dataclass(eq=False, slots=True)
class _Row:
    """One sequence in a cache slot."""

    request_id: Hashable
    slot: int
    prompt: list[int]
    params: SamplingParams
    sample_index: int
    stop_ids: frozenset[int]
    detok: _Detokenizer
    matcher: Any  # llguidance.LLMatcher when constrained
    gen: torch.Generator | None  # None when greedy
    # logit_bias minus the penalties so far, one entry per vocabulary id (None when the row has neither)
    adjust: torch.Tensor | None = None
    seen: set[int] = field(default_factory=set)  # tokens generated so far, for presence_penalty only
    pending: int | None = None  # sampled and reported, not yet fed to the model
    length: int = 0  # tokens in the slot's cache, kept on the host so a step never reads it back
    tokens: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # text deltas handed out so far
    held: str = ""  # text withheld because it could be the start of a stop string

    def feed_text(self, new: str) -> tuple[str, bool]:
        """Text that is safe to hand out, and whether a stop string ended the sequence."""
        stops = self.params.stop
        if not stops:
            return new, False
        buf = self.held + new
        hit = min((i for s in stops if s and (i := buf.find(s)) >= 0), default=-1)
        if hit >= 0:
            self.held = ""
            return buf[:hit], True
        # Hold back the longest tail that a stop string starts with; it may complete next step.
        keep = max(
            (k for s in stops for k in range(min(len(s) - 1, len(buf)), 0, -1) if buf.endswith(s[:k])),
            default=0,
        )
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def completion(self, reason: str) -> Completion:
        p = self.params
        return Completion(
            prompt_index=0,
            sample_index=self.sample_index,
            token_ids=self.tokens,
            text="".join(self.texts),
            finish_reason=reason,
            logprobs=self.lps if p.wants_logprobs else None,
            top_logprobs=self.tops if p.top_logprobs else None,
        )


class EngineSession:
    """A fixed pool of ``max_batch`` cache slots of ``max_len`` tokens that sequences join and leave.

    ``add`` queues a sequence into a free slot; ``step`` prefills the sequences added since the last step,
    decodes one token for every running one and returns one :class:`TokenEvent` per sequence; a finished
    sequence frees its slot by itself; ``remove`` drops one early (a client went away). Not thread-safe:
    drive it from one thread.
    """

    def __init__(self, engine: Engine, max_batch: int, max_len: int | None = None) -> None:
        limit = engine.model.config.max_position_embeddings
        max_len = max_len or limit
        if max_batch < 1 or max_len < 1:
            raise ValueError("max_batch and max_len must be >= 1")
        self.engine, self.max_batch, self.max_len = engine, max_batch, max_len
        self._context = limit
        dtype = next(engine.model.parameters()).dtype
        self.cache = KVCache.empty(engine.model.config, max_batch, max_len, engine.device, dtype)
        self._rows: list[_Row | None] = [None] * max_batch
        self._by_id: dict[Hashable, _Row] = {}
        self._new: list[_Row] = []  # added since the last step: prefill next step
        self._view_key: tuple[int, int] | None = None
        self._view: KVCache | None = None
        # Compiled decoding: key positions 0..n-1 are a slice of this, one graph for every n.
        self._key_positions = torch.arange(max_len, device=engine.device)
        if engine.compile:
            engine._mark_dynamic(self.cache)
        engine._collect_pack_sources()

    @property
    def active(self) -> int:
        """Sequences in the session (waiting for prefill or decoding)."""
        return len(self._by_id)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self._by_id)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._by_id

    def add(
        self,
        request_id: Hashable,
        prompt_ids: Sequence[int] | str,
        params: SamplingParams,
        sample_index: int = 0,
    ) -> int:
        """Queue a sequence; returns its slot. It is prefilled, and gets its first token, next ``step``.

        ``sample_index`` picks the random stream (sample j draws ``sample_seed(params.seed, j)``). Raises
        ``ValueError`` for a bad request (empty or too long prompt, an unsupported JSON schema) and
        ``RuntimeError`` when no slot is free.
        """
        params.validate()
        if request_id in self._by_id:
            raise ValueError(f"request {request_id!r} is already in the session")
        prompt = self.engine._encode(prompt_ids)
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        limit = min(self.max_len, self._context)
        if len(prompt) + params.max_new_tokens > limit:
            what = "the model's context" if limit == self._context else "the session's max_len"
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} exceeds"
                f" {what} of {limit} tokens"
            )
        eng = self.engine
        schema = json_schema_of(params.response_format)
        matcher = eng._grammars().matcher(schema) if schema is not None else None
        free = [s for s, r in enumerate(self._rows) if r is None]
        if not free:
            raise RuntimeError(f"no free slot: all {self.max_batch} are in use")
        slot = free[0]  # the lowest, so running slots stay packed at the front of the cache
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=eng.device)
            base = params.seed if params.seed is not None else secrets.randbelow(2**31)
            gen.manual_seed(sample_seed(base, sample_index))
        stop_ids = frozenset(params.stop_token_ids if params.stop_token_ids is not None else eng.end_ids)
        adjust = None
        if params.adjusts_logits:
            bias = params.logit_bias or {}
            if any(t >= eng.vocab_size for t in bias):
                raise ValueError(f"logit_bias: token ids must be below the vocabulary size {eng.vocab_size}")
            with torch.inference_mode():  # as the session's other tensors
                adjust = torch.zeros(eng.vocab_size, device=eng.device)
                if bias:
                    ids = torch.tensor(list(bias), device=eng.device)
                    adjust[ids] = torch.tensor([float(b) for b in bias.values()], device=eng.device)
        row = _Row(
            request_id,
            slot,
            prompt,
            params,
            sample_index,
            stop_ids,
            _Detokenizer(eng._token_bytes(), eng.tokenizer),
            matcher,
            gen,
            adjust,
        )
        self._rows[slot] = row
        self._by_id[request_id] = row
        self._new.append(row)
        return slot

    def remove(self, request_id: Hashable) -> bool:
        """Drop a sequence and free its slot; False if it is not here (already finished or removed)."""
        row = self._by_id.pop(request_id, None)
        if row is None:
            return False
        self._free(row)
        if row in self._new:
            self._new.remove(row)
        return True

    def _free(self, row: _Row) -> None:
        self._rows[row.slot] = None
        with torch.inference_mode():  # the cache was made in inference mode
            self.cache.lengths[row.slot] = 0

    def _cache_view(self, lo: int, hi: int) -> KVCache:
        """Slots lo..hi-1 as a KVCache whose tensors are views: the model writes through to ours."""
        if self._view_key != (lo, hi):
            c = self.cache
            self._view = KVCache([k[lo:hi] for k in c.k], [v[lo:hi] for v in c.v], c.lengths[lo:hi])
            self._view_key = (lo, hi)
        assert self._view is not None
        return self._view

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One forward pass per group (new prompts, running sequences) and one token per sequence."""
        eng = self.engine
        events: list[TokenEvent] = []
        new, self._new = self._new, []
        for row in [r for r in new if r.params.max_new_tokens == 0]:  # nothing to generate
            new.remove(row)
            events.append(self._finish(row, None, "length", ""))
        running = [r for r in self._rows if r is not None and r.pending is not None]
        rows: list[_Row] = []
        parts: list[torch.Tensor] = []
        with eng._autocast():
            if running:
                parts.append(self._decode(running))
                rows += running
            if new:
                # Prompts prefill in runs of adjacent slots (one forward per run), so nothing else moves.
                new.sort(key=lambda r: r.slot)
                start = 0
                for i in range(1, len(new) + 1):
                    if i == len(new) or new[i].slot != new[i - 1].slot + 1:
                        parts.append(self._prefill(new[start:i]))
                        rows += new[start:i]
                        start = i
        if not rows:
            return events
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        tokens, lps, tops = eng._choose(logits.float(), rows)
        for row, t, lp, top in zip(rows, tokens, lps, tops):
            events.append(self._advance(row, t, lp, top))
        return events

    def warmup(self) -> None:
        """Build the compiled decode step now rather than on the first request (no-op when eager).

        Runs one step over the free slots at position 0 (what it writes there is overwritten by the next
        prefill); every slot must be free."""
        if self.engine.compile and self.active == 0 and self.max_len >= 2:
            with torch.inference_mode(), self.engine._autocast():
                ids = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.engine.device)
                self.engine._decode_step(
                    ids, self.cache, self.cache.lengths[:, None], self._key_positions[:2]
                )

    def _decode(self, running: list[_Row]) -> torch.Tensor:
        """Feed each running row its pending token; logits [len(running), V] in ``running`` order."""
        for r in running:
            r.length += 1
        if self.engine.compile or self.engine.pack_weights:
            return self._decode_fixed(running)
        lo, hi = running[0].slot, running[-1].slot + 1
        view = self._cache_view(lo, hi)
        if hi - lo == len(running):
            ids = torch.tensor([[r.pending] for r in running], device=self.engine.device)
            logits = self.engine.model(ids, cache=view)[:, -1]
            view.lengths += 1
            return logits
        # Gaps (free or just-added slots) ride along with a dummy token; their lengths do not move, so
        # what it writes is overwritten later. Cheaper than a copy-out / copy-in of the running rows.
        flat = [0] * (hi - lo)
        for r in running:
            flat[r.slot - lo] = r.pending
        ids = torch.tensor(flat, device=self.engine.device)[:, None]
        idx = torch.tensor([r.slot - lo for r in running], device=self.engine.device)
        logits = self.engine.model(ids, cache=view)[idx, -1]
        view.lengths[idx] += 1
        return logits

    def _decode_fixed(self, running: list[_Row]) -> torch.Tensor:
        """``GPT.decode_step`` over slots lo..hi-1, where free slots in between ride along with a dummy
        token at their length 0 (overwritten later); keys 0..n-1 with n from the host-side lengths, so
        nothing is read back from the tensors. Compiled, every slot takes part, so the batch shape never
        changes; eager, only the span of the running slots."""
        eng = self.engine
        lo, hi = (0, self.max_batch) if eng.compile else (running[0].slot, running[-1].slot + 1)
        c = self.cache if hi - lo == self.max_batch else self._cache_view(lo, hi)
        flat = [0] * (hi - lo)
        for r in running:
            flat[r.slot - lo] = r.pending
        # From numpy: ~4x cheaper than torch.tensor(list), a few us of every step.
        ids = torch.from_numpy(np.array(flat, dtype=np.int64)[:, None]).to(eng.device)
        n = max(r.length for r in running)  # lengths already count the token being fed
        logits = eng._decode_step(ids, c, c.lengths[:, None], self._key_positions[:n])
        if len(running) == hi - lo:
            c.lengths += 1
            return logits
        idx = torch.tensor([r.slot - lo for r in running], device=eng.device)
        c.lengths[idx] += 1
        return logits[idx]

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """Prompts of adjacent slots, right-padded; only each row's last position goes through the head."""
        eng = self.engine
        lens = [len(r.prompt) for r in rows]
        ids = torch.full((len(rows), max(lens)), eng.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : lens[b]] = torch.tensor(r.prompt)
        view = self._cache_view(rows[0].slot, rows[-1].slot + 1)
        for r, n in zip(rows, lens):
            r.length = n
        h = eng.model.hidden_states(ids.to(eng.device), cache=view)
        lens_t = torch.tensor(lens, device=eng.device)
        view.lengths += lens_t
        return eng.model.lm_head(h[torch.arange(len(rows), device=eng.device), lens_t - 1])

    def _advance(
        self, row: _Row, t: int, lp: float | None, top: list[tuple[int, float]] | None
    ) -> TokenEvent:
        p = row.params
        m = row.matcher
        # A constrained row ends only where its grammar allows an end token (the mask saw to that).
        if t in (self.engine._grammars().eos_ids if m is not None else row.stop_ids):
            return self._finish(row, None, "stop", "")
        if row.adjust is not None and (p.frequency_penalty or p.presence_penalty):
            # OpenAI's penalties: frequency per earlier occurrence, presence once per distinct token.
            first = bool(p.presence_penalty) and t not in row.seen  # a set: `in row.tokens` scanned them all
            if p.presence_penalty:
                row.seen.add(t)
            row.adjust[t] -= p.frequency_penalty + (p.presence_penalty if first else 0.0)
        row.tokens.append(t)
        if p.wants_logprobs:
            row.lps.append(lp)  # type: ignore[arg-type]
            if p.top_logprobs:
                row.tops.append(top)  # type: ignore[arg-type]
        complete = False
        if m is not None:
            m.consume_token(t)
            complete = m.is_stopped()  # the JSON value is closed: nothing but an end token may follow
        text, hit = row.feed_text(row.detok.push(t))
        if hit or complete:
            return self._finish(row, t, "stop", text, lp, top, flush=not hit)
        if len(row.tokens) >= p.max_new_tokens:
            return self._finish(row, t, "length", text, lp, top)
        row.pending = t
        if text:
            row.texts.append(text)
        return TokenEvent(row.request_id, t, text, lp, top)

    def _finish(
        self,
        row: _Row,
        t: int | None,
        reason: str,
        text: str,
        lp: float | None = None,
        top: list[tuple[int, float]] | None = None,
        flush: bool = True,
    ) -> TokenEvent:
        if flush:  # not cut by a stop string: what was held back or sits in the decoder belongs to it
            text += row.held + row.detok.flush()
            row.held = ""
        if text:
            row.texts.append(text)
        self._by_id.pop(row.request_id, None)
        self._free(row)
        return TokenEvent(row.request_id, t, text, lp, top, True, reason, row.completion(reason))


_TINY = torch.finfo(torch.float32).tiny  # the smallest temperature a sampling step divides by
_VERSION = operator.attrgetter("_version")  # a C-level loop over the parameters: 4x cheaper than a genexpr


class Engine:
    """Generation over ``model``. ``compile=True`` runs decode steps through one ``torch.compile``d
    fixed-shape step (``GPT.decode_step``) that reads the live weights (no frozen copy, so RL rollouts
    see every update): faster per token once built, at a one-off build cost of seconds to a minute
    (inductor caches it on disk); see ``bench/decode.py``. Greedy output equals the eager path's. Graphs
    are built per model: one for batch 1, one for any larger session width; any ``max_len`` and key
    count reuse them. On CPU (``matvec``, default on when compiled) the batch-1 graph runs every linear
    layer and attention as multiply-and-sum loops that inductor fuses (``model.matvec``,
    ``model.attend_one``): they stream the live weights at about the memory bandwidth, 1.3-1.4x the MKL
    step on one thread, and need no packed copy.

    ``pack_weights`` (eager and compiled; default: on for a CPU model, where it was measured, off
    elsewhere) decodes through ``DecodeWeights``: a copy of the linear weights transposed to [in, out] with
    Q/K/V and gate/up fused, 14-24% less time per step at batch 1-8, for the memory of one more copy of the
    linear weights (``packed_bytes``; 21 MB on S, 135 MB on M in fp32). The copy is rebuilt before the
    next step whenever a weight changed: in place (an optimizer step, ``load_state_dict``; seen through
    the parameters' version counters) or replaced by a new Parameter object (seen when a session starts);
    ``refresh_weights()`` forces it for anything else (a write through ``.data``, an inference-mode
    parameter changed in place)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        compile: bool = False,
        cpp_wrapper: bool = True,
        pack_weights: bool | None = None,
        matvec: bool | None = None,
    ) -> None:
        self.model = model.eval()
        self.compile = compile
        self.device = next(model.parameters()).device
        self.pack_weights = self.device.type == "cpu" if pack_weights is None else pack_weights
        # Compiled batch-1 steps on CPU run their linear layers as inductor's streaming dot products over
        # the live weights (model.matvec): ~1.5x MKL's matrix-vector products, and no packed copy.
        self.matvec = compile and self.device.type == "cpu" if matvec is None else matvec and compile
        self._packed: DecodeWeights | None = None
        self._pack_sources: list[torch.Tensor] = []
        self._pack_versioned: list[torch.Tensor] = []
        self._packed_key: tuple[int, ...] | None = None
        # inductor's C++ wrapper replaces the per-step Python glue of the compiled graph (views, size
        # checks): 6-25% less CPU per step on S/M, for a longer build (~25-40 s vs ~7 s, cached on disk).
        self.cpp_wrapper = cpp_wrapper
        self._compiled: Any = None
        self.tokenizer = tokenizer
        self.vocab_size = model.config.vocab_size
        self.end_ids = [tokenizer.im_end_id, tokenizer.eos_id]  # what ends a sequence unless told else
        self.pad_id = getattr(tokenizer, "pad_id", 0)
        self._bytes: list[bytes] | bool | None = False  # False = not built yet
        self._grammar: _Grammars | None = None

    @property
    def packed_bytes(self) -> int:
        """Memory held by the decode copy of the weights (0 until the first decode step, or when off)."""
        return self._packed.nbytes if self._packed is not None else 0

    def refresh_weights(self) -> None:
        """Rebuild the decode copy of the weights before the next step (changes its checks cannot see)."""
        self._packed, self._packed_key = None, None
        self._collect_pack_sources()

    def _collect_pack_sources(self) -> None:
        """The parameters the decode copy is built from; walked once per session (walking the module
        tree every step would cost ~0.3 ms on M), and a replaced Parameter object drops the copy."""
        if not self.pack_weights:
            return
        ps: list[torch.Tensor] = [self.model.lm_head.weight]
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                ps += [lin.weight] if lin.bias is None else [lin.weight, lin.bias]
        if len(ps) != len(self._pack_sources) or any(a is not b for a, b in zip(ps, self._pack_sources)):
            self._pack_sources, self._packed, self._packed_key = ps, None, None
            # Inference tensors have no version counter: an in-place change to one needs refresh_weights().
            self._pack_versioned = [p for p in ps if not p.is_inference()]

    def _decode_weights(self) -> DecodeWeights | None:
        """The decode copy of the weights, rebuilt first if any source changed since it was built: an
        in-place update bumps a tensor's version counter, a new storage moves its data pointer. ~10 us per
        step on M."""
        if not self.pack_weights:
            return None
        key = (*map(_VERSION, self._pack_versioned), *map(torch.Tensor.data_ptr, self._pack_sources))
        if key != self._packed_key or self._packed is None:
            self._packed = None  # let the stale copy go first: never two copies at once
            self._packed = DecodeWeights.pack(self.model)
            self._packed_key = key
        return self._packed

    def _decode_step(
        self, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor, key_positions: torch.Tensor
    ) -> torch.Tensor:
        """``model.decode_step``, through ``torch.compile`` when on; the key count (and the batch, past 1)
        is a dynamic size, so one graph serves every step of every session of a model and batch kind."""
        by_rows = self.matvec and ids.shape[0] == 1
        packed = None if by_rows else self._decode_weights()
        if not self.compile:
            return self.model.decode_step(ids, cache, positions, key_positions, packed)
        import torch._dynamo as dynamo  # loaded by torch.compile anyway

        if self._compiled is None:
            # Each model is one cache entry of the shared code object (two: batch 1 and batch > 1); the
            # default limit of 8 is few for a server with several versions.
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
            self._compiled = torch.compile(
                self.model.decode_step,
                fullgraph=True,
                dynamic=False,
                options={"cpp_wrapper": self.cpp_wrapper},
            )
        dynamo.mark_dynamic(key_positions, 0)
        if ids.shape[0] > 1:
            dynamo.mark_dynamic(ids, 0)
            dynamo.mark_dynamic(positions, 0)
        return self._compiled(ids, cache, positions, key_positions, packed, by_rows)

    @staticmethod
    def _mark_dynamic(cache: KVCache) -> None:
        """The cache's length (and its batch, past 1) are dynamic sizes of the compiled step, so sessions
        of any ``max_len`` and width > 1 share one graph instead of a build each."""
        import torch._dynamo as dynamo

        for t in (*cache.k, *cache.v):
            if t.shape[2] > 1:
                dynamo.mark_dynamic(t, 2)
            if t.shape[0] > 1:
                dynamo.mark_dynamic(t, 0)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and next(self.model.parameters()).dtype == torch.float32:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _token_bytes(self) -> list[bytes] | None:
        if self._bytes is False:
            self._bytes = token_bytes_table(self.tokenizer, self.vocab_size)
        return self._bytes  # type: ignore[return-value]

    def _grammars(self) -> _Grammars:
        if self._grammar is None:  # built on first use: ~0.1 s for a 16k vocabulary
            self._grammar = _Grammars(self.tokenizer, self.vocab_size, self.end_ids)
        return self._grammar

    def start(self, max_batch: int, max_len: int | None = None) -> EngineSession:
        """A session with ``max_batch`` slots of ``max_len`` tokens (default: the model's context)."""
        with torch.inference_mode():
            return EngineSession(self, max_batch, max_len)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | None = None,
        seed_offsets: Sequence[int] | None = None,
    ) -> list[Completion]:
        """``params.n`` completions for each prompt, ordered prompt by prompt.

        Prompt i's samples draw from ``sample_seed(params.seed, seed_offsets[i])`` as their seed; the offsets
        default to ``i * n`` so that prompts of one batch draw different random streams (with one shared
        seed, sample j of every prompt would get the same draws: correlated samples, a biased worst-of-n).
        """
        params = params or SamplingParams()
        params.validate()
        encoded = [self._encode(p) for p in prompts]
        if not encoded:
            return []
        self._check_prompts(encoded, params)
        keys = [(i, j) for i in range(len(encoded)) for j in range(params.n)]
        offsets = (
            list(seed_offsets) if seed_offsets is not None else [i * params.n for i in range(len(encoded))]
        )
        if len(offsets) != len(encoded):
            raise ValueError(f"{len(offsets)} seed offsets for {len(encoded)} prompts")
        session = self.start(len(keys), max(map(len, encoded)) + params.max_new_tokens)
        per_prompt = [
            params if params.seed is None else dataclasses.replace(params, seed=sample_seed(params.seed, off))
            for off in offsets
        ]
        for i, j in keys:
            session.add((i, j), encoded[i], per_prompt[i], sample_index=j)
        done: dict[Hashable, Completion] = {}
        while session.active:
            for ev in session.step():
                if ev.completion is not None:
                    done[ev.request_id] = ev.completion
        return [dataclasses.replace(done[(i, j)], prompt_index=i) for i, j in keys]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas for one completion as they are decoded."""
        for ev in self.stream_events(prompt, params):
            if ev.text:
                yield ev.text

    def stream_events(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> Iterator[TokenEvent]:
        """Every :class:`TokenEvent` of one completion; the last one carries the ``Completion``."""
        params = params or SamplingParams()
        params.validate()
        ids = self._encode(prompt)
        self._check_prompts([ids], params)
        session = self.start(1, len(ids) + params.max_new_tokens)
        session.add(0, ids, params)
        while session.active:
            yield from session.step()

    def _check_prompts(self, prompts: list[list[int]], p: SamplingParams) -> None:
        if min(map(len, prompts)) == 0:
            raise ValueError("empty prompt: give at least one token")
        limit = self.model.config.max_position_embeddings
        longest = max(map(len, prompts))
        if longest + p.max_new_tokens > limit:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {p.max_new_tokens} exceeds the model's"
                f" context of {limit} tokens"
            )

    # ---------------------------------------------------------------- choosing tokens

    def _choose(
        self, logits: torch.Tensor, rows: list[_Row]
    ) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
        """Next token of each row (one row of ``logits`` each), with logprobs where asked."""
        n = len(rows)
        if (
            logits.device.type == "cpu"
            and logits.dtype == torch.float32
            and all(
                r.params.temperature == 0
                and not r.params.wants_logprobs
                and r.matcher is None
                and r.adjust is None
                for r in rows
            )
        ):  # plain greedy on CPU (the common eval / bench case): numpy's argmax, nothing else
            return logits.numpy().argmax(-1).tolist(), [None] * n, [None] * n
        lp_rows = [i for i, r in enumerate(rows) if r.params.wants_logprobs]
        logp = None
        if lp_rows:  # the model's own distribution, before masks and temperature
            sel = logits if len(lp_rows) == n else logits[lp_rows]
            logp = torch.log_softmax(sel, dim=-1)
        adj = [i for i, r in enumerate(rows) if r.adjust is not None]
        if adj:  # logit_bias and penalties: after the logprobs, before the grammar mask (which wins)
            logits = logits.clone()
            at = torch.tensor(adj, device=logits.device)
            logits[at] += torch.stack([rows[i].adjust for i in adj])  # type: ignore[misc]
        con = [i for i, r in enumerate(rows) if r.matcher is not None]
        if con:
            logits = self._apply_grammar(logits, [rows[i] for i in con], con)
        first = rows[0].params
        if all(
            r.params.temperature == first.temperature
            and r.params.top_k == first.top_k
            and r.params.top_p == first.top_p
            for r in rows
        ):
            nxt = self._sample(logits, first, [r.gen for r in rows])
        else:  # mixed settings: sample each group of equal settings together
            nxt = torch.empty(n, dtype=torch.long, device=logits.device)
            groups: dict[tuple[float, int, float], list[int]] = {}
            for i, r in enumerate(rows):
                groups.setdefault((r.params.temperature, r.params.top_k, r.params.top_p), []).append(i)
            for members in groups.values():
                idx = torch.tensor(members, device=logits.device)
                p = rows[members[0]].params
                nxt[idx] = self._sample(logits[idx], p, [rows[i].gen for i in members])
        tokens: list[int] = nxt.tolist()  # the one device->host sync of the step
        lps: list[float | None] = [None] * n
        tops: list[list[tuple[int, float]] | None] = [None] * n
        if logp is not None:
            chosen = nxt if len(lp_rows) == n else nxt[lp_rows]
            picked = logp.gather(-1, chosen[:, None])[:, 0].tolist()
            k = min(max(rows[i].params.top_logprobs for i in lp_rows), logp.shape[-1])
            if k:
                vals, ids = torch.topk(logp, k, dim=-1)
                vals_l, ids_l = vals.tolist(), ids.tolist()
            for j, i in enumerate(lp_rows):
                lps[i] = picked[j]
                kr = rows[i].params.top_logprobs
                if kr:
                    tops[i] = list(zip(ids_l[j][:kr], vals_l[j][:kr]))
        return tokens, lps, tops

    def _apply_grammar(self, logits: torch.Tensor, rows: list[_Row], at: list[int]) -> torch.Tensor:
        """-inf wherever the row's grammar forbids the token."""
        V = logits.shape[-1]
        words = (V + 31) // 32
        bitmask = np.empty((len(rows), words), dtype=np.int32)
        for j, r in enumerate(rows):
            # llguidance writes the row's bitmask straight into our buffer (it releases the GIL).
            r.matcher.unsafe_compute_mask_ptr(bitmask[j].ctypes.data, words * 4)
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :V]
        dead = ~allowed.any(axis=1)
        if dead.any():  # a grammar with no way on (should not happen): let the row end
            allowed[np.ix_(dead, sorted(self._grammars().eos_ids))] = 1
        forbid = torch.from_numpy(allowed == 0).to(logits.device)
        if len(at) == logits.shape[0]:
            return logits.masked_fill(forbid, float("-inf"))
        logits = logits.clone()
        idx = torch.tensor(at, device=logits.device)
        logits[idx] = logits[idx].masked_fill(forbid, float("-inf"))
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, gens: list[torch.Generator | None]) -> torch.Tensor:
        if p.temperature == 0:
            if logits.device.type == "cpu" and logits.dtype == torch.float32:
                # numpy's SIMD argmax: ~20x faster than torch's on CPU (~45 us of a ~3 ms S step at batch
                # 1, ~0.2 ms at batch 8); both return the first index of the maximum.
                return torch.from_numpy(logits.numpy().argmax(-1))
            return logits.argmax(-1)
        # Shifted so the best logit is 0, and never divided by less than float32's smallest normal: a
        # tiny temperature (1e-50 passes validation, and is 0 in float32) made the logits inf/NaN and the
        # draw an index past the vocabulary. Now the others just go to -inf: greedy, as the limit is.
        scaled = (logits - logits.amax(-1, keepdim=True)) / max(p.temperature, _TINY)
        probs = filter_logits(scaled, p.top_k, p.top_p).softmax(-1)
        # Inverse CDF with one uniform per row from the row's own generator, so a row's samples do not
        # depend on who else is in the batch; ~15x cheaper on CPU than torch.multinomial row by row.
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in gens])
        cdf = probs.cumsum(-1)
        total = cdf[:, -1]
        # Strictly below the total, so with right=True a zero-probability token can never be hit.
        x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, x[:, None], right=True)[:, 0]
