"""worker.runner.left_behind: what a job left in its worker (a reused worker reports it)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
import types
import functools
from collections.abc import Callable

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
