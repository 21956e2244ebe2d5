#!/usr/bin/env bash
# Build this agent's own venv from requirements.txt: nothing is installed into the
# supervisor's environment, and the supervisor's packages are not visible here.
#   examples/fetch_agent/build-venv.sh [VENV_DIR]     (default: examples/fetch_agent/.venv)
# PYTHON picks the interpreter (any CPython 3.11 or newer). pip's usual settings apply
# (PIP_INDEX_URL, or PIP_NO_INDEX=1 with PIP_FIND_LINKS=DIR to install from local wheels).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$HERE/.venv}"
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt"
# Jobs run under uids of their own: they must be able to read the venv.
chmod -R a+rX "$VENV"
echo "$VENV/bin/python"
