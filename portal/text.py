"""Text the database can store. PostgreSQL refuses a NUL in text columns (and ``\\u0000`` in jsonb),
and a lone surrogate cannot be encoded as UTF-8 at all; SQLite takes both, so only PostgreSQL
shows the difference. User input with either is refused by its edge (``unstorable``); text that
must be kept whatever it holds, such as function log lines, is cleaned (``storable``)."""

from __future__ import annotations

import re

# A valid astral character is one code point in a Python str, so any surrogate here is a lone one.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def unstorable(text: str) -> str | None:
    """What in ``text`` the database cannot store, for a refusal ("a NUL character (U+0000) on
    line 2"), or None when it can store all of it."""
    match = UNSTORABLE.search(text)
    if match is None:
        return None
    char = match.group()
    what = "a NUL character (U+0000)" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    if "\n" in text:
        return f"{what} on line {text.count(chr(10), 0, match.start()) + 1}"
    return f"{what} at character {match.start() + 1}"


def storable(text: str) -> str:
    """``text`` with every NUL and lone surrogate replaced by U+FFFD, the rest unchanged."""
    return UNSTORABLE.sub(REPLACEMENT, text) if UNSTORABLE.search(text) else text


def shown(text: str) -> str:
    """``text`` fit to quote in a message: a NUL as ``\\0``, a lone surrogate as U+FFFD."""
    return storable(text.replace("\x00", "\\0"))
