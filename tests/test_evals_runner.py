"""Evals on a tiny, really trained chat model: many samples per prompt, multiple choice by log-probability,
the endpoint target against our real server, during-training hooks, `chatforge eval` and `chatforge report`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from chatforge.checkpoint import save_model
from chatforge.config import ModelConfig, load_config
from chatforge.engine import SamplingParams
from chatforge.errors import ChatforgeError
from chatforge.evals import graders, report, runner
from chatforge.evals.targets import CheckpointTarget, EndpointTarget
from chatforge.model import GPT, lm_loss
from chatforge.tokenizer import train_tokenizer

FACTS = {"Velora": "Mirth", "Karst": "Oddby", "Pellow": "Rune", "Tamsin": "Quill"}
UNSEEN = {"Brisk": "Holm", "Nadir": "Fen"}  # asked about, never trained on


def _conv(country: str, city: str) -> list[dict]:
    return [
        {"role": "user", "content": f"What is the capital of {country}?"},
        {"role": "assistant", "content": f"The capital of {country} is {city}."},
    ]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A 2-layer x 64 model that memorised the FACTS conversations and sentences (~3 s on one thread)."""
    texts = [f"The capital of {c} is {v}." for c, v in {**FACTS, **UNSEEN}.items()]
    tok = train_tokenizer(
        texts * 30 + [m["content"] for c, v in FACTS.items() for m in _conv(c, v)] * 30, 400
    )
    seqs = [tok.apply_chat_template(_conv(c, v)) for c, v in FACTS.items()]
    seqs += [tok.encode(f"The capital of {c} is {v}.") for c, v in FACTS.items()]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_id)
    labels = torch.full((len(seqs), T), -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s) - 1] = torch.tensor(s[1:])
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):
        loss = lm_loss(model(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3  # the country after "capital of" is a free choice: not zero
    run = tmp_path_factory.mktemp("runs") / "tiny"
    return save_model(model, run / "sft", tokenizer=tok)


def _items(facts: dict[str, str]) -> list[dict]:
    return [
        {"id": c, "kind": "trained" if c in FACTS else "unseen", "input": _conv(c, v)[:1], "ideal": v}
        for c, v in facts.items()
    ]


def test_many_samples_mean_median_worst(ckpt: Path) -> None:
    target = CheckpointTarget(ckpt)
    items = _items({**FACTS, **UNSEEN})
    grader = graders.make_grader("includes")
    greedy = runner.evaluate(target, items, grader, SamplingParams(max_new_tokens=16, temperature=0.0))
    assert greedy["per_kind"]["trained"]["mean"] == 1.0  # memorised answers, greedy
    assert greedy["per_kind"]["unseen"]["mean"] == 0.0  # never seen: cannot know the capital
    params = SamplingParams(max_new_tokens=16, temperature=1.5, n=6, seed=11)
    res = runner.evaluate(target, items, grader, params)
    rows = [smp["scores"] for smp in res["samples"]]
    assert all(len(r) == 6 for r in rows) and res["n"] == 6
    o = res["overall"]
    assert o["mean"] == round(statistics.fmean(x for r in rows for x in r), 4)
    assert o["median"] == round(statistics.fmean(statistics.median(r) for r in rows), 4)
    assert o["worst"] == round(statistics.fmean(min(r) for r in rows), 4)
    assert o["worst"] <= o["mean"] and o["worst"] <= o["median"]
    assert sum(res["distribution"].values()) == len(items)
    # fixed seeds: the same samples again
    again = runner.evaluate(target, items, grader, params)
    assert [s["replies"] for s in again["samples"]] == [s["replies"] for s in res["samples"]]
    assert res["throughput"]["samples"] == 36 and res["throughput"]["samples_per_s"] > 0


def test_multiple_choice_by_logprob(ckpt: Path) -> None:
    cities = list(FACTS.values())
    items = [
        {
            "id": c,
            "input": f"The capital of {c} is",
            "choices": [" " + x + "." for x in cities],
            "ideal": f" {v}.",
        }
        for c, v in FACTS.items()
    ]
    target = CheckpointTarget(ckpt, batch_size=5)  # several chunks
    res = runner.evaluate(target, items, graders.make_grader("choice_logprob"), SamplingParams())
    assert res["overall"]["mean"] == 1.0
    lps = res["samples"][0]["choice_logprobs"]
    assert len(lps) == 4 and max(lps) == lps[0] and all(x < 0 for x in lps)
    # the batched scores equal a forward pass on each sequence alone
    tok, model = target.engine.tokenizer, target.engine.model
    prompt = tok.encode("The capital of Velora is")
    full = tok.encode("The capital of Velora is Oddby.")
    with torch.no_grad():
        logp = model(torch.tensor([full])).log_softmax(-1)[0]
    ref = sum(float(logp[t - 1, full[t]]) for t in range(len(prompt), len(full)))
    assert abs(res["samples"][0]["choice_logprobs"][1] - ref) < 1e-3


def test_endpoint_target_matches_in_process(ckpt: Path) -> None:
    serve = pytest.importorskip("chatforge.serve.api")
    from serve_util import running

    items = _items({**FACTS, **UNSEEN})
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    local = CheckpointTarget(ckpt)
    with running(serve.create_app({"tiny": ckpt})) as url:
        remote = EndpointTarget(url, "tiny", concurrency=4)
        assert remote.generate([it["input"] for it in items], params) == local.generate(
            [it["input"] for it in items], params
        )
        # top_k was not sent: a spec's top_k applied in process, and the endpoint sampled from everything
        top1 = SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1, n=3, seed=5)
        greedy = local.generate([it["input"] for it in items], params)
        assert remote.generate([it["input"] for it in items], top1) == [r * 3 for r in greedy]
        prompts = [f"The capital of {c} is" for c in FACTS]
        choices = [[" Mirth.", " Rune."]] * len(prompts)
        a, b = remote.choice_logprobs(prompts, choices), local.choice_logprobs(prompts, choices)
        for ra, rb in zip(a, b):
            for (la, na), (lb, nb) in zip(ra, rb):
                assert na == nb and abs(la - lb) < 1e-3
        # Chat-message prompts: our server reads ChatML in a text prompt as plain text, so the scores came
        # back silently different from the checkpoint's (another grade on the same model); now refused.
        chats = [_conv(c, v)[:1] for c, v in FACTS.items()]
        with pytest.raises(ChatforgeError, match="in a text prompt as plain text"):
            remote.choice_logprobs(chats, choices)


def test_cli_eval_endpoint_writes_into_the_run(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``chatforge eval --endpoint`` ignored ``--name``/``--set``: its results went to ``evals/`` in
    whatever directory it ran from, not ``<run>/evals/`` as ``--help`` says, and a bad key passed."""
    serve = pytest.importorskip("chatforge.serve.api")
    from chatforge.cli import main
    from serve_util import running

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    with running(serve.create_app({"tiny": ckpt})) as url:
        argv = ["eval", "--endpoint", f"{url}/v1", "--model", "tiny", "--suite", "world-mini"]
        argv += ["--limit", "1", "--max-new-tokens", "4", "--set", f"runs_dir={runs}", "--name", "r"]
        assert main(argv) == 0
    assert json.loads((runs / "r" / "evals" / "world-mini_tiny.json").read_text())["suite"] == "world-mini"
    assert not (tmp_path / "evals").exists()
    assert main(["eval", "--list", "--set", "evals.nn=1"]) == 2
    assert "evals.nn: unknown key" in capsys.readouterr().err


def test_during_training_hook_logs_suite_scores(ckpt: Path, tmp_path: Path) -> None:
    from chatforge.checkpoint import load_model, load_weights
    from chatforge.config import TrainConfig
    from chatforge.tokenizer import Tokenizer
    from chatforge.train.loop import Trainer, read_metrics

    cfg = load_config(
        None,
        [
            f"runs_dir={tmp_path}",
            "evals.during_training_suite=world-mini",
            "evals.during_training_every=2",
            "evals.during_training_limit=6",
        ],
    )
    tok = Tokenizer.load(ckpt)
    model = load_model(ckpt)
    hooks = runner.during_training_hook(cfg, tok, model)
    ids = torch.tensor([tok.encode("The capital of Velora is Mirth.")])
    tc = TrainConfig(
        steps=4,
        batch_size=1,
        seq_len=16,
        optimizer="adamw",
        lr=1e-5,
        eval_every=0,
        ckpt_every=0,
        progress=False,
    )
    trainer = Trainer(
        model,
        tc,
        tmp_path / "train",
        loss_fn=lambda m, b: (lm_loss(m(b["x"][:, :-1]), b["x"][:, 1:]), {}, b["x"].numel()),
        batch_fn=lambda *a: {"x": ids},
        save_fn=lambda m, p, st: save_model(m, p, train_state=st),
        load_fn=load_weights,
        hooks=hooks,
    )
    trainer.fit(resume=False)
    recs = read_metrics(tmp_path / "train" / "metrics.jsonl", "eval_suite")
    assert [r["step"] for r in recs] == [2, 4]  # every 2 steps, the last one once
    for r in recs:
        assert r["suite"] == "world-mini" and 0.0 <= r["worst"] <= r["mean"] <= 1.0
        assert set(r["per_kind"]) <= {
            "fact",
            "follow_up",
            "correction_accept",
            "correction_hold",
            "false_premise",
        }
    assert model.training  # the hook hands the model back in training mode


def test_sft_runs_a_users_own_suite_from_evals_registry(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """evals.during_training_suite took only a built-in suite: a user's spec directory, which `chatforge
    eval --registry DIR` reads, could not be evaluated during training. A real `chatforge sft` of the tiny
    model on its own conversations, with the user's suite every 2 steps."""
    import shutil

    from chatforge.cli import main
    from chatforge.train.loop import read_metrics

    runs = tmp_path / "runs"
    shutil.copytree(ckpt, runs / "r" / "base")
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"messages": _conv(c, v)}) + "\n" for c, v in FACTS.items()) * 3)
    reg = tmp_path / "my_evals"
    reg.mkdir()
    (reg / "caps.jsonl").write_text("".join(json.dumps(it) + "\n" for it in _items({**FACTS, **UNSEEN})))
    (reg / "caps.yaml").write_text(
        "caps:\n  samples: caps.jsonl\n  grader: includes\n  sampling: {max_new_tokens: 12}\n"
    )
    sets = [
        f"runs_dir={runs}",
        "name=r",
        f"chat_data.sources=[{{kind: openai, path: {convs}}}]",
        "chat_data.replay_fraction=0",
        "sft.warmup_steps=0",
        "sft.steps=4",
        "sft.batch_size=4",
        "sft.seq_len=64",
        "sft.lr=1e-5",
        "sft.eval_every=0",
        "sft.ckpt_every=0",
        "sft.progress=false",
        "evals.during_training_suite=caps",
        "evals.during_training_every=2",
    ]
    argv = ["sft"] + [x for s in sets for x in ("--set", s)]
    # Without evals.registry the suite is not found, and the message says where a user's suite goes.
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chatforge sft: error: evals.during_training_suite: caps: no such eval")
    assert err.endswith("a suite of your own needs its directory in evals.registry") and "\n" not in err
    assert main([*argv, "--set", f"evals.registry=[{tmp_path / 'my_evalz'}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"chatforge sft: error: evals.registry: {tmp_path / 'my_evalz'}: no such file or directory"

    assert main([*argv, "--set", f"evals.registry=[{reg}]"]) == 0
    recs = read_metrics(runs / "r" / "train" / "sft" / "metrics.jsonl", "eval_suite")
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert r["suite"] == "caps" and set(r["per_kind"]) == {"trained", "unseen"}
        assert 0.0 <= r["worst"] <= r["mean"] <= 1.0
    assert recs[-1]["per_kind"]["trained"] > recs[-1]["per_kind"]["unseen"]  # it memorised FACTS only
    # `chatforge eval` finds the same suite through the same setting
    assert main(["eval", "--list", "--set", f"evals.registry=[{reg}]"]) == 0
    assert any(line.startswith("caps ") for line in capsys.readouterr().out.splitlines())


def test_cli_eval_and_report(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from chatforge.cli import main

    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "caps.jsonl").write_text("".join(json.dumps(it) + "\n" for it in _items({**FACTS, **UNSEEN})))
    (reg / "caps.yaml").write_text(
        "caps:\n  samples: caps.jsonl\n  grader: includes\n  sampling: {max_new_tokens: 12}\n"
    )
    run = ckpt.parent
    argv = ["eval", "--model", str(ckpt), "--suite", "caps", "--registry", str(reg), "--n", "3"]
    assert main([*argv, "--temperature", "1.0"]) == 0
    out = json.loads((run / "evals" / "caps_sft.json").read_text())
    assert out["n"] == 3 and out["suite"] == "caps" and len(out["samples"]) == 6
    assert all(len(s["replies"]) == 3 for s in out["samples"])
    # a world-suite result for two stages, so the report has stage bars and a distribution
    world = runner.evaluate(
        CheckpointTarget(ckpt),
        [{**it, "kind": "fact", "check": {"type": "includes", "value": it["ideal"]}} for it in _items(FACTS)],
        graders.make_grader("world"),
        SamplingParams(max_new_tokens=12, temperature=0.0, n=2, seed=0),
    )
    for stage in ("sft", "grpo"):
        (run / "evals" / f"world_{stage}.json").write_text(json.dumps(world))
    assert main(["report", "--run", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "| behaviour | sft mean | grpo mean |" in md and "## Other eval suites" in md
    assert (run / "world_distribution.png").read_bytes()[:4] == b"\x89PNG"
    rep = json.loads((run / "report.json").read_text())
    assert set(rep["world_eval"]) == {"sft", "grpo"} and "caps_sft" in rep["suites"]
    # An item too long for the 128-token context is scored as a failure, and the result says how many.
    long_item = {
        "id": "long",
        "kind": "trained",
        "input": [{"role": "user", "content": "Ada " * 200}],
        "ideal": "x",
    }
    (reg / "caps.jsonl").write_text(json.dumps(long_item) + "\n" + json.dumps(_items(FACTS)[0]) + "\n")
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "long.json")]) == 0
    assert json.loads((tmp_path / "long.json").read_text())["too_long_for_context"] == 1
    assert '"too_long_for_context": 1' in capsys.readouterr().out
    # A suite named with a slash wrote evals/caps/v2_sft.json, a folder the report card never reads.
    (reg / "caps.yaml").write_text("caps/v2:\n  samples: caps.jsonl\n  grader: includes\n")
    assert main(["eval", "--model", str(ckpt), "--suite", "caps/v2", "--registry", str(reg)]) == 0
    assert json.loads((run / "evals" / "caps-v2_sft.json").read_text())["suite"] == "caps/v2"
    assert main(["eval", "--model", str(ckpt), "--suite", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no such eval" in err and "Traceback" not in err


def test_cli_eval_out_that_cannot_be_written(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--out DIR`` ran the whole suite, then died with IsADirectoryError (leaving DIR.tmp behind); an
    unwritable path died with a traceback too."""
    from chatforge.cli import main

    argv = ["eval", "--model", str(ckpt), "--suite", "world-mini", "--limit", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: is a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*argv, "--out", str(tmp_path / "file" / "res.json")]) == 2
    assert "res.json: cannot write the results" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_report_uses_the_settings_the_run_was_made_with(tmp_path: Path) -> None:
    """``chatforge report --run DIR`` (or ``--name``) without ``--recipe`` gave the default recipe's
    model sizes in the report card, whatever recipe made the run; the run's own config.yaml decides."""
    from chatforge.cli import main
    from chatforge.config import save_config

    made = load_config(
        None, ["model.hidden_size=96", "model.num_hidden_layers=3", "model.intermediate_size=256"]
    )
    run = tmp_path / "runs" / "other"
    save_config(made, run / "config.yaml")
    assert main(["report", "--run", str(run)]) == 0
    model = json.loads((run / "report.json").read_text())["model"]
    assert (model["hidden_size"], model["layers"]) == (96, 3)
    assert main(["report", "--set", f"runs_dir={tmp_path / 'runs'}", "--name", "other"]) == 0
    assert json.loads((run / "report.json").read_text())["model"]["hidden_size"] == 96
    assert main(["report", "--run", str(run), "--recipe", "cpu-demo"]) == 0  # an explicit recipe wins
    assert json.loads((run / "report.json").read_text())["model"]["hidden_size"] == 256


def test_report_reads_stages_in_pipeline_order(tmp_path: Path) -> None:
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=r"])
    ev = tmp_path / "r" / "evals"
    ev.mkdir(parents=True)
    blob = {"per_kind": {"fact": {"mean": 0.5}}, "overall": {"mean": 0.5}, "samples": []}
    for st in ("dpo", "base", "sft"):
        (ev / f"world_{st}.json").write_text(json.dumps(blob))
    assert list(report.find_stage_evals(tmp_path / "r", cfg.evals.models)) == ["base", "sft", "dpo"]


def test_report_compares_checkpoints_evaluated_with_different_n_and_kinds(tmp_path: Path) -> None:
    """The first checkpoint's n stood for all: base at n=1 hid the worst-of-n columns of an sft at n=4
    and the text said "1 sample(s) per prompt"; a kind a checkpoint was not evaluated on showed as 0%."""
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=r"])
    ev = tmp_path / "r" / "evals"
    ev.mkdir(parents=True)

    def blob(n: int, kinds: dict[str, tuple[float, float]]) -> dict:
        per = {k: {"mean": m, "median": m, "worst": w, "items": 2} for k, (m, w) in kinds.items()}
        return {"per_kind": per, "overall": {"mean": 0.5, "worst": 0.25}, "samples": [], "n": n}

    (ev / "world_base.json").write_text(json.dumps(blob(1, {"fact": (0.5, 0.5)})))
    sft = blob(4, {"fact": (0.75, 0.5), "system_json_constrained": (1.0, 1.0)})
    (ev / "world_sft.json").write_text(json.dumps(sft))
    md = report.write_report(cfg)["md"].read_text()
    assert "samples per prompt: base 1, sft 4" in md
    assert "| behaviour | base mean | sft mean | base worst | sft worst |" in md
    assert "| fact | 50% | 75% | 50% | 50% |" in md
    assert "| system_json_constrained | — | 100% | — | 100% |" in md


def test_report_skips_a_truncated_eval_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A half-written evals/world_sft.json (a killed eval stage wrote it in place) or suite result made
    `chatforge report` die with a JSONDecodeError traceback and write no report card."""
    from chatforge.cli import main

    ev = tmp_path / "r" / "evals"
    ev.mkdir(parents=True)
    good = {"per_kind": {"fact": {"mean": 0.5, "worst": 0.5}}, "overall": {"mean": 0.5}, "samples": []}
    (ev / "world_base.json").write_text(json.dumps(good))
    (ev / "world_sft.json").write_text(json.dumps(good)[:20])
    (ev / "caps_sft.json").write_bytes(b'{"suite": "caps", "overall": {"mean": 0.\xff')
    assert main(["report", "--run", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {ev / 'world_sft.json'}: not readable JSON" in err and "Traceback" not in err
    assert f"skipped {ev / 'caps_sft.json'}" in err
    assert "| behaviour | base mean |" in (tmp_path / "r" / "report.md").read_text()


def test_during_training_settings_are_checked(ckpt: Path, tmp_path: Path) -> None:
    """evals.during_training_limit=-3 ran the suite without its last three items (items[:-3]); an unknown
    evals.during_training_suite was reported as '--suite NAME', an option SFT does not have."""
    from chatforge.checkpoint import load_model
    from chatforge.config import ConfigError
    from chatforge.tokenizer import Tokenizer

    with pytest.raises(ConfigError, match=r"evals.during_training_limit: must be >= 0"):
        load_config(None, ["evals.during_training_suite=world-mini", "evals.during_training_limit=-3"])
    cfg = load_config(None, [f"runs_dir={tmp_path}", "evals.during_training_suite=world-mnii"])
    with pytest.raises(ChatforgeError) as e:
        runner.during_training_hook(cfg, Tokenizer.load(ckpt), load_model(ckpt))
    assert str(e.value).startswith("evals.during_training_suite: world-mnii: no such eval (did you mean")
    # A speedrun finds a wrong suite or registry directory before its first stage, not after pretraining.
    from chatforge import speedrun

    cfg = load_config(
        None, [f"runs_dir={tmp_path}", "evals.during_training_suite=mine", "evals.registry=[nope]"]
    )
    with pytest.raises(ChatforgeError, match=r"^evals.registry: nope: no such file or directory$"):
        speedrun.run(cfg, log=lambda s: None)
    assert not (cfg.run_dir / "data").exists()
    with pytest.raises(ConfigError, match=r"^evals.registry\[0\]: empty path$"):
        load_config(None, ["evals.registry=['']"])


def test_cli_eval_unwritable_out_is_found_before_the_run(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An --out under a file (or a read-only directory) was found only when the results were written,
    after every reply had been generated and graded: hours of a long suite lost to a typo. Here the
    judge does not exist, so a run that got as far as grading says so instead."""
    from chatforge.cli import main

    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "caps.jsonl").write_text(json.dumps(_items(FACTS)[0]) + "\n")
    (reg / "caps.yaml").write_text(
        "caps:\n  samples: caps.jsonl\n  grader: model_graded\n"
        f"  grader_options: {{judge: {{checkpoint: {tmp_path / 'no-judge'}}}}}\n"
    )
    (tmp_path / "file").write_text("")
    argv = ["eval", "--model", str(ckpt), "--suite", "caps", "--registry", str(reg)]
    assert main([*argv, "--out", str(tmp_path / "file" / "res.json")]) == 2
    err = capsys.readouterr().err
    assert "res.json: cannot write the results" in err and "no-judge" not in err
    assert main([*argv, "--out", str(tmp_path / "ok" / "res.json")]) == 2
    assert "no-judge: not a checkpoint directory" in capsys.readouterr().err
    assert list((tmp_path / "ok").iterdir()) == []  # the write probe left nothing


def test_cli_eval_of_a_checkpoint_two_levels_into_a_run(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`chatforge eval --model runs/x/rlhf/grpo` wrote runs/x/rlhf/evals/<suite>_grpo.json, where the
    report card never looks, and the world suite ignored the run's own chat/eval.jsonl (items from the
    default seed's world, not the one the model was trained on)."""
    import shutil

    from chatforge.cli import main

    run = tmp_path / "runs" / "x"
    shutil.copytree(ckpt, run / "rlhf" / "grpo")
    (run / "stages.json").write_text("{}")
    (run / "chat").mkdir()
    mine = {
        "id": "mine-0",
        "kind": "fact",
        "input": [{"role": "user", "content": "What is the capital of Velora?"}],
        "ideal": "Mirth",
        "check": {"type": "includes", "value": ["Mirth"]},
    }
    (run / "chat" / "eval.jsonl").write_text(json.dumps(mine) + "\n")
    argv = ["eval", "--model", str(run / "rlhf" / "grpo"), "--suite", "world-facts", "--max-new-tokens", "12"]
    assert main(argv) == 0
    res = json.loads((run / "evals" / "world-facts_rlhf-grpo.json").read_text())
    assert [s["id"] for s in res["samples"]] == ["mine-0"] and res["overall"]["mean"] == 1.0
    assert not (run / "rlhf" / "evals").exists()
    assert main(["report", "--run", str(run)]) == 0
    assert "world-facts_rlhf-grpo" in json.loads((run / "report.json").read_text())["suites"]


def test_a_failed_code_sample_says_why_in_the_eval_file(ckpt: Path) -> None:
    """code_exec scored a crash and a wrong answer alike as 0, and the eval file kept nothing else: the
    reason (the error's last lines) now sits beside the replies."""
    items = [{"id": "add", "kind": "code", "input": "Write add(a, b).", "test": "assert add(2, 3) == 5"}]
    res = runner.evaluate(
        CheckpointTarget(ckpt),
        items,
        graders.make_grader("code_exec"),
        SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=0),
    )
    smp = res["samples"][0]
    assert smp["scores"] == [0.0, 0.0]  # a capitals model writes no Python
    assert len(smp["why"]) == 2 and all(w.startswith(("error: ", "failed: ")) for w in smp["why"])
    assert all("Error" in w for w in smp["why"])  # the exception's name, e.g. SyntaxError / NameError
