#!/usr/bin/env bash
# Set up, write the example sources, and run the curate flow on them in the offline profile.
# No server to start by hand: the run starts one embedded Prefect server and a local Dask cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

# Written once: rewriting the files would change their fingerprints and redo the work.
[ -d example-data ] || facecap example-data example-data
facecap curate example-data/folder example-data/webdataset/*.tar example-data/parquet/*.parquet \
    example-data/paths/*.parquet --out runs/demo --profile offline \
    --set quality.max_duplicate_image_rate=0.6 "$@"  # each example photo sits in several containers

echo
echo "Face crops and metadata: runs/demo/release/data/*.parquet"
echo "Rejected records with reasons: runs/demo/release/rejects/*.parquet"
echo "What produced them: runs/demo/release/release.json, runs/demo/manifest.duckdb"
echo "Quality report (opens offline): runs/demo/release/report/index.html; dataset card: runs/demo/release/README.md"
