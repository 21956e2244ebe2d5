# Sourced by scripts/run and scripts/test: make .venv if absent and install the project.
# The package names `supervisor`, `worker` and `shared` are generic (supervisord ships a
# `supervisor` package too): install only into this venv, never system-wide.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed$EXTRAS"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    if [ -n "$EXTRAS" ]; then
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[$EXTRAS]" >&2
    else
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT" >&2
    fi
    touch "$stamp"
fi
# The test agents' own venvs (tests/agent_envs.py) are built offline from wheels downloaded
# here, again only when the requirements file changed: the one step of the tests with network
# access. A fresh directory replaces the old one, so it holds just what the file asks for.
if [ "$EXTRAS" = "test" ]; then
    reqs="$ROOT/tests/agent_env_requirements.txt"
    wheels="$ROOT/.cache/wheels"
    if [ ! -f "$wheels/.downloaded" ] || [ "$reqs" -nt "$wheels/.downloaded" ]; then
        mkdir -p "$ROOT/.cache"
        rm -rf "$wheels.new"
        "$VENV/bin/python" -m pip download -q --disable-pip-version-check --only-binary=:all: \
            -d "$wheels.new" -r "$reqs" >&2
        touch "$wheels.new/.downloaded"
        rm -rf "$wheels"
        mv "$wheels.new" "$wheels"
    fi
fi
