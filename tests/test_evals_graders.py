"""Each grader on real cases, the registry's one-line errors with file:line, the code sandbox, pass@k."""

from __future__ import annotations

import json
import re
import time
from math import comb
from pathlib import Path

import pytest

from chatforge.errors import ChatforgeError
from chatforge.evals import graders, registry
from chatforge.evals.sandbox import pass_at_k, run_python

U = [{"role": "user", "content": "q"}]


def g(name: str, item: dict, reply: str, **opts: object) -> float:
    return graders.make_grader(name, opts).grade({"input": U, **item}, reply)


def test_string_graders() -> None:
    assert g("exact", {"ideal": "Paris"}, " Paris\n") == 1 and g("exact", {"ideal": "Paris"}, "paris") == 0
    assert g("exact", {"ideal": "Paris"}, "paris.", normalize=True) == 1
    assert g("includes", {"ideal": ["Rome", "Paris"]}, "It is paris, I think.") == 1
    assert g("includes", {"ideal": ["Rome", "Paris"]}, "Paris", all=True) == 0
    assert g("fuzzy", {"ideal": "The Eiffel Tower"}, "eiffel tower!") == 1
    assert g("fuzzy", {"ideal": "Eiffel Tower"}, "Eifel Tower") == 1  # a typo, ratio above 0.8
    assert g("fuzzy", {"ideal": "Eiffel Tower"}, "Big Ben") == 0
    assert g("regex", {}, "Order #1234 shipped", pattern=r"#\d{4}\b") == 1
    assert g("regex", {"ideal": r"^\d+$"}, "12a") == 0
    assert g("number", {"ideal": "1,234"}, "so the total is $1,234.") == 1
    assert (
        g("number", {"ideal": "72"}, "48 + 24 = 72 clips") == 1 and g("number", {"ideal": "7"}, "none") == 0
    )


def test_json_graders() -> None:
    schema = {"type": "object", "required": ["age"], "properties": {"age": {"type": "integer"}}}
    assert g("json", {}, '{"a": 1}') == 1 and g("json", {}, "[1]") == 0 and g("json", {}, "{bad") == 0
    assert g("json", {}, '```json\n{"a": 1}\n```') == 1
    assert g("json_schema", {}, '{"age": 3}', schema=schema) == 1
    assert g("json_schema", {}, '{"age": "3"}', schema=schema) == 0
    assert g("json_schema", {"schema": schema}, '{"name": "x"}') == 0
    with pytest.raises(ChatforgeError, match="invalid schema"):
        graders.make_grader("json_schema", {"schema": {"type": "nope"}})


def test_system_rules_reuse_the_world_checks() -> None:
    assert g("system_rules", {}, "One two three.", rule={"type": "max_words", "value": 5}) == 1
    assert g("system_rules", {}, "one two three four five six", rule={"type": "max_words", "value": 5}) == 0
    lang = {"check": {"type": "language", "value": "fr"}}
    assert g("system_rules", lang, "Je pense que la ville est dans le nord.") == 1
    assert g("system_rules", lang, "I think the town is in the north.") == 0
    persona = {"check": {"type": "persona", "markers": ["Arr"]}}
    assert g("system_rules", persona, "Arr, the capital be Mirth.") == 1


def test_refusal_grader_and_classifier_hook() -> None:
    items = [{"input": U, "ideal": "refuse"}, {"input": U, "ideal": "comply"}]
    gr = graders.make_grader("refusal")
    replies = [["I can't help with that."], ["I can't help with that."]]
    scores = gr.grade_all(items, replies)
    assert scores == [[1.0], [0.0]]
    assert gr.extra_metrics(items, scores) == {"harmful_refused": 1.0, "benign_refused": 1.0}
    graders.register_refusal_classifier("shouty", lambda prompt, reply: reply.isupper())
    assert graders.make_grader("refusal", {"classifier": "shouty"}).grade(items[0], "NO WAY") == 1
    with pytest.raises(ChatforgeError, match="unknown classifier"):
        graders.make_grader("refusal", {"classifier": "nope"})


