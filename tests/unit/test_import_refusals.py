"""worker/import_refusals.py: a failed import names the import path entries the job may not read.

With a fake verdict in this process, and for real in a forked child under a Landlock ruleset
made with the worker's own Sandbox (root bypasses file modes, Landlock it does not)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from worker import import_refusals
from worker.import_refusals import RefusalFinder, is_refused, may_hold, refusal_message
from worker.sandbox import LANDLOCK_ABI, Sandbox, python_read_dirs

COVER = "neither the job's lease nor its agent's environment covers"


def holds(entry: str, name: str) -> bool:
    """A fake: every refused entry holds every module."""
    return True


class FakeVerdicts:
    """Says which entries are refused and counts what it was asked."""

    def __init__(self, refused: set[str]) -> None:
        self.refused = refused
        self.asked: list[str] = []

    def __call__(self, entry: str) -> bool | None:
        self.asked.append(entry)
        return entry in self.refused


@pytest.fixture()
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two import path entries appended to sys.path (both empty: nothing imports from them)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    saved = list(sys.path)
    sys.path += [str(a), str(b)]
    try:
        yield a, b
    finally:
        sys.path[:] = saved
        sys.path_importer_cache.pop(str(a), None)
        sys.path_importer_cache.pop(str(b), None)


@contextmanager
def _installed(finder: Any) -> Iterator[None]:
    """`finder` last in sys.meta_path for the block."""
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


@pytest.fixture()
def fake(dirs: tuple[Path, Path]) -> Iterator[tuple[RefusalFinder, FakeVerdicts]]:
    verdicts = FakeVerdicts({str(dirs[0])})
    finder = RefusalFinder(verdicts, holds)
    with _installed(finder):
        yield finder, verdicts


def test_the_message_names_up_to_three_paths_then_counts() -> None:
    assert refusal_message("x", ["/a"]) == (
        "No module named 'x': /a is on the import path but this job may not read it "
        "(neither the job's lease nor its agent's environment covers it)")
    assert "/a and /b are on the import path but this job may not read them (" in refusal_message("x", ["/a", "/b"])
    assert ": /a, /b and /c are on" in refusal_message("x", ["/a", "/b", "/c"])
    five = refusal_message("p.q", ["/a", "/b", "/c", "/d", "/e"])
    assert five.startswith("No module named 'p.q': /a, /b, /c and 2 more are on the import path"), five
    assert "/d" not in five and f"{COVER} them)" in five


def test_a_failed_import_names_the_refused_entry(
        fake: tuple[RefusalFinder, FakeVerdicts], dirs: tuple[Path, Path]) -> None:
    with pytest.raises(ModuleNotFoundError) as e:
        import no_such_module_anywhere  # noqa: F401
    assert e.value.name == "no_such_module_anywhere"
    assert str(e.value) == (f"No module named 'no_such_module_anywhere': {dirs[0]} is on the import path but "
                            f"this job may not read it ({COVER} it)")
    with pytest.raises(ModuleNotFoundError, match=f"{dirs[0]} is on the import path"):
        importlib.import_module("no_such_module_anywhere")
    try:  # what optional-dependency code does keeps working
        import no_such_module_anywhere  # noqa: F401,F811
    except ImportError:
        pass


def test_a_probe_still_finds_nothing_and_a_found_module_costs_nothing(
        fake: tuple[RefusalFinder, FakeVerdicts]) -> None:
    finder, verdicts = fake
    assert importlib.util.find_spec("no_such_module_anywhere") is None  # no raise: a probe
    assert verdicts.asked == []
    sys.modules.pop("colorsys", None)
    import colorsys  # noqa: F401  (found by the path finder: the last finder is never asked)
    assert verdicts.asked == []


def test_nothing_refused_leaves_the_plain_error(dirs: tuple[Path, Path]) -> None:
    with _installed(RefusalFinder(FakeVerdicts(set()), holds)):
        with pytest.raises(ModuleNotFoundError) as e:
            import no_such_module_anywhere  # noqa: F401
        assert str(e.value) == "No module named 'no_such_module_anywhere'"


def test_a_refused_entry_without_the_module_leaves_the_plain_error(dirs: tuple[Path, Path]) -> None:
    a, b = map(str, dirs)
    asked: list[tuple[str, str]] = []

    def only_b_has_it(entry: str, name: str) -> bool:
        asked.append((entry, name))
        return entry == b and name == "wanted"

    with _installed(RefusalFinder(FakeVerdicts({a, b}), only_b_has_it)):
        with pytest.raises(ModuleNotFoundError) as e:
            import no_such_module_anywhere  # noqa: F401
        assert str(e.value) == "No module named 'no_such_module_anywhere'"
        with pytest.raises(ModuleNotFoundError) as e:
            import wanted  # type: ignore[import-not-found]  # noqa: F401
        assert str(e.value).startswith(f"No module named 'wanted': {b} is on the import path"), e.value
    assert (a, "wanted") in asked


def test_verdicts_are_kept_and_missing_entries_asked_again(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    missing = str(tmp_path / "not-yet")
    calls: list[str] = []

    def verdict(entry: str) -> bool | None:
        calls.append(entry)
        return None if entry == missing else entry == str(dirs[1])

    sys.path.append(missing)
    with _installed(RefusalFinder(verdict, holds)):
        for _ in range(3):
            with pytest.raises(ModuleNotFoundError, match=f"{dirs[1]} is on the import path"):
                import no_such_module_anywhere  # noqa: F401
    assert calls.count(str(dirs[0])) == 1 and calls.count(str(dirs[1])) == 1
    assert calls.count(missing) == 3


def test_several_refused_entries_are_all_named_once(dirs: tuple[Path, Path]) -> None:
    a, b = map(str, dirs)
    sys.path.append(a)  # twice on the path: named once
    with _installed(RefusalFinder(FakeVerdicts({a, b}), holds)):
        with pytest.raises(ModuleNotFoundError) as e:
            import no_such_module_anywhere  # noqa: F401
    assert f": {a} and {b} are on the import path but this job may not read them ({COVER} them)" in str(e.value)


def test_a_submodule_is_judged_by_its_packages_path(
        fake: tuple[RefusalFinder, FakeVerdicts], dirs: tuple[Path, Path], tmp_path: Path) -> None:
    finder, verdicts = fake
    pkg = tmp_path / "refusal_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    sys.path.append(str(tmp_path))
    verdicts.refused.add(str(pkg))
    try:
        with pytest.raises(ModuleNotFoundError) as e:
            import refusal_pkg.missing  # noqa: F401
        assert e.value.name == "refusal_pkg.missing"
        assert str(e.value).startswith(f"No module named 'refusal_pkg.missing': {pkg} is on the import path")
        assert str(dirs[0]) not in str(e.value)  # sys.path was not searched for it
        with pytest.raises(ImportError, match="cannot import name 'missing'"):  # from-import: as before
            from refusal_pkg import missing  # noqa: F401
    finally:
        for name in ("refusal_pkg", "refusal_pkg.missing"):
            sys.modules.pop(name, None)


def test_relative_entries_are_judged_from_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rel").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [*sys.path, "", "rel"])
    with _installed(RefusalFinder(FakeVerdicts({str(tmp_path), str(tmp_path / "rel")}), holds)):
        with pytest.raises(ModuleNotFoundError, match=f": {tmp_path} and {tmp_path / 'rel'} are on"):
            import no_such_module_anywhere  # noqa: F401


def test_a_finder_appended_after_it_is_asked_first(fake: tuple[RefusalFinder, FakeVerdicts]) -> None:
    class Late:
        def find_spec(self, name: str, path: Any, target: Any = None) -> ModuleSpec | None:
            return importlib.util.spec_from_loader(name, Loader()) if name == "late_module" else None

    class Loader(importlib.abc.Loader):
        def create_module(self, spec: ModuleSpec) -> None:
            return None

        def exec_module(self, module: ModuleType) -> None:
            module.VALUE = 7  # type: ignore[attr-defined]

    with _installed(Late()):
        try:
            import late_module  # type: ignore[import-not-found]
            assert late_module.VALUE == 7
        finally:
            sys.modules.pop("late_module", None)
        with pytest.raises(ModuleNotFoundError, match="is on the import path"):
            import no_such_module_anywhere  # noqa: F401


def test_install_appends_once() -> None:
    before = list(sys.meta_path)
    try:
        import_refusals.install()
        import_refusals.install()
        assert sys.meta_path == [*before, import_refusals.FINDER]
    finally:
        sys.meta_path[:] = before


def test_the_verdict_of_a_readable_dir_a_file_and_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    assert is_refused(str(tmp_path)) is False
    assert is_refused(str(tmp_path / "f")) is False
    assert is_refused(str(tmp_path / "missing")) is None


def test_a_module_is_held_as_a_package_dir_or_a_file_with_an_import_suffix(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "mod.py").write_text("")
    (tmp_path / "ext.cpython-311-x86_64-linux-gnu.so").write_text("")
    (tmp_path / "data").write_text("")  # no suffix: not a module
    assert may_hold(str(tmp_path), "pkg") and may_hold(str(tmp_path), "mod")
    assert may_hold(str(tmp_path), "ext") is (".cpython-311-x86_64-linux-gnu.so" in importlib.machinery.all_suffixes())
    assert not may_hold(str(tmp_path), "data") and not may_hold(str(tmp_path), "absent")


def _in_landlocked_child(readable: list[str], refused: str, timeout: float = 20.0) -> dict[str, Any]:
    """Fork; in the child apply a Landlock ruleset that lets it read Python and `readable` only,
    put `refused` and `readable` on sys.path, install the finder and import from both; the
    child's findings come back through a pipe. Every wait is bounded."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        os.close(r)
        out: dict[str, Any] = {}
        try:
            Sandbox()._landlock(python_read_dirs(readable), [], [])
            sys.path += [refused, *readable]
            import_refusals.install()
            out["verdict"] = is_refused(refused)
            try:
                import refused_mod  # type: ignore[import-not-found]  # noqa: F401
                out["refused"] = "imported"
            except ModuleNotFoundError as e:
                out["refused"] = [str(e), e.name]
            out["probe"] = repr(importlib.util.find_spec("refused_mod"))
            try:  # in no refused entry (some are: this test's own directories)
                import not_in_any_entry  # type: ignore[import-not-found]  # noqa: F401
            except ModuleNotFoundError as e:
                out["absent"] = str(e)
            import readable_mod  # type: ignore[import-not-found]
            out["readable"] = readable_mod.VALUE
        except BaseException as e:
            out["error"] = f"{type(e).__name__}: {e}"
        finally:
            os.write(w, orjson.dumps(out))
            os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        while True:  # reap it; kill it if it has not ended by the deadline
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
    assert data, "the child reported nothing in time"
    return dict(orjson.loads(data))


@pytest.mark.skipif(not LANDLOCK_ABI, reason="no Landlock on this kernel")
def test_under_landlock_an_unreadable_dir_is_named(tmp_path: Path) -> None:
    refused, readable = tmp_path / "refused", tmp_path / "readable"
    refused.mkdir()
    readable.mkdir()
    (refused / "refused_mod.py").write_text("VALUE = 1\n")
    (readable / "readable_mod.py").write_text("VALUE = 2\n")
    out = _in_landlocked_child([str(readable)], str(refused))
    assert "error" not in out, out
    assert out["verdict"] is True
    message, name = out["refused"]
    assert name == "refused_mod"
    assert message.startswith("No module named 'refused_mod': "), message
    assert str(refused) in message and "on the import path but this job may not read" in message, message
    assert COVER in message, message
    assert str(readable) not in message, message
    assert out["probe"] == "None"
    assert out["absent"] == "No module named 'not_in_any_entry'"
    assert out["readable"] == 2
