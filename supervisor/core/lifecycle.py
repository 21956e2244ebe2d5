"""A job's life as a state machine: the decisions, with the time passed in; no I/O.

    waiting --admitted--> running --worker reports its end--> ending --> done
       |                     |
       +------stop-----------+--stop--> stopping --worker gone--> done

The first stop wins (cancel, timeout, lease expiry); a stop after the worker has reported
the job's end comes too late, its terminal is decided. A job stopped while it waits for
admission ends at once. The runner (supervisor/jobs/runner.py) carries the decisions out:
it arms the deadlines, signals the worker, sends the frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.errors import ARCPError, Cancelled, InternalError, LeaseExpired, Timeout
from shared.messages import CANCELLED, ERROR, TIMED_OUT

WAITING, RUNNING, ENDING, STOPPING, DONE = "waiting", "running", "ending", "stopping", "done"
STOP_KINDS = ("cancel", "timeout", "expired")


@dataclass(frozen=True)
class Deadline:
    """When (monotonic seconds) a stop of `kind` comes by itself, and its error."""

    at: float
    kind: str
    error: ARCPError


@dataclass(frozen=True)
class Stop:
    """What a stop decided: the terminal (status, wire error), whether a job.cancelled goes
    first, and whether the terminal is sent now (nothing runs yet) or once the worker is gone."""

    kind: str
    status: str
    error: dict[str, Any]
    cancelled_frame: bool
    finish_now: bool


class JobLifecycle:
    def __init__(self, max_runtime: float, max_runtime_sec: float | None, expires_at: float | None) -> None:
        self.state = WAITING
        self.stop: Stop | None = None
        self._max_runtime = max_runtime  # the operator's ceiling (limits.runtime_sec)
        self._asked = max_runtime_sec  # the client's, when it asked one
        self._expires_at = expires_at  # the lease's end (wall-clock seconds), if it has one

    def lease_deadline(self, now_wall: float, now_mono: float) -> Deadline | None:
        """At acceptance: the lease's expiry, which ends a job still waiting to start too."""
        if self._expires_at is None:
            return None
        return Deadline(now_mono + max(0.0, self._expires_at - now_wall), "expired",
                        LeaseExpired("lease expired during execution"))

    def admitted(self, now_mono: float) -> Deadline:
        """Admitted: the runtime ceiling and the client's max_runtime_sec count from now, the
        tighter wins."""
        if self.state == WAITING:
            self.state = RUNNING
        ceiling, asked = self._max_runtime, self._asked
        if asked and asked < ceiling:
            return Deadline(now_mono + asked, "timeout", Timeout(f"job exceeded max_runtime_sec={asked}"))
        return Deadline(now_mono + ceiling, "timeout", Timeout(
            f"runtime limit {ceiling} s exceeded", retryable=False,
            details={"limit": "runtime_sec", "value": ceiling}))

    def request_stop(self, kind: str, reason: str, error: ARCPError | None = None) -> Stop | None:
        """A stop of `kind` ("cancel", "timeout" or "expired"); None when it comes too late (the
        job ended, its end was reported, or an earlier stop won). `error` replaces the error
        `kind` implies."""
        if kind not in STOP_KINDS:
            raise ValueError(f"unknown stop kind {kind!r}")
        if self.state in (ENDING, STOPPING, DONE):
            return None
        err: ARCPError
        if kind == "cancel":
            status, err = CANCELLED, Cancelled(reason)
        elif kind == "timeout":
            status, err = TIMED_OUT, Timeout(reason)
        else:
            status, err = ERROR, LeaseExpired(reason)
        self.stop = Stop(kind, status, (error or err).to_wire(), kind == "cancel", self.state == WAITING)
        self.state = DONE if self.state == WAITING else STOPPING
        return self.stop

    def end_reported(self) -> bool:
        """The worker reported the job's end (a result or an error): its terminal is decided,
        unless a stop was first. Whether the report stands."""
        if self.state != RUNNING:
            return False
        self.state = ENDING
        return True

    def finished(self) -> None:
        self.state = DONE

    @property
    def stopping(self) -> bool:
        return self.stop is not None


def died_terminal(limits: dict[str, Any], *, memory_exceeded: bool, oom: bool,
                  cpu_unreadable: tuple[str, dict[str, Any]] | None,
                  cpu_exceeded: bool, killed_by_sigxcpu: bool, exit_reason: str) -> tuple[str, dict[str, Any]]:
    """The terminal of a job whose worker died without reporting an end: a limit it passed,
    else the way the process ended."""
    if memory_exceeded or oom:
        mib = limits["memory_mb"]
        return ERROR, InternalError(f"memory limit {mib} MiB exceeded", retryable=False, details={
            "limit": "memory_mb", "value": mib, "enforced_by": "cgroup" if oom else "watchdog"}).to_wire()
    if cpu_unreadable is not None:  # (why, details): the CPU limit could not be held
        return ERROR, InternalError(cpu_unreadable[0], retryable=True, details=cpu_unreadable[1]).to_wire()
    if cpu_exceeded or killed_by_sigxcpu:
        sec = limits["cpu_sec"]
        return TIMED_OUT, Timeout(f"cpu time limit {sec} s exceeded", retryable=False,
                                  details={"limit": "cpu_sec", "value": sec}).to_wire()
    return ERROR, InternalError(f"worker process ended unexpectedly: {exit_reason}", retryable=True,
                                details={"exit": exit_reason}).to_wire()
