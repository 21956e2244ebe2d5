"""Starting a server a benchmark runs (in a process group of its own, up to its readiness
line) and ending it: SIGTERM to its process group, then SIGKILL (bounded)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

READY = re.compile(r"arcp-supervisor listening on (ws://\S+)")


def started_server(argv: list[str], cwd: Path, timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """The server of `argv` (stdout read up to its readiness line, stderr dropped) and its URL;
    RuntimeError, with the server ended, if no readiness line comes within `timeout`."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        m = READY.search(line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    stop_process_group(proc, 3)
    raise RuntimeError(f"the server did not start: {argv}")


def stop_process_group(proc: subprocess.Popen[bytes], wait: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
