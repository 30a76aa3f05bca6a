"""``chatforge speedrun``: every stage of a recipe in order, then the report card.

A stage is skipped when its outputs exist and were made from the same config (a hash of the config
sections it reads is kept in ``<run>/stages.json``); change a setting and that stage and every later one
run again. An interrupted training stage resumes from its last checkpoint if its settings are unchanged,
and starts afresh if they changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatforge.config import RunConfig, save_config, to_dict

_CORE = ("data", "tokenizer", "model", "pretrain")
_CHAT = (*_CORE, "chat_data", "sft")

# stage -> (config sections it depends on, files that must exist for it to count as done)
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": (("data",), ("data/docs.jsonl.gz", "data/prepare_stats.json")),
    "tokenizer": (("data", "tokenizer"), ("tokenizer/tokenizer.json", "data/index.json")),
    "pretrain": (_CORE, ("base/config.json", "base/training_summary.json")),
    "sample": ((*_CORE, "sample"), ("samples/base.json",)),
    "sft": (_CHAT, ("sft/config.json", "chat/eval.jsonl")),
    "reward": ((*_CHAT, "reward"), ("rm/config.json",)),
    "rlhf": ((*_CHAT, "reward", "speedrun", "grpo", "ppo", "dpo"), ("rlhf/{rl}/config.json",)),
    "eval": ((*_CHAT, "reward", "speedrun", "grpo", "ppo", "dpo", "evals"), ("evals/world_sft.json",)),
    "rlhf_eval": (
        (*_CHAT, "reward", "speedrun", "grpo", "ppo", "dpo", "evals", "bestofn"),
        ("evals/rlhf.json",),
    ),
    "moderation": ((*_CHAT, "moderation"), ("moderation/config.json",)),
    "redteam": ((*_CHAT, "reward", "speedrun", "grpo", "ppo", "dpo", "moderation", "safety"), ()),
}


def enabled_stages(cfg: RunConfig) -> list[str]:
    """The stages this recipe runs, in order (``speedrun.rl``, ``speedrun.reward`` and
    ``speedrun.safety`` switch the optional ones)."""
    sc = cfg.speedrun
    skip = set()
    if not sc.reward:
        skip |= {"reward", "rlhf_eval"}
    if sc.rl == "none":
        skip.add("rlhf")
    if not sc.safety:
        skip |= {"moderation", "redteam"}
    return [s for s in STAGES if s not in skip]


def rl_model_dirs(cfg: RunConfig) -> list[str]:
    """Checkpoints (inside the run) that evals compare: the recipe's list plus the RL policy if trained."""
    names = list(cfg.evals.models)
    if cfg.speedrun.rl != "none" and f"rlhf/{cfg.speedrun.rl}" not in names:
        names.append(f"rlhf/{cfg.speedrun.rl}")
    return names


# Settings that change how a stage runs but not what it writes: changing them re-runs nothing.
_NO_EFFECT = frozenset({"threads", "progress", "log_every"})


# (section, key) of settings added after runs existed; empty, they leave the stage hashes as they were.
_ADDED_LATER = (("evals", "registry"),)


def _effective(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _effective(v) for k, v in x.items() if k not in _NO_EFFECT}
    if isinstance(x, list):
        return [_effective(v) for v in x]
    return x


def _hash(cfg: RunConfig, sections: tuple[str, ...]) -> str:
    from chatforge.data.chat import chat_version
    from chatforge.data.world import text_version
    from chatforge.safety.moderation_data import MODERATION_DATA_VERSION

    parts: dict[str, Any] = {s: _effective(to_dict(getattr(cfg, s))) for s in sections}
    # A setting added after runs exist hashes only when set, so upgrading does not redo finished stages.
    for section, key in _ADDED_LATER:
        if section in parts and not parts[section].get(key):
            parts[section].pop(key, None)
    # The built-in generators' own versions: a change to the text they write re-runs what reads it.
    if "data" in sections:
        parts.update(text_version(cfg.data.sources))
    if "chat_data" in sections:
        parts.update(chat_version(cfg.chat_data.sources))
    if "moderation" in sections:
        parts["moderation_data"] = MODERATION_DATA_VERSION
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stage_fns(cfg: RunConfig) -> dict[str, Callable[[RunConfig], dict[str, Any]]]:
    # Imported lazily: each stage pulls in heavy libraries only when it runs.
    from chatforge import sample, tokenizer
    from chatforge.data import corpus
    from chatforge.evals import rlhf as rlhf_eval
    from chatforge.evals import runner
    from chatforge.safety import moderation, redteam
    from chatforge.train import dpo, grpo, ppo, pretrain, reward, sft

    fns = {
        "data": corpus.prepare,
        "tokenizer": tokenizer.run,
        "pretrain": pretrain.run,
        "sample": sample.run,
        "sft": sft.run,
        "reward": reward.run,
        "eval": lambda c: runner.run_stage(c, rl_model_dirs(c)),
        "rlhf_eval": rlhf_eval.run,
        "moderation": moderation.run,
        "redteam": lambda c: redteam.run(c, rl_model_dirs(c)),
    }
    if cfg.speedrun.rl != "none":  # otherwise enabled_stages leaves the rlhf stage out
        fns["rlhf"] = {"grpo": grpo.run, "ppo": ppo.run, "dpo": dpo.run}[cfg.speedrun.rl]
    return fns


