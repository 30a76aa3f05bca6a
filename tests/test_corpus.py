"""The data stage: readers, cleaning, quality filters, dedup, prepare(), and token shards."""

from __future__ import annotations

import codecs
import gzip
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from chatforge.config import DataConfig, RunConfig, SourceConfig
from chatforge.data.chat import read_openai_jsonl
from chatforge.data.corpus import (
    Deduper,
    ReadReport,
    TokenShards,
    clean_text,
    is_val,
    lsh_bands,
    open_sources,
    prepare,
    quality_reason,
    read_docs,
    read_source,
    split_long,
    write_shards,
)
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer, train_tokenizer

SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "va", "sel", "un", "dra", "phi", "qu", "es", "ath", "bo", "ni"]


def prose(seed: int, n_words: int = 120) -> str:
    """Varied pseudo-English: passes the quality filters and is unlike any other seed's text."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(n_words)]
    sentences, i = [], 0
    while i < len(words):
        k = rng.randint(6, 14)
        sentences.append(" ".join(words[i : i + k]).capitalize() + ".")
        i += k
    return " ".join(sentences)


def docs_of(src: SourceConfig) -> tuple[list[str], ReadReport]:
    report = ReadReport()
    return [d.text for d in read_source(src, report)], report


def write_gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


# ---------------------------------------------------------------- readers


def test_text_reader_file_and_blank_line_blocks(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("one\nstill one\n\n\ntwo\n \nthree\n")
    assert docs_of(SourceConfig(kind="text", path=str(f)))[0] == ["one\nstill one\n\n\ntwo\n \nthree\n"]
    blocks, _ = docs_of(SourceConfig(kind="text", path=str(f), split_on_blank_lines=True))
    assert blocks == ["one\nstill one\n", "two\n", "three\n"]


def test_text_reader_gz_directories_and_globs(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha")
    write_gz(tmp_path / "d" / "b.txt.gz", b"beta")
    (tmp_path / "d" / "sub" / "c.txt").write_text("gamma")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    texts, report = docs_of(SourceConfig(kind="text", path=str(tmp_path / "d")))
    assert texts == ["alpha", "beta", "gamma"] and report.files == 3
    texts, _ = docs_of(SourceConfig(kind="text", path=str(tmp_path / "d" / "*.txt*")))
    assert texts == ["alpha", "beta"]
    texts, _ = docs_of(SourceConfig(kind="text", path=str(tmp_path / "d" / "**" / "c.txt")))
    assert texts == ["gamma"]
    # gzip is recognised by its magic bytes, whatever the name.
    write_gz(tmp_path / "plain.txt", b"zipped anyway")
    assert docs_of(SourceConfig(kind="text", path=str(tmp_path / "plain.txt")))[0] == ["zipped anyway"]


def test_jsonl_bad_lines_are_counted_with_line_numbers(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        "",
        json.dumps({"text": 42}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "good two", "extra": 1}),
    ]
    f.write_text("\n".join(lines) + "\n")
    texts, report = docs_of(SourceConfig(kind="jsonl", path=str(f)))
    assert texts == ["good one", "good two"]
    assert report.bad_records == 4
    assert report.examples[0].startswith(f"{f}:2: not JSON")
    assert any(e.startswith(f"{f}:3: no 'text' field") for e in report.examples)
    assert any(e.startswith(f"{f}:5: 'text' is not a string") for e in report.examples)
    assert any(e.startswith(f"{f}:6: not a JSON object") for e in report.examples)


def test_jsonl_other_field_gz_and_json_arrays(tmp_path: Path) -> None:
    write_gz(tmp_path / "a.jsonl.gz", b'{"content": "from gz"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"content": "in array"}, {"content": None}]))
    texts, report = docs_of(SourceConfig(kind="jsonl", path=str(tmp_path), text_field="content"))
    assert texts == ["from gz", "in array"]
    assert report.bad_records == 1 and report.examples[0].startswith(f"{tmp_path / 'b.json'}:[1]")


def test_a_json_array_with_a_syntax_error_keeps_the_records_before_it(tmp_path: Path) -> None:
    """A .json array was parsed whole: one stray character lost every record in the file, counted as a
    single bad record. Now the elements before the error are read, and the error is one bad record that
    says where (the array index and the line)."""
    f = tmp_path / "a.json"
    f.write_text('\n[{"text": "one"},\n {"nope": 1},\n {"text": "two"},\n {oops}, {"text": "lost"}]\n')
    texts, report = docs_of(SourceConfig(kind="jsonl", path=str(f)))
    assert texts == ["one", "two"] and report.bad_records == 2
    assert report.examples == [
        f"{f}:[1]: no 'text' field (has: nope)",
        f"{f}:[3]: not JSON (Expecting property name enclosed in double quotes at line 5); rest of file skipped",
    ]
    g = tmp_path / "b.json"
    g.write_text('[{"text": "x"} {"text": "y"}]')
    texts, report = docs_of(SourceConfig(kind="jsonl", path=str(g)))
    assert texts == ["x"] and "expected ',' or ']' at line 1" in report.examples[0]
    (tmp_path / "c.json").write_text("[ ]")
    with pytest.raises(ChatforgeError, match="no records"):
        docs_of(SourceConfig(kind="jsonl", path=str(tmp_path / "c.json")))


def test_invalid_utf8_is_replaced_and_reported(tmp_path: Path) -> None:
    f = tmp_path / "bad.txt"
    f.write_bytes(b"line one\ncaf\xe9 au lait\n")
    texts, report = docs_of(SourceConfig(kind="text", path=str(f)))
    assert texts == ["line one\ncaf\ufffd au lait\n"]
    assert report.invalid_utf8 == 1 and report.examples[0].startswith(f"{f}:2: invalid UTF-8")
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    texts, report = docs_of(SourceConfig(kind="jsonl", path=str(j)))
    assert texts == ["ok", "caf\ufffd"] and report.invalid_utf8 == 1
    assert report.examples[0].startswith(f"{j}:2:")


def test_utf16_bom_and_old_mac_line_endings(tmp_path: Path) -> None:
    """UTF-16 files (with their BOM, as Windows tools write them) were decoded as UTF-8 into replacement
    characters and counted invalid_utf8, although the chat readers read them; a CR-only file (old Mac)
    was one line, so one block; and a UTF-8 BOM followed by a blank line was a block of its own."""
    text = "Caf\u00e9 one\nstill one\n\nt\u00e9a two\n"
    for enc in ("utf-16", "utf-16-be", "utf-32"):
        f = tmp_path / f"{enc}.txt"
        data = text.encode(enc)
        f.write_bytes(data if enc != "utf-16-be" else codecs.BOM_UTF16_BE + data)
        for split, want in ((False, [text]), (True, ["Caf\u00e9 one\nstill one\n", "t\u00e9a two\n"])):
            texts, report = docs_of(SourceConfig(kind="text", path=str(f), split_on_blank_lines=split))
            assert texts == want and report.invalid_utf8 == 0, (enc, split)
        j = tmp_path / f"{enc}.jsonl"
        data = '{"text": "caf\u00e9"}\r\n{"text": "t\u00e9a"}\r\n'.encode(enc)
        j.write_bytes(data if enc != "utf-16-be" else codecs.BOM_UTF16_BE + data)
        texts, report = docs_of(SourceConfig(kind="jsonl", path=str(j)))
        assert texts == ["caf\u00e9", "t\u00e9a"] and report.invalid_utf8 == 0 and not report.bad_records
    mac = tmp_path / "mac.txt"
    mac.write_bytes(b"one\rstill one\r\rtwo\r")
    texts, _ = docs_of(SourceConfig(kind="text", path=str(mac), split_on_blank_lines=True))
    assert texts == ["one\nstill one\n", "two\n"]
    macj = tmp_path / "mac.jsonl"
    macj.write_bytes(b'{"text": "a"}\r{"x": 1}\r{"text": "c"}\r')
    texts, report = docs_of(SourceConfig(kind="jsonl", path=str(macj)))
    assert texts == ["a", "c"] and report.examples == [f"{macj}:2: no 'text' field (has: x)"]
    bom = tmp_path / "bom.txt"
    bom.write_bytes(codecs.BOM_UTF8 + b"\n\nfirst\n\nsecond\r\n")
    texts, report = docs_of(SourceConfig(kind="text", path=str(bom), split_on_blank_lines=True))
    assert texts == ["first\n", "second\n"] and not report.bad_records
    assert docs_of(SourceConfig(kind="text", path=str(bom)))[0] == ["\n\nfirst\n\nsecond\r\n"]
    # A bad byte in a UTF-16 file is reported at its line, like a bad UTF-8 byte.
    bad = tmp_path / "bad16.txt"
    bad.write_bytes("ok\r\nline two ".encode("utf-16") + b"\x00\xd8" + "\n".encode("utf-16-le"))
    texts, report = docs_of(SourceConfig(kind="text", path=str(bad)))
    assert report.invalid_utf8 == 1 and report.examples[0].startswith(f"{bad}:2: ")


def test_jsonl_whose_first_line_is_an_array_is_read_per_line(tmp_path: Path) -> None:
    """A JSON Lines file whose first record is an array was taken for one JSON-array file: its other
    lines were one "not JSON" bad record, or ignored. It is read line by line, with each line's error;
    an array file (pretty-printed or on one line, even named .jsonl) is still read as one."""
    recs = [
        json.dumps([{"text": "in a list"}]),
        json.dumps({"text": "second"}),
        "oops",
        json.dumps({"text": "x4"}),
    ]
    arr = [{"text": "a"}, {"text": "b"}]
    for name in ("mixed.jsonl", "mixed.json", "mixed.txt"):
        f = tmp_path / name
        f.write_text("\n".join(recs) + "\n")
        texts, report = docs_of(SourceConfig(kind="jsonl", path=str(f)))
        assert texts == ["second", "x4"], name
        assert report.examples == [f"{f}:1: not a JSON object (list)", f"{f}:3: not JSON (Expecting value)"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('[{"text": "a"},\n' + json.dumps({"text": "kept"}) + "\n")
    texts, report = docs_of(SourceConfig(kind="jsonl", path=str(broken)))
    assert texts == ["kept"] and report.examples[0].startswith(f"{broken}:1: not JSON")
    for name, body in (("pretty.jsonl", json.dumps(arr, indent=2)), ("one.json", json.dumps(arr))):
        (tmp_path / name).write_text(body + "\n")
        texts, report = docs_of(SourceConfig(kind="jsonl", path=str(tmp_path / name)))
        assert texts == ["a", "b"] and not report.bad_records, name
    # The chat and preference readers decide the same way.
    chat_recs = [
        json.dumps([1]),
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
        ),
        "oops",
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(chat_recs) + "\n")
    convs, errors = read_openai_jsonl(tmp_path / "chat.jsonl")
    assert len(convs) == 1 and [e.split("chat.jsonl:")[1][:2] for e in errors] == ["1:", "3:"]


def test_empty_and_unreadable_files_are_counted_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "good.txt").write_text("good")
    (tmp_path / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    texts, report = docs_of(SourceConfig(kind="text", path=str(tmp_path)))
    assert texts == ["good"]
    assert report.bad_records == 2
    assert report.reasons["empty file"] == 1 and report.reasons["unreadable"] == 1
    # An unreadable file is one bad record, not also an "empty file" (blank-line and JSONL readers).
    (tmp_path / "empty.txt").unlink()
    texts, report = docs_of(SourceConfig(kind="text", path=str(tmp_path), split_on_blank_lines=True))
    assert texts == ["good"] and report.bad_records == 1 and report.reasons["unreadable"] == 1
    (tmp_path / "good.jsonl").write_text('{"text": "good"}\n')
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    texts, report = docs_of(SourceConfig(kind="jsonl", path=str(tmp_path)))
    assert texts == ["good"] and report.bad_records == 1 and report.reasons["unreadable"] == 1


def test_missing_path_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ChatforgeError, match=r"nope\.jsonl") as e:
        read_source(SourceConfig(kind="jsonl", path=str(missing)))  # raises before iterating
    assert "\n" not in str(e.value)
    with pytest.raises(ChatforgeError, match="no files match"):
        read_source(SourceConfig(kind="text", path=str(tmp_path / "*.txt")))


def test_source_with_no_documents_is_an_error_naming_the_first_problem(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(ChatforgeError, match=r"no documents \(2 bad records.*x\.jsonl:1: no 'text' field"):
        docs_of(SourceConfig(kind="jsonl", path=str(f)))


def test_parquet_reader(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["first", None, "third"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "b.parquet")
    texts, report = docs_of(SourceConfig(kind="parquet", path=str(tmp_path)))
    assert texts == ["first", "third"]
    assert report.bad_records == 3  # one null row + two rows of a file without the column
    assert f"{tmp_path / 'a.parquet'}:row 1: null text" in report.examples
    assert any("no column 'text' (columns: body)" in e for e in report.examples)


def test_max_docs(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    assert len(docs_of(SourceConfig(kind="jsonl", path=str(f), max_docs=3))[0]) == 3


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_source_on_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streaming: bool) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    f = tmp_path / "d.jsonl"
    f.write_text(
        "".join(json.dumps({"text": t, "k": 1}) for t in ["first doc", "second doc"]).replace("}{", "}\n{")
    )
    texts, _ = docs_of(SourceConfig(kind="hf", path=str(f), streaming=streaming))
    assert texts == ["first doc", "second doc"]
    with pytest.raises(ChatforgeError, match=r"no documents \(2 bad records.*'k' is not a string"):
        docs_of(SourceConfig(kind="hf", path=str(f), text_field="k", streaming=streaming))
    t = tmp_path / "t.txt"
    t.write_text("para one\n\npara two\n")
    texts, _ = docs_of(SourceConfig(kind="hf", path=str(t), split_on_blank_lines=True, streaming=streaming))
    assert [x.strip() for x in texts] == ["para one", "para two"]


def test_streamed_hf_source_with_a_malformed_file_is_a_bad_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed set is parsed while it is read, after load_dataset returned: a malformed JSON line in a
    local file (or a dropped connection) raised pyarrow's ArrowInvalid out of `chatforge data` as a
    traceback. It is now one bad record ("unreadable"), and the rows read before it are kept."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"text": "kept doc"}) + "\n")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "lost"}) + "\n{oops\n")
    texts, report = docs_of(SourceConfig(kind="hf", path=str(tmp_path / "d"), streaming=True))
    assert texts == ["kept doc"] and report.bad_records == 1
    assert list(report.reasons) == ["unreadable"] and ":row 1: unreadable (" in report.examples[0]
    with pytest.raises(ChatforgeError, match=r"^hf:.*no documents \(1 bad records.*row 0: unreadable"):
        docs_of(SourceConfig(kind="hf", path=str(tmp_path / "d" / "b.jsonl"), streaming=True))


def test_hf_hub_name_is_passed_through_and_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kw):
        calls.append((path, name, split, streaming))
        if path == "broken/set":
            raise FileNotFoundError("Dataset 'broken/set' doesn't exist on the Hub\nmore detail")
        return [{"text": "from the hub"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = SourceConfig(kind="hf", path="someone/set", name="cfg", split="validation", streaming=True)
    assert docs_of(src)[0] == ["from the hub"]
    assert calls == [("someone/set", "cfg", "validation", True)]
    with pytest.raises(
        ChatforgeError, match=r"^hf source 'broken/set': could not load .*doesn't exist[^\n]*$"
    ):
        read_source(SourceConfig(kind="hf", path="broken/set"))


def test_world_source() -> None:
    try:
        import chatforge.data.world  # noqa: F401
    except ImportError:
        pytest.skip("chatforge.data.world not available yet")
    src = SourceConfig(kind="world", seed=3, n_docs=20)
    a, _ = docs_of(src)
    b, _ = docs_of(src)
    assert len(a) == 20 and a == b and all(isinstance(t, str) and t for t in a)


# ---------------------------------------------------------------- cleaning and filters


def test_clean_text() -> None:
    assert clean_text("caf\u0065\u0301") == "caf\u00e9"  # NFC
    assert clean_text("a\x00b\x07c\td\x1be\x7f\x9bf") == "abc\tdef"  # C0, DEL, C1 dropped
    assert clean_text("a\x0bb\x0cc\x85d\u2028e") == "a\nb\nc\nd\ne"  # other line breaks become \n
    assert clean_text("\ufeffhello\r\nworld\rend") == "hello\nworld\nend"
    assert clean_text("trailing   \nspaces\t\t\nkept") == "trailing\nspaces\nkept"
    assert clean_text("a\n\n\n\n\n\nb") == "a\n\n\nb"  # at most two blank lines
    assert clean_text("a\n\n\nb") == "a\n\n\nb"
    assert clean_text("\n\n  indented first line\n\n") == "  indented first line"
    assert clean_text("lone \ud800 surrogate") == "lone ? surrogate"
    assert clean_text("emoji 👩‍👩‍👧 and 東京 stay") == "emoji 👩‍👩‍👧 and 東京 stay"


def test_quality_filters() -> None:
    cfg = DataConfig()
    assert quality_reason(prose(1), cfg) is None
    assert quality_reason("too short", cfg) == "too_short"
    assert quality_reason(
        "1234 5678 9012 ### $$$ %%% 3456 7890 !!! ??? 1234 5678 9012 3456 7890 +++ ===", cfg
    ) == ("non_text")
    assert quality_reason("東京は日本の首都です。大きな都市で、多くの人が住んでいます。" * 3, cfg) is None
    lines = "\n".join(["Buy cheap watches now!"] * 6 + ["Contact us today for deals."] * 2)
    assert quality_reason(lines, cfg) == "repetitive"
    spam = "click here to win " * 30
    assert quality_reason(spam, cfg) == "repetitive"
    names = ["apples", "pears", "plums", "grapes", "lemons", "melons"]
    code = "Here are the loops:\n" + "\n".join(
        f"```\nfor {n[:-1]} in {n} {{\n  process({n[:-1]})\n}}" for n in names
    )
    assert quality_reason(code, cfg) is None  # repeated "}" lines are structure, not repetition
    # A phrase repeated twice in a short text is normal writing, not spam.
    assert (
        quality_reason("The old river town had a market. Then the old river town slept again at dusk.", cfg)
        is None
    )


def test_split_long_keeps_all_text_at_paragraph_boundaries() -> None:
    paras = [prose(i, 40) for i in range(10)]
    text = "\n\n".join(paras)
    pieces = split_long(text, 700)
    assert len(pieces) > 1 and all(len(p) <= 700 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())
    assert all(any(p.startswith(q[:30]) for q in paras) for p in pieces)  # cuts fall between paragraphs
    assert split_long("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_dedup_exact_near_and_unrelated() -> None:
    d = Deduper(near_dup_threshold=0.8, num_perm=64)
    base = prose(7, 200)
    assert d.add(base) == "unique"
    assert d.add("  " + base.upper().replace(" ", "  \n") + " ") == "exact_dup"  # case/whitespace only
    words = base.split()
    words[50] = "EDITED"
    words[120] = "CHANGED"
    assert d.add(" ".join(words)) == "near_dup"
    assert d.add(prose(8, 200)) == "unique"
    off = Deduper(near_dup_threshold=1.0)
    assert off.add(base) == "unique" and off.add(" ".join(words)) == "unique" and off.add(base) == "exact_dup"


def test_near_duplicates_well_above_the_threshold_are_all_found() -> None:
    """LSH is only the candidate filter (each candidate is confirmed with its estimated Jaccard), so it
    must not miss pairs above the threshold. datasketch's own banding for 64 permutations at 0.8 (5 bands
    of 11 rows) let 12 of 100 copies with two words edited in 200 (Jaccard 0.9) through as unique."""
    d = Deduper(near_dup_threshold=0.8, num_perm=64)
    verdicts = Counter()
    for seed in range(100):
        words = prose(1000 + seed, 200).split()
        assert d.add(" ".join(words)) == "unique"
        words[40], words[150] = "EDITED", "CHANGED"
        verdicts[d.add(" ".join(words))] += 1
    assert verdicts["near_dup"] >= 97, verdicts
    assert lsh_bands(0.8, 64) == (12, 5) and lsh_bands(0.5, 4) == (4, 1)


# ---------------------------------------------------------------- prepare()


def make_run(tmp_path: Path, sources: list[SourceConfig], **data_kw) -> RunConfig:
    return RunConfig(name="t", runs_dir=str(tmp_path / "runs"), data=DataConfig(sources=sources, **data_kw))


def test_prepare_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "txt").mkdir()
    for i in range(5):
        (tmp_path / "txt" / f"{i}.txt").write_text(prose(i) + "\r\n\r\n\r\n\r\n\r\nEnd.   \n")
    (tmp_path / "txt" / "dup.txt").write_text(prose(0) + "\n\n\n\nEnd.")  # same after cleaning
    (tmp_path / "txt" / "short.txt").write_text("tiny")
    # The last record is the text of 1.txt without its "End.": a near duplicate across sources.
    recs = [{"text": prose(10 + i)} for i in range(6)] + [{"text": prose(1)}]
    lines = [json.dumps(r) for r in recs] + ["not json", json.dumps({"title": "x"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    cfg = make_run(
        tmp_path,
        [
            SourceConfig(kind="text", path=str(tmp_path / "txt")),
            SourceConfig(kind="jsonl", path=str(tmp_path / "d.jsonl")),
        ],
    )
    stats = prepare(cfg)
    docs = list(read_docs(cfg.run_dir / "data" / "docs.jsonl.gz"))
    assert len(docs) == stats["docs"] == 11
    assert docs[0].text.endswith("\n\n\nEnd.") and "\r" not in docs[0].text
    assert {d.source for d in docs} == {f"text:{tmp_path / 'txt'}", f"jsonl:{tmp_path / 'd.jsonl'}"}
    saved = json.loads((cfg.run_dir / "data" / "prepare_stats.json").read_text())
    assert saved == stats
    text_st, jsonl_st = stats["sources"]
    assert text_st["read"] == 7 and text_st["kept"] == 5
    assert text_st["dropped"] == {"exact_dup": 1, "too_short": 1}
    assert jsonl_st["read"] == 9 and jsonl_st["kept"] == 6
    assert jsonl_st["dropped"] == {"bad_record": 2, "near_dup": 1}
    assert jsonl_st["examples"][0] == f"{tmp_path / 'd.jsonl'}:8: not JSON (Expecting value)"
    for st in stats["sources"]:
        assert st["read"] + st["extra_pieces"] == st["kept"] + sum(st["dropped"].values())


def test_prepare_splits_long_documents(tmp_path: Path) -> None:
    f = tmp_path / "long.txt"
    f.write_text("\n\n".join(prose(i, 60) for i in range(20)))
    cfg = make_run(tmp_path, [SourceConfig(kind="text", path=str(f))], max_chars=2000)
    stats = prepare(cfg)
    st = stats["sources"][0]
    assert st["split_long_docs"] == 1 and st["kept"] == 1 + st["extra_pieces"] > 2
    assert all(len(d.text) <= 2000 for d in read_docs(cfg.run_dir / "data" / "docs.jsonl.gz"))


def test_prepare_errors(tmp_path: Path) -> None:
    with pytest.raises(ChatforgeError, match=r"missing\.txt"):
        prepare(make_run(tmp_path, [SourceConfig(kind="text", path=str(tmp_path / "missing.txt"))]))
    (tmp_path / "s.txt").write_text("short")
    with pytest.raises(ChatforgeError, match="no documents left"):
        prepare(make_run(tmp_path, [SourceConfig(kind="text", path=str(tmp_path / "s.txt"))]))
    assert not (tmp_path / "runs" / "t" / "data" / "docs.jsonl.gz").exists()


def test_an_empty_source_fails_before_any_source_is_processed(tmp_path: Path) -> None:
    """A source with no documents stopped `chatforge data` only when its turn came, after the sources
    before it had been cleaned and deduplicated (minutes on a real corpus). Every source is now read up
    to its first document before any work, and the documents read are not lost."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(3)) + "not json\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    sources = [SourceConfig(kind="jsonl", path=str(good)), SourceConfig(kind="world", seed=0, n_docs=200)]
    opened = open_sources(sources)
    assert opened[0][1].bad_records == 0  # only the first record of each source was read
    assert [d.text for d in opened[0][2]] == [prose(i) for i in range(3)] and opened[0][1].bad_records == 1
    for name, why in (("empty.jsonl", "empty file"), ("bad.jsonl", "no 'text' field")):
        with pytest.raises(ChatforgeError, match=rf"jsonl:.*{name}: no documents .*{why}"):
            open_sources([*sources, SourceConfig(kind="jsonl", path=str(tmp_path / name))])
    with pytest.raises(ChatforgeError, match=r"empty\.jsonl: no documents"):
        prepare(
            make_run(tmp_path, [*sources, SourceConfig(kind="jsonl", path=str(tmp_path / "empty.jsonl"))])
        )


