"""shared/lease.py: lease grammar, canonical targets and segment globs (protocol.md §8)."""

from __future__ import annotations

import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from shared.lease import (
    MAX_CAPABILITIES, MAX_CAPABILITY_LEN, MAX_PATTERN_LEN, MAX_PATTERNS, MAX_URL_LEN, NAME_MAX, PATH_MAX,
    LeaseError, bound_error, canonical_target, clean_path, glob_match, initial_budget, lease_allows,
    parse_budget_entry, validate_lease_request,
)

ROOT = Path(__file__).resolve().parents[2]


# -- §8.2 worked examples ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pattern", "target", "expected"),
    [
        ("/workspace/**", "/workspace", True),
        ("/workspace/**", "/workspace/a/b.txt", True),
        ("/workspace/**", "/workspace/a", True),
        ("/workspace/**", "/workspace2/x", False),
        ("/workspace/**", "/other/workspace/a", False),
        ("/workspace/*", "/workspace/a", True),
        ("/workspace/*", "/workspace/a/b", False),
        ("/workspace/*", "/workspace", False),  # `*` never matches zero segments
        ("/workspace/*", "/workspace/", True),  # ... but does match an empty one
        ("search.*", "search.web", True),
        ("search.*", "search.", True),
        ("search.*", "search/x", False),
        ("search.*", "search.a/b", False),
        ("https://api.example.com/**", "https://api.example.com", True),
        ("https://api.example.com/**", "https://api.example.com/v1/x?q=1", True),
        ("https://api.example.com/**", "https://api.example.com:443/v1", False),
        ("https://api.example.com/**", "http://api.example.com/v1", False),
        ("https://api.example.com/**", "https://api.example.com.evil.com/v1", False),
        ("tier-fast/*", "tier-fast/gpt-4o-mini", True),
        ("tier-fast/*", "tier-fast/a/b", False),
        ("tier-fast/*", "tier-fast", False),
        # in-segment stars, literals, case
        ("*.py", "a.py", True),
        ("*.py", "dir/a.py", False),
        ("foo*", "foo", True),
        ("foo*", "foobar", True),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "acb", False),
        ("a**", "abc", True),
        ("a**", "a/b", False),
        ("/a/**/z", "/a/z", True),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/b/c/y", False),
        ("**", "", True),
        ("**", "anything/at/all", True),
        ("", "", True),
        ("", "x", False),
        ("x", "", False),
        ("file?.txt", "file1.txt", False),  # `?` is literal
        ("file?.txt", "file?.txt", True),
        ("[ab]", "a", False),
        ("[ab]", "[ab]", True),
        ("/Workspace/**", "/workspace/a", False),
        ("a//b", "a//b", True),
        ("a//b", "a/b", False),
        ("a/*/b", "a//b", True),
    ],
)
def test_glob_examples(pattern: str, target: str, expected: bool) -> None:
    assert glob_match(pattern, target) is expected


def test_hostile_double_star_chain_terminates() -> None:
    target = "/" + "/".join(["a"] * 200)
    start = time.perf_counter()
    assert glob_match("/**" * 30 + "/x", target) is False
    assert glob_match("/**" * 30 + "/a", target) is True
    assert time.perf_counter() - start < 5.0


def test_hostile_in_segment_stars_terminate() -> None:
    code = "from shared.lease import glob_match; glob_match('/' + '*a' * 5 + '*b', '/' + 'a' * 400)"
    try:
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=2, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("glob_match did not finish within 2 s")


# -- §8.3 canonical targets -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/workspace/a/../b", "/workspace/b"),
        ("/workspace/./a//b/", "/workspace/a/b"),
        ("/..", "/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/a/b/../../../../c", "/c"),
        ("//etc", "/etc"),
        ("///etc//x", "/etc/x"),
        ("/", "/"),
        ("", "."),
        ("a/../..", ".."),
    ],
)
def test_clean_path(path: str, expected: str) -> None:
    assert clean_path(path) == expected


