"""Load agent modules in a worker, from code the fork server compiled ahead of time.

The fork server must not run agent code (it is not sandboxed), but it may read
and compile it: `precompile()` finds each agent module's source on the import
path *without importing anything* and compiles it. A forked worker then runs
that code object when its job starts, instead of reading and compiling the file
on the job's critical path. Modules it cannot find this way (namespace
packages, extension modules, zip imports) are imported normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from types import CodeType, ModuleType

from worker import import_path

_compiled: dict[str, tuple[ModuleSpec, CodeType]] = {}  # name -> (spec, code)


def find_source(name: str) -> tuple[str, bool] | None:
    """A module's source file on the job's import path (the fork server's own path until it
    is built), and whether it is a package; nothing is imported."""
    parts = name.split(".")
    for base in import_path.JOB_PATH or sys.path:
        base = base or os.getcwd()
        d = os.path.join(base, *parts[:-1])
        if parts[:-1] and not os.path.isfile(os.path.join(d, "__init__.py")):
            continue
        pkg_init = os.path.join(d, parts[-1], "__init__.py")
        if os.path.isfile(pkg_init):
            return pkg_init, True
        mod = os.path.join(d, parts[-1] + ".py")
        if os.path.isfile(mod):
            return mod, False
    return None


def precompile(module_names: list[str]) -> None:
    """Compile each module (and its parent packages) without executing any of it."""
    for name in module_names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub in _compiled or sub in sys.modules:
                continue
            found = find_source(sub)
            if found is None:
                break
            path, is_pkg = found
            try:
                with open(path, "rb") as f:
                    code = compile(f.read(), path, "exec", dont_inherit=True)
            except (OSError, SyntaxError, ValueError):
                break  # the worker's normal import will report it
            spec = importlib.util.spec_from_file_location(
                sub, path, submodule_search_locations=[os.path.dirname(path)] if is_pkg else None)
            if spec is None:
                break
            _compiled[sub] = (spec, code)


def load_module(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    entry = _compiled.get(name)
    if entry is None:
        return importlib.import_module(name)
    parent_name, _, child = name.rpartition(".")
    parent = load_module(parent_name) if parent_name else None
    spec, code = entry
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    if parent is not None:
        setattr(parent, child, module)
    return module
