#!/usr/bin/env bash
# Re-resolve the dependency tree from pyproject.toml in a scratch venv and write requirements.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3.11}" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check ".[test]"
{
    echo "# The whole dependency tree, pinned (pip freeze of a working environment, Python 3.11)."
    echo "# scripts/setup.sh installs exactly this, then FaceCap itself with --no-deps."
    echo "# Regenerate after changing pyproject.toml: scripts/lock.sh"
    "$tmp/venv/bin/python" -m pip freeze --exclude facecap
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
