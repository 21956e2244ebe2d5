"""The stdio transport: one session as newline-delimited JSON on stdin/stdout (§1.2).

stdin and stdout may be pipes, sockets or terminals (read and written by the event
loop) or regular files (read a line at a time, and written, in a thread: the event loop
cannot wait on a file). The process ends with this one session; when the client's input
ends, the session's jobs still run to their terminals, which are written first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from typing import BinaryIO

from supervisor.server.connection import serve_connection
from supervisor.core.session import Oversized
from supervisor.runtime import STDIO_FRAME_CAP, Runtime

LINE_LIMIT = 16 * 1024 * 1024
FLUSH_TIMEOUT = 10.0  # seconds the last frames may take to leave at the close


def _streamable(fd: int) -> bool:
    """Can the event loop wait on it (a pipe, a socket, a terminal), rather than a file
    (or a device such as /dev/null, which epoll refuses)?"""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


class _Writer(asyncio.streams.FlowControlMixin):
    """The protocol of the stdout pipe: flow control, and a future for the end of the flush."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)


class StdioTransport:
    def __init__(self, reader: asyncio.StreamReader | BinaryIO, writer: asyncio.StreamWriter | BinaryIO) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self) -> bytes | None:
        while True:
            if isinstance(self.reader, asyncio.StreamReader):
                line = await self._read_stream(self.reader)
            else:
                line = await asyncio.to_thread(_read_file_line, self.reader)
            if line is None or isinstance(line, Oversized):
                return line
            line = line.strip()
            if line:
                return line

    @staticmethod
    async def _read_stream(reader: asyncio.StreamReader) -> bytes | None:
        try:
            line = await reader.readline()
        except ValueError:  # over the limit: skip the rest of the line
            with contextlib.suppress(Exception):
                await reader.readuntil(b"\n")
            return Oversized(LINE_LIMIT)
        except (ConnectionError, asyncio.IncompleteReadError):
            return None
        return line or None

    async def send_many(self, frames: list[bytes]) -> None:
        data = b"".join(f + b"\n" for f in frames)
        try:
            if isinstance(self.writer, asyncio.StreamWriter):
                if self.writer.transport.is_closing():
                    return
                self.writer.write(data)
                await self.writer.drain()
            else:
                await asyncio.to_thread(_write_file, self.writer, data)
        except (ConnectionError, RuntimeError, OSError):
            pass

    async def close(self, code: int, reason: str) -> None:
        """Write out what is buffered (bounded), then close stdout."""
        if isinstance(self.writer, asyncio.StreamWriter):
            transport = self.writer.transport
            protocol = transport.get_protocol()
            transport.close()  # closes once its buffer is written
            if isinstance(protocol, _Writer):
                try:
                    await asyncio.wait_for(asyncio.shield(protocol.closed), FLUSH_TIMEOUT)
                except TimeoutError:  # a reader that does not read: drop what is left
                    transport.abort()
        else:
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(self.writer.flush)


def _read_file_line(f: BinaryIO) -> bytes | None:
    line = f.readline(LINE_LIMIT + 1)
    if not line:
        return None
    if len(line) > LINE_LIMIT and not line.endswith(b"\n"):
        while True:  # skip the rest of the line
            rest = f.readline(LINE_LIMIT)
            if not rest or rest.endswith(b"\n"):
                break
        return Oversized(LINE_LIMIT)
    return line


def _write_file(f: BinaryIO, data: bytes) -> None:
    f.write(data)
    f.flush()


async def serve_stdio(rt: Runtime) -> None:
    loop = asyncio.get_running_loop()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    reader: asyncio.StreamReader | BinaryIO
    if _streamable(stdin):
        stream = reader = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), sys.stdin)
    else:
        reader = open(stdin, "rb", closefd=False)
    writer: asyncio.StreamWriter | BinaryIO
    if _streamable(stdout):
        transport, protocol = await loop.connect_write_pipe(_Writer, sys.stdout)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
    else:
        writer = open(stdout, "wb", closefd=False)
    await serve_connection(rt, StdioTransport(reader, writer), STDIO_FRAME_CAP, linger=True)
