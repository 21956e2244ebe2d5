"""shared/messages.py: agent reference grammar."""

from __future__ import annotations

import pytest

from shared.messages import MAX_AGENT_REF, split_agent_ref


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("echo", ("echo", None)),
        ("echo@1.0.0", ("echo", "1.0.0")),
        ("my-agent_2.x", ("my-agent_2.x", None)),
        ("0agent", ("0agent", None)),
        ("Summarizer@v2", ("Summarizer", "v2")),
        ("a@1.0.0+build.5", ("a", "1.0.0+build.5")),
        ("a@-rc", ("a", "-rc")),
        ("a@latest", ("a", "latest")),
    ],
)
def test_valid_refs(ref: str, expected: tuple[str, str | None]) -> None:
    assert split_agent_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["bad name!", "-leading-dash", "echo@", "@1.0.0", "ec ho", "echo@1.0.0@2", "", ".x", "echo@1 0",
            "échо", "a" * (MAX_AGENT_REF + 1)],
)
def test_invalid_refs(ref: str) -> None:
    with pytest.raises(ValueError):
        split_agent_ref(ref)


def test_error_names_the_part() -> None:
    with pytest.raises(ValueError, match="version"):
        split_agent_ref("echo@")
    with pytest.raises(ValueError, match="name"):
        split_agent_ref("@1.0.0")


@pytest.mark.parametrize("ref", ["echo\n", "echo@1.0.0\n"])
def test_trailing_newline_rejected(ref: str) -> None:
    with pytest.raises(ValueError):
        split_agent_ref(ref)
