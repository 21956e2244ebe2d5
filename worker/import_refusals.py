"""Say why an import failed when the sandbox refused a directory on the import path.

Landlock lets a job stat a directory it may not read, but not list it; the import
system's FileFinder takes the refused listing for an empty directory, so `import x`
ends in a bare "No module named 'x'". `install()` appends `RefusalFinder` at the end of
`sys.meta_path` once the job's sandbox is applied. It is asked only after every other
finder has failed (nothing on a successful import). It then looks at the entries that
were searched (the parent package's `__path__` for a submodule, else `sys.path`) for
those that exist but may not be read as directories, and among them for those that hold
the module (stat, which Landlock does not refuse, finds `x/` or `x.py`, `x.so`... there
without listing). If some do, it raises ModuleNotFoundError naming them and saying that
neither the job's lease nor its agent's environment covers them: still an ImportError,
with `name` set, so `try: import x / except ImportError` keeps working. A module that is
in no refused entry keeps the plain error, however many entries are refused (a job may
not read the supervisor's site-packages, nor often the directory it was started in).

It answers only the import statement and `importlib.import_module`, not probes such as
`importlib.util.find_spec`, which must go on returning None for a module that is not
there. Each entry's verdict is kept for the life of the process: the finder is installed
after the job's Landlock rules, which never loosen within a process (a worker's later
jobs have the same rules), so a refusal stays one; a readable verdict gone stale could
at worst only leave the plain message.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib.machinery import ModuleSpec, all_suffixes
from types import ModuleType

MAX_NAMED = 3  # refused entries named in one message; past that, "and N more"
MAX_CACHED = 1024  # entries whose verdict is kept
_REFUSED_ERRNOS = (errno.EACCES, errno.EPERM)
_IMPORT_CALLER = "_find_and_load_unlocked"  # importlib._bootstrap's caller of _find_spec on an import
_SUFFIXES = tuple(all_suffixes())  # .py, .pyc, the extension modules' .so names


def is_refused(entry: str) -> bool | None:
    """True: `entry` exists but this process may not list it; False: it may, or it is not a
    directory; None: it does not exist (nothing to keep, it may appear later)."""
    try:
        st = os.stat(entry)
    except OSError as e:
        return True if e.errno in _REFUSED_ERRNOS else None  # a parent it may not search
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return e.errno in _REFUSED_ERRNOS
    os.close(fd)
    return False


def may_hold(entry: str, name: str) -> bool:
    """Is module `name` (a last component) in directory `entry`: a directory `name`, or a file
    `name` with an import suffix? Asked with stat, which needs no right to list `entry`; True
    also when even stat is refused there (file modes: the job's uid may not search `entry`)."""
    base = os.path.join(entry, name)
    for path in (base, *(base + suffix for suffix in _SUFFIXES)):
        try:
            st = os.stat(path)
        except OSError as e:
            if e.errno in _REFUSED_ERRNOS:
                return True
            continue
        if path != base or stat.S_ISDIR(st.st_mode):
            return True
    return False


def refusal_message(name: str, refused: Sequence[str]) -> str:
    """What the error says of one or more refused entries: "No module named 'x': /a is on ..."."""
    shown = list(refused[:MAX_NAMED])
    more = len(refused) - len(shown)
    if more:
        paths = f"{', '.join(shown)} and {more} more"
    elif len(shown) > 1:
        paths = f"{', '.join(shown[:-1])} and {shown[-1]}"
    else:
        paths = shown[0]
    many = len(refused) > 1
    return (f"No module named {name!r}: {paths} {'are' if many else 'is'} on the import path but this job "
            f"may not read {'them' if many else 'it'} (neither the job's lease nor its agent's environment "
            f"covers {'them' if many else 'it'})")


class RefusalFinder:
    """The last meta path finder: turns a failed import into one that names refused entries."""

    def __init__(self, verdict: Callable[[str], bool | None] = is_refused,
                 holds: Callable[[str, str], bool] = may_hold) -> None:
        self.verdict = verdict
        self.holds = holds
        self.known: dict[str, bool] = {}  # absolute entry -> refused?

    def refused(self, entries: Iterable[object]) -> list[str]:
        """The string entries of `entries` that exist and may not be read, in order, once each."""
        out: list[str] = []
        cwd: str | None = None
        for entry in entries:
            if not isinstance(entry, str):
                continue
            if not os.path.isabs(entry):  # "" and relative entries are taken from the current directory
                try:
                    cwd = cwd or os.getcwd()
                except OSError:  # the current directory is gone: nothing there to be refused
                    continue
                entry = os.path.join(cwd, entry) if entry else cwd
            verdict = self.known.get(entry)
            if verdict is None:
                verdict = self.verdict(entry)
                if verdict is None:
                    continue
                if len(self.known) < MAX_CACHED:
                    self.known[entry] = verdict
            if verdict and entry not in out:
                out.append(entry)
        return out

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        try:
            caller = sys._getframe(2).f_code.co_name
        except ValueError:
            return None
        if caller != _IMPORT_CALLER:  # importlib.util.find_spec and the like: not found, as before
            return None
        tail = fullname.rpartition(".")[2]
        refused = [e for e in self.refused(sys.path if path is None else path) if self.holds(e, tail)]
        if not refused:
            return None
        meta = sys.meta_path
        later = next((i + 1 for i, f in enumerate(meta) if f is self), len(meta))
        for finder in meta[later:]:  # finders appended after this one: asked first
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                return spec  # type: ignore[no-any-return]
        raise ModuleNotFoundError(refusal_message(fullname, refused), name=fullname)


FINDER = RefusalFinder()


def install() -> None:
    """Append the finder to sys.meta_path unless it is there (a worker's later job)."""
    if not any(f is FINDER for f in sys.meta_path):
        sys.meta_path.append(FINDER)
