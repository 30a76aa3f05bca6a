"""The training-loop core: exact resume after a hard kill, DDP equivalence, schedules and Muon."""

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.config import TrainConfig
from chatforge.errors import ChatforgeError
from chatforge.train.loop import fingerprint, read_metrics, weights_fingerprint
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


def test_sigterm_saves_a_checkpoint_after_the_step_and_resumes_exactly(tmp_path: Path) -> None:
    """SIGTERM (``kill``, a scheduler's time limit, ``docker stop``) used to end a run wherever it was, losing
    the steps since the last checkpoint. Now the run finishes its step, saves a checkpoint there and exits
    as if interrupted; the rerun resumes from that step and matches an uninterrupted run bit for bit."""
    _run([str(tmp_path / "full"), "15", "4"], timeout=120)
    reference = _losses(tmp_path / "full")
    work = tmp_path / "term"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(work), "15", "4", "0.15"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = work / "checkpoints" / "latest"
    deadline = time.time() + 90
    while time.time() < deadline and not latest.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err[-2000:]
    saved = re.search(r"interrupted: checkpoint saved at step (\d+); run again to resume", err)
    assert saved and "SIGTERM: stopping the run after this step" in err, err[-2000:]
    step = int(saved.group(1))
    assert 3 < step < 15 and f"stopped at step {step}" in out
    assert latest.read_text() == f"step_{step:07d}"  # saved where it stopped, not only the periodic one

    res = _run([str(work), "15", "4"], timeout=120)
    assert res.returncode == 0 and "'resumed': True" in res.stdout, res.stderr[-2000:]
    assert _losses(work) == reference


def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    res = _run([str(single), "6", "8", "0", "adamw"], timeout=120)
    assert res.returncode == 0, res.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _torchrun_tiny(str(ddp), "6", "4", "0", "adamw")
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


def test_resume_drops_a_metrics_line_torn_by_the_kill(tmp_path: Path) -> None:
    """A run killed while appending to metrics.jsonl leaves half a JSON line; resuming must not trip on it."""
    work = tmp_path / "torn"
    res = _run([str(work), "7", "4"], timeout=120)
    assert res.returncode == 0, res.stderr
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 8, "lo')
    assert max(_losses(work)) == 7  # the report's reader skips the torn last line too
    res = _run([str(work), "10", "4"], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "'resumed': True" in res.stdout
    assert sorted(_losses(work)) == list(range(1, 11))


def test_read_metrics_names_a_corrupt_line(tmp_path: Path) -> None:
    from chatforge.errors import ChatforgeError

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"event": "train", "step": 1, "loss": 2.0}\nnot json\n{"event": "train", "step": 2}\n')
    with pytest.raises(ChatforgeError, match=r"metrics.jsonl:2"):
        read_metrics(p)


