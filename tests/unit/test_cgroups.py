"""Per-worker cgroups against a fake cgroupfs that keeps the kernel's rules: limits are
applied in an order the kernel accepts from whatever a recycled group held, each
controller on its own, and read back; a group whose limit did not hold is retired."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.sandbox import cgroup_host
from supervisor.sandbox.cgroup_host import CgroupHost, detect
from supervisor.sandbox.cgroups import Cgroups
from supervisor.sandbox.worker_cgroup import MiB, LimitNotApplied, WorkerCgroup
from tests.unit.fake_cgroupfs import FakeCgroupFS


def v1(tmp_path: Path, swap: bool = True) -> tuple[Cgroups, FakeCgroupFS]:
    fs = FakeCgroupFS(str(tmp_path), swap=swap)
    return Cgroups(str(tmp_path), fs), fs


def limits(fs: FakeCgroupFS, cg: WorkerCgroup) -> dict[str, str]:
    out = {}
    for ctl, d in cg.dirs.items():
        for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.max", "pids.max"):
            if os.path.exists(os.path.join(d, name)):
                out[name] = fs.value(os.path.join(d, name))
    return out


def test_the_fake_refuses_what_the_kernel_refuses(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path)
    cg = cgs.reserve()
    assert cg is not None
    mem = os.path.join(cg.dirs["memory"], "memory.limit_in_bytes")
    memsw = os.path.join(cg.dirs["memory"], "memory.memsw.limit_in_bytes")
    fs.write(mem, str(100 * MiB))
    fs.write(memsw, str(100 * MiB))
    with pytest.raises(OSError) as ei:  # the order of the old code: memory first when raising
        fs.write(mem, str(300 * MiB))
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        fs.write(memsw, str(50 * MiB))


def test_v1_tight_loose_tight_memory_and_pids(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path)
    cg = cgs.reserve()
    assert cg is not None and set(cg.dirs) == {"memory", "pids", "cpuacct"}
    for mib, procs in [(100, 8), (512, 64), (100, 8), (100, 8), (4096, 1024), (1, 1)]:
        cg.set_limits(mib * MiB, procs)
        assert limits(fs, cg) == {"memory.limit_in_bytes": str(mib * MiB),
                                  "memory.memsw.limit_in_bytes": str(mib * MiB), "pids.max": str(procs)}


def test_v1_raising_writes_memsw_first_and_lowering_writes_memory_first(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path)
    cg = cgs.reserve()
    assert cg is not None
    cg.set_limits(100 * MiB, 8)
    fs.writes.clear()
    cg.set_limits(300 * MiB, 64)
    names = [os.path.basename(p) for p, _ in fs.writes]
    assert names == ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes", "pids.max"]
    fs.writes.clear()
    cg.set_limits(100 * MiB, 8)
    names = [os.path.basename(p) for p, _ in fs.writes]
    assert names == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "pids.max"]
    fs.writes.clear()
    cg.set_limits(100 * MiB, 8)  # what the group holds already: read back, nothing written
    assert fs.writes == []


def test_a_recycled_group_takes_the_next_jobs_limits(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path)
    cg = cgs.reserve()
    assert cg is not None
    cg.set_limits(100 * MiB, 8)
    assert cgs.recycle(cg)
    again = cgs.reserve()
    assert again is cg
    again.set_limits(512 * MiB, 64)
    assert limits(fs, again)["memory.limit_in_bytes"] == str(512 * MiB)
    assert limits(fs, again)["pids.max"] == "64"


def test_without_swap_accounting_memory_alone_is_set(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path, swap=False)
    cg = cgs.reserve()
    assert cg is not None
    for mib in (100, 512, 100):
        cg.set_limits(mib * MiB, 8)
        assert limits(fs, cg) == {"memory.limit_in_bytes": str(mib * MiB), "pids.max": "8"}


def test_a_failing_controller_does_not_skip_the_next_and_names_limit_and_layer(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path)
    cg = cgs.reserve()
    assert cg is not None
    fs.fail["memory.memsw.limit_in_bytes"] = OSError(errno.EBUSY, os.strerror(errno.EBUSY))
    with pytest.raises(LimitNotApplied) as ei:
        cg.set_limits(300 * MiB, 12)
    e = ei.value
    assert str(e).startswith("could not apply memory limit 300 MiB (cgroup-v1-memory): memory.memsw")
    assert e.details == {"limit": "memory_mb", "value": 300, "layer": "cgroup-v1-memory"}
    assert limits(fs, cg)["pids.max"] == "12"  # written all the same


def test_a_value_that_does_not_read_back_is_not_applied(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path)
    cg = cgs.reserve()
    assert cg is not None
    cg.set_limits(256 * MiB, 16)
    fs.ignore.add("pids.max")  # accepted and dropped: the group keeps 16
    with pytest.raises(LimitNotApplied) as ei:
        cg.set_limits(256 * MiB, 64)
    assert ei.value.key == "max_procs" and ei.value.value == 64 and ei.value.layer == "cgroup-v1-pids"
    assert "pids.max reads 16 after writing 64" in str(ei.value)


def test_a_retired_group_is_removed_never_handed_out_again(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path)
    cg = cgs.reserve()
    assert cg is not None
    cg.retired = True
    assert cgs.recycle(cg)
    assert not any(os.path.exists(d) for d in cg.dirs.values())
    fresh = cgs.reserve()
    assert fresh is not None and fresh is not cg and fresh.dirs != cg.dirs
    fresh.retired = True
    cgs.unreserve(fresh)
    assert not any(os.path.exists(d) for d in fresh.dirs.values())


def test_v2_tight_loose_tight(tmp_path: Path) -> None:
    fs = FakeCgroupFS(str(tmp_path), v2=True)
    cgs = Cgroups(str(tmp_path), fs)
    assert cgs.mode == "v2"
    cg = cgs.reserve()
    assert cg is not None
    for mib, procs in [(100, 8), (512, 64), (100, 8)]:
        cg.set_limits(mib * MiB, procs)
        assert limits(fs, cg) == {"memory.max": str(mib * MiB), "pids.max": str(procs)}
    fs.fail["memory.max"] = OSError(errno.EACCES, os.strerror(errno.EACCES))
    with pytest.raises(LimitNotApplied) as ei:
        cg.set_limits(200 * MiB, 8)
    assert ei.value.layer == "cgroup-v2-unified" and ei.value.key == "memory_mb"


def test_cpu_usage_is_read_from_cpuacct_or_cpu_stat(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    cgs, fs = v1(tmp_path / "a")
    cg = cgs.reserve()
    assert cg is not None and cg.counts_cpu and cg.cpu_layer == "cgroup-v1-cpuacct"
    assert "cgroup-v1-cpuacct" in cgs.layers
    fs.write(os.path.join(cg.dirs["cpuacct"], "cpuacct.usage"), "1500000000")
    assert cg.cpu_usage_ns() == 1_500_000_000
    (tmp_path / "b").mkdir()
    fs2 = FakeCgroupFS(str(tmp_path / "b"), v2=True)
    cg2 = Cgroups(str(tmp_path / "b"), fs2).reserve()
    assert cg2 is not None and cg2.counts_cpu
    fs2.write(os.path.join(cg2.dirs["unified"], "cpu.stat"), "usage_usec 2500\nuser_usec 2000\n")
    assert cg2.cpu_usage_ns() == 2_500_000


def test_kill_others_spares_the_worker(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path)
    cg = cgs.reserve()
    assert cg is not None
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for d in cg.dirs.values():
            fs.write(os.path.join(d, "cgroup.procs"), f"{os.getpid()}\n{leftover.pid}\n")
        assert cg.kill_others(os.getpid()) == [leftover.pid]
        assert leftover.wait(5) == -signal.SIGKILL
    finally:
        leftover.kill()
        leftover.wait()


def test_a_reused_workers_same_limits_are_not_read_again_until_the_group_is_recycled(tmp_path: Path) -> None:
    cgs, fs = v1(tmp_path)
    cg = cgs.reserve()
    assert cg is not None
    cg.set_limits(100 * MiB, 8)
    calls: list[str] = []
    real_read, real_write = fs.read, fs.write

    def read(path: str) -> str:
        calls.append(path)
        return real_read(path)

    def write(path: str, value: str) -> None:
        calls.append(path)
        real_write(path, value)

    fs.read = read  # type: ignore[method-assign]
    fs.write = write  # type: ignore[method-assign]
    cg.set_limits(100 * MiB, 8)  # the next job of the same worker, same limits
    assert calls == []
    cg.set_limits(200 * MiB, 8)  # other limits: written and read back
    assert calls and limits(fs, cg)["memory.limit_in_bytes"] == str(200 * MiB)
    calls.clear()
    assert cgs.recycle(cg)
    cg.set_limits(200 * MiB, 8)  # a new worker in the recycled group: checked again
    assert calls


# -- detection: one function, for `Cgroups` and for `doctor` ----------------------------------
def test_detect_v1_and_cgroups_make_groups_where_it_says(tmp_path: Path) -> None:
    fs = FakeCgroupFS(str(tmp_path))
    found = detect(str(tmp_path), fs)
    assert found == CgroupHost("v1", ("memory", "pids", "cpuacct"))
    assert found.bounds_memory_and_tasks
    assert found.layers == ["cgroup-v1-cpuacct", "cgroup-v1-memory", "cgroup-v1-pids"]
    cgs = Cgroups(str(tmp_path), fs)
    assert cgs.in_use.layers == cgs.layers == found.layers and cgs.mode == "v1"


def test_detect_v1_with_only_cpuacct_counts_cpu_but_limits_nothing(tmp_path: Path) -> None:
    fs = FakeCgroupFS(str(tmp_path), controllers=("cpuacct",))
    found = detect(str(tmp_path), fs)
    assert found.version == "v1" and found.controllers == ("cpuacct",) and not found.bounds_memory_and_tasks
    assert "memory not mounted" in found.why and "pids not mounted" in found.why
    assert Cgroups(str(tmp_path), fs).layers == ["cgroup-v1-cpuacct"]


def test_detect_v1_skips_a_controller_that_may_not_be_written(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fs = FakeCgroupFS(str(tmp_path))
    real_access = os.access
    monkeypatch.setattr(cgroup_host.os, "access",
                        lambda p, mode: False if p == str(tmp_path / "pids") else real_access(p, mode))
    found = detect(str(tmp_path), fs)
    assert found.controllers == ("memory", "cpuacct") and "pids may not be written" in found.why
    assert Cgroups(str(tmp_path), fs).layers == ["cgroup-v1-cpuacct", "cgroup-v1-memory"]


def test_detect_v2_delegated_or_not(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    fs = FakeCgroupFS(str(tmp_path / "a"), v2=True)
    found = detect(str(tmp_path / "a"), fs)
    assert found == CgroupHost("v2", ("unified",)) and found.bounds_memory_and_tasks
    cgs = Cgroups(str(tmp_path / "a"), fs)
    assert cgs.layers == ["cgroup-v2-unified"] and cgs.mode == "v2"
    (tmp_path / "b").mkdir()
    fs = FakeCgroupFS(str(tmp_path / "b"), v2=True)
    (tmp_path / "b" / "cgroup.subtree_control").write_text("cpu memory")
    found = detect(str(tmp_path / "b"), fs)
    assert found.version == "v2" and found.controllers == () and "not delegated" in found.why
    cgs = Cgroups(str(tmp_path / "b"), fs)
    assert cgs.layers == [] and cgs.mode == "none" and cgs.reserve() is None


def test_detect_nothing_mounted(tmp_path: Path) -> None:
    fs = FakeCgroupFS(str(tmp_path), controllers=())
    assert detect(str(tmp_path), fs) == CgroupHost("none", (), "memory not mounted, pids not mounted, "
                                                                 "cpuacct not mounted")
    cgs = Cgroups(str(tmp_path), fs)
    assert cgs.layers == [] and cgs.mode == "none" and cgs.reserve() is None


def test_a_group_that_cannot_be_made_is_not_named(tmp_path: Path) -> None:
    class NoPids(FakeCgroupFS):
        def mkdir(self, path: str) -> None:
            if os.path.relpath(path, self.root).startswith("pids"):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
            super().mkdir(path)

    fs = NoPids(str(tmp_path))
    assert detect(str(tmp_path), fs).controllers == ("memory", "pids", "cpuacct")  # it looked possible
    cgs = Cgroups(str(tmp_path), fs)
    assert cgs.layers == ["cgroup-v1-cpuacct", "cgroup-v1-memory"] and "cannot create" in cgs.in_use.why
