"""Properties of lease canonicalisation and glob matching."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from hypothesis import example, given, settings
from hypothesis import strategies as st

import shared.lease as lease_mod
from shared.lease import canonical_target, clean_path, covers, glob_match, lease_allows

segment = st.sampled_from(["a", "b", "..", ".", "", "x.txt", "b2"])
rel_path = st.lists(segment, max_size=12).map("/".join)


def resolve(path: str) -> str:
    """Reference lexical resolution of an absolute path."""
    stack: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if stack:
                stack.pop()
            continue
        stack.append(seg)
    return "/" + "/".join(stack)


@settings(max_examples=300, deadline=None)
@given(rel_path)
@example("../b/secret")
@example("../../b")
@example("x/../../b/y")
def test_dotdot_never_escapes(p: str) -> None:
    target = "/a/" + p
    canon = canonical_target("fs.read", target)
    assert canon == resolve(target)
    assert ".." not in canon.split("/")
    if lease_allows({"fs.read": ["/b/**"]}, "fs.read", target):
        assert resolve(target) == "/b" or resolve(target).startswith("/b/")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="/.ab", max_size=30))
def test_clean_path_absolute(p: str) -> None:
    path = "/" + p
    c = clean_path(path)
    assert c == resolve(path)
    assert c.startswith("/") and "//" not in c
    assert "." not in c.split("/") and ".." not in c.split("/")  # so never "/../" nor a leading "/.."
    assert c == "/" or not c.endswith("/")
    assert clean_path(c) == c  # idempotent


# -- glob semantics against a reference ----------------------------------------------------------

def _seg_ref(pat: str, s: str) -> bool:
    @lru_cache(maxsize=None)
    def go(i: int, j: int) -> bool:
        if i == len(pat):
            return j == len(s)
        if pat[i] == "*":
            return go(i + 1, j) or (j < len(s) and go(i, j + 1))
        return j < len(s) and pat[i] == s[j] and go(i + 1, j + 1)
    return go(0, 0)


def glob_ref(pattern: str, target: str) -> bool:
    pat = pattern.split("/") if pattern else []
    tgt = target.split("/") if target else []

    @lru_cache(maxsize=None)
    def go(i: int, j: int) -> bool:
        if i == len(pat):
            return j == len(tgt)
        if pat[i] == "**":
            return go(i + 1, j) or (j < len(tgt) and go(i, j + 1))
        if j == len(tgt):
            return False
        if pat[i] == "*":
            return go(i + 1, j + 1)
        return _seg_ref(pat[i], tgt[j]) and go(i + 1, j + 1)
    return go(0, 0)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab*/", max_size=12), st.text(alphabet="ab*/", max_size=12))
def test_glob_matches_reference(pattern: str, target: str) -> None:
    assert glob_match(pattern, target) is glob_ref(pattern, target)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_glob_literal_self_match(target: str) -> None:
    assert glob_match(target, target)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_glob_never_raises(pattern: str, target: str) -> None:
    assert glob_match(pattern, target) in (True, False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="abc.-", min_size=1, max_size=5), max_size=8))
def test_double_star_prefix_covers_subtree(segs: list[str]) -> None:
    target = "/root" + "".join("/" + s for s in segs)
    assert glob_match("/root/**", target)
    assert not glob_match("/root/**", "/rootx" + "".join("/" + s for s in segs))


# -- the matcher's work is bounded, whatever the pattern and target ---------------------------------

@contextmanager
def counted() -> Iterator[list[int]]:
    """Sum of the steps every match and cover reports while the block runs."""
    total = [0]

    def add(n: int) -> None:
        total[0] += n

    lease_mod.step_counter = add
    try:
        yield total
    finally:
        lease_mod.step_counter = None


HOSTILE_SEG = st.sampled_from(["**", "**", "*", "a", "*a", "a*", "*a*", "b", "x", "*b*a*", ""])
HOSTILE_PATTERN = st.lists(HOSTILE_SEG, max_size=40)
HOSTILE_TARGET = st.lists(st.sampled_from(["a", "aa", "aaab", "b", "", "**", "ba", "x"]), max_size=300)


@settings(max_examples=200, deadline=None)
@given(HOSTILE_PATTERN, HOSTILE_TARGET, st.booleans())
@example(["**", "x", "**"], ["a"] * 300, False)
@example(["**"] * 40, ["a"] * 300, True)
@example(["**", "*a*"] * 20, ["a"] * 300, False)
def test_matcher_work_is_linear_in_the_target(pat: list[str], tgt: list[str], lead: bool) -> None:
    """At most (pattern segments + 1) x (target segments + 1) steps, and the verdict is the reference's."""
    pattern, target = "/".join(pat), "/".join(tgt)
    if lead:
        pattern, target = "/" + pattern, "/" + target
    p_segs, t_segs = len(pattern.split("/")), len(target.split("/"))
    with counted() as steps:
        got = glob_match(pattern, target)
    assert 1 <= steps[0] <= (p_segs + 1) * (t_segs + 1)
    assert got is glob_ref(pattern, target)
    with counted() as steps:
        covers(pattern, target)
    assert 1 <= steps[0] <= (p_segs + 1) * (t_segs + 1)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 60), st.integers(1000, 20000))
