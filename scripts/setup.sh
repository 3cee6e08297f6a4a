#!/usr/bin/env bash
# Create .venv (Python 3.11) and install FaceCap with its pinned dependency tree.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "FaceCap needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
bash scripts/install_torch.sh .venv/bin/python
echo "installing pinned dependencies (requirements.lock)"
pip_install -r <(grep -v '^torch==' requirements.lock)
pip_install --no-deps -e .
.venv/bin/python -m pip check
