#!/usr/bin/env bash
# Set up and run the test suite (real Prefect API, real Dask cluster, real images and weights).
#
#   scripts/test.sh            # the whole suite (what CI runs)
#   scripts/test.sh --fast     # without Prefect servers, subprocess runs and slow tests: a few minutes
#   scripts/test.sh -k dedup   # other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
lane=()
args=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then
        lane=(-m "not flow and not e2e and not slow")
    else
        args+=("$arg")
    fi
done
exec .venv/bin/python -m pytest tests "${lane[@]}" "${args[@]}"
