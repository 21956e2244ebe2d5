"""Text from a worker (or any other untrusted party) made fit for the supervisor's log.

A worker decides what a traceback or an error message says, so what the supervisor logs
of it is capped (the head and the tail are kept, the cut is marked) and cannot forge a
log record: control characters, lone surrogates and the Unicode line and direction
controls are escaped, and in a multi-line block every line after the first starts with
an indent, so no line of it can pass for a record of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable

LOG_TEXT_MAX = 16 * 1024  # characters of one untrusted text in one log record
BLOCK_INDENT = "    | "
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f"
                     "\ufeff\ufff9-\ufffb\ud800-\udfff]")
_UNSAFE_KEEP_NEWLINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e"
                                  "\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\x1b": "\\e"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def one_line(text: str, limit: int = LOG_TEXT_MAX) -> str:
    """`text` on one line (newlines escaped too), at most about `limit` characters."""
    return _capped(text, limit, lambda t: _UNSAFE.sub(_escape, t), " ")


def block(text: str, limit: int = LOG_TEXT_MAX, indent: str = BLOCK_INDENT) -> str:
    """`text` as indented lines to follow a record's first line, at most about `limit` characters."""
    def safe(t: str) -> str:
        return _UNSAFE_KEEP_NEWLINE.sub(_escape, t).replace("\n", "\n" + indent)

    return indent + _capped(text.rstrip("\n"), limit, safe, "\n" + indent)


def _capped(text: str, limit: int, safe: Callable[[str], str], sep: str) -> str:
    if len(text) <= limit:
        out = safe(text)
        if len(out) <= limit:
            return out
    # Keep the head (where it started) and the longer tail (where it failed); making a piece
    # safe may lengthen it several times over, so each is cut again after it.
    head_room, tail_room = limit // 4, limit - limit // 4
    head = safe(text[:head_room])[:head_room]
    last = head.rfind("\n")
    if last >= 0 and not head.startswith(sep[1:], last + 1):  # no partial indent before the marker
        head = head[:last]
    tail = safe(text[-tail_room:])[-tail_room:]
    return f"{head}{sep}[... truncated: {len(text):,} characters in all, the middle left out ...]{sep}{tail}"
