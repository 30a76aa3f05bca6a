"""The data stage (gather → clean → filter → dedup → ``docs.jsonl.gz``) and token shards.

Bad input never stops the stage: unreadable files, records that are not JSON or lack the text field,
and mis-encoded bytes are skipped (or decoded with replacement), counted, and reported with a few
``file:line: reason`` examples. Only a path that does not exist, or a source that yields no document at
all, is a (one-line) ``ChatforgeError``.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import inspect
import io
import json
import multiprocessing as mp
import os
import re
import sys
import time
import unicodedata
import warnings
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from chatforge.data import textio
from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from chatforge.config import DataConfig, RunConfig, SourceConfig
    from chatforge.data.world import World
    from chatforge.tokenizer import Tokenizer

DOCS_FILE = "docs.jsonl.gz"
STATS_FILE = "prepare_stats.json"
INDEX_FILE = "index.json"
SHARD_TOKENS = 100_000_000  # start a new shard file after this many tokens
MAX_EXAMPLES = 5  # bad-record examples kept per source

# File name endings each reader picks up when given a directory (``.gz`` variants too).
_EXTENSIONS = {
    "text": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "parquet": (".parquet",),
    "hf": (".jsonl", ".json", ".ndjson", ".parquet", ".txt", ".csv", ".arrow"),
}
_HF_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
    ".arrow": "arrow",
}


@dataclass
class Doc:
    text: str
    source: str


@dataclass
class ReadReport:
    """What went wrong while reading one source: counts plus a few ``file:line: reason`` examples."""

    bad_records: int = 0
    invalid_utf8: int = 0  # records decoded with U+FFFD replacement (kept)
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    files: int = 0

    def bad(self, where: str, reason: str, n: int = 1) -> None:
        self.bad_records += n
        self.reasons[reason.split(" (")[0]] += n  # group "not JSON (detail)" under "not JSON"
        self._example(f"{where}: {reason}")

    def mis_encoded(self, where: str) -> None:
        self.invalid_utf8 += 1
        self._example(f"{where}: invalid UTF-8, decoded with replacement characters")

    def _example(self, line: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(line)


# ---------------------------------------------------------------- files


def _suffix(p: Path) -> str:
    """The meaningful extension, looking through ``.gz``: ``a.jsonl.gz`` → ``.jsonl``."""
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


def resolve_files(path: str, kind: str) -> list[Path]:
    """Files named by ``path`` (a file, a directory searched recursively, or a glob), sorted."""
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
        if not matches:
            raise ChatforgeError(f"{kind} source: no files match {path!r}")
    else:
        p = Path(expanded)
        if not p.exists():
            raise ChatforgeError(f"{kind} source: no such file or directory: {path}")
        matches = [p]
    exts = _EXTENSIONS[kind]
    files: list[Path] = []
    for m in matches:
        if m.is_dir():
            found = [
                f
                for f in m.rglob("*")
                # skip hidden files and folders (.git, editor backups) below the named directory
                if f.is_file()
                and _suffix(f) in exts
                and not any(x.startswith(".") for x in f.relative_to(m).parts)
            ]
            files.extend(sorted(found))
        elif m.is_file():
            files.append(m)  # an explicitly named file is read whatever its extension
    if not files:
        raise ChatforgeError(f"{kind} source: no {'/'.join(exts)} files in {path}")
    return files


def _open_bytes(file: Path) -> IO[bytes]:
    """Open for binary reading; gzip is detected by its magic bytes, not the name."""
    f = open(file, "rb")  # noqa: SIM115 - returned to the caller
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        return io.BufferedReader(gzip.GzipFile(fileobj=f, mode="rb"))  # type: ignore[arg-type]
    return f


def _decode(raw: bytes, where: str, report: ReadReport) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.mis_encoded(where)
        return raw.decode("utf-8", errors="replace")


def _decode_file(raw: bytes, file: Path, report: ReadReport) -> str:
    """A whole file's bytes as text (a byte-order mark says UTF-16/32, or UTF-8, and is dropped); the
    first mis-encoded line is counted."""
    text, bad_line = textio.decode_bytes(raw)
    if bad_line is not None:
        report.mis_encoded(f"{file}:{bad_line}")
    return text


def _lines(file: Path, report: ReadReport) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) pairs, streamed. Lines end at \\n, \\r\\n or \\r (old Mac files), each
    yielded ending in \\n; a byte-order mark says the encoding, as in the chat readers (``textio``), and
    is dropped; a mis-encoded UTF-8 line is decoded with replacement and counted. A read error mid-file
    (bad gzip, I/O) is one bad record."""
    try:
        with _open_bytes(file) as f:
            enc = textio.bom_encoding(f.read(4))
            f.seek(0)
            if enc not in ("utf-8", "utf-8-sig"):  # UTF-16/32 (rare, and small): decoded whole
                yield from enumerate(textio.split_lines(_decode_file(f.read(), file, report)), 1)
                return
            # latin-1 maps bytes to characters one to one, so universal newlines split the bytes (\r
            # and \n never occur inside a UTF-8 sequence) and each line is decoded, and reported, alone.
            with io.TextIOWrapper(f, encoding="latin-1", newline=None) as lines:
                for lineno, line in enumerate(lines, 1):
                    raw = line.encode("latin-1")
                    if lineno == 1 and enc == "utf-8-sig":
                        raw = raw[len(codecs.BOM_UTF8) :]
                    yield lineno, _decode(raw, f"{file}:{lineno}", report)
    except (OSError, EOFError, zlib.error) as e:
        report.bad(str(file), f"unreadable ({type(e).__name__}: {e})")


