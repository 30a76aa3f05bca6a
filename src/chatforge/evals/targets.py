"""What an eval runs against: one of our checkpoints (in-process, batched through the one engine) or any
OpenAI-compatible HTTP endpoint (ours from ``chatforge serve``, vLLM, OpenAI itself).

Both answer the same two questions:
- ``generate(inputs, params)``: ``params.n`` replies per input (a message list, or a raw prompt string);
  sample j of input i draws the same random stream on both (``engine.sample_seed`` of input i's stream
  i * n, then of sample j: every input its own), so the same seeds give the same samples in-process and
  through our server;
- ``choice_logprobs(prompts, choices)``: (sum of log-probabilities, token count) of each choice after its
  prompt, for multiple choice without generation. Endpoints answer it through ``/v1/completions`` with
  ``echo`` + ``logprobs`` and ``max_tokens: 0``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from chatforge.engine import Engine, SamplingParams, sample_seed
from chatforge.errors import ChatforgeError

Input = list[dict] | str  # a conversation (chat template applied) or a raw prompt


class Target(Protocol):
    name: str

    def generate(self, inputs: Sequence[Input], params: SamplingParams) -> list[list[str]]: ...

    def choice_logprobs(
        self, prompts: Sequence[Input], choices: Sequence[Sequence[str]]
    ) -> list[list[tuple[float, int]]]: ...


def render_chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Our chat format as text (what the tokenizer's template renders), for completion-style endpoints."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class CheckpointTarget:
    """A checkpoint directory (or a ready Engine, e.g. the model being trained) in this process."""

    def __init__(self, source: str | Path | Engine, batch_size: int = 64, name: str | None = None) -> None:
        if isinstance(source, Engine):
            self.engine = source
            self.name = name or "in-training"
        else:
            from chatforge.sample import load_engine

            p = Path(source)
            if not (p / "config.json").is_file():
                raise ChatforgeError(f"{p}: not a checkpoint directory (no config.json)")
            self.engine = load_engine(p)
            self.name = name or p.name
        self.batch_size = batch_size
        self.too_long = 0  # prompts that did not fit the context with room for the reply (scored as failures)

    def _ids(self, x: Input, add_generation_prompt: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        if isinstance(x, str):
            return tok.encode(x)
        return tok.encode_chat_prompt(x, add_generation_prompt=add_generation_prompt)

    def generate(self, inputs: Sequence[Input], params: SamplingParams) -> list[list[str]]:
        prompts = [self._ids(x) for x in inputs]
        limit = self.engine.model.config.max_position_embeddings - params.max_new_tokens
        replies: list[list[str]] = [[] for _ in inputs]
        fits = [i for i, p in enumerate(prompts) if 0 < len(p) <= limit]
        for i in set(range(len(inputs))) - set(fits):  # too long for the context: scored as failures
            replies[i] = [""] * params.n
        self.too_long += len(inputs) - len(fits)
        step = max(1, self.batch_size // params.n)
        try:
            for s in range(0, len(fits), step):
                chunk = fits[s : s + step]
                offsets = [i * params.n for i in chunk]
                for c in self.engine.generate([prompts[i] for i in chunk], params, seed_offsets=offsets):
                    replies[chunk[c.prompt_index]].append(c.text.strip())
        except ValueError as e:
            raise ChatforgeError(f"eval: {e}") from None
        return replies

    @torch.no_grad()
    def choice_logprobs(
        self, prompts: Sequence[Input], choices: Sequence[Sequence[str]]
    ) -> list[list[tuple[float, int]]]:
        """All (prompt + choice) sequences of a chunk padded into one batch: one forward pass per chunk."""
        model = self.engine.model
        tok = self.engine.tokenizer
        ctx = model.config.max_position_embeddings
        seqs: list[tuple[int, int, list[int], int]] = []  # (item, choice, ids, where the choice starts)
        for i, (p, cs) in enumerate(zip(prompts, choices, strict=True)):
            prefix = self._ids(p)
            text = p if isinstance(p, str) else None
            for j, c in enumerate(cs):
                # Tokenize prompt + choice together (as an endpoint does) when that keeps the prompt's ids.
                joint = tok.encode(text + c) if text is not None else None
                if joint is not None and joint[: len(prefix)] == prefix and len(joint) > len(prefix):
                    ids = joint
                else:
                    ids = prefix + tok.encode(c)
                n_choice = len(ids) - len(prefix)
                ids = ids[-ctx:]  # too long: keep the choice, drop the prompt's oldest tokens
                seqs.append((i, j, ids, max(1, len(ids) - n_choice)))
        out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(cs) for cs in choices]
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))  # similar lengths pad less
        dev = self.engine.device
        for s in range(0, len(order), self.batch_size):
            chunk = [seqs[k] for k in order[s : s + self.batch_size]]
            T = max(len(c[2]) for c in chunk)
            batch = torch.full((len(chunk), T), self.engine.pad_id, dtype=torch.long)
            for r, (_, _, ids, _) in enumerate(chunk):
                batch[r, : len(ids)] = torch.tensor(ids)
            with self.engine._autocast():
                logp = model(batch.to(dev)).float().log_softmax(-1)
            for r, (i, j, ids, start) in enumerate(chunk):
                tgt = torch.tensor(ids[start:], device=dev)
                lp = logp[r, start - 1 : len(ids) - 1].gather(-1, tgt[:, None]).sum()
                out[i][j] = (float(lp), len(ids) - start)
        return out


class EndpointTarget:
    """An OpenAI-compatible server: ``/v1/chat/completions`` for conversations, ``/v1/completions`` for
    raw prompts and choice log-probabilities; ``concurrency`` requests in flight."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 300.0,
        name: str | None = None,
    ) -> None:
        import httpx

        base = endpoint.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.name = name or model
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ChatforgeError(f"--api-key-env: environment variable {api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.concurrency = concurrency
        self.client = httpx.Client(
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        url = self.base + path
        try:
            r = self.client.post(url, json=body)
        except httpx.HTTPError as e:
            raise ChatforgeError(f"{url}: request failed ({e.__class__.__name__}: {e})") from None
        if r.status_code != 200:
            try:
                msg = r.json().get("error", {}).get("message", r.text)
            except ValueError:
                msg = r.text
            raise ChatforgeError(f"{url}: HTTP {r.status_code}: {str(msg)[:300]}")
        return r.json()

    def _one(self, x: Input, params: SamplingParams, i: int, j: int) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": 1,
        }
        if params.top_k:  # not OpenAI's (sent only when set), but ours and vLLM's: else ignored silently
            body["top_k"] = params.top_k
        if params.seed is not None:
            # as CheckpointTarget: input i's seed, then its sample j's (one request per sample: n=1)
            body["seed"] = sample_seed(sample_seed(params.seed, i * params.n), j)
        if params.stop:
            body["stop"] = params.stop
        if params.response_format:
            body["response_format"] = params.response_format
        if isinstance(x, str):
            res = self._post("/completions", {**body, "prompt": x})
            return res["choices"][0]["text"].strip()
        res = self._post("/chat/completions", {**body, "messages": x})
        return (res["choices"][0]["message"].get("content") or "").strip()

    def generate(self, inputs: Sequence[Input], params: SamplingParams) -> list[list[str]]:
        jobs = [(i, j) for i in range(len(inputs)) for j in range(params.n)]
        out: list[list[str]] = [[""] * params.n for _ in inputs]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for (i, j), text in zip(jobs, pool.map(lambda ij: self._one(inputs[ij[0]], params, *ij), jobs)):
                out[i][j] = text
        return out

    def _score(self, prompt: str, choice: str, chat: bool = False) -> tuple[float, int]:
        body = {
            "model": self.model,
            "prompt": prompt + choice,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 0,
            "temperature": 0.0,
        }
        lp = self._post("/completions", body)["choices"][0].get("logprobs") or {}
        offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
        if not offsets or values is None:
            raise ChatforgeError(
                f"{self.base}/completions: no echo logprobs in the reply (needed for choices)"
            )
        if chat and "<|im_start|>" not in (lp.get("tokens") or []):
            # The server read the ChatML markup as plain text (ours does, for text prompts): these would be
            # the log-probabilities of another prompt, not the chat model's, with no sign of it.
            raise ChatforgeError(
                f"{self.base}/completions: the endpoint reads <|im_start|> in a text prompt as plain text, so"
                " choice_logprob items with chat-message inputs cannot be scored through it; give the items"
                " a raw-string input, or evaluate the checkpoint directly (--model DIR)"
            )
        picked = [v for o, v in zip(offsets, values, strict=True) if o >= len(prompt) and v is not None]
        return float(sum(picked)), len(picked)

    def choice_logprobs(
        self, prompts: Sequence[Input], choices: Sequence[Sequence[str]]
    ) -> list[list[tuple[float, int]]]:
        texts = [p if isinstance(p, str) else render_chatml(p) for p in prompts]
        jobs = [(i, j) for i, cs in enumerate(choices) for j in range(len(cs))]
        out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(cs) for cs in choices]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for (i, j), res in zip(
                jobs,
                pool.map(
                    lambda ij: self._score(
                        texts[ij[0]], choices[ij[0]][ij[1]], not isinstance(prompts[ij[0]], str)
                    ),
                    jobs,
                ),
            ):
                out[i][j] = res
        return out


def make_target(
    checkpoint: str | Path | None = None,
    endpoint: str | None = None,
    model: str | None = None,
    api_key_env: str | None = None,
    concurrency: int = 8,
    batch_size: int = 64,
) -> CheckpointTarget | EndpointTarget:
    if endpoint:
        if not model:
            raise ChatforgeError("an endpoint target needs a model name (--model NAME)")
        return EndpointTarget(endpoint, model, api_key_env, concurrency)
    if checkpoint:
        return CheckpointTarget(checkpoint, batch_size)
    raise ChatforgeError(
        "no target: give a checkpoint directory (--model DIR) or --endpoint URL --model NAME"
    )
