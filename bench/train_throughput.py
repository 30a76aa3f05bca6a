"""Training throughput of chatforge's GPT against transformers' LlamaForCausalLM (CPU, fp32).

For each shape both models get the identical config and the identical weights (ours copied into HF's
state dict), the same batch and the same AdamW; each computes the loss its own library's way (ours:
``lm_loss``; transformers: ``labels=`` with ``shift_labels=`` so the targets are the same). Each model lives in its own
worker subprocess so that its peak RSS is its own; the parent drives the two workers one step at a time,
alternating the order (A B, B A, ...), so drift in machine speed hits both equally. Warmup steps are not
timed. FLOPs are counted the same way for both (``GPT.flops_per_token``), and MFU is against the fp32
matmul peak measured in this run.

    .venv/bin/python bench/train_throughput.py                # both shapes, JSON on stdout
    .venv/bin/python bench/train_throughput.py --shapes S --steps 4 --out s.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from shapes import SHAPES, model_config

IMPLS = ("chatforge", "transformers")
SEED = 1234


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


# ---------------------------------------------------------------- worker (one model per process)


def worker(impl: str, shape_name: str, threads: int) -> None:
    """Build one model and answer JSON-line commands on stdin: ``step`` (one timed step) or ``exit``."""
    torch.set_num_threads(threads)
    from chatforge.model import GPT, lm_loss

    rss_base = _peak_rss_mb()
    shape = SHAPES[shape_name]
    cfg = model_config(shape)
    torch.manual_seed(SEED)
    ours = GPT(cfg)
    model: torch.nn.Module
    if impl == "chatforge":
        model = ours

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return lm_loss(model(x), y)

    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from chatforge.checkpoint import hf_config

        hf_cfg = LlamaConfig(**hf_config(cfg))
        # sdpa is transformers' default; named here so the comparison cannot silently fall back to eager.
        model = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
        model.load_state_dict(ours.state_dict(), strict=True)
        del ours

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # transformers' own loss path (ForCausalLMLoss); shift_labels makes its targets equal ours.
            return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(SEED)
    data = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    with torch.no_grad():
        init_loss = loss_of(x, y).item()
    _send({"ready": True, "init_loss": init_loss, "rss_base_mb": rss_base})

    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "exit":
            _send({"peak_rss_mb": _peak_rss_mb()})
            return
        t0 = time.perf_counter()
        loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        _send({"dt": dt, "loss": loss.item()})


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- parent


class Worker:
    def __init__(self, impl: str, shape: str, threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", impl, "--shapes", shape, "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.hello = self._recv()

    def _recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with status {self.proc.wait()}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        return self._recv()

    def close(self) -> dict[str, Any]:
        out = self.ask("exit")
        self.proc.wait()
        return out


def matmul_peak(threads: int, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 7) -> dict[str, Any]:
    """fp32 square-matmul FLOP/s: median over repeats per size, the peak is the best size."""
    torch.set_num_threads(threads)
    by_size: dict[str, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        by_size[str(n)] = 2 * n**3 / statistics.median(times)
    return {"peak_flops": max(by_size.values()), "by_size": by_size}


def bench_shape(name: str, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    from chatforge.model import GPT

    shape = SHAPES[name]
    with torch.device("meta"):  # only for counting: no memory, no init
        fpt = GPT(model_config(shape)).flops_per_token(shape["seq"])
    tokens = shape["batch"] * shape["seq"]
    workers = {impl: Worker(impl, name, threads) for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    losses: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    try:
        for i in range(warmup + steps):
            order = IMPLS if i % 2 == 0 else IMPLS[::-1]
            for impl in order:
                r = workers[impl].ask("step")
                losses[impl].append(r["loss"])
                if i >= warmup:
                    times[impl].append(r["dt"])
        finals = {impl: w.close() for impl, w in workers.items()}
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()

    out: dict[str, Any] = {
        "config": shape,
        "tokens_per_step": tokens,
        "flops_per_token": fpt,
    }
    for impl in IMPLS:
        step_s = statistics.median(times[impl])
        tps = tokens / step_s
        out[impl] = {
            "step_s_median": round(step_s, 4),
            # On a shared machine other processes only ever slow a step down: the fastest step is the
            # least disturbed one, so it is reported beside the median.
            "step_s_min": round(min(times[impl]), 4),
            "tokens_per_s_best": round(tokens / min(times[impl]), 1),
            "step_s_all": [round(t, 4) for t in times[impl]],
            "tokens_per_s": round(tps, 1),
            "flops_per_s": round(fpt * tps, 0),
            "peak_rss_mb": round(finals[impl]["peak_rss_mb"], 1),
            "rss_after_import_mb": round(workers[impl].hello["rss_base_mb"], 1),
            "init_loss": workers[impl].hello["init_loss"],
            "final_loss": losses[impl][-1],
        }
    cf, hf = out["chatforge"], out["transformers"]
    out["ratio_chatforge_over_transformers"] = {
        "tokens_per_s": round(cf["tokens_per_s"] / hf["tokens_per_s"], 3),
        "tokens_per_s_best": round(cf["tokens_per_s_best"] / hf["tokens_per_s_best"], 3),
        # Steps i of A and B run back to back and so see about the same machine load: the median of
        # these per-pair ratios is the estimate least moved by other processes.
        "tokens_per_s_paired": round(
            statistics.median(h / c for c, h in zip(times["chatforge"], times["transformers"])), 3
        ),
        "peak_rss": round(cf["peak_rss_mb"] / hf["peak_rss_mb"], 3),
    }
    # Same weights, data and optimizer: the losses must agree, or the comparison is not like for like.
    out["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses["chatforge"], losses["transformers"]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="S,M", help="comma-separated subset of S,M")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model per shape")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model per shape")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(args.worker, args.shapes, args.threads)
        return
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown or args.steps < 1 or args.warmup < 0:
        ap.error(f"bad arguments (unknown shapes: {unknown}; steps must be >= 1, warmup >= 0)")

    import transformers

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    peak = matmul_peak(args.threads)
    shapes = {name: bench_shape(name, args.steps, args.warmup, args.threads) for name in names}
    # Measured again at the end: the peak is a ceiling, so a disturbed first measurement must not win.
    peak_end = matmul_peak(args.threads)
    best = max(peak, peak_end, key=lambda p: p["peak_flops"])
    for shape in shapes.values():
        for impl in IMPLS:
            shape[impl]["mfu"] = round(shape[impl]["flops_per_s"] / best["peak_flops"], 4)
    result: dict[str, Any] = {
        "bench": "train_throughput",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "fp32_matmul_peak_flops": round(best["peak_flops"], 0),
            "fp32_matmul_flops_by_size": {k: round(v, 0) for k, v in best["by_size"].items()},
            "fp32_matmul_peak_flops_start_end": [
                round(peak["peak_flops"], 0),
                round(peak_end["peak_flops"], 0),
            ],
            # Other processes on the machine make steps slower and noisier; this shows whether there were any.
            "loadavg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        },
        "settings": {"steps": args.steps, "warmup": args.warmup, "dtype": "fp32", "optimizer": "AdamW"},
        "shapes": shapes,
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