# ---------------------------------------------------------------- readers (each yields texts)


def _read_text(files: list[Path], src: SourceConfig, report: ReadReport) -> Iterator[str]:
    for file in files:
        report.files += 1
        unreadable = report.reasons["unreadable"]
        n = 0
        if src.split_on_blank_lines:
            block: list[str] = []
            for _, line in _lines(file, report):
                if line.strip():
                    block.append(line)
                elif block:
                    n += 1
                    yield "".join(block)
                    block = []
            if block:
                n += 1
                yield "".join(block)
        else:
            try:
                with _open_bytes(file) as f:
                    raw = f.read()
            except (OSError, EOFError, zlib.error) as e:
                report.bad(str(file), f"unreadable ({type(e).__name__}: {e})")
                continue
            text = _decode_file(raw, file, report)
            if text.strip():
                n += 1
                yield text
        if n == 0 and report.reasons["unreadable"] == unreadable:  # an unreadable file is reported once
            report.bad(str(file), "empty file")


def _record_text(rec: Any, text_field: str) -> tuple[str | None, str]:
    """The text of one record, or None and why not."""
    if not isinstance(rec, dict):
        return None, f"not a JSON object ({type(rec).__name__})"
    if text_field not in rec:  # list the fields: the usual fix is setting text_field
        return None, f"no {text_field!r} field (has: {', '.join(map(str, list(rec)[:8]))})"
    value = rec[text_field]
    if not isinstance(value, str):
        return None, f"{text_field!r} is not a string ({type(value).__name__})"
    return value, ""


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _json_array(text: str, first_line: int = 1) -> Iterator[tuple[Any, str]]:
    """(element, "") for each element of the JSON array ``text``, one by one, so that a syntax error
    costs only the elements from there on: it ends the walk with one (None, reason). ``first_line`` is
    the file line ``text`` starts on."""
    decoder = json.JSONDecoder()
    pos = _JSON_WS.match(text, text.index("[") + 1).end()  # type: ignore[union-attr]
    if text.startswith("]", pos):
        return
    while True:
        try:
            rec, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield None, f"not JSON ({e.msg} at line {first_line + e.lineno - 1}); rest of file skipped"
            return
        yield rec, ""
        pos = _JSON_WS.match(text, end).end()  # type: ignore[union-attr]
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            line = first_line + text.count("\n", 0, pos)
            yield None, f"not JSON (expected ',' or ']' at line {line}); rest of file skipped"
            return
        pos = _JSON_WS.match(text, pos + 1).end()  # type: ignore[union-attr]


def _read_rest(head: list[tuple[int, str]], lines: Iterator[tuple[int, str]]) -> str:
    """Move the rest of ``lines`` into ``head`` (kept for whichever way the file is read): its text."""
    head.extend(lines)
    return "".join(line for _, line in head)


def _read_jsonl(files: list[Path], src: SourceConfig, report: ReadReport) -> Iterator[str]:
    for file in files:
        report.files += 1
        unreadable = report.reasons["unreadable"]
        n_records = 0
        lines = _lines(file, report)
        first = next(lines, None)
        while first is not None and not first[1].strip():  # skip leading blank lines
            first = next(lines, None)
        if first is None:
            if report.reasons["unreadable"] == unreadable:  # an unreadable file is reported once
                report.bad(str(file), "empty file")
            continue
        head = [first]
        if first[1].lstrip().startswith("["):  # an array file, or JSON Lines whose first record is one
            for item in lines:  # up to the next non-blank line: does more follow the first?
                head.append(item)
                if item[1].strip():
                    break
        more = len(head) > 1 and bool(head[-1][1].strip())
        if textio.json_array_file(file.name, first[1], more, partial(_read_rest, head, lines)):
            text = _read_rest(head, lines)
            for i, (rec, bad) in enumerate(_json_array(text, first[0])):
                n_records += 1
                text, why = (None, bad) if bad else _record_text(rec, src.text_field)
                if text is None:
                    report.bad(f"{file}:[{i}]", why)
                else:
                    yield text
        else:
            for lineno, line in chain(head, lines):
                if not line.strip():
                    continue
                n_records += 1
                where = f"{file}:{lineno}"
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    report.bad(where, f"not JSON ({getattr(e, 'msg', e)})")
                    continue
                text, why = _record_text(rec, src.text_field)
                if text is None:
                    report.bad(where, why)
                else:
                    yield text
        if n_records == 0 and report.reasons["unreadable"] == unreadable:
            report.bad(str(file), "no records")


def _read_parquet(files: list[Path], src: SourceConfig, report: ReadReport) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files:
        report.files += 1
        try:
            with open(file, "rb") as f:
                gz = f.read(2) == b"\x1f\x8b"
            source: Any = file
            if gz:  # parquet needs random access: decompress into memory
                with gzip.open(file, "rb") as f:
                    source = io.BytesIO(f.read())
            pf = pq.ParquetFile(source)
            names = pf.schema_arrow.names
            n_rows = pf.metadata.num_rows
            if src.text_field not in names:
                report.bad(
                    str(file), f"no column {src.text_field!r} (columns: {', '.join(names)})", n_rows or 1
                )
                continue
            ftype = pf.schema_arrow.field(src.text_field).type
            if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
                report.bad(str(file), f"column {src.text_field!r} is {ftype}, not a string", n_rows or 1)
                continue
            if n_rows == 0:
                report.bad(str(file), "no rows")
                continue
            row = 0
            for batch in pf.iter_batches(columns=[src.text_field], batch_size=4096):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        report.bad(f"{file}:row {row}", "null text")
                    else:
                        yield value
                    row += 1
        except (OSError, pa.ArrowException, EOFError, zlib.error) as e:
            report.bad(str(file), f"unreadable ({type(e).__name__}: {str(e).splitlines()[0]})")


