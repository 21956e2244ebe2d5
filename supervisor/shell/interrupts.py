"""Running one subcommand of the shell client: Ctrl-C handling and its exit status
(supervisor.shell)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import anyio

from supervisor.async_library import declare_asyncio
from supervisor.shell import INTERRUPTED, JOB_FAILED, USAGE
from supervisor.shell.connection import ShellExit
from supervisor.shell.render import Lines

T = TypeVar("T")


class Interrupts:
    """Ctrl-C while a subcommand runs: the first sets `event` and cancels the waits under
    `interruptible()` (the subcommand winds down in its own way), a second one cancels the
    subcommand outright (`scope`)."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.count = 0
        self.scope = anyio.CancelScope()
        self._waits: set[anyio.CancelScope] = set()

    def on_sigint(self) -> None:
        self.count += 1
        if self.count == 1:
            self.event.set()
            for wait in list(self._waits):
                wait.cancel()
        else:
            self.scope.cancel()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that Ctrl-C cancels (at once if it came already)."""
        with anyio.CancelScope() as wait:
            if self.event.is_set():
                wait.cancel()
            self._waits.add(wait)
            try:
                yield wait
            finally:
                self._waits.discard(wait)

    async def race(self, aw: Awaitable[T]) -> T:
        """`aw`'s value, or ShellExit(130) if Ctrl-C comes first (`aw` is then cancelled)."""
        with self.interruptible():
            return await aw
        raise ShellExit(INTERRUPTED, "interrupted")


@contextlib.contextmanager
def _sigint(handler: Callable[[], None]) -> Iterator[None]:
    """`handler` called in the event loop on each SIGINT while in here (instead of
    KeyboardInterrupt)."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, handler)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def run(command: Callable[[Interrupts], Awaitable[int]]) -> int:
    """Run one subcommand to its exit status; its messages go to stderr, never a traceback."""

    async def main() -> int:
        declare_asyncio()  # (supervisor/async_library.py)
        intr = Interrupts()
        with _sigint(intr.on_sigint):
            with intr.scope:
                try:
                    return await command(intr)
                except ShellExit as e:
                    if e.message:
                        prefix = "arcp-supervisor: error: " if e.status == USAGE else "arcp-supervisor: "
                        Lines().say(prefix + e.message, "red" if e.status != INTERRUPTED else None)
                    return e.status
            # A second Ctrl-C cancelled the subcommand where it was.
            Lines().say("arcp-supervisor: interrupted")
            return INTERRUPTED

    status = INTERRUPTED
    try:
        status = asyncio.run(main())
    except* KeyboardInterrupt:  # a Ctrl-C before the handler above is in place, or after it
        status = INTERRUPTED
    except* BrokenPipeError:  # whoever read stdout went away (a task group's raise it in a group)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = JOB_FAILED
    return status


__all__ = ("Interrupts", "run")