# ---------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer, list[str]]:
    root = tmp_path_factory.mktemp("shards")
    texts = [prose(i, random.Random(i).randint(20, 150)) for i in range(300)]
    texts.append("A document that mentions <|endoftext|> and <|im_start|> literally, as plain text here.")
    docs_path = root / "docs.jsonl.gz"
    with gzip.open(docs_path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "source": "test"}) + "\n")
    return docs_path, train_tokenizer(texts, vocab_size=400), texts


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eos)
    return [tokens[a + 1 if i else 0 : b].tolist() for i, (a, b) in enumerate(zip([-1, *ends[:-1]], ends))]


def test_write_shards_round_trip(prepared, tmp_path: Path) -> None:
    docs_path, tok, texts = prepared
    stats = write_shards(docs_path, tok, tmp_path, val_fraction=0.1, num_workers=1, seed=0, shard_tokens=4000)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 400 and index["eos_id"] == 0
    assert stats["shards"]["train"] > 1 and stats["docs"]["val"] > 0
    assert stats["docs"]["train"] + stats["docs"]["val"] == len(texts)
    decoded = []
    for split in ("train", "val"):
        sh = TokenShards(tmp_path, split)
        assert sh.n_tokens == stats["tokens"][split] and sh.vocab_size == 400 and sh.eos_id == 0
        for f in sh.files:
            arr = np.fromfile(f, dtype=np.uint16)
            assert arr[-1] == 0  # files end at document boundaries
            decoded += [tok.decode(d) for d in split_docs(arr, 0)]
    assert sorted(decoded) == sorted(texts)  # literal special-token strings stay text
    assert not list(tmp_path.glob("*.tmp"))


