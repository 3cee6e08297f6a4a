"""URL download throughput against a local server with a fixed per-request latency.

A server process (tests/http_fixture_server.py, its own process so it does not
share our GIL) answers every request after LATENCY seconds with a small real
image. With C requests in flight, the best possible rate is C / LATENCY
images/s (the "ideal"); img2dataset is not installed here (and is not
installed for this), so the ideal is the comparison. For each connection count
it measures, in one run:

* downloader: `Downloader.iter_fetch` alone (fetch, guard, probe, decode check);
* ingest shard: the curate pipeline's ingest of a URL-list Parquet shard
  (`facecap.runner.run_ingest`: download + records + Parquet writes + stats).

and prints images/s and the ratio to the ideal, then the figures as JSON on
the last line.

    python bench/bench_download.py [--urls N] [--latency S] [--connections 8,32,64]
    python bench/bench_download.py --smoke     # CI size: 96 URLs, 8 and 32 connections, a few seconds

Every URL is served, so the run exits 1 when a side did not fetch them all
(a broken code path); it never fails for a missed speed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facecap.config import Config  # noqa: E402
from facecap.runner import run_ingest  # noqa: E402
from facecap.sources.downloader import Downloader  # noqa: E402
from facecap.sources.plan import plan_shards  # noqa: E402


SMOKE = {"urls": 96, "latency": 0.05, "connections": "8,32"}


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "http_fixture_server.py")],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # "serving on http://127.0.0.1:PORT"
    if not line.startswith("serving on "):
        proc.kill()
        raise SystemExit(f"fixture server did not start: {line!r}")
    return proc, line.removeprefix("serving on ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=600, help="URLs per measurement (default 600)")
    ap.add_argument("--latency", type=float, default=0.1, help="server delay per request in seconds (default 0.1)")
    ap.add_argument("--connections", default="8,32,64", help="comma-separated connection counts (default 8,32,64)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CI size: {SMOKE['urls']} URLs, {SMOKE['latency']} s latency, "
                         f"connections {SMOKE['connections']}")
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    proc, base = start_server()
    figures = []
    try:
        for connections in [int(c) for c in args.connections.split(",")]:
            cfg = Config.model_validate({"profile": "offline", "download": {
                "allow_addresses": ["127.0.0.1/32"], "connections": connections, "timeout_s": 30, "retries": 0}})
            ideal = connections / args.latency
            tag = f"c{connections}-{time.time_ns()}"  # fresh URLs: no keep-alive or cache advantage between runs
            urls = [f"{base}/slow/{args.latency}/gen{i % 4}.png?{tag}-{i}" for i in range(args.urls)]

            started = time.perf_counter()
            results = list(Downloader(cfg.download, cfg.image).iter_fetch(urls))
            bare_s = time.perf_counter() - started
            ok = sum(r.ok for r in results)

            with tempfile.TemporaryDirectory() as tmp:
                lst = Path(tmp) / "list.parquet"
                pq.write_table(pa.table({"URL": [u + "-shard" for u in urls], "TEXT": ["a face"] * len(urls)}), lst)
                cfg.ingest.shard_size = len(urls)
                specs, _ = plan_shards([str(lst)], cfg.ingest)
                started = time.perf_counter()
                stats = run_ingest(specs[0], str(Path(tmp) / "out"), cfg)
                shard_s = time.perf_counter() - started
            row = {"connections": connections, "latency_s": args.latency, "urls": args.urls, "ok": ok,
                   "shard_ok": stats.rows_out, "ideal_img_s": round(ideal, 1),
                   "downloader_img_s": round(args.urls / bare_s, 1),
                   "downloader_ratio": round(args.urls / bare_s / ideal, 3),
                   "ingest_shard_img_s": round(args.urls / shard_s, 1),
                   "ingest_shard_ratio": round(args.urls / shard_s / ideal, 3)}
            figures.append(row)
            print(f"connections {connections:>3}: ideal {ideal:7.1f} img/s | downloader {row['downloader_img_s']:7.1f} "
                  f"img/s ({row['downloader_ratio']:.2f}) | ingest shard {row['ingest_shard_img_s']:7.1f} img/s "
                  f"({row['ingest_shard_ratio']:.2f}) | ok {ok}/{args.urls}, shard {stats.rows_out}/{args.urls}",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    incomplete = [row["connections"] for row in figures if row["ok"] < args.urls or row["shard_ok"] < args.urls]
    if incomplete:
        print(f"INCOMPLETE: not every URL was fetched at {incomplete} connections (the server serves them all)")
    print(json.dumps(figures))
    return 1 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
