"""End to end: the speedrun on a tiny recipe, and its base model loaded by transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatforge.checkpoint import load_model
from chatforge.data.chat import KINDS
from chatforge.tokenizer import Tokenizer

TINY = [
    "data.sources[0].n_docs=400",
    "tokenizer.vocab_size=512",
    "model.hidden_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.intermediate_size=128",
    "pretrain.steps=40",
    "pretrain.batch_size=8",
    "pretrain.seq_len=64",
    "pretrain.eval_every=20",
    "pretrain.ckpt_every=20",
    "pretrain.progress=false",
    "sample.max_new_tokens=16",
    "chat_data.sources[0].n=300",
    "chat_data.eval_per_kind=2",
    "sft.steps=10",
    "sft.batch_size=8",
    "sft.eval_every=5",
    "sft.progress=false",
    "evals.max_new_tokens=16",
    # The later stages, each a few seconds: reward model, GRPO, the RLHF table, moderation, red team.
    "reward.world_pairs=64",
    "reward.train.steps=4",
    "reward.train.batch_size=8",
    "reward.train.progress=false",
    "grpo.steps=2",
    "grpo.prompts_per_step=4",
    "grpo.samples_per_prompt=2",
    "grpo.max_new_tokens=12",
    "grpo.train.batch_size=8",
    "grpo.train.progress=false",
    "bestofn.n=2",
    "moderation.world_n=64",
    "moderation.world_eval_n=32",
    'moderation.real_data=""',
    "moderation.train.steps=4",
    "moderation.train.batch_size=8",
    "moderation.train.progress=false",
    "safety.redteam_per_kind=1",
    "safety.max_new_tokens=12",
]


def _speedrun(runs: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "chatforge.cli", "speedrun", "--name", "tiny", "--set", f"runs_dir={runs}"]
    for o in [*TINY, *extra]:
        args += ["--set", o]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    res = _speedrun(runs)
    assert res.returncode == 0, res.stderr[-3000:]
    return runs / "tiny"


@pytest.mark.slow
def test_speedrun_writes_report_with_plot_and_learns(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "report.md").read_text().startswith("# chatforge report card")
    png = run_dir / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pt = report["pretrain"]
    assert pt["steps"] == 40 and pt["tokens"] == 40 * 8 * 64
    # A uniform guess over 512 tokens costs ln(512) ≈ 6.2 nats; the model must do much better.
    assert pt["val_loss"] < 5.0
    assert len(report["samples"]) == 3 and all(isinstance(s["completion"], str) for s in report["samples"])
    metrics = [json.loads(ln) for ln in (run_dir / "train/pretrain/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["event"] == "eval"] == [20, 40]
    # The chat stages ran too: an SFT checkpoint and the world behaviour suite on both models.
    n_items = 2 * len(KINDS)  # chat_data.eval_per_kind=2
    assert (run_dir / "sft" / "config.json").is_file()
    for name in ("base", "sft"):
        res = json.loads((run_dir / "evals" / f"world_{name}.json").read_text())
        plain = [smp for smp in res["samples"] if smp["kind"] != "system_json_constrained"]
        assert res["overall"]["items"] == n_items and len(plain) == n_items
        # JSON-schema items also ran with the schema enforced.
        assert set(res["json_valid"]) == {"unconstrained", "constrained"}
        assert "system_json_constrained" in res["per_kind"]
    # RLHF and safety: a reward model, a GRPO policy evaluated like the others, the comparison table, and
    # the red-team suite on every checkpoint, all in the report card.
    assert (run_dir / "rm" / "reward_head.safetensors").is_file()
    assert (run_dir / "rlhf" / "grpo" / "config.json").is_file()
    assert json.loads((run_dir / "evals" / "world_rlhf-grpo.json").read_text())["overall"]["items"] == n_items
    rows = json.loads((run_dir / "evals" / "rlhf.json").read_text())["rows"]
    assert {"sft", "rlhf/grpo", "best-of-2"} <= set(rows)
    assert set(report["redteam"]) >= {"base", "sft", "grpo"}
    md = (run_dir / "report.md").read_text()
    assert "## Reward model" in md and "## RLHF (grpo)" in md and "## Red team" in md
    assert "## Moderation classifier" in md and report["moderation"]["world"] is not None
    assert (run_dir / "rl_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_base_model_is_a_transformers_model(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = run_dir / "base"
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ours = load_model(base)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    hf_tok = AutoTokenizer.from_pretrained(base)
    tok = Tokenizer.load(base)
    msgs = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Who is Ada?"}]
    ref = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert list(ref) == tok.apply_chat_template(msgs, add_generation_prompt=True)


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_reruns_changed_ones(run_dir: Path) -> None:
    res = _speedrun(run_dir.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("data", "tokenizer", "pretrain", "sample", "sft", "reward", "rlhf", "eval", "redteam"):
        assert f"[{stage}] up to date" in res.stdout
    # A changed RL setting re-runs the RL stage and what reads its policy, not the moderation classifier.
    res = _speedrun(run_dir.parent, "grpo.kl_coef=0.2")
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("sft", "reward", "moderation"):
        assert f"[{stage}] up to date" in res.stdout
    for stage in ("rlhf", "eval", "rlhf_eval", "redteam"):
        assert f"[{stage}] running" in res.stdout
    res = _speedrun(run_dir.parent, "pretrain.steps=20")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[tokenizer] up to date" in res.stdout and "[pretrain] running" in res.stdout
    assert "[sft] running" in res.stdout  # later stages follow the one that changed
    assert json.loads((run_dir / "report.json").read_text())["pretrain"]["steps"] == 20
    # Safety switched off while the RL policy changes: the red team on disk judged the old policy, so the
    # report leaves it out and says so (it used to show it as this run's); the moderator, made from
    # nothing that changed, stays.
    res = _speedrun(run_dir.parent, "pretrain.steps=20", "grpo.kl_coef=0.3", "speedrun.safety=false")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[rlhf] running" in res.stdout and "[redteam]" not in res.stdout
    report, md = json.loads((run_dir / "report.json").read_text()), (run_dir / "report.md").read_text()
    assert report["stale_stages"] == {"redteam": "rlhf"} and "redteam" not in report
    assert "## Red team" not in md and "Left out:" in md and "redteam (before rlhf ran again)" in md
    assert "## Moderation classifier" in md and "## RLHF (grpo)" in md


def test_stage_hash_follows_config_and_generator_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatforge import speedrun
    from chatforge.config import load_config
    from chatforge.data import chat, world

    plain = load_config("cpu-demo")
    chosen = load_config("cpu-demo", ["chat_data.sources[0].kinds=[fact]", "pretrain.threads=1"])
    sft, pre = speedrun.STAGES["sft"][0], speedrun.STAGES["pretrain"][0]
    assert speedrun._hash(chosen, sft) != speedrun._hash(plain, sft)
    assert speedrun._hash(chosen, pre) == speedrun._hash(plain, pre)  # threads change nothing written
    before = {s: speedrun._hash(plain, speedrun.STAGES[s][0]) for s in ("pretrain", "sft")}
    # new chat text re-runs SFT, not pretraining; new pretraining text re-runs both
    monkeypatch.setattr(chat, "CHAT_VERSION", chat.CHAT_VERSION + 1)
    assert speedrun._hash(plain, pre) == before["pretrain"] and speedrun._hash(plain, sft) != before["sft"]
    monkeypatch.setattr(world, "TEXT_VERSION", world.TEXT_VERSION + 1)
    assert speedrun._hash(plain, pre) != before["pretrain"]

    # evals.registry came after runs existed: unset, the eval stage hashes as it did before the setting
    ev = speedrun.STAGES["eval"][0]
    now = speedrun._hash(plain, ev)
    assert speedrun._hash(load_config("cpu-demo", ["evals.registry=[my_evals]"]), ev) != now
    full = speedrun.to_dict
    monkeypatch.setattr(speedrun, "to_dict", lambda c: {k: v for k, v in full(c).items() if k != "registry"})
    assert speedrun._hash(plain, ev) == now


def test_pretrain_without_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatforge.cli",
            "pretrain",
            "--set",
            f"runs_dir={tmp_path}",
            "--name",
            "empty",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "run `chatforge tokenizer` first" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_interrupted_stage_restarts_when_its_settings_changed(tmp_path: Path) -> None:
    """Pretraining interrupted, then the data changed: the rerun must not continue the old run's checkpoint
    (trained on the old corpus and tokenizer, with the old step count)."""
    import os
    import signal
    import time

    small = [
        "speedrun.rl=none",
        "speedrun.reward=false",
        "speedrun.safety=false",
        "pretrain.steps=400",
        "pretrain.ckpt_every=5",
        "pretrain.eval_every=0",
        "sft.steps=2",
        "evals.models=[base]",
        "evals.max_new_tokens=4",
    ]
    args = [
        sys.executable,
        "-m",
        "chatforge.cli",
        "speedrun",
        "--name",
        "tiny",
        "--set",
        f"runs_dir={tmp_path}",
    ]
    for o in [*TINY, *small]:
        args += ["--set", o]
    latest = tmp_path / "tiny" / "train" / "pretrain" / "checkpoints" / "latest"
    # stderr to a file, not a pipe nobody reads while it runs: a full pipe would block the child.
    log = (tmp_path / "stderr.txt").open("w")
    # A suite started in the background by a shell without job control ignores SIGINT, and an ignored
    # signal stays ignored in every child: Ctrl-C could not reach the run. A handler here is reset to
    # the default in the child, whose Python then turns SIGINT into KeyboardInterrupt as in a terminal.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy())
    finally:
        signal.signal(signal.SIGINT, before)
    deadline = time.time() + 120
    while time.time() < deadline and not latest.exists() and proc.poll() is None:
        time.sleep(0.05)
    exited = proc.poll()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    log.close()
    err = (tmp_path / "stderr.txt").read_text()[-2000:]
    assert latest.exists(), f"no checkpoint before the interrupt (exit status then: {exited}): {err}"
    assert proc.returncode == 130

    res = _speedrun(tmp_path, *small, "data.sources[0].n_docs=300", "pretrain.steps=8")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[pretrain] settings changed since it was interrupted: starting afresh" in res.stdout
    done = json.loads((tmp_path / "tiny" / "stages.json").read_text())["pretrain"]["result"]
    assert done["resumed"] is False and done["steps"] == 8


def test_stage_book_cut_short_is_rerun_not_a_traceback(tmp_path: Path) -> None:
    """stages.json is rewritten after every stage; a crash or a full disk mid-write used to leave it
    truncated and every later speedrun died in json.loads. It is written atomically now, and a damaged one
    only means the stages run again."""
    from chatforge import speedrun

    book = tmp_path / "stages.json"
    speedrun._write_book(book, {"data": {"hash": "abc", "seconds": 1.0}})
    assert json.loads(book.read_text())["data"]["hash"] == "abc"
    assert [p.name for p in tmp_path.iterdir()] == ["stages.json"]  # no temporary left behind
    book.write_text(book.read_text()[:25])  # what a non-atomic write cut short leaves
    said: list[str] = []
    assert speedrun._read_book(book, said.append) == {}
    assert said and "every stage runs again" in said[0]
    book.write_text("[1, 2]")
    assert speedrun._read_book(book, said.append) == {}


def test_a_standalone_stage_refuses_a_checkpoint_from_another_start_model(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`chatforge sft` interrupted, then the base retrained: the rerun used to finish the old SFT run's
    checkpoint (the speedrun guards this with its stage hash, the stage alone did not)."""
    import shutil

    from chatforge.checkpoint import save_model
    from chatforge.config import load_config
    from chatforge.errors import ChatforgeError
    from chatforge.train import sft

    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "tiny", ignore=shutil.ignore_patterns("train", "rlhf", "moderation"))
    cfg = load_config(None, [f"{k}" for k in TINY] + [f"runs_dir={runs}", "name=tiny", "sft.ckpt_every=2"])
    real = sft.length_grouped_batch_fn

    def interrupted(*a, **k):  # Ctrl-C while the batch for step 4 is drawn: step 4's checkpoint is saved
        fn = real(*a, **k)

        def batch(step, micro, rank, world):
            if step == 4:
                raise KeyboardInterrupt
            return fn(step, micro, rank, world)

        return batch

    monkeypatch.setattr(sft, "length_grouped_batch_fn", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg)
    monkeypatch.setattr(sft, "length_grouped_batch_fn", real)
    ckpt = runs / "tiny" / "train" / "sft" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000004"

    base = runs / "tiny" / "base"
    model, tok = load_model(base), Tokenizer.load(base)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # "retrained"
    save_model(model, base, tokenizer=tok)
    with pytest.raises(ChatforgeError, match=r"other inputs \(start model changed.*--fresh"):
        sft.run(cfg)
    assert (ckpt / "latest").is_file()  # nothing lost: restoring the old base would resume it
    out = sft.run(cfg, resume=False)
    assert out["resumed"] is False and out["steps"] == 10
