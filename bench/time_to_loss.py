"""Time to a fixed validation loss: chatforge's default recipe against a plain PyTorch/transformers loop.

Both sides train the same shape on the same real text with the same tokenizer, the same training
windows (``lm_batch_fn``), batch size, sequence length and number of steps, in one process, on fp32
CPU with the same thread count, and are evaluated on the same fixed validation windows at the same
cadence. Only training steps are timed (evaluation is excluded on both sides).

- chatforge: ``GPT`` trained by the ``Trainer`` with the recipe's pretrain settings (Muon + AdamW,
  WSD schedule, the recipe's init), ``lm_batch_fn`` / ``lm_loss_fn`` from ``pretrain.py``;
  (elapsed_s, val_loss) points come from the Trainer's metrics JSONL.
- baseline: transformers' ``LlamaForCausalLM`` (sdpa attention) with the same parameter count and HF's
  default init, ``torch.optim.AdamW`` (lr 1e-3, betas (0.9, 0.95), weight decay 0.1 on matrices,
  gradient clipping 1.0), linear warmup over 5% of the steps then cosine to 10% (nanoGPT style).

The target is the baseline's final validation loss unless ``--target`` is given; time to target is
the first evaluation at or below it, linearly interpolated in training time from the evaluation
before. ``speedup`` = baseline time / chatforge time (null when chatforge never gets there).
Because a shared machine's load comes and goes, the JSON also gives steps to target and a
``speedup_median_step`` that multiplies steps to target by each side's median step time.

    .venv/bin/python bench/time_to_loss.py                                   # tinyshakespeare
    .venv/bin/python bench/time_to_loss.py --set pretrain.muon_lr=0.03 --out r.json
    .venv/bin/python bench/time_to_loss.py --data ../shared/data/eltec-eng/eltec_eng_level1.jsonl.gz \\
        --max-docs 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# The plain loop's settings: a typical nanoGPT-style AdamW run, fixed whatever chatforge is set to.
BASELINE = {
    "optimizer": "torch.optim.AdamW",
    "lr": 1e-3,
    "betas": (0.9, 0.95),
    "weight_decay": 0.1,  # on 2-D weights only, as nanoGPT does
    "warmup_frac": 0.05,
    "min_lr_ratio": 0.1,
    "grad_clip": 1.0,
    "init": "transformers default (normal, std=initializer_range=0.02)",
}


def log(msg: str) -> None:
    print(f"[time_to_loss] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", default=str(DEFAULT_DATA), help="a .txt file, or a .jsonl(.gz) with a text field"
    )
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (eltec: text)")
    p.add_argument("--max-docs", type=int, default=0, help="read at most this many documents (0 = all)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out")
    p.add_argument("--min-chars", type=int, default=1, help="data filter; Shakespeare's speeches are short")
    p.add_argument("--recipe", default="cpu-demo")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override chatforge's recipe only, e.g. pretrain.muon_lr=0.03 or model.init_std=0.01",
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=4, help="validation windows = this x batch size")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=1337, help="data windows and init, both sides")
    p.add_argument(
        "--target", type=float, default=None, help="validation loss to reach (default: baseline's final)"
    )
    p.add_argument(
        "--baseline-from",
        default=None,
        metavar="JSON",
        help="reuse the baseline of an earlier run's output (same data and shape) instead of training it",
    )
    p.add_argument(
        "--work-dir", default=None, help="keep the prepared data here and reuse it (default: a temp dir)"
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data: our own pipeline


def data_config(args: argparse.Namespace) -> Any:
    from chatforge.config import DataConfig, SourceConfig

    path = Path(args.data)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        src = SourceConfig(kind="jsonl", path=str(path), text_field=args.text_field, max_docs=args.max_docs)
    else:  # plain text: one document per blank-line block (a speech, for Shakespeare)
        src = SourceConfig(kind="text", path=str(path), split_on_blank_lines=True, max_docs=args.max_docs)
    return DataConfig(
        sources=[src],
        min_chars=args.min_chars,
        val_fraction=args.val_fraction,
        num_workers=args.threads,
        seed=0,
    )


def prepare_data(args: argparse.Namespace, run_cfg: Any) -> dict[str, Any]:
    """Run ``corpus.prepare`` and ``tokenizer.run`` into the run dir, unless an identical prep is there."""
    from chatforge import tokenizer
    from chatforge.config import to_dict
    from chatforge.data import corpus

    key = {"data": to_dict(run_cfg.data), "tokenizer": to_dict(run_cfg.tokenizer)}
    key_file = run_cfg.run_dir / "prep_key.json"
    stats_file = run_cfg.run_dir / "prep_stats.json"
    index = run_cfg.run_dir / "data" / "index.json"
    fresh = key_file.is_file() and stats_file.is_file() and index.is_file()
    if fresh and json.loads(key_file.read_text()) == key:
        log(f"reusing prepared data in {run_cfg.run_dir}")
        return json.loads(stats_file.read_text())
    t0 = time.perf_counter()
    log(f"preparing {args.data}")
    prep = corpus.prepare(run_cfg)
    tok = tokenizer.run(run_cfg)
    stats = {
        "docs": prep["docs"],
        "chars": prep["chars"],
        "dropped": prep["dropped"],
        "vocab_size": tok["vocab_size"],
        "tokens": tok["tokens"],
        "bytes_per_token": tok["bytes_per_token"],
        "prep_s": round(time.perf_counter() - t0, 2),
    }
    stats_file.write_text(json.dumps(stats, indent=2) + "\n")
    key_file.write_text(json.dumps(key, indent=2) + "\n")
    return stats


# ---------------------------------------------------------------- configs


def chatforge_config(args: argparse.Namespace, runs_dir: Path) -> Any:
    """The recipe with the bench's shared shape, then the user's ``--set``, then what must stay fixed."""
    from chatforge.config import load_config

    shared = [
        f"pretrain.steps={args.steps}",
        f"pretrain.batch_size={args.batch_size}",
        f"pretrain.seq_len={args.seq_len}",
        f"pretrain.seed={args.seed}",
        f"tokenizer.vocab_size={args.vocab_size}",
    ]
    fixed = [  # same cadence, same device and precision as the baseline; no checkpoints in the timing
        f"pretrain.eval_every={args.eval_every}",
        f"pretrain.eval_batches={args.eval_batches}",
        f"pretrain.threads={args.threads}",
        "pretrain.device=cpu",
        "pretrain.dtype=fp32",
        "pretrain.compile=false",
        "pretrain.ckpt_every=0",
        "pretrain.log_every=1",  # a train record (with elapsed_s) per step: eval points join on step
        "pretrain.progress=false",
    ]
    cfg = load_config(args.recipe, shared + list(args.overrides) + fixed)
    for k in ("tokenizer.", "data."):
        if any(o.startswith(k) for o in args.overrides):
            raise SystemExit(
                f"time_to_loss: --set {k}*: data and tokenizer are shared; use the bench options"
            )
    cfg.data = data_config(args)
    cfg.runs_dir = str(runs_dir)
    cfg.name = "bench"
    cfg.validate()
    return cfg


def shared_train_config(args: argparse.Namespace) -> Any:
    """Windows and eval set for the baseline (and the eval set of both): never touched by ``--set``."""
    from chatforge.config import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        eval_batches=args.eval_batches,
        eval_every=args.eval_every,
    )


# ---------------------------------------------------------------- curves


def first_crossing(points: list[list[float]], target: float) -> float | None:
    """x at which ``points`` ([x, loss], x increasing) first reach ``target``, linearly interpolated."""
    for i, (x, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return float(x)
            x0, l0 = points[i - 1]
            return float(x0 + (l0 - target) / (l0 - loss) * (x - x0))
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# ---------------------------------------------------------------- chatforge side


def run_chatforge(cfg: Any, val_windows: torch.Tensor, eval_bs: int, vocab: int) -> dict[str, Any]:
    from chatforge.data.corpus import TokenShards
    from chatforge.model import GPT
    from chatforge.train.loop import Trainer, read_metrics, seed_everything, setup_runtime
    from chatforge.train.pretrain import evaluate_lm, lm_batch_fn, lm_loss_fn, model_config_for

    tc = cfg.pretrain
    train = TokenShards(cfg.run_dir / "data", "train")
    rt = setup_runtime(tc)
    seed_everything(tc.seed)
    model = GPT(model_config_for(cfg.model, vocab))
    init_loss = evaluate_lm(model.eval(), val_windows, eval_bs)

    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        return {"val_loss": round(evaluate_lm(m, val_windows, eval_bs), 5)}

    work = cfg.run_dir / "train" / "chatforge"
    trainer = Trainer(
        model,
        tc,
        work,
        loss_fn=lm_loss_fn,
        batch_fn=lm_batch_fn(train, tc),
        save_fn=lambda m, p, st: None,  # ckpt_every=0: nothing is saved during the timed run
        load_fn=lambda m, p: None,
        evaluate=evaluate,
        runtime=rt,
        desc="chatforge",
    )
    log(f"chatforge: {model.num_params(non_embedding=False):,} params, {tc.steps} steps")
    summary = trainer.fit(resume=False)
    # (elapsed_s, val_loss) from the metrics log: each eval record joins the train record of its step.
    metrics = work / "metrics.jsonl"
    elapsed = {r["step"]: r["elapsed_s"] for r in read_metrics(metrics, "train")}
    evals = [(r["step"], r["val_loss"]) for r in read_metrics(metrics, "eval")]
    steps = [0] + [s for s, _ in evals]
    curve = [[0.0, round(init_loss, 5)]] + [[elapsed[s], v] for s, v in evals]
    step_times = [b - a for a, b in zip([0.0, *list(elapsed.values())], elapsed.values(), strict=False)]
    return {
        "params": model.num_params(non_embedding=False),
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "elapsed_s": round(summary["elapsed_s"], 3),
        "eval_steps": steps,
        "curve": curve,
        "step_times": step_times,
        "settings": {
            "optimizer": tc.optimizer,
            "lr": tc.lr,
            "muon_lr": tc.muon_lr,
            "muon_momentum": tc.muon_momentum,
            "weight_decay": tc.weight_decay,
            "betas": list(tc.betas),
            "schedule": tc.schedule,
            "warmup_steps": tc.warmup_steps,
            "decay_frac": tc.decay_frac,
            "min_lr_ratio": tc.min_lr_ratio,
            "grad_clip": tc.grad_clip,
            "batch_size": tc.batch_size,
            "seq_len": tc.seq_len,
            "init_std": cfg.model.init_std,
        },
    }


# ---------------------------------------------------------------- baseline side


class _Logits(nn.Module):
    """Makes a transformers model look like ours to ``evaluate_lm``: ids in, logits out."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def _baseline_lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return BASELINE["lr"] * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    lo = BASELINE["min_lr_ratio"]
    return BASELINE["lr"] * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t)))


