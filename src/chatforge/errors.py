"""User-facing errors: the CLI prints these as one line (no traceback) and exits with status 2."""

from __future__ import annotations

import os
from pathlib import Path


class ChatforgeError(Exception):
    """Bad input from the user (a file, a config, a request): the message says what and where."""


def read_user_text(path: str | os.PathLike, error: type[ChatforgeError] = ChatforgeError) -> str:
    """A file a person wrote (a recipe, a policy, an eval spec or its samples) as text.

    A UTF-8 byte-order mark is dropped (Notepad writes one); bytes that are not UTF-8 are ``error``
    naming the file and line, not a UnicodeDecodeError traceback. OSError goes to the caller.
    """
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8") from None
