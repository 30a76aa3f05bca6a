"""The one generation engine: batched prefill and decode over the KV cache, with sampling controls.

Sequences of different lengths share each forward pass: every row of the batch is a cache slot with its
own length, so the prompt is never recomputed during decode. The chat REPL, evals, RL rollouts and the
server all generate through ``Engine``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chatforge.model import GPT, KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    n: int = 1  # samples per prompt
    seed: int | None = None  # per-sample generators: sample j of prompt i uses seed + j
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None = the tokenizer's end markers
    logprobs: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0 or self.n < 1:
            raise ValueError("top_k must be >= 0 and n >= 1")


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None


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


class Engine:
    def __init__(self, model: GPT, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and next(self.model.parameters()).dtype == torch.float32:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
    ) -> list[Completion]:
        """``params.n`` completions for each prompt, ordered prompt by prompt."""
        params = params or SamplingParams()
        params.validate()
        rows = [(i, j, self._encode(p)) for i, p in enumerate(prompts) for j in range(params.n)]
        out = [ev for ev in self._decode_rows(rows, params) if isinstance(ev, Completion)]
        return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))

    @torch.no_grad()
    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas for one completion as they are decoded."""
        params = params or SamplingParams()
        params.validate()
        for ev in self._decode_rows([(0, 0, self._encode(prompt))], params):
            if isinstance(ev, tuple):
                yield ev[1]

    def _decode_rows(
        self,
        rows: list[tuple[int, int, list[int]]],
        p: SamplingParams,
    ) -> Iterator[Completion | tuple[int, str]]:
        """Decode all rows together; yields ``(row, text_delta)`` as text appears, then the Completions."""
        model, tok, dev = self.model, self.tokenizer, self.device
        B = len(rows)
        lens = [len(r[2]) for r in rows]
        if min(lens) == 0:
            raise ValueError("empty prompt: give at least one token")
        limit = model.config.max_position_embeddings
        if max(lens) + p.max_new_tokens > limit:
            raise ValueError(
                f"prompt of {max(lens)} tokens + max_new_tokens {p.max_new_tokens} exceeds the model's"
                f" context of {limit} tokens"
            )
        stop_ids = set(p.stop_token_ids if p.stop_token_ids is not None else [tok.im_end_id, tok.eos_id])
        dtype = next(model.parameters()).dtype
        cache = KVCache.empty(model.config, B, max(lens) + p.max_new_tokens, dev, dtype)
        gens = []
        for _, j, _ in rows:
            g = torch.Generator(device=dev)
            g.manual_seed((p.seed if p.seed is not None else torch.seed() % 2**31) + j)
            gens.append(g)
        # Prefill, right-padded; only each row's last real position goes through the output head.
        ids = torch.full((B, max(lens)), tok.pad_id, dtype=torch.long)
        for b, (_, _, t) in enumerate(rows):
            ids[b, : len(t)] = torch.tensor(t)
        ids = ids.to(dev)
        lens_t = torch.tensor(lens, device=dev)
        with self._autocast():
            h = model.hidden_states(ids, cache=cache)
            logits = model.lm_head(h[torch.arange(B, device=dev), lens_t - 1]).float()
        cache.lengths += lens_t
        generated: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        texts = [""] * B
        done = [p.max_new_tokens == 0] * B
        reasons = ["length"] * B
        for _step in range(p.max_new_tokens):
            nxt, lp = self._sample(logits, p, gens)
            for b in range(B):
                if done[b]:
                    continue
                t = int(nxt[b])
                if t in stop_ids:
                    done[b], reasons[b] = True, "stop"
                    continue
                generated[b].append(t)
                if p.logprobs:
                    lps[b].append(float(lp[b]))
                text = tok.decode(generated[b])
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
                    continue
                hit = min((text.find(s) for s in p.stop if s and s in text), default=-1)
                if hit >= 0:
                    text, done[b], reasons[b] = text[:hit], True, "stop"
                if len(text) > len(texts[b]):
                    yield (b, text[len(texts[b]) :])
                texts[b] = text
                if len(generated[b]) >= p.max_new_tokens:
                    done[b] = True
            if all(done):
                break
            with self._autocast():
                logits = model(nxt[:, None], cache=cache)[:, -1].float()
            cache.lengths += 1
        for b, (i, j, _) in enumerate(rows):
            if not texts[b] or reasons[b] == "length":
                texts[b] = texts[b] or tok.decode(generated[b])
            yield Completion(i, j, generated[b], texts[b], reasons[b], lps[b] if p.logprobs else None)

    @staticmethod
    def _sample(
        logits: torch.Tensor, p: SamplingParams, gens: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(logits, dim=-1)
        if p.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits / p.temperature, p.top_k, p.top_p).softmax(-1)
            nxt = torch.stack(
                [torch.multinomial(probs[b], 1, generator=gens[b])[0] for b in range(len(gens))]
            )
        return nxt, logp.gather(-1, nxt[:, None])[:, 0]
