"""Detect-stage throughput: the full curate flow vs the bare ONNX model loop.

One run generates N JPEG images (seeded: mostly the skimage astronaut portrait,
varied, plus ~20% generated non-face images), then measures on the same images:

* bare loop: this process, detector loaded once, decode_rgb + letterbox +
  detector.detect in batches of detect.batch_size (model load excluded, one
  warm-up batch first);
* flow: the real `curate` flow (offline profile, W local Dask workers, an
  embedded Prefect server), from which it reports the detect stage's rate over
  the wall-clock span of its shards (from OUT/shards/detect/*.json) and the
  whole flow's end-to-end rate (Prefect server start excluded), split into the
  seconds before the first detect shard, the detect span and the seconds after
  the last one.

Targets: detect stage >= 0.9 and end to end >= 0.85 of the bare loop. It
prints a table, then the figures as JSON on the last line of stdout.

    python bench/bench_detect.py [--images N] [--workers W] [--out DIR] [--json FILE]
    python bench/bench_detect.py --smoke     # CI size: 16 images in 2-3 shards, well under a minute when idle

It exits 1 when the flow fails, finds no face or releases no record (the
generated set always has faces), never because the ratio misses its target:
at smoke size the ratio means nothing, but it is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# As in facecap.cli: must precede any Prefect or Dask import (facecap.flows and
# facecap.prefect_api are imported inside run_flow, after main() has set the log level).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from facecap.config import Config  # noqa: E402
from facecap.example_data import astronaut, generated  # noqa: E402
from facecap.models.registry import load_detector  # noqa: E402
from facecap.sources.images import decode_rgb, letterbox  # noqa: E402

TARGET_RATIO = 0.9  # detect stage / bare loop
TARGET_E2E_RATIO = 0.85  # whole flow / bare loop
NON_FACE_SHARE = 0.2
LONG_SIDE = (400, 1200)
BACKGROUNDS = ("noise", "gradient", "shapes")
SMOKE = {"images": 16, "workers": 2, "shard_size": 8}


# --------------------------------------------------------------------------- images


def _scaled(img: Image.Image, long_side: int) -> Image.Image:
    factor = long_side / max(img.size)
    return img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.BICUBIC)


def _face_image(face: Image.Image, rng: np.random.Generator, index: int) -> Image.Image:
    """The astronaut, scaled to 400-1200 px on the long side; some mirrored, rotated or pasted on a background."""
    img = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.3 else face
    if rng.random() < 0.3:
        angle = float(rng.uniform(8, 30)) * (1 if rng.random() < 0.5 else -1)
        img = img.rotate(angle, resample=Image.BICUBIC, expand=True)
    if rng.random() < 0.3:
        # The whole canvas stays within LONG_SIDE: the face takes 35-70% of it.
        canvas_w = int(rng.integers(max(LONG_SIDE[0], 600), LONG_SIDE[1] + 1))
        canvas_h = int(canvas_w * rng.uniform(0.6, 1.0))
        canvas = generated(BACKGROUNDS[index % len(BACKGROUNDS)], (canvas_w, canvas_h), seed=index).convert("RGB")
        img = _scaled(img, int(min(canvas_w, canvas_h) * rng.uniform(0.35, 0.7)))
        x = int(rng.integers(0, canvas_w - img.width + 1))
        y = int(rng.integers(0, canvas_h - img.height + 1))
        canvas.paste(img, (x, y))
        return canvas
    return _scaled(img, int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1)))


def _non_face_image(rng: np.random.Generator, index: int) -> Image.Image:
    w = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
    h = int(w * rng.uniform(0.5, 1.0))
    size = (w, h) if rng.random() < 0.5 else (h, w)
    return generated(BACKGROUNDS[index % len(BACKGROUNDS)], size, seed=index).convert("RGB")


def write_images(folder: Path, n: int, seed: int) -> tuple[int, int]:
    """Write n JPEGs into folder; returns (faces, non-faces)."""
    rng = np.random.default_rng(seed)
    face = astronaut()
    non_faces = set(rng.permutation(n)[: round(n * NON_FACE_SHARE)].tolist())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = _non_face_image(rng, i) if i in non_faces else _face_image(face, rng, i)
        img.save(folder / f"img_{i:05d}.jpg", format="JPEG", quality=90)
    return n - len(non_faces), len(non_faces)


# --------------------------------------------------------------------------- bare loop


@dataclass
class BareResult:
    images: int
    decoded: int
    faces_found: int
    seconds: float
    threads: int

    @property
    def rate(self) -> float:
        return self.decoded / self.seconds


def bare_loop(files: list[Path], threads: int) -> BareResult:
    """decode_rgb + letterbox + detect over every image, as the detect stage does, minus the flow."""
    cfg = Config(profile="offline")
    cfg.detect.threads = threads
    settings = cfg.detect
    detector = load_detector(cfg)
    # The detect stage gets bytes from a Parquet shard, not from disk: read them up front.
    blobs = [f.read_bytes() for f in files]

    def run(batch: list[bytes]) -> tuple[int, int]:
        decoded = [rgb for rgb, _ in (decode_rgb(b, cfg.image) for b in batch) if rgb is not None]
        if not decoded:
            return 0, 0
        canvases = np.stack([letterbox(rgb, settings.input_size)[0] for rgb in decoded])
        results = detector.detect(canvases, settings.candidate_score, settings.nms_iou)
        return len(decoded), sum(len(r) for r in results)

    run(blobs[: settings.batch_size])  # warm-up: first-run allocations, thread pool start
    decoded = faces = 0
    started = time.perf_counter()
    for start in range(0, len(blobs), settings.batch_size):
        d, f = run(blobs[start : start + settings.batch_size])
        decoded, faces = decoded + d, faces + f
    seconds = time.perf_counter() - started
    return BareResult(len(blobs), decoded, faces, seconds, threads)


# --------------------------------------------------------------------------- full flow


@dataclass
class FlowResult:
    workers: int
    threads_per_worker: int
    shard_size: int  # nominal: folder shards have content-defined boundaries around it
    shards: int
    detect_rows_in: int
    detect_faces_found: int
    detect_span_seconds: float  # earliest detect shard start -> latest detect shard finish
    detect_task_seconds: float  # sum over detect shards (busy time, all workers)
    flow_seconds: float  # the flow call: Dask cluster start, ingest, detect, release
    before_detect_seconds: float  # flow call start -> first detect shard start (cluster start, ingest, model load)
    after_detect_seconds: float  # last detect shard end -> flow call end (later stages, release, validation)
    other_stage_seconds: dict[str, float]  # busy seconds summed over shards, per stage other than detect
    records: int
    rejects: int

    def detect_rate(self) -> float:
        return self.detect_rows_in / self.detect_span_seconds

    def detect_utilisation(self) -> float:
        """Share of the workers' time inside the detect span spent in detect shards (the rest: gaps, ingest)."""
        return self.detect_task_seconds / (self.workers * self.detect_span_seconds)


