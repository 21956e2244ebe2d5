"""Following a job: the `submit` and `watch` subcommands of the shell client, their
arguments, and the follow of a job to its terminal (supervisor.shell)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from arcp import ARCPError, TransportClosed, parse_agent_ref
from arcp.client import ARCPClient, JobHandle

from supervisor.shell import INTERRUPTED, JOB_FAILED, OK, UNREACHABLE, USAGE
from supervisor.shell.connection import TERMINAL_TYPES, ShellExit, Tap, close_session, error_text, open_session
from supervisor.shell.interrupts import Interrupts, run
from supervisor.shell.jobs import CANCEL_WAIT, SHELL_REASON
from supervisor.shell.render import LIMITS_KEY, USAGE_KEY, JobView, Lines, clean, dump_json, is_terminal

_LIMIT_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


# -- arguments ------------------------------------------------------------------------
def parse_input(value: str | None) -> Any:
    """`--input JSON`, `--input @FILE` or `--input -` (stdin); no --input is `{}`."""
    if value is None:
        return {}
    where = "--input"
    if value == "-":
        text = sys.stdin.read()
        where = "--input - (stdin)"
    elif value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ShellExit(USAGE, f"--input {value}: cannot read it: {e}") from None
        where = f"--input {value}"
    else:
        text = value
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ShellExit(USAGE, f"{where}: not valid JSON: {e}") from None


def parse_lease(value: str | None, limits: list[str], max_runtime: int | None) -> dict[str, list[str]]:
    """`--lease` (a JSON object of capability -> list of patterns) with the `--limit`s in
    the limits capability, each `KEY:VALUE` (the later one of the same key wins)."""
    lease: dict[str, list[str]] = {}
    if value is not None:
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as e:
            raise ShellExit(USAGE, f"--lease: not valid JSON: {e}") from None
        if not isinstance(obj, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(p, str) for p in v)
                for k, v in obj.items()):
            raise ShellExit(USAGE, '--lease: expected an object of lists of strings, e.g. '
                                   '{"fs.read": ["/data/**"]}')
        lease = {k: list(v) for k, v in obj.items()}
    if limits:
        asked: dict[str, str] = {}
        for item in lease.get(LIMITS_KEY, []):
            k, _, v = item.partition(":")
            asked[k] = v
        for item in limits:
            k, sep, v = item.partition("=")
            k, v = k.strip(), v.strip()
            if not sep or not _LIMIT_KEY.match(k):
                raise ShellExit(USAGE, f"--limit {item!r}: expected KEY=VALUE, e.g. memory_mb=256")
            if not v.isdigit() or int(v) <= 0:
                raise ShellExit(USAGE, f"--limit {item!r}: the value must be a positive integer")
            asked[k] = str(int(v))
        lease[LIMITS_KEY] = [f"{k}:{v}" for k, v in asked.items()]
    if max_runtime is not None and not 1 <= max_runtime <= 86400:
        raise ShellExit(USAGE, "--max-runtime: must be between 1 and 86400 seconds")
    return lease


@dataclass
class SubmitArgs:
    url: str
    token: str | None
    agent: str
    input: str | None = None
    lease: str | None = None
    limits: list[str] = field(default_factory=list)
    max_runtime: int | None = None
    detach: bool = False
    as_json: bool = False


# -- submit and watch -----------------------------------------------------------------
def submit(args: SubmitArgs) -> int:
    try:
        parse_agent_ref(args.agent)
    except ValueError as e:
        return run(_usage(f"AGENT {args.agent!r}: {e}"))
    try:
        value = parse_input(args.input)
        lease = parse_lease(args.lease, args.limits, args.max_runtime)
    except ShellExit as e:
        return run(_usage(e.message))

    async def go(intr: Interrupts) -> int:
        lines = Lines()
        client, tap = await intr.race(open_session(args.url, args.token))
        frames: asyncio.Queue[dict[str, Any]] | None = None
        if args.as_json:
            frames = asyncio.Queue()
            tap.listeners.append(frames.put_nowait)
        try:
            try:
                handle = await client.submit(agent=args.agent, input=value, lease_request=lease,
                                             max_runtime_sec=args.max_runtime)
            except ARCPError as e:
                raise ShellExit(JOB_FAILED, f"submit refused: {e.code}: {e.message}") from None
            except (TransportClosed, OSError) as e:
                raise ShellExit(UNREACHABLE, f"connection lost before the job was accepted ({e})") from None
            except TimeoutError:
                raise ShellExit(UNREACHABLE, "no job.accepted in time") from None
            except ValueError as e:  # what the client itself refuses to send
                raise ShellExit(USAGE, str(e)) from None
            if args.detach:
                print(handle.job_id, flush=True)
                await close_session(client, handle)
                return OK
            return await follow(client, tap, handle, intr, lines, frames=frames, cancel=True)
        finally:
            await close_session(client)

    return run(go)


def watch(url: str, token: str | None, job_id: str, as_json: bool) -> int:
    async def go(intr: Interrupts) -> int:
        lines = Lines()
        client, tap = await intr.race(open_session(url, token))
        frames: asyncio.Queue[dict[str, Any]] | None = None
        if as_json:
            frames = asyncio.Queue()
            tap.listeners.append(frames.put_nowait)
        try:
            try:
                sub = await intr.race(client.subscribe(job_id, history=True))
            except ARCPError as e:
                raise ShellExit(JOB_FAILED, f"{e.code}: {e.message}") from None
            except (TransportClosed, OSError) as e:
                raise ShellExit(UNREACHABLE, f"connection lost ({e})") from None
            return await follow(client, tap, sub.handle, intr, lines, frames=frames, cancel=False)
        finally:
            await close_session(client)

    return run(go)


def _usage(message: str) -> Callable[[Interrupts], Awaitable[int]]:
    async def go(intr: Interrupts) -> int:
        raise ShellExit(USAGE, message)
    return go


@dataclass
class _Ending:
    """How a job ended, once `ended` is set: its job.result, or what its handle raised."""

    ended: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None  # the job.result payload (JobResultPayload)
    error: Exception | None = None

    async def wait_for(self, handle: JobHandle) -> None:
        try:
            self.result = await handle.done
        except Exception as e:  # the job's job.error (an ARCPError), or the session's end
            self.error = e
        self.ended.set()

    @property
    def final_status(self) -> str | None:
        return getattr(self.result, "final_status", None)


def _chunk_bytes(chunk: dict[str, Any]) -> bytes:
    data = chunk.get("data", "")
    if chunk.get("encoding") == "base64":
        return base64.b64decode(data)
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


async def follow(client: ARCPClient, tap: Tap, handle: JobHandle, intr: Interrupts, lines: Lines, *,
                 frames: asyncio.Queue[dict[str, Any]] | None, cancel: bool) -> int:
    """A job from acceptance (or subscription) to its terminal: events shown as they come,
    the result on stdout, the exit status from how it ended. Ctrl-C cancels it (`cancel`)
    or stops following it."""
    job_id = handle.job_id
    out_tty = is_terminal(sys.stdout)
    view = JobView(lines, bar=frames is None)
    view.start(job_id, handle.agent_ref)
    ending = _Ending()
    stdout = sys.stdout.buffer

    async def show_events() -> None:
        async for ev in handle.events():
            if frames is None:
                view.event(ev)

    async def write_chunks() -> None:
        async for chunk in handle.chunks():
            if frames is None:
                view.stop()  # the bar gives the terminal over to the result's bytes
                stdout.write(_chunk_bytes(chunk))
                stdout.flush()

    async def print_frames() -> None:
        assert frames is not None
        while True:
            f = await frames.get()
            if f.get("job_id") != job_id:
                continue
            sys.stdout.write(dump_json(f) + "\n")
            sys.stdout.flush()
            if f.get("type") in TERMINAL_TYPES:
                return

    interrupted = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ending.wait_for, handle)
            tg.start_soon(show_events)
            tg.start_soon(write_chunks)
            if frames is not None:
                tg.start_soon(print_frames)
            with intr.interruptible():
                await ending.ended.wait()
            if not ending.ended.is_set():
                interrupted = True
                if cancel:
                    view.stop()
                    lines.say(f"cancelling job {job_id} (waiting up to {CANCEL_WAIT:g} s for it to end)", "yellow")
                    try:
                        await client.cancel_job(job_id, reason=f"{SHELL_REASON} (Ctrl-C)")
                    except (TransportClosed, OSError):
                        pass  # the connection is gone: the handle fails, which ends the wait below
                    with anyio.move_on_after(CANCEL_WAIT):
                        await ending.ended.wait()
                else:
                    with anyio.move_on_after(2):
                        try:
                            await client.unsubscribe(job_id)
                        except (TransportClosed, OSError):
                            pass  # the connection is gone, and the subscription with it
            if ending.ended.is_set():
                # Let what was queued before the terminal be shown and written: all of it when
                # the terminal came (the events, chunks and frames end with it), else 2 s of it.
                if not (job_id in tap.terminals and not interrupted):
                    tg.cancel_scope.deadline = anyio.current_time() + 2
            else:
                tg.cancel_scope.cancel()  # not waited for any longer (the client's close fails it)
    finally:
        view.stop(success=ending.final_status == "success")
    terminal = tap.terminals.get(job_id)
    if interrupted:
        if not ending.ended.is_set():
            if cancel:
                lines.say(f"job {job_id} did not end within {CANCEL_WAIT:g} s of the cancel", "red")
            return INTERRUPTED
        if cancel:
            exc = ending.error
            how = (exc.code if isinstance(exc, ARCPError) else error_text(exc) if exc is not None
                   else ending.final_status or "ended")
            lines.say(f"job {job_id} ended: {how}", "yellow")
        return INTERRUPTED
    exc = ending.error
    usage = (terminal or {}).get("payload", {}).get(USAGE_KEY) if terminal else None
    if exc is not None:
        if isinstance(exc, ARCPError):
            view.summary(usage)
            lines.say(f"job {job_id} ended in error: {clean(exc.code, one_line=True)}: {clean(exc.message)}",
                      "red")
            if exc.details:
                lines.say(f"details: {dump_json(exc.details)}", "red")
            return JOB_FAILED
        raise ShellExit(UNREACHABLE, f"{error_text(exc)} before job {job_id} ended")
    result = ending.result
    view.summary(usage)
    if result.final_status != "success":
        lines.say(f"job {job_id} ended: {result.final_status}", "red")
        return JOB_FAILED
    if frames is None and result.result_id is None:
        sys.stdout.write(dump_json(result.result, indent=2 if out_tty else None) + "\n")
        sys.stdout.flush()
    return OK


__all__ = ("SubmitArgs", "follow", "parse_input", "parse_lease", "submit", "watch")
