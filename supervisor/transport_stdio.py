"""The stdio transport: one session as newline-delimited JSON on stdin/stdout (§1.2)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

from supervisor.connection import serve_connection
from supervisor.session import Oversized
from supervisor.runtime import STDIO_FRAME_CAP, Runtime

LINE_LIMIT = 16 * 1024 * 1024


class StdioTransport:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self) -> bytes | None:
        while True:
            try:
                line = await self.reader.readline()
            except ValueError:  # over the limit: skip the rest of the line
                with contextlib.suppress(Exception):
                    await self.reader.readuntil(b"\n")
                return Oversized(LINE_LIMIT)
            except (ConnectionError, asyncio.IncompleteReadError):
                return None
            if not line:
                return None
            line = line.strip()
            if line:
                return line

    async def send_many(self, frames: list[bytes]) -> None:
        try:
            self.writer.write(b"".join(f + b"\n" for f in frames))
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.writer.drain()


async def serve_stdio(rt: Runtime) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    await serve_connection(rt, StdioTransport(reader, writer), STDIO_FRAME_CAP)