def _stage_stats(out: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "shards" / stage).glob("*.json"))]


def _busy_seconds(out: Path) -> dict[str, float]:
    """Seconds of shard work per stage other than detect, summed over shards (all workers)."""
    stages = sorted(p.name for p in (out / "shards").iterdir() if p.is_dir() and p.name != "detect")
    return {stage: round(sum(s.get("seconds", 0.0) for s in _stage_stats(out, stage)), 3) for stage in stages}


def run_flow(folder: Path, out: Path, workers: int, shard_size: int) -> FlowResult:
    from facecap.prefect_api import prefect_api

    cfg = Config(profile="offline")
    cfg.ingest.shard_size = shard_size
    cfg.execution.n_workers = workers
    with prefect_api(log=lambda line: print(f"  {line}", flush=True)) as api_url:
        from facecap.flows.curate import curate, task_runner_for

        print(f"  Prefect API {api_url}", flush=True)
        started, started_wall = time.perf_counter(), time.time()
        result = curate.with_options(task_runner=task_runner_for(cfg))(
            sources=[str(folder)], out=str(out), config=cfg.model_dump(mode="json"))
        flow_seconds = time.perf_counter() - started

    cached = sum(row.cached for row in result.funnel)
    if cached:
        raise SystemExit(f"bench: {cached} shard(s) came from an earlier run in {out}; use a fresh --out")
    stats = _stage_stats(out, "detect")
    if len(stats) != result.stage("detect").shards:
        raise SystemExit(f"bench: {len(stats)} detect stats files in {out}, the run reported "
                         f"{result.stage('detect').shards} shards")
    starts = [datetime.fromisoformat(s["started_at"]).timestamp() for s in stats]
    ends = [start + s["seconds"] for start, s in zip(starts, stats)]
    return FlowResult(
        workers=workers,
        # What curate() picks for local workers when detect.threads is unset.
        threads_per_worker=max(1, (os.cpu_count() or 1) // workers),
        shard_size=shard_size,
        shards=len(stats),
        detect_rows_in=sum(s["rows_in"] for s in stats),
        detect_faces_found=sum(s["extra"].get("faces_found", 0) for s in stats),
        detect_span_seconds=max(ends) - min(starts),
        detect_task_seconds=sum(s["seconds"] for s in stats),
        flow_seconds=flow_seconds,
        before_detect_seconds=min(starts) - started_wall,
        after_detect_seconds=started_wall + flow_seconds - max(ends),
        other_stage_seconds=_busy_seconds(out),
        records=result.records,
        rejects=result.rejects,
    )


# --------------------------------------------------------------------------- report


def report(n: int, faces: int, non_faces: int, bare: BareResult, flow: FlowResult, load_before: float) -> dict:
    """Print the table; return the figures."""
    detect_rate, e2e_rate = flow.detect_rate(), bare.decoded / flow.flow_seconds
    figures = {
        "images": n, "face_images": faces, "non_face_images": non_faces, "decoded": bare.decoded,
        "cpu_count": os.cpu_count(), "load_avg_1min_before": round(load_before, 2),
        "workers": flow.workers, "flow_threads_per_worker": flow.threads_per_worker, "bare_threads": bare.threads,
        "shard_size": flow.shard_size, "shards": flow.shards,
        "bare_img_s": round(bare.rate, 2),
        "bare_seconds": round(bare.seconds, 3),
        "flow_detect_img_s": round(detect_rate, 2),
        "flow_detect_span_seconds": round(flow.detect_span_seconds, 3),
        "flow_detect_task_seconds": round(flow.detect_task_seconds, 3),
        "flow_detect_utilisation": round(flow.detect_utilisation(), 3),
        "flow_e2e_img_s": round(e2e_rate, 2),
        "flow_seconds": round(flow.flow_seconds, 3),
        "flow_before_detect_seconds": round(flow.before_detect_seconds, 3),
        "flow_after_detect_seconds": round(flow.after_detect_seconds, 3),
        "flow_other_stage_busy_seconds": flow.other_stage_seconds,
        "ratio_detect_vs_bare": round(detect_rate / bare.rate, 3),
        "ratio_e2e_vs_bare": round(e2e_rate / bare.rate, 3),
        "target_ratio": TARGET_RATIO,
        "target_met": detect_rate / bare.rate >= TARGET_RATIO,
        "target_e2e_ratio": TARGET_E2E_RATIO,
        "target_e2e_met": e2e_rate / bare.rate >= TARGET_E2E_RATIO,
        "bare_faces_found": bare.faces_found, "flow_faces_found": flow.detect_faces_found,
        "release_records": flow.records, "release_rejects": flow.rejects,
    }

    rows = [
        ("bare ONNX loop", bare.rate, bare.seconds, f"1 process x {bare.threads} ORT threads"),
        ("flow: detect stage", detect_rate, flow.detect_span_seconds,
         f"{flow.shards} shards, first detect start -> last detect end"),
        ("flow: end to end", e2e_rate, flow.flow_seconds, "flow call: cluster start, ingest, detect, release"),
    ]
    print()
    print(f"images {n} ({faces} face, {non_faces} non-face, {bare.decoded} decoded) | cpu count {os.cpu_count()} | "
          f"flow: {flow.workers} Dask workers x {flow.threads_per_worker} ORT thread(s), shard size ~{flow.shard_size}")
    print(f"{'':<20} {'img/s':>8} {'seconds':>9} {'vs bare':>8}  notes")
    for name, rate, seconds, note in rows:
        print(f"{name:<20} {rate:>8.1f} {seconds:>9.2f} {rate / bare.rate:>8.2f}  {note}")
    print(f"detect shards busy {flow.detect_task_seconds:.2f}s summed over workers = "
          f"{flow.detect_utilisation():.0%} of workers x span; "
          f"faces above candidate_score: bare {bare.faces_found}, flow {flow.detect_faces_found}")
    print(f"end to end = {flow.before_detect_seconds:.2f}s before the first detect shard (cluster start, ingest, "
          f"model load) + {flow.detect_span_seconds:.2f}s detect span + {flow.after_detect_seconds:.2f}s after the "
          "last (later stages of the last shards, release-wide pass, validation, report, cluster stop)")
    print("other stages' shard work, summed over workers: "
          + ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in flow.other_stage_seconds.items()))
    if load_before > 0.5:
        print(f"warning: the 1-minute load average was {load_before:.2f} before the run: other work skews these figures")
    verdict = "MET" if figures["target_met"] else "NOT MET"
    print(f"target flow detect-stage / bare >= {TARGET_RATIO}: {verdict} ({detect_rate / bare.rate:.2f})")
    verdict = "MET" if figures["target_e2e_met"] else "NOT MET"
    print(f"target flow end to end / bare >= {TARGET_E2E_RATIO}: {verdict} ({e2e_rate / bare.rate:.2f})")
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(
        description="Detect-stage images/s through the full curate flow vs the bare ONNX model loop on the same "
                    f"generated images, and their ratio (target >= {TARGET_RATIO}).")
    p.add_argument("--images", type=int, default=1000, metavar="N", help="images to generate (default 1000)")
    p.add_argument("--workers", type=int, default=cpus, metavar="W",
                   help=f"local Dask workers for the flow (default: os.cpu_count() = {cpus})")
    p.add_argument("--out", metavar="DIR", help="flow output directory; must be new or empty (default: a temp dir)")
    p.add_argument("--shard-size", type=int, metavar="N", help="records per shard (default: N // (4 * W), at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated images (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--verbose", action="store_true", help="show Prefect's INFO logs")
    p.add_argument("--smoke", action="store_true",
                   help=f"CI size: {SMOKE['images']} images, {SMOKE['workers']} workers, "
                        f"shard size {SMOKE['shard_size']}")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.images < 1 or args.workers < 1 or (args.shard_size is not None and args.shard_size < 1):
        p.error("--images, --workers and --shard-size must be at least 1")
    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        p.error(f"--out {args.out} is not empty: finished shards there would be skipped, not measured")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    cpus = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    shard_size = args.shard_size or max(1, args.images // (4 * args.workers))

    with tempfile.TemporaryDirectory(prefix="facecap-bench-") as tmp:
        folder = Path(tmp) / "images"
        out = Path(args.out).resolve() if args.out else Path(tmp) / "out"
        print(f"generating {args.images} images in {folder} (seed {args.seed})", flush=True)
        faces, non_faces = write_images(folder, args.images, args.seed)
        files = sorted(folder.glob("*.jpg"))

        print(f"bare loop: {cpus} ORT threads", flush=True)
        bare = bare_loop(files, threads=cpus)
        print(f"  {bare.rate:.1f} img/s", flush=True)

        print(f"flow: {args.workers} workers, shard size {shard_size}, out {out}", flush=True)
        flow = run_flow(folder, out, args.workers, shard_size)
        if flow.detect_rows_in != bare.decoded:
            raise SystemExit(f"bench: the detect stage saw {flow.detect_rows_in} images, {bare.decoded} decoded")
        figures = report(args.images, faces, non_faces, bare, flow, load_before)
        if not (bare.faces_found and flow.detect_faces_found and flow.records):
            raise SystemExit(f"bench: no faces or records (bare loop found {bare.faces_found} faces, the flow "
                             f"{flow.detect_faces_found}, release {flow.records} records)")

    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":  # spawned Dask worker processes may import this module: they must run nothing
    sys.exit(main())
