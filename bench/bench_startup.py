"""Fixed cost of `facecap curate`: a one-image run, and a rerun with every shard cached.

Runs the real command line (offline profile, no PREFECT_API_URL: a Prefect
server of the run's own; a local Dask cluster) as a user would, in a
subprocess, timestamps every line it prints and splits the wall time into
phases by the lines that mark them:

  start-up   process start -> the flow's first log line (imports, the run's Prefect server)
  plan       flow start -> the first stage's progress line (planning, the check
             of finished shards, the Dask cluster and its first task, if any)
  stages     -> the last stage's progress line
  validate   -> the release line (Great Expectations suites; skipped on an unchanged release)
  finish     -> the flow's "Finished" line (promotion, run artifacts)
  shutdown   -> process exit (cluster and server stop, interpreter exit)

Runs, in a PREFECT_HOME of the bench's own: one image; N images into a fresh
OUT (fills the cache); the same N images again (every shard cached). It prints a
table, then the figures as JSON on the last line of stdout.

These seconds are a fixed cost per run, paid once by a run that takes hours at
scale; throughput is measured by bench_detect.py. This bench guards behaviour: it
exits 1 when a run fails, or when the cached rerun recomputed a shard or started
a Dask cluster (nothing left to do must start no worker), never on a time.

    python bench/bench_startup.py [--images N] [--json FILE]
    python bench/bench_startup.py --smoke     # CI size: 8 images
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detect import write_images  # noqa: E402

from facecap.example_data import astronaut  # noqa: E402

PHASES = ("start-up", "plan", "stages", "validate", "finish", "shutdown")
PROGRESS = re.compile(r"- (\w+): \d+/\d+ shards \((\d+) already done")


def timed_run(sources: list[str], out: Path, env: dict[str, str], *args: str) -> tuple[float, dict[str, float], str]:
    """Run `facecap curate` in `env`; return wall seconds, seconds per phase and the output."""
    # The generated set varies one portrait, so some crops repeat byte for byte: not what is measured here.
    cmd = [sys.executable, "-m", "facecap.cli", "curate", *sources, "--out", str(out), "--profile", "offline",
           "--set", "quality.max_duplicate_image_rate=1.0", "--set", "dedup.keep=all", *args]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    marks: dict[str, float] = {}
    lines = []
    for line in proc.stdout:
        now = time.perf_counter() - started
        lines.append(line)
        if "Beginning flow run" in line:
            marks.setdefault("flow", now)
        elif PROGRESS.search(line):
            marks.setdefault("first_stage", now)
            marks["last_stage"] = now
        elif "Flow run" in line and ("- release:" in line or "- release unchanged" in line):
            marks["release"] = now
        elif "Flow run" in line and "Finished in state" in line:
            marks["finished"] = now
    proc.wait()
    wall = time.perf_counter() - started
    output = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"curate failed (exit {proc.returncode}):\n{output[-3000:]}")
    edges = [0.0, marks["flow"], marks["first_stage"], marks["last_stage"], marks["release"], marks["finished"], wall]
    return wall, {p: b - a for p, a, b in zip(PHASES, edges, edges[1:])}, output


def recomputed(output: str) -> int:
    """Shards a run did not find done: shards minus 'already done', summed over stages."""
    total = 0
    for line in output.splitlines():
        m = re.search(r"- \w+: (\d+)/\d+ shards \((\d+) already done", line)
        if m:
            total += int(m.group(1)) - int(m.group(2))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="images in the cached rerun (default 600)")
    parser.add_argument("--smoke", action="store_true", help="CI size: 8 images")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    n = 8 if args.smoke else args.images
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="facecap-bench-startup-") as tmp:
        root = Path(tmp)
        one, many = root / "one", root / "many"
        one.mkdir()
        astronaut().save(one / "astronaut.jpg", quality=90)
        write_images(many, n, seed=2)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the default: a server of its own
        env.update(PREFECT_HOME=str(root / "prefect-home"))
        print(f"one image, then {n} images twice (the second run cached); load average {load_before:.2f}",
              flush=True)
        one_wall, one_phases, _ = timed_run([str(one)], root / "out-one", env)
        fill_wall, _, _ = timed_run([str(many)], root / "out-many", env)
        cached_wall, cached_phases, cached_out = timed_run([str(many)], root / "out-many", env)
    redone = recomputed(cached_out)
    cluster = "Creating a new Dask cluster" in cached_out

    columns = (("one image", one_phases, one_wall), (f"cached {n}", cached_phases, cached_wall))
    print(f"\n{'phase':<10}" + "".join(f" {name:>13}" for name, _, _ in columns))
    for phase in PHASES:
        print(f"{phase:<10}" + "".join(f" {phases[phase]:>12.2f}s" for _, phases, _ in columns))
    print(f"{'total':<10}" + "".join(f" {wall:>12.2f}s" for _, _, wall in columns))
    print(f"first run of {n} images: {fill_wall:.1f} s; shards recomputed on the rerun: {redone}; the rerun "
          f"started a Dask cluster: {cluster}")
    figures = {"images": n, "one_image_s": round(one_wall, 2), "cached_rerun_s": round(cached_wall, 2),
               "fill_s": round(fill_wall, 2),
               "one_image_phases": {k: round(v, 2) for k, v in one_phases.items()},
               "cached_phases": {k: round(v, 2) for k, v in cached_phases.items()},
               "recomputed_shards": redone, "rerun_started_cluster": cluster,
               "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    return 1 if redone or cluster else 0


if __name__ == "__main__":
    sys.exit(main())
