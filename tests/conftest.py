"""Fixtures: a real arcp-supervisor process on 127.0.0.1:0, killed by process group."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent_envs import AgentEnvError, extra_package_venv, httpx_venv
from tests.agents import REGISTRY
from tests.host_agents import REGISTRY as HOST_AGENTS
from tests.usage_agents import REGISTRY as USAGE_AGENTS

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).with_name("arcp-supervisor")
READY = re.compile(r"^arcp-supervisor listening on (ws://127\.0\.0\.1:\d+/\S*)$")


def agent_flags() -> list[str]:
    flags = []
    for a in REGISTRY + HOST_AGENTS + USAGE_AGENTS:
        flags += ["--agent", a]
    return flags + ["--default", "echo@1.0.0"]


class Server:
    """`arcp-supervisor run --port 0` with the test agents; `stop()` kills its process group."""

    def __init__(self, *extra: str) -> None:
        self.argv = [str(EXE), "run", "--port", "0", *agent_flags(), *extra]
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.url = ""
        self.stderr_closed = False
        self.stderr_lines: list[str] = []
        self._stderr_changed = threading.Condition()
        ready = threading.Event()

        def read_stdout() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                m = READY.match(raw.decode().strip())
                if m and not self.url:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        def read_stderr() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                with self._stderr_changed:
                    self.stderr_lines.append(raw.decode(errors="replace"))
                    self._stderr_changed.notify_all()
            with self._stderr_changed:
                self.stderr_closed = True
                self._stderr_changed.notify_all()

        threading.Thread(target=read_stdout, daemon=True).start()
        threading.Thread(target=read_stderr, daemon=True).start()
        if not ready.wait(30) or not self.url:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.stderr_lines[-30:]))

    def wait_stderr(self, pred: Callable[[str], bool] | str, timeout: float = 15.0, start: int = 0) -> str:
        """The first stderr line from index `start` on that `pred` accepts (or that contains
        `pred`, a string), waiting for the server to write it."""
        def matches(line: str) -> bool:
            return pred in line if isinstance(pred, str) else pred(line)

        deadline = time.monotonic() + timeout
        i = start
        with self._stderr_changed:
            while True:
                while i < len(self.stderr_lines):
                    if matches(self.stderr_lines[i]):
                        return self.stderr_lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.stderr_closed:
                    raise AssertionError(f"no such line ({pred!r}) within {timeout} s on the server's stderr "
                                         f"({'it ended' if self.stderr_closed else 'still open'}):\n"
                                         + "".join(self.stderr_lines[-30:]))
                self._stderr_changed.wait(left)

    async def wait_stderr_async(self, pred: Callable[[str], bool] | str, timeout: float = 15.0,
                                start: int = 0) -> str:
        return await asyncio.to_thread(self.wait_stderr, pred, timeout, start)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM (a drain), again if jobs still run (they are cancelled at once), then SIGKILL."""
        for wait in (1, 5):
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)


def is_fork_server(cmdline: list[str]) -> bool:
    """A fork server's command line: `python -I [-S] RUNTIME/worker/__main__.py ...`."""
    return any(a.endswith("/worker/__main__.py") for a in cmdline[:4])


def fork_server_pids(server_pid: int) -> list[int]:
    """The fork servers (one per agent environment) of the supervisor `server_pid`."""
    import psutil

    return [p.pid for p in psutil.Process(server_pid).children() if is_fork_server(p.cmdline())]


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


@pytest.fixture()
def make_server() -> Iterator[type[Server]]:
    started: list[Server] = []

    class Tracked(Server):
        def __init__(self, *extra: str) -> None:
            super().__init__(*extra)
            started.append(self)

    yield Tracked
    for s in started:
        s.stop()


def _agent_venv(build: Callable[[], str]) -> str:
    try:
        return build()
    except AgentEnvError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def httpx_python() -> str:
    """`bin/python` of a venv with httpx (and its dependencies) only, for agents that import it."""
    return _agent_venv(httpx_venv)


@pytest.fixture(scope="session")
def extra_package_python() -> str:
    """`bin/python` of a venv with a module `arcp_extra_pkg` (`VALUE = EXTRA_PKG_VALUE`) that the
    supervisor's own venv does not have."""
    return _agent_venv(extra_package_venv)
