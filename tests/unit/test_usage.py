"""supervisor/usage.py against a fake cgroupfs: each figure counts from the job's start on
a recycled group, from the kernel's counters where they serve and from samples where not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.sandbox.cgroups import Cgroups
from supervisor.sandbox.worker_cgroup import MiB, WorkerCgroup
from supervisor.core.frames import error_payload, result_payload
from supervisor.core.usage import USAGE_KEY, UsageMeter, outcome_of, sample_tree, usage_wire
from tests.unit.fake_cgroupfs import FakeCgroupFS

KEYS = {"wall_s", "cpu_user_s", "cpu_sys_s", "memory_peak_mb", "procs_peak", "net_bytes_in", "net_bytes_out"}


def _group(tmp_path: Path, v2: bool = False) -> tuple[WorkerCgroup, FakeCgroupFS]:
    fs = FakeCgroupFS(str(tmp_path), v2=v2)
    cg = Cgroups(str(tmp_path), fs).reserve()
    assert cg is not None
    return cg, fs


def _put(fs: FakeCgroupFS, cg: WorkerCgroup, ctl: str, name: str, text: str) -> None:
    fs._put(os.path.join(cg.dirs[ctl], name), text)


def _v1_counters(fs: FakeCgroupFS, cg: WorkerCgroup, usage_ns: int, user: int, system: int, max_usage: int,
                 pids: int, pids_peak: int) -> None:
    _put(fs, cg, "cpuacct", "cpuacct.usage", str(usage_ns))
    _put(fs, cg, "cpuacct", "cpuacct.stat", f"user {user}\nsystem {system}\n")
    _put(fs, cg, "memory", "memory.max_usage_in_bytes", str(max_usage))
    _put(fs, cg, "memory", "memory.usage_in_bytes", str(max_usage))
    _put(fs, cg, "pids", "pids.current", str(pids))
    _put(fs, cg, "pids", "pids.peak", str(pids_peak))


def test_v1_counts_from_the_jobs_start_on_a_recycled_group(tmp_path: Path) -> None:
    cg, fs = _group(tmp_path)
    _v1_counters(fs, cg, 2_000_000_000, 100, 100, 900 * MiB, 2, 40)  # what earlier jobs left
    meter = UsageMeter(cg, os.getpid(), started=100.0)
    meter.begin()
    assert any(p.endswith("/memory.max_usage_in_bytes") and v == "0" for p, v in fs.writes)  # afresh
    assert not meter.needs_tree
    # The job: 1.5 s of CPU, three quarters of its ticks in user mode; 160 MiB; 5 tasks at once.
    _v1_counters(fs, cg, 3_500_000_000, 250, 150, 160 * MiB, 5, 40)
    meter.sample()
    _put(fs, cg, "pids", "pids.current", "2")
    u = meter.read(102.5, net_in=10, net_out=20)
    assert u == {"wall_s": 2.5, "cpu_user_s": 1.125, "cpu_sys_s": 0.375, "memory_peak_mb": 160.0,
                 "procs_peak": 5, "net_bytes_in": 10, "net_bytes_out": 20}
    # A peak of tasks above every earlier job's was this job's, even between two samples.
    _put(fs, cg, "pids", "pids.peak", "41")
    assert meter.read(103.0)["procs_peak"] == 41


def test_v1_cpu_under_a_tick_is_user_time_and_an_unreadable_group_keeps_the_last_figures(tmp_path: Path) -> None:
    cg, fs = _group(tmp_path)
    _v1_counters(fs, cg, 0, 0, 0, 0, 1, 1)
    meter = UsageMeter(cg, os.getpid(), started=0.0)
    meter.begin()
    _put(fs, cg, "cpuacct", "cpuacct.usage", "4000000")
    assert meter.read(1.0)["cpu_user_s"] == 0.004
    os.unlink(os.path.join(cg.dirs["cpuacct"], "cpuacct.stat"))
    u = meter.read(2.0)
    assert (u["cpu_user_s"], u["cpu_sys_s"], u["wall_s"]) == (0.004, 0.0, 2.0)


def test_v2_peak_that_cannot_be_reset_counts_only_if_it_rose(tmp_path: Path) -> None:
    cg, fs = _group(tmp_path, v2=True)
    _put(fs, cg, "unified", "cpu.stat", "usage_usec 1000000\nuser_usec 600000\nsystem_usec 400000\n")
    _put(fs, cg, "unified", "memory.peak", str(500 * MiB))
    _put(fs, cg, "unified", "memory.current", str(10 * MiB))
    _put(fs, cg, "unified", "pids.current", "1")
    _put(fs, cg, "unified", "pids.peak", "9")
    meter = UsageMeter(cg, os.getpid(), started=0.0)
    meter.begin()
    assert not meter.needs_tree and not any(w[0].endswith("memory.peak") for w in fs.writes)
    for mib in (100, 120, 50):
        _put(fs, cg, "unified", "memory.current", str(mib * MiB))
        meter.sample()
    _put(fs, cg, "unified", "cpu.stat", "usage_usec 3000000\nuser_usec 2100000\nsystem_usec 900000\n")
    u = meter.read(1.0)
    assert (u["memory_peak_mb"], u["cpu_user_s"], u["cpu_sys_s"]) == (120.0, 1.5, 0.5)
    _put(fs, cg, "unified", "memory.peak", str(600 * MiB))
    assert meter.read(1.0)["memory_peak_mb"] == 600.0


def test_without_a_cgroup_the_process_tree_is_sampled() -> None:
    meter = UsageMeter(None, os.getpid(), started=0.0)
    meter.begin()
    assert meter.needs_tree
    x = 0
    for i in range(300_000):  # some CPU time of our own
        x += i
    tree = sample_tree(os.getpid())
    assert tree is not None and tree.rss > 0 and tree.tasks >= 1
    meter.sample(tree)
    u = meter.read(1.0)
    assert u["memory_peak_mb"] > 0 and u["procs_peak"] >= 1 and u["cpu_user_s"] + u["cpu_sys_s"] >= 0
    assert sample_tree(2 ** 22 + 12345) is None  # no such process


@pytest.mark.parametrize("status,error,outcome", [
    ("success", None, "success"),
    ("error", {"code": "INTERNAL_ERROR", "message": "boom"}, "error"),
    ("cancelled", {"code": "CANCELLED"}, "cancelled"),
    ("timed_out", {"code": "TIMEOUT"}, "timeout"),
    ("timed_out", {"code": "TIMEOUT", "details": {"limit": "cpu_sec", "value": 1}}, "limit"),
    ("error", {"code": "INTERNAL_ERROR", "details": {"limit": "memory_mb", "value": 64}}, "limit"),
    ("error", {"code": "INTERNAL_ERROR", "details": {"limit": "memory_mb", "value": 64, "layer": "x"}}, "error"),
])
def test_outcome(status: str, error: dict | None, outcome: str) -> None:
    assert outcome_of(status, error) == outcome


def test_terminal_payloads_carry_the_usage() -> None:
    u = usage_wire(1.23456, 0.5, 0.25, 3 * MiB + MiB // 3, 4, 5, 6)
    assert set(u) == KEYS and u["wall_s"] == 1.235 and u["memory_peak_mb"] == 3.3
    for flavour in ("go", "py"):
        assert result_payload(1, completed_at="t", flavour=flavour, usage=u)[USAGE_KEY] == u
        assert error_payload({"code": "CANCELLED", "message": "m"}, status="cancelled", completed_at="t",
                             flavour=flavour, usage=u)[USAGE_KEY] == u
    assert USAGE_KEY not in result_payload(1, completed_at="t", flavour="py")
