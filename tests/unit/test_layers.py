"""One decision of a job's sandbox layers (supervisor/sandbox/layers.py): for the same host
facts, `doctor` names exactly the layers the runtime lists in job.accepted, no more, no fewer.

The doctor side measures a host (here: faked facts, a fake cgroupfs) and predicts what `run`
would set up; the runtime side makes its groups with `Cgroups` on the same fake cgroupfs and
takes the rest from a fork server, modelled below on what worker/forkserver.py reports."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from supervisor import doctor
from supervisor.sandbox import layers
from supervisor.sandbox.cgroup_host import CgroupHost, detect
from supervisor.sandbox.cgroups import Cgroups
from supervisor.sandbox.layers import Host, Setup
from tests.unit.fake_cgroupfs import FakeCgroupFS

ROOT_HOST = Host(landlock_abi=7, seccomp_kernel=True, libseccomp=True, root=True)
IDMAP_OK = {"/tmp": "", "/work": ""}


@dataclass(frozen=True)
class Case:
    host: Host = ROOT_HOST
    cgroups: str = "v1"  # the fake cgroupfs: "v1", "v1-cpuacct", "v2", "v2-undelegated", "none"
    netns: bool = True  # a network namespace can be entered here
    loopback: bool = True  # and its loopback brought up
    tmp_capped: bool = True
    uids_ok: bool = True  # the job uid range passes the checks (root only)
    idmap: tuple[tuple[str, str], ...] = tuple(IDMAP_OK.items())


CASES = {
    "full": Case(),
    "no-landlock": Case(host=replace(ROOT_HOST, landlock_abi=0)),
    "landlock-abi3": Case(host=replace(ROOT_HOST, landlock_abi=3)),
    "no-libseccomp": Case(host=replace(ROOT_HOST, libseccomp=False)),
    "no-seccomp-in-kernel": Case(host=replace(ROOT_HOST, seccomp_kernel=False)),
    "cgroup-v1-cpuacct-only": Case(cgroups="v1-cpuacct"),
    "cgroup-v2": Case(cgroups="v2"),
    "cgroup-v2-undelegated": Case(cgroups="v2-undelegated"),
    "cgroup-none": Case(cgroups="none"),
    "not-root": Case(host=replace(ROOT_HOST, root=False), netns=False, loopback=False, tmp_capped=False, idmap=()),
    "not-root-netns": Case(host=replace(ROOT_HOST, root=False), tmp_capped=False, idmap=()),
    "namespaces-missing": Case(host=replace(ROOT_HOST, namespaces=("pid", "mnt", "ipc", "user")), netns=False,
                               loopback=False),
    "no-loopback": Case(loopback=False),
    "idmap-nowhere": Case(idmap=(("/tmp", "tmpfs: Invalid argument"),)),
    "uid-range-refused": Case(uids_ok=False),
}


def fake_cgroupfs(root: Path, kind: str) -> FakeCgroupFS:
    if kind == "v1":
        return FakeCgroupFS(str(root))
    if kind == "v1-cpuacct":
        return FakeCgroupFS(str(root), controllers=("cpuacct",))
    if kind == "none":
        return FakeCgroupFS(str(root), controllers=())
    fs = FakeCgroupFS(str(root), v2=True)
    if kind == "v2-undelegated":
        (root / "cgroup.subtree_control").write_text("cpu")
    return fs


class ModelForkServer:
    """What worker/forkserver.py serve() says in its "ready" message: it enters a network
    namespace where it can (and brings its loopback up), sets job uids up when asked and able,
    and gives each worker namespaces of its own only with both."""

    def __init__(self, case: Case) -> None:
        wanted = case.host.root  # the runtime asks for job uids exactly when it is root
        self.netns = case.netns
        self.loopback = case.netns and case.loopback
        self.job_uids = wanted and case.uids_ok
        self.job_uids_error = "" if self.job_uids else "refused"
        self.opened: list[str] = []
        self.worker_namespaces = ["mnt", "ipc", "net"] if self.job_uids and self.netns else []
        # it hides installed packages in a mount view of its own: which takes root
        self.hidden = ["/venv/lib/python3/site-packages"] if case.host.root else []
        self.hide_error = "" if case.host.root else "unshare(CLONE_NEWNS): Operation not permitted"
        self.not_hidden = [] if case.host.root else ["/venv/lib/python3/site-packages"]


@dataclass
class FakeJobDirs:
    capped: bool
    why_not: str


@dataclass
class MadeCgroups:
    in_use: CgroupHost


def doctor_setup(case: Case, root: Path) -> Setup:
    """What doctor measures and predicts on the case's host."""
    fs = fake_cgroupfs(root, case.cgroups)
    uids = case.host.root and case.uids_ok
    return layers.expected(cgroup=detect(str(root), fs), tmp_capped=case.tmp_capped,
                           tmp_why="" if case.tmp_capped else "cannot mount a tmpfs: Operation not permitted",
                           netns=case.netns, loopback=case.loopback, job_uids=uids,
                           job_uids_detail="uids 1-2" if uids else "no", idmap=dict(case.idmap),
                           packages_hidden=case.host.root, packages_detail="")


