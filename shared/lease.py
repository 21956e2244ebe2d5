"""Lease grammar, target canonicalisation and glob matching (protocol.md §8).

Pure functions. Glob semantics follow the Go SDK: patterns and targets are
split on "/"; a segment `**` matches zero or more whole segments, a segment
`*` exactly one, and `*` inside a segment any run of characters within it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
import re
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

RESERVED_CAPABILITIES = frozenset({
    "fs.read", "fs.write", "net.fetch", "tool.call", "agent.delegate", "model.use", "cost.budget",
})
VENDOR_CAPABILITY_RE = re.compile(r"^x-vendor\.[A-Za-z0-9_-]+\.[A-Za-z0-9._-]+$")
BUDGET_RE = re.compile(r"^([A-Z]{1,10}|[a-z]{1,10}):([0-9]+(?:\.[0-9]+)?)$")
MAX_PATTERNS = 256
MAX_PATTERN_LEN = 4096
MAX_CAPABILITIES = 64

Lease = dict[str, list[str]]


class LeaseError(ValueError):
    """A lease request that breaks the grammar; the message names capability and pattern."""


def validate_lease_request(obj: Any) -> Lease:
    """Check a `lease_request` object; return it as a plain dict of string lists."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise LeaseError(f"lease_request must be an object (got {type(obj).__name__})")
    if len(obj) > MAX_CAPABILITIES:
        raise LeaseError(f"lease_request has more than {MAX_CAPABILITIES} capabilities")
    out: Lease = {}
    for cap, patterns in obj.items():
        if cap not in RESERVED_CAPABILITIES and not VENDOR_CAPABILITY_RE.fullmatch(cap):
            raise LeaseError(
                f"lease capability {cap!r} is neither reserved nor of the form x-vendor.<vendor>.<name>"
            )
        if not isinstance(patterns, list):
            raise LeaseError(f"lease capability {cap!r}: patterns must be a list of strings")
        if len(patterns) > MAX_PATTERNS:
            raise LeaseError(f"lease capability {cap!r}: more than {MAX_PATTERNS} patterns")
        for p in patterns:
            if not isinstance(p, str):
                raise LeaseError(f"lease capability {cap!r}: pattern {p!r} is not a string")
            if len(p) > MAX_PATTERN_LEN:
                raise LeaseError(f"lease capability {cap!r}: a pattern is longer than {MAX_PATTERN_LEN}")
            if cap == "cost.budget":
                parse_budget_entry(p)
        out[cap] = list(patterns)
    return out


def parse_budget_entry(entry: str) -> tuple[str, Decimal]:
    """`CUR:amount` -> (currency, Decimal); LeaseError naming the entry if malformed."""
    m = BUDGET_RE.fullmatch(entry)
    if not m:
        raise LeaseError(
            f"lease capability 'cost.budget': pattern {entry!r} is not CURRENCY:AMOUNT "
            "(currency [A-Z]{1,10} or [a-z]{1,10}, amount digits with an optional fraction)"
        )
    try:
        return m.group(1), Decimal(m.group(2))
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise LeaseError(f"lease capability 'cost.budget': bad amount in {entry!r}") from e


def initial_budget(lease: Lease) -> dict[str, Decimal]:
    """Counters per currency; several entries of one currency add up."""
    out: dict[str, Decimal] = {}
    for entry in lease.get("cost.budget", []):
        cur, amount = parse_budget_entry(entry)
        out[cur] = out.get(cur, Decimal(0)) + amount
    return out


def clean_path(path: str) -> str:
    """Lexical clean like Go's path.Clean: `..` never climbs above the root."""
    if not path:
        return "."
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def canonical_target(capability: str, target: str) -> str:
    """Normalise a target before matching (§8.3); patterns are never touched."""
    if capability in ("fs.read", "fs.write"):
        return clean_path(target)
    if capability == "net.fetch":
        try:
            parts = urlsplit(target)
        except ValueError:
            return target
        if not parts.scheme:
            return target
        # Decode before cleaning, as a server would: `%2e%2e` is `..` and must not escape.
        path = clean_path(unquote(parts.path)) if parts.path else ""
        if path == ".":
            path = ""
        return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, parts.fragment))
    return target


