"""Helpers for driving a real server with the official Python SDK client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arcp import ClientInfo, WebSocketTransport
from arcp.client import ARCPClient

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