def runtime_job_list(case: Case, root: Path, net_fetch: bool) -> list[str] | None:
    """A job's sandbox list as the runtime makes it on the case's host: its start (layers
    decided from what it set up), then what it adds when it accepts the job. None where
    `run` does not start (job uids asked for and not confirmed)."""
    fs = fake_cgroupfs(root, case.cgroups)
    fork_server = ModelForkServer(case)
    if case.host.root and not fork_server.job_uids:
        return None
    setup = layers.confirmed(fork_server, Cgroups(str(root), fs),
                             FakeJobDirs(case.tmp_capped, "" if case.tmp_capped else "no"),
                             idmap=dict(case.idmap) if fork_server.job_uids else {})
    decided = layers.decide(case.host, setup)
    every_job, egress_unavailable = decided.every_job, decided.egress_unavailable  # as Runtime.start keeps them
    out = list(every_job)  # as the runtime's accept adds to them
    if case.tmp_capped:
        out.append("tmp-size-cap")
    if net_fetch and egress_unavailable is None:
        out.append("egress-proxy")
    return out


def model_job_list(case: Case, cgroup_layers: list[str], net_fetch: bool) -> list[str]:
    """The list spelled out from the facts, layer by layer, for the test to hold both sides to."""
    fork_server = ModelForkServer(case)
    host = case.host
    out = ["process-group", "parent-death-signal", "scrubbed-env", "private-tmp", "rlimits", "memory-watchdog",
           "no-new-privs", "no-capabilities"]
    if host.landlock_abi:
        out.append(f"landlock-abi{host.landlock_abi}")
    if host.seccomp_kernel and host.libseccomp:
        out += ["seccomp", "seccomp-self-only"]
    out += cgroup_layers
    if fork_server.job_uids:
        out += ["job-uids"] + (["idmapped-mounts"] if any(not why for _, why in case.idmap) else [])
    if fork_server.hidden:
        out.append("hidden-packages")
    if not fork_server.job_uids:
        out.append("shared-uid")
    out += [f"{ns}ns-per-worker" for ns in fork_server.worker_namespaces]
    if fork_server.netns and "net" not in fork_server.worker_namespaces:
        out.append("netns-empty")
    if case.tmp_capped:
        out.append("tmp-size-cap")
    if net_fetch and fork_server.netns and fork_server.loopback and host.landlock_abi >= 4:
        out.append("egress-proxy")
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_doctor_and_the_runtime_name_the_same_layers(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    (tmp_path / "doctor").mkdir()
    (tmp_path / "run").mkdir()
    rows, _ = doctor.examine(host=case.host, setup=doctor_setup(case, tmp_path / "doctor"))
    by_name = {r.name: r for r in rows}
    cgroup_layers = Cgroups(str(tmp_path / "run"), fake_cgroupfs(tmp_path / "run", case.cgroups)).layers
    for net_fetch in (False, True):
        listed = runtime_job_list(case, tmp_path / "run", net_fetch)
        if listed is None:  # `run` refuses to start: doctor claims neither uid layer
            assert not by_name["job-uids"].used and not by_name["shared-uid"].used
            return
        assert listed == model_job_list(case, cgroup_layers, net_fetch)
        claimed = [n for r in rows if r.used for n in r.job if n != "egress-proxy" or net_fetch]
        assert sorted(claimed) == sorted(listed), (name, net_fetch)
        unused = {n for r in rows if not r.used for n in r.job}  # a layer doctor says is not used
        assert not unused & set(listed), unused & set(listed)


def test_a_full_hosts_list_keeps_its_names_and_order(tmp_path: Path) -> None:
    assert runtime_job_list(CASES["full"], tmp_path, net_fetch=True) == [
        "process-group", "parent-death-signal", "scrubbed-env", "private-tmp", "rlimits", "memory-watchdog",
        "no-new-privs", "no-capabilities", "landlock-abi7", "seccomp", "seccomp-self-only", "cgroup-v1-cpuacct",
        "cgroup-v1-memory", "cgroup-v1-pids", "job-uids", "idmapped-mounts", "hidden-packages", "mntns-per-worker",
        "ipcns-per-worker", "netns-per-worker", "tmp-size-cap", "egress-proxy"]


def test_an_unprivileged_hosts_list(tmp_path: Path) -> None:
    host = Host(landlock_abi=3, seccomp_kernel=True, libseccomp=False, root=False)
    case = Case(host=host, cgroups="none", netns=True, loopback=True, tmp_capped=False, idmap=())
    assert runtime_job_list(case, tmp_path, net_fetch=True) == [
        "process-group", "parent-death-signal", "scrubbed-env", "private-tmp", "rlimits", "memory-watchdog",
        "no-new-privs", "no-capabilities", "landlock-abi3", "shared-uid", "netns-empty"]


def test_doctor_names_the_guarantees_the_faked_host_lacks(tmp_path: Path) -> None:
    def missing(name: str) -> dict[str, str]:
        case = CASES[name]
        d = tmp_path / name
        d.mkdir()
        text, status = doctor.report(True, host=case.host, setup=doctor_setup(case, d))
        data = json.loads(text)
        assert set(data["layers"][0]) == {"name", "available", "used", "detail"}
        assert status == (0 if data["ok"] else 1)
        return {g["name"]: g["missing"] for g in data["guarantees"] if not g["ok"]}

    assert missing("full") == {}
    assert set(missing("no-landlock")) == {"files", "other-jobs"}
    assert set(missing("no-libseccomp")) == {"descriptors-and-privileges", "other-jobs"}
    assert set(missing("cgroup-v1-cpuacct-only")) == {"other-jobs"}  # CPU time counted, memory not limited
    assert set(missing("namespaces-missing")) == {"network", "other-jobs"}  # no IPC namespace per worker
    assert set(missing("idmap-nowhere")) == {"host-files"}
    assert {"own-uid", "host-files", "other-jobs"} <= set(missing("not-root"))


def test_doctors_text_lists_every_row(tmp_path: Path) -> None:
    case = CASES["full"]
    text, status = doctor.report(False, host=case.host, setup=doctor_setup(case, tmp_path))
    lines = text.splitlines()
    assert status == 0 and lines[0].split() == ["layer", "here", "used", "detail"]
    width = lines[0].index("here")
    rows = lines[1:lines.index("")]
    assert all(r[width:width + 4].strip() in ("yes", "no") for r in rows), rows
    assert {r.split()[0] for r in rows} >= {"landlock", "parent-death-signal", "private-tmp", "shared-uid"}


def test_doctors_prediction_is_what_a_real_fork_server_confirms_here() -> None:
    """On this host: doctor's measurement against the fork server the runtime starts."""
    from supervisor.jobs.fork_server import ForkServer

    host = Host.read()
    measured = layers.measure(host)
    if host.root and not measured.job_uids:
        pytest.skip(f"`run` does not start here: {measured.job_uids_detail}")

    async def ready() -> ForkServer:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1"}
        fs = ForkServer(env, os.getcwd(), [], None, job_uids=host.root)
        fs.start()
        try:
            await fs.wait_ready()
        finally:
            fs.close()
        return fs

    fork_server = asyncio.run(ready())
    confirmed = layers.confirmed(fork_server, MadeCgroups(CgroupHost("none", ())), FakeJobDirs(False, ""))
    # what the fork server confirms: the same as doctor predicted
    assert (confirmed.netns, confirmed.loopback, confirmed.job_uids, confirmed.worker_namespaces) == \
        (measured.netns, measured.loopback, measured.job_uids, measured.worker_namespaces)
    assert confirmed.idmap == measured.idmap
