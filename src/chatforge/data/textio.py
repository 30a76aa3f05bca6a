"""Decoding shared by the corpus and chat readers: byte-order marks (UTF-8, UTF-16, UTF-32) and the three
line endings (``\\n``, ``\\r\\n``, and ``\\r`` from old Mac files)."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator

# Lines end at \n, \r\n or \r only: str.splitlines would also cut at U+2028, U+0085, \x0c..., which JSON
# (and our own writers) leave unescaped inside strings.
LINE_BREAK = re.compile(r"\r\n|\r|\n")

# Longest first: a UTF-32-LE mark starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def bom_encoding(head: bytes) -> str:
    """The codec for a file whose first bytes are ``head`` (at least 4 where the file has them): the
    one its byte-order mark names (the codec drops the mark), else UTF-8."""
    return next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8")


def decode_bytes(data: bytes) -> tuple[str, int | None]:
    """``data`` as text in the encoding its byte-order mark names (UTF-8 without one), the mark dropped;
    undecodable bytes become U+FFFD. Also returns the 1-based line of the first undecodable byte, or
    None when there was none."""
    enc = bom_encoding(data[:4])
    try:
        return data.decode(enc), None
    except UnicodeDecodeError as e:
        before = data[: e.start].decode(enc, errors="replace")
        return data.decode(enc, errors="replace"), len(LINE_BREAK.findall(before)) + 1


def split_lines(text: str) -> Iterator[str]:
    """The lines of ``text``, each ending in ``\\n`` whatever its ending was (the last one as it is);
    an empty last line (text that ends with a line break) is not a line."""
    pos = 0
    for m in LINE_BREAK.finditer(text):
        yield text[pos : m.start()] + "\n"
        pos = m.end()
    if pos < len(text):
        yield text[pos:]


JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")


def _complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def json_array_file(name: str, first_line: str, more: bool, whole: Callable[[], str]) -> bool:
    """Whether a JSON file is one array of records (the Alpaca/LIMA style) rather than JSON Lines, from
    its first non-blank line, whether more non-blank lines follow, and (only where those leave it open)
    ``whole()``, the whole text. A file is an array when it starts with "[", unless its first line is a
    whole JSON value with more lines after it (JSON Lines whose first record is an array: no array file
    looks like that). A .jsonl/.ndjson name says JSON Lines unless the whole file parses as one array,
    so that a broken first line costs that line only, not the rest of the file."""
    if not first_line.lstrip().startswith("["):
        return False
    if more and _complete_json(first_line):
        return False
    name = name.lower().removesuffix(".gz")
    if name.endswith(JSON_LINES_SUFFIXES):
        return _complete_json(whole())
    return True
