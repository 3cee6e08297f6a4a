#!/usr/bin/env bash
# Set up, write the example sources, curate them in the offline profile, and show a few face-caption pairs.
# No server to start by hand: the run starts one embedded Prefect server and a local Dask cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

# Written once: rewriting the files would change their fingerprints and redo the work. The group photo
# marks the current example data (an older example-data/ held one portrait only).
[ -f example-data/folder/group.jpg ] || facecap example-data example-data
# Offline there is no attribute model, so the attribute captions (grammar, LLM rewrite) cannot be made;
# the FLIP-80M path can: face-related alt-text, judged by the keyword filter and cleaned by the pre-cleaner.
facecap curate example-data/folder example-data/webdataset/*.tar example-data/parquet/*.parquet \
    example-data/paths/*.parquet --out runs/demo --profile offline --set text.caption_path=flip80m "$@"

echo
facecap pairs runs/demo --n 6 --to runs/demo/pairs
echo
echo "Face crops and metadata: runs/demo/release/data/*.parquet"
echo "Rejected records with reasons: runs/demo/release/rejects/*.parquet"
echo "What produced them: runs/demo/release/release.json, runs/demo/manifest.duckdb"
echo "Quality report (opens offline): runs/demo/release/report/index.html; dataset card: runs/demo/release/README.md"
