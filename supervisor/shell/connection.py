"""A session with a running server through the official Python client, and what the
subcommands need around it: the frames it receives (for `--json` and for the answers the
client does not surface) and the exit status when it cannot be had."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
from arcp import ARCPError, ClientInfo, TransportClosed, WebSocketTransport
from arcp.client import ARCPClient, JobHandle
from websockets.exceptions import WebSocketException

from supervisor import __version__
from supervisor.shell import UNREACHABLE

DEFAULT_URL = "ws://127.0.0.1:7777/arcp"
CONNECT_TIMEOUT = 10.0
FEATURES = ("heartbeat", "list_jobs", "subscribe", "lease_expires_at", "cost.budget", "progress",
            "result_chunk", "agent_versions")
TERMINAL_TYPES = ("job.result", "job.error")


class ShellExit(Exception):
    """Ends a subcommand with `status`, `message` (if any) on stderr."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def default_url() -> str:
    return os.environ.get("ARCP_URL") or DEFAULT_URL


class Tap:
    """The client's transport, seen from inside: every frame it receives goes through
    `recv` here before the client dispatches it."""

    def __init__(self, inner: WebSocketTransport) -> None:
        self.inner = inner
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.terminals: dict[str, dict[str, Any]] = {}
        self.subscribed: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []

    async def send(self, envelope: dict[str, Any]) -> None:
        await self.inner.send(envelope)

    async def recv(self) -> dict[str, Any]:
        env = await self.inner.recv()
        t = env.get("type")
        if t in TERMINAL_TYPES and isinstance(env.get("job_id"), str):
            self.terminals[env["job_id"]] = env
        elif t == "session.error":
            self.errors.append(env)
        elif t == "job.subscribed" and isinstance(env.get("payload"), dict):
            self.subscribed[str(env["payload"].get("job_id"))] = env["payload"]
        for listener in list(self.listeners):
            listener(env)
        return env

    async def close(self) -> None:
        await self.inner.close()

    @property
    def is_closed(self) -> bool:
        return self.inner.is_closed


async def open_session(url: str, token: str | None) -> tuple[ARCPClient, Tap]:
    """A connected client, or ShellExit(3) naming why not (unreachable, refused, not
    authenticated)."""
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            ws = await WebSocketTransport.connect(url, max_size=None, open_timeout=CONNECT_TIMEOUT)
    except TimeoutError:
        raise ShellExit(UNREACHABLE, f"cannot connect to {url}: timed out") from None
    # OSError: refused, unreachable, no such host; WebSocketException: InvalidURI,
    # InvalidStatus, InvalidHandshake, ...
    except (OSError, ValueError, WebSocketException) as e:
        raise ShellExit(UNREACHABLE, f"cannot connect to {url}: {e}") from None
    tap = Tap(ws)
    client = ARCPClient(client=ClientInfo(name="arcp-supervisor", version=__version__), token=token or "",
                        features=FEATURES, handshake_timeout_sec=CONNECT_TIMEOUT)
    welcomed = False
    try:
        await client.connect(tap)
        welcomed = True
    except ARCPError as e:
        what = "not authenticated" if e.code in ("UNAUTHENTICATED", "PERMISSION_DENIED") else "session refused"
        raise ShellExit(UNREACHABLE, f"{what} by {url}: {e.code}: {e.message}") from None
    except TimeoutError:
        raise ShellExit(UNREACHABLE, f"no session.welcome from {url}") from None
    except (TransportClosed, OSError) as e:
        raise ShellExit(UNREACHABLE, f"{url} closed the connection during the handshake ({e})") from None
    finally:
        if not welcomed:  # refused, or cancelled (Ctrl-C) half-way through the handshake
            await _quiet_close(tap)
    return client, tap


async def _quiet_close(tap: Tap) -> None:
    """The connection closed, bounded, even when cancelled (its errors are the transport's
    to swallow)."""
    with anyio.move_on_after(2, shield=True):
        await tap.close()


async def close_session(client: ARCPClient, *handles: JobHandle) -> None:
    """session.bye and the close, bounded, even when cancelled (it is what a subcommand does
    on its way out, a second Ctrl-C included); jobs go on (a submit --detach relies on it).
    `handles` still open are failed by the close: their outcome is taken, unused (else
    asyncio reports it as never retrieved)."""
    with anyio.move_on_after(3, shield=True):
        try:
            await client.close()
        except (TransportClosed, OSError):
            pass  # the connection broke under the bye: closed all the same
    for h in handles:
        with anyio.move_on_after(0.5, shield=True):
            try:
                await h.done
            except Exception:  # the outcome, whichever: TransportClosed, the job's error
                pass


def error_text(e: BaseException) -> str:
    if isinstance(e, ARCPError):
        return f"{e.code}: {e.message}"
    if isinstance(e, TransportClosed):
        return f"connection lost ({e})" if str(e) else "connection lost"
    return f"{type(e).__name__}: {e}"
