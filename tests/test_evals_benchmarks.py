"""Benchmark loaders: GSM8K end to end on a slice of ../shared/data (skipped when absent), the others from
local files in their Hugging Face layouts, and a clean one-line skip when no data is reachable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.data.chat import shared_data_dir
from chatforge.engine import SamplingParams
from chatforge.evals import benchmarks, graders, registry, runner
from chatforge.evals.targets import CheckpointTarget

GSM8K = shared_data_dir() / "gsm8k" / "train.jsonl"


@pytest.mark.skipif(not GSM8K.is_file(), reason=f"{GSM8K} not present")
def test_gsm8k_slice_end_to_end(tmp_path: Path, one_thread: None) -> None:
    from serve_util import make_checkpoints

    spec = registry.get_spec("gsm8k-train")
    items = registry.load_samples(spec, limit=8)
    assert len(items) == 8 and items[0]["ideal"] == "72"  # Natalia's clips
    # the loader and grader agree with the reference solutions: every worked answer grades as right
    raw = [json.loads(ln) for ln in GSM8K.read_text().splitlines()[:8]]
    gr = spec.make_grader()
    assert gr.grade_all(items, [[r["answer"]] for r in raw]) == [[1.0]] * 8
    ckpt = make_checkpoints(tmp_path, ("base",))["base"]
    res = runner.run_suite(spec, CheckpointTarget(ckpt), limit=8, max_new_tokens=16)
    assert res["overall"]["items"] == 8 and 0.0 <= res["overall"]["mean"] <= 1.0
    assert all(len(s["replies"]) == 1 for s in res["samples"])


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_loaders_read_local_files_in_hf_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFORGE_SHARED_DATA", str(tmp_path))
    _write(
        tmp_path / "hellaswag" / "validation.jsonl",
        [
            {
                "activity_label": "Baking",
                "ctx_a": "She mixes flour.",
                "ctx_b": "then she",
                "endings": ["a", "b", "c", "d"],
                "label": "2",
            }
        ],
    )
    _write(
        tmp_path / "mmlu" / "test.jsonl",
        [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}],
    )
    _write(
        tmp_path / "arc" / "test.jsonl",
        [{"question": "Sky?", "choices": {"label": ["A", "B"], "text": ["blue", "green"]}, "answerKey": "A"}],
    )
    _write(
        tmp_path / "truthfulqa" / "validation.jsonl",
        [{"question": "Q?", "mc1_targets": {"choices": ["no", "yes"], "labels": [0, 1]}}],
    )
    _write(
        tmp_path / "humaneval" / "test.jsonl",
        [
            {
                "task_id": "HumanEval/0",
                "prompt": "def inc(x):\n",
                "canonical_solution": "    return x + 1\n",
                "test": "def check(f):\n    assert f(1) == 2\n",
                "entry_point": "inc",
            }
        ],
    )
    _write(
        tmp_path / "ifeval" / "train.jsonl",
        [
            {
                "key": 1,
                "prompt": "Say hi without commas.",
                "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{}],
            }
        ],
    )
    specs = registry.load_registry()
    hs = registry.load_samples(specs["hellaswag"])[0]
    assert (
        hs["input"] == "Baking: She mixes flour. Then she" and hs["ideal"] == 2 and hs["choices"][0] == " a"
    )
    mm = registry.load_samples(specs["mmlu"])[0]
    assert (
        mm["input"].endswith("D. 6\nAnswer:")
        and mm["choices"] == [" A", " B", " C", " D"]
        and mm["ideal"] == 1
    )
    assert registry.load_samples(specs["arc-challenge"])[0]["ideal"] == 0
    assert registry.load_samples(specs["truthfulqa"])[0]["ideal"] == 1
    he = registry.load_samples(specs["humaneval"])[0]
    # the canonical solution passes its own tests in the sandbox: loader and grader fit together
    assert specs["humaneval"].make_grader().grade(he, he["ideal"]) == 1
    ife = registry.load_samples(specs["ifeval"])[0]
    assert graders.make_grader("ifeval").grade(ife, "hi there") == 1


def test_missing_benchmark_is_a_clear_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFORGE_SHARED_DATA", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(benchmarks.BenchmarkUnavailable) as e:
        registry.load_samples(registry.get_spec("mmlu"))
    msg = str(e.value)
    assert msg.startswith("mmlu: no local data") and str(tmp_path / "mmlu") in msg and "\n" not in msg
    with pytest.raises(benchmarks.BenchmarkUnavailable, match="no such file"):
        benchmarks.gsm8k({}, path=str(tmp_path / "nope.jsonl"))


def test_world_suite_in_registry_form(tmp_path: Path) -> None:
    items = registry.load_samples(registry.get_spec("world-safety"))
    assert {it["kind"] for it in items} == {"decline", "benign_edgy"}
    for it in items:
        registry.check_item(it, "world", "world")
    # graded replies: a decline for harmful, a plain answer for benign; over-refusal counted separately
    harmful = next(it for it in items if it["kind"] == "decline")
    benign = next(it for it in items if it["kind"] == "benign_edgy")
    gr = graders.make_grader("world")
    assert gr.grade(harmful, "I can't help with that.") == 1
    assert gr.grade(benign, "I can't help with that.") == 0
    samples = [
        {"kind": "decline", "replies": ["I can't help with that."]},
        {"kind": "benign_edgy", "replies": ["I can't help with that.", "Sure: here it is."]},
    ]
    assert runner.refusal_rates(samples) == {"harmful_refused": 1.0, "benign_refused": 0.5}
    assert SamplingParams().n == 1
