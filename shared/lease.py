"""Lease grammar, target canonicalisation and glob matching (protocol.md §8).

Pure functions. Glob semantics follow the Go SDK: patterns and targets are
split on "/"; a segment `**` matches zero or more whole segments, a segment
`*` exactly one, and `*` inside a segment any run of characters within it.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from functools import lru_cache
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

RESERVED_CAPABILITIES = frozenset({
    "fs.read", "fs.write", "net.fetch", "tool.call", "agent.delegate", "model.use", "cost.budget",
})
VENDOR_CAPABILITY_RE = re.compile(r"^x-vendor\.[A-Za-z0-9_-]+\.[A-Za-z0-9._-]+$")
BUDGET_RE = re.compile(r"^([A-Z]{1,10}|[a-z]{1,10}):([0-9]+(?:\.[0-9]+)?)$")
MAX_PATTERNS = 256
MAX_CAPABILITIES = 64
# Bounds on every pattern and target, in UTF-8 bytes, checked before any other work:
PATH_MAX = 4096  # the kernel's: a path is at most PATH_MAX - 1 bytes (its NUL takes the last)
NAME_MAX = 255  # the kernel's: one path segment
MAX_URL_LEN = 8192  # net.fetch
MAX_PATTERN_LEN = 4096  # any other capability's pattern or target (tool, agent, model names, ...)
MAX_CAPABILITY_LEN = 256  # a capability name

PATH_CAPABILITIES = frozenset({"fs.read", "fs.write"})

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
        if not isinstance(cap, str):
            raise LeaseError(f"lease capability names must be strings (got {type(cap).__name__})")
        if len(cap.encode("utf-8", "surrogatepass")) > MAX_CAPABILITY_LEN:
            raise LeaseError(f"lease capability {cap[:64]!r}... is longer than {MAX_CAPABILITY_LEN} bytes")
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
                raise LeaseError(f"lease capability {cap!r}: a pattern of type {type(p).__name__} is not a string")
            too_big = bound_error(cap, p)
            if too_big is not None:
                raise LeaseError(f"lease capability {cap!r}: a pattern {too_big}")
            if cap == "cost.budget":
                parse_budget_entry(p)
        out[cap] = list(patterns)
    return out


def _cut(text: str, n: int = 128) -> str:
    """`text` quoted for a message, cut to `n` characters."""
    return repr(text) if len(text) <= n else repr(text[:n]) + "..."


def _utf8_len(s: str, limit: int) -> int:
    """Length of `s` in UTF-8 bytes, or some number above `limit` without encoding all of a huge `s`."""
    if len(s) > limit:
        return len(s)  # at least that many bytes
    return len(s.encode("utf-8", "surrogatepass"))


def bound_error(capability: str, text: str) -> str | None:
    """Why `text` is too big to be a pattern or target of `capability`, or None.

    fs.* paths follow the kernel: at most PATH_MAX - 1 bytes in all (PATH_MAX counts the
    terminating NUL), NAME_MAX bytes per segment, no NUL. net.fetch URLs: MAX_URL_LEN bytes.
    Anything else (tool, agent, model names, vendor targets): MAX_PATTERN_LEN bytes.
    O(len(text)) at most; the message names the bound, never the text.
    """
    if capability in PATH_CAPABILITIES:
        if _utf8_len(text, PATH_MAX) >= PATH_MAX:
            return f"is longer than {PATH_MAX - 1} bytes, the most a path can be (PATH_MAX {PATH_MAX})"
        segments = text.split("/")
        if max(map(len, segments)) * 4 > NAME_MAX and \
                max(_utf8_len(seg, NAME_MAX) for seg in segments) > NAME_MAX:
            return f"has a segment longer than {NAME_MAX} bytes, the most a path segment can be (NAME_MAX)"
        if "\0" in text:
            return "holds a NUL byte, which no path can"
        return None
    limit = MAX_URL_LEN if capability == "net.fetch" else MAX_PATTERN_LEN
    if _utf8_len(text, limit) > limit:
        return f"is longer than {limit} bytes, the most accepted for {capability[:64]!r}"
    return None


def parse_budget_entry(entry: str) -> tuple[str, Decimal]:
    """`CUR:amount` -> (currency, Decimal); LeaseError naming the entry if malformed."""
    m = BUDGET_RE.fullmatch(entry)
    if not m:
        raise LeaseError(
            f"lease capability 'cost.budget': pattern {_cut(entry)} is not CURRENCY:AMOUNT "
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

    The literal pieces between the stars: the first must start the segment, the last end
    it, and each one between is found left to right after the previous one (taking the
    leftmost place never loses a match). str.find and friends: no backtracking.
    """
    if "*" not in pattern:
        return pattern == segment
    parts = _star_parts(pattern)
    first, last = parts[0], parts[-1]
    stop = len(segment) - len(last)
    if stop < len(first) or not segment.startswith(first) or not segment.endswith(last):
        return False
    pos = len(first)
    for piece in parts[1:-1]:
        if piece:
            found = segment.find(piece, pos, stop)
            if found < 0:
                return False
            pos = found + len(piece)
    return True


