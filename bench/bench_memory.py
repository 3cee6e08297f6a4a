"""Peak memory of one worker running ingest + detect on one WebDataset tar shard of large photos.

A shard's memory must not grow with its size: stages stream their records in
bounded batches. This bench writes two WebDataset tars (img2dataset's layout:
key.jpg + key.txt + key.json) of large JPEGs, N and 2N images (the first N are
the same in both): the skimage astronaut scaled to 55-100 % of the height,
mirrored or not, pasted at a random place on a 3600 x 2492 gradient with light
noise, about 1.1 MB each. For each tar, a fresh Python process (as a Dask
worker would be, and without MALLOC_TRIM_THRESHOLD_, as flows/executor.py
starts local workers) runs, in a worker thread as Dask runs tasks,

    facecap.runner.run_ingest(spec, out, cfg)                      # the tar is one shard
    facecap.runner.run_stage(Detect, shard.then(ingest.ref), out, cfg, plan)

with the offline profile, and reports its peak RSS (getrusage ru_maxrss, and
/proc VmHWM as a check) after each stage, plus where the memory is: current
RSS, Arrow's memory pool, and glibc's heap (mallinfo2: bytes in use, free,
mmapped). It prints both peaks and the growth peak(2N) / peak(N) - 1 (target:
<= 10 %), then the figures as JSON on the last line. A child's ru_maxrss
starts at its parent's RSS, so the images are generated in a child too and
the driver stays small.

    python bench/bench_memory.py                        # N = 240: 240 and 480 images
    python bench/bench_memory.py --tars /tmp/tars       # keep the tars (minutes to generate) and reuse them
    python bench/bench_memory.py --env MALLOC_TRIM_THRESHOLD_=65536   # a worker environment to compare
    python bench/bench_memory.py --smoke                # CI size: 8 and 16 images of 1200 x 831

It exits 1 when a child fails, ingest misses an image or detect finds no face
(the astronaut is in every image), never because the growth misses its target.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

TARGET_GROWTH = 0.10
FULL_SIZE = (3600, 2492)
SMOKE = {"images": 8, "width": 1200, "height": 831}
NOISE = 10  # +0..NOISE per pixel: texture that makes the JPEGs about 1 MB at full size


# --------------------------------------------------------------------------- the shards


def write_tars(small: Path, large: Path, n: int, size: tuple[int, int], seed: int) -> int:
    """Write n images to `small` and the same n plus n more to `large`; returns the mean JPEG bytes."""
    import numpy as np
    from PIL import Image

    from facecap.example_data import astronaut, generated

    rng = np.random.default_rng(seed)
    width, height = size
    face = astronaut()
    background = generated("gradient", size).convert("RGB")
    noise = rng.integers(0, NOISE + 1, size=(height + 64, width, 1), dtype=np.uint8)
    total = 0
    with tarfile.open(small, "w") as small_tar, tarfile.open(large, "w") as large_tar:
        for i in range(2 * n):
            side = int(height * rng.uniform(0.55, 1.0))
            portrait = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else face
            img = background.copy()
            img.paste(portrait.resize((side, side), Image.BICUBIC),
                      (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))))
            pixels = np.minimum(np.asarray(img), 255 - NOISE)
            shift = int(rng.integers(0, 64))
            pixels += noise[shift:shift + height]
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
            jpeg = buf.getvalue()
            total += len(jpeg)
            members = {f"{i:06d}.jpg": jpeg, f"{i:06d}.txt": b"an astronaut in a spacesuit",
                       f"{i:06d}.json": json.dumps({"key": f"{i:06d}", "width": width, "height": height}).encode()}
            for tar in (small_tar, large_tar) if i < n else (large_tar,):
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return total // (2 * n)


# --------------------------------------------------------------------------- one worker (child process)


def proc_status(field: str) -> int:
    """A size from /proc/self/status in bytes (VmRSS: current RSS, VmHWM: this process image's peak RSS)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    # KiB on Linux. It keeps the RSS of the process that started this one (fork + exec carry the
    # high-water mark over), which is why the driver stays small and generates the images in a child.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc_heap() -> dict:
    """glibc's view: heap (arena) bytes in use and free, mmapped bytes. Empty where mallinfo2 does not exist."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return {}
    info = libc.mallinfo2()
    return {"heap_bytes": info.arena, "heap_in_use": info.uordblks, "heap_free": info.fordblks,
            "mmapped_bytes": info.hblkhd, "mmapped_chunks": info.hblks}


def snapshot() -> dict:
    import pyarrow as pa

    return {"peak_rss": peak_rss(), "vm_hwm": proc_status("VmHWM"), "rss": proc_status("VmRSS"),
            "arrow_allocated": pa.total_allocated_bytes(),
            "arrow_pool_peak": pa.default_memory_pool().max_memory(), **glibc_heap()}


def run_worker(tar: str, out: str, threads: int, main_thread: bool = False) -> dict:
    """Ingest + detect of one tar shard in this process; returns memory snapshots and counts.

    The stages run in a worker thread, as Dask runs tasks (glibc then serves them from a thread
    arena, not the main heap); `main_thread` runs them in the main thread instead.
    """
    from concurrent.futures import ThreadPoolExecutor

    from facecap.chain import plan_run
    from facecap.config import Config
    from facecap.runner import run_ingest, run_stage
    from facecap.shards import ShardInput
    from facecap.sources.plan import plan_shards
    from facecap.stages.detect import Detect

    cfg = Config(profile="offline")
    cfg.ingest.shard_size = 1_000_000  # a tar is one shard whatever this says; set so the intent is plain
    cfg.detect.threads = threads
    plan = plan_run(cfg)
    specs, notes = plan_shards([tar], cfg.ingest)
    if len(specs) != 1 or specs[0].kind != "tar":
        raise SystemExit(f"bench: expected one tar shard, planned {specs} ({notes})")
    spec = specs[0]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")

    def call(fn, *args):
        return fn(*args) if main_thread else pool.submit(fn, *args).result()

    figures = {"after_imports": snapshot()}
    started = time.perf_counter()
    ingest = call(run_ingest, spec, out, cfg)
    figures["ingest_seconds"] = round(time.perf_counter() - started, 2)
    figures["after_ingest"] = snapshot()
    shard = ShardInput(spec, (), {"ingest": cfg.ingest.model_dump(mode="json"),
                                  "image": cfg.image.model_dump(mode="json")}).then(ingest.ref)
    started = time.perf_counter()
    detect = call(run_stage, Detect, shard, out, cfg, plan.stages["detect"])
    figures["detect_seconds"] = round(time.perf_counter() - started, 2)
    pool.shutdown()
    figures["after_detect"] = snapshot()
    import pyarrow as pa

    figures.update({"images": ingest.rows_out, "ingest_rejects": ingest.rejects, "faces": detect.rows_out,
                    "detect_rejects": detect.rejects, "arrow_pool": pa.default_memory_pool().backend_name,
                    "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                    "stage_thread": "main" if main_thread else "worker"})
    return figures


# --------------------------------------------------------------------------- driver


def in_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run this script with `args` in a fresh process; its result comes back as the last line of its stdout."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"bench: {' '.join(args[:2])} failed in its process (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_env(extra: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}  # as local Dask workers run
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Peak RSS of one worker running ingest + detect on one tar shard of "
                                            f"N and 2N large photos, and its growth (target <= {TARGET_GROWTH:.0%}).")
    p.add_argument("--images", type=int, default=240, metavar="N", help="images in the smaller shard (default 240)")
    p.add_argument("--width", type=int, default=FULL_SIZE[0], help=f"image width (default {FULL_SIZE[0]})")
    p.add_argument("--height", type=int, default=FULL_SIZE[1], help=f"image height (default {FULL_SIZE[1]})")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1: one local worker's "
                                                          "share of 2 cores)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set in the worker processes' environment (repeatable), e.g. MALLOC_ARENA_MAX=2")
    p.add_argument("--main-thread", action="store_true",
                   help="run the stages in the worker process's main thread (default: a worker thread, as Dask does)")
    p.add_argument("--tars", metavar="DIR", help="keep the generated tars in DIR and reuse them when there "
                                                 "(default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--smoke", action="store_true",
                   help=f"CI size: {SMOKE['images']} and {2 * SMOKE['images']} images of "
                        f"{SMOKE['width']} x {SMOKE['height']}")
    # Internal: what the child processes run.
    p.add_argument("--worker", nargs=2, metavar=("TAR", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--write-tars", nargs=2, metavar=("SMALL", "LARGE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(*args.worker, args.threads, args.main_thread)), flush=True)
        return 0
    if args.write_tars:
        small, large = map(Path, args.write_tars)
        mean = write_tars(small, large, args.images, (args.width, args.height), args.seed)
        print(json.dumps({"mean_jpeg_bytes": mean}), flush=True)
        return 0
    if args.smoke:
        vars(args).update(SMOKE)
    if args.images < 1:
        p.error("--images must be at least 1")
    n, size, env = args.images, (args.width, args.height), child_env(args.env)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="facecap-bench-memory-") as tmp:
        tmp = Path(tmp)
        tars = Path(args.tars) if args.tars else tmp
        tars.mkdir(parents=True, exist_ok=True)
        stem = f"astronaut-{size[0]}x{size[1]}-seed{args.seed}"
        small, large = tars / f"{stem}-{n}.tar", tars / f"{stem}-{2 * n}.tar"
        written = tars / f"{stem}-{n}+{n}.json"  # written last: both tars are complete
        if written.exists():
            mean_jpeg = json.loads(written.read_text())["mean_jpeg_bytes"]
            print(f"reusing {small} and {large}", flush=True)
        else:
            print(f"writing {n} + {n} images of {size[0]} x {size[1]} to two tars", flush=True)
            started = time.perf_counter()
            # In a child: the driver must stay small, since a child's ru_maxrss starts at its parent's RSS.
            mean_jpeg = in_child(["--write-tars", str(small), str(large), "--images", str(n), "--width",
                                  str(size[0]), "--height", str(size[1]), "--seed", str(args.seed)])["mean_jpeg_bytes"]
            written.write_text(json.dumps({"mean_jpeg_bytes": mean_jpeg}))
            print(f"  {time.perf_counter() - started:.0f} s; mean JPEG {mean_jpeg / 1e6:.2f} MB; tars "
                  f"{small.stat().st_size / 2**20:.0f} and {large.stat().st_size / 2**20:.0f} MiB", flush=True)
        runs = {}
        for images, tar in ((n, small), (2 * n, large)):
            print(f"worker process: ingest + detect of {images} images", flush=True)
            runs[images] = in_child(["--worker", str(tar), str(tmp / f"out-{images}"), "--threads", str(args.threads)]
                                    + (["--main-thread"] if args.main_thread else []), env)
            r = runs[images]
            print(f"  peak RSS {r['after_ingest']['peak_rss'] / 2**20:.0f} MiB after ingest, "
                  f"{r['after_detect']['peak_rss'] / 2**20:.0f} MiB after detect | {r['faces']} faces | ingest "
                  f"{r['ingest_seconds']} s, detect {r['detect_seconds']} s", flush=True)

    one, two = runs[n], runs[2 * n]
    peak_one, peak_two = one["after_detect"]["peak_rss"], two["after_detect"]["peak_rss"]
    growth = peak_two / peak_one - 1
    mib = 2 ** 20

    def row(name: str, key: str, scale: int = mib) -> None:
        values = [r[stage].get(key) for r in (one, two) for stage in ("after_imports", "after_ingest", "after_detect")]
        if None in values:
            return
        print(f"{name:<26}" + "".join(f"{v / scale:>10.0f}" for v in values))

    print()
    print(f"{n} vs {2 * n} images of {size[0]} x {size[1]} (mean {mean_jpeg / 1e6:.2f} MB) in one tar shard | "
          f"detect.threads {args.threads} | stages in {'the main' if args.main_thread else 'a worker'} thread | "
          f"worker env " + (", ".join(args.env) or "as local Dask workers"))
    print(f"{'MiB':<26}" + "".join(f"{h:>10}" for h in (f"{n}:start", "ingest", "detect",
                                                             f"{2 * n}:start", "ingest", "detect")))
    row("peak RSS (ru_maxrss)", "peak_rss")
    row("peak RSS (VmHWM)", "vm_hwm")
    row("current RSS", "rss")
    row("Arrow pool allocated", "arrow_allocated")
    row("Arrow pool peak", "arrow_pool_peak")
    row("glibc heap", "heap_bytes")
    row("glibc heap in use", "heap_in_use")
    row("glibc heap free", "heap_free")
    row("glibc mmapped", "mmapped_bytes")
    print(f"peak RSS: {peak_one / mib:.0f} MiB at {n} images, {peak_two / mib:.0f} MiB at {2 * n}: "
          f"growth {growth:+.1%} (target <= {TARGET_GROWTH:.0%}: {'MET' if growth <= TARGET_GROWTH else 'NOT MET'})")
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load_before:.1f} before the run (memory figures do not depend on it; times do)")
    figures = {"images": [n, 2 * n], "width": size[0], "height": size[1], "mean_jpeg_bytes": mean_jpeg,
               "threads": args.threads, "stage_thread": "main" if args.main_thread else "worker",
               "worker_env": args.env, "peak_rss": [peak_one, peak_two],
               "peak_rss_mib": [round(peak_one / mib, 1), round(peak_two / mib, 1)], "growth": round(growth, 4),
               "target_growth": TARGET_GROWTH, "target_met": growth <= TARGET_GROWTH, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures), flush=True)
    missing = [r["images"] for r in runs.values() if not r["faces"]]
    if missing or one["images"] != n or two["images"] != 2 * n:
        print(f"bench: ingest read {one['images']} / {two['images']} images, detect found no face in the "
              f"{missing}-image shard(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