def run(cfg: RunConfig, fresh: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    book_path = run_dir / "stages.json"
    book = {} if fresh else _read_book(book_path, log)
    fns = _stage_fns(cfg)
    if "sft" in enabled_stages(cfg):  # a wrong suite or registry dir found now, not after pretraining
        from chatforge.evals.runner import during_training_spec

        during_training_spec(cfg)
    t_start = time.perf_counter()
    ran: list[set[str]] = []  # the config sections of each stage that ran this time
    results: dict[str, Any] = {}
    for name in enabled_stages(cfg):
        sections, outputs = STAGES[name]
        if name == "pretrain" and cfg.chat_data.pretrain_fraction:  # mixed training reads the chat data
            sections = (*sections, "chat_data")
        outputs = tuple(o.format(rl=cfg.speedrun.rl) for o in outputs)
        h = _hash(cfg, sections)
        done = all((run_dir / o).exists() for o in outputs) and book.get(name, {}).get("hash") == h
        # A stage that ran feeds every later stage whose sections include all of its own (its outputs are
        # their inputs), and only those: new RL policies re-run the evals, not the moderation classifier.
        upstream_ran = any(r <= set(sections) for r in ran)
        if done and not fresh and not upstream_ran:
            log(f"[{name}] up to date, skipped ({book[name]['seconds']:.1f}s when it ran)")
            results[name] = book[name].get("result", {})
            continue
        ran.append(set(sections))
        if name in ("pretrain", "sft", "reward", "rlhf", "moderation"):
            work = run_dir / "train" / (cfg.speedrun.rl if name == "rlhf" else name)
            # Checkpoints left by an interrupted run resume only under the settings they were started with:
            # after a change (other data, tokenizer, model, steps) they would continue the old run.
            started = book.get(name, {}).get("started")
            if fresh or (started is not None and started != h):
                if not fresh and (work / "checkpoints").exists():
                    log(f"[{name}] settings changed since it was interrupted: starting afresh")
                _drop(work)
            book[name] = {**book.get(name, {}), "started": h}
            _write_book(book_path, book)
        log(f"[{name}] running")
        t0 = time.perf_counter()
        res = fns[name](cfg)
        secs = time.perf_counter() - t0
        log(f"[{name}] done in {secs:.1f}s")
        book[name] = {
            "hash": h,
            "started": h,
            "seconds": round(secs, 2),
            "finished": time.time(),  # what stale_stages compares
            "result": _jsonable(res),
        }
        results[name] = book[name]["result"]
        _write_book(book_path, book)
    from chatforge.evals import report

    paths = report.write_report(cfg)
    total = time.perf_counter() - t_start
    log(f"report: {paths['md']}  (speedrun wall time {total:.1f}s)")
    return {"stages": results, "report": str(paths["md"]), "seconds": total}


def stale_stages(book: dict[str, Any]) -> dict[str, str]:
    """Stages of ``book`` (a run's stages.json) whose results were made from outputs that have been
    remade since: {stage: the stage that ran after it}. A speedrun re-runs such a stage, unless the recipe
    now switches it off (``speedrun.safety: false`` after a run with it): then its results on disk describe
    older checkpoints, and the report leaves them out."""
    out = {}
    for name, entry in book.items():
        if name not in STAGES or not isinstance(entry, dict) or "finished" not in entry:
            continue  # books written before finish times were kept say nothing
        for up, (sections, _) in STAGES.items():
            up_entry = book.get(up)
            later = up_entry.get("finished", 0) if isinstance(up_entry, dict) else 0
            if up != name and set(sections) <= set(STAGES[name][0]) and later > entry["finished"]:
                out[name] = up
                break
    return out


def _read_book(path: Path, log: Callable[[str], None]) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        book = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        book = None
    if not isinstance(book, dict):
        log(f"{path}: unreadable (a write cut short?); every stage runs again")
        return {}
    return book


def _write_book(path: Path, book: dict[str, Any]) -> None:
    """Atomically: a crash or a full disk mid-write leaves the previous book, not a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(book, indent=2))
    os.replace(tmp, path)


def _drop(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))
