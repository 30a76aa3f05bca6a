"""Loaders that turn benchmark data into registry items (``{"input", "ideal", ...}``): the built-in world
suite, and GSM8K, HellaSwag, MMLU, ARC, TruthfulQA, HumanEval and IFEval from local files or Hugging Face
``datasets``.

Where data comes from, first hit wins: the spec's ``path`` (a file or a directory), then
``<shared data>/<name>/`` (``../shared/data`` or ``$CHATFORGE_SHARED_DATA``) holding ``<split>.jsonl``
(or ``.json``, ``.parquet``, ``.jsonl.gz``), then the Hub. When none is there the loader raises
:class:`BenchmarkUnavailable` with one line saying where it looked, so callers can skip cleanly.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError


class BenchmarkUnavailable(ChatforgeError):
    """The benchmark's data is not on this machine and the Hub cannot be reached."""


LOADERS: dict[str, Callable[..., list[dict]]] = {}


def loader(name: str) -> Callable[[Callable[..., list[dict]]], Callable[..., list[dict]]]:
    def deco(fn: Callable[..., list[dict]]) -> Callable[..., list[dict]]:
        LOADERS[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------- finding and reading records


def _read_file(p: Path) -> list[dict]:
    name = p.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        text = f.read()
    if ".jsonl" in name:
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ChatforgeError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
        return out
    data = json.loads(text)
    return data if isinstance(data, list) else data.get("data", [])


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:  # datasets retries for ~30 s when offline; a 3 s probe says so at once
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def records(
    name: str, split: str, path: str | None, hf: tuple[str, str | None] | None, limit: int = 0
) -> list[dict]:
    """Raw records of a benchmark split (see the module docstring for where they come from)."""
    from chatforge.data.chat import shared_data_dir

    looked = []
    if path:
        p = Path(path)
        if not p.exists():
            raise BenchmarkUnavailable(f"{name}: no such file or directory {p}")
        cands = [p] if p.is_file() else sorted(p.glob(f"{split}*"))
        if not cands:
            raise BenchmarkUnavailable(f"{name}: no {split}* file in {p}")
        recs = _read_file(cands[0])
        return recs[:limit] if limit else recs
    d = shared_data_dir() / name
    for ext in (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet"):
        p = d / f"{split}{ext}"
        if p.is_file():
            recs = _read_file(p)
            return recs[:limit] if limit else recs
    looked.append(f"{d}/{split}.jsonl")
    if hf is None:
        raise BenchmarkUnavailable(f"{name}: no data (looked for {looked[0]}); pass loader_args.path")
    if not _hub_reachable():
        raise BenchmarkUnavailable(
            f"{name}: no local data (looked for {looked[0]}) and the Hugging Face Hub is unreachable;"
            f" download {hf[0]} or pass loader_args.path"
        )
    import datasets

    sl = f"{split}[:{limit}]" if limit else split
    try:
        ds = datasets.load_dataset(hf[0], hf[1], split=sl)
    except Exception as e:  # datasets raises many kinds; all mean "not available"
        raise BenchmarkUnavailable(
            f"{name}: could not load {hf[0]} split {split} ({e.__class__.__name__})"
        ) from None
    return [dict(r) for r in ds]


# ---------------------------------------------------------------- the built-in world


@loader("world")
def world(
    context: dict[str, Any],
    seed: int = 0,
    per_kind: int = 30,
    eval_seed: int = 1,
    kinds: list[str] | None = None,
) -> list[dict]:
    """The held-out world behaviour suite. Inside a run (``context["run_dir"]``) it is the run's own
    ``chat/eval.jsonl`` (the world the model was trained on); otherwise it is generated from ``seed``."""
    from chatforge.data.chat import check_kinds, read_jsonl, world_eval_set
    from chatforge.data.world import build_world

    check_kinds("world loader: kinds", kinds or [])
    run_eval = Path(context["run_dir"]) / "chat" / "eval.jsonl" if context.get("run_dir") else None
    if run_eval is not None and run_eval.is_file():
        items = read_jsonl(run_eval)
        by_kind: dict[str, int] = {}
        kept = []
        for it in items:  # the first per_kind items of each kind, as world_eval_set orders them
            by_kind[it["kind"]] = by_kind.get(it["kind"], 0) + 1
            if by_kind[it["kind"]] <= per_kind:
                kept.append(it)
        items = kept
    else:
        items = world_eval_set(build_world(seed), per_kind, eval_seed)
    return [it for it in items if not kinds or it["kind"] in kinds]


# ---------------------------------------------------------------- standard benchmarks


def _gsm8k_answer(answer: str) -> str:
    final = answer.split("####")[-1].strip()
    return final.replace(",", "")


@loader("gsm8k")
def gsm8k(
    context: dict[str, Any],
    split: str = "test",
    path: str | None = None,
    limit: int = 0,
    system: str | None = None,
) -> list[dict]:
    """Grade-school maths: the question as a user message; ideal = the number after ``####``."""
    recs = records("gsm8k", split, path, ("openai/gsm8k", "main"), limit)
    out = []
    for i, r in enumerate(recs):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": r["question"]}
        ]
        out.append({"id": f"gsm8k-{split}-{i:05d}", "input": msgs, "ideal": _gsm8k_answer(r["answer"])})
    return out


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@loader("hellaswag")
def hellaswag(
    context: dict[str, Any], split: str = "validation", path: str | None = None, limit: int = 0
) -> list[dict]:
    """Sentence completion, 4 endings, scored by length-normalized log-probability (acc_norm)."""
    out = []
    for i, r in enumerate(records("hellaswag", split, path, ("Rowan/hellaswag", None), limit)):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        prompt = _hellaswag_clean(r["activity_label"] + ": " + ctx)
        out.append(
            {
                "id": f"hellaswag-{i:05d}",
                "input": prompt,
                "choices": [" " + _hellaswag_clean(e) for e in r["endings"]],
                "ideal": int(r["label"]),
            }
        )
    return out


@loader("mmlu")
def mmlu(
    context: dict[str, Any],
    split: str = "test",
    subject: str = "all",
    path: str | None = None,
    limit: int = 0,
) -> list[dict]:
    """57 subjects, 4 lettered options; the letter with the highest log-probability is the answer."""
    out = []
    for i, r in enumerate(records("mmlu", split, path, ("cais/mmlu", subject), limit)):
        subj = r.get("subject", subject).replace("_", " ")
        opts = "\n".join(f"{'ABCD'[k]}. {c}" for k, c in enumerate(r["choices"]))
        prompt = (
            f"The following is a multiple choice question about {subj}.\n\n{r['question']}\n{opts}\nAnswer:"
        )
        out.append(
            {
                "id": f"mmlu-{i:05d}",
                "kind": subj,
                "input": prompt,
                "choices": [f" {'ABCD'[k]}" for k in range(len(r["choices"]))],
                "ideal": int(r["answer"]),
            }
        )
    return out


@loader("arc")
def arc(
    context: dict[str, Any],
    split: str = "test",
    subset: str = "ARC-Challenge",
    path: str | None = None,
    limit: int = 0,
) -> list[dict]:
    """AI2 Reasoning Challenge: the answer text's log-probability after "Question: ...\\nAnswer:"."""
    out = []
    for i, r in enumerate(records("arc", split, path, ("allenai/ai2_arc", subset), limit)):
        labels, texts = r["choices"]["label"], r["choices"]["text"]
        out.append(
            {
                "id": f"arc-{i:05d}",
                "input": f"Question: {r['question']}\nAnswer:",
                "choices": [" " + t for t in texts],
                "ideal": labels.index(r["answerKey"]),
            }
        )
    return out


@loader("truthfulqa")
def truthfulqa(
    context: dict[str, Any], split: str = "validation", path: str | None = None, limit: int = 0
) -> list[dict]:
    """TruthfulQA MC1: one true answer among imitative falsehoods."""
    out = []
    for i, r in enumerate(records("truthfulqa", split, path, ("truthful_qa", "multiple_choice"), limit)):
        mc = r["mc1_targets"]
        out.append(
            {
                "id": f"truthfulqa-{i:05d}",
                "input": f"Q: {r['question']}\nA:",
                "choices": [" " + c for c in mc["choices"]],
                "ideal": list(mc["labels"]).index(1),
            }
        )
    return out


@loader("humaneval")
def humaneval(
    context: dict[str, Any], split: str = "test", path: str | None = None, limit: int = 0
) -> list[dict]:
    """Python functions from docstrings; the model continues the prompt, tests run in the sandbox."""
    out = []
    for r in records("humaneval", split, path, ("openai_humaneval", None), limit):
        out.append(
            {
                "id": r["task_id"],
                "input": r["prompt"],
                "prompt": r["prompt"],
                "test": r["test"],
                "entry_point": r["entry_point"],
                "ideal": r.get("canonical_solution", ""),
            }
        )
    return out


@loader("ifeval")
def ifeval(
    context: dict[str, Any], split: str = "train", path: str | None = None, limit: int = 0
) -> list[dict]:
    """Verifiable instructions ("answer in under 100 words", "no commas"...), graded by ``ifeval``."""
    out = []
    for r in records("ifeval", split, path, ("google/IFEval", None), limit):
        out.append(
            {
                "id": f"ifeval-{r['key']}",
                "input": [{"role": "user", "content": r["prompt"]}],
                "instruction_id_list": list(r["instruction_id_list"]),
                "kwargs": [dict(k) if k else {} for k in r["kwargs"]],
            }
        )
    return out
