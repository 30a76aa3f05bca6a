"""GRPO and PPO under ``torchrun`` with two gloo processes on CPU: each process samples only its share of
an iteration's prompts, the run is the one-process run of the same global batch up to float rounding,
and an interrupted run resumes exactly. The runs are tests/scripts/tiny_rl.py on a tiny chat model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatforge.checkpoint import save_model
from chatforge.train.loop import read_metrics
from rl_helpers import tiny_chat_model, tiny_tokenizer

TESTS = Path(__file__).parent
SCRIPT = TESTS / "scripts" / "tiny_rl.py"
PROMPTS, SAMPLES = 8, {"grpo": 4, "ppo": 1}  # tiny_rl.py's group size


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("rl_ddp") / "base"
    tok = tiny_tokenizer()
    save_model(tiny_chat_model(tok, steps=40), path, tokenizer=tok)
    return path


def _run(base: Path, out: Path, algo: str, nproc: int, steps: int = 3, interrupt_at: int = 0):
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(SCRIPT), algo, str(base), str(out), str(steps), str(PROMPTS), str(interrupt_at)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _replies(out: Path, rank: int) -> list[dict]:
    return [json.loads(ln) for ln in (out / f"replies_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_two_processes_split_the_rollouts_and_match_one_process(
    base: Path, tmp_path: Path, algo: str
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((one, 1), (two, 2)):
        res = _run(base, out, algo, nproc)
        assert res.returncode == 0, res.stderr[-3000:]
    # Every iteration, each process sampled (and scored) half the prompts, and together the replies one
    # process drew: rollouts are seeded per prompt, whichever process samples it.
    r1, r2 = _replies(two, 0), _replies(two, 1)
    for whole, a, b in zip(_replies(one, 0), r1, r2, strict=True):
        assert len(a["texts"]) == len(b["texts"]) == PROMPTS * SAMPLES[algo] // 2
        assert a["prompts"] + b["prompts"] == whole["prompts"]
        assert a["texts"] + b["texts"] == whole["texts"]
    # The stats of the whole iteration, logged once; the loss curve and weights within float rounding.
    s1, s2 = (read_metrics(o / "metrics.jsonl", "rollout") for o in (one, two))
    assert len(s2) == 3
    for x, y in zip(s1, s2, strict=True):
        assert x["reward_mean"] == y["reward_mean"] and x["response_len"] == y["response_len"]
        assert x["kl"] == pytest.approx(y["kl"], abs=2e-4)
        # PPO's adaptive β moves on the whole iteration's KL, the same on every process.
        if algo == "ppo":
            assert x["kl_coef"] == pytest.approx(y["kl_coef"], rel=1e-3)
    t1, t2 = (read_metrics(o / "metrics.jsonl", "train") for o in (one, two))
    # The loss and every logged term are the whole minibatch's (averaged over processes), not rank 0's.
    for key in ("loss", "policy_loss", "entropy", "clip_frac"):
        assert [r[key] for r in t1] == pytest.approx([r[key] for r in t2], abs=1e-5), key
    w1, w2 = (torch.load(o / "final.pt") for o in (one, two))
    for k, v in w1.items():
        torch.testing.assert_close(v, w2[k], atol=1e-4, rtol=0, msg=k)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_an_interrupted_two_process_run_resumes_exactly(base: Path, tmp_path: Path, algo: str) -> None:
    full = _run(base, tmp_path / "full", algo, 2)
    assert full.returncode == 0, full.stderr[-3000:]
    # Ctrl-C on both processes in the 3rd rollout: the checkpoint is the end of iteration 2 (of 4 updates).
    cut = _run(base, tmp_path / "cut", algo, 2, interrupt_at=3)
    assert cut.returncode != 0
    assert "KeyboardInterrupt" in cut.stderr
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_0000008"
    res = _run(base, tmp_path / "cut", algo, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["resumed"]
    a, b = (torch.load(tmp_path / d / "final.pt") for d in ("full", "cut"))
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    # The resumed run's log is the uninterrupted one's (iterations 0-1 kept, 2 replayed).
    keep = ("iteration", "reward_mean", "kl", "response_len")
    ev = [
        [{k: r[k] for k in keep} for r in read_metrics(tmp_path / d / "metrics.jsonl", "rollout")]
        for d in ("full", "cut")
    ]
    assert ev[0] == ev[1]
