"""Generation speed of chatforge's engine against transformers' ``generate`` (greedy, same weights).

For each shape a random GPT is saved with ``save_model`` and loaded back with ``AutoModelForCausalLM``, so
both libraries run the identical weights. Both decode greedily from the same prompts (``prompt_len``
random token ids per row) for exactly ``new_tokens`` tokens (no stop tokens: ours ``stop_token_ids=[]``,
transformers ``eos_token_id=None`` + ``min_new_tokens``). Repeats interleave the two libraries (A B, B A,
...) so a slowdown of the machine hits both, and the JSON reports medians.

- ``prefill_tok_s``: batch × prompt_len / the time of a whole generate call with one new token;
- ``decode_tok_s``: batch × (new_tokens - 1) / the time from the first new token to the last, stamped at
  every step (ours: after each ``EngineSession.step``; transformers: a ``StoppingCriteria`` hook);
- ``e2e_tok_s``: batch × new_tokens / the wall time of the whole generate call;
- ``greedy_match``: the fraction of rows whose generated ids agree between the two libraries (random
  weights have near-ties, so a rare late divergence is float noise, not a bug);
  ``greedy_match_compiled_vs_eager`` the same between our two paths.

Three columns: ``chatforge`` (eager), ``chatforge_compiled`` (``Engine(..., compile=True)``: the
``torch.compile``d fixed-shape decode step; ``compile_warmup_s`` is the first, untimed call of each batch
size, which builds its graph) and ``transformers``. ``--no-compiled`` drops the middle one.

    .venv/bin/python bench/decode.py                        # S and M, batch 1 and 8 (~6 min on 2 cores)
    .venv/bin/python bench/decode.py --shapes S --batches 1 --repeats 3 --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shapes import SHAPES, machine_info, model_config

SEED = 1234


def _tokenizer(vocab: int) -> Any:
    """A byte-level BPE of the shape's full vocabulary, trained on seeded pseudo-words (no download)."""
    from chatforge.tokenizer import train_tokenizer

    rng = random.Random(SEED)
    sylls = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "qu", "ng", "ck"]
    words = ["".join(rng.choices(sylls, k=rng.randint(1, 4))) for _ in range(30_000)]
    texts = [" ".join(rng.choices(words, k=200)) + "." for _ in range(2_000)]
    return train_tokenizer(texts, vocab, min_frequency=1)


