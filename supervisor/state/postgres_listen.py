"""A thread that LISTENs for what other nodes announce (supervisor/state/postgres_cluster.py:
relayed frames, commands) on a connection of its own, and hands each notification to the event
loop that started it. A lost connection is found again with the store's backoff; since what was
announced meanwhile is lost, the loop is then told `(RECONNECTED, "")` so that it reads again
what it may have missed (the relay rows are in the database: nothing is lost but the nudge)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from supervisor.state.postgres_cluster import COMMAND_CHANNEL, RELAY_CHANNEL

log = logging.getLogger("arcp.store")
RECONNECTED = "reconnected"
FIRST_DELAY, MAX_DELAY = 0.1, 5.0
POLL = 0.5  # seconds between two looks at whether the listener is to stop

Notify = Callable[[str, str], None]  # (channel, payload), on the event loop


class Listener:
    def __init__(self, url: str, connect_timeout: int, loop: asyncio.AbstractEventLoop, notify: Notify) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._loop = loop
        self._notify = notify
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._thread = threading.Thread(target=self._main, name="arcp-listen", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _post(self, channel: str, payload: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._notify, channel, payload)
        except RuntimeError:  # the loop has closed: nobody to tell
            self._stop.set()

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout)
        conn.execute(f"LISTEN {RELAY_CHANNEL}")
        conn.execute(f"LISTEN {COMMAND_CHANNEL}")
        return conn

    def _main(self) -> None:
        delay, first = FIRST_DELAY, True
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except Exception as e:
                if first:
                    log.warning("state store: cannot listen for other nodes' announcements yet: %s", e)
                first = False
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_DELAY)
                continue
            delay = FIRST_DELAY
            self.connected.set()
            if not first:
                log.warning("state store: listening for other nodes' announcements again")
            self._post(RECONNECTED, "")  # whatever was announced before now is read again
            first = False
            try:
                while not self._stop.is_set():
                    for n in conn.notifies(timeout=POLL):
                        self._post(n.channel, n.payload)
                        if self._stop.is_set():
                            break
            except Exception as e:
                if not self._stop.is_set():
                    log.warning("state store: the connection listening for other nodes was lost (%s); "
                                "connecting again", e)
            finally:
                self.connected.clear()
                try:
                    conn.close()
                except Exception:
                    pass