def _tiny_trainer(work: Path):
    """The Trainer that tests/scripts/tiny_train.py runs (8 steps of 4), built in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.make_trainer(work, steps=8, batch=4)


def test_ctrl_c_during_the_optimizer_update_still_resumes_exactly(tmp_path: Path) -> None:
    """Ctrl-C that lands between the Muon and AdamW updates (weights half-stepped, step counter not yet
    moved) must not be saved as a checkpoint: the resume would apply that step twice."""
    _tiny_trainer(tmp_path / "ref").fit()
    reference = _losses(tmp_path / "ref")

    t = _tiny_trainer(tmp_path / "int")
    fired: list[int] = []

    def interrupt_after_first_optimizer(*_: object) -> None:
        if t.step == 4 and not fired:
            fired.append(t.step)
            raise KeyboardInterrupt

    t.optimizer.optimizers[0].register_step_post_hook(interrupt_after_first_optimizer)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert fired and len(t.optimizer.optimizers) == 2
    out = _tiny_trainer(tmp_path / "int").fit()
    assert out["resumed"]
    assert _losses(tmp_path / "int") == reference


def test_sigterm_inside_an_rl_iteration_stops_at_its_end(tmp_path: Path) -> None:
    """An RL run resumes only at an iteration's boundary (its rollouts would be redrawn from changed weights
    otherwise). A SIGTERM in step 5 of a run whose iterations are 4 steps used to stop at step 5 and save
    nothing, losing the iteration; the run now finishes the iteration and saves step 8."""
    _tiny_trainer(tmp_path / "ref").fit()
    reference = _losses(tmp_path / "ref")
    t = _tiny_trainer(tmp_path / "int")
    t.resume_every = 4  # as PPO/GRPO set it: optimizer steps per iteration
    t.cfg.ckpt_every = 0
    batch_fn = t.batch_fn

    def term_in_step_5(step: int, *rest: int) -> dict:
        if t.step == 4 and not rest[0]:  # the first micro-batch of step 5
            # (without the run's handler SIGTERM would end the test process itself)
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "fit() does not handle SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_fn(step, *rest)

    t.batch_fn = term_in_step_5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's alone
    assert t.step == 8 and max(_losses(tmp_path / "int")) == 8
    assert (tmp_path / "int" / "checkpoints" / "latest").read_text() == "step_0000008"
    out = _tiny_trainer(tmp_path / "int").fit()
    assert out["resumed"] and _losses(tmp_path / "int") == reference


def test_a_stop_during_the_final_evaluation_resumes_without_logging_it_twice(tmp_path: Path) -> None:
    """A SIGTERM during the final evaluation saves the finished steps and stops; the resumed run evaluates
    again. Its records used to be kept beside the new ones: two evaluations of one step in the log."""
    t = _tiny_trainer(tmp_path)
    calls: list[int] = []

    def evaluate(m: torch.nn.Module, step: int) -> dict[str, float]:
        calls.append(step)
        if step == 8 and len(calls) == 1:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "fit() does not handle SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)
        return {"val_loss": 1.0}

    t.evaluate = evaluate
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000008"
    t = _tiny_trainer(tmp_path)
    t.evaluate = evaluate
    assert t.fit()["resumed"] and calls == [8, 8]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "eval")] == [8]
    assert len(read_metrics(tmp_path / "metrics.jsonl", "end")) == 1
    assert sorted(_losses(tmp_path)) == list(range(1, 9))


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_resumes(tmp_path: Path) -> None:
    """A full disk (here: the pointer file's name taken by a folder) mid-run is one line that names the
    last good checkpoint, not a traceback; once the space is back the run resumes from it, exactly."""
    _tiny_trainer(tmp_path / "ref").fit()
    t = _tiny_trainer(tmp_path / "run")
    blocker = tmp_path / "run" / "checkpoints" / "latest.tmp" / "x"

    def fill_the_disk(*_: object) -> None:
        if t.step == 4:  # after the step-3 checkpoint
            blocker.mkdir(parents=True, exist_ok=True)

    t.optimizer.optimizers[0].register_step_post_hook(fill_the_disk)
    with pytest.raises(
        ChatforgeError, match=r"cannot write the checkpoint at step 6 .* step_0000003, is intact"
    ):
        t.fit()
    shutil.rmtree(blocker.parent)
    killed = tmp_path / "run" / "checkpoints" / ".step_0000006.tmp-abc"  # a save cut short by SIGKILL
    killed.mkdir()
    out = _tiny_trainer(tmp_path / "run").fit()
    assert out["resumed"] and _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    assert not killed.exists()  # swept when the next run starts


def test_a_checkpoint_past_the_steps_asked_for_is_refused(tmp_path: Path) -> None:
    """Resuming a step-6 checkpoint with steps=4 used to "finish" at once, reporting 6 steps and the
    step-6 weights as a 4-step run: now a one-line error that points at --fresh."""
    t = _tiny_trainer(tmp_path / "run")
    t.fit()  # 8 steps, checkpoints at 3 and 6 (and the end)
    short = _tiny_trainer(tmp_path / "run")
    short.cfg.steps = 4
    with pytest.raises(ChatforgeError, match=r"past train's steps=4; run with --fresh"):
        short.fit()
    assert short.fit(resume=False)["steps"] == 4


def test_a_checkpoint_trained_on_other_inputs_is_refused(tmp_path: Path) -> None:
    """A standalone `chatforge sft` (or pretrain, dpo, ...) resumes the last checkpoint it finds; after
    its data or start model changed, that silently finished another run's training. The checkpoint keeps
    the fingerprints of its inputs: other data is a one-line error pointing at --fresh, the same data
    resumes, and a checkpoint from before this check (no fingerprints) still resumes."""
    t = _tiny_trainer(tmp_path / "run")
    t.inputs = {"data": fingerprint([np.arange(5)]), "init": weights_fingerprint(t.model)}
    t.cfg.steps = 6
    t.fit()
    longer = _tiny_trainer(tmp_path / "run")
    longer.inputs = {"data": fingerprint([np.arange(6)]), "init": t.inputs["init"]}
    with pytest.raises(ChatforgeError, match=r"other inputs \(training data changed.*--fresh"):
        longer.fit()
    longer.inputs = dict(t.inputs)
    assert longer.fit()["resumed"] and longer.step == 8
    path = tmp_path / "run" / "checkpoints" / "step_0000006" / "train_state.pt"
    state = torch.load(path, weights_only=False)
    assert state["inputs"] == t.inputs
    del state["inputs"]
    torch.save(state, path)
    old = _tiny_trainer(tmp_path / "run")
    old.inputs = {"data": "other"}
    assert old.fit()["resumed"]


def test_fingerprint_tells_inputs_apart_cheaply(tmp_path: Path) -> None:
    big = tmp_path / "shard.bin"
    data = np.random.default_rng(0).integers(0, 60000, 3_000_000, dtype=np.uint16)
    data.tofile(big)
    a = fingerprint([big], [(np.arange(3), np.ones(3))])
    assert a == fingerprint([big], [(np.arange(3), np.ones(3))])
    assert a != fingerprint([big], [(np.arange(3), np.zeros(3))])
    data[-1] ^= 1  # the last MiB is read
    data.tofile(big)
    assert a != fingerprint([big], [(np.arange(3), np.ones(3))])
    assert fingerprint([1, 2, 3]) != fingerprint([1, 2, 4]) and fingerprint({"a": 1}) != fingerprint({"a": 2})
    model = _tiny_trainer(tmp_path / "m").model
    before = weights_fingerprint(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    assert weights_fingerprint(model) != before


def test_resuming_a_two_process_checkpoint_in_one_process_says_how(tmp_path: Path) -> None:
    # The message said only "the same number of processes": not how to launch that, nor how to start over.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = subprocess.run(
        [*cmd, str(SCRIPT), str(tmp_path), "4", "4", "0", "adamw"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000003"
    with pytest.raises(ChatforgeError) as e:
        _tiny_trainer(tmp_path).fit()
    msg = str(e.value)
    assert "saved with 2 process(es), resuming with 1" in msg
    assert "torchrun --nproc_per_node=2" in msg and "--fresh" in msg and "\n" not in msg


def _torchrun_tiny(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        *args,
    ]


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The losses of an uninterrupted 15-step two-process run of tests/scripts/tiny_train.py."""
    work = tmp_path_factory.mktemp("ddp_ref")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        _torchrun_tiny(str(work), "15", "4"), env=env, capture_output=True, text=True, timeout=180
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return _losses(work)


@pytest.mark.parametrize("target", ["torchrun", "torchrun and every rank", "one rank", "SIGTERM to torchrun"])
def test_ctrl_c_under_torchrun_stops_every_process_at_one_step(
    tmp_path: Path, two_process_reference: dict[int, float], target: str
) -> None:
    """Ctrl-C under torchrun: each rank used to decide alone whether to save (one could be mid-update), each
    printed its own "interrupted", and a rank signalled alone hung the run in the checkpoint's barrier. Now
    the ranks agree at a step boundary: all stop after the same step, one checkpoint is saved, rank 0 says
    so once, and the rerun finishes with the losses of a run never interrupted.

    "torchrun": SIGINT to torchrun's process group, as a terminal's Ctrl-C (torchrun relays it to the ranks,
    which it starts in sessions of their own); "torchrun and every rank": also straight to each rank, as
    under a launcher that leaves them in the terminal's group (each rank gets the one keypress twice);
    "one rank": only rank 1; "SIGTERM to torchrun": as a scheduler stops a job (torchrun passes it on to the
    ranks, and kills them if they have not exited 30 s later)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    work, pids = tmp_path / "int", tmp_path / "pids"
    pids.mkdir()
    log = (tmp_path / "log.txt").open("w")
    # A suite started from a background shell ignores SIGINT, and its children would too (see
    # test_interrupted_stage_restarts_when_its_settings_changed): give them Python's default handler.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            _torchrun_tiny(str(work), "15", "4", "0.15"),
            env={**env, "TINY_TRAIN_PID_DIR": str(pids)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own, as a terminal gives a foreground job
        )
    finally:
        signal.signal(signal.SIGINT, before)
    ranks: list[int] = []
    try:
        latest = work / "checkpoints" / "latest"
        deadline = time.time() + 120
        while time.time() < deadline and not latest.exists() and proc.poll() is None:
            time.sleep(0.02)
        assert latest.exists(), (tmp_path / "log.txt").read_text()[-3000:]
        ranks = [int((pids / f"rank{r}.pid").read_text()) for r in (0, 1)]
        if target.startswith("torchrun"):
            os.killpg(proc.pid, signal.SIGINT)
        elif target == "SIGTERM to torchrun":
            proc.send_signal(signal.SIGTERM)
        for pid in {"torchrun and every rank": ranks, "one rank": ranks[1:]}.get(target, []):
            os.kill(pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        log.close()
        for pid in [proc.pid, *ranks] if proc.poll() is None else []:  # a hung run: leave nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    out = (tmp_path / "log.txt").read_text()

    assert out.count("interrupted") == 1, out[-3000:]
    saved = re.search(r"interrupted: checkpoint saved at step (\d+); run again to resume", out)
    assert saved, out[-3000:]
    step = int(saved.group(1))
    assert 3 <= step < 15
    assert sorted(re.findall(r"rank \d stopped at step (\d+)", out)) == [str(step)] * 2, out[-3000:]
    assert latest.read_text() == f"step_{step:07d}"
    assert max(_losses(work)) == step
    for word in ("barrier", "gloo", "[rank0]", "[rank1]", "Connection"):
        assert word not in out, out[-3000:]

    res = subprocess.run(
        _torchrun_tiny(str(work), "15", "4"), env=env, capture_output=True, text=True, timeout=180
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "'resumed': True" in res.stdout
    assert _losses(work) == two_process_reference  # bit-for-bit the uninterrupted two-process run


def test_a_rank_0_hook_longer_than_the_process_group_timeout_does_not_stop_the_run(tmp_path: Path) -> None:
    """During-training evals (hooks) run on rank 0 only: the other ranks waited for it in the next step's
    gradient all-reduce, which fails once the process group's timeout runs out (torch's default: 30 min on
    gloo, 10 on NCCL), killing a run whose eval suite took longer. They now wait on a group of their own
    without a limit. Here the timeout is 5 s and the hook takes 8 s, at step 2 and at the end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TINY_TRAIN_HOOK_S": "8", "TINY_TRAIN_DIST_TIMEOUT_S": "5"}
    res = subprocess.run(
        _torchrun_tiny(str(tmp_path), "4", "4"), env=env, capture_output=True, text=True, timeout=180
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "eval_suite")] == [2, 4]
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000003"  # its wait is rank 0's too
