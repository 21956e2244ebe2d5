"""The official Python SDK client runs a job end to end against a real server."""

from __future__ import annotations

import asyncio

from arcp import ClientInfo, WebSocketTransport
from arcp.client import ARCPClient

from tests.conftest import Server


async def _echo(url: str) -> object:
    client = ARCPClient(client=ClientInfo(name="smoke", version="1"), token="")
    await client.connect(await WebSocketTransport.connect(url))
    try:
        handle = await client.submit(agent="echo", input={"x": 1})
        return (await asyncio.wait_for(handle.done, 15)).result
    finally:
        await client.close()


def test_echo_with_official_client(server: Server) -> None:
    assert asyncio.run(_echo(server.url)) == {"echo": {"x": 1}}
