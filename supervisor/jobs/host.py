"""What a job runner needs of the runtime (supervisor/runtime.py provides it): each agent
environment's fork server and worker pool, the job's spec and temp dir, and the way back for its frames."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol

from supervisor.config import Config
from supervisor.core.jobs import Job
from supervisor.jobs.environments import WorkerEnvironments
from supervisor.jobs.worker_handle import WorkerHandle
from supervisor.sandbox.job_uids import UidPool
from supervisor.state.base import StateStore


class RunnerHost(Protocol):
    config: Config
    frame_cap: int
    environments: WorkerEnvironments  # each agent environment's fork server and worker pool
    uids: UidPool | None
    egress_unavailable: str | None
    store: StateStore  # the frames' log: a job's pump waits while its writer is far behind

    def reuse_key(self, job: Job) -> Hashable: ...

    def job_spec(self, job: Job, egress_port: int | None = None) -> dict[str, Any]: ...

    def job_tmp_dir(self, job: Job, worker: WorkerHandle) -> None: ...

    def emit_event(self, job: Job, kind: str, body: dict[str, Any]) -> None: ...

    def emit_cancelled(self, job: Job, reason: str) -> None: ...

    def finish(self, job: Job, status: str, err: dict[str, Any] | None, *, value: Any = None,
               result_id: str | None = None, result_size: int | None = None,
               usage: dict[str, Any] | None = None) -> None: ...

    def delegate(self, parent: Job, agent: Any, input: Any, lease: Any) -> str: ...

    async def rotate_credential(self, job: Job, credential_id: str, new_value: str) -> None: ...