@lru_cache(maxsize=1024)
def _star_parts(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("*"))


def _split(s: str) -> list[str]:
    return s.split("/") if s else []


def glob_match(pattern: str, target: str) -> bool:
    """Go-SDK segment glob (protocol.md §8.2)."""
    return _walk(_split(pattern), _Target(target), _segment_match)


# Called with the number of segment comparisons and row steps each match or cover did (tests
# use it to bound the matcher's work); None in normal running.
step_counter: Callable[[int], None] | None = None

# The most steps one lease check may take (all of a capability's patterns against one target,
# or all of a delegated lease against its parent's): far above any honest lease (tens to a few
# thousand), and about a tenth of a second at worst. Beyond it the check fails closed.
MATCH_BUDGET = 50_000


class MatchTooCostly(LeaseError):
    """A lease check would take more than its step budget."""


class _Target:
    """A target split into segments, with the positions of each distinct segment: shared by
    every pattern matched against it."""

    __slots__ = ("segs", "index", "wild")

    def __init__(self, target: str) -> None:
        self.segs = _split(target)
        self.index: dict[str, int] = {}
        for j, seg in enumerate(self.segs):
            self.index[seg] = self.index.get(seg, 0) | (1 << j)
        self.wild: dict[str, int] = {}  # pattern segment with a `*` inside -> positions it takes


class _Budget:
    __slots__ = ("left",)

    def __init__(self, steps: int) -> None:
        self.left = steps


def _walk(pat: list[str], tgt: _Target, step: Callable[[str, str], bool],
          prefix: bool = False, cover: bool = False, budget: _Budget | None = None) -> bool:
    """Segment-by-segment walk shared by matching and covering: `**` takes any run of
    segments, every other pattern segment takes one segment for which `step` holds.
    With `prefix`, succeed once the whole target is consumed: some longer target would
    match (whatever is left of the pattern, some segments satisfy it).

    Dynamic programming over pattern segments: `reach` has bit j set when the pattern so
    far can consume exactly the first j target segments. `**` sets every bit from the
    lowest set one up; `*` and a literal segment shift the bits whose segment they take
    (literals through the target's index); only a segment with a `*` inside calls `step`:
    once per reachable position, or once per distinct target segment when those are fewer.
    So at most len(pat) * (len(tgt) + 1) calls to `step` and a few big-integer operations
    on len(tgt) + 1 bits per pattern segment: no backtracking. With `cover`, `*` takes any
    segment but `**`. With a `budget`, raise MatchTooCostly once it is spent.
    """
    segs, index = tgt.segs, tgt.index
    n = len(segs)
    end = 1 << n
    every = (end << 1) - 1
    one_segment = (end - 1) & ~(index.get("**", 0) if cover else 0)
    reach = 1
    steps = 1
    for seg in pat:
        if prefix and reach & end:
            break
        if not reach:
            break
        steps += 1
        if seg == "**":
            low = reach & -reach
            reach = every & ~(low - 1)
        elif seg == "*":
            reach = (reach & one_segment) << 1
        elif "*" not in seg:
            reach = (reach & index.get(seg, 0)) << 1
        else:
            left = reach & ~end
            tries = left.bit_count()
            if budget is not None and steps + min(tries, len(index)) > budget.left:
                budget.left -= steps
                raise MatchTooCostly(f"the check would take more than {MATCH_BUDGET} steps")
            if tries > len(index) or (not cover and seg in tgt.wild):  # by distinct segment
                mask = None if cover else tgt.wild.get(seg)
                if mask is None:
                    mask = 0
                    for value, bits in index.items():
                        steps += 1
                        if step(seg, value):
                            mask |= bits
                    if not cover:
                        tgt.wild[seg] = mask
                reach = (left & mask) << 1
                continue
            nxt = 0
            while left:
                low = left & -left
                steps += 1
                if step(seg, segs[low.bit_length() - 1]):
                    nxt |= low << 1
                left ^= low
            reach = nxt
    if budget is not None:
        budget.left -= steps
        if budget.left < 0:
            raise MatchTooCostly(f"the check would take more than {MATCH_BUDGET} steps")
    if step_counter is not None:
        step_counter(steps)
    return bool(reach & end)


