"""The stdio transport with the SDK's StdioTransport, and the command line's errors."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from arcp import ClientInfo, StdioTransport
from arcp.client import ARCPClient

from tests.conftest import EXE, ROOT, agent_flags


def test_stdio_session_with_official_client() -> None:
    async def go() -> None:
        proc = await asyncio.create_subprocess_exec(
            str(EXE), "run", "--stdio", *agent_flags(), cwd=ROOT, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
            limit=16 * 1024 * 1024)
        try:
            client = ARCPClient(client=ClientInfo(name="stdio", version="1"), token="")
            await asyncio.wait_for(client.connect(await StdioTransport.from_process_pipes(proc)), 15)
            h = await client.submit(agent="logs", input={"n": 5})
            r = await asyncio.wait_for(h.done, 15)
            assert r.result == {"n": 5}
            h = await client.submit(agent="stream", input={"size": 200_000})
            data = await asyncio.wait_for(h.collect_chunks(), 15)
            assert len(data) == 200_000
            await client.close()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
    asyncio.run(go())


def _run(*args: str, config: str | None = None, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(EXE), *args]
    if config is not None:
        assert tmp is not None
        f = tmp / "c.toml"
        f.write_text(config)
        argv += ["--config", str(f)]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_version() -> None:
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("arcp-supervisor ")


def test_bad_flags_exit_2_naming_the_flag(tmp_path: Path) -> None:
    cases = [
        (["run", "--port", "x", "--agent", "e=tests.agents:echo"], "--port"),
        (["run", "--memory", "lots", "--agent", "e=tests.agents:echo"], "--memory"),
        (["run", "--agent", "e=nocolon"], "--agent"),
        (["run", "--agent", "e=tests.agents:echo", "--host", "0.0.0.0"], "--host"),
        (["run", "--agent", "e=tests.agents:echo", "--default", "x@1"], "--default"),
        (["run", "--agent", "e=tests.agents:echo", "--token", "nope"], "--token"),
        (["run", "--no-such-flag"], "--no-such-flag"),
    ]
    for args, flag in cases:
        r = _run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert flag in r.stderr, (args, r.stderr)
        assert r.stdout == ""


def test_bad_config_exit_2_naming_the_key(tmp_path: Path) -> None:
    cases = [
        ("[server]\nport = 'x'\n", "server.port"),
        ("[server]\nbogus = 1\n", "server.bogus"),
        ("[limits]\nmemory = 'huge'\n", "limits.memory"),
        ("[[agents]]\nname = 'e'\nentry = 'bad'\n", "agents[0]"),
        ("not toml [", "not valid TOML"),
    ]
    for text, key in cases:
        r = _run("run", "--agent", "e=tests.agents:echo", config=text, tmp=tmp_path)
        assert r.returncode == 2, (text, r.stderr)
        assert key in r.stderr, (text, r.stderr)


def test_doctor_reports_layers_and_guarantees() -> None:
    import json

    r = _run("doctor", "--json")
    data = json.loads(r.stdout)
    assert r.returncode == (0 if data["ok"] else 1)
    names = {layer["name"] for layer in data["layers"]}
    assert {"landlock", "seccomp", "rlimits", "namespaces", "root"} <= names
    assert {g["name"] for g in data["guarantees"]} == {
        "files", "network", "environment", "supervisor-packages", "descriptors-and-privileges", "other-jobs",
        "own-uid", "host-files"}
    for g in data["guarantees"]:
        assert g["ok"] == (g["missing"] == ""), g
    text = _run("doctor")
    assert text.returncode == r.returncode and "guarantee files" in text.stdout


def test_run_help() -> None:
    r = _run("run", "--help")
    assert r.returncode == 0 and "--reuse-workers" in r.stdout


def test_stdio_oversized_and_broken_lines_get_errors_and_the_session_goes_on() -> None:
    import json

    proc = subprocess.Popen([str(EXE), "run", "--stdio", *agent_flags()], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        def send(obj: object) -> None:
            assert proc.stdin is not None
            proc.stdin.write(obj if isinstance(obj, bytes) else (json.dumps(obj) + "\n").encode())
            proc.stdin.flush()

        def recv() -> dict[str, object]:
            assert proc.stdout is not None
            frame: dict[str, object] = json.loads(proc.stdout.readline())
            return frame

        send({"arcp": "1.1", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "type": "session.hello",
              "payload": {"client": {"name": "stdio-test"}}})
        assert recv()["type"] == "session.welcome"
        send(b'{"big": "' + b"a" * (17 * 1024 * 1024) + b'"}\n')
        err = recv()
        assert err["type"] == "session.error" and "limit" in str(err["payload"])
        send(b"{not json\n")
        assert "not valid JSON" in str(recv()["payload"])
        send({"arcp": "1.1", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAW", "type": "session.ping", "payload": {"nonce": "n"}})
        assert recv()["type"] == "session.pong"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
