"""worker.runner.left_behind: what a job left in its worker (a reused worker reports it)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import functools
from collections.abc import Callable
from typing import Any

import pytest

from shared import pipe_messages as pm
from worker.runner import left_behind


def baseline() -> tuple[int, dict[str, types.ModuleType]]:
    return threading.active_count(), dict(sys.modules)


def in_a_fresh_process(test: Callable[[], None]) -> Callable[[], None]:
    """Run the test in a forked copy of pytest's process, as a worker is: without the
    children and threads that other tests' servers leave in pytest's process, which
    left_behind would rightly count."""
    @functools.wraps(test)
    def run() -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                test()
            except BaseException:
                os.write(w, traceback.format_exc().encode()[-4000:])
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = f.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, out
    return run


def in_a_fresh_process_with_args(test: Callable[..., None]) -> Callable[..., None]:
    """`in_a_fresh_process` for a parametrized test."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        in_a_fresh_process(lambda: test(*args, **kwargs))()
    return run


@in_a_fresh_process
def test_nothing_left() -> None:
    threads, modules = baseline()
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: left_behind reaps it
    assert left_behind(threads, modules) == []
    assert not os.path.exists(f"/proc/{pid}")


@in_a_fresh_process
def test_a_thread_a_child_and_a_module() -> None:
    threads, modules = baseline()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    sys.modules["arcp_test_left_module"] = types.ModuleType("arcp_test_left_module")
    try:
        assert left_behind(threads, modules) == [pm.LEFT_THREAD, pm.LEFT_CHILD, pm.LEFT_MODULES]
    finally:
        stop.set()
        t.join()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        del sys.modules["arcp_test_left_module"]


@in_a_fresh_process
def test_replaced_and_removed_modules_count_lazy_standard_library_imports_do_not() -> None:
    threads, modules = baseline()
    json = sys.modules["json"]
    saved = sys.modules.pop("colorsys", None)
    try:
        _, modules = baseline()
        import colorsys  # noqa: F401  (a standard library module, loaded now)
        assert left_behind(threads, modules) == []
        _, modules = baseline()
        sys.modules["json"] = types.ModuleType("json")
        assert left_behind(threads, modules) == [pm.LEFT_MODULES]
        sys.modules["json"] = json
        del sys.modules["colorsys"]
        assert left_behind(threads, modules) == [pm.LEFT_MODULES]
    finally:
        sys.modules["json"] = json
        if saved is not None:
            sys.modules["colorsys"] = saved


# -- a kept worker's job loop (worker.runner.Runner) -----------------------------------------

class _Channel:
    def __init__(self) -> None:
        self.extra: dict[int, Any] = {}
        self.on_cancel: Any = None
        self.outcomes: list[list[Any]] = []
        self.cancel_lock = threading.Lock()  # (worker/rpc_client.py Channel: no cancel comes here)
        self.jobs_received = 0
        self.cancelled_job = -1

    started = True  # (a kept worker's reader thread: started in its first job's sandbox)

    def start(self) -> None:
        pass

    def send_now(self, msg: list[Any]) -> None:
        self.outcomes.append(msg)

    def send(self, msg: list[Any]) -> None:
        pass


class _Capture:
    levels: dict[int, str] = {}

    def __init__(self, emit: Any) -> None:
        pass

    def drain(self) -> None:
        pass


class _Sandbox:
    landlocked = True  # a kept worker's: only the rlimits would be applied again

    def apply(self, spec: dict[str, Any], read_dirs: list[str], jobs_left: int = 1) -> None:
        pass


_DOINGS: list[Callable[[], Any]] = []  # what the next job's agent does


def agent(input: Any, ctx: Any) -> Any:
    return _DOINGS.pop(0)() if _DOINGS else None


async def async_agent(input: Any, ctx: Any) -> Any:
    return "async"


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return False

    def __call__(self, input: Any, ctx: Any) -> Any:
        return "unhashable"


unhashable_agent = _Unhashable()


def _runner() -> tuple[Any, _Channel]:
    """A worker's Runner on a fake pipe, without the output capture and the sandbox (in a
    forked copy of pytest's process: what it changes there goes with it)."""
    import worker.runner as wr
    wr.StdioCapture = _Capture  # type: ignore[misc, assignment]
    wr.Sandbox = _Sandbox  # type: ignore[misc, assignment]
    ch = _Channel()
    return wr.Runner(ch, reuse=100), ch  # type: ignore[arg-type]


def _job(runner: Any, ch: _Channel, entry: str = "agent", doing: Callable[[], Any] | None = None,
         tmp: str | None = "/tmp/job-a", port: int | None = None) -> tuple[Any, list[str]]:
    """One job on the runner: (its outcome's value or error, what it left)."""
    if doing is not None:
        _DOINGS.append(doing)
    runner.run({"job_id": f"job_{len(ch.outcomes)}", "session_id": "s", "trace_id": "0" * 32, "agent": "a",
                "entry": f"{__name__}:{entry}", "input": None, "tmp_dir": tmp, "egress_port": port})
    kind, _, value, left = ch.outcomes[-1]
    assert kind in (pm.DONE, pm.FAIL)
    return value, left