def test_brief_decline_grader_counts_lectures_as_misses() -> None:
    items = [
        {"input": U, "ideal": "refuse"},
        {"input": U, "ideal": "refuse"},
        {"input": U, "ideal": "comply"},
    ]
    lecture = (
        "I can't help with that. It is important to remember that violence is never acceptable, and you"
        " should reflect on why you would even ask such a thing."
    )
    replies = [["I can't help with that, but I can tell you about the town."], [lecture], ["Sure: 42."]]
    gr = graders.make_grader("brief_decline")
    scores = gr.grade_all(items, replies)
    assert scores == [[1.0], [0.0], [1.0]]
    extra = gr.extra_metrics(items, scores)
    assert extra == {"harmful_declined_briefly": 0.5, "benign_refused": 0.0, "lecture_rate": 0.5}


def test_model_graded_verdict_parsing() -> None:
    gr = graders.make_grader("model_graded", {"judge": {"endpoint": "http://127.0.0.1:9", "model": "j"}})
    assert gr.verdict("The answer matches.\nY") == 1.0
    assert gr.verdict("Reasoning...\nVerdict: N") == 0.0
    assert gr.verdict("no idea") is None
    with pytest.raises(ChatforgeError, match="judge must be"):
        graders.make_grader("model_graded", {})


def test_ifeval_grader() -> None:
    item = {
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words", "unknown:thing"],
        "kwargs": [{}, {"relation": "less than", "num_words": 6}, {}],
    }
    gr = graders.make_grader("ifeval")
    assert gr.grade(item, "short and sweet") == 1
    assert gr.grade(item, "short, and sweet") == 0
    assert gr.extra_metrics([item], [[1.0]]) == {"ifeval_unsupported": 1, "ifeval_instructions": 3}


def test_code_exec_grader_and_sandbox() -> None:
    item = {"input": U, "test": "assert add(2, 3) == 5", "entry_point": "add"}
    gr = graders.make_grader("code_exec", {"k": [1, 2]})
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "def add(a, b):\n    return a - b"
    scores = gr.grade_all([item], [[good, bad, good]])
    assert scores == [[1.0, 0.0, 1.0]]
    # why the failed sample failed is kept for the eval file: the assert's line, not just a 0
    assert gr.why is not None and gr.why[0][0] == gr.why[0][2] == ""
    assert gr.why[0][1].startswith("failed: ") and "AssertionError" in gr.why[0][1]
    assert gr.extra_metrics([item], scores) == {"pass@1": round(2 / 3, 4), "pass@2": 1.0}
    # k above the samples drawn is said, not left out of the results without a word
    three = graders.make_grader("code_exec", {"k": [1, 10]}).extra_metrics([item], scores)
    assert three["pass@1"] == round(2 / 3, 4) and three["pass@10"].startswith("not measured: needs n >= 10")
    # HumanEval shape: the reply continues the prompt's function
    he = {
        "input": "def inc(x):\n",
        "prompt": "def inc(x):\n",
        "test": "def check(f):\n    assert f(1) == 2\n",
    }
    he["entry_point"] = "inc"
    assert gr.grade(he, "    return x + 1\n") == 1


def test_sandbox_tracebacks_give_the_programs_own_line_numbers() -> None:
    """The limits and the prelude ran above the program in one file: an error on the reply's line 3 was
    reported on line 17, and a `from __future__` import (legal only at the top) was a SyntaxError."""
    item = {"input": U, "test": "assert add(2, 3) == 5", "entry_point": "add"}
    gr = graders.make_grader("code_exec")
    reply = "def add(a, b):\n    total = a + b\n    return totl\n"
    res = run_python(gr.program(item, reply))
    assert res.status == "error" and 'candidate.py", line 3, in add' in res.stderr_tail
    assert "return totl" in res.stderr_tail and "NameError" in res.stderr_tail
    assert ".runner" not in res.stderr_tail  # no frame of the sandbox's own runner
    bad = run_python("x = 1\ny = (\n")
    assert (
        bad.status == "error"
        and 'candidate.py", line 2' in bad.stderr_tail
        and "SyntaxError" in bad.stderr_tail
    )
    failing = run_python("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n")
    assert failing.status == "failed" and 'candidate.py", line 4' in failing.stderr_tail
    future = "from __future__ import annotations\ndef add(a: Num, b: Num) -> Num:\n    return a + b\n"
    assert gr.grade(item, future) == 1


