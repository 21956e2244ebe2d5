"""Per-job resource limits a client asks for, clamped to the operator's ceiling."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from shared.errors import InvalidRequest
from supervisor.config import Limits, MiB

LIMITS_KEY = "x-vendor.arcp-supervisor.limits"
SANDBOX_KEY = "x-vendor.arcp-supervisor.sandbox"
_FIELDS = {
    "memory_mb": ("memory", MiB),
    "cpu_sec": ("cpu_time", 1),
    "max_procs": ("max_procs", 1),
    "max_open_files": ("max_open_files", 1),
    "max_file_size_mb": ("max_file_size", MiB),
    "runtime_sec": ("max_runtime", 1),
}


def _value(key: str, raw: Any, where: str) -> int:
    if key not in _FIELDS:
        raise InvalidRequest(f"{where}: unknown limit {key!r} (known: {', '.join(_FIELDS)})")
    if isinstance(raw, str) and raw.isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
        raise InvalidRequest(f"{where}: limit {key!r} must be a positive integer, got {raw!r}")
    return raw


def requested_limits(extensions: dict[str, Any], lease: dict[str, list[str]]) -> dict[str, int]:
    """The tighter of the two routes of contract.md, per key."""
    asked: dict[str, int] = {}
    ext = extensions.get(LIMITS_KEY)
    if ext is not None:
        if not isinstance(ext, dict):
            raise InvalidRequest(f"extension {LIMITS_KEY} must be an object")
        for k, v in ext.items():
            asked[k] = _value(k, v, f"extension {LIMITS_KEY}")
    for entry in lease.get(LIMITS_KEY, []):
        k, sep, v = entry.partition(":")
        if not sep:
            raise InvalidRequest(f"lease capability {LIMITS_KEY}: {entry!r} is not key:value")
        n = _value(k.strip(), v.strip(), f"lease capability {LIMITS_KEY}")
        asked[k.strip()] = min(n, asked.get(k.strip(), n))
    return asked


def effective_limits(ceiling: Limits, asked: dict[str, int]) -> Limits:
    values = {}
    for key, n in asked.items():
        attr, scale = _FIELDS[key]
        values[attr] = min(getattr(ceiling, attr), n * scale)
    return replace(ceiling, **values)


def within(parent: Limits, child: Limits) -> Limits:
    """A delegated child's limits: per key the tighter of its own and its parent's effective ones."""
    return replace(child, **{f.name: min(getattr(parent, f.name), getattr(child, f.name)) for f in fields(Limits)})
