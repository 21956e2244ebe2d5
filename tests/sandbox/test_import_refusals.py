"""An import that Landlock refuses says so: the job's error (or the start-up check's) names the
directory on the import path and that neither the job's lease nor its agent's environment
covers it; with the directory leased, the same import works."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXE, Server
from tests.interop.client import sdk_session

REFUSED = "is on the import path but this job may not read it"
COVER = "(neither the job's lease nor its agent's environment covers it)"


@pytest.fixture()
def module_dir() -> Iterator[Path]:
    """A directory outside everything a job reads, readable by any uid, holding refused_mod.py."""
    d = Path(tempfile.mkdtemp(prefix="arcp-imp-"))
    d.chmod(0o755)
    (d / "refused_mod.py").write_text("VALUE = 42\n")
    (d / "refused_mod.py").chmod(0o644)
    yield d
    shutil.rmtree(d)


async def _import_from(url: str, d: Path, lease: dict[str, list[str]] | None = None) -> dict[str, Any]:
    async with sdk_session(url) as (client, rec):
        kw: dict[str, Any] = {"lease_request": lease} if lease else {}
        h = await client.submit(agent="importfrom", input={"dir": str(d), "module": "refused_mod"}, **kw)
        return await rec.terminal(h.job_id, timeout=30)


def test_an_import_from_a_directory_the_lease_does_not_cover_names_it(server: Server, module_dir: Path) -> None:
    t = asyncio.run(_import_from(server.url, module_dir))
    assert t["type"] == "job.error", t
    message = t["payload"]["message"]
    assert message == f"ModuleNotFoundError: No module named 'refused_mod': {module_dir} {REFUSED} {COVER}", message


def test_the_same_import_works_with_the_directory_leased(server: Server, module_dir: Path) -> None:
    t = asyncio.run(_import_from(server.url, module_dir, {"fs.read": [f"{module_dir}/**"]}))
    assert t["type"] == "job.result", t
    assert t["payload"]["result"] == {"value": 42}


def test_an_agent_whose_own_directory_is_refused_fails_its_start_up_check_saying_why(tmp_path: Path) -> None:
    """A namespace package's directory is not among what its agent's jobs read (only a
    module's or a regular package's is): its import is refused, and `run` says so."""
    cwd = tmp_path / "start"
    (cwd / "refused_ns").mkdir(parents=True)
    (cwd / "refused_ns" / "agent.py").write_text("def run(i, j):\n    return 1\n")
    r = subprocess.run([str(EXE), "run", "--port", "0", "--agent", "ns=refused_ns.agent:run"], cwd=cwd,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, start_new_session=True)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("arcp-supervisor: error:")]
    assert len(lines) == 1, r.stderr
    assert "agent ns@0.0.0 (refused_ns.agent:run): ModuleNotFoundError: No module named 'refused_ns" in lines[0]
    assert f": {cwd}" in lines[0] and f"{REFUSED} {COVER}" in lines[0], lines[0]
