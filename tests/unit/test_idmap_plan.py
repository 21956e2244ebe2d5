"""Which idmapped mounts a lease gets (worker.idmap.plan): its roots, and the outermost
directory on the way to one that other uids cannot search."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.idmap import Mount, plan


@pytest.fixture()
def top() -> Iterator[Path]:
    """/tmp/X/top (0755) / closed (0700) / inner (0755): only `closed` is shut to others."""
    base = Path(tempfile.mkdtemp(prefix="arcp-plan-"))
    base.chmod(0o755)
    top = base / "top"
    (top / "closed" / "inner").mkdir(parents=True)
    top.chmod(0o755)
    (top / "closed").chmod(0o700)
    (top / "closed" / "inner").chmod(0o755)
    yield top
    shutil.rmtree(base)


def test_roots_and_the_closed_directory_on_the_way(top: Path) -> None:
    inner = str(top / "closed" / "inner")
    mounts = plan([inner], [])
    assert Mount(inner, False) in mounts and Mount(str(top / "closed"), False) in mounts
    assert [m.path for m in mounts] == sorted((m.path for m in mounts), key=lambda p: (p.count("/"), p))


def test_a_writable_root_keeps_its_writes_below_it(top: Path) -> None:
    inner = str(top / "closed" / "inner")
    mounts = {m.path: m.writable for m in plan([inner], [str(top)])}
    assert mounts[str(top)] is True and mounts[str(top / "closed")] is True and mounts[inner] is False


def test_a_root_in_both_lists_is_writable_and_absent_roots_are_skipped(top: Path) -> None:
    mounts = {m.path: m.writable for m in plan([str(top), str(top / "nope")], [str(top)])}
    assert mounts == {str(top): True}


def test_slash_is_never_mounted_read_only() -> None:
    assert plan(["/"], []) == []
