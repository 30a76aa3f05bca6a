"""``chatforge speedrun``: every stage of a recipe in order, then the report card.

A stage is skipped when its outputs exist and were made from the same config (a hash of the config
sections it reads is kept in ``<run>/stages.json``); change a setting and that stage and every later one
run again. An interrupted pretraining resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatforge.config import RunConfig, save_config, to_dict

# stage -> (config sections it depends on, files that must exist for it to count as done)
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": (("data",), ("data/docs.jsonl.gz", "data/prepare_stats.json")),
    "tokenizer": (("data", "tokenizer"), ("tokenizer/tokenizer.json", "data/index.json")),
    "pretrain": (
        ("data", "tokenizer", "model", "pretrain"),
        ("base/config.json", "base/training_summary.json"),
    ),
    "sample": (("data", "tokenizer", "model", "pretrain", "sample"), ("samples/base.json",)),
    "sft": (
        ("data", "tokenizer", "model", "pretrain", "chat_data", "sft"),
        ("sft/config.json", "chat/eval.jsonl"),
    ),
    "eval": (
        ("data", "tokenizer", "model", "pretrain", "chat_data", "sft", "evals"),
        ("evals/world_sft.json",),
    ),
}


def _hash(cfg: RunConfig, sections: tuple[str, ...]) -> str:
    blob = json.dumps({s: to_dict(getattr(cfg, s)) for s in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stage_fns() -> dict[str, Callable[[RunConfig], dict[str, Any]]]:
    # Imported lazily: each stage pulls in heavy libraries only when it runs.
    from chatforge import sample, tokenizer
    from chatforge.data import corpus
    from chatforge.evals import runner
    from chatforge.train import pretrain, sft

    return {
        "data": corpus.prepare,
        "tokenizer": tokenizer.run,
        "pretrain": pretrain.run,
        "sample": sample.run,
        "sft": sft.run,
        "eval": runner.run_stage,
    }


def run(cfg: RunConfig, fresh: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    book_path = run_dir / "stages.json"
    book: dict[str, Any] = {} if fresh or not book_path.exists() else json.loads(book_path.read_text())
    fns = _stage_fns()
    t_start = time.perf_counter()
    stale = fresh
    results: dict[str, Any] = {}
    for name, (sections, outputs) in STAGES.items():
        h = _hash(cfg, sections)
        done = all((run_dir / o).exists() for o in outputs) and book.get(name, {}).get("hash") == h
        if done and not stale:
            log(f"[{name}] up to date, skipped ({book[name]['seconds']:.1f}s when it ran)")
            results[name] = book[name].get("result", {})
            continue
        stale = True  # everything after a stage that runs must run too
        if fresh and name in ("pretrain", "sft"):
            _drop(run_dir / "train" / name)
        log(f"[{name}] running")
        t0 = time.perf_counter()
        res = fns[name](cfg)
        secs = time.perf_counter() - t0
        log(f"[{name}] done in {secs:.1f}s")
        book[name] = {"hash": h, "seconds": round(secs, 2), "result": _jsonable(res)}
        results[name] = book[name]["result"]
        book_path.write_text(json.dumps(book, indent=2))
    from chatforge.evals import report

    paths = report.write_report(cfg)
    total = time.perf_counter() - t_start
    log(f"report: {paths['md']}  (speedrun wall time {total:.1f}s)")
    return {"stages": results, "report": str(paths["md"]), "seconds": total}


def _drop(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))
