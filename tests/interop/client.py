"""Helpers for driving a real server with the official Python SDK client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from arcp import ARCPError, ClientInfo, SessionResume, SessionWelcomePayload, WebSocketTransport
from arcp.client import ARCPClient
from websockets.asyncio.client import ClientConnection, connect

T = TypeVar("T")

FEATURES = ("heartbeat", "ack", "list_jobs", "subscribe", "lease_expires_at", "cost.budget",
            "progress", "result_chunk", "agent_versions")


class Recorder:
    """Wraps an SDK transport and records every frame the client receives."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.frames: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    async def send(self, env: dict[str, Any]) -> None:
        await self.inner.send(env)

    async def recv(self) -> dict[str, Any]:
        try:
            env: dict[str, Any] = await self.inner.recv()
        finally:
            self.changed.set()
        self.frames.append(env)
        return env

    async def close(self) -> None:
        await self.inner.close()

    @property
    def is_closed(self) -> bool:
        return bool(self.inner.is_closed)

    async def wait_for(self, pred: Any, timeout: float = 10.0, start: int = 0) -> dict[str, Any]:
        """The first frame from index `start` on that `pred` accepts (waiting for it)."""
        async with asyncio.timeout(timeout):
            i = start
            while True:
                while i < len(self.frames):
                    if pred(self.frames[i]):
                        return self.frames[i]
                    i += 1
                self.changed.clear()
                await self.changed.wait()

    async def terminal(self, job_id: str, timeout: float = 15.0) -> dict[str, Any]:
        return await self.wait_for(
            lambda f: f.get("type") in ("job.result", "job.error") and f.get("job_id") == job_id, timeout)


@asynccontextmanager
async def sdk_session(url: str, token: str = "") -> AsyncIterator[tuple[ARCPClient, Recorder]]:
    rec = Recorder(await WebSocketTransport.connect(url))
    client = ARCPClient(client=ClientInfo(name="tests", version="1"), token=token, features=FEATURES)
    await client.connect(rec)
    try:
        yield client, rec
    finally:
        try:
            await asyncio.wait_for(client.close(), 5)
        except Exception:
            pass


async def listed(client: ARCPClient, *job_ids: str) -> dict[str, Any]:
    """The `session.list_jobs` entries of these jobs, from every page: a server shared with
    other tests lists their jobs too, and the first page may end before ours."""
    found: dict[str, Any] = {}
    cursor: str | None = None
    while True:
        page = await client.list_jobs(cursor=cursor)
        found.update((j.job_id, j) for j in page.jobs if j.job_id in job_ids)
        cursor = page.next_cursor
        if not cursor or len(found) == len(job_ids):
            break
    missing = set(job_ids) - set(found)
    assert not missing, f"not listed: {sorted(missing)}"
    return found


async def poll(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 15.0,
               every: float = 0.05) -> T:
    """`check()` until it returns something other than None, for what no event tells of;
    fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got is not None:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(every)


async def job_ended(url: str, job_id: str, token: str = "", timeout: float = 15.0) -> dict[str, Any]:
    """The job's terminal frame, seen by a session of its own that subscribes to it (it
    is sent at once for a job that has already ended)."""
    async with sdk_session(url, token) as (client, rec):
        await client.subscribe(job_id, history=False)
        return await rec.terminal(job_id, timeout)


async def resume_once_detached(url: str, resume: SessionResume, timeout: float = 10.0, **connect_kw: Any,
                               ) -> tuple[ARCPClient, SessionWelcomePayload, Recorder, ClientConnection]:
    """Resume a session whose connection was cut, on a new connection (returned, to be cut
    in turn). The server takes a resume only once it has noticed the cut (the session is
    detached), which it tells no one: a refusal for that reason is retried, others raised."""
    deadline = time.monotonic() + timeout
    while True:
        conn = await connect(url, **connect_kw)
        rec = Recorder(WebSocketTransport(conn))
        client = ARCPClient(client=ClientInfo(name="tests", version="1"), token="", features=FEATURES)
        try:
            return client, await client.resume(rec, resume=resume), rec, conn
        except ARCPError as e:
            if not (e.code == "RESUME_WINDOW_EXPIRED" and e.message.startswith("no resumable session")
                    and time.monotonic() < deadline):
                raise
        with contextlib.suppress(Exception):
            await conn.close()
        await asyncio.sleep(0.05)
