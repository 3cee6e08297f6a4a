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
# torch first. The lock pins PyTorch's CPU build (torch==X+cpu), which PyPI does not publish:
# it comes from PyTorch's own index. FACECAP_TORCH picks the build: cpu (default), a CUDA
# tag such as cu128 (from https://download.pytorch.org/whl/cu128), or "keep" to use
# whatever torch X is already in .venv (installed by hand for another platform).
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
torch_version=$(sed -n 's/^torch==\([^+]*\).*/\1/p' requirements.lock)
torch_build="${FACECAP_TORCH:-cpu}"
torch_index="${FACECAP_TORCH_INDEX:-https://download.pytorch.org/whl/$torch_build}"
installed_torch=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${installed_torch%%+*}" = "$torch_version" ] && { [ "$torch_build" = keep ] || [ "$installed_torch" = "$torch_version+$torch_build" ]; }; then
    echo "torch $installed_torch already installed"
elif [ "$torch_build" = keep ]; then
    echo "FACECAP_TORCH=keep, but .venv has torch '${installed_torch:-none}', not $torch_version; install it first" >&2
    exit 1
else
    echo "installing torch $torch_version+$torch_build"
    # The CPU build's dependencies are all in the lock; a CUDA build brings its own (nvidia-*, triton).
    deps=(); [ "$torch_build" = cpu ] && deps=(--no-deps)
    # A wheel already on this machine (pip's find-links) first; else PyTorch's index.
    pip_install --no-deps --no-index "torch==$torch_version+$torch_build" 2>/dev/null \
        || pip_install "${deps[@]}" --index-url "$torch_index" --extra-index-url https://pypi.org/simple \
                       "torch==$torch_version+$torch_build" \
        || { echo "could not install torch==$torch_version+$torch_build from $torch_index. FACECAP_TORCH picks" \
                  "the build (cpu, or a CUDA tag such as cu128); or install torch $torch_version yourself and set" \
                  "FACECAP_TORCH=keep" >&2
             exit 1; }
fi
echo "installing pinned dependencies (requirements.lock)"
pip_install -r <(grep -v '^torch==' requirements.lock)
pip_install --no-deps -e .
.venv/bin/python -m pip check
