"""Lease subset rules (protocol.md §8.5): `covers` is sound against the matcher."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.lease import LeaseError, check_subset, covers, glob_match

SEG = st.sampled_from(["a", "b", "ab", "*", "**", "a*", "*b", "x.py", "*.py"])
PATTERN = st.lists(SEG, min_size=0, max_size=5).map(lambda s: "/" + "/".join(s))
TARGET = st.lists(st.sampled_from(["a", "b", "ab", "x.py", "abb", ""]), min_size=0, max_size=6).map(
    lambda s: "/" + "/".join(s))


@settings(max_examples=400, deadline=None)
@given(PATTERN, PATTERN, TARGET)
def test_covers_is_sound(parent: str, child: str, target: str) -> None:
    """If parent covers child, every target the child matches, the parent matches too."""
    if covers(parent, child) and glob_match(child, target):
        assert glob_match(parent, target), (parent, child, target)


@settings(max_examples=200, deadline=None)
@given(PATTERN)
def test_a_pattern_covers_itself(p: str) -> None:
    assert covers(p, p)


@pytest.mark.parametrize("parent, child, ok", [
    ("/workspace/**", "/workspace/reports/*.md", True),
    ("/workspace/*", "/workspace/**", False),
    ("/workspace/**", "/workspace2/x", False),
    ("summarizer@*", "summarizer@1.2.0", True),
    ("tier-fast/*", "tier-fast/gpt-4o-mini", True),
    ("tier-fast/*", "tier-fast/a/b", False),
])
def test_worked_examples(parent: str, child: str, ok: bool) -> None:
    assert covers(parent, child) is ok


def test_check_subset_budget_against_remaining() -> None:
    parent = {"fs.read": ["/data/**"], "cost.budget": ["USD:5"]}
    check_subset({"fs.read": ["/data/x"], "cost.budget": ["USD:2"]}, parent, {"USD": Decimal("3")})
    with pytest.raises(LeaseError, match="remaining"):
        check_subset({"cost.budget": ["USD:4"]}, parent, {"USD": Decimal("3")})
    with pytest.raises(LeaseError, match="net.fetch"):
        check_subset({"net.fetch": ["https://x/**"]}, parent, {"USD": Decimal("3")})
    with pytest.raises(LeaseError, match="/etc"):
        check_subset({"fs.read": ["/data/**", "/etc/x"]}, parent, {"USD": Decimal("3")})
