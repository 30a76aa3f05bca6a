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
    assert res.stdout.count("| category |") == 1  # one summary table (rank 0's), not one per process
    out = runs / "t" / "moderation"
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 3
    start = read_metrics(runs / "t" / "train" / "moderation" / "metrics.jsonl", "start")
    assert [s["world_size"] for s in start] == [2]


REWARD = [
    *("--set", "reward.init=base", "--set", "reward.world_pairs=32", "--set", "reward.train.steps=2"),
    *("--set", "reward.train.batch_size=4", "--set", "reward.train.seq_len=96"),
    *("--set", "reward.train.progress=false"),
]


def test_reward_under_torchrun_prints_one_summary_and_saves(runs: Path) -> None:
    res = _torchrun(runs, "reward", *REWARD)
    assert res.returncode == 0, res.stderr[-3000:]
    # One JSON summary on stdout (rank 0's), not one per process.
    assert json.loads(res.stdout)["heldout"] is not None
    assert (runs / "t" / "rm" / "training_summary.json").is_file()


@pytest.mark.parametrize(
    ("stage", "out"),
    [
        ("reward", "rm"),
        ("dpo", "rlhf/dpo"),
    ],
)
def test_a_non_main_rank_writes_no_model(tmp_path: Path, runs: Path, stage: str, out: str) -> None:
    # Rank 1's view of a run: every rank used to swap its own copy of the model into the same folder,
    # which collides (ENOTEMPTY) when two ranks finish together.
    root = tmp_path / "r"
    (root / "t").mkdir(parents=True)
    (root / "t" / "base").symlink_to(runs / "t" / "base")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "1", "WORLD_SIZE": "1"}
    extra = (
        REWARD
        if stage == "reward"
        else [
            *("--set", "dpo.init=base", "--set", "reward.world_pairs=32", "--set", "dpo.train.steps=2"),
            *("--set", "dpo.train.batch_size=4", "--set", "dpo.train.seq_len=96"),
            *("--set", "dpo.train.progress=false"),
        ]
    )
    cmd = [
        sys.executable,
        "-m",
        "chatforge.cli",
        stage,
        *extra,
        "--set",
        f"runs_dir={root}",
        "--set",
        "name=t",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == ""
    assert not (root / "t" / out).exists()


def _write_many(path: str) -> None:
    from chatforge.data.chat import write_jsonl

    for _ in range(200):
        write_jsonl([{"i": i} for i in range(50)], path)


def test_ranks_preparing_the_same_data_at_once_do_not_collide(tmp_path: Path) -> None:
    # Every rank of a torchrun launch runs chat.prepare / prefs.prepare: with one shared temp name, one
    # rank's rename took the file from under the other's (FileNotFoundError).
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path / "train.jsonl"),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 50
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


def _tiny_grpo(runs: Path, prompts: int, batch_size: int) -> subprocess.CompletedProcess:
    """One GRPO iteration of 2 samples per prompt on 2 processes."""
    return _torchrun(
        runs,
        "grpo",
        *("--set", "grpo.init=base", "--set", "grpo.steps=1", "--set", f"grpo.prompts_per_step={prompts}"),
        *("--set", "grpo.samples_per_prompt=2", "--set", "grpo.max_new_tokens=4"),
        *("--set", f"grpo.train.batch_size={batch_size}", "--set", "grpo.train.progress=false"),
    )


def test_rl_minibatch_that_does_not_split_over_the_processes_is_refused(runs: Path) -> None:
    # grpo.train.batch_size is a global minibatch split row by row: 1 row on 2 processes left rank 1 an
    # empty batch (a RuntimeError deep in the loss), 3 would weigh rank 1's one row twice.
    res = _tiny_grpo(runs, prompts=2, batch_size=1)
    assert res.returncode != 0
    assert "grpo.train.batch_size: 1 rows per minibatch do not split evenly over 2 processes" in res.stderr
    assert "RuntimeError" not in res.stderr


def test_rl_with_fewer_prompts_than_processes_is_refused(runs: Path) -> None:
    # Each process samples its share of an iteration's prompts: with 1 prompt on 2 processes one has none.
    res = _tiny_grpo(runs, prompts=1, batch_size=2)
    assert res.returncode != 0
    assert "grpo.prompts_per_step: 1 prompts per iteration leave some of the 2 processes none" in res.stderr
    assert "src/chatforge" not in res.stderr  # a one-line error, no traceback through our code


@pytest.mark.parametrize(("rank", "said"), [("0", True), ("1", False)])
def test_an_interrupted_command_says_so_once_under_torchrun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], rank: str, said: bool
) -> None:
    # Ctrl-C stops every rank of a torchrun launch: each printed "chatforge pretrain: interrupted".
    from chatforge import cli

    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli, "cmd_pretrain", interrupted)
    assert cli.main(["pretrain"]) == 130
    assert ("chatforge pretrain: interrupted" in capsys.readouterr().err) is said


@pytest.mark.parametrize(
    "argv",
    [
        ["scaling"],
        ["scaling", "--predict"],
        ["speedrun"],
        ["data"],
        ["tokenizer"],
        ["sample"],
        ["chat"],
        ["rlhf-eval"],
        ["moderation", "eval"],
        ["redteam"],
        ["release", "--model", "m"],
        ["serve"],
        ["feedback", "export"],
        ["eval", "--suite", "x"],
        ["report"],
    ],
    ids=" ".join,
)
def test_commands_that_are_not_for_torchrun_refuse_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    # `chatforge scaling` under torchrun ran the whole ladder (with its own worker processes) once per
    # process, into the same files; the other commands too ran in full on every process.
    from chatforge import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    runs = tmp_path / "runs"
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert cli.main([*argv, "--set", f"runs_dir={runs}"]) == 2
        err = capsys.readouterr().err
        if rank == "0":
            assert err.startswith(f"chatforge {argv[0]}: error: not for torchrun (WORLD_SIZE=2): ")
            assert err.count("\n") == 1 and "without torchrun" in err
            assert ("scaling.workers" in err) is (argv[0] == "scaling")
        else:
            assert err == ""
    assert list(tmp_path.iterdir()) == []


def test_scaling_under_torchrun_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "chatforge.cli", "scaling", "--set", f"runs_dir={tmp_path}", "--set", "name=t"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("chatforge scaling: error: not for torchrun (WORLD_SIZE=2)") == 1
    assert "Traceback" not in res.stderr.split("chatforge scaling: error")[0]
    assert list(tmp_path.iterdir()) == []


def test_a_config_error_under_torchrun_is_said_once(runs: Path) -> None:
    # Every process read the same bad config and printed the same line, one per process.
    res = _torchrun(runs, "pretrain", "--set", "pretrain.lr=fast", timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("chatforge pretrain: error: ") == 1, res.stderr[-3000:]
    assert "pretrain.lr" in res.stderr
