"""Load test: concurrent streaming clients against ``chatforge serve`` vs sequential transformers ``generate``.

A real ``chatforge serve`` runs in its own process (so the clients never share its GIL) on a loopback port,
over a checkpoint: by default the S shape of ``bench/shapes.py`` with random weights saved by
``save_model`` (tokenizer: the shape's full-vocabulary BPE from ``bench/decode.py``), or ``--model DIR``.
For each concurrency level C, C clients each stream ``--rounds`` chat completions back to back (same
prompt length, ``max_tokens`` each, temperature 1, a per-request seed), bounded by ``--time-limit``
seconds per level (no new request starts after it) and a per-request timeout. While the largest level
runs, ``--votes`` compare-mode votes are posted to ``/ui/votes`` by a few concurrent posters; afterwards
the rows in the server's SQLite file are counted, so a lost vote shows up as ``votes.lost > 0``.

The baseline is transformers ``generate`` on the same weights (``AutoModelForCausalLM`` from the same
directory), one request at a time, same prompts, sampling at temperature 1, exactly ``max_tokens`` new
tokens (end tokens ignored). Time to first token is stamped by a ``StoppingCriteria`` (called once per
new token); ours is the first SSE chunk that carries content, measured by the client.

Prints JSON: per level ``errors``, ``ttft_p50_s`` / ``ttft_p99_s``, ``latency_p50_s`` / ``latency_p99_s``,
aggregate ``tokens_per_s`` (completion tokens from ``usage`` / the level's wall time), the server's mean
batch size per model step (from ``/metrics``); the baseline's same figures; ``speedup_tokens_per_s`` of
each level over the baseline (the issue aims for >= 5x at 32); and the vote check.

    .venv/bin/python bench/serve.py                                  # S, C = 1 8 32, ~3 min on 2 cores
    .venv/bin/python bench/serve.py --concurrency 1 8 --rounds 1 --max-tokens 16 --hf-requests 2
    .venv/bin/python bench/serve.py --model runs/cpu-demo/sft --out /tmp/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from shapes import SHAPES, machine_info, model_config

SEED = 1234
ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["clocks", "rivers", "the moon", "bread", "maps", "owls", "glass", "trains"]


def messages(i: int) -> list[dict[str, str]]:
    # Same token count for every i would be ideal; one short topic word keeps lengths within a few tokens.
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"Tell me a short story about {TOPICS[i % len(TOPICS)]}."},
    ]


def build_model(shape_name: str, dest: Path) -> Path:
    from chatforge.checkpoint import save_model
    from chatforge.model import GPT
    from decode import _tokenizer  # the shape's full-vocabulary BPE, shared with the decode bench

    shape = SHAPES[shape_name]
    tok = _tokenizer(shape["vocab"])
    torch.manual_seed(SEED)
    return save_model(GPT(model_config(shape)), dest, tokenizer=tok)


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if xs else None


# ---------------------------------------------------------------- the baseline


def transformers_sequential(model_dir: Path, n: int, max_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stamps: list[float] = []

    class Clock(StoppingCriteria):  # called once per generated token
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def one(i: int) -> tuple[float, float, int]:
        ids = torch.tensor([tok.encode_chat_prompt(messages(i))])
        stamps.clear()
        torch.manual_seed(SEED + i)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                eos_token_id=None,
                pad_token_id=tok.pad_id,
                stopping_criteria=StoppingCriteriaList([Clock()]),
            )
        total = time.perf_counter() - t0
        return total, stamps[0] - t0, out.shape[1] - ids.shape[1]

    one(0)  # warm-up, untimed
    t0 = time.perf_counter()
    res = [one(i) for i in range(n)]
    wall = time.perf_counter() - t0
    return {
        "requests": n,
        "wall_s": round(wall, 3),
        "tokens": sum(r[2] for r in res),
        "tokens_per_s": round(sum(r[2] for r in res) / wall, 1),
        "ttft_p50_s": pct([r[1] for r in res], 50),
        "ttft_p99_s": pct([r[1] for r in res], 99),
        "latency_p50_s": pct([r[0] for r in res], 50),
        "latency_p99_s": pct([r[0] for r in res], 99),
    }


# ---------------------------------------------------------------- the server and its clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, tmp: Path, max_batch: int, max_tokens: int, threads: int
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    cmd = [
        sys.executable,
        "-m",
        "chatforge.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--db-url",
        f"sqlite:///{tmp / 'serve.db'}",
        "--set",
        f"runs_dir={tmp / 'runs'}",
        "--set",
        "serve.rate_limit_rpm=0",
        "--set",
        f"serve.max_tokens={max_tokens}",
        "--set",
        "safety.moderator=none",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"chatforge serve exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("chatforge serve did not come up in 120 s")


async def stream_one(client: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first content, completion tokens); raises on any protocol error."""
    body = {
        "model": "default",
        "messages": messages(i),
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": SEED + i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, done = None, None, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    if not done or tokens is None:
        raise RuntimeError("the stream ended without usage and [DONE]")
    return total, ttft if ttft is not None else total, tokens


def vote_body(i: int) -> dict[str, Any]:
    return {
        "prompt": messages(i),
        "answer_a": f"answer a {i}",
        "answer_b": f"answer b {i}",
        "model_a": "main",
        "model_b": "main",
        "sampling": {"temperature": 1.0},
        "seed_a": i,
        "seed_b": i + 1,
        "a_left": i % 2 == 0,
        "winner": ("a", "b", "tie", "both_bad")[i % 4],
        "rater": f"bench-rater-{i % 5}",
    }


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def level(
    url: str, clients: int, rounds: int, max_tokens: int, time_limit: float, timeout: float, votes: int
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        before = (await client.get("/metrics")).text
        results: list[tuple[float, float, int]] = []
        errors: list[str] = []
        vote_status: list[int] = []
        t0 = time.perf_counter()
        deadline = t0 + time_limit

        async def user(c: int) -> None:
            for r in range(rounds):
                if time.perf_counter() > deadline:
                    return
                try:
                    results.append(await stream_one(client, c * rounds + r, max_tokens))
                except Exception as e:  # every failure is counted, none ends the run
                    errors.append(f"{type(e).__name__}: {e}"[:200])

        async def voter(k: int, share: int) -> None:
            for i in range(share):
                try:
                    vote_status.append(
                        (await client.post("/ui/votes", json=vote_body(k * 1000 + i))).status_code
                    )
                except httpx.HTTPError as e:
                    errors.append(f"vote: {type(e).__name__}: {e}"[:200])
                await asyncio.sleep(0.05)

        posters = min(4, votes)
        await asyncio.gather(
            *[user(c) for c in range(clients)],
            *[voter(k, votes // posters + (k < votes % posters)) for k in range(posters)],
        )
        wall = time.perf_counter() - t0
        after = (await client.get("/metrics")).text
    steps = metric(after, "chatforge_batch_size_count") - metric(before, "chatforge_batch_size_count")
    seqs = metric(after, "chatforge_batch_size_sum") - metric(before, "chatforge_batch_size_sum")
    tokens = sum(r[2] for r in results)
    out: dict[str, Any] = {
        "concurrency": clients,
        "requests": len(results) + len([e for e in errors if not e.startswith("vote")]),
        "completed": len(results),
        "errors": len(errors),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": pct([r[1] for r in results], 50),
        "ttft_p99_s": pct([r[1] for r in results], 99),
        "latency_p50_s": pct([r[0] for r in results], 50),
        "latency_p99_s": pct([r[0] for r in results], 99),
        "model_steps": int(steps),
        "mean_batch": round(seqs / steps, 2) if steps else None,
    }
    if errors:
        out["first_errors"] = errors[:5]
    if votes:
        out["votes_posted"] = len(vote_status)
        out["votes_ok"] = sum(s == 200 for s in vote_status)
    return out


def count_votes(db: Path) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM votes")).scalar_one()
    engine.dispose()
    return int(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: random weights of --shape)")
    ap.add_argument("--shape", default="S", choices=sorted(SHAPES))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hf-requests", type=int, default=4, help="sequential transformers requests")
    ap.add_argument("--votes", type=int, default=64, help="votes posted during the largest level")
    ap.add_argument("--time-limit", type=float, default=180.0, help="seconds per level before no new request")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides (0: torch default)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = Path(a.model) if a.model else build_model(a.shape, tmp / "model")
        out["model"] = a.model or f"random {a.shape}"
        print("transformers baseline...", file=sys.stderr)
        base = transformers_sequential(model, a.hf_requests, a.max_tokens)
        out["transformers_sequential"] = base
        proc, url = start_server(model, tmp, max(a.concurrency), a.max_tokens, a.threads)
        try:
            asyncio.run(level(url, 2, 1, 4, 60, a.timeout, 0))  # warm-up, untimed
            runs = []
            for c in a.concurrency:
                print(f"concurrency {c}...", file=sys.stderr)
                votes = a.votes if c == max(a.concurrency) else 0
                runs.append(
                    asyncio.run(level(url, c, a.rounds, a.max_tokens, a.time_limit, a.timeout, votes))
                )
                print(json.dumps(runs[-1]), file=sys.stderr)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        out["serve"] = runs
        out["speedup_tokens_per_s"] = {
            str(r["concurrency"]): round(r["tokens_per_s"] / base["tokens_per_s"], 2) for r in runs
        }
        posted = sum(r.get("votes_ok", 0) for r in runs)
        rows = count_votes(tmp / "serve.db")
        out["votes"] = {"posted_ok": posted, "rows_in_db": rows, "lost": posted - rows}
        out["errors"] = sum(r["errors"] for r in runs)
    out["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
