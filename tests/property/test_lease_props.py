"""Properties of lease canonicalisation and glob matching."""

from __future__ import annotations

from functools import lru_cache

from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.lease import canonical_target, clean_path, glob_match, lease_allows

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