def _segment_match(pattern: str, segment: str) -> bool:
    """`*` matches any run of characters within the segment.

    Two pointers that fall back to the last `*`: linear in practice and never
    worse than O(len(pattern) * len(segment)), whatever a hostile pattern holds.
    """
    if "*" not in pattern:
        return pattern == segment
    p = s = 0
    star = -1
    mark = 0
    while s < len(segment):
        if p < len(pattern) and pattern[p] == "*":
            star, mark = p, s
            p += 1
        elif p < len(pattern) and pattern[p] == segment[s]:
            p += 1
            s += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            s = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _split(s: str) -> list[str]:
    return s.split("/") if s else []


def glob_match(pattern: str, target: str) -> bool:
    """Go-SDK segment glob (protocol.md §8.2)."""
    return _match(tuple(_split(pattern)), tuple(_split(target)))


def _walk(pat: tuple[str, ...], tgt: tuple[str, ...], step: Callable[[str, str], bool],
          prefix: bool = False) -> bool:
    """Segment-by-segment walk shared by matching and covering: `**` takes any run of
    segments, every other pattern segment takes one segment for which `step` holds.
    With `prefix`, succeed once the whole target is consumed: some longer target would
    match (whatever is left of the pattern, some segments satisfy it).
    Iterative, with the visited (i, j) pairs remembered, so hostile `**` chains stay cheap."""
    seen: set[tuple[int, int]] = set()
    stack = [(0, 0)]
    while stack:
        i, j = stack.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        if prefix and j == len(tgt):
            return True
        if i == len(pat):
            if j == len(tgt):
                return True
            continue
        if pat[i] == "**":
            stack.extend((i + 1, k) for k in range(j, len(tgt) + 1))
        elif j < len(tgt) and step(pat[i], tgt[j]):
            stack.append((i + 1, j + 1))
    return False


def _match(pat: tuple[str, ...], tgt: tuple[str, ...], prefix: bool = False) -> bool:
    return _walk(pat, tgt, lambda seg, s: seg == "*" or _segment_match(seg, s), prefix)


def glob_match_prefix(pattern: str, target: str) -> bool:
    """Could `pattern` match `target` followed by more segments (or by none)?

    How an HTTPS tunnel is checked: its target is `https://host[:port]`; the path is
    inside the encrypted stream, so only the pattern's scheme and host can be enforced.
    """
    return _match(tuple(_split(pattern)), tuple(_split(target)), prefix=True)


def lease_allows(lease: Lease, capability: str, target: str) -> bool:
    """True when some pattern of `capability` matches the canonical target."""
    patterns = lease.get(capability)
    if not patterns:
        return False
    canon = canonical_target(capability, target)
    return any(glob_match(p, canon) for p in patterns)


def covers(parent: str, child: str) -> bool:
    """Does parent pattern cover every target child pattern can match (§8.5, Go `glob.Covers`)?

    Sound and conservative: parent `**` covers any run of child segments (child `**`
    included); parent `*` covers one child segment that is not `**`; a literal parent
    segment covers a child segment that is identical, or that has no `*` and matches it.
    """
    return _covers(tuple(_split(parent)), tuple(_split(child)))


def _covers(p: tuple[str, ...], c: tuple[str, ...]) -> bool:
    return _walk(p, c, lambda seg, s: s != "**" and (
        seg == "*" or seg == s or ("*" not in s and _segment_match(seg, s))))


def check_subset(child: Lease, parent: Lease, parent_remaining: dict[str, Decimal]) -> None:
    """Raise LeaseError naming the first capability/pattern of `child` that `parent` does not cover."""
    for cap, patterns in child.items():
        if cap == "cost.budget":
            for cur, amount in initial_budget({cap: patterns}).items():
                left = parent_remaining.get(cur)
                if left is None:
                    raise LeaseError(f"cost.budget: the parent has no budget in {cur}")
                if amount > left:
                    raise LeaseError(f"cost.budget: {cur} {amount} is more than the parent's remaining {left}")
            continue
        granted = parent.get(cap)
        if granted is None:
            raise LeaseError(f"capability {cap!r} is not in the parent's lease")
        for pat in patterns:
            if not any(covers(g, pat) for g in granted):
                raise LeaseError(f"capability {cap!r}: pattern {pat!r} is not covered by the parent's lease")
