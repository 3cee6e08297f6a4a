"""URL download throughput against local servers with a fixed per-request latency.

A server process (tests/http_fixture_server.py, its own process so it does not
share our GIL) serves HOSTS sites, one per loopback address (127.0.0.1,
127.0.0.2, ...), and answers every request after LATENCY seconds with a small
real image; each URL goes to a site drawn at random (seeded), as a LAION list
is spread over many domains (round-robin would line each connection up with one
site and reuse its keep-alive connection, which a real list never does). With C requests in flight, the best possible rate
is C / LATENCY images/s (the "ideal"); img2dataset is not installed here (and
is not installed for this), so the ideal is the comparison. For each
connection count it measures, in one run:

* unlimited: `Downloader.iter_fetch` with download.domain_connections,
  download.domain_requests_per_s and robots.txt off (the downloader as it was
  before per-host politeness);
* limits: the same with the default per-host limits on (robots.txt off);
* downloader: `Downloader.iter_fetch` with the default settings (per-host limits,
  robots.txt fetched once per site, header opt-outs; fetch, guard, probe, decode check);
* ingest shard: the curate pipeline's ingest of a URL-list Parquet shard
  (`facecap.runner.run_ingest`: download + records + Parquet writes + stats), defaults.

and prints images/s, the ratio to the ideal, the ratio of the limited
downloader to the unlimited one (the target is >= 0.9) and that of the default
one (robots.txt adds one request per site: with ~10 URLs per site, ~10 % more
requests), then the figures as JSON on the last line. Per-host limits cap a site at domain_requests_per_s, so
a list over few sites is slower by design: the bench needs
HOSTS x domain_requests_per_s well above C / LATENCY to measure overhead.

    python bench/bench_download.py [--urls N] [--latency S] [--connections 8,32,64] [--hosts 64]
    python bench/bench_download.py --smoke     # CI size: 96 URLs over 32 sites, 8 and 32 connections

Every URL is served, so the run exits 1 when a side did not fetch them all
(a broken code path); it never fails for a missed speed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


SMOKE = {"urls": 96, "latency": 0.05, "connections": "8,32", "hosts": 32}


def start_server(hosts: int) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "http_fixture_server.py"), str(hosts)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # "serving on http://127.0.0.1:PORT http://127.0.0.2:PORT ..."
    if not line.startswith("serving on "):
        proc.kill()
        raise SystemExit(f"fixture server did not start: {line!r}")
    return proc, line.removeprefix("serving on ").split()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=600, help="URLs per measurement (default 600)")
    ap.add_argument("--latency", type=float, default=0.1, help="server delay per request in seconds (default 0.1)")
    ap.add_argument("--connections", default="8,32,64", help="comma-separated connection counts (default 8,32,64)")
    ap.add_argument("--hosts", type=int, default=64, help="loopback sites the list is spread over (default 64)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CI size: {SMOKE['urls']} URLs, {SMOKE['latency']} s latency, "
                         f"connections {SMOKE['connections']}, {SMOKE['hosts']} sites")
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    proc, bases = start_server(args.hosts)
    figures = []
    try:
        for connections in [int(c) for c in args.connections.split(",")]:
            cfg = Config.model_validate({"profile": "offline", "download": {
                "allow_addresses": ["127.0.0.0/8"], "connections": connections, "timeout_s": 30, "retries": 0}})
            unlimited = cfg.download.model_copy(update={"domain_connections": None, "domain_requests_per_s": None,
                                                        "respect_robots_txt": False})
            limited = cfg.download.model_copy(update={"respect_robots_txt": False})
            ideal = connections / args.latency

            def url_list(kind: str) -> list[str]:
                tag = f"{kind}-c{connections}-{time.time_ns()}"  # fresh URLs: no keep-alive or cache advantage
                rng = random.Random(connections)  # the same spread over the sites for every variant
                return [f"{rng.choice(bases)}/slow/{args.latency}/gen{i % 4}.png?{tag}-{i}"
                        for i in range(args.urls)]

            started = time.perf_counter()
            free = list(Downloader(unlimited, cfg.image).iter_fetch(url_list("free")))
            free_s = time.perf_counter() - started
            started = time.perf_counter()
            capped = list(Downloader(limited, cfg.image).iter_fetch(url_list("limits")))
            capped_s = time.perf_counter() - started
            urls = url_list("polite")
            started = time.perf_counter()
            results = list(Downloader(cfg.download, cfg.image).iter_fetch(urls))
            bare_s = time.perf_counter() - started
            ok = min(sum(r.ok for r in results), sum(r.ok for r in free), sum(r.ok for r in capped))

            with tempfile.TemporaryDirectory() as tmp:
                lst = Path(tmp) / "list.parquet"
                pq.write_table(pa.table({"URL": [u + "-shard" for u in urls], "TEXT": ["a face"] * len(urls)}), lst)
                cfg.ingest.shard_size = len(urls)
                specs, _ = plan_shards([str(lst)], cfg.ingest)
                started = time.perf_counter()
                stats = run_ingest(specs[0], str(Path(tmp) / "out"), cfg)
                shard_s = time.perf_counter() - started
            row = {"connections": connections, "latency_s": args.latency, "urls": args.urls, "hosts": args.hosts,
                   "ok": ok, "shard_ok": stats.rows_out, "ideal_img_s": round(ideal, 1),
                   "unlimited_img_s": round(args.urls / free_s, 1),
                   "limits_img_s": round(args.urls / capped_s, 1),
                   "limits_vs_unlimited": round(free_s / capped_s, 3),
                   "downloader_img_s": round(args.urls / bare_s, 1),
                   "default_vs_unlimited": round(free_s / bare_s, 3),
                   "downloader_ratio": round(args.urls / bare_s / ideal, 3),
                   "ingest_shard_img_s": round(args.urls / shard_s, 1),
                   "ingest_shard_ratio": round(args.urls / shard_s / ideal, 3)}
            figures.append(row)
            print(f"connections {connections:>3}: ideal {ideal:7.1f} img/s | unlimited "
                  f"{row['unlimited_img_s']:7.1f} | limits {row['limits_img_s']:7.1f} "
                  f"({row['limits_vs_unlimited']:.2f} of unlimited) | defaults {row['downloader_img_s']:7.1f} "
                  f"img/s ({row['downloader_ratio']:.2f} of ideal; {row['default_vs_unlimited']:.2f} of unlimited) "
                  f"| ingest shard {row['ingest_shard_img_s']:7.1f} img/s "
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