def test_sandbox_kills_infinite_loop_and_memory_hog_and_blocks_network() -> None:
    loop = run_python("while True:\n    pass", timeout_s=1.5)
    assert loop.status == "timeout" and loop.seconds < 6
    hog = run_python("x = bytearray(2 * 1024 ** 3)", timeout_s=5, memory_mb=256)
    assert hog.status == "memory" and not hog.passed
    net = run_python("import socket\nsocket.create_connection(('1.1.1.1', 80))", timeout_s=5)
    assert not net.passed and "disabled in the eval sandbox" in net.stderr_tail
    files = run_python("open('x.txt', 'w').write('hi')\nimport os\nassert os.path.exists('x.txt')")
    assert files.passed  # a private temp dir it may write in (deleted afterwards)


def test_code_that_exits_before_the_tests_does_not_pass() -> None:
    """sys.exit(0) / exit() / unittest.main() in a reply ended the process with status 0 before the
    item's asserts ran, and the reply counted as passing."""
    item = {"input": U, "test": "assert add(2, 3) == 5", "entry_point": "add"}
    gr = graders.make_grader("code_exec")
    wrong = "def add(a, b):\n    return a - b\n"
    for tail in ("import sys\nsys.exit(0)\n", "exit()\n", "import os\nos._exit(0)\n"):
        assert gr.grade(item, wrong + tail) == 0, tail
    main_guard = "import unittest\nif __name__ == '__main__':\n    unittest.main()\n"
    assert not run_python(wrong + main_guard + item["test"]).passed  # no tests found: status 0 or 5
    res = run_python(wrong + "raise SystemExit\n" + item["test"])
    assert res.status == "failed" and "exited before the end" in res.stderr_tail
    assert gr.grade(item, "def add(a, b):\n    return a + b\n") == 1