def _local_files(path: str) -> bool:
    expanded = os.path.expanduser(path)
    return Path(expanded).exists() or (glob.has_magic(expanded) and bool(glob.glob(expanded)))


def _load_hf(src: SourceConfig) -> Any:
    """Open a Hugging Face dataset: local data files (builder picked by extension), a
    ``save_to_disk`` directory, or a hub name."""
    try:
        import datasets
    except ImportError:
        raise ChatforgeError("hf source: the `datasets` package is not installed") from None
    split = src.split or "train"
    try:
        p = Path(os.path.expanduser(src.path))
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        if _local_files(src.path):
            files = resolve_files(src.path, "hf")
            builders = {_HF_BUILDERS.get(_suffix(f), "") for f in files}
            if len(builders) != 1 or "" in builders:
                raise ChatforgeError(
                    f"hf source {src.path}: need files of one known format "
                    f"({', '.join(sorted(_HF_BUILDERS))}), got {', '.join(sorted({f.name for f in files}))}"
                )
            builder = builders.pop()
            extra: dict[str, Any] = {}
            if builder == "text":  # match our text reader: a file or a paragraph is a document
                extra["sample_by"] = "paragraph" if src.split_on_blank_lines else "document"
            return datasets.load_dataset(
                builder,
                data_files={split: [str(f) for f in files]},
                split=split,
                streaming=src.streaming,
                **extra,
            )
        return datasets.load_dataset(src.path, name=src.name or None, split=split, streaming=src.streaming)
    except ChatforgeError:
        raise
    except Exception as e:  # datasets raises many types (hub, network, builder); keep one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ChatforgeError(f"hf source {src.path!r}: could not load ({type(e).__name__}: {msg})") from None


def _read_hf(ds: Any, src: SourceConfig, report: ReadReport) -> Iterator[str]:
    report.files += 1
    rows = iter(ds)
    i = -1
    while True:
        i += 1
        try:
            rec = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a streamed set reads as it goes: a bad file or a dropped connection
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            report.bad(f"{src.path}:row {i}", f"unreadable ({type(e).__name__}: {msg}); rest skipped")
            return
        text, why = _record_text(rec, src.text_field)
        if text is None:
            report.bad(f"{src.path}:row {i}", why.replace("JSON object", "record"))
        else:
            yield text


def source_world(src: SourceConfig) -> World:
    """The world a ``world`` source describes (its seed and size): the one place that reads them."""
    try:  # imported here: the generator is only needed for a `world` source
        from chatforge.data.world import build_world
    except ImportError as e:
        raise ChatforgeError(f"world source: the built-in generator is unavailable ({e})") from None
    return build_world(src.seed, src.people, src.places)


def _read_world(src: SourceConfig, report: ReadReport) -> Iterator[str]:
    from chatforge.data.world import pretrain_documents

    world = source_world(src)
    report.files += 1
    yield from pretrain_documents(world, src.n_docs, src.seed, src.zipf, src.records)


def source_label(src: SourceConfig) -> str:
    return f"world:seed={src.seed}" if src.kind == "world" else f"{src.kind}:{src.path}"


def read_source(src: SourceConfig, report: ReadReport | None = None) -> Iterator[Doc]:
    """Documents of one source. A missing path raises at once; bad records go to ``report``."""
    report = report if report is not None else ReadReport()
    label = source_label(src)
    texts: Iterator[str]
    if src.kind == "world":
        texts = _read_world(src, report)
    elif src.kind == "hf":
        texts = _read_hf(_load_hf(src), src, report)
    elif src.kind in ("text", "jsonl", "parquet"):
        files = resolve_files(src.path, src.kind)  # eager: a bad path fails before any work
        reader = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}[src.kind]
        texts = reader(files, src, report)
    else:
        raise ChatforgeError(f"unknown source kind {src.kind!r}")
    return _limit(texts, src, label, report)


def open_sources(sources: Iterable[SourceConfig]) -> list[tuple[SourceConfig, ReadReport, Iterator[Doc]]]:
    """Open every source and read it up to its first document, so that a wrong path, an empty file or
    a source of only bad records fails at once, not after minutes of work on the sources before it.
    Usually only the first record is read; the document read is put back in front of the rest."""
    opened = []
    for src in sources:
        report = ReadReport()
        if src.kind == "hf" and src.streaming:
            # A stream left idle while the sources before it are processed can be dropped by the server
            # (the rest of it would then count as one unreadable record): checked now with a throwaway
            # report, read from its start when its turn comes.
            probe = read_source(src, ReadReport())
            next(probe)  # a source with no document raises its one-line ChatforgeError here
            probe.close()
            opened.append((src, report, _when_its_turn_comes(src, report)))
            continue
        docs = read_source(src, report)
        first = next(docs)
        opened.append((src, report, chain([first], docs)))
    return opened


def _when_its_turn_comes(src: SourceConfig, report: ReadReport) -> Iterator[Doc]:
    yield from read_source(src, report)


