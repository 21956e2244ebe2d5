"""A feature a session did not negotiate is not used toward it: no `progress` events for a
client that did not ask for them (the job still runs and its other events arrive)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.conftest import Server


async def _job_frames(url: str, features: list[str]) -> list[dict[str, Any]]:
    async with connect(url) as ws:
        await ws.send(json.dumps({"arcp": "1.1", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "type": "session.hello",
                                  "payload": {"client": {"name": "raw"}, "auth": {"scheme": "bearer", "token": ""},
                                              "capabilities": {"features": features}}}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "session.welcome", welcome
        await ws.send(json.dumps({"arcp": "1.1", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAW", "type": "job.submit",
                                  "payload": {"agent": "counts", "input": {"n": 3}}}))
        frames = []
        async with asyncio.timeout(20):
            while True:
                f = json.loads(await ws.recv())
                frames.append(f)
                if f["type"] in ("job.result", "job.error"):
                    return frames


@pytest.mark.parametrize("features, progress_events", [(["progress"], 3), ([], 0), (["heartbeat", "ack"], 0)])
def test_progress_events_only_where_negotiated(server: Server, features: list[str], progress_events: int) -> None:
    frames = asyncio.run(_job_frames(server.url, features))
    kinds = [f["payload"]["kind"] for f in frames if f["type"] == "job.event"]
    assert kinds.count("progress") == progress_events, kinds
    assert "log" in kinds and frames[-1]["type"] == "job.result", frames[-1]
    seqs = [f["event_seq"] for f in frames if "event_seq" in f]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), seqs
