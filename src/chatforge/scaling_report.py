"""Plots (PNG) and the markdown summary of ``chatforge scaling``, from its ``scaling.json`` summary.

Writes ``loss_vs_compute.png`` (ladder, L(C) fit with its bootstrap band, the L(N, D) frontier, the target
predicted and actual), ``isoflop.png`` (loss vs N per budget with the fitted curves and minima),
``prediction.png`` (predicted vs actual loss, and the downstream metric against the loss) and
``scaling.md``, a section the report card can include as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from chatforge.scaling_fit import LossLaw, MetricLaw, effective_tokens


def _law(pred: dict) -> LossLaw:
    p = pred["loss_law"]
    return LossLaw(
        E=p["E"], A=p["A"], alpha=p["alpha"], B=p["B"], beta=p["beta"], form=p.get("form", "chinchilla")
    )


def _fit_tokens(pred: dict, d: Any) -> Any:
    """Tokens trained on, as the fitted law counts them (effective tokens when the data repeats)."""
    rep = pred.get("repeated_data")
    return effective_tokens(d, rep["unique_tokens"], rep["rstar"]) if rep else d


def _predicted(ax: Any, x: float, value: float, interval: list | None, **kw: Any) -> None:
    """A predicted point with its interval as an error bar (no bar when there is no interval)."""
    yerr = None if not interval else [[value - interval[0]], [interval[1] - value]]
    ax.errorbar([x], [value], yerr=yerr, fmt="o", color="C3", **kw)


def _actual(ax: Any, x: float, y: float) -> None:
    ax.plot([x], [y], "*", ms=13, color="C2", label="target: actual")


def plot_loss_vs_compute(s: dict, out: Path) -> Path:
    rows, pred = s["ladder"], s.get("prediction")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = np.array([r["n_params"] for r in rows], dtype=float)
    sc = ax.scatter(
        [r["compute"] for r in rows],
        [r["val_loss"] for r in rows],
        c=np.log10(ns),
        cmap="viridis",
        s=28,
        label="ladder runs",
        zorder=3,
    )
    fig.colorbar(sc, ax=ax, label="log10 N (non-embedding params)")
    if pred:
        band = pred["compute_law_band"]
        c = np.array(band["compute"])
        cl = pred["compute_law"]
        ax.plot(c, band["mid"], "k-", lw=1.2, label=f"L(C) = {cl['E']:.2f} + {cl['a']:.3g}·C^-{cl['b']:.3f}")
        if band.get("lo"):
            ax.fill_between(
                c,
                band["lo"],
                band["hi"],
                color="k",
                alpha=0.12,
                label=f"{pred['interval_level']:.0%} interval",
            )
        ax.plot(c, _law(pred).frontier(c), "C1--", lw=1.2, label="compute-optimal L(N, D)")
        p = pred["predicted"]
        _predicted(
            ax,
            pred["target"]["compute"],
            p["val_loss"],
            p["val_loss_interval"],
            capsize=4,
            label="target: predicted",
        )
    if s.get("check"):
        _actual(ax, s["prediction"]["target"]["compute"], s["check"]["actual_val_loss"])
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6·N·D (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{s['name']}: loss vs compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_isoflop(s: dict, out: Path) -> Path:
    rows, pred = s["ladder"], s.get("prediction")
    budgets = sorted({r["budget"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(budgets):
        rs = sorted((r for r in rows if r["budget"] == c), key=lambda r: r["n_params"])
        color = f"C{i % 10}"
        ax.plot(
            [r["n_params"] for r in rs], [r["val_loss"] for r in rs], "o", color=color, label=f"C = {c:.2g}"
        )
        if pred:
            n = np.geomspace(
                min(r["n_params"] for r in rows) / 1.5, max(r["n_params"] for r in rows) * 1.5, 60
            )
            d = _fit_tokens(pred, c / (6 * n))
            ax.plot(n, _law(pred)(n, d), "-", color=color, lw=1, alpha=0.7)
    if pred:
        mins = pred["isoflop_minima"]
        ax.plot([m["n_opt"] for m in mins], [m["loss"] for m in mins], "kx", ms=9, label="isoFLOP minima")
    ax.set_xscale("log")
    ax.set_xlabel("N (non-embedding parameters)")
    ax.set_ylabel("validation loss")
    ax.set_title(
        "IsoFLOP profiles (lines: fitted L(N, D) at D = C/6N)" if pred else "IsoFLOP profiles (measured)"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_prediction(s: dict, out: Path) -> Path:
    pred, chk = s["prediction"], s.get("check")
    p = pred["predicted"]
    has_metric = bool(p.get("metric"))
    fig, axes = plt.subplots(1, 2 if has_metric else 1, figsize=(10 if has_metric else 5, 4.2), squeeze=False)
    ax = axes[0][0]
    labels = ["L(N, D)", "L(C)"]
    vals = [p["val_loss"], p["compute_law_val_loss"]]
    cis = [p["val_loss_interval"], p["compute_law_interval"]]
    for i, (v, ci) in enumerate(zip(vals, cis)):
        _predicted(ax, i, v, ci, capsize=5, label="predicted" if i == 0 else None)
    env = p.get("val_loss_envelope")
    if env:  # the wider error bar: the other form and the seed noise too
        ax.plot([0, 0], env, color="C0", lw=6, alpha=0.25, solid_capstyle="butt", label="envelope")
    if chk:
        a = chk["actual_val_loss"]
        ax.axhline(a, color="C2", lw=1.5, label=f"actual {a:.4f} (error {chk['relative_error']:.2%})")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel("target validation loss")
    ax.set_title(f"target {pred['target']['shape']}, {pred['target']['compute']:.2g} FLOPs")
    ax.legend(fontsize=8)
    if has_metric:
        ax = axes[0][1]
        rows = s["ladder"]
        metric = p["metric"]
        ax.plot(
            [r["val_loss"] for r in rows], [r[metric] for r in rows], "o", color="C0", label="ladder runs"
        )
        ml = pred["metric_law"]
        seen = [r["val_loss"] for r in rows] + [p["val_loss"]] + ([chk["actual_val_loss"]] if chk else [])
        lo = min(seen) - 0.1
        hi = max(r["val_loss"] for r in rows) + 0.1
        grid = np.linspace(lo, hi, 80)
        ax.plot(grid, MetricLaw(**ml)(grid), "k-", lw=1, label="sigmoid fit")
        _predicted(
            ax, p["val_loss"], p["metric_value"], p["metric_interval"], capsize=4, label="target: predicted"
        )
        if chk and chk.get("actual_metric") is not None:
            _actual(ax, chk["actual_val_loss"], chk["actual_metric"])
        ax.invert_xaxis()
        ax.set_xlabel("validation loss")
        ax.set_ylabel(metric)
        ax.set_title(f"downstream: {metric} vs loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _f(x: Any, nd: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) >= 1e4 or (x and abs(x) < 1e-3) else f"{x:.{nd}f}"
    return str(x)


def _ci(ci: list[float] | None, nd: int = 4) -> str:
    return "–" if not ci else f"[{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def _frontier_line(pred: dict, lvl: str) -> str:
    co, front = pred["compute_optimal_at_target"], pred.get("frontier")
    if not front:
        return "- isoFLOP minima (approach 2): fewer than two budgets bracket their optimum — no frontier fit"
    return (
        f"- isoFLOP minima (approach 2): N_opt ∝ C^{front['a']:.3f}; at the target's compute"
        f" N = {co['isoflop_n_params']:,.0f}, **{co['isoflop_tokens_per_param']:.1f} tokens per parameter**"
        f" ({lvl} {_ci(co['isoflop_tokens_per_param_interval'], 1)})"
    )


def _law_text(law: dict) -> str:
    e, a, al, b, be = law["E"], law["A"], law["alpha"], law["B"], law["beta"]
    if law.get("form") == "kaplan":
        return f"{e:.3f} + (({a:.4g}/N)^{al / be:.3f} + {b:.4g}/D)^{be:.3f} (Kaplan form: α = {al:.3f}, β = {be:.3f})"
    return f"{e:.3f} + {a:.4g}/N^{al:.3f} + {b:.4g}/D^{be:.3f}"


def _backtest_lines(pred: dict) -> list[str]:
    bts = pred.get("backtest") or {}
    if "budget" in bts:  # a prediction written before the form selection: one Chinchilla backtest
        bts = {"selected": "chinchilla", "chinchilla": bts}
    lines = []
    for form, bt in bts.items():
        if form == "selected":
            continue
        if not bt:
            lines.append(f"- ladder backtest ({form}): too few runs below the largest budget for a fit")
            continue
        lines.append(
            f"- ladder backtest ({form}{', selected' if form == bts.get('selected') else ''}): L(N, D) fitted on"
            f" the {bt['fit_rungs']} rungs below {bt['budget']:.3g} FLOPs predicts that budget's"
            f" {len(bt['rungs'])} rungs within {bt['max_relative_error']:.2%} (mean {bt['mean_relative_error']:.2%};"
            " 2x extrapolation, the target's is 30x)"
        )
    for form, o in (pred.get("other_loss_laws") or {}).items():
        lines.append(
            f"- not selected, {form}: L(N, D) = {_law_text(o)} would predict {o['val_loss']:.4f},"
            f" {o['tokens_per_param']:.1f} tokens per parameter at the target's compute"
        )
    return lines


def _noise_lines(pred: dict) -> list[str]:
    noise = pred.get("seed_noise")
    if not noise:
        return []
    line = (
        f"- seed noise: {noise['rungs']} rungs trained with other seeds too differ by {noise['relative_sd']:.2%}"
        " (pooled standard deviation of the log loss)"
    )
    if "prediction_relative_sd" in noise:
        line += (
            f"; refitting the law's own losses plus noise of that size moves the target's prediction by"
            f" **{noise['prediction_relative_sd']:.1%}** (sd): no prediction from this ladder is surer than that"
        )
    return [line]


def _repeat_lines(pred: dict) -> list[str]:
    rep = pred.get("repeated_data")
    if not rep:
        return []
    t = pred["target"]
    return [
        f"- the data repeats ({rep['unique_tokens']:,} unique training tokens; the rungs see them up to"
        f" {rep['max_rung_epochs']:.1f} times, the target {rep['target_epochs']:.1f} times): D in the laws is"
        f" effective tokens, D' = U + U·R*·(1 − e^(−(D/U − 1)/R*)) with R* = {rep['rstar']:g} (Muennighoff et"
        f" al. 2023) — the target's {t['tokens']:,} tokens count as {rep['target_effective_tokens']:,}"
    ]


def _ladder_table(rows: list[dict], downstream: str | None) -> list[str]:
    """The measured rungs, one a row: without a prediction this is the whole result."""
    metric = downstream if downstream in ("world_cloze", "token_accuracy") else None
    head = "| rung | N | D (tokens) | steps | C (FLOPs) | val loss |" + (f" {metric} |" if metric else "")
    out = [head, "|---" * (6 + bool(metric)) + "|"]
    for r in sorted(rows, key=lambda r: (r["budget"], r["n_params"], r.get("replicate", 0))):
        line = (
            f"| {r['name']} | {r['n_params']:,} | {r['tokens']:,} | {r['steps']} | {r['compute']:.3g} |"
            f" {r['val_loss']:.4f} |"
        )
        if metric:
            line += f" {_f(r.get(metric), 3)} |"
        out.append(line)
    return out


def markdown(s: dict) -> str:
    rows = s["ladder"]
    lines = [
        f"## Scaling: {s['name']}",
        "",
        f"Corpus {', '.join(s['corpus'])}; vocab {s['vocab_size']}; {len(rows)} ladder runs over"
        f" {len({r['budget'] for r in rows})} budgets: {s['ladder_wall_seconds']:.0f} s of wall time summed over"
        f" the runs, {s.get('ladder_cpu_seconds', 0):.0f} s CPU (on a shared machine wall time is inflated;"
        f" with scaling.workers > 1 the runs overlap — this invocation took {s.get('ladder_ran_seconds', 0):.0f} s);"
        f" every rung {min(r['steps'] for r in rows)}–{max(r['steps'] for r in rows)} steps, at most"
        f" {max(r['epochs'] for r in rows):.2f} epochs; validation on the same {s['val_tokens']:,} held-out tokens.",
        "",
    ]
    pred, chk = s.get("prediction"), s.get("check")
    fe = s.get("fit_error")
    if fe:
        lines += [
            f"**The fit failed: {fe['fit']}** — {fe['error']}. No prediction was made; the plots show the"
            " measured rungs only.",
            "",
        ]
    if not pred:
        lines += _ladder_table(rows, s.get("downstream"))
    if pred:
        law, cl, p = pred["loss_law"], pred["compute_law"], pred["predicted"]
        co = pred["compute_optimal_at_target"]
        t = pred["target"]
        iv = law["intervals"]
        lvl = f"{pred['interval_level']:.0%}"
        lines += [
            f"- L(N, D) = {_law_text(law)}"
            f" (α {lvl} {_ci(iv.get('alpha'), 3)}, β {_ci(iv.get('beta'), 3)}, E {_ci(iv.get('E'), 3)};"
            f" N = {pred['n_definition']})",
            f"- L(C) = {cl['E']:.3f} + {cl['a']:.4g}·C^-{cl['b']:.4f} (on the isoFLOP minima)",
            f"- compute-optimal at {co['compute']:.3g} FLOPs, L(N, D) (approach 3): N = {co['n_params']:,.0f},"
            f" D = {co['tokens']:,.0f} — **{co['tokens_per_param']:.1f} tokens per parameter**"
            f" ({lvl} {_ci(co['tokens_per_param_interval'], 1)})",
            _frontier_line(pred, lvl),
            *_backtest_lines(pred),
            *_noise_lines(pred),
            *_repeat_lines(pred),
            f"- target {t['shape']} (N = {t['n_params']:,}, D = {t['tokens']:,}, C = {t['compute']:.3g},"
            f" {pred['target_compute_over_largest_rung']:.0f}× the largest rung): predicted val loss"
            f" **{p['val_loss']:.4f}** {lvl} {_ci(p['val_loss_interval'])} (envelope with the other form and the"
            f" seed noise {_ci(p.get('val_loss_envelope'))}), L(C) says {p['compute_law_val_loss']:.4f}"
            f" {_ci(p['compute_law_interval'])}; written {pred['created']}",
        ]
        if p.get("metric"):
            lines.append(f"- predicted {p['metric']}: {p['metric_value']:.3f} {_ci(p['metric_interval'], 3)}")
    if chk:
        lines += [
            "",
            "| | predicted | interval | actual | relative error |",
            "|---|---|---|---|---|",
            f"| val loss, L(N, D) | {chk['predicted_val_loss']:.4f} | {_ci(chk['interval'])} |"
            f" {chk['actual_val_loss']:.4f} | {chk['relative_error']:.2%} |",
            f"| the same, envelope (other form, seed noise) | | {_ci(chk.get('envelope'))} | inside:"
            f" {('yes' if chk['inside_envelope'] else 'no') if chk.get('envelope') else '–'} | |",
            f"| val loss, L(C) (compute-optimal frontier) | {chk['compute_law_val_loss']:.4f} | {_ci(pred['predicted']['compute_law_interval'])} |"
            f" {chk['actual_val_loss']:.4f} | {chk['compute_law_relative_error']:.2%} |",
        ]
        if chk.get("metric"):
            lines.append(
                f"| {chk['metric']} | {chk['predicted_metric']:.3f} | {_ci(chk['metric_interval'], 3)} |"
                f" {_f(chk['actual_metric'], 3)} | {_f(chk['metric_abs_error'], 3)} (absolute) |"
            )
        lines += [
            "",
            f"Prediction written before the target trained: {'yes' if chk['predicted_before_training'] else 'NO'};"
            f" unchanged since (sha256): {'yes' if chk.get('prediction_unchanged') else 'NO'};"
            f" target trained {chk['target_train_seconds']:.0f} s wall, {s['target'].get('cpu_seconds', 0):.0f} s"
            f" CPU, {chk['target_epochs']:.2f} epochs of the training data.",
        ]
    for f in ("loss_vs_compute.png", "isoflop.png", "prediction.png"):
        if f in s.get("files", {}).values():
            lines.append(f"\n![{f}]({f})")
    return "\n".join(lines) + "\n"


def write(s: dict, out_dir: Path) -> dict[str, str]:
    """Plots and ``scaling.md`` in ``out_dir``; returns their file names."""
    files = {"loss_vs_compute": plot_loss_vs_compute(s, out_dir / "loss_vs_compute.png").name}
    if s.get("prediction"):
        files["isoflop"] = plot_isoflop(s, out_dir / "isoflop.png").name
        files["prediction"] = plot_prediction(s, out_dir / "prediction.png").name
    else:
        files["isoflop"] = plot_isoflop(s, out_dir / "isoflop.png").name
    s = {**s, "files": files}
    (out_dir / "scaling.md").write_text(markdown(s))
    files["markdown"] = "scaling.md"
    files["json"] = "scaling.json"
    return files
