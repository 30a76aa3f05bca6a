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
    lines.append("")
    md = run_dir / "report.md"
    md.write_text("\n".join(lines))
    return {"md": md, "json": run_dir / "report.json", **({"loss_png": png} if png else {})}