def _limit(texts: Iterator[str], src: SourceConfig, label: str, report: ReadReport) -> Iterator[Doc]:
    n = 0
    for text in texts:
        yield Doc(text, label)
        n += 1
        if src.max_docs and n >= src.max_docs:
            return
    if n == 0:
        first = f"; first: {report.examples[0]}" if report.examples else ""
        raise ChatforgeError(
            f"{label}: no documents ({report.bad_records} bad records, {report.files} files){first}"
        )


def read_docs(path: Path) -> Iterator[Doc]:
    """The documents of a ``docs.jsonl.gz`` written by :func:`prepare`."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                    yield Doc(rec["text"], rec.get("source", ""))
                except (ValueError, KeyError, TypeError):
                    raise ChatforgeError(
                        f"{path}:{lineno}: corrupt document line; run `chatforge data` again"
                    ) from None
    except (OSError, EOFError, zlib.error) as e:
        raise ChatforgeError(f"{path}: unreadable ({e}); run `chatforge data` again") from None


# ---------------------------------------------------------------- cleaning and quality

# Control characters (C0, DEL, C1) except \n and \t, and byte-order marks; \r and the other line breaks
# are turned into \n first.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ufeff]")
_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x0b\x0c\x1c-\x1e\x85]")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # more than two blank lines
_NON_LETTERS = re.compile(r"[\W\d_]+")
_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_SYMBOLS_ONLY = re.compile(r"[\W_]*")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# A bytes.translate table deleting all but ASCII letters (UTF-8 lead/continuation bytes included).
_BYTES_BUT_ASCII_LETTERS = bytes(c for c in range(256) if not (c < 128 and chr(c).isalpha()))


def _letters_and_non_space(text: str) -> tuple[int, int]:
    """How many letters and how many non-whitespace characters ``text`` has.

    Fast path: bytes.translate for ASCII letters and str.count for ASCII spaces (C speed), the
    regexes only for the (usually few) non-ASCII characters. About 10x faster than regexes on it all.
    """
    letters = len(text.encode("utf-8").translate(None, _BYTES_BUT_ASCII_LETTERS))
    spaces = sum(text.count(c) for c in " \n\t\r\x0b\x0c\x1c\x1d\x1e\x1f")
    if not text.isascii():
        other = "".join(_NON_ASCII.findall(text))
        letters += len(_NON_LETTERS.sub("", other))
        spaces += len(other) - len(_WHITESPACE.sub("", other))
    return letters, len(text) - spaces


def clean_text(text: str) -> str:
    """NFC; drop control characters but \\n and \\t; unify newlines; strip trailing spaces; at most
    two blank lines in a row; no blank lines at the start or whitespace at the end."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. from JSON "\\ud800") can't be stored or tokenised
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", _NEWLINES.sub("\n", text))
    text = _TRAILING_WS.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text)
    return text.lstrip("\n").rstrip()


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, preferring paragraph, then line, then word
    boundaries (so no data is lost, unlike truncation)."""
    pieces = []
    start, n = 0, len(text)
    while n - start > max_chars:  # indices, not slicing the rest: linear time even for huge texts
        end = start + max_chars
        half = start + max_chars // 2  # only cut where the piece stays reasonably large
        cut = end
        for sep in ("\n\n", "\n", " "):
            i = text.rfind(sep, start, end)
            if i > half:
                cut = i
                break
        piece = text[start:cut].rstrip()
        if piece:
            pieces.append(piece)
        start = cut
        while start < n and text[start].isspace():
            start += 1
    if start < n:
        pieces.append(text[start:])
    return pieces


def quality_reason(text: str, cfg: DataConfig) -> str | None:
    """Why a cleaned document should be dropped (``too_short``, ``non_text``, ``repetitive``), or None."""
    if len(text) < cfg.min_chars:
        return "too_short"
    letters, non_space = _letters_and_non_space(text)
    if letters < cfg.min_alpha_frac * non_space:
        return "non_text"
    # Lines of only symbols ("}", "```", "$$", "-----") repeat legitimately in code and markdown.
    lines = [s for s in (line.strip() for line in text.split("\n")) if s and not _SYMBOLS_ONLY.fullmatch(s)]
    if len(lines) >= 4:  # too few lines say nothing about repetition
        dup = len(lines) - len(set(lines))
        if dup > cfg.max_dup_line_frac * len(lines):
            return "repetitive"
    words = text.split()
    if len(words) >= 50:  # Gopher applies it from 50 words: short texts repeat a name or phrase naturally
        grams = Counter(zip(words, words[1:], words[2:]))
        (gram, count) = grams.most_common(1)[0]
        # Share of word characters covered by the most frequent 3-gram (Gopher's rule).
        if count >= 2:
            total = sum(map(len, words))
            if count * sum(map(len, gram)) > cfg.max_top_ngram_frac * total:
                return "repetitive"
    return None


# ---------------------------------------------------------------- dedup


def _normalise_words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


# Odd 64-bit multipliers, one per position in a shingle: an order-sensitive combination of word hashes.
_SHINGLE_MULT = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD],
    dtype=np.uint64,
)


def shingle_hashes(words: list[str], n: int = 5) -> np.ndarray:
    """32-bit hashes of the word ``n``-grams of ``words`` (one shingle if there are fewer words).

    Each word is hashed once (crc32: fast, and unlike ``hash()`` the same in every process), then the
    n-grams are combined with numpy; about 5x faster than hashing every joined n-gram string.
    """
    wh = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
    n = min(n, len(wh))
    m = len(wh) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h += wh[k : k + m] * _SHINGLE_MULT[k % len(_SHINGLE_MULT)]  # wraps mod 2**64, as intended
    return (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """LSH bands and rows per band that make a pair at Jaccard ``threshold`` a candidate with probability
    at least ``recall``, with as many rows per band (as few chance candidates) as allow that.

    Every candidate is confirmed with its estimated Jaccard, so a false candidate costs one comparison,
    while a missed one is a duplicate kept. datasketch's own choice (equal weight to both errors) gave,
    with 64 permutations at 0.8, 5 bands of 11 rows: pairs at Jaccard 0.9 became candidates only 85% of
    the time, at 0.8 only 36%.
    """
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


class Deduper:
    """Exact (hash of casefolded word sequence) and near-duplicate (MinHash LSH on word 5-grams) filter.

    The first document of a group is kept; later exact copies are ``exact_dup`` and later documents
    whose estimated Jaccard similarity to a kept one reaches ``near_dup_threshold`` are ``near_dup``.
    """

    def __init__(self, near_dup_threshold: float = 0.8, num_perm: int = 64, ngram: int = 5, seed: int = 1):
        self.threshold = near_dup_threshold
        self.num_perm = num_perm
        self.ngram = ngram
        self._exact: set[bytes] = set()
        self.near = near_dup_threshold < 1.0
        if self.near:
            from datasketch import MinHash, MinHashLSH

            self._MinHash = MinHash
            self._lsh = MinHashLSH(num_perm=num_perm, params=lsh_bands(near_dup_threshold, num_perm))
            # datasketch >= 2 wants the hashing scheme named when permutations are passed in.
            self._kw: dict[str, Any] = {"hashfunc": int}  # the inputs are already hashes
            if "scheme" in inspect.signature(MinHash).parameters:
                self._kw["scheme"] = "affine32"
            proto = MinHash(num_perm=num_perm, seed=seed, **self._kw)
            self._kw["permutations"] = proto.permutations  # computed once, not per document
            self._sigs: list[np.ndarray] = []

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Deduper:
        return cls(near_dup_threshold=cfg.near_dup_threshold, num_perm=cfg.minhash_perm)

    def fingerprint(self, text: str) -> tuple[bytes, np.ndarray | None]:
        """The exact-match key and MinHash signature of ``text``; pure, so workers can compute it."""
        words = _normalise_words(text)
        norm = " ".join(words) if words else " ".join(text.split())
        key = hashlib.blake2b(norm.encode(), digest_size=16).digest()
        if not self.near or not words:
            return key, None
        m = self._MinHash(num_perm=self.num_perm, **self._kw)
        m.update_batch(shingle_hashes(words, self.ngram).tolist())
        return key, np.asarray(m.hashvalues)

    def add_fingerprint(self, key: bytes, sig: np.ndarray | None) -> str:
        """Register a fingerprint; return ``unique``, ``exact_dup`` or ``near_dup``."""
        if key in self._exact:
            return "exact_dup"
        self._exact.add(key)
        if sig is None:
            return "unique"
        m = self._MinHash(num_perm=self.num_perm, hashvalues=sig, **self._kw)
        # LSH gives candidates; confirm each with the estimated Jaccard to avoid banding false hits.
        for cand in self._lsh.query(m):
            if float(np.mean(self._sigs[cand] == sig)) >= self.threshold:
                return "near_dup"
        self._lsh.insert(len(self._sigs), m, check_duplication=False)
        self._sigs.append(sig)
        return "unique"

    def add(self, text: str) -> str:
        """Register ``text``; return ``unique``, ``exact_dup`` or ``near_dup``."""
        return self.add_fingerprint(*self.fingerprint(text))


# ---------------------------------------------------------------- worker pool


_W: dict[str, Any] = {}  # per-process worker state, set by the pool initializers


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container/taskset limits
    except AttributeError:
        return os.cpu_count() or 1


class _Pool:
    """An in-order map over worker processes with a bounded number of tasks in flight, or in-process
    for one worker. ``initializer(*initargs, in_pool)`` sets up each worker's ``_W`` state.

    Results come back in submission order, so output never depends on the number of workers; the
    window (unlike Pool.imap, which reads its whole input ahead) keeps memory flat on big corpora.
    Workers are forked on Linux: spawn/forkserver re-import the caller's ``__main__``, which breaks
    scripts and notebooks without a ``__main__`` guard. Forking is safe because workers run only
    numpy/tokenizers code; TOKENIZERS_PARALLELISM=false around the fork turns off the tokenizers thread
    pool in the children (one process per core already) without its fork warning.
    """

    def __init__(self, workers: int, initializer: Any, initargs: tuple) -> None:
        self.workers = max(1, workers)
        self._pool: Any = None
        if self.workers == 1:
            initializer(*initargs, False)
            return
        method = "fork" if sys.platform == "linux" else "spawn"
        old = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            with warnings.catch_warnings():  # Python >= 3.12 warns about fork with live threads
                warnings.filterwarnings(
                    "ignore", message=".*multi-threaded.*fork", category=DeprecationWarning
                )
                self._pool = mp.get_context(method).Pool(self.workers, initializer, (*initargs, True))
        finally:  # the workers have started; the parent keeps its own setting
            if old is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old

    def imap(self, fn: Any, items: Iterable) -> Iterator:
        if self._pool is None:
            yield from map(fn, items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self._pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._pool is None:
            _W.clear()  # in-process: drop the tokenizer/deduper state set up for this run
        else:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()


# ---------------------------------------------------------------- the `chatforge data` stage


def _init_prepare_worker(cfg: DataConfig, in_pool: bool) -> None:
    _W.update(data_cfg=cfg, dedup=Deduper.from_config(cfg))


Piece = tuple[str, "str | None", "bytes | None", "np.ndarray | None"]  # text, drop reason, dedup key, sig


def _prepare_chunk(task: tuple[list[str], bool]) -> list[list[Piece]]:
    """Clean, cut, filter and fingerprint a chunk of documents (everything but the dedup decision)."""
    texts, trusted = task
    cfg: DataConfig = _W["data_cfg"]
    dedup: Deduper = _W["dedup"]
    out = []
    for raw in texts:
        text = clean_text(raw)
        pieces: list[Piece] = []
        for piece in split_long(text, cfg.max_chars) if len(text) > cfg.max_chars else [text]:
            reason = None if trusted else quality_reason(piece, cfg)
            if reason is None:
                pieces.append((piece, None, *dedup.fingerprint(piece)))
            else:
                pieces.append(("", reason, None, None))  # no need to ship dropped text back
        out.append(pieces)
    return out


def _text_chunks(docs: Iterable[Doc], max_docs: int = 256, max_chars: int = 1 << 20) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc.text)
        chars += len(doc.text)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def prepare(cfg: RunConfig) -> dict:
    """Read all sources, clean, filter and dedup them, and write ``docs.jsonl.gz`` + stats.

    Cleaning, filtering and MinHash signatures run in ``data.num_workers`` processes; the dedup
    decisions run in order in this process, so the output does not depend on the number of workers.
    """
    dcfg = cfg.data
    out_dir = cfg.run_dir / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dedup = Deduper.from_config(dcfg)
    opened = open_sources(dcfg.sources)
    per_source = []
    n_docs = n_chars = 0
    tmp = out_dir / (DOCS_FILE + ".tmp")
    workers = dcfg.num_workers if dcfg.num_workers > 0 else _cpu_count()
    try:
        with (
            gzip.open(tmp, "wt", encoding="utf-8", compresslevel=3) as out,
            _Pool(workers, _init_prepare_worker, (dcfg,)) as pool,
        ):
            for src, report, docs in opened:
                label = source_label(src)
                st: dict[str, Any] = {"source": label, "read": 0, "kept": 0, "chars": 0}
                dropped: Counter = Counter()
                n_split = n_pieces = 0
                total = min(src.n_docs, src.max_docs or src.n_docs) if src.kind == "world" else None
                # The built-in world is generated clean; the heuristics would only drop its arithmetic
                # and counting documents (few letters) and short bios that repeat a name.
                trusted = src.kind == "world"
                bar = tqdm(desc=f"data {label}", unit="doc", total=total, disable=None)
                tasks = ((chunk, trusted) for chunk in _text_chunks(docs))
                for results in pool.imap(_prepare_chunk, tasks):
                    for pieces in results:
                        st["read"] += 1
                        if len(pieces) > 1:
                            n_split += 1
                            n_pieces += len(pieces) - 1
                        for text, reason, key, sig in pieces:
                            if reason is None:
                                verdict = dedup.add_fingerprint(key, sig)  # type: ignore[arg-type]
                                reason = None if verdict == "unique" else verdict
                            if reason is not None:
                                dropped[reason] += 1
                                continue
                            out.write(json.dumps({"text": text, "source": label}, ensure_ascii=False))
                            out.write("\n")
                            st["kept"] += 1
                            st["chars"] += len(text)
                    bar.update(len(results))
                bar.close()
                # Bad records count as read (and dropped) so that read + extra_pieces = kept + dropped.
                st["read"] += report.bad_records
                if report.bad_records:
                    dropped["bad_record"] = report.bad_records
                st["dropped"] = dict(sorted(dropped.items()))
                st["split_long_docs"] = n_split
                st["extra_pieces"] = n_pieces
                st["invalid_utf8"] = report.invalid_utf8
                st["files"] = report.files
                if report.reasons:
                    st["bad_record_reasons"] = dict(report.reasons.most_common())
                if report.examples:
                    st["examples"] = report.examples
                per_source.append(st)
                n_docs += st["kept"]
                n_chars += st["chars"]
        if n_docs == 0:
            raise ChatforgeError("data: no documents left after filtering and dedup; see the data.* filters")
        os.replace(tmp, out_dir / DOCS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    dropped_total: Counter = Counter()
    for st in per_source:
        dropped_total.update(st["dropped"])
    stats = {
        "docs": n_docs,
        "chars": n_chars,
        "read": sum(st["read"] for st in per_source),
        "dropped": dict(sorted(dropped_total.items())),
        "workers": workers,
        "seconds": round(time.perf_counter() - t0, 3),
        "docs_path": str(out_dir / DOCS_FILE),
        "sources": per_source,
    }
    (out_dir / STATS_FILE).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


# ---------------------------------------------------------------- tokenization into shards


def shard_dtype(vocab_size: int) -> np.dtype:
    # ids run 0..vocab_size-1, so uint16 holds vocabularies up to 65536 entries.
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_val(text: str, seed: int, val_fraction: float) -> bool:
    """Stable train/val assignment: a salted hash of the text (independent of order and workers)."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()[:64]).digest()
    return int.from_bytes(h, "little") < val_fraction * 2.0**64


