"""JSON for the worker: orjson where it loads, the standard library's json where it does not.

The worker runtime runs on every agent environment's interpreter. orjson is a compiled
extension built for the supervisor's Python; an agent's venv of another minor version
cannot load it, and then the standard library does the same work (slower, and with its
own rules for what is not JSON: both refuse what JSON cannot hold, such as NaN and
objects, with a TypeError).
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # another interpreter than the one orjson was built for
    orjson = None  # type: ignore[assignment]

FAST = orjson is not None


def dumps(value: Any) -> bytes:
    """`value` as compact UTF-8 JSON; TypeError if it is not plain JSON data."""
    if orjson is not None:
        return orjson.dumps(value)
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except ValueError as e:  # NaN or infinity, or a circular reference
        raise TypeError(str(e)) from e


def loads(raw: bytes) -> Any:
    if orjson is not None:
        return orjson.loads(raw)
    return json.loads(raw)
