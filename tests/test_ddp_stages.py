"""Stages under ``torchrun`` with two gloo processes on CPU: they run, and only rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.train.loop import read_metrics
from safety_helpers import tiny_base, tiny_tokenizer


def _torchrun(runs: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "chatforge.cli", *args, "--set", f"runs_dir={runs}", "--set", "name=t"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    tiny_base(root / "t" / "base", tiny_tokenizer())
    return root


def test_moderation_trains_under_torchrun(runs: Path) -> None:
    # The classifier never calls the backbone's LM head: DDP stopped on step 2 waiting for its gradient.
    res = _torchrun(
        runs,
        "moderation",
        "train",
        *("--set", "moderation.init=base", "--set", "moderation.world_n=64"),
        *("--set", "moderation.world_eval_n=32", "--set", "moderation.real_data="),
        *("--set", "moderation.train.steps=3", "--set", "moderation.train.batch_size=4"),
        *("--set", "moderation.train.seq_len=32", "--set", "moderation.train.progress=false"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = runs / "t" / "moderation"
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 3
    start = read_metrics(runs / "t" / "train" / "moderation" / "metrics.jsonl", "start")
    assert [s["world_size"] for s in start] == [2]
