"""What a worker can make the supervisor log: capped, escaped, and unable to forge records."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor.jobs.runner import JobRunner
from supervisor.log_text import BLOCK_INDENT, LOG_TEXT_MAX, block, one_line
from supervisor.jobs.worker_rpc import Fail, WorkerProtocolError

FORGED = "\n2099-01-01 00:00:00,000 WARNING arcp.jobs: job forged\x1b[2J\r\u2028\u202e\ud800"


_REQUEST = SimpleNamespace(limits=SimpleNamespace(max_runtime=60), max_runtime_sec=None, expires_at=None)

def _records_are_genuine(text: str) -> None:
    """Every line after the first is indented: none can pass for a record of its own."""
    lines = text.split("\n")
    assert all(line.startswith(BLOCK_INDENT) for line in lines[1:]), lines[:5]
    assert not any(c in text for c in "\r\x1b\u2028\u202e\ud800")


def test_block_keeps_lines_indented_and_escapes_controls() -> None:
    out = block("Traceback (most recent call last):\n  File \"a.py\"\nValueError: no" + FORGED)
    assert out.splitlines()[0] == BLOCK_INDENT + "Traceback (most recent call last):"
    assert BLOCK_INDENT + "2099-01-01 00:00:00,000 WARNING arcp.jobs: job forged\\e[2J\\r\\u2028\\u202e\\ud800" in out
    _records_are_genuine("header\n" + out)


def test_one_line_has_no_line_break() -> None:
    out = one_line("bad frame" + FORGED)
    assert "\n" not in out and "\\n2099-01-01" in out
    _records_are_genuine(out)


@pytest.mark.parametrize("text", ["x" * (4 * 1024 * 1024), "\x00" * (4 * 1024 * 1024),
                                  ("line\n" + FORGED) * 100_000])
def test_huge_text_is_capped_and_marked(text: str) -> None:
    for out in (block(text), "x" + block(text).replace("\n" + BLOCK_INDENT, "")):
        assert len(out) < LOG_TEXT_MAX + 1024
    out = block(text)
    assert f"truncated: {len(text):,} characters in all" in out
    _records_are_genuine("header\n" + out)
    flat = one_line(text)
    assert len(flat) < LOG_TEXT_MAX + 256 and "\n" not in flat and "truncated" in flat


# -- the runner's own log lines about a worker ------------------------------------------------------

async def _release(*args: Any) -> None:
    pass


class _Runtime:
    def __init__(self) -> None:
        self.frame_cap = 1024 * 1024
        self.store = _Store()
        self.config = SimpleNamespace(max_result_bytes=1 << 20, chunk_size=1 << 16)
        self.pool = SimpleNamespace(release=_release)
        self.finished: list[tuple[str, Any]] = []

    def reuse_key(self, job: Any) -> tuple[()]:
        return ()

    def finish(self, job: Any, status: str, err: Any, **kw: Any) -> None:
        self.finished.append((status, err))


class _Worker:
    pid = 4242
    cgroup = None
    alive = False

    async def kill(self, wait: float) -> None:
        pass


def _runner() -> tuple[JobRunner, _Runtime]:
    rt = _Runtime()
    job = SimpleNamespace(id="job_1", request=_REQUEST,
                          owner=SimpleNamespace())
    runner = JobRunner(rt, job)  # type: ignore[arg-type]
    runner.workers = SimpleNamespace(pool=rt.pool)  # type: ignore[assignment]  # as if it had a worker
    return runner, rt


def test_a_forged_traceback_is_logged_capped(caplog: pytest.LogCaptureFixture) -> None:
    runner, rt = _runner()
    tb = "Traceback (most recent call last):\n" + "x" * (4 * 1000 * 1000) + FORGED * 100
    with caplog.at_level(logging.WARNING, logger="arcp.jobs"):
        asyncio.run(runner._ended(_Worker(), Fail({"code": "INTERNAL_ERROR", "message": "m"}, tb)))  # type: ignore[arg-type]
    (rec,) = [r for r in caplog.records if "agent raised" in r.getMessage()]
    text = rec.getMessage()
    assert len(text) < LOG_TEXT_MAX + 1024
    assert "truncated" in text and "job forged\\e[2J" in text
    _records_are_genuine(text)
    assert rt.finished == [("error", {"code": "INTERNAL_ERROR", "message": "m"})]


def test_an_invalid_frame_is_logged_on_one_capped_line(caplog: pytest.LogCaptureFixture) -> None:
    runner, _ = _runner()
    err = WorkerProtocolError("malformed: " + "y" * 100_000 + FORGED)
    with caplog.at_level(logging.ERROR, logger="arcp.jobs"):
        asyncio.run(runner._ended(_Worker(), err))  # type: ignore[arg-type]
    (rec,) = [r for r in caplog.records if "invalid frame" in r.getMessage()]
    text = rec.getMessage()
    assert "\n" not in text and len(text) < 2048
    _records_are_genuine(text)


class _Store:
    """The state store's back-pressure, never holding."""

    async def writable(self) -> None:
        return None
