"""Each worker's HOME/TMPDIR (supervisor/sandbox/job_dirs.py makes them): given at spawn,
emptied when the worker is kept for another job, sized for each job, removed with it.
Every one of these is file-system work (mkdir, tmpfs mounts, rmtree): the callers run
`give`, `empty` and `for_job` on threads, and a removal is a task of its own on one."""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

from supervisor.core.jobs import Job
from supervisor.jobs.worker_handle import WorkerHandle
from supervisor.sandbox.job_dirs import JobDirs

Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], bool]  # False: not run (closing)


def tmp_size_for(cap: int, memory: int) -> int:
    """A job's HOME/TMPDIR size: the operator's cap, or half the job's memory limit if that is
    smaller (its pages count as the job's memory)."""
    return min(cap, memory // 2)


class WorkerDirs:
    def __init__(self, job_dirs: JobDirs, tmp_size: Callable[[], int], spawn: Spawn) -> None:
        self.job_dirs = job_dirs
        self._tmp_size = tmp_size  # the operator's cap, as currently configured
        self._spawn = spawn

    def give(self, worker: WorkerHandle, size: int | None = None) -> None:
        """The worker's directory, of `size` bytes (by default the operator's cap)."""
        size = self._tmp_size() if size is None else size
        path, capped = self.job_dirs.create(f"w{worker.pid}", size)
        worker.tmp_dir, worker.tmp_capped, worker.tmp_size = path, capped, size
        worker.on_close.append(lambda: self._remove(path, capped))

    def _remove(self, path: str, capped: bool) -> None:
        async def remove() -> None:
            await anyio.to_thread.run_sync(self.job_dirs.remove, path, capped)

        if not self._spawn(remove):  # the runtime's task group has ended (its close): here and now
            self.job_dirs.remove(path, capped)

    async def empty(self, worker: WorkerHandle) -> None:
        """A kept worker's directory, emptied for its next job: on a thread when the job left
        something in it (a scandir here tells, in microseconds; most jobs leave nothing)."""
        path = worker.tmp_dir
        if path is None:
            return
        try:
            with os.scandir(path) as entries:
                left = next(entries, None) is not None
        except OSError:
            left = True  # let the emptying say what is wrong
        if left:
            await anyio.to_thread.run_sync(self.job_dirs.empty, path)

    def for_job(self, job: Job, worker: WorkerHandle) -> None:
        """The job's HOME/TMPDIR: its worker's directory, capped at the operator's size or
        half the job's memory limit if that is smaller (its pages count as the job's memory)."""
        assert job.request is not None
        if worker.tmp_dir is None:
            self.give(worker)
        size = tmp_size_for(self._tmp_size(), job.request.limits.memory)
        if worker.tmp_capped and worker.tmp_size != size and self.job_dirs.resize(worker.tmp_dir or "", size):
            worker.tmp_size = size
        job.tmp_dir, job.tmp_capped = worker.tmp_dir, worker.tmp_capped
        job.tmp_size = worker.tmp_size if worker.tmp_capped else None
