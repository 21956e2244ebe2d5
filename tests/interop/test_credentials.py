"""Provisioned credentials (protocol.md §8.9): issued per job, rotated, revoked at every end."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

from arcp import ClientInfo, WebSocketTransport
from arcp.client import ARCPClient

from tests.conftest import Server
from tests.interop.client import FEATURES, Recorder, listed, poll

WITH_CREDS = FEATURES + ("provisioned_credentials", "model.use")


async def _connect(url: str) -> tuple[ARCPClient, Recorder]:
    rec = Recorder(await WebSocketTransport.connect(url))
    client = ARCPClient(client=ClientInfo(name="creds", version="1"), token="", features=WITH_CREDS)
    await client.connect(rec)
    return client, rec


def _server(make_server: type[Server], tmp_path: Path, options: str = "") -> tuple[Server, Path]:
    cfg = tmp_path / "creds.toml"
    cfg.write_text('[credentials]\nprovisioner = "static"\n' + (f"[credentials.options]\n{options}\n" if options else ""))
    state = tmp_path / "state"
    return make_server("--config", str(cfg), "--state-dir", str(state)), state / "arcp-supervisor.sqlite3"


def _unrevoked(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT credential_id FROM credentials")]


def _wait_until(cond: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(cond())  # type: ignore[operator]


def test_issue_rotate_revoke(make_server: type[Server], tmp_path: Path) -> None:
    srv, db = _server(make_server, tmp_path)

    async def go() -> None:
        client, rec = await _connect(srv.url)
        try:
            assert {"provisioned_credentials", "model.use"} <= set(client.negotiated_features)
            h = await client.submit(agent="creds", input={"rotate": "sk-rotated"})
            accepted = next(f for f in rec.frames if f.get("type") == "job.accepted")
            creds = accepted["payload"]["credentials"]
            assert len(creds) == 1 and creds[0]["scheme"] == "bearer" and creds[0]["id"].startswith("cred_")
            r = (await asyncio.wait_for(h.done, 15)).result
            assert r == {"ids": [creds[0]["id"]], "in_env": False, "schemes": ["bearer"]}
            rot = next(f for f in rec.frames if f.get("type") == "job.event"
                       and f["payload"]["body"].get("phase") == "credential_rotated")
            body = rot["payload"]["body"]
            assert body["id"] == creds[0]["id"] and body["value"] == "sk-rotated"
            assert body["details"] == {"id": creds[0]["id"], "value": "sk-rotated"}
            entries = (await client.list_jobs()).jobs
            assert "credentials" not in str([j.model_dump() for j in entries])
        finally:
            await client.close()
        assert _unrevoked(db) == [], "credentials outlived their job"
    asyncio.run(go())


def test_failed_revocations_are_retried(make_server: type[Server], tmp_path: Path) -> None:
    srv, db = _server(make_server, tmp_path, "fail_revocations = 2")

    async def go() -> None:
        client, _ = await _connect(srv.url)
        try:
            h = await client.submit(agent="creds", input={})
            await asyncio.wait_for(h.done, 15)
        finally:
            await client.close()
    asyncio.run(go())
    assert _wait_until(lambda: _unrevoked(db) == [], 15), "a failed revocation was not retried"


def test_a_restart_still_revokes(make_server: type[Server], tmp_path: Path) -> None:
    srv, db = _server(make_server, tmp_path)

    async def go() -> None:
        client, _ = await _connect(srv.url)
        h = await client.submit(agent="creds", input={"wait": 30})

        async def running() -> bool | None:
            return (await listed(client, h.job_id))[h.job_id].status == "running" or None
        await poll(running, "the job to start")
    asyncio.run(go())
    assert len(_unrevoked(db)) == 1
    os.killpg(srv.pid, signal.SIGKILL)
    srv.proc.wait(5)
    _server(make_server, tmp_path)
    assert _wait_until(lambda: _unrevoked(db) == [], 15), "the restart did not revoke the running job's credential"


def test_no_credentials_without_negotiation(make_server: type[Server], tmp_path: Path) -> None:
    srv, _ = _server(make_server, tmp_path)

    async def go() -> None:
        rec = Recorder(await WebSocketTransport.connect(srv.url))
        client = ARCPClient(client=ClientInfo(name="plain", version="1"), token="", features=FEATURES)
        await client.connect(rec)
        try:
            h = await client.submit(agent="creds", input={})
            assert (await asyncio.wait_for(h.done, 15)).result["ids"] == []
            accepted = next(f for f in rec.frames if f.get("type") == "job.accepted")
            assert "credentials" not in accepted["payload"]
        finally:
            await client.close()
    asyncio.run(go())
