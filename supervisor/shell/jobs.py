"""The `jobs` and `cancel` subcommands of the shell client, and the listing of jobs that
`top` shares (supervisor.shell)."""

from __future__ import annotations

import sys
from typing import Any

import anyio
from arcp import ARCPError, ListJobsFilter, TransportClosed
from arcp.client import ARCPClient

from supervisor.shell import JOB_FAILED, OK, UNREACHABLE
from supervisor.shell.connection import ShellExit, close_session, open_session
from supervisor.shell.interrupts import Interrupts, run
from supervisor.shell.render import (
    JOBS_STATUS_STYLE, Lines, clean, console_for, dump_json, is_terminal, jobs_rows, plain_table, rich_table,
)

TERMINAL_STATUSES = ("success", "error", "cancelled", "timed_out")
CANCEL_WAIT = 10.0  # seconds a Ctrl-C or `cancel` waits for the job's terminal
MAX_PAGES = 100
SHELL_REASON = "cancelled from the shell"


# -- cancel ---------------------------------------------------------------------------
def cancel(url: str, token: str | None, job_id: str, reason: str | None) -> int:
    async def go(intr: Interrupts) -> int:
        lines = Lines()
        client, tap = await intr.race(open_session(url, token))
        try:
            try:
                await client.cancel_job(job_id, reason=reason or SHELL_REASON)
                # The answer to a cancel is its effect: follow the job to its terminal. A
                # refused cancel (unknown job, ...) is a session.error that fails this too.
                sub = await intr.race(client.subscribe(job_id, history=False))
            except ARCPError as e:
                raise ShellExit(JOB_FAILED, f"{e.code}: {e.message}") from None
            except (TransportClosed, OSError) as e:
                raise ShellExit(UNREACHABLE, f"connection lost ({e})") from None
            for err in tap.errors:
                p = err.get("payload") or {}
                if err.get("job_id") == job_id or p.get("job_id") == job_id:
                    raise ShellExit(JOB_FAILED, f"{p.get('code')}: {p.get('message')}")
            status = tap.subscribed.get(job_id, {}).get("current_status")
            if status not in TERMINAL_STATUSES and not await intr.race(_is_admin(client)):
                # This server ignores, without an answer, the cancel of another session's job
                # (protocol.md §6.6, Python clients): say so rather than wait for nothing.
                await close_session(client, sub.handle)
                raise ShellExit(JOB_FAILED, f"PERMISSION_DENIED: job {job_id} belongs to another session; "
                                            "only an admin may cancel it")
            try:
                with anyio.fail_after(CANCEL_WAIT):
                    result = await intr.race(sub.handle.done)
            except TimeoutError:
                raise ShellExit(JOB_FAILED, f"job {job_id} did not end within {CANCEL_WAIT:g} s of the cancel "
                                            "(only the session that submitted it, or an admin, may cancel "
                                            "it)") from None
            except ARCPError as e:
                if e.code == "CANCELLED":
                    lines.say(f"job {job_id} cancelled")
                else:
                    lines.say(f"job {job_id} had ended: {e.code}: {clean(e.message)}")
                return OK
            except (TransportClosed, OSError) as e:
                raise ShellExit(UNREACHABLE, f"connection lost ({e})") from None
            lines.say(f"job {job_id} had ended: {result.final_status}")
            return OK
        finally:
            await close_session(client)

    return run(go)


async def _is_admin(client: ARCPClient) -> bool:
    """Whether this session is an operator's: its job listings name each job's principal."""
    try:
        page = await client.list_jobs(limit=1)
    except ARCPError:
        return False
    return any("principal" in (j.model_extra or {}) for j in page.jobs)


# -- jobs ----------------------------------------------------------------------------
async def list_jobs(client: ARCPClient, statuses: tuple[str, ...] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    flt = ListJobsFilter(status=statuses) if statuses else None
    for _ in range(MAX_PAGES):
        try:
            page = await client.list_jobs(filter=flt, limit=1000, cursor=cursor)
        except ARCPError as e:
            raise ShellExit(JOB_FAILED, f"{e.code}: {e.message}") from None
        except (TransportClosed, OSError) as e:
            raise ShellExit(UNREACHABLE, f"connection lost ({e})") from None
        out += [j.model_dump(mode="json", exclude_none=True) for j in page.jobs]
        cursor = page.next_cursor
        if not cursor:
            break
    return out


def jobs(url: str, token: str | None, statuses: list[str], as_json: bool) -> int:
    wanted = tuple(s.strip() for item in statuses for s in item.split(",") if s.strip())

    async def go(intr: Interrupts) -> int:
        client, _ = await intr.race(open_session(url, token))
        try:
            entries = await intr.race(list_jobs(client, wanted or None))
        finally:
            await close_session(client)
        if as_json:
            for e in entries:
                sys.stdout.write(dump_json(e) + "\n")
        else:
            headers, rows = jobs_rows(entries)
            if is_terminal(sys.stdout):
                styles = [JOBS_STATUS_STYLE.get(str(e.get("status")), None) for e in entries]
                console_for(sys.stdout).print(rich_table(headers, rows, styles=styles))
            else:
                sys.stdout.write(plain_table(headers, rows) + "\n")
        sys.stdout.flush()
        return OK

    return run(go)


__all__ = ("CANCEL_WAIT", "SHELL_REASON", "cancel", "jobs", "list_jobs")
