"""Workers that misbehave end only their own job; bad client input gets a clear error."""

from __future__ import annotations

import asyncio
import json

import arcp
import pytest
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Server
from tests.interop.client import sdk_session


@pytest.mark.parametrize("agent, words", [
    ("suicide", "killed by signal 9"),
    ("garbage", "invalid frame"),
    ("otherjob", "another job"),
])
def test_bad_worker_ends_only_its_job(server: Server, agent: str, words: str) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (bystander, _):
            slow = await bystander.submit(agent="sleep", input={"seconds": 1.0})
            async with sdk_session(server.url) as (client, rec):
                h = await client.submit(agent=agent)
                with pytest.raises(arcp.InternalError):
                    await asyncio.wait_for(h.done, 15)
                term = await rec.terminal(h.job_id)
                assert words in term["payload"]["message"], term
                assert term["payload"]["retryable"] is True
                # the same session goes on
                h2 = await client.submit(agent="echo", input=1)
                assert (await asyncio.wait_for(h2.done, 15)).result == {"echo": 1}
            assert (await asyncio.wait_for(slow.done, 15)).result == {"slept": True}
    asyncio.run(go())


async def _raw_session(url: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(url)
    await ws.send(json.dumps({"arcp": "1.1", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "type": "session.hello",
                              "payload": {"client": {"name": "raw"}, "auth": {"scheme": "bearer", "token": ""},
                                          "capabilities": {"features": ["progress"]}}}))
    welcome: dict[str, Any] = json.loads(await ws.recv())
    assert welcome["type"] == "session.welcome"
    return ws, welcome


@pytest.mark.parametrize("raw, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"arcp": "1.1", "id": "x1", "type": "job.frobnicate", "payload": {}}', "job.frobnicate"),
    ('{"arcp": "1.1", "id": "x2", "type": "job.submit", "payload": {"agent": 42}}', "'agent'"),
    ('{"arcp": "1.1", "id": "x3", "type": "job.submit", "payload": {"agent": "echo", "max_runtime_sec": "ten"}}',
     "max_runtime_sec"),
    ('{"arcp": "1.1", "id": "x4", "type": "job.submit", "payload": {"agent": "echo", '
     '"lease_request": {"fs.read": [1]}}}', "fs.read"),
    ('{"arcp": "1.1", "id": "x5", "type": "session.list_jobs", "payload": {}}', "list_jobs"),
    ('{"arcp": "1.0", "id": "x6", "type": "session.ping", "payload": {}}', "arcp"),
])
def test_bad_frames_get_invalid_request_naming_the_problem(server: Server, raw: str, words: str) -> None:
    async def go() -> None:
        ws, welcome = await _raw_session(server.url)
        try:
            await ws.send(raw)
            err = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert err["type"] == "session.error"
            assert err["payload"]["code"] == "INVALID_REQUEST"
            assert words in err["payload"]["message"], err
            # the session still works
            await ws.send(json.dumps({"arcp": "1.1", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAW",
                                      "type": "session.ping", "session_id": welcome["session_id"],
                                      "payload": {"nonce": "n1", "sent_at": "2026-01-01T00:00:00Z"}}))
            pong = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert pong["type"] == "session.pong" and pong["payload"]["ping_nonce"] == "n1"
        finally:
            await ws.close()
    asyncio.run(go())


def test_wrong_path_is_404(server: Server) -> None:
    async def go() -> None:
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus) as ei:
            await connect(server.url.replace("/arcp", "/nope"))
        assert ei.value.response.status_code == 404
    asyncio.run(go())


def test_bad_token_is_unauthenticated(make_server: type[Server]) -> None:
    srv = make_server("--token", "sekrit=alice")

    async def go() -> None:
        with pytest.raises(arcp.UnauthenticatedError):
            async with sdk_session(srv.url, token="wrong"):
                pass
        async with sdk_session(srv.url, token="sekrit") as (client, _):
            h = await client.submit(agent="echo", input=2)
            assert (await asyncio.wait_for(h.done, 15)).result == {"echo": 2}
    asyncio.run(go())


def test_a_submit_whose_accept_does_not_fit_a_frame_leaves_no_job_behind(make_server: type[Server]) -> None:
    srv = make_server()  # its own: the job's lease is too large for a session.list_jobs page too

    async def go() -> None:
        ws, _ = await _raw_session(srv.url)
        try:
            lease = {"tool.call": [f"t{i}-" + "x" * 3000 for i in range(256)],
                     "agent.delegate": [f"a{i}-" + "y" * 3000 for i in range(256)]}
            await ws.send(json.dumps({"arcp": "1.1", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAW", "type": "job.submit",
                                      "payload": {"agent": "sleep", "input": {"seconds": 30},
                                                  "lease_request": lease}}))
            frames = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
            err = next(f for f in frames if f["type"] == "session.error")
            assert "does not fit one frame" in err["payload"]["message"], err
            term = next(f for f in frames if f["type"] == "job.error")  # it never runs
            assert term["payload"]["code"] == "INTERNAL_ERROR", term
        finally:
            await ws.close()
    asyncio.run(go())
