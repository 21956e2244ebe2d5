"""One worker's cgroup (v1 memory, pids and cpuacct controllers; v2 where its controllers are delegated).

Each worker joins a group of its own when it is forked (off any job's path); the job's
limits are written when the job arrives, and read back. The kernel then enforces them:
memory over the limit is OOM-killed inside the group only, forks past `pids.max` fail with
EAGAIN, the group's CPU time is counted for the whole process tree (the supervisor reads it
while the job runs), and every task of the group — grandchildren that called setsid()
included — can be found and killed when the job ends. The same counters tell what a job
used (core/usage.py): CPU time and its user/system split, the memory high-water mark, the
task count.

Groups are recycled from one worker to the next (cgroups.py), so a job's limits are never
assumed: each one is written in an order the kernel accepts from whatever the last job
left, and read back. A limit that does not hold raises `LimitNotApplied`; that group is
then retired (removed, never handed out again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable

from supervisor.sandbox.cgroup_host import HOST_FS, CgroupFS, layer_name

log = logging.getLogger("arcp.cgroups")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


def describe_limit(key: str, value: int) -> str:
    """A limit in the words of the contract's messages."""
    return {"memory_mb": f"memory limit {value} MiB", "max_procs": f"process limit {value}",
            "cpu_sec": f"cpu time limit {value} s"}.get(key, f"{key} limit {value}")


class LimitNotApplied(Exception):
    """A layer could not apply one of a job's limits: the job must not run without it."""

    def __init__(self, key: str, value: int, layer: str, reason: str) -> None:
        super().__init__(f"could not apply {describe_limit(key, value)} ({layer}): {reason}")
        self.key = key
        self.value = value
        self.layer = layer
        self.reason = reason

    @property
    def details(self) -> dict[str, int | str]:
        return {"limit": self.key, "value": self.value, "layer": self.layer}


class _NotHeld(Exception):
    """A control file does not hold the value written to it."""


def _number(text: str) -> int | None:
    """A control file's value: an integer, or None for "max" (no limit)."""
    text = text.strip()
    if text == "max":
        return None
    return int(text)


