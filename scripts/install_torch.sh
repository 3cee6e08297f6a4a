#!/usr/bin/env bash
# Install the torch build requirements.lock pins into the environment of PYTHON (argument 1).
#
# The lock pins PyTorch's CPU build (torch==X+cpu), which PyPI does not publish: it comes from
# PyTorch's own index. FACECAP_TORCH picks the build: cpu (default), a CUDA tag such as cu128
# (from https://download.pytorch.org/whl/cu128), or "keep" to use whatever torch X is already
# installed (by hand, for another platform). FACECAP_TORCH_INDEX overrides the index URL.
# A wheel already on this machine (pip's find-links) is used without asking any index.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:?usage: install_torch.sh PYTHON}
pip_install() { "$python" -m pip install --quiet --disable-pip-version-check "$@"; }

torch_version=$(sed -n 's/^torch==\([^+]*\).*/\1/p' requirements.lock)
torch_build="${FACECAP_TORCH:-cpu}"
torch_index="${FACECAP_TORCH_INDEX:-https://download.pytorch.org/whl/$torch_build}"
installed=$("$python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${installed%%+*}" = "$torch_version" ] && { [ "$torch_build" = keep ] || [ "$installed" = "$torch_version+$torch_build" ]; }; then
    echo "torch $installed already installed"
    exit 0
fi
if [ "$torch_build" = keep ]; then
    echo "FACECAP_TORCH=keep, but the environment has torch '${installed:-none}', not $torch_version; install it first" >&2
    exit 1
fi
echo "installing torch $torch_version+$torch_build"
# The CPU build's dependencies are all in the lock; a CUDA build brings its own (nvidia-*, triton),
# some of them from PyPI.
deps=(--extra-index-url https://pypi.org/simple)
[ "$torch_build" = cpu ] && deps=(--no-deps)
pip_install --no-deps --no-index "torch==$torch_version+$torch_build" 2>/dev/null && exit 0
# Few retries: an index that cannot be reached should fail in seconds, not minutes.
pip_install "${deps[@]}" --retries 1 --timeout 30 --index-url "$torch_index" "torch==$torch_version+$torch_build" \
    && exit 0
echo "could not install torch==$torch_version+$torch_build from $torch_index. FACECAP_TORCH picks the build (cpu, or" \
     "a CUDA tag such as cu128); or install torch $torch_version yourself and set FACECAP_TORCH=keep" >&2
exit 1
