"""Any sequence of jobs' limits on one recycled group: after every step the control files
read exactly the limits asked for (fake cgroupfs with the kernel's memsw >= memory rule)."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.sandbox.cgroups import Cgroups
from supervisor.sandbox.worker_cgroup import MiB
from tests.unit.fake_cgroupfs import FakeCgroupFS

steps = st.lists(st.tuples(st.integers(1, 64 * 1024), st.integers(1, 4096)), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(steps=steps, mode=st.sampled_from(["v1", "v1-noswap", "v2"]), recycle=st.booleans())
def test_read_back_equals_the_request_at_every_step(steps: list[tuple[int, int]], mode: str,
                                                    recycle: bool) -> None:
    with tempfile.TemporaryDirectory() as root:
        fs = FakeCgroupFS(root, v2=mode == "v2", swap=mode != "v1-noswap")
        cgs = Cgroups(root, fs)
        cg = cgs.reserve()
        assert cg is not None
        for mib, procs in steps:
            if recycle:  # the group passes to the next worker between jobs
                assert cgs.recycle(cg)
                cg = cgs.reserve()
                assert cg is not None
            cg.set_limits(mib * MiB, procs)
            if mode == "v2":
                d = cg.dirs["unified"]
                assert fs.value(os.path.join(d, "memory.max")) == str(mib * MiB)
                assert fs.value(os.path.join(d, "pids.max")) == str(procs)
            else:
                d = cg.dirs["memory"]
                assert fs.value(os.path.join(d, "memory.limit_in_bytes")) == str(mib * MiB)
                if mode == "v1":
                    assert fs.value(os.path.join(d, "memory.memsw.limit_in_bytes")) == str(mib * MiB)
                assert fs.value(os.path.join(cg.dirs["pids"], "pids.max")) == str(procs)
