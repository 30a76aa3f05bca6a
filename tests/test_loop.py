"""The training-loop core: exact resume after a hard kill, DDP equivalence, schedules and Muon."""

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chatforge.config import TrainConfig
from chatforge.train.loop import read_metrics
from chatforge.train.optim import lr_multiplier, orthogonalize

SCRIPT = Path(__file__).parent / "scripts" / "tiny_train.py"


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, **kw)


def _losses(work: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(work / "metrics.jsonl", "train")}


def test_resume_after_kill_replays_exactly(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    res = _run([str(full), "15", "4"], timeout=120)
    assert res.returncode == 0, res.stderr
    reference = _losses(full)
    assert len(reference) == 15

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(killed), "15", "4", "0.15"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 90
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_0000006"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "no checkpoint was written before the kill"
    killed_at = max(_losses(killed))
    assert killed_at < 15, "the run finished before it could be killed"

    res = _run([str(killed), "15", "4"], timeout=120)
    assert res.returncode == 0, res.stderr
    assert "'resumed': True" in res.stdout
    resumed = _losses(killed)
    assert sorted(resumed) == list(range(1, 16))
    assert resumed == reference  # bit-for-bit the same losses as the uninterrupted run


def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    res = _run([str(single), "6", "8", "0", "adamw"], timeout=120)
    assert res.returncode == 0, res.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(ddp),
        "6",
        "4",
        "0",
        "adamw",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(single), _losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5)
    start = read_metrics(ddp / "metrics.jsonl", "start")[0]
    assert start["world_size"] == 2
    # Same global batch: each DDP step covered as many tokens as a single-process step.
    ta = read_metrics(single / "metrics.jsonl", "train")[-1]["tokens_seen"]
    tb = read_metrics(ddp / "metrics.jsonl", "train")[-1]["tokens_seen"]
    assert ta == tb


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_and_end_where_they_should(schedule: str) -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, schedule=schedule, decay_frac=0.2, min_lr_ratio=0.1)
    vals = [lr_multiplier(s, cfg) for s in range(100)]
    assert vals[0] < vals[5] < vals[9] <= 1.0  # warmup rises
    assert max(vals) == pytest.approx(1.0)
    if schedule == "constant":
        assert vals[-1] == 1.0
    else:
        assert vals[-1] == pytest.approx(0.1, abs=0.05)
    if schedule == "wsd":
        assert all(v == 1.0 for v in vals[10:80])  # stable phase
        assert all(x >= y for x, y in itertools.pairwise(vals[80:]))  # monotone decay


def test_newton_schulz_orthogonalizes() -> None:
    g = torch.randn(64, 32)
    o = orthogonalize(g, steps=5)
    s = torch.linalg.svdvals(o)
    # The quintic iteration trades exactness for speed: singular values land near 1, not on it.
    assert s.min() > 0.5 and s.max() < 1.3
    assert o.shape == g.shape