def test_double_star_chains_on_long_targets_stay_cheap(stars: int, length: int) -> None:
    """The reported case (`**/x/**` against a 40 KB target took 5 s) and longer `**` chains."""
    target = "a/" * length + "b"
    for pattern in ("**/x/**", "/**" * stars + "/x", "**/" * stars + "*a*/" * stars + "c"):
        p_segs = len(pattern.split("/"))
        with counted() as steps:
            assert glob_match(pattern, target) is False
        assert steps[0] <= (p_segs + 1) * (length + 2)
    with counted() as steps:
        assert glob_match("**/" * stars + "b", target) is True
    assert 1 <= steps[0] <= (stars + 2) * (length + 2)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(100, 2000))
def test_distinct_segments_cost_one_step_per_reachable_position(k: int, length: int) -> None:
    """Every target segment different: `*` inside a segment is tried at each reachable position."""
    target = "/".join(str(i) for i in range(length))
    pattern = "**/*1*/" * k + "x"
    with counted() as steps:
        assert glob_match(pattern, target) is False
    assert 1 <= steps[0] <= (2 * k + 2) * (length + 1)


def test_reported_case_is_fast() -> None:
    """A loose wall-clock guard on top of the step counts (it took 5 s)."""
    start = time.perf_counter()
    assert glob_match("**/x/**", "a/" * 20000) is False
    assert covers("**/x/**", "a/" * 20000 + "*") is False
    assert time.perf_counter() - start < 1.0


def test_a_pathological_lease_costs_a_bounded_number_of_steps() -> None:
    """Many in-segment stars after `**`, in many patterns, against a long target of distinct
    segments: lease_allows stops at its budget and allows nothing."""
    target = "/" + "/".join(str(i) for i in range(800))
    pattern = "/**/" + "/**/".join(f"*{i}*" for i in range(300))
    with counted() as steps:
        assert lease_allows({"fs.read": [pattern] * 256}, "fs.read", target) is False
    assert steps[0] <= lease_mod.MATCH_BUDGET
    start = time.perf_counter()
    assert lease_allows({"fs.read": [pattern] * 256}, "fs.read", target) is False
    assert time.perf_counter() - start < 1.0  # loose: about a tenth of a second
    assert lease_allows({"fs.read": [pattern, "/**"]}, "fs.read", "/a/b") is True


def test_a_pathological_delegation_costs_a_bounded_number_of_steps() -> None:
    """A child lease of the largest size against a parent with many patterns."""
    from shared.lease import MATCH_BUDGET, MatchTooCostly, check_subset

    parent = {"fs.read": ["/**/" + "/**/".join(f"*{j}*" for j in range(i, i + 40)) + "/z" for i in range(256)]}
    child = {"fs.read": ["/" + "/".join(str(i) for i in range(700))] * 256}
    start = time.perf_counter()
    try:
        check_subset(child, parent, {})
    except MatchTooCostly as e:
        assert str(MATCH_BUDGET) in str(e)
    else:
        raise AssertionError("the check should have run out of budget")
    assert time.perf_counter() - start < 1.0


def glob_prefix_ref(pattern: str, target: str) -> bool:
    """Reference: could `pattern` match `target` followed by more segments (or none)?"""
    pat = pattern.split("/") if pattern else []
    tgt = target.split("/") if target else []

    @lru_cache(maxsize=None)
    def go(i: int, j: int) -> bool:
        if j == len(tgt):
            return True
        if i == len(pat):
            return False
        if pat[i] == "**":
            return go(i + 1, j) or go(i, j + 1)
        if pat[i] == "*":
            return go(i + 1, j + 1)
        return _seg_ref(pat[i], tgt[j]) and go(i + 1, j + 1)
    return go(0, 0)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab*/", max_size=12), st.text(alphabet="ab*/", max_size=12))
def test_glob_prefix_matches_reference(pattern: str, target: str) -> None:
    from shared.lease import glob_match_prefix

    assert glob_match_prefix(pattern, target) is glob_prefix_ref(pattern, target)


def covers_ref(parent: str, child: str) -> bool:
    """Reference of protocol.md §8.5 `Covers`, by memoised recursion."""
    pat = parent.split("/") if parent else []
    tgt = child.split("/") if child else []

    @lru_cache(maxsize=None)
    def go(i: int, j: int) -> bool:
        if i == len(pat):
            return j == len(tgt)
        if pat[i] == "**":
            return go(i + 1, j) or (j < len(tgt) and go(i, j + 1))
        if j == len(tgt) or tgt[j] == "**":
            return False
        seg, s = pat[i], tgt[j]
        return (seg == "*" or seg == s or ("*" not in s and _seg_ref(seg, s))) and go(i + 1, j + 1)
    return go(0, 0)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab*/", max_size=14), st.text(alphabet="ab*/", max_size=14))
def test_covers_matches_reference(parent: str, child: str) -> None:
    assert covers(parent, child) is covers_ref(parent, child)
