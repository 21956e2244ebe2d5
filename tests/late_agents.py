"""An agent module no server knows at start: the reload tests register it with SIGHUP
(so the fork server has not precompiled it; its worker imports it the ordinary way)."""

from __future__ import annotations

from typing import Any

from worker import JobContext


def hello(input: Any, job: JobContext) -> Any:
    return {"hello": input}
