"""Run jobs in this worker process: import the agent, call it, report the outcome.

The agent runs in the main thread, so a cancel can reach it between any two
bytecodes: the pipe thread marks the context cancelled, fails its pending
calls, cancels an async agent's task, and interrupts a sync agent with
SIGUSR1, whose handler raises Cancelled in the agent's own frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from typing import Any

from worker import import_path, json_value

from shared import pipe_messages as pm
from shared.errors import ARCPError, Cancelled, InternalError
from shared.pipe_codec import encode
from worker.agent_loader import find_source, load_module
from worker.context import JobContext
from worker.import_refusals import install as name_import_refusals
from worker.rpc_client import Channel
from worker.sandbox import Sandbox, read_dirs_for
from worker.stdio_capture import StdioCapture

CANCEL_SIGNAL = signal.SIGUSR1
ASYNC_INTERRUPT_DELAY = 0.25  # seconds an async agent gets to honour task.cancel()
INTERRUPT_RETRY = 0.02  # seconds before the interrupt is tried again where it landed badly


def reaches_the_agent(frame: Any) -> bool:
    """Whether an exception raised in `frame` (where a signal interrupted the main thread)
    ends up in the agent's task or out of the event loop, rather than in asyncio's handling
    of a callback's error, which logs and drops it (and, in the callback that stops
    run_until_complete, leaves the loop running). It does when a coroutine frame lies
    between `frame` and the first callback runner (`Handle._run`) above it, or when there is
    no callback runner at all (the loop waiting in select(), or no loop)."""
    f = frame
    while f is not None:
        code = f.f_code
        if code.co_flags & inspect.CO_COROUTINE:
            return True  # the task's step takes it
        if code.co_name == "_run" and code.co_filename == _EVENTS_FILE:
            return False  # Handle._run: a callback's error, swallowed
        f = f.f_back
    return True


_EVENTS_FILE = asyncio.events.__file__


PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def load_entry(entry: str) -> Callable[..., Any]:
    module_name, _, func_name = entry.partition(":")
    module = load_module(module_name)
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise InternalError(f"agent entry {entry!r} is not a callable")
    return fn  # type: ignore[no-any-return]


class _Checked(Exception):
    """The agent's module imported in the sandbox and its function exists."""