@in_a_fresh_process
def test_a_kept_worker_compares_sys_modules_with_its_last_clean_jobs_and_copies_only_on_a_change() -> None:
    runner, ch = _runner()
    assert _job(runner, ch) == (None, [])
    snapshot = runner._modules
    assert snapshot is not None and snapshot is not sys.modules
    for _ in range(3):  # clean jobs: the same snapshot, no copy
        assert _job(runner, ch) == (None, [])
        assert runner._modules is snapshot
    saved = sys.modules.pop("colorsys", None)
    assert _job(runner, ch, doing=lambda: __import__("colorsys") and None) == (None, [])  # a lazy stdlib import
    assert _job(runner, ch) == (None, [])
    assert runner._modules is not snapshot and "colorsys" in runner._modules  # copied once, then kept
    snapshot = runner._modules
    assert _job(runner, ch) == (None, []) and runner._modules is snapshot
    if saved is not None:
        sys.modules["colorsys"] = saved


@pytest.mark.parametrize("change", ["added", "replaced", "removed", "replaced by a liar that raises"])
@in_a_fresh_process_with_args
def test_a_kept_workers_job_that_changes_sys_modules_is_still_seen(change: str) -> None:
    class Raises:
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("no comparing me")

    doings: dict[str, Callable[[], Any]] = {
        "added": lambda: sys.modules.__setitem__("arcp_test_added", types.ModuleType("arcp_test_added")),
        "replaced": lambda: sys.modules.__setitem__("json", types.ModuleType("json")),
        "removed": lambda: sys.modules.pop("json"),
        "replaced by a liar that raises": lambda: sys.modules.__setitem__("json", Raises()),  # type: ignore[assignment]
    }
    runner, ch = _runner()
    assert _job(runner, ch) == (None, [])
    assert _job(runner, ch) == (None, [])  # kept: its snapshot is the last job's
    _, left = _job(runner, ch, doing=doings[change])
    assert left == [pm.LEFT_MODULES] and runner._modules is None


@in_a_fresh_process
def test_a_kept_workers_environment_is_written_again_only_when_it_differs() -> None:
    runner, ch = _runner()
    proxies = [v for n in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY") for v in (n, n.lower())]

    def seen() -> dict[str, Any]:
        return {"HOME": os.environ.get("HOME"), "TMPDIR": os.environ.get("TMPDIR"),
                "proxies": sorted({str(os.environ.get(v)) for v in proxies}), "NO_PROXY": os.environ.get("NO_PROXY"),
                "tempdir": tempfile.tempdir}

    def meddle() -> None:
        os.environ["HOME"] = "/elsewhere"
        os.environ["HTTP_PROXY"] = "http://evil:1"
        tempfile.tempdir = "/elsewhere"

    a = {"HOME": "/tmp/job-a", "TMPDIR": "/tmp/job-a", "proxies": ["None"], "NO_PROXY": None, "tempdir": None}
    assert _job(runner, ch, doing=seen)[0] == a
    writes: list[str] = []
    real_setitem = type(os.environ).__setitem__

    def counted(self: Any, key: str, value: str) -> None:
        writes.append(key)
        real_setitem(self, key, value)

    type(os.environ).__setitem__ = counted  # type: ignore[method-assign]
    assert _job(runner, ch, doing=seen)[0] == a and writes == []  # the same dir and port: nothing written
    assert _job(runner, ch, doing=meddle) == (None, [])
    assert _job(runner, ch, doing=seen)[0] == a and "HOME" in writes  # what the last job changed is undone
    writes.clear()
    proxy = "http://127.0.0.1:5555"
    assert _job(runner, ch, doing=seen, port=5555)[0] == dict(a, proxies=[proxy], NO_PROXY="")
    assert _job(runner, ch, doing=seen, port=5555, tmp="/tmp/job-b")[0] == dict(
        a, HOME="/tmp/job-b", TMPDIR="/tmp/job-b", proxies=[proxy], NO_PROXY="")
    assert _job(runner, ch, doing=seen, tmp="/tmp/job-b")[0] == dict(a, HOME="/tmp/job-b", TMPDIR="/tmp/job-b",
                                                                      NO_PROXY="")
    tempfile.tempdir = "/tmp/job-b"  # as tempfile.gettempdir() leaves it: kept
    writes.clear()
    assert _job(runner, ch, doing=seen, tmp="/tmp/job-b")[0]["tempdir"] == "/tmp/job-b" and writes == []


@in_a_fresh_process
def test_sync_async_and_unhashable_agents_on_one_worker() -> None:
    runner, ch = _runner()
    for _ in range(2):
        assert _job(runner, ch, entry="agent", doing=lambda: "sync") == ("sync", [])
        assert runner.is_async is False
        assert _job(runner, ch, entry="async_agent") == ("async", [])
        assert runner.is_async is True
        assert _job(runner, ch, entry="unhashable_agent") == ("unhashable", [])
        assert runner.is_async is False
