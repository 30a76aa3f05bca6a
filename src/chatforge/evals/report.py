"""The report card: ``<run>/report.md`` + ``report.json`` + PNG plots, from what the stages left behind."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from chatforge.config import RunConfig
from chatforge.train.loop import read_metrics


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def plot_loss(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Train loss (and validation loss, if logged) against tokens seen."""
    train = read_metrics(metrics_path, "train")
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in read_metrics(metrics_path, "eval") if "val_loss" in r]
    tok_at = {r["step"]: r["tokens_seen"] for r in train}
    per_step = train[-1]["tokens_seen"] / max(train[-1]["step"], 1)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([r["tokens_seen"] / 1e6 for r in train], [r["loss"] for r in train], lw=1.2, label="train loss")
    if evals:
        xs = [tok_at.get(r["step"], r["step"] * per_step) / 1e6 for r in evals]
        ax.plot(xs, [r["val_loss"] for r in evals], "o-", ms=4, label="validation loss")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def write_report(cfg: RunConfig) -> dict[str, Path]:
    run_dir = cfg.run_dir
    stages = _read_json(run_dir / "stages.json") or {}
    data_stats = _read_json(run_dir / "data" / "prepare_stats.json") or {}
    index = _read_json(run_dir / "data" / "index.json") or {}
    summary = _read_json(run_dir / "base" / "training_summary.json") or {}
    samples = _read_json(run_dir / "samples" / "base.json") or []
    metrics_path = run_dir / "train" / "pretrain" / "metrics.jsonl"
    png = plot_loss(metrics_path, run_dir / "loss_curve.png", f"{cfg.name}: pretraining")
    train_recs = read_metrics(metrics_path, "train")
    tps = [r["tokens_per_s"] for r in train_recs[1:]] or [0.0]
    tps_median = sorted(tps)[len(tps) // 2]

    report: dict[str, Any] = {
        "name": cfg.name,
        "stage_seconds": {k: v.get("seconds") for k, v in stages.items()},
        "data": data_stats.get("totals", data_stats),
        "tokens": {s: sum(f["tokens"] for f in fs) for s, fs in index.get("splits", {}).items()},
        "model": {
            "params": summary.get("params"),
            "params_non_embedding": summary.get("params_non_embedding"),
            "hidden_size": cfg.model.hidden_size,
            "layers": cfg.model.num_hidden_layers,
            "heads": cfg.model.num_attention_heads,
        },
        "pretrain": {
            "steps": summary.get("steps"),
            "tokens": summary.get("tokens"),
            "train_seconds": summary.get("elapsed_s"),
            "tokens_per_s_median": tps_median,
            "val_loss": summary.get("val_loss"),
            "val_ppl": math.exp(summary["val_loss"]) if summary.get("val_loss") is not None else None,
            "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
        },
        "samples": samples,
    }
    sft_summary = _read_json(run_dir / "sft" / "training_summary.json")
    sft_png = plot_loss(
        run_dir / "train" / "sft" / "metrics.jsonl", run_dir / "sft_loss_curve.png", f"{cfg.name}: SFT"
    )
    evals = {m: _read_json(run_dir / "evals" / f"world_{m}.json") for m in cfg.evals.models}
    evals = {m: e for m, e in evals.items() if e}
    if sft_summary:
        report["sft"] = {
            k: sft_summary.get(k) for k in ("steps", "tokens", "elapsed_s", "val_loss", "conversations")
        }
    if evals:
        report["world_eval"] = {
            m: {"overall": e["overall"], "per_kind": e["per_kind"]} for m, e in evals.items()
        }
    eval_png = plot_eval_bars(evals, run_dir / "world_eval.png") if evals else None
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))

    lines = [f"# chatforge report card: `{cfg.name}`", ""]
    lines += ["## Stages", "", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report["stage_seconds"].items()]
    lines += ["", "## Data", ""]
    if report["data"]:
        lines += ["| measure | value |", "|---|---|"] + [
            f"| {k} | {_fmt(v)} |" for k, v in report["data"].items() if not isinstance(v, dict | list)
        ]
    lines += ["", f"Tokens: {', '.join(f'{s} {_fmt(n)}' for s, n in report['tokens'].items())}", ""]
    pt = report["pretrain"]
    m = report["model"]
    lines += [
        "## Pretraining",
        "",
        f"Model: {_fmt(m['params'])} parameters ({_fmt(m['params_non_embedding'])} without embeddings),"
        f" {m['layers']} layers × {m['hidden_size']} wide, {m['heads']} heads.",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for k in (
        "steps",
        "tokens",
        "train_seconds",
        "tokens_per_s_median",
        "final_train_loss",
        "val_loss",
        "val_ppl",
    ):
        lines.append(f"| {k} | {_fmt(pt[k]) if pt[k] is not None else '—'} |")
    if png:
        lines += ["", f"![loss curve]({png.name})"]
    if samples:
        lines += ["", "## Samples from the base model", ""]
        for s in samples:
            prompt = s["prompt"].replace("\n", " ")
            completion = s["completion"].replace("\n", " ").replace("|", "\\|")
            lines += [f"- **{prompt}** → {completion}"]
    if sft_summary:
        st = report["sft"]
        lines += [
            "",
            "## Chat tuning (SFT)",
            "",
            f"{_fmt(st['conversations'])} conversations, {_fmt(st['steps'])} steps, {_fmt(st['tokens'])} trained"
            f" tokens in {_fmt(st['elapsed_s'], 1)} s; validation loss on held-out conversations"
            f" {_fmt(st['val_loss'])}.",
        ]
        if sft_png:
            lines += ["", f"![SFT loss]({sft_png.name})"]
    if evals:
        lines += _eval_section(evals, eval_png)
    lines.append("")
    md = run_dir / "report.md"
    md.write_text("\n".join(lines))
    return {"md": md, "json": run_dir / "report.json", **({"loss_png": png} if png else {})}


def plot_eval_bars(evals: dict[str, dict], out: Path) -> Path:
    """Per-behaviour accuracy on the held-out world suite, one bar per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for e in evals.values() for k in e["per_kind"]})
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(kinds)), 4.2), dpi=110)
    width = 0.8 / len(evals)
    for i, (name, e) in enumerate(evals.items()):
        xs = [j + i * width for j in range(len(kinds))]
        ax.bar(xs, [e["per_kind"].get(k, {}).get("mean", 0) * 100 for k in kinds], width, label=name)
    ax.set_xticks([j + width * (len(evals) - 1) / 2 for j in range(len(kinds))])
    ax.set_xticklabels(kinds, rotation=35, ha="right")
    ax.set_ylabel("pass rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("held-out world behaviours")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _cell(text: str, limit: int = 90) -> str:
    text = text.replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _eval_section(evals: dict[str, dict], png: Path | None) -> list[str]:
    names = list(evals)
    n = next(iter(evals.values())).get("n", 1)
    lines = [
        "",
        "## Held-out world behaviours",
        "",
        f"Eval-split entities only (never seen in chat tuning); {n} sample(s) per prompt. Pass rate: mean over"
        " samples" + ("; worst = an item passes only if all its samples pass." if n > 1 else "."),
        "",
    ]
    kinds = sorted({k for e in evals.values() for k in e["per_kind"]})
    cols = [f"{m} mean" for m in names] + ([f"{m} worst" for m in names] if n > 1 else [])
    lines += ["| behaviour | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in [*kinds, "overall"]:
        row = [(evals[m]["overall"] if k == "overall" else evals[m]["per_kind"].get(k, {})) for m in names]
        vals = [f"{r.get('mean', 0) * 100:.0f}%" for r in row]
        if n > 1:
            vals += [f"{r.get('worst', 0) * 100:.0f}%" for r in row]
        label = f"**{k}**" if k == "overall" else k
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    if png:
        lines += ["", f"![world eval]({png.name})"]
    # Side by side: the same prompts, first sample of each checkpoint, one per behaviour.
    first = evals[names[0]]["samples"]
    picks, seen = [], set()
    for i, smp in enumerate(first):
        if smp["kind"] not in seen:
            seen.add(smp["kind"])
            picks.append(i)
    lines += [
        "",
        "### Same prompts, each checkpoint",
        "",
        "| behaviour | prompt | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for i in picks:
        msgs = first[i]["input"]
        sys_msg = next((m["content"] for m in msgs if m["role"] == "system"), "")
        prompt = (f"[system: {sys_msg}] " if sys_msg else "") + msgs[-1]["content"]
        answers = []
        for m in names:
            smp = evals[m]["samples"][i]
            mark = "✅" if smp["scores"][0] >= 1 else "❌"
            answers.append(f"{mark} {_cell(smp['replies'][0])}")
        lines.append(f"| {first[i]['kind']} | {_cell(prompt)} | " + " | ".join(answers) + " |")
    return lines
