"""The `top` subcommand of the shell client: a live table of running and queued jobs
(supervisor.shell)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections.abc import Callable, Iterator

import anyio

from supervisor.shell import INTERRUPTED, OK
from supervisor.shell.connection import ShellExit, close_session, open_session
from supervisor.shell.interrupts import Interrupts, run
from supervisor.shell.jobs import list_jobs
from supervisor.shell.render import (
    TopSampler, console_for, is_terminal, plain_table, rich_table, top_rows, top_title,
)

TOP_INTERVAL = 1.0


@contextlib.contextmanager
def _keys(on_key: Callable[[bytes], None]) -> Iterator[None]:
    """Single keys from a terminal stdin (cbreak: no echo, Ctrl-C still a signal)."""
    fd = sys.stdin.fileno() if is_terminal(sys.stdin) else -1
    if fd < 0:
        yield
        return
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()
    try:
        tty.setcbreak(fd)
        loop.add_reader(fd, lambda: on_key(os.read(fd, 64)))
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def top(url: str, token: str | None) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    async def go(intr: Interrupts) -> int:
        client, _ = await intr.race(open_session(url, token))
        sampler = TopSampler()

        async def snapshot() -> tuple[str, list[str], list[list[str]], list[bool], list[str | None]]:
            entries = await intr.race(list_jobs(client, ("running", "pending")))
            headers, rows, right, styles = top_rows(entries, sampler)
            return top_title(url, entries), headers, rows, right, styles

        try:
            if not is_terminal(sys.stdout):
                title, headers, rows, right, _ = await snapshot()
                sys.stdout.write(title + "\n" + plain_table(headers, rows, right) + "\n")
                sys.stdout.flush()
                return OK
            quit_ = anyio.Event()

            def on_key(data: bytes) -> None:
                if b"q" in data.lower():
                    quit_.set()

            console = console_for(sys.stdout)
            with _keys(on_key), Live(console=console, auto_refresh=False, transient=False) as live:
                while True:
                    try:
                        title, headers, rows, right, styles = await snapshot()
                    except ShellExit as e:
                        if e.status == INTERRUPTED:
                            return INTERRUPTED
                        raise
                    hint = Text("q or Ctrl-C to quit", style="dim")
                    live.update(Group(rich_table(headers, rows, right, title=title, styles=styles), hint),
                                refresh=True)
                    with anyio.move_on_after(TOP_INTERVAL), intr.interruptible():
                        await quit_.wait()
                    if quit_.is_set():
                        return OK
                    if intr.event.is_set():
                        return INTERRUPTED
        finally:
            await close_session(client)

    return run(go)



__all__ = ("top",)
