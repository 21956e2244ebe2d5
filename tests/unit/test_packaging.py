"""A non-editable install (`pip install .`, the container image) holds every package of the
project: each directory with an __init__.py under shared/, supervisor/ and worker/ is one that
pyproject.toml's package list takes."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_installed() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]
    packages = sorted(".".join(p.parent.relative_to(ROOT).parts) for top in ("shared", "supervisor", "worker")
                      for p in (ROOT / top).rglob("__init__.py"))
    assert len(packages) > 10
    missing = [p for p in packages if not any(fnmatch.fnmatchcase(p, pattern) for pattern in include)]
    assert missing == [], f"not installed by `pip install .`: {missing}"
