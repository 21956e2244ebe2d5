"""A supervisor that is not root cannot give jobs uids of their own: `run` refuses to start
unless told `--allow-shared-uid`, and `doctor` names what is then not enforced."""

from __future__ import annotations

import json

import pytest

from supervisor import doctor
from supervisor.sandbox import host
from supervisor.config import DEFAULT_JOB_UIDS, Config, ConfigError, check_uid_range


def test_run_refuses_a_shared_uid_unless_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError) as ei:
        host.job_uid_range(Config())
    assert "--allow-shared-uid" in str(ei.value) and "not root" in str(ei.value)
    assert host.job_uid_range(Config(allow_shared_uid=True)) is None


def test_root_uses_the_default_range_or_the_configured_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.os, "geteuid", lambda: 0)
    assert host.job_uid_range(Config()) == DEFAULT_JOB_UIDS
    assert host.job_uid_range(Config(job_uids=(70000, 70009))) == (70000, 70009)
    check_uid_range(DEFAULT_JOB_UIDS, "default")  # nobody on this host holds it


def test_a_range_holding_a_group_or_a_subordinate_range_is_refused(tmp_path: object,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="belongs to"):
        check_uid_range((0, 10), "r")  # root's uid and gid
    real_open = open

    def fake_open(path: str, *a: object, **kw: object) -> object:
        if path == "/etc/subuid":
            import io

            return io.StringIO("alice:1900000100:65536\n")
        return real_open(path, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(ConfigError, match="subordinate ids 1900000100-"):
        check_uid_range(DEFAULT_JOB_UIDS, "default")


def test_doctor_names_what_a_shared_uid_leaves_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 1000)
    text, status = doctor.report(True)
    data = json.loads(text)
    missing = {g["name"]: g["missing"] for g in data["guarantees"] if not g["ok"]}
    assert status == 1 and {"own-uid", "host-files", "other-jobs"} <= set(missing), missing
    assert "chmod" in missing["own-uid"]
    text, status = doctor.report(True, allow_shared_uid=True)
    data = json.loads(text)
    still = {g["name"] for g in data["guarantees"] if not g["ok"]} - set(doctor.SHARED_UID_ACCEPTS)
    assert status == (0 if not still else 1), still
    assert "accepted: --allow-shared-uid" in next(g["missing"] for g in data["guarantees"] if g["name"] == "own-uid")