def test_write_shards_is_deterministic_and_worker_independent(prepared, tmp_path: Path) -> None:
    docs_path, tok, _ = prepared
    outs = []
    for name, workers in (("a", 1), ("b", 1), ("c", 3)):
        write_shards(docs_path, tok, tmp_path / name, 0.1, workers, seed=0, shard_tokens=4000, chunk_docs=16)
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert outs[0] == outs[1] == outs[2]
    write_shards(docs_path, tok, tmp_path / "d", 0.1, 1, seed=1, shard_tokens=4000)
    other = {p.name: p.read_bytes() for p in sorted((tmp_path / "d").iterdir())}
    assert other != outs[0]  # the seed salts the split


def test_rewrite_replaces_stale_shards(prepared, tmp_path: Path) -> None:
    docs_path, tok, _ = prepared
    write_shards(docs_path, tok, tmp_path, 0.1, 1, seed=0, shard_tokens=2000)
    many = len(list(tmp_path.glob("train_*.bin")))
    write_shards(docs_path, tok, tmp_path, 0.1, 1, seed=0)
    assert many > 1 and [p.name for p in tmp_path.glob("train_*.bin")] == ["train_000.bin"]


def test_val_split_never_empty_for_tiny_corpora(tmp_path: Path) -> None:
    texts = [prose(i) for i in range(3)]
    docs_path = tmp_path / "docs.jsonl.gz"
    with gzip.open(docs_path, "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tok = train_tokenizer(texts, vocab_size=300)
    stats = write_shards(docs_path, tok, tmp_path / "out", val_fraction=0.01, num_workers=1, seed=0)
    assert stats["docs"]["val"] >= 1 and stats["docs"]["train"] >= 1
    assert (
        TokenShards(tmp_path / "out", "val").n_tokens > 0
        and TokenShards(tmp_path / "out", "train").n_tokens > 0
    )


def test_token_shards_sampling(prepared, tmp_path: Path) -> None:
    docs_path, tok, _ = prepared
    write_shards(docs_path, tok, tmp_path, 0.1, 1, seed=0, shard_tokens=3000)
    sh = TokenShards(tmp_path, "train")
    a = sh.sample_windows(np.random.default_rng(5), 64, 33)
    b = sh.sample_windows(np.random.default_rng(5), 64, 33)
    assert a.shape == (64, 33) and a.dtype == np.int64 and np.array_equal(a, b)
    assert a.max() < sh.vocab_size
    # Every window is a contiguous slice of one shard file.
    files = [np.fromfile(f, dtype=np.uint16).astype(np.int64) for f in sh.files]
    for w in a[:16]:
        assert any(
            any(np.array_equal(arr[i : i + 33], w) for i in np.flatnonzero(arr == w[0])) for arr in files
        )
    wins = list(sh.iter_windows(50))
    assert len(wins) == sum(len(f) // 50 for f in files)
    assert np.array_equal(np.concatenate(wins[: len(files[0]) // 50]), files[0][: len(files[0]) // 50 * 50])
    assert len(list(sh.iter_windows(50, max_windows=3))) == 3
    with pytest.raises(ChatforgeError, match="no shard holds"):
        sh.sample_windows(np.random.default_rng(0), 1, 10**7)


def test_token_shards_errors(prepared, tmp_path: Path) -> None:
    with pytest.raises(ChatforgeError, match="chatforge tokenizer"):
        TokenShards(tmp_path, "train")
    docs_path, tok, _ = prepared
    write_shards(docs_path, tok, tmp_path, 0.1, 1, seed=0)
    with pytest.raises(ChatforgeError, match="no split 'test'"):
        TokenShards(tmp_path, "test")
    index = json.loads((tmp_path / "index.json").read_text())
    index["splits"]["val"] = []
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ChatforgeError, match="'val' split has no tokens"):
        TokenShards(tmp_path, "val")
    with open(tmp_path / "train_000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ChatforgeError, match=r"train_000\.bin: token shard 10 bytes"):
        TokenShards(tmp_path, "train")
    (tmp_path / "index.json").write_text("{oops")
    with pytest.raises(ChatforgeError, match="corrupt token index"):
        TokenShards(tmp_path, "train")


# ---------------------------------------------------------------- real data (optional)


def shared_data() -> Path:
    env = os.environ.get("CHATFORGE_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def test_tinyshakespeare_pipeline(tmp_path: Path) -> None:
    f = shared_data() / "tinyshakespeare" / "input.txt"
    if not f.is_file():
        pytest.skip(f"{f} not present")
    cfg = make_run(tmp_path, [SourceConfig(kind="text", path=str(f), split_on_blank_lines=True)])
    stats = prepare(cfg)
    assert stats["docs"] > 3000 and stats["dropped"].get("repetitive", 0) < 20
    docs_path = cfg.run_dir / "data" / "docs.jsonl.gz"
    tok = train_tokenizer((d.text for d in read_docs(docs_path)), vocab_size=1024)
    st = write_shards(docs_path, tok, cfg.run_dir / "data", 0.05, 2, seed=0)
    assert st["tokens"]["val"] > 5000 and 2.0 < st["bytes_per_token"] < 5.0


def test_prepare_output_does_not_depend_on_workers(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    texts = [prose(i % 40, 80) for i in range(120)]  # 80 exact duplicates among them
    texts += [prose(i, 80) + " Extra words here." for i in range(10)]  # near duplicates
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    outs = []
    for workers in (1, 2):
        cfg = RunConfig(
            name=f"w{workers}",
            runs_dir=str(tmp_path),
            data=DataConfig(sources=[SourceConfig(kind="jsonl", path=str(f))], num_workers=workers),
        )
        stats = prepare(cfg)
        outs.append([d.text for d in read_docs(cfg.run_dir / "data" / "docs.jsonl.gz")])
        assert stats["sources"][0]["dropped"] == {"exact_dup": 80, "near_dup": 10}
    assert outs[0] == outs[1] and len(outs[0]) == 40


def _write_docs(path: Path, texts: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return path


def _seed_where(texts: list[str], frac: float, all_val: bool) -> int:
    """A split seed under which no document (or, with ``all_val``, every document) hashes into val."""
    return next(s for s in range(10_000) if all(is_val(t, s, frac) is all_val for t in texts))


def test_tiny_corpus_val_split_is_nearest_to_val_fraction(tmp_path: Path) -> None:
    """13 documents, none hashed into val: the tail used to be taken up to and including the document
    that crosses val_fraction, so short documents at the end after a long one gave val 9 documents and
    several times its share. Now the cut is the document boundary nearest val_fraction of the tokens."""
    texts = [prose(i, 200) for i in range(4)] + [prose(4, 120)] + [prose(5 + i, 12) for i in range(8)]
    docs_path = _write_docs(tmp_path / "docs.jsonl.gz", texts)
    tok = train_tokenizer(texts, vocab_size=300)
    seed = _seed_where(texts, 0.1, all_val=False)
    stats = write_shards(docs_path, tok, tmp_path / "out", val_fraction=0.1, num_workers=1, seed=seed)
    lengths = [len(tok.encode(t)) + 1 for t in texts]  # each document and its EOS
    total = sum(lengths)
    best = min((abs(sum(lengths[k:]) - 0.1 * total), k) for k in range(1, len(texts)))[1]
    assert stats["tokens"]["val"] == sum(lengths[best:]) and stats["docs"]["val"] == len(texts) - best
    assert stats["docs"]["train"] == best and stats["val_from_tail"] and not stats["cut_document"]
    assert abs(stats["tokens"]["val"] / total - 0.1) < 0.03
    val = np.fromfile(tmp_path / "out" / "val_000.bin", dtype=np.uint16)
    assert [tok.decode(d) for d in split_docs(val, tok.eos_id)] == texts[best:]


def test_every_document_hashed_into_val_leaves_train_its_share(tmp_path: Path) -> None:
    """When every document hashed into val, train was empty and pretraining failed with "raise
    val_fraction" (the opposite of the fix). Now val keeps the tail nearest val_fraction and train the
    rest; a lone document is cut in two."""
    texts = [prose(i, 60) for i in range(3)]
    tok = train_tokenizer(texts, vocab_size=300)
    seed = _seed_where(texts, 0.5, all_val=True)
    docs_path = _write_docs(tmp_path / "docs.jsonl.gz", texts)
    stats = write_shards(docs_path, tok, tmp_path / "out", val_fraction=0.5, num_workers=1, seed=seed)
    assert stats["docs"]["train"] >= 1 and stats["docs"]["val"] >= 1 and sum(stats["docs"].values()) == 3
    train = np.fromfile(tmp_path / "out" / "train_000.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val_000.bin", dtype=np.uint16)
    decoded = [tok.decode(d) for d in split_docs(train, tok.eos_id) + split_docs(val, tok.eos_id)]
    assert decoded == texts  # order kept: train the head, val the tail
    assert TokenShards(tmp_path / "out", "train").n_tokens == stats["tokens"]["train"] > 0

    one = [prose(7, 80)]
    seed = _seed_where(one, 0.1, all_val=False)
    stats = write_shards(_write_docs(tmp_path / "one.jsonl.gz", one), tok, tmp_path / "one", 0.1, 1, seed)
    assert stats["cut_document"] and stats["docs"] == {"train": 1, "val": 1}
    n = len(tok.encode(one[0]))
    assert (
        stats["tokens"]["val"] == round(0.1 * (n + 1))
        and stats["tokens"]["train"] + stats["tokens"]["val"] == n + 2
    )  # the cut adds an EOS
    train = np.fromfile(tmp_path / "one" / "train_000.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "one" / "val_000.bin", dtype=np.uint16)
    assert train[-1] == val[-1] == tok.eos_id
    assert np.array_equal(np.concatenate([train[:-1], val[:-1]]), np.array(tok.encode(one[0])))


def test_empty_split_error_gives_the_right_advice(tmp_path: Path) -> None:
    for split, advice in (("train", "lower data.val_fraction"), ("val", "raise data.val_fraction")):
        (tmp_path / "index.json").write_text(
            json.dumps({"dtype": "uint16", "vocab_size": 300, "eos_id": 0, "splits": {split: []}})
        )
        with pytest.raises(ChatforgeError, match=f"the '{split}' split has no tokens; add data or {advice}"):
            TokenShards(tmp_path, split)


def test_a_streamed_hf_source_is_checked_up_front_and_reopened_for_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The up-front check left a streamed source's connection idle while the sources before it were
    processed; it is now closed after the check and read again from its start when its turn comes."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(3)))
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(ChatforgeError, match="no documents"):
        open_sources([SourceConfig(kind="hf", path=str(empty), streaming=True)])
    ((_, report, docs),) = open_sources([SourceConfig(kind="hf", path=str(f), streaming=True)])
    assert [d.text for d in docs] == [prose(i) for i in range(3)]  # each once: the check's read is not kept
    assert report.bad_records == 0 and report.files == 1  # the check's counts start over, not doubled
