"""The report card: ``<run>/report.md`` + ``report.json`` + PNG plots, from what the stages left behind."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from chatforge.config import RunConfig
from chatforge.train.loop import read_metrics


def _read_json(path: Path) -> Any:
    """The file's JSON; None when it is missing, or unreadable (said, and the card written without it:
    a truncated evals/*.json from a killed run was a traceback and no report)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        print(f"report: skipped {path}: not readable JSON ({e})", file=sys.stderr)
        return None


def _pyplot() -> Any:
    """pyplot on the file-only Agg backend (reports are written on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, out: Path, dpi: float | None = None) -> Path:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    _pyplot().close(fig)
    return out


def plot_loss(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Train loss (and validation loss, if logged) against tokens seen."""
    train = read_metrics(metrics_path, "train")
    if not train:
        return None
    plt = _pyplot()
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
    return _save_figure(fig, out)


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

    from chatforge.speedrun import stale_stages

    stale = stale_stages(stages)
    report: dict[str, Any] = {
        "name": cfg.name,
        "stage_seconds": {k: v.get("seconds") for k, v in stages.items() if k not in stale},
        "stale_stages": stale,
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
    evals = find_stage_evals(run_dir, cfg.evals.models)
    suites = find_suite_evals(run_dir)
    during = {
        st: recs
        for st in _metric_stages(run_dir)
        if (recs := read_metrics(run_dir / "train" / st / "metrics.jsonl", "eval_suite"))
    }
    if sft_summary:
        report["sft"] = {
            k: sft_summary.get(k) for k in ("steps", "tokens", "elapsed_s", "val_loss", "conversations")
        }
    if evals:
        report["world_eval"] = {
            m: {
                "overall": e["overall"],
                "per_kind": e["per_kind"],
                **{k: e[k] for k in ("refusal", "json_valid", "system_rule", "distribution", "n") if k in e},
            }
            for m, e in evals.items()
        }
    if suites:
        report["suites"] = {
            key: {k: e.get(k) for k in ("suite", "target", "n", "overall", "extra", "throughput")}
            for key, e in suites.items()
        }
    if during:
        report["during_training"] = during
    eval_png = plot_eval_bars(evals, run_dir / "world_eval.png") if evals else None
    dist_png = plot_distribution(evals, run_dir / "world_distribution.png") if evals else None
    during_png = plot_during_training(during, run_dir / "during_training.png") if during else None
    lines = [f"# chatforge report card: `{cfg.name}`", ""]
    lines += ["## Stages", "", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report["stage_seconds"].items()]
    if stale:
        left = ", ".join(f"{k} (before {v} ran again)" for k, v in stale.items())
        lines += [
            "",
            f"Left out: results made from older checkpoints, by stages this run did not redo: {left}.",
        ]
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
        lines += _eval_section(evals, eval_png, dist_png)
    if during:
        lines += ["", "## During training", ""]
        for st, recs in during.items():
            last = recs[-1]
            lines.append(
                f"- {st}: `{last.get('suite')}` every {recs[1]['step'] - recs[0]['step'] if len(recs) > 1 else '?'}"
                f" steps; mean {recs[0].get('mean', 0) * 100:.0f}% at step {recs[0]['step']} →"
                f" {last.get('mean', 0) * 100:.0f}% at step {last['step']}"
            )
        if during_png:
            lines += ["", f"![during training]({during_png.name})"]
    if suites:
        lines += _suites_section(suites)
    lines += _later_stages_section(cfg, report)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    lines.append("")
    md = run_dir / "report.md"
    md.write_text("\n".join(lines))
    return {"md": md, "json": run_dir / "report.json", **({"loss_png": png} if png else {})}


def plot_eval_bars(evals: dict[str, dict], out: Path) -> Path:
    """Per-behaviour accuracy on the held-out world suite, one bar per checkpoint."""
    plt = _pyplot()
    kinds = sorted({k for e in evals.values() for k in e["per_kind"]})
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(kinds)), 4.2), dpi=110)
    width = 0.8 / len(evals)
    for i, (name, e) in enumerate(evals.items()):
        xs = [j + i * width for j in range(len(kinds))]
        ax.bar(xs, [e["per_kind"].get(k, {}).get("mean", math.nan) * 100 for k in kinds], width, label=name)
    ax.set_xticks([j + width * (len(evals) - 1) / 2 for j in range(len(kinds))])
    ax.set_xticklabels(kinds, rotation=35, ha="right")
    ax.set_ylabel("pass rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("held-out world behaviours")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, out)


def _cell(text: str, limit: int = 90) -> str:
    text = text.replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Stages in pipeline order; anything else found in <run>/evals sorts after them.
STAGE_ORDER = ("base", "sft", "rm", "rlhf", "rlhf-grpo", "rlhf-ppo", "rlhf-dpo", "ppo", "dpo", "grpo")


def _stage_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def find_stage_evals(run_dir: Path, preferred: list[str] | None = None) -> dict[str, dict]:
    """Every ``evals/world_<stage>.json`` in the run (base, sft and whatever later stages wrote), in
    pipeline order."""
    found = {}
    for p in (run_dir / "evals").glob("world_*.json"):
        data = _read_json(p)
        if isinstance(data, dict) and "per_kind" in data and "samples" in data:
            found[p.stem.removeprefix("world_")] = data
    order = sorted(found, key=lambda m: (m not in (preferred or []), _stage_key(m)))
    return {m: found[m] for m in order}


def find_suite_evals(run_dir: Path) -> dict[str, dict]:
    """Results of ``chatforge eval`` for other suites (``evals/<suite>_<model>.json``)."""
    out = {}
    for p in sorted((run_dir / "evals").glob("*.json")):
        if p.stem.startswith("world_"):
            continue
        data = _read_json(p)
        if isinstance(data, dict) and "suite" in data and "overall" in data:
            out[p.stem] = data
    return out


def _metric_stages(run_dir: Path) -> list[str]:
    d = run_dir / "train"
    return (
        sorted((p.name for p in d.iterdir() if (p / "metrics.jsonl").is_file()), key=_stage_key)
        if d.is_dir()
        else []
    )


def plot_distribution(evals: dict[str, dict], out: Path) -> Path | None:
    """Histogram of per-item mean scores (over the n samples) for each stage: where the mass sits says
    whether the model is reliably right, reliably wrong, or a coin flip on each prompt."""
    plt = _pyplot()
    dists = {m: e.get("distribution") for m, e in evals.items() if e.get("distribution")}
    if not dists:
        return None
    levels = sorted({float(k) for d in dists.values() for k in d})
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    width = 0.8 / len(dists)
    for i, (name, d) in enumerate(dists.items()):
        total = sum(d.values())
        counts = {float(k): v for k, v in d.items()}
        xs = [j + i * width for j in range(len(levels))]
        ax.bar(xs, [100 * counts.get(lv, 0) / total for lv in levels], width, label=name)
    ax.set_xticks([j + width * (len(dists) - 1) / 2 for j in range(len(levels))])
    ax.set_xticklabels([f"{lv:.2f}" for lv in levels])
    ax.set_xlabel("per-prompt mean score over its samples")
    ax.set_ylabel("share of prompts (%)")
    ax.set_title("distribution of per-prompt scores (held-out world suite)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, out)


def plot_during_training(during: dict[str, list[dict]], out: Path) -> Path:
    """The during-training suite's mean and worst-of-n against the step, per training stage."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for st, recs in during.items():
        steps = [r["step"] for r in recs]
        ax.plot(steps, [100 * r.get("mean", 0) for r in recs], "o-", ms=4, label=f"{st}: mean")
        ax.plot(steps, [100 * r.get("worst", 0) for r in recs], "x--", ms=4, label=f"{st}: worst-of-n")
    ax.set_xlabel("step")
    ax.set_ylabel("pass rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("eval suite during training")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(fig, out)


def _suites_section(suites: dict[str, dict]) -> list[str]:
    lines = [
        "",
        "## Other eval suites",
        "",
        "| suite | target | n | mean | median | worst | extra | samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in suites.values():
        o = e["overall"]
        extra = ", ".join(f"{k} {v}" for k, v in (e.get("extra") or {}).items()) or "—"
        tput = (e.get("throughput") or {}).get("samples_per_s", "—")
        lines.append(
            f"| {e['suite']} | {e.get('target')} | {e.get('n')} | {o['mean'] * 100:.1f}% |"
            f" {o['median'] * 100:.1f}% | {o['worst'] * 100:.1f}% | {extra} | {tput} |"
        )
    return lines


def _eval_section(evals: dict[str, dict], png: Path | None, dist_png: Path | None = None) -> list[str]:
    names = list(evals)
    # Each checkpoint's own n: the first one's stood for all (its n in the text, worst-of-n columns
    # hidden for every checkpoint when the first had n = 1).
    ns = {m: e.get("n", 1) for m, e in evals.items()}
    n = max(ns.values())
    per_prompt = (
        f"{n} sample(s) per prompt"
        if len(set(ns.values())) == 1
        else "samples per prompt: " + ", ".join(f"{m} {k}" for m, k in ns.items())
    )
    lines = [
        "",
        "## Held-out world behaviours",
        "",
        f"Eval-split entities only (never seen in chat tuning); {per_prompt}. Pass rate: mean over"
        " samples" + ("; worst = an item passes only if all its samples pass." if n > 1 else "."),
        "",
    ]
    kinds = sorted({k for e in evals.values() for k in e["per_kind"]})
    cols = [f"{m} mean" for m in names] + ([f"{m} worst" for m in names] if n > 1 else [])
    lines += ["| behaviour | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def pct(r: dict | None, key: str) -> str:  # a kind a checkpoint was not evaluated on is not 0%
        return "—" if r is None or r.get(key) is None else f"{r[key] * 100:.0f}%"

    for k in [*kinds, "overall"]:
        row = [(evals[m]["overall"] if k == "overall" else evals[m]["per_kind"].get(k)) for m in names]
        vals = [pct(r, "mean") for r in row]
        if n > 1:
            vals += [pct(r, "worst") for r in row]
        label = f"**{k}**" if k == "overall" else k
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    refusal = {m: e["refusal"] for m, e in evals.items() if e.get("refusal")}
    if refusal:
        lines += [
            "",
            "Refusals (keyword classifier): harmful requests declined, and over-refusal = benign"
            " look-alikes refused.",
            "",
            "| checkpoint | harmful declined | benign refused (over-refusal) |",
            "|---|---|---|",
        ]
        for m, r in refusal.items():
            h, b = r.get("harmful_refused"), r.get("benign_refused")
            lines.append(
                f"| {m} | {'—' if h is None else f'{h * 100:.0f}%'} | {'—' if b is None else f'{b * 100:.0f}%'} |"
            )
    rules = {m: e["system_rule"] for m, e in evals.items() if e.get("system_rule")}
    if rules:
        rule_kinds = sorted({k for r in rules.values() for k in r})
        lines += [
            "",
            "System messages, the rule alone (JSON shape, persona marker, word limit, reply language;"
            " the facts in the reply not checked — the table above asks for both):",
            "",
            "| checkpoint | " + " | ".join(rule_kinds) + " |",
            "|---" * (len(rule_kinds) + 1) + "|",
        ]
        for m, r in rules.items():
            vals = ["—" if r.get(k) is None else f"{r[k] * 100:.0f}%" for k in rule_kinds]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
    if png:
        lines += ["", f"![world eval]({png.name})"]
    if dist_png:
        lines += ["", f"![per-prompt score distribution]({dist_png.name})"]
    # Side by side: the same prompts (matched by id), first sample of each checkpoint, one per behaviour;
    # the first column is the earliest checkpoint, the last the final one.
    first = evals[names[0]]["samples"]
    by_id = {m: {smp["id"]: smp for smp in evals[m]["samples"]} for m in names}
    picks, seen = [], set()
    for i, smp in enumerate(first):
        if smp["kind"] not in seen:
            seen.add(smp["kind"])
            picks.append(i)
    lines += [
        "",
        "### Same prompts, early vs final checkpoint",
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
            smp = by_id[m].get(first[i]["id"])
            if smp is None or not smp["replies"]:
                answers.append("—")
                continue
            mark = "✅" if smp["scores"][0] >= 1 else "❌"
            answers.append(f"{mark} {_cell(smp['replies'][0])}")
        lines.append(f"| {first[i]['kind']} | {_cell(prompt)} | " + " | ".join(answers) + " |")
    return lines


def plot_rl_curves(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Mean reward and KL to the reference per RL iteration (the ``rollout`` events of PPO/GRPO)."""
    recs = read_metrics(metrics_path, "rollout")
    if not recs:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    it = [r.get("iteration", i) for i, r in enumerate(recs)]
    ax1.plot(it, [r.get("reward_mean", float("nan")) for r in recs], marker=".")
    ax1.set(xlabel="iteration", ylabel="mean reward", title="reward")
    ax2.plot(it, [r.get("kl", float("nan")) for r in recs], marker=".", color="tab:red")
    ax2.set(xlabel="iteration", ylabel="KL to reference (nats/seq)", title="KL")
    fig.suptitle(title)
    return _save_figure(fig, out, dpi=110)


def _demoted(md: str) -> list[str]:
    """A stage's own markdown, its headings pushed two levels down so they nest under ours."""
    return [("##" + ln if ln.startswith("#") else ln) for ln in md.strip().splitlines()]


def _later_stages_section(cfg: RunConfig, report: dict[str, Any]) -> list[str]:
    """Reward model, RL, safety and scaling, each only if its stage left results in the run."""
    run_dir = cfg.run_dir
    lines: list[str] = []
    stale = report.get("stale_stages", {})
    rm = None if "reward" in stale else _read_json(run_dir / "rm" / "training_summary.json")
    if rm:
        held = rm.get("heldout", {})
        report["reward_model"] = held
        acc = held.get("accuracy")
        lines += ["", "## Reward model", ""]
        lines.append(
            f"Held-out pairwise accuracy {_fmt(acc)} on {_fmt(held.get('pairs'))} pairs about held-out entities"
            f" (ECE {_fmt(held.get('ece'))})."
        )
        per = held.get("by_group") or {}
        if per:
            lines += ["", "| category | accuracy |", "|---|---|"]
            lines += [
                f"| {k} | {_fmt(v.get('accuracy') if isinstance(v, dict) else v)} |" for k, v in per.items()
            ]
    rl = cfg.speedrun.rl
    curves = plot_rl_curves(
        run_dir / "train" / rl / "metrics.jsonl", run_dir / "rl_curves.png", f"{cfg.name}: {rl}"
    )
    if "rlhf" in stale:
        curves = None
    table = run_dir / "evals" / "rlhf.md"
    show_table = table.is_file() and "rlhf_eval" not in stale
    if show_table or curves:
        lines += ["", f"## RLHF ({rl})", ""]
        if show_table:
            lines += _demoted(table.read_text())
            report["rlhf"] = _read_json(run_dir / "evals" / "rlhf.json")
        if curves:
            lines += ["", f"![reward and KL]({curves.name})"]
    redteam = {
        p.stem.removeprefix("redteam_"): d
        # early to late: base, SFT, then the RL policies
        for p in sorted(
            (run_dir / "evals").glob("redteam_*.json"),
            key=lambda p: ({"base": 0, "sft": 1}.get(p.stem.removeprefix("redteam_"), 2), p.stem),
        )
        if "redteam" not in stale and isinstance(d := _read_json(p), dict) and "harmful_compliance" in d
    }
    if redteam:
        keys = ("harmful_compliance", "over_refusal", "lecture_rate")
        report["redteam"] = {
            m: {k: d.get(k) for k in keys}
            | (
                {
                    "with_policy": {
                        k: d["with_policy"].get(k) for k in (*keys, "ordinary_blocked", "everyday_blocked")
                    }
                }
                if "with_policy" in d
                else {}
            )
            for m, d in redteam.items()
        }
        lines += [
            "",
            "## Red team",
            "",
            "Harmful requests (plain and wrapped in jailbreaks) and benign look-alikes, on held-out entities."
            " Lower is better in every column; *+ policy* is the same model behind the moderation policy,"
            " and *ordinary answers blocked* is how many of its replies to the world suite's ordinary"
            " requests the policy replaces with a decline.",
            "",
            "| model | harmful compliance | over-refusal | lecture rate | + policy: harmful | + policy: over-refusal"
            " | + policy: ordinary answers blocked |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, d in redteam.items():
            wp = d.get("with_policy") or {}
            ob = (wp.get("ordinary_blocked") or {}).get("rate", "—")
            lines.append(
                f"| {m} | {_fmt(d.get('harmful_compliance'))} | {_fmt(d.get('over_refusal'))} |"
                f" {_fmt(d.get('lecture_rate'))} | {_fmt(wp.get('harmful_compliance', '—'))} |"
                f" {_fmt(wp.get('over_refusal', '—'))} | {_fmt(ob)} |"
            )
        everyday = next(
            (ev for d in redteam.values() if (ev := (d.get("with_policy") or {}).get("everyday_blocked"))),
            None,
        )
        if everyday:
            blocked = ", ".join(f'"{t}"' for t in everyday["blocked"]) or "none"
            lines += [
                "",
                f'The policy on {everyday["n"]} short everyday messages ("Howdy", "Cheers", "Take care"...):'
                f" {_fmt(everyday['input'])} blocked as a user's message, {_fmt(everyday['output'])} as a reply"
                f" ({blocked}).",
            ]
        # Per kind (and harmful wording seen / unseen in chat tuning), the model alone.
        rows: dict[str, dict[str, Any]] = {}
        for m, d in redteam.items():
            for kind, v in (d.get("per_kind") or {}).items():
                rows.setdefault(kind, {})[m] = v.get("harmful_compliance", v.get("over_refusal"))
            for wording, v in (d.get("by_wording") or {}).items():
                rows.setdefault(f"harmful wording {wording.replace('_', '-')}", {})[m] = v[
                    "harmful_compliance"
                ]
        if rows:
            models = list(redteam)
            lines += [
                "",
                "Per kind: harmful compliance for harmful and jailbreak kinds, over-refusal for benign ones.",
                "",
                "| kind | " + " | ".join(models) + " |",
                "|---|" + "---|" * len(models),
            ]
            lines += [
                f"| {k} | " + " | ".join(_fmt(r.get(m, "—")) for m in models) + " |" for k, r in rows.items()
            ]
    moderation = None if "moderation" in stale else _read_json(run_dir / "evals" / "moderation.json")
    if isinstance(moderation, dict) and moderation:
        from chatforge.safety.moderation import summary_table

        report["moderation"] = {src: v.get("mean_auprc") for src, v in moderation.items()}
        lines += [
            "",
            "## Moderation classifier",
            "",
            "Held-out precision / recall at the tuned thresholds and AUPRC per category and source"
            " (OpenAI's moderation endpoint scores 0.856 AUPRC on OpenAI's own `moderation` set, flagged or not).",
            "",
            summary_table(moderation),
        ]
    scaling_md = run_dir / "scaling" / "scaling.md"
    if scaling_md.is_file():  # a scaling run's own card; its plots live in scaling/
        text = scaling_md.read_text().replace("](", "](scaling/")
        lines += ["", "## Scaling", "", *_demoted(text)]
        if (data := _read_json(run_dir / "scaling" / "scaling.json")) is not None:
            report["scaling"] = data
    return lines
