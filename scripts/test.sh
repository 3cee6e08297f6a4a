#!/usr/bin/env bash
# Set up and run the test suite (real Prefect API, real Dask cluster, real images and weights).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest tests "$@"