def glob_match_prefix(pattern: str, target: str) -> bool:
    """Could `pattern` match `target` followed by more segments (or by none)?

    How an HTTPS tunnel is checked: its target is `https://host[:port]`; the path is
    inside the encrypted stream, so only the pattern's scheme and host can be enforced.
    """
    return _walk(_split(pattern), _Target(target), _segment_match, prefix=True)


def lease_allows(lease: Lease, capability: str, target: str) -> bool:
    """True when some pattern of `capability` matches the canonical target.

    All the patterns together take at most MATCH_BUDGET steps; a check that would take
    more (only a pathological lease against a long target can) allows nothing.
    """
    patterns = lease.get(capability)
    if not patterns:
        return False
    tgt = _Target(canonical_target(capability, target))
    budget = _Budget(MATCH_BUDGET - len(tgt.segs))
    try:
        return any(_walk(_split(p), tgt, _segment_match, budget=budget) for p in patterns)
    except MatchTooCostly:
        return False


def covers(parent: str, child: str) -> bool:
    """Does parent pattern cover every target child pattern can match (§8.5, Go `glob.Covers`)?

    Sound and conservative: parent `**` covers any run of child segments (child `**`
    included); parent `*` covers one child segment that is not `**`; a literal parent
    segment covers a child segment that is identical, or that has no `*` and matches it.
    """
    return _covers(_split(parent), _Target(child))


def _covers(p: list[str], c: _Target, budget: _Budget | None = None) -> bool:
    # `_walk` calls this only for a parent segment with a `*` inside (not `*`, not `**`).
    return _walk(p, c, lambda seg, s: s != "**" and (seg == s or ("*" not in s and _segment_match(seg, s))),
                 cover=True, budget=budget)


def check_subset(child: Lease, parent: Lease, parent_remaining: dict[str, Decimal]) -> None:
    """Raise LeaseError naming the first capability/pattern of `child` that `parent` does not cover.

    The whole check takes at most MATCH_BUDGET steps (MatchTooCostly, a LeaseError, beyond).
    """
    budget = _Budget(MATCH_BUDGET)
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
        parents = [_split(g) for g in granted]
        for pat in patterns:
            tgt = _Target(pat)
            budget.left -= len(tgt.segs) + 1
            try:
                if not any(_covers(g, tgt, budget) for g in parents):
                    raise LeaseError(f"capability {cap!r}: pattern {_cut(pat)} is not covered by the parent's lease")
            except MatchTooCostly as e:
                raise MatchTooCostly(f"checking the lease against its parent's would take more than "
                                     f"{MATCH_BUDGET} steps") from e