@pytest.mark.parametrize("cap", ["fs.read", "fs.write"])
def test_fs_targets_cleaned(cap: str) -> None:
    assert canonical_target(cap, "/workspace/../etc/passwd") == "/etc/passwd"
    assert not lease_allows({cap: ["/workspace/**"]}, cap, "/workspace/../etc/passwd")
    assert lease_allows({cap: ["/workspace/**"]}, cap, "/workspace/./a/../b.txt")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("HTTPS://API.Example.COM/v1/x", "https://api.example.com/v1/x"),
        ("https://api.example.com/V1/X", "https://api.example.com/V1/X"),
        ("https://api.example.com/v1/../../etc", "https://api.example.com/etc"),
        ("https://api.example.com/a//b/./c?q=1#f", "https://api.example.com/a/b/c?q=1#f"),
        ("https://api.example.com", "https://api.example.com"),
        ("https://api.example.com:443/v1", "https://api.example.com:443/v1"),
        ("not a url", "not a url"),
        ("/relative/../x", "/relative/../x"),  # no scheme: raw string
    ],
)
def test_net_fetch_targets(url: str, expected: str) -> None:
    assert canonical_target("net.fetch", url) == expected


def test_net_fetch_dotdot_cannot_escape_prefix() -> None:
    lease = {"net.fetch": ["https://api.example.com/v1/**"]}
    assert lease_allows(lease, "net.fetch", "https://API.example.com/v1/a/../b")
    assert not lease_allows(lease, "net.fetch", "https://api.example.com/v1/../admin")


def test_net_fetch_encoded_dotdot_cannot_escape_prefix() -> None:
    lease = {"net.fetch": ["https://api.example.com/v1/**"]}
    assert not lease_allows(lease, "net.fetch", "https://api.example.com/v1/%2e%2e/admin")


@pytest.mark.parametrize("cap", ["tool.call", "model.use", "agent.delegate", "x-vendor.acme.thing"])
def test_other_targets_unchanged(cap: str) -> None:
    assert canonical_target(cap, "a/../b//c") == "a/../b//c"


def test_lease_allows() -> None:
    lease = {"tool.call": ["search.*"], "fs.read": []}
    assert lease_allows(lease, "tool.call", "search.web")
    assert not lease_allows(lease, "tool.call", "exec.shell")
    assert not lease_allows(lease, "fs.read", "/x")  # empty list grants nothing
    assert not lease_allows(lease, "fs.write", "/x")  # absent capability