def _init_shard_worker(
    tok_json: str, seed: int, val_fraction: float, dtype: str, eos_id: int, in_pool: bool
) -> None:
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(tok_json)
    # Special-token strings inside documents are plain text here, so data can't inject control tokens.
    tok.encode_special_tokens = True
    _W.update(tok=tok, seed=seed, val_fraction=val_fraction, dtype=np.dtype(dtype), eos=eos_id)


def _tokenize_chunk(texts: list[str]) -> dict[str, Any]:
    """Tokenise a chunk of docs into flat train and val arrays (each doc followed by EOS)."""
    encs = _W["tok"].encode_batch_fast(texts, add_special_tokens=False)
    out: dict[str, Any] = {}
    flags = [is_val(t, _W["seed"], _W["val_fraction"]) for t in texts]
    for split, want in (("train", False), ("val", True)):
        ids: list[int] = []
        n_bytes = n_docs = 0
        for text, enc, flag in zip(texts, encs, flags):
            if flag is want:
                ids.extend(enc.ids)
                ids.append(_W["eos"])
                n_bytes += len(text.encode("utf-8"))
                n_docs += 1
        out[split] = (np.array(ids, dtype=_W["dtype"]), n_bytes, n_docs)
    return out


def _chunks(docs: Iterable[Doc], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while chunk := [d.text for d in islice(it, size)]:
        yield chunk


class _ShardWriter:
    """Appends token arrays to ``{split}_NNN.bin.tmp`` files, starting a new file every ~shard_tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._f: IO[bytes] | None = None

    def write(self, arr: np.ndarray) -> None:
        if not len(arr):
            return
        if self._f is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            name = f"{self.split}_{len(self.shards):03d}.bin"
            self._f = open(self.out_dir / (name + ".tmp"), "wb")  # noqa: SIM115 - closed in close()
            self.shards.append({"file": name, "tokens": 0})
        self._f.write(arr.tobytes())
        self.shards[-1]["tokens"] += len(arr)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _rebalance(writers: dict[str, _ShardWriter], dtype: np.dtype, eos: int, frac: float) -> tuple[int, bool]:
    """When the hash left one split empty (a tiny corpus, or every document hashed into val), cut the
    other split's last shard at the document boundary that puts val nearest ``frac`` of all tokens,
    keeping a document on each side. A single document is cut at a token (an EOS is added at the cut
    so that every file still ends a document). Returns (documents moved, whether a document was cut)."""
    full, empty = ("train", "val") if writers["train"].shards else ("val", "train")
    src = writers[full]
    if not src.shards or writers[empty].shards:
        return 0, False
    last = src.shards[-1]
    path = src.out_dir / (last["file"] + ".tmp")
    arr = np.fromfile(path, dtype=dtype)
    total = sum(s["tokens"] for s in src.shards)
    before = total - len(arr)  # tokens in earlier shards of the full split: they stay there
    want = frac * total
    ends = np.flatnonzero(arr == eos)  # each document ends with EOS

    def val_tokens(cut: int) -> int:  # val's size if arr[:cut] goes to train and arr[cut:] to val
        return len(arr) - cut + (before if full == "val" else 0)

    split_doc = len(ends) < 2
    if split_doc:
        if len(arr) < 3:  # one token and its EOS: nothing to cut
            return 0, False
        cut = int(np.clip(round(len(arr) - want), 1, len(arr) - 2))
        head = np.append(arr[:cut], np.array([eos], dtype=dtype))
    else:
        starts = ends[:-1] + 1  # the start of every document but the first
        cut = int(starts[np.argmin(np.abs([val_tokens(int(c)) - want for c in starts]))])
        head = arr[:cut]
    tail = arr[cut:]
    # The full split keeps its part in its last shard; the other part goes to the empty split.
    keep, move, other = (head, tail, "val") if full == "train" else (tail, head, "train")
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(keep.tobytes())
    last["tokens"] = len(keep)
    writers[other].write(move)
    return int(np.count_nonzero(move == eos)) - split_doc, split_doc


def write_shards(
    docs_path: Path,
    tokenizer: Tokenizer,
    out_dir: Path,
    val_fraction: float,
    num_workers: int,
    seed: int,
    shard_tokens: int = SHARD_TOKENS,
    chunk_docs: int = 256,
) -> dict:
    """Tokenise ``docs_path`` into ``{train,val}_NNN.bin`` + ``index.json`` in ``out_dir``.

    Output is identical for any ``num_workers`` (chunks are processed in order), and files are
    renamed into place only when complete, with ``index.json`` written last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dtype = shard_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    workers = num_workers if num_workers > 0 else _cpu_count()
    chunks = _chunks(read_docs(Path(docs_path)), chunk_docs)
    head = list(islice(chunks, workers))  # peek: no point starting more workers than chunks
    workers = max(1, min(workers, len(head)))
    all_chunks = chain(head, chunks)
    init_args = (tokenizer.to_str(), seed, val_fraction, dtype.str, eos)
    writers = {s: _ShardWriter(out_dir, s, shard_tokens) for s in ("train", "val")}
    n_bytes = {"train": 0, "val": 0}
    n_docs = {"train": 0, "val": 0}

    def consume(result: dict[str, Any]) -> None:
        for split, (arr, b, d) in result.items():
            writers[split].write(arr)
            n_bytes[split] += b
            n_docs[split] += d
            bar.update(d)

    bar = tqdm(desc="tokenize", unit="doc", disable=None)
    try:
        with _Pool(workers, _init_shard_worker, init_args) as pool:
            for result in pool.imap(_tokenize_chunk, all_chunks):
                consume(result)
        for w in writers.values():
            w.close()
        if not sum(n_docs.values()):
            raise ChatforgeError(f"{docs_path}: no documents to tokenize; run `chatforge data` again")
        moved, cut_doc = 0, False
        if val_fraction > 0 and 0 in (n_docs["train"], n_docs["val"]):
            full = "train" if n_docs["train"] else "val"
            moved, cut_doc = _rebalance(writers, dtype, eos, val_fraction)
            for w in writers.values():
                w.close()
            other = "val" if full == "train" else "train"
            n_docs[full] -= moved
            n_docs[other] += moved + cut_doc  # a cut document counts on both sides
        _commit(out_dir, writers, tokenizer.vocab_size, dtype, eos)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
            for s in w.shards:
                (out_dir / (s["file"] + ".tmp")).unlink(missing_ok=True)
    tokens = {s: sum(x["tokens"] for x in w.shards) for s, w in writers.items()}
    text_tokens = sum(tokens.values()) - sum(n_docs.values())  # not counting the EOS separators
    return {
        "dtype": dtype.name,
        "tokens": tokens,
        "docs": n_docs,
        "shards": {s: len(w.shards) for s, w in writers.items()},
        "bytes_per_token": round(sum(n_bytes.values()) / max(1, text_tokens), 4),
        "val_from_tail": moved > 0 or cut_doc,  # the hash left a split empty: cut by position
        "cut_document": cut_doc,
        "workers": workers,
        "tokenize_seconds": round(time.perf_counter() - t0, 3),
    }


def _commit(
    out_dir: Path, writers: dict[str, _ShardWriter], vocab_size: int, dtype: np.dtype, eos: int
) -> None:
    """Swap the new shards in: drop the old index, replace the files, then write the new index."""
    (out_dir / INDEX_FILE).unlink(missing_ok=True)  # readers fail clearly rather than mix old and new
    new = {s["file"] for w in writers.values() for s in w.shards}
    for old in out_dir.glob("*.bin"):
        if re.fullmatch(r"(train|val)_\d{3,}\.bin", old.name) and old.name not in new:
            old.unlink()
    for w in writers.values():
        for s in w.shards:
            os.replace(out_dir / (s["file"] + ".tmp"), out_dir / s["file"])
    index = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos,
        "splits": {split: w.shards for split, w in writers.items()},
    }
    tmp = out_dir / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out_dir / INDEX_FILE)