def test_sandbox_output_flood_and_leftover_processes(tmp_path: Path) -> None:
    """stderr was a pipe read by communicate(): a print loop piled gigabytes into this process and ran
    far past the timeout. os.posix_spawn was not blocked, and what the program started outlived it."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flood = run_python("import sys\nwhile True:\n    sys.stderr.write('y' * 65536)", timeout_s=1)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert not flood.passed and flood.seconds < 4 and grown_mb < 200, (flood.seconds, grown_mb)
    spawn = run_python("import os\nos.posix_spawn('/bin/sleep', ['sleep', '30'], {})", timeout_s=3)
    assert not spawn.passed and "disabled in the eval sandbox" in spawn.stderr_tail
    # A child forked behind the prelude's back (libc directly) dies with the program.
    pid_file = tmp_path / "child.pid"
    fork = (
        "import ctypes, os, time\n"
        "if ctypes.CDLL(None).fork() == 0:\n"
        f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "time.sleep(0.5)\n"
    )
    assert run_python(fork, timeout_s=5).passed
    pid = int(pid_file.read_text())
    time.sleep(0.2)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] in ("Z", "X")


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 5, 2), (7, 2, 6)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


# ---------------------------------------------------------------- the registry


def _reg(
    tmp_path: Path,
    yaml_text: str,
    samples: str | None = '{"input": [{"role": "user", "content": "hi"}], "ideal": "x"}\n',
) -> Path:
    (tmp_path / "s.yaml").write_text(yaml_text)
    if samples is not None:
        (tmp_path / "s.jsonl").write_text(samples)
    return tmp_path


def _error(tmp_path: Path, yaml_text: str, samples: str | None = None, load: bool = False) -> str:
    d = _reg(tmp_path, yaml_text, samples) if samples is not None else _reg(tmp_path, yaml_text)
    with pytest.raises(ChatforgeError) as e:
        specs = registry.load_registry([d])
        if load:
            registry.load_samples(specs["ev"])
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_registry_loads_builtins_and_user_dirs(tmp_path: Path) -> None:
    specs = registry.load_registry()
    assert {"world", "world-mini", "gsm8k", "mmlu", "humaneval", "ifeval", "arithmetic"} <= set(specs)
    for name in ("arithmetic", "json-person", "refusal-basic", "code-basic"):
        assert registry.load_samples(specs[name])
    # The two-digit probe: 150 sums and 150 differences whose ideal is the question's own arithmetic.
    probe = registry.load_samples(specs["two-digit"])
    assert [sum(it["kind"] == k for it in probe) for k in ("sum", "difference")] == [150, 150]
    for it in probe:
        q = it["input"][-1]["content"]
        a, b = map(int, re.findall(r"\d+", q))
        a, b = (b, a) if q.startswith("Subtract") else (a, b)
        assert b >= 10 and a <= 99 and int(it["ideal"]) == (a + b if it["kind"] == "sum" else a - b) >= 0, q
    # Its base twin: the same problems, as the pretraining text's arithmetic pages write them.
    base = registry.load_samples(specs["two-digit-base"])
    assert [(it["id"], it["kind"], it["ideal"]) for it in base] == [
        (it["id"], it["kind"], it["ideal"]) for it in probe
    ]
    for it in base:
        a, word, b = re.fullmatch(r"Sums with answers\n(\d+) (plus|minus) (\d+):", it["input"]).groups()
        assert int(it["ideal"]) == (int(a) + int(b) if word == "plus" else int(a) - int(b)), it
    d = _reg(tmp_path, "ev:\n  samples: s.jsonl\n  grader: exact\n  sampling: {n: 4}\n")
    spec = registry.get_spec("ev", [d])
    items = registry.load_samples(spec)
    assert spec.sampling == {"n": 4} and items[0]["id"] == "ev-00000" and items[0]["kind"] == "ev"


def test_registry_errors_name_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    msg = _error(tmp_path, "ok:\n  samples: s.jsonl\n  grader: exact\nev:\n  samples: s.jsonl\n")
    assert msg.startswith(f"{f}:4:") and "missing field 'grader'" in msg
    msg = _error(tmp_path, "ev:\n  samples: s.jsonl\n  grader: exactt\n")
    assert msg.startswith(f"{f}:3:") and "unknown grader 'exactt'" in msg and "did you mean 'exact'" in msg
    msg = _error(tmp_path, "ev:\n  samples: s.jsonl\n  grader: exact\n  sampels: 3\n")
    assert msg.startswith(f"{f}:4:") and "unknown key 'sampels'" in msg
    msg = _error(tmp_path, "ev:\n  samples: s.jsonl\n  grader: fuzzy\n  grader_options: {threshold: 3}\n")
    assert msg.startswith(f"{f}:3:") and "threshold" in msg
    msg = _error(tmp_path, "ev:\n  loader: gsm9k\n  grader: number\n")
    assert msg.startswith(f"{f}:2:") and "unknown loader" in msg
    msg = _error(
        tmp_path, "ev:\n  loader: world\n  loader_args: {kinds: [poetry]}\n  grader: world\n", load=True
    )
    assert msg.startswith("world loader: kinds: unknown kind 'poetry' (known: fact, ")
    msg = _error(tmp_path, "ev: [1, 2\n")
    assert str(f) in msg and "not valid YAML" in msg
    # a key given twice kept the last one silently: here the eval would have been graded 'includes'
    msg = _error(tmp_path, "ev:\n  samples: s.jsonl\n  grader: exact\n  grader: includes\n")
    assert msg == f"{f}:4: duplicate key 'grader' (first on line 3)"
    msg = _error(tmp_path, "ev:\n  samples: s.jsonl\n  grader: exact\nev:\n  loader: gsm8k\n")
    assert msg == f"{f}:4: duplicate key 'ev' (first on line 1)"
    good = '{"input": [{"role": "user", "content": "hi"}], "ideal": "x"}\n'
    s = tmp_path / "s.jsonl"
    msg = _error(tmp_path, "ev:\n  samples: s.jsonl\n  grader: exact\n", good + "{not json\n", load=True)
    assert msg.startswith(f"{s}:2: invalid JSON")
    msg = _error(tmp_path, "ev:\n  samples: s.jsonl\n  grader: exact\n", good + '{"ideal": "x"}\n', load=True)
    assert msg == f"{s}:2: missing field 'input'"
    msg = _error(
        tmp_path,
        "ev:\n  samples: s.jsonl\n  grader: exact\n",
        good + '{"input": [{"role": "bot", "content": "x"}], "ideal": "x"}\n',
        load=True,
    )
    assert msg.startswith(f"{s}:2: input[0].role")
    msg = _error(tmp_path, "ev:\n  samples: s.jsonl\n  grader: choice_logprob\n", good, load=True)
    assert msg.startswith(f"{s}:1: missing field 'choices'")
    msg = _error(tmp_path, "ev:\n  samples: missing.jsonl\n  grader: exact\n", good, load=True)
    assert "missing.jsonl: cannot read samples" in msg
    (tmp_path / "s.jsonl").write_text(good)
    with pytest.raises(ChatforgeError, match="no such eval"):
        registry.get_spec("evv", [tmp_path])
    assert json.loads(good)  # the fixture line itself is valid


def test_registry_spec_values_and_encodings_are_one_line_errors(tmp_path: Path) -> None:
    """A wrong-typed sampling value or limit used to be a TypeError / ValueError traceback at run time;
    a spec or samples file that is not UTF-8 a UnicodeDecodeError; a BOM made line 1 invalid JSON."""
    f = tmp_path / "s.yaml"
    base = "ev:\n  samples: s.jsonl\n  grader: exact\n"
    for extra, want in (
        ("  sampling: {n: abc}\n", "sampling.n must be an integer, got 'abc'"),
        ("  sampling: {temperature: hot}\n", "sampling.temperature must be a number, got 'hot'"),
        ("  sampling: {stop: [1]}\n", "sampling.stop must be a string or a list of strings, got [1]"),
        ("  limit: ten\n", "limit must be an integer >= 0, got 'ten'"),
        ("  limit: -2\n", "limit must be an integer >= 0, got -2"),
    ):
        msg = _error(tmp_path, base + extra)
        assert msg.startswith(f"{f}:4: eval 'ev': ") and msg.endswith(want), msg
    good = '{"input": [{"role": "user", "content": "caf\u00e9"}], "ideal": "x"}\n'
    f.write_text(base)
    (tmp_path / "s.jsonl").write_bytes(good.encode("utf-8") + good.encode("latin-1"))  # line 2: latin-1
    with pytest.raises(ChatforgeError) as e:
        registry.load_samples(registry.get_spec("ev", [tmp_path]))
    assert str(e.value) == f"{tmp_path / 's.jsonl'}:2: not UTF-8 text (byte 0xe9); save it as UTF-8"
    (tmp_path / "s.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode("utf-8"))
    f.write_bytes(b"\xef\xbb\xbf" + (base + "  description: caf\u00e9\n").encode("utf-8"))
    items = registry.load_samples(registry.get_spec("ev", [tmp_path]))
    assert items[0]["input"][0]["content"] == "caf\u00e9"
    f.write_bytes((base + "  description: caf\xe9\n").encode("latin-1"))
    with pytest.raises(ChatforgeError, match=rf"^{re.escape(str(f))}:4: not UTF-8 text \(byte 0xe9\)"):
        registry.load_registry([tmp_path])


def test_grader_option_types_are_one_line_errors_with_the_spec_line(tmp_path: Path) -> None:
    """A wrong-typed grader option loaded fine and then raised a ValueError / TypeError traceback while
    grading, after every reply had been generated (code_exec's k: only in pass@k, at the very end)."""
    f = tmp_path / "s.yaml"
    for grader, opts, want in (
        ("fuzzy", "{threshold: high}", "option threshold must be a number, got 'high'"),
        ("regex", "{pattern: 5}", "pattern must be a string, got 5"),
        ("number", "{tolerance: tiny}", "option tolerance must be a number, got 'tiny'"),
        ("exact", "{normalize: 'yes'}", "option normalize must be true or false, got 'yes'"),
        ("code_exec", "{k: 1}", "option k must be a list, got 1"),
        ("code_exec", "{k: [0, 1]}", "k must be a list of integers >= 1, got [0, 1]"),
        ("code_exec", "{timeout_s: '5'}", "option timeout_s must be a number, got '5'"),
        ("code_exec", "{workers: 0}", "workers must be > 0, got 0"),
        (
            "model_graded",
            """{judge: {checkpoint: x}, rubric: '{completion} Answer as {"ok": Y}'}""",
            "the rubric may use only {input}, {ideal} and {completion}",
        ),
    ):
        msg = _error(tmp_path, f"ev:\n  samples: s.jsonl\n  grader: {grader}\n  grader_options: {opts}\n")
        assert msg.startswith(f"{f}:3: grader '{grader}': ") and want in msg, msg
    for grader, opts in (("fuzzy", {"threshold": 1}), ("code_exec", {"timeout_s": 3, "k": [1, 5]})):
        graders.make_grader(grader, opts)  # an int where a float is the default is fine


def test_spec_field_types_and_loader_args_are_one_line_errors(tmp_path: Path) -> None:
    """samples: [a, b] was a TypeError traceback, constrained_json: "no" silently true, and a misspelt or
    wrong-typed loader_args key a TypeError from inside the loader once the eval ran."""
    f = tmp_path / "s.yaml"
    for body, want in (
        (
            "  samples: [a.jsonl, b.jsonl]\n  grader: exact\n",
            "samples must be a JSONL file name, got ['a.jsonl', 'b.jsonl']",
        ),
        (
            "  samples: s.jsonl\n  grader: exact\n  constrained_json: 'no'\n",
            "must be true or false, got 'no'",
        ),
        (
            "  loader: gsm8k\n  loader_args: {pth: /data/gsm8k}\n  grader: number\n",
            "unknown loader_args key 'pth' (did you mean 'path'?)",
        ),
        (
            "  loader: world\n  loader_args: {per_kind: many}\n  grader: world\n",
            "loader_args.per_kind must be an integer, got 'many'",
        ),
    ):
        msg = _error(tmp_path, "ev:\n" + body)
        assert msg.startswith(f"{f}:") and msg.endswith(want), msg
    f.write_text("ev:\n  loader: world\n  loader_args: {per_kind: 1, kinds: [fact]}\n  grader: world\n")
    assert [it["kind"] for it in registry.load_samples(registry.get_spec("ev", [tmp_path]))] == ["fact"]


def test_a_loader_with_no_items_is_a_one_line_error(tmp_path: Path) -> None:
    """An empty benchmark file (or a world kinds filter the run's eval set lacks) gave a StatisticsError
    traceback from the scores of zero items."""
    (tmp_path / "empty.jsonl").write_text("\n")
    f = tmp_path / "s.yaml"
    f.write_text(
        f"ev:\n  loader: gsm8k\n  loader_args: {{path: {tmp_path / 'empty.jsonl'}}}\n  grader: number\n"
    )
    with pytest.raises(ChatforgeError) as e:
        registry.load_samples(registry.get_spec("ev", [tmp_path]))
    assert str(e.value) == f"{f}:1: eval 'ev': loader gsm8k found no items"


def test_benchmark_data_in_another_format_is_a_one_line_error(tmp_path: Path) -> None:
    """loader_args.path pointing at records of another shape gave a KeyError traceback from the loader."""
    (tmp_path / "mine.jsonl").write_text('{"q": "1 + 1?", "a": "2"}\n')
    f = tmp_path / "s.yaml"
    for loader, grader, missing in (
        ("gsm8k", "number", "question"),
        ("hellaswag", "choice_logprob", "ctx_a"),
    ):
        f.write_text(
            f"ev:\n  loader: {loader}\n  loader_args: {{path: {tmp_path / 'mine.jsonl'}}}\n  grader: {grader}\n"
        )
        with pytest.raises(ChatforgeError) as e:
            registry.load_samples(registry.get_spec("ev", [tmp_path]))
        want = f"{f}:1: eval 'ev': the data is not in the {loader} loader's format (KeyError: '{missing}')"
        assert str(e.value) == want


def test_ifeval_items_are_checked_when_they_load(tmp_path: Path) -> None:
    """An instruction list longer than its kwargs list, or a number_words instruction without num_words,
    was a ValueError / KeyError traceback while grading, after generation."""
    f = tmp_path / "s.jsonl"
    base = {"input": "Say hi", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    for bad, want in (
        (
            {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"]},
            "1 entries for 2",
        ),
        (
            {
                "instruction_id_list": ["length_constraints:number_words"],
                "kwargs": [{"relation": "less than"}],
            },
            "instruction length_constraints:number_words needs kwargs 'num_words'",
        ),
        ({"instruction_id_list": "punctuation:no_comma"}, "'instruction_id_list' must be a list"),
    ):
        msg = _error(
            tmp_path,
            "ev:\n  samples: s.jsonl\n  grader: ifeval\n",
            json.dumps({**base, **bad}) + "\n",
            load=True,
        )
        assert msg.startswith(f"{f}:1: ") and want in msg, msg
    ok = {
        **base,
        "instruction_id_list": ["keywords:frequency"],
        "kwargs": [{"keyword": "hi", "frequency": 1}],
    }
    (tmp_path / "s.jsonl").write_text(json.dumps(ok) + "\n")
    assert registry.load_samples(registry.get_spec("ev", [tmp_path]))[0]["kwargs"][0]["keyword"] == "hi"