def run_baseline(
    cfg: Any, tc: Any, val_windows: torch.Tensor, eval_bs: int, vocab: int, threads: int
) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.checkpoint import hf_config
    from chatforge.data.corpus import TokenShards
    from chatforge.train.loop import seed_everything
    from chatforge.train.pretrain import evaluate_lm, lm_batch_fn, model_config_for

    torch.set_num_threads(threads)
    train = TokenShards(cfg.run_dir / "data", "train")
    batch_fn = lm_batch_fn(train, tc)
    hf_cfg = hf_config(model_config_for(cfg.model, vocab))
    hf_cfg["initializer_range"] = LlamaConfig().initializer_range  # HF's default, not our init_std
    seed_everything(tc.seed)
    model = LlamaForCausalLM._from_config(LlamaConfig(**hf_cfg), attn_implementation="sdpa")
    evaluator = _Logits(model)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": BASELINE["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=BASELINE["lr"],
        betas=BASELINE["betas"],
    )
    warmup = max(1, round(BASELINE["warmup_frac"] * tc.steps))

    def val_loss() -> float:
        model.eval()
        loss = evaluate_lm(evaluator, val_windows, eval_bs)
        model.train()
        return round(loss, 5)

    log(f"baseline: {params:,} params, {tc.steps} steps")
    curve = [[0.0, val_loss()]]
    steps = [0]
    step_times: list[float] = []
    elapsed, tokens = 0.0, 0
    model.train()
    for step in range(tc.steps):
        t0 = time.perf_counter()  # same span as the Trainer's: batch, forward, backward, clip, step
        for g in opt.param_groups:
            g["lr"] = _baseline_lr(step, tc.steps, warmup)
        batch = batch_fn(step, 0, 0, 1)
        labels = batch["labels"].contiguous()
        # transformers' own loss path; shift_labels because our labels are already shifted.
        loss = model(input_ids=batch["input_ids"], labels=labels, shift_labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), BASELINE["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_f = loss.item()
        dt = time.perf_counter() - t0
        elapsed += dt
        step_times.append(dt)
        tokens += labels.numel()
        if not math.isfinite(loss_f):
            raise SystemExit(f"time_to_loss: baseline loss became {loss_f} at step {step}")
        done = step + 1
        if done % tc.eval_every == 0 or done == tc.steps:
            curve.append([round(elapsed, 3), val_loss()])
            steps.append(done)
    return {
        "params": params,
        "steps": tc.steps,
        "tokens": tokens,
        "elapsed_s": round(elapsed, 3),
        "eval_steps": steps,
        "curve": curve,
        "step_times": step_times,
        "settings": {**BASELINE, "betas": list(BASELINE["betas"]), "warmup_steps": warmup},
    }


# ---------------------------------------------------------------- main


def summarise(side: dict[str, Any], target: float) -> dict[str, Any]:
    steps_curve = [[s, v] for s, (_, v) in zip(side["eval_steps"], side["curve"], strict=True)]
    t = first_crossing(side["curve"], target)
    n = first_crossing(steps_curve, target)
    median_step = statistics.median(side["step_times"]) if side["step_times"] else 0.0
    return {
        "time_to_target_s": round(t, 3) if t is not None else None,
        "steps_to_target": round(n, 2) if n is not None else None,
        "median_step_s": round(median_step, 4),
        "median_time_to_target_s": round(n * median_step, 3) if n is not None else None,
        "final_val_loss": side["curve"][-1][1],
        "best_val_loss": min(v for _, v in side["curve"]),
        "tokens_per_s": round(side["tokens"] / side["elapsed_s"], 1) if side["elapsed_s"] else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not Path(args.data).is_file():
        raise SystemExit(
            f"time_to_loss: no data file at {args.data}; pass --data PATH (a .txt, or a .jsonl(.gz) with a"
            f" {args.text_field!r} field such as ../shared/data/eltec-eng/eltec_eng_level1.jsonl.gz)"
        )
    torch.set_num_threads(args.threads)
    from chatforge.data.corpus import TokenShards
    from chatforge.train.pretrain import validation_windows

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    tmp = None
    if args.work_dir:
        runs_dir = Path(args.work_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="time_to_loss_")
        runs_dir = Path(tmp.name)
    try:
        cfg = chatforge_config(args, runs_dir)
        data = prepare_data(args, cfg)
        vocab = int(data["vocab_size"])
        tc = shared_train_config(args)
        val_windows = validation_windows(TokenShards(cfg.run_dir / "data", "val"), tc)
        eval_bs = args.batch_size

        if args.baseline_from:
            prev = json.loads(Path(args.baseline_from).read_text())
            base = prev["raw"]["baseline"]
            for k in ("steps", "batch_size", "seq_len", "eval_every", "seed", "threads"):
                if prev.get(k) != getattr(args, k):
                    raise SystemExit(f"time_to_loss: --baseline-from {args.baseline_from}: {k} differs")
            if prev["data"]["tokens"] != data["tokens"] or prev["eval_tokens"] != val_windows[:, 1:].numel():
                raise SystemExit(f"time_to_loss: --baseline-from {args.baseline_from}: data differs")
            log(f"baseline reused from {args.baseline_from}")
        else:
            base = run_baseline(cfg, tc, val_windows, eval_bs, vocab, args.threads)
        log(f"baseline: final val loss {base['curve'][-1][1]:.4f} in {base['elapsed_s']:.1f}s of training")
        cf = run_chatforge(cfg, val_windows, eval_bs, vocab)
        log(f"chatforge: final val loss {cf['curve'][-1][1]:.4f} in {cf['elapsed_s']:.1f}s of training")
    finally:
        if tmp is not None:
            tmp.cleanup()

    target = args.target if args.target is not None else base["curve"][-1][1]
    s_cf, s_base = summarise(cf, target), summarise(base, target)
    speedup = _ratio(s_base["time_to_target_s"], s_cf["time_to_target_s"])
    result: dict[str, Any] = {
        "data": {"path": args.data, "max_docs": args.max_docs, **data},
        "tokens": {"chatforge": cf["tokens"], "baseline": base["tokens"]},
        "params": {"chatforge": cf["params"], "baseline": base["params"]},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "eval_tokens": int(val_windows.shape[0] * (val_windows.shape[1] - 1)),
        "threads": args.threads,
        "target": target,
        "target_source": "--target" if args.target is not None else "baseline final val loss",
        "reached_target": {"chatforge": s_cf["time_to_target_s"] is not None, "baseline": True},
        "time_to_target_s": {"chatforge": s_cf["time_to_target_s"], "baseline": s_base["time_to_target_s"]},
        "speedup": speedup,
        "steps_to_target": {"chatforge": s_cf["steps_to_target"], "baseline": s_base["steps_to_target"]},
        "speedup_steps": _ratio(s_base["steps_to_target"], s_cf["steps_to_target"]),
        "median_step_s": {"chatforge": s_cf["median_step_s"], "baseline": s_base["median_step_s"]},
        "speedup_median_step": _ratio(s_base["median_time_to_target_s"], s_cf["median_time_to_target_s"]),
        "final_val_loss": {"chatforge": s_cf["final_val_loss"], "baseline": s_base["final_val_loss"]},
        "best_val_loss": {"chatforge": s_cf["best_val_loss"], "baseline": s_base["best_val_loss"]},
        "tokens_per_s": {"chatforge": s_cf["tokens_per_s"], "baseline": s_base["tokens_per_s"]},
        "train_s": {"chatforge": cf["elapsed_s"], "baseline": base["elapsed_s"]},
        "curves": {"chatforge": cf["curve"], "baseline": base["curve"]},
        "eval_steps": {"chatforge": cf["eval_steps"], "baseline": base["eval_steps"]},
        "settings": {"chatforge": cf["settings"], "baseline": base["settings"]},
        "overrides": list(args.overrides),
        "baseline_reused_from": args.baseline_from,
        "note": None
        if speedup is not None
        else "chatforge did not reach the target within its steps; speedup is null",
        "env": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result))
    if args.out:
        # The file also keeps the baseline's per-step times, so that --baseline-from can reuse it.
        full = {**result, "raw": {"baseline": base}}
        Path(args.out).write_text(json.dumps(full, indent=2) + "\n")
    return result


if __name__ == "__main__":  # the tokenizer stage spawns worker processes: keep this guard
    main()
