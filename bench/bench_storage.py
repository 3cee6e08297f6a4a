"""Storage of a curate run: intermediates (everything under OUT/shards) / source bytes.

One run generates N JPEGs (bench_detect's seeded generator: the skimage
astronaut portrait scaled to 400-1200 px, mirrored, rotated or pasted on a
background, plus ~20% non-face images) in a local folder, then runs the real
`curate` flow on it (offline profile, local Dask workers, an embedded Prefect
server) with every face stage on: ingest, detect, annotate and caption, then
the quality suites and the release. Annotate uses a randomly initialised
40-way ViT classifier saved locally (bench_annotate's `random_vit`, tiny
architecture: its outputs mean nothing, only what is written counts). Its
probabilities lie around 0.5, so the bench keeps attributes above 0.52 and
calls them absent below 0.48: that keeps ~8 labels per face, like the
FaceCaption-15M filter does with a real model, so captions are written for
the faces as they would be.

It prints the bytes under OUT/shards/<stage> (data, rejects, stats files, and
the columns that take most of the data), their sum, the source folder's
bytes, the ratio intermediates / source (target <= 0.35), and the release's
bytes apart (the release is the product, not an intermediate), then the
figures as JSON on the last line.

    python bench/bench_storage.py                 # 600 images
    python bench/bench_storage.py --images 2000 --workers 2 --out /tmp/storage-out --json figures.json
    python bench/bench_storage.py --smoke         # CI size: 24 images, one worker

It exits 1 when the flow fails or a stage writes no records (the generated
set always has faces), never because the ratio misses its target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# As in facecap.cli: must precede any Prefect or Dask import.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_annotate import random_vit  # noqa: E402
from bench_detect import write_images  # noqa: E402

from facecap.config import Config  # noqa: E402

TARGET_RATIO = 0.35
FACE_STAGES = ("ingest", "detect", "annotate", "caption")
# The random classifier's probabilities lie in ~0.42-0.55: these thresholds keep ~8 labels per face.
RANDOM_MODEL_ATTRIBUTES = {"keep_threshold": 0.52, "absent_threshold": 0.48, "min_attributes": 1}
SMOKE = {"images": 24, "workers": 1, "shard_size": 12}


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_bytes(stage_dir: Path) -> dict:
    """Bytes of one stage's shard outputs by kind, and its data files' largest columns (compressed, per the
    Parquet metadata)."""
    import pyarrow.parquet as pq

    kinds: Counter = Counter()
    columns: Counter = Counter()
    shards = 0
    for path in stage_dir.iterdir():
        size = path.stat().st_size
        if path.name.endswith(".rejects.parquet"):
            kinds["rejects"] += size
        elif path.name.endswith(".parquet"):
            kinds["data"] += size
            metadata = pq.read_metadata(path)
            for rg in range(metadata.num_row_groups):
                group = metadata.row_group(rg)
                for c in range(group.num_columns):
                    chunk = group.column(c)
                    columns[chunk.path_in_schema.split(".")[0]] += chunk.total_compressed_size
        elif path.name.endswith(".json"):
            kinds["stats"] += size
            shards += 1
        else:
            kinds["other"] += size
    return {"bytes": sum(kinds.values()), "shards": shards, **{k: kinds[k] for k in ("data", "rejects", "stats")},
            "top_columns": dict(columns.most_common(4))}


def chain_order(stage_dir: Path) -> tuple[int, str]:
    from facecap.chain import STAGES

    names = [stage.name for stage in STAGES]
    return (names.index(stage_dir.name) if stage_dir.name in names else len(names), stage_dir.name)


def run_curate(folder: Path, out: Path, cfg: Config) -> tuple[dict, float]:
    from facecap.flows.curate import curate, task_runner_for
    from facecap.prefect_api import prefect_api

    with prefect_api(log=lambda line: print(f"  {line}", flush=True)):
        started = time.perf_counter()
        result = curate.with_options(task_runner=task_runner_for(cfg))(
            sources=[str(folder)], out=str(out), config=cfg.model_dump(mode="json"))
        return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(description="Intermediates under OUT/shards / source bytes of a curate run with "
                                            f"every face stage on (target <= {TARGET_RATIO}).")
    p.add_argument("--images", type=int, default=600, metavar="N", help="images to generate (default 600)")
    p.add_argument("--workers", type=int, default=cpus, metavar="W", help=f"local Dask workers (default {cpus})")
    p.add_argument("--shard-size", type=int, metavar="N", help="records per shard (default: N // (2 * W), at least 1)")
    p.add_argument("--out", metavar="DIR", help="curate output directory, kept after the run; must be new or empty "
                                                "(default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated images (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--verbose", action="store_true", help="show Prefect's INFO logs")
    p.add_argument("--smoke", action="store_true",
                   help=f"CI size: {SMOKE['images']} images, {SMOKE['workers']} worker, "
                        f"shard size {SMOKE['shard_size']}")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.images < 1 or args.workers < 1 or (args.shard_size is not None and args.shard_size < 1):
        p.error("--images, --workers and --shard-size must be at least 1")
    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        p.error(f"--out {args.out} is not empty: finished shards there would be reused, and old ones counted")
    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    shard_size = args.shard_size or max(1, args.images // (2 * args.workers))

    with tempfile.TemporaryDirectory(prefix="facecap-bench-storage-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        out = Path(args.out).resolve() if args.out else tmp / "out"
        print(f"generating {args.images} images in {folder} (seed {args.seed})", flush=True)
        faces, non_faces = write_images(folder, args.images, args.seed)
        model_dir = random_vit(tmp / "random-vit-tiny", "tiny")
        cfg = Config.model_validate({
            "profile": "offline", "ingest": {"shard_size": shard_size}, "execution": {"n_workers": args.workers},
            "attributes": {"backend": "classifier", "model": str(model_dir), **RANDOM_MODEL_ATTRIBUTES}})
        print(f"curate: {args.workers} workers, shard size ~{shard_size}, out {out}", flush=True)
        result, flow_seconds = run_curate(folder, out, cfg)

        source_bytes = tree_bytes(folder)
        stage_dirs = sorted((d for d in (out / "shards").iterdir() if d.is_dir()), key=chain_order)
        stages = {d.name: stage_bytes(d) for d in stage_dirs}
        intermediates = tree_bytes(out / "shards")  # everything, including anything not in a stage folder
        release_bytes = tree_bytes(out / "release")
        # The records (Parquet under data/), the rejects and the report, whose Great Expectations Data Docs carry ~4 MB
        # of fonts and images whatever the release's size.
        release_parts = {part: tree_bytes(out / "release" / part) for part in ("data", "rejects", "report")}
        release_parts["other"] = release_bytes - sum(release_parts.values())
        other = {p.name: tree_bytes(p) if p.is_dir() else p.stat().st_size
                 for p in out.iterdir() if p.name not in ("shards", "release")}

    funnel = {row.stage: row.to_dict() for row in result.funnel}
    empty = [s for s in FACE_STAGES if not funnel.get(s, {}).get("rows_out")]
    ratio = intermediates / source_bytes
    figures = {
        "images": args.images, "face_images": faces, "non_face_images": non_faces, "workers": args.workers,
        "shard_size": shard_size, "source_bytes": source_bytes,
        "stages": {name: {k: v for k, v in s.items() if k != "top_columns"} for name, s in stages.items()},
        "stage_rows_out": {s: funnel.get(s, {}).get("rows_out", 0) for s in FACE_STAGES},
        "intermediate_bytes": intermediates, "ratio_intermediates_vs_source": round(ratio, 4),
        "target_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO,
        "release_bytes": release_bytes, "release_parts": release_parts,
        "ratio_release_vs_source": round(release_bytes / source_bytes, 4),
        "ratio_release_data_vs_source": round(release_parts["data"] / source_bytes, 4),
        "other_bytes": other, "release_records": result.records, "flow_seconds": round(flow_seconds, 1),
    }

    mib = 2 ** 20
    print()
    print(f"{args.images} images ({faces} face, {non_faces} non-face) | {args.workers} workers, shard size "
          f"~{shard_size} | flow {flow_seconds:.0f} s | release {result.records} records")
    print(f"{'OUT/shards/<stage>':<20} {'MiB':>9} {'/ source':>9} {'rows out':>9} {'shards':>7}  data / rejects / stats"
          "  (largest columns)")
    for name, s in stages.items():
        top = ", ".join(f"{c} {b / 1024:,.0f} KiB" for c, b in s["top_columns"].items())
        print(f"{name:<20} {s['bytes'] / mib:>9.2f} {s['bytes'] / source_bytes:>9.3f} "
              f"{funnel.get(name, {}).get('rows_out', 0):>9} {s['shards']:>7}  "
              f"{s['data'] / mib:.2f} / {s['rejects'] / mib:.2f} / {s['stats'] / mib:.3f}  ({top})")
    print(f"{'intermediates':<20} {intermediates / mib:>9.2f} {ratio:>9.3f}")
    print(f"{'source folder':<20} {source_bytes / mib:>9.2f} {1:>9.3f}")
    print(f"{'release (product)':<20} {release_bytes / mib:>9.2f} {release_bytes / source_bytes:>9.3f}  "
          + " / ".join(f"{k} {v / mib:.2f}" for k, v in release_parts.items()) + " MiB")
    print("other outputs: " + ", ".join(f"{k} {v / mib:.2f} MiB" for k, v in sorted(other.items())))
    verdict = "MET" if figures["target_met"] else "NOT MET"
    print(f"target intermediates / source <= {TARGET_RATIO}: {verdict} ({ratio:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures), flush=True)
    if empty:
        print(f"bench: stage(s) {empty} wrote no records; funnel {json.dumps([row.to_dict() for row in result.funnel])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # spawned Dask worker processes may import this module: they must run nothing
    sys.exit(main())