# ---------------------------------------------------------------- reading shards


class TokenShards:
    """One split of the token shards, memory-mapped, for the training loop."""

    def __init__(self, data_dir: Path, split: str) -> None:
        data_dir = Path(data_dir)
        index_path = data_dir / INDEX_FILE
        if not index_path.is_file():
            raise ChatforgeError(
                f"no token shards in {data_dir} ({INDEX_FILE} missing): run `chatforge tokenizer`"
            )
        try:
            index = json.loads(index_path.read_text())
            self.dtype = np.dtype(index["dtype"])
            self.vocab_size = int(index["vocab_size"])
            self.eos_id = int(index["eos_id"])
            splits = index["splits"]
            if split not in splits:
                raise ChatforgeError(f"{index_path}: no split {split!r} (have: {', '.join(splits)})")
            entries = [(str(e["file"]), int(e["tokens"])) for e in splits[split]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ChatforgeError(
                f"{index_path}: corrupt token index ({type(e).__name__}: {e}); run `chatforge tokenizer` again"
            ) from None
        self.split = split
        self.files: list[Path] = []
        self._maps: list[np.ndarray] = []
        for name, n in entries:
            path = data_dir / name
            size = path.stat().st_size if path.is_file() else -1
            if size != n * self.dtype.itemsize:
                what = "missing" if size < 0 else f"{size} bytes, expected {n * self.dtype.itemsize}"
                raise ChatforgeError(f"{path}: token shard {what}; run `chatforge tokenizer` again")
            if n:
                self.files.append(path)
                self._maps.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.lengths = np.array([len(m) for m in self._maps], dtype=np.int64)
        self.n_tokens = int(self.lengths.sum())
        if self.n_tokens == 0:  # val_fraction moves tokens from train to val: the advice differs
            fix = "lower data.val_fraction" if split == "train" else "raise data.val_fraction"
            raise ChatforgeError(f"{data_dir}: the {split!r} split has no tokens; add data or {fix}")

    def __len__(self) -> int:
        return self.n_tokens

    def sample_windows(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """``n`` random windows of ``length`` tokens as int64 ``[n, length]``; uniform over all start
        positions, never crossing a file; deterministic given the state of ``rng``."""
        starts = np.maximum(self.lengths - length + 1, 0)
        if starts.sum() == 0:
            raise ChatforgeError(
                f"{self.split} split: no shard holds {length} tokens (largest {int(self.lengths.max())})"
            )
        which = rng.choice(len(self._maps), size=n, p=starts / starts.sum())
        offsets = rng.integers(0, starts[which])
        out = np.empty((n, length), dtype=np.int64)
        for i, (f, o) in enumerate(zip(which, offsets)):
            out[i] = self._maps[f][o : o + length]
        return out

    def iter_windows(self, length: int, max_windows: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive non-overlapping ``[length]`` int64 windows, file by file (for validation)."""
        count = 0
        for m in self._maps:
            for start in range(0, len(m) - length + 1, length):
                if max_windows is not None and count >= max_windows:
                    return
                yield np.asarray(m[start : start + length], dtype=np.int64)
                count += 1