# -- grammar ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "obj",
    [
        None,
        {},
        {"fs.read": []},
        {"fs.read": ["/workspace/**"], "fs.write": ["/tmp/*"], "net.fetch": ["https://x/**"],
         "tool.call": ["*"], "agent.delegate": ["summarizer@*"], "model.use": ["tier-fast/*"]},
        {"cost.budget": ["USD:5", "USD:0.50", "credits:100", "EUR:0", "ABCDEFGHIJ:1"]},
        {"x-vendor.acme.gpu": ["a100"], "x-vendor.a_b-c.x.y-z": []},
        {"fs.read": ["p"] * MAX_PATTERNS},
        {"tool.call": ["x" * MAX_PATTERN_LEN]},
        {"net.fetch": ["https://x/" + "y" * (MAX_URL_LEN - 10)]},
        {"fs.read": ["/" + "/".join(["n" * NAME_MAX] * 15) + "/" + "x" * (PATH_MAX - 1 - 16 * 256)]},
        {"fs.read": ["/" + "é" * (NAME_MAX // 2)]},
    ],
)
def test_validate_accepts(obj: Any) -> None:
    out = validate_lease_request(obj)
    assert out == (obj or {})
    if obj:
        for cap in obj:
            assert out[cap] is not obj[cap]  # copied


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ([], "must be an object"),
        ("fs.read", "must be an object"),
        ({"fs.read": "/workspace/**"}, "'fs.read'"),
        ({"fs.read": None}, "'fs.read'"),
        ({"fs.read": {"a": 1}}, "'fs.read'"),
        ({"fs.read": [1]}, "'fs.read'"),
        ({"fs.read": ["/ok", None]}, "'fs.read'"),
        ({"fs.read": [["/nested"]]}, "'fs.read'"),
        ({"fs.delete": ["/x"]}, "'fs.delete'"),
        ({"FS.READ": ["/x"]}, "'FS.READ'"),
        ({"x-vendor.acme": ["/x"]}, "'x-vendor.acme'"),
        ({"x-vendor..x": ["/x"]}, "'x-vendor..x'"),
        ({"": ["/x"]}, "''"),
        ({"cost.budget": ["USD:-1"]}, "'USD:-1'"),
        ({"cost.budget": ["USD:abc"]}, "'USD:abc'"),
        ({"cost.budget": ["$:5"]}, "'$:5'"),
        ({"cost.budget": ["USD"]}, "'USD'"),
        ({"cost.budget": ["USD:"]}, "'USD:'"),
        ({"cost.budget": [":5"]}, "':5'"),
        ({"cost.budget": ["Usd:5"]}, "'Usd:5'"),
        ({"cost.budget": ["USD:1e3"]}, "'USD:1e3'"),
        ({"cost.budget": ["USD:+5"]}, "'USD:+5'"),
        ({"cost.budget": ["USD:.5"]}, "'USD:.5'"),
        ({"cost.budget": ["USD:5."]}, "'USD:5.'"),
        ({"cost.budget": ["USD:NaN"]}, "'USD:NaN'"),
        ({"cost.budget": ["USD: 5"]}, "'USD: 5'"),
        ({"cost.budget": ["ABCDEFGHIJK:1"]}, "'ABCDEFGHIJK:1'"),
        ({"fs.read": ["p"] * (MAX_PATTERNS + 1)}, "'fs.read'"),
        ({"tool.call": ["x" * (MAX_PATTERN_LEN + 1)]}, f"longer than {MAX_PATTERN_LEN} bytes"),
        ({"tool.call": ["é" * (MAX_PATTERN_LEN // 2 + 1)]}, f"longer than {MAX_PATTERN_LEN} bytes"),
        ({"net.fetch": ["https://x/" + "y" * MAX_URL_LEN]}, f"longer than {MAX_URL_LEN} bytes"),
        ({"fs.read": ["/" + "a/" * (PATH_MAX // 2)]}, "PATH_MAX 4096"),
        ({"fs.read": ["/" + "a" * PATH_MAX]}, "PATH_MAX 4096"),
        ({"fs.write": ["/tmp/" + "a" * (NAME_MAX + 1)]}, "(NAME_MAX)"),
        ({"fs.write": ["/tmp/" + "é" * (NAME_MAX // 2 + 1)]}, "(NAME_MAX)"),
        ({"fs.read": ["/tmp/a\0b"]}, "NUL"),
        ({"x-vendor.v." + "c" * MAX_CAPABILITY_LEN: []}, f"longer than {MAX_CAPABILITY_LEN} bytes"),
        ({1: ["/x"]}, "must be strings"),
        ({f"x-vendor.v.c{i}": [] for i in range(MAX_CAPABILITIES + 1)}, "capabilities"),
    ],
)
def test_validate_rejects(obj: Any, needle: str) -> None:
    with pytest.raises(LeaseError) as ei:
        validate_lease_request(obj)
    assert needle in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_bounds_are_the_kernels() -> None:
    """A path of PATH_MAX - 1 bytes with NAME_MAX-byte segments passes; one byte more does not."""
    seg = "s" * NAME_MAX
    path = ("/" + seg) * 15 + "/" + "t" * (PATH_MAX - 1 - 16 * (NAME_MAX + 1) - 1)
    path = path + "u" * (PATH_MAX - 1 - len(path))
    assert len(path.encode()) == PATH_MAX - 1 and bound_error("fs.read", path) is None
    assert "PATH_MAX" in (bound_error("fs.read", path + "u") or "")
    assert bound_error("fs.write", "/" + seg) is None
    assert "NAME_MAX" in (bound_error("fs.write", "/" + seg + "s") or "")
    assert bound_error("tool.call", "t" * MAX_PATTERN_LEN) is None
    assert bound_error("net.fetch", "h" * MAX_URL_LEN) is None


def test_bounds_cost_little_for_huge_input() -> None:
    huge = "/" + "a/" * 300000
    start = time.perf_counter()
    for cap in ("fs.read", "net.fetch", "tool.call"):
        assert bound_error(cap, huge) is not None
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("obj", [{"cost.budget": ["USD:5\n"]}, {"x-vendor.acme.gpu\n": []}])
def test_trailing_newline_rejected(obj: Any) -> None:
    with pytest.raises(LeaseError):
        validate_lease_request(obj)


def test_budget_parsing_and_initial_counters() -> None:
    assert parse_budget_entry("USD:5.25") == ("USD", Decimal("5.25"))
    lease = {"cost.budget": ["USD:5", "USD:0.25", "credits:3"]}
    assert initial_budget(lease) == {"USD": Decimal("5.25"), "credits": Decimal(3)}
    assert initial_budget({}) == {}