class WorkerCgroup:
    """The cgroup directories of one worker (one per controller in v1)."""

    def __init__(self, dirs: dict[str, str], v2: bool, fs: CgroupFS | None = None) -> None:
        self.dirs = dirs  # controller -> directory ("unified" in v2)
        self.v2 = v2
        self.fs = fs or HOST_FS
        self.retired = False  # a limit did not hold here: removed when its worker is gone, never reused
        self.oom_base = 0  # OOM kills counted before the current worker joined (groups are reused)
        # (memory, max_procs) written and read back for the current worker: only the supervisor
        # writes these files (root's, outside every job's view), so its next job with the same
        # limits (a reused worker) finds them in place and is spared the reads
        self.verified: tuple[int, int] | None = None
        self._counters: dict[str, int] = {}  # counter file -> a descriptor kept open (_counter)
        self._files: dict[tuple[str, str], str] = {}  # (controller, file name) -> its path (_file)

    def procs_files(self) -> list[str]:
        """The files the worker writes "0" to, to move itself into its groups."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def layer(self, ctl: str) -> str:
        """The sandbox layer that `ctl` is, named as `CgroupHost.layers` (and so job.accepted) name it."""
        return layer_name("v2" if self.v2 else "v1", "unified" if self.v2 else ctl)

    @property
    def limits_memory(self) -> bool:
        return "memory" in self.dirs or "unified" in self.dirs

    @property
    def counts_cpu(self) -> bool:
        return "cpuacct" in self.dirs or "unified" in self.dirs

    @property
    def cpu_layer(self) -> str:
        return self.layer("cpuacct")

    # -- limits ---------------------------------------------------------------
    def set_limits(self, memory: int, max_procs: int) -> None:
        """Apply a job's memory (bytes) and process limits, whatever the group held before.

        Each controller is written on its own (one failing does not skip the next) and
        every value is read back. Raises `LimitNotApplied` for the first limit that does
        not hold, after trying them all.
        """
        if self.verified == (memory, max_procs):
            return
        self.verified = None
        failures: list[LimitNotApplied] = []

        def attempt(key: str, value: int, ctl: str, apply: Callable[[], None]) -> None:
            try:
                apply()
            except (OSError, ValueError, _NotHeld) as e:
                failures.append(LimitNotApplied(key, value, self.layer(ctl), _reason(e)))

        mem_mib = memory // MiB
        if self.v2:
            d = self.dirs["unified"]
            attempt("memory_mb", mem_mib, "unified", lambda: self._set(os.path.join(d, "memory.max"), _pages(memory)))
            with contextlib.suppress(OSError):  # no swap on this host: nothing to keep out of it
                self.fs.write(os.path.join(d, "memory.swap.max"), "0")
            with contextlib.suppress(OSError):
                self.fs.write(os.path.join(d, "memory.oom.group"), "1")
            attempt("max_procs", max_procs, "unified", lambda: self._set(os.path.join(d, "pids.max"), max_procs))
        else:
            if "memory" in self.dirs:
                attempt("memory_mb", mem_mib, "memory", lambda: self._v1_memory(self.dirs["memory"], memory))
            if "pids" in self.dirs:
                attempt("max_procs", max_procs, "pids",
                        lambda: self._set(os.path.join(self.dirs["pids"], "pids.max"), max_procs))
        if failures:
            for f in failures[1:]:
                log.error("%s", f)
            raise failures[0]
        self.verified = (memory, max_procs)

    def _v1_memory(self, d: str, memory: int) -> None:
        """v1 keeps memory.memsw.limit_in_bytes >= memory.limit_in_bytes at every write
        (EINVAL otherwise): to raise the limit memsw goes first, to lower it memory does."""
        want = _pages(memory)
        mem = os.path.join(d, "memory.limit_in_bytes")
        memsw = os.path.join(d, "memory.memsw.limit_in_bytes")
        current = _number(self.fs.read(mem))
        try:
            self.fs.read(memsw)
            order = [memsw, mem] if current is None or want > current else [mem, memsw]
        except FileNotFoundError:  # no swap accounting: RAM is all there is to limit
            order = [mem]
        for path in order:
            self._set(path, want)

    def _set(self, path: str, want: int) -> None:
        """Write `want` unless the file holds it already; read it back."""
        try:
            if _number(self.fs.read(path)) != want:
                self.fs.write(path, str(want))
            got = _number(self.fs.read(path))
        except OSError as e:
            raise _NotHeld(f"{os.path.basename(path)}: {e.strerror or e}") from e
        if got != want:
            raise _NotHeld(f"{os.path.basename(path)} reads {'max' if got is None else got} "
                           f"after writing {want}")

    # -- CPU time -------------------------------------------------------------
    def cpu_usage_ns(self) -> int:
        """CPU time used by every task the group ever held, in ns (OSError, ValueError)."""
        if self.v2:
            for line in self._counter(self._file("unified", "cpu.stat")).splitlines():
                k, _, v = line.partition(" ")
                if k == "usage_usec":
                    return int(v) * 1000
            raise ValueError("cpu.stat has no usage_usec")
        return int(self._counter(self._file("cpuacct", "cpuacct.usage")))

    def cpu_split(self) -> tuple[int, int]:
        """The group's CPU time as (user, system), in a unit of the kernel's (v1 `cpuacct.stat`
        ticks, v2 microseconds): what the two are of a stretch of `cpu_usage_ns` (OSError, ValueError)."""
        if self.v2:
            stat = _keyed(self._counter(self._file("unified", "cpu.stat")), "cpu.stat", "user_usec", "system_usec")
            return stat["user_usec"], stat["system_usec"]
        stat = _keyed(self._counter(self._file("cpuacct", "cpuacct.stat")), "cpuacct.stat", "user", "system")
        return stat["user"], stat["system"]

    # -- usage: memory and tasks (supervisor/usage.py) ------------------------------
    def _usage_file(self, ctl: str, v1_name: str, v2_name: str) -> str | None:
        if self.v2:
            return self._file("unified", v2_name)
        return None if ctl not in self.dirs else self._file(ctl, v1_name)

    def _file(self, ctl: str, name: str) -> str:
        """The path of controller `ctl`'s file `name` in this group (joined once: the runner
        reads the same few files at every job's start and end)."""
        key = (ctl, name)
        path = self._files.get(key)
        if path is None:
            path = self._files[key] = os.path.join(self.dirs[ctl], name)
        return path

    def _read_count(self, path: str | None) -> int | None:
        """A counter file's value; None where the group has no such file or it cannot be read."""
        if path is None:
            return None
        try:
            return _number(self._counter(path))
        except (OSError, ValueError):
            return None

    def _counter(self, path: str) -> str:
        """A counter file's text, read through a descriptor kept open for as long as this
        object lives (a pread at offset 0 has the kernel render it afresh: 2 µs here, where
        an open, read and close takes 12; the runner reads several a second per job). Once
        the group is removed the read fails (ENODEV)."""
        fd = self._counters.get(path)
        if fd is None:
            opened = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            fd = self._counters.setdefault(path, opened)  # read from a thread too: one descriptor kept
            if fd != opened:
                os.close(opened)
        return os.pread(fd, 4096, 0).decode()

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # Not at remove(): a reader (on a thread, too) may still hold the group.
        for fd in getattr(self, "_counters", {}).values():
            _close(fd)

    def memory_current(self) -> int | None:
        """Bytes the group is charged for now."""
        return self._read_count(self._usage_file("memory", "memory.usage_in_bytes", "memory.current"))

    def memory_peak(self) -> int | None:
        """The group's memory high-water mark in bytes (since the last `reset_memory_peak`)."""
        return self._read_count(self._usage_file("memory", "memory.max_usage_in_bytes", "memory.peak"))

    def reset_memory_peak(self) -> bool:
        """Start the memory high-water mark afresh from what the group holds now (v1: 0 written
        to `memory.max_usage_in_bytes`); False where it cannot be (v2 resets `memory.peak` only
        for reads through the descriptor that wrote it)."""
        if self.v2 or "memory" not in self.dirs:
            return False
        try:
            self.fs.write(os.path.join(self.dirs["memory"], "memory.max_usage_in_bytes"), "0")
        except OSError:
            return False
        return True

    def pids_current(self) -> int | None:
        """Tasks (processes and threads) in the group now, as `pids.max` counts them."""
        return self._read_count(self._usage_file("pids", "pids.current", "pids.current"))

    def pids_peak(self) -> int | None:
        """The most tasks the group ever held at once (kernels that keep `pids.peak`; never reset)."""
        return self._read_count(self._usage_file("pids", "pids.peak", "pids.peak"))

    # -- memory events -----------------------------------------------------------
    def oom_kills(self) -> int:
        """OOM kills the kernel made in this group so far."""
        try:
            if self.v2:
                text = self.fs.read(os.path.join(self.dirs["unified"], "memory.events"))
            elif "memory" in self.dirs:
                text = self.fs.read(os.path.join(self.dirs["memory"], "memory.oom_control"))
            else:
                return 0
        except OSError:
            return 0
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill" and v.strip().isdigit():
                return int(v)
        return 0

    def memory_exceeded(self) -> bool:
        """Did the kernel OOM-kill a task of this group since the current worker joined?"""
        return self.oom_kills() > self.oom_base

    # -- tasks ----------------------------------------------------------------------
    def pids(self, strict: bool = False) -> list[int]:
        """The processes of the group ([] if it cannot be read, or OSError when `strict`)."""
        d = (self.dirs.get("unified") or self.dirs.get("pids") or self.dirs.get("memory")
             or self.dirs.get("cpuacct"))
        if d is None:
            return []
        try:
            return [int(x) for x in self.fs.read(os.path.join(d, "cgroup.procs")).split()]
        except (OSError, ValueError) as e:
            if strict:
                raise OSError(f"cannot read the group's processes: {e}") from e
            return []

    def kill_all(self) -> None:
        """SIGKILL every task of the group, wherever it moved in the process tree."""
        if self.v2:
            with contextlib.suppress(OSError):
                self.fs.write(os.path.join(self.dirs["unified"], "cgroup.kill"), "1")
                return
        self._kill(self.pids(), keep=None)

    def kill_others(self, keep: int) -> list[int]:
        """SIGKILL every process of the group but `keep` (the worker); the pids signalled."""
        return self._kill(self.pids(), keep)

    def _kill(self, pids: list[int], keep: int | None) -> list[int]:
        """Signal each pid through a pidfd taken while it was still listed in the group, so a
        pid that exited and was reused by a process elsewhere is never signalled."""
        handles: list[tuple[int, int]] = []
        for pid in pids:
            if pid == keep:
                continue
            try:
                handles.append((pid, os.pidfd_open(pid)))
            except OSError:
                continue  # gone already
        if not handles:
            return []
        still = set(self.pids())
        killed = []
        for pid, fd in handles:
            try:
                if pid in still:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    killed.append(pid)
            except OSError:
                pass
            finally:
                os.close(fd)
        return killed

    def remove(self) -> bool:
        """Remove the directories; False while tasks remain (try again later)."""
        ok = True
        for d in self.dirs.values():
            try:
                self.fs.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok


def _keyed(text: str, name: str, *required: str) -> dict[str, int]:
    """A flat-keyed control file ("key value" lines) as integers; ValueError if a value is
    not one or a `required` key is missing."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k:
            out[k] = int(v)
    for k in required:
        if k not in out:
            raise ValueError(f"{name} has no {k}")
    return out


def _pages(n: int) -> int:
    """What the kernel keeps of a memory limit: whole pages."""
    return n // PAGE * PAGE


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)