class Runner:
    """One worker's job loop."""

    def __init__(self, channel: Channel, reuse: int) -> None:
        self.ch = channel
        self.reuse = max(1, reuse)
        self.loop = asyncio.new_event_loop()
        self.ctx: JobContext | None = None
        self.task: asyncio.Task[Any] | None = None
        self.in_agent = False
        self.is_async = False
        self._main_ident = threading.get_ident()
        self.sandbox = Sandbox()
        self.jobs_done = 0
        self.jobs_taken = 0  # the number of the job run() runs (Channel.jobs_received counts the same jobs)
        self.left: list[str] = []  # what the last job left behind (pipe_messages.LEFT_KINDS)
        self.limits: dict[str, int] = {}
        # sys.modules as the last job found it once its agent was loaded, when that job left
        # nothing: the next job's baseline, copied again only if sys.modules changed since
        self._modules: dict[str, Any] | None = None
        self._env: tuple[Any, Any, dict[bytes, bytes]] | None = None  # the environment the last job was given
        self._is_async: dict[Any, bool] = {}  # agent callable -> a coroutine function?
        self.capture = StdioCapture(self._emit_output)
        for fd in self.capture.levels:
            channel.extra[fd] = self.capture.on_readable
        channel.on_cancel = self._on_cancel
        signal.signal(CANCEL_SIGNAL, self._on_signal)

    # -- output and cancel, called from other threads -------------------------
    def _emit_output(self, level: str, line: str) -> None:
        ctx = self.ctx
        if ctx is not None and not ctx.cancelled:
            self.ch.send([pm.EV, ctx.job_id, "log", [level, line, None]])

    def _on_cancel(self, reason: str) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        ctx._mark_cancelled()
        if not self.in_agent:
            return
        if self.is_async and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
            threading.Timer(ASYNC_INTERRUPT_DELAY, self._interrupt).start()
        else:
            self._interrupt()

    def _interrupt(self) -> None:
        if self.in_agent:
            signal.pthread_kill(self._main_ident, CANCEL_SIGNAL)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.in_agent and self.ctx is not None and self.ctx.cancelled:
            if self.is_async and not reaches_the_agent(frame):  # asyncio would swallow it there, and
                threading.Timer(INTERRUPT_RETRY, self._interrupt).start()  # its loop might never stop
                return
            self.in_agent = False  # one interrupt per job
            raise Cancelled("job cancelled")

    # -- the loop ---------------------------------------------------------
    def warm_up(self) -> None:
        """Exercise the job paths once before a job arrives.

        A forked worker shares the fork server's memory copy-on-write; the first
        touch of each page costs a fault and a copy. Running the event loop, the
        JSON codec and the pipe codec once here moves those faults off the job's
        critical path. No agent code runs.
        """
        async def nothing() -> None:
            return None

        self.loop.run_until_complete(self.loop.create_task(nothing()))
        value = json_value.loads(json_value.dumps({"warm": [1, 2.5, "x", None]}))
        encode([pm.DONE, "job_warm", value], pm.MAX_PIPE_FRAME)
        self._error_of(InternalError("warm"), JobContext(self.ch, {
            "job_id": "job_warm", "session_id": "", "trace_id": "", "agent": ""}))
        inspect.iscoroutinefunction(self.warm_up)
        self._flush_output()

    def serve(self) -> None:
        self.run(self.ch.first_job())
        for _ in range(self.reuse - 1):
            if self.left or not self.ch.started:  # retired by the supervisor, or no sandbox: no other job
                return
            self.run(self.ch.jobs.get())

    def run(self, spec: dict[str, Any]) -> None:
        ctx = JobContext(self.ch, spec)
        with self.ch.cancel_lock:  # a CANCEL read before now is this job's: it is not lost
            self.ctx = ctx
            self.jobs_taken += 1
            if self.ch.cancelled_job == self.jobs_taken:
                ctx._mark_cancelled()  # the agent's first call raises Cancelled, or its end does
        self.limits = dict(spec.get("limits") or {})
        if spec.get("tmp_size"):
            self.limits["tmp_size_mb"] = max(1, int(spec["tmp_size"]) >> 20)
        outcome: list[Any]
        threads = threading.active_count()
        modules = self._modules if self._modules is not None else dict(sys.modules)
        try:
            self._enter_sandbox(spec)
            # Only now the pipe's reader thread: made inside the sandbox, it is as confined as
            # the agent (a thread from before would hold neither Landlock nor the filters).
            self.ch.start()
            threads = threading.active_count()  # (the reader counts as the worker's own from here)
            import_path.enter()  # the job's import path, only now that nothing can leave the sandbox
            name_import_refusals()  # an import the sandbox refuses says so (worker/import_refusals.py)
            fn = load_entry(spec["entry"])
            # The agent's own imports: the same for every job of this worker (no copy when none
            # came). A count is enough here: an import adds entries, and a change it hides (one
            # added, one removed) is still a change at the job's end, which retires the worker.
            modules = modules if len(sys.modules) == len(modules) else dict(sys.modules)
            if spec.get("check"):  # the start-up check: the import and the function, not a call
                raise _Checked()
            value = self._call_agent(fn, spec.get("input"), ctx)
            if ctx.cancelled:
                raise Cancelled("job cancelled")
            ctx._close_stream()
            outcome = [pm.DONE, ctx.job_id, self._result_value(value, ctx)]
        except _Checked:
            outcome = [pm.DONE, ctx.job_id, None]
        except BaseException as e:  # everything the agent raises ends its job
            outcome = [pm.FAIL, ctx.job_id, self._error_of(e, ctx)]
        finally:
            self.in_agent = False
        self._flush_output()
        self.left = left_behind(threads, modules)
        self._modules = None if self.left else modules
        self.ch.send_now([*outcome, self.left])
        self.ctx = None
        self.jobs_done += 1

    def _enter_sandbox(self, spec: dict[str, Any]) -> None:
        tmp = spec.get("tmp_dir")
        port = spec.get("egress_port")
        env, now = self._env, getattr(os.environ, "_data", None)  # (CPython's encoded copy, what putenv was given)
        # A kept worker's next job mostly has the same temp dir and proxy port: the variables
        # are written again only if those changed or the environment changed since they were.
        if env is None or env[:2] != (tmp, port) or now is None or now != env[2]:
            if tmp:
                os.environ["HOME"] = os.environ["TMPDIR"] = tmp
                tempfile.tempdir = None  # recomputed from TMPDIR on next use
            for name in PROXY_VARS:
                if port:
                    os.environ[name] = os.environ[name.lower()] = f"http://127.0.0.1:{int(port)}"
                else:
                    os.environ.pop(name, None)
                    os.environ.pop(name.lower(), None)
            if port:  # nothing bypasses the proxy
                os.environ["NO_PROXY"] = os.environ["no_proxy"] = ""
            self._env = None if now is None else (tmp, port, dict(now))
        elif tmp and tempfile.tempdir not in (None, tmp):
            tempfile.tempdir = None  # the last job pointed tempfile elsewhere
        try:
            read_dirs = [] if self.sandbox.landlocked else \
                read_dirs_for(spec["entry"].partition(":")[0], agent_dirs)
            self.sandbox.apply(spec, read_dirs, self.reuse - self.jobs_done)
        except OSError as e:
            raise InternalError(f"sandbox set-up failed: {e}", retryable=False) from e

    def _call_agent(self, fn: Callable[..., Any], input: Any, ctx: JobContext) -> Any:
        try:
            is_async = self._is_async.get(fn)
        except TypeError:  # an unhashable callable
            is_async = None
        if is_async is None:
            is_async = inspect.iscoroutinefunction(fn)
            with contextlib.suppress(TypeError):
                self._is_async[fn] = is_async
        self.is_async = is_async
        self.in_agent = True
        try:
            if ctx.cancelled:  # before the agent's call (its import, the sandbox, or before the job was taken):
                raise Cancelled("job cancelled")  # a cancel that came then did not interrupt it
            if self.is_async:
                return self._run_coroutine(fn(input, ctx))
            value = fn(input, ctx)
            if inspect.isawaitable(value):
                self.is_async = True
                return self._run_coroutine(value)
            return value
        finally:
            self.in_agent = False

    def _run_coroutine(self, coro: Any) -> Any:
        self.task = self.loop.create_task(coro)
        try:
            return self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            raise Cancelled("job cancelled") from None
        finally:
            self.task = None

    def _flush_output(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self.capture.drain()

    def _result_value(self, value: Any, ctx: JobContext) -> Any:
        if ctx.streamed:
            if value is not None:
                print(f"arcp worker: job {ctx.job_id} streamed a result and also returned a value; "
                      "the value is dropped", file=sys.__stderr__)
            return None
        try:
            raw = json_value.dumps(value)
        except TypeError as e:
            raise InternalError(f"the agent's return value is not JSON-serialisable: {e}") from e
        limit = ctx._max_event
        if len(raw) > limit:
            raise InternalError(
                f"inline result of {len(raw)} bytes does not fit one frame (limit {limit} bytes); "
                "use job.stream_result for large results"
            )
        return json_value.loads(raw)

    def _error_of(self, exc: BaseException, ctx: JobContext) -> dict[str, Any]:
        hit = limit_hit(exc, self.limits)
        if hit is not None and not isinstance(exc, ARCPError):
            text, key, value = hit
            err = InternalError(f"{text}: {type(exc).__name__}: {exc}", retryable=False,
                                details={"limit": key, "value": value}).to_wire()
        elif isinstance(exc, ARCPError):
            err = exc.to_wire()
        elif isinstance(exc, asyncio.CancelledError) or (ctx.cancelled and isinstance(exc, Cancelled)):
            err = Cancelled("job cancelled").to_wire()
        else:
            err = InternalError(f"{type(exc).__name__}: {exc}").to_wire()
            err["traceback"] = "".join(traceback.format_exception(exc))[-8000:]
        if err.get("details") is not None:
            try:
                err["details"] = json_value.loads(json_value.dumps(err["details"]))
            except TypeError:
                err["details"] = {"unserialisable": repr(err["details"])[:200]}
        return err


def left_behind(threads: int, modules: dict[str, Any]) -> list[str]:
    """What a job left in this process that the next job must not meet: more threads than
    at its start, a child process still running (exited ones are reaped here), or a changed
    sys.modules since its agent was loaded: an entry removed or replaced, or a module added
    from outside the standard library (the standard library imports some of its own lazily,
    the idna codec at a first getaddrinfo for one). Cheap: a count, one waitpid, and one
    comparison of sys.modules with `modules` in C (entries compared by identity first, and a
    module equals only itself), a pass over it only when they differ."""
    left = []
    if threading.active_count() > threads:
        left.append(pm.LEFT_THREAD)
    try:
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass
        left.append(pm.LEFT_CHILD)  # waitpid answered 0: a child still runs
    except ChildProcessError:
        pass  # no child left
    if _unchanged(modules):
        return left
    now = dict(sys.modules)
    if any(now.get(name) is not mod for name, mod in modules.items()) or (len(now) > len(modules) and any(
            name not in modules and name.partition(".")[0] not in sys.stdlib_module_names for name in now)):
        left.append(pm.LEFT_MODULES)
    return left


def _unchanged(modules: dict[str, Any]) -> bool:
    """Does sys.modules hold the same entries as `modules`? One dict comparison in C: each
    value is compared by identity first, and a module equals only itself. (An object whose
    == lies could pass for the module it replaced; code that runs in this process could as
    well change this function: the check keeps honest agents' jobs apart, the kernel's
    counts in the supervisor do the rest.) False when a comparison raises."""
    try:
        return sys.modules == modules
    except Exception:
        return False


_LIMIT_ERRNOS = {
    errno.EMFILE: ("max_open_files", "open files limit {} reached"),
    errno.EFBIG: ("max_file_size_mb", "file size limit {} MiB exceeded"),
    errno.EAGAIN: ("max_procs", "process limit {} reached"),
    errno.ENOSPC: ("tmp_size_mb", "temp dir limit {} MiB reached"),
}


def limit_hit(exc: BaseException, limits: dict[str, int]) -> tuple[str, str, int] | None:
    """(message, limit key, value) when `exc`, or what caused it, is a refusal by a job limit."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _LIMIT_ERRNOS:
            key, text = _LIMIT_ERRNOS[e.errno]
            if key in limits and (e.errno != errno.EAGAIN or isinstance(e, BlockingIOError)):
                return text.format(limits[key]), key, int(limits[key])
        e = e.__cause__ or e.__context__
    return None


def agent_dirs(module: str) -> list[str]:
    """The directory of the agent's module (its package root for a dotted name)."""
    found = find_source(module.split(".")[0])
    if found is None:
        return []
    path, is_pkg = found
    return [os.path.dirname(os.path.dirname(path)) if is_pkg else os.path.dirname(path)]


def worker_main(sock_fd: int, reuse: int) -> None:
    """Entry point of a forked worker: serve jobs on the pipe, then exit."""
    import socket

    sock = socket.socket(fileno=sock_fd)
    channel = Channel(sock)
    runner = Runner(channel, reuse)
    runner.warm_up()
    runner.serve()  # (the pipe's reader thread starts inside the first job's sandbox)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)
