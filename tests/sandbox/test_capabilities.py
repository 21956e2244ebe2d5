"""A supervisor started without a capability it would use (a container that drops it):
`run` and `doctor` agree on what follows. Without CAP_NET_ADMIN the workers' loopback stays
down, so jobs with net.fetch get no network, and both say so while `run` serves; without
CAP_SETUID jobs cannot get uids of their own, so `run` refuses to start (status 2, naming
the capability) and `doctor` fails, unless --allow-shared-uid accepts that."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from shared import capabilities
from tests.conftest import EXE, ROOT

PR_CAPBSET_DROP = 24
AGENT = ["--agent", "echo=examples.agents:echo"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping one capability of root's needs root")


def _without(cap: int) -> Callable[[], None]:
    """For preexec_fn: take `cap` out of the bounding set, so the program exec'd after it
    (as root) starts without it."""
    def drop() -> None:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP failed")
    return drop


def _doctor(cap: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), "doctor", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_without(cap))


def _layer(doctor_out: str, name: str) -> str:
    lines = [line for line in doctor_out.splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, doctor_out
    return lines[0]


def _run_until_ready(cap: int, *args: str) -> tuple[int | None, str, str]:
    """Start `run` without `cap`: (None, its readiness line, its stderr so far) once it serves
    (then stopped), or (its exit status, "", its stderr) if it ended first."""
    proc = subprocess.Popen([str(EXE), "run", "--port", "0", *AGENT, *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_without(cap))
    assert proc.stdout is not None and proc.stderr is not None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                if line:
                    os.killpg(proc.pid, signal.SIGTERM)
                    _, err = proc.communicate(timeout=30)
                    return None, line, err
                status = proc.wait(timeout=30)  # stdout closed: it ended
                return status, "", proc.stderr.read()
        raise AssertionError("run neither served nor ended within 60 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_missing_names_what_a_mask_lacks() -> None:
    have = capabilities.mask([capabilities.CAP_SETGID, capabilities.CAP_SYS_ADMIN])
    assert capabilities.missing(capabilities.FOR_JOB_UIDS, have) == ["CAP_SETUID"]
    assert capabilities.missing(capabilities.FOR_JOB_UIDS, have | 1 << capabilities.CAP_SETUID) == []
    assert capabilities.held("CapBnd") >> capabilities.CAP_SETUID & 1  # root here holds it


def test_without_cap_net_admin_run_serves_and_both_say_net_fetch_has_no_network() -> None:
    status, line, err = _run_until_ready(capabilities.CAP_NET_ADMIN)
    assert status is None and "listening on ws://" in line, err  # (it exited 2: its fork server's capset failed)
    assert "jobs with net.fetch get no network" in err
    doctor = _doctor(capabilities.CAP_NET_ADMIN)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "no    no" in _layer(doctor.stdout, "egress-proxy")
    assert "yes   yes" in _layer(doctor.stdout, "job-uids")


def test_without_cap_setuid_run_refuses_naming_it_and_doctor_fails_the_same() -> None:
    status, _, err = _run_until_ready(capabilities.CAP_SETUID)
    assert status == 2, err
    errors = [line for line in err.splitlines() if line.startswith("arcp-supervisor: error:")]
    assert len(errors) == 1 and "CAP_SETUID" in errors[0] and "--allow-shared-uid" in errors[0], err
    doctor = _doctor(capabilities.CAP_SETUID)
    assert doctor.returncode == 1, doctor.stdout  # (it said job-uids yes, and the guarantees failed elsewhere)
    uids = _layer(doctor.stdout, "job-uids")
    assert "no    no" in uids and "CAP_SETUID" in uids
    assert "yes   yes" in _layer(doctor.stdout, "shared-uid")


def test_without_cap_setuid_and_with_allow_shared_uid_both_accept_it() -> None:
    status, line, err = _run_until_ready(capabilities.CAP_SETUID, "--allow-shared-uid")
    assert status is None and "listening on ws://" in line, err
    assert "job uids off: the supervisor lacks CAP_SETUID" in err
    doctor = _doctor(capabilities.CAP_SETUID, "--allow-shared-uid")
    assert doctor.returncode == 0, doctor.stdout