def _models(
    shape: dict[str, int], max_len: int, tmp: Path, pack: bool = True, matvec: bool = True
) -> tuple[Any, Any, Any, Any]:
    from transformers import AutoModelForCausalLM

    from chatforge.checkpoint import save_model
    from chatforge.engine import Engine
    from chatforge.model import GPT

    tok = _tokenizer(shape["vocab"])
    cfg = model_config(shape, max_len)
    torch.manual_seed(SEED)
    model = GPT(cfg)
    save_model(model, tmp, tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa").eval()
    eager = Engine(model, tok, pack_weights=pack)
    fast = Engine(model, tok, compile=True, pack_weights=pack, matvec=matvec)
    return eager, fast, hf, tok


def _ours(engine: Any, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, seconds from the first new token to the last, ids) through the step machine —
    exactly what ``Engine.generate`` runs, with a clock read after every step."""
    from chatforge.engine import SamplingParams

    p = SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=[])
    t0 = time.perf_counter()
    session = engine.start(len(prompts), len(prompts[0]) + new)
    for i, ids in enumerate(prompts):
        session.add(i, ids, p)
    stamps: list[float] = []
    out: dict[int, list[int]] = {}
    while session.active:
        for ev in session.step():
            if ev.completion is not None:
                out[ev.request_id] = ev.completion.token_ids
        stamps.append(time.perf_counter())
    return stamps[-1] - t0, stamps[-1] - stamps[0], [out[i] for i in range(len(prompts))]


def _theirs(hf: Any, prompts: list[list[int]], new: int, pad_id: int) -> tuple[float, float, list[list[int]]]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Clock(StoppingCriteria):  # called once per generated token
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=None,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([Clock()]),
        )
    t1 = time.perf_counter()
    return t1 - t0, stamps[-1] - stamps[0], out[:, len(prompts[0]) :].tolist()


def _one(lib: str, engine: Any, hf: Any, pad_id: int, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """One timed prefill-only call and one full call of ``lib``."""
    if lib != "transformers":
        prefill = _ours(engine[lib], prompts, 1)[0]
        wall, decode, ids = _ours(engine[lib], prompts, new)
    else:
        prefill = _theirs(hf, prompts, 1, pad_id)[0]
        wall, decode, ids = _theirs(hf, prompts, new, pad_id)
    return {"prefill_s": prefill, "e2e_s": wall, "decode_s": decode, "ids": ids}


def bench_shape(
    name: str,
    batches: list[int],
    prompt_len: int,
    new: int,
    repeats: int,
    compiled: bool = True,
    pack: bool = True,
    matvec: bool = True,
) -> dict[str, Any]:
    shape = SHAPES[name]
    with tempfile.TemporaryDirectory() as d:
        eager, fast, hf, tok = _models(shape, prompt_len + new, Path(d), pack, matvec)
    engine = {"chatforge": eager, "chatforge_compiled": fast}
    rng = random.Random(SEED)
    libs = ("chatforge", "chatforge_compiled", "transformers") if compiled else ("chatforge", "transformers")
    res: dict[str, Any] = {"shape": shape}
    for B in batches:
        prompts = [[rng.randrange(4, tok.vocab_size) for _ in range(prompt_len)] for _ in range(B)]
        warm: dict[str, float] = {}
        for lib in libs:  # warm-up, untimed (the compiled engine builds its graph here)
            t0 = time.perf_counter()
            _one(lib, engine, hf, tok.pad_id, prompts, new)
            warm[lib] = time.perf_counter() - t0
        runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
        for r in range(repeats):  # rotate the order, so each library runs first, middle and last
            k = r % len(libs)
            for lib in (libs[k:] + libs[:k]) if r % 2 == 0 else (libs[k:] + libs[:k])[::-1]:
                runs[lib].append(_one(lib, engine, hf, tok.pad_id, prompts, new))
        row: dict[str, Any] = {}
        for lib, rs in runs.items():
            pre, dec, e2e = (statistics.median(x[k] for x in rs) for k in ("prefill_s", "decode_s", "e2e_s"))
            row[lib] = {
                "prefill_tok_s": round(B * prompt_len / pre, 1),
                "decode_tok_s": round(B * (new - 1) / dec, 1),
                "e2e_tok_s": round(B * new / e2e, 1),
                "decode_ms_per_step": round(1e3 * dec / (new - 1), 3),
                "decode_ms_per_step_all": [round(1e3 * x["decode_s"] / (new - 1), 3) for x in rs],
            }
        theirs = row["transformers"]
        for lib in libs[:-1]:
            key = "ratio_chatforge_over_transformers" + ("_compiled" if lib == "chatforge_compiled" else "")
            row[key] = {
                k: round(row[lib][k] / theirs[k], 2) for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s")
            }
            # Paired: transformers' decode time / ours for the repeats of one round.
            paired = [t["decode_s"] / o["decode_s"] for o, t in zip(runs[lib], runs["transformers"])]
            row[key]["decode_paired_median"] = round(statistics.median(paired), 2)
            print(f"{name} batch {B} {lib}: {json.dumps(row[key])}", file=sys.stderr)
        same = [a == b for a, b in zip(runs["chatforge"][-1]["ids"], runs["transformers"][-1]["ids"])]
        row["greedy_match"] = sum(same) / B
        if compiled:
            row["chatforge_compiled"]["compile_warmup_s"] = round(warm["chatforge_compiled"], 1)
            last = runs["chatforge_compiled"][-1]["ids"]
            row["greedy_match_compiled"] = (
                sum(a == b for a, b in zip(last, runs["transformers"][-1]["ids"])) / B
            )
            row["greedy_match_compiled_vs_eager"] = (
                sum(a == b for a, b in zip(last, runs["chatforge"][-1]["ids"])) / B
            )
        res[f"batch{B}"] = row
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="S,M")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled engine column")
    ap.add_argument(
        "--no-pack", action="store_true", help="Engine(pack_weights=False): decode nn.Linear weights"
    )
    ap.add_argument(
        "--no-matvec",
        action="store_true",
        help="Engine(matvec=False): the compiled batch-1 step uses MKL matmuls, not inductor's dot loops",
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens,
            "repeats": a.repeats,
            "greedy": True,
            "dtype": "float32",
            "pack_weights": not a.no_pack,
            "matvec": not a.no_matvec,
        },
    }
    for name in a.shapes.split(","):
        out[name] = bench_shape(
            name,
            [int(b) for b in a.batches.split(",")],
            a.prompt_len,
            a.new_tokens,
            a.repeats,
            not a.no_compiled,
            not a.no_pack,
            not a.no_matvec,
        )
    out["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
