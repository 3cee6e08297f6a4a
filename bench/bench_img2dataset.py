"""FaceCap's URL download side by side with img2dataset, on the same URLs and connections.

A server process (tests/http_fixture_server.py, its own process) answers every
request on 127.0.0.1 after LATENCY seconds with a small real image (by default
the 96 px PNGs of bench_download.py; `--image jpeg` serves a 512 x 512 JPEG,
68 kB, closer to a web photo). The same URL list is then fetched by:

* img2dataset (the pinned version, IMG2DATASET_VERSION) as a subprocess from
  its own venv, with P processes x T threads, webdataset output, no resize
  (`--resize_mode no --skip_reencode True` and the served format as
  `--encode_format`: it decodes every image, as FaceCap's decode check does,
  and stores the bytes as served). Its wall time includes
  interpreter start-up, imports and its process pool; its own span (first shard
  start to last shard end, from its per-shard stats files) excludes them.
  One shard per process (`--number_sample_per_shard ceil(N/P)`), so every
  process works.
* FaceCap, `facecap_download`: `Downloader.iter_fetch` at P*T connections in
  this process (no start-up), and the same split over P spawned processes with
  T connections each over a contiguous share of the URLs (img2dataset's layout;
  its wall includes starting the processes).

img2dataset pins pandas<3 and opencv<5, so it never enters FaceCap's
environment: the bench makes a venv for it (`python3.11 -m venv` + `pip install
img2dataset==IMG2DATASET_VERSION`, default ~/.cache/facecap/bench/img2dataset-venv),
reuses it when it holds that version, and times a fresh install separately.

Both sides must fetch every URL (img2dataset: images in its tars and successes
in its stats files; FaceCap: ok results), or the run exits 1. It prints wall
seconds, images/s, successes and CPU ms per image (user + system of the
processes that did the work; img2dataset's includes the start-up of its four
processes) per side, the ratios FaceCap / img2dataset and to the ideal
(connections / latency), then one JSON line with all figures. Load from other
jobs moves every figure: run it on an idle machine, with --repeat for medians.

    python bench/bench_img2dataset.py                  # 600 URLs, 0.1 s latency, 2 processes x 16 threads
    python bench/bench_img2dataset.py --urls 2000 --latency 0.5 --processes 2 --threads 32 --repeat 3
    python bench/bench_img2dataset.py --smoke          # CI size; without a venv (no network) FaceCap side only

--smoke exits 0 when every side that ran fetched every URL. When the venv
cannot be made, it says so and still runs and checks the FaceCap side.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facecap.config import Config  # noqa: E402
from facecap.sources.downloader import Downloader  # noqa: E402

IMG2DATASET_VERSION = "1.47.0"
DEFAULT_VENV = Path.home() / ".cache" / "facecap" / "bench" / "img2dataset-venv"
READY_MARK = ".facecap-bench-ready"  # written last: a venv without it is a broken install, made again
SMOKE = {"urls": 160, "latency": 0.1, "processes": 2, "threads": 8}
TIMEOUT_S = 10  # per request, both sides (img2dataset's default)
# --image: the fixture server's file names, and img2dataset's matching --encode_format / --encode_quality
# (the format it already is, so --skip_reencode keeps the bytes; for PNG the "quality" is the compression level).
IMAGES = {"png": (["gen0.png", "gen1.png", "gen2.png", "gen3.png"], "png", "9"),
          "jpeg": (["astronaut.jpg"], "jpg", "95")}


# -- the local server -----------------------------------------------------------
def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "http_fixture_server.py")],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline().strip()  # "serving on http://127.0.0.1:PORT"
    if not line.startswith("serving on http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"fixture server did not start: {line!r}")
    return proc, line.removeprefix("serving on ")


# -- img2dataset's venv ----------------------------------------------------------
def _installed_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not (python.exists() and (venv / READY_MARK).exists()):
        return None
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('img2dataset'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def img2dataset_venv(venv: Path, timeout_s: float) -> tuple[Path | None, float | None, str]:
    """(img2dataset executable or None, seconds a fresh install took or None when reused, what happened)."""
    if _installed_version(venv) == IMG2DATASET_VERSION:
        return venv / "bin" / "img2dataset", None, f"reused {venv}"
    base_python = shutil.which("python3.11")
    if base_python is None:
        return None, None, "python3.11 not found: cannot make img2dataset's venv"
    if venv.exists():
        if not (venv / "pyvenv.cfg").exists():
            return None, None, f"{venv} exists and is not a venv: not touching it (choose another --venv)"
        shutil.rmtree(venv)  # a stale version or a half-finished install
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "img2dataset-install.log"
    started = time.perf_counter()
    try:
        with open(log, "w") as out:
            steps = [[base_python, "-m", "venv", str(venv)],
                     [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                      "--retries", "2", "--timeout", "30",  # offline: fail in seconds, not minutes
                      f"img2dataset=={IMG2DATASET_VERSION}"]]
            for cmd in steps:
                left = timeout_s - (time.perf_counter() - started)
                subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=max(left, 1))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-5:])
        return None, None, f"could not make img2dataset's venv ({exc}); last lines of {log}:\n{tail}"
    seconds = time.perf_counter() - started
    (venv / READY_MARK).write_text(f"img2dataset=={IMG2DATASET_VERSION}\n")
    return venv / "bin" / "img2dataset", seconds, f"installed into {venv} (log {log})"


# -- img2dataset's side ----------------------------------------------------------
def _children_cpu() -> float:
    """User + system CPU seconds of finished (waited-for) child processes and their own children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_img2dataset(exe: Path, urls: list[str], image: str, processes: int, threads: int, workdir: Path) -> dict:
    """Run img2dataset over urls; wall seconds, its own span, and what it stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url_list, out = workdir / "urls.parquet", workdir / "img2dataset-out"
    pq.write_table(pa.table({"url": urls, "caption": ["a face"] * len(urls)}), url_list)
    cmd = [str(exe), "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
           "--processes_count", str(processes), "--thread_count", str(threads),
           "--number_sample_per_shard", str(math.ceil(len(urls) / processes)),
           "--resize_mode", "no", "--skip_reencode", "True",
           "--encode_format", IMAGES[image][1], "--encode_quality", IMAGES[image][2],
           "--timeout", str(TIMEOUT_S), "--retries", "0", "--enable_wandb", "False"]
    # NO_ALBUMENTATIONS_UPDATE: albumentations otherwise asks PyPI for a newer version on import.
    env = {**os.environ, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    log = workdir / "img2dataset.log"
    cpu_before = _children_cpu()
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=workdir, timeout=600)
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu_before
    if proc.returncode != 0:
        print(log.read_text(errors="replace")[-3000:])
        raise SystemExit(f"img2dataset exited {proc.returncode}")

    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    images_in_tars = 0
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            images_in_tars += sum(1 for m in t.getmembers() if m.isfile() and m.name.endswith("." + IMAGES[image][1]))
    own_span = (max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)) if stats else float("nan")
    return {"wall_s": wall, "own_span_s": own_span, "cpu_s": cpu, "successes": sum(s["successes"] for s in stats),
            "images_in_tars": images_in_tars, "shards": len(stats),
            "failures": {k: v for s in stats for k, v in s["status_dict"].items() if k != "success"}}


# -- FaceCap's side --------------------------------------------------------------
def facecap_config() -> Config:
    return Config.model_validate({"profile": "offline", "download": {
        "allow_addresses": ["127.0.0.1/32"], "timeout_s": TIMEOUT_S, "retries": 0}})


def facecap_download(urls: list[str], connections: int, cfg: Config) -> tuple[int, float]:
    """FaceCap's download of urls with `connections` requests in flight: (images fetched ok, seconds).

    The one place that calls FaceCap: swap this for the ingest stage's call to
    measure download + records + writes instead of the downloader alone.
    """
    # img2dataset has no per-host limits and reads no robots.txt; the bench serves every URL from one host, so
    # both are off here to compare the downloaders alone (bench_download.py measures their cost).
    settings = cfg.download.model_copy(update={"connections": connections, "domain_connections": None,
                                               "domain_requests_per_s": None, "respect_robots_txt": False})
    started = time.perf_counter()
    ok = sum(r.ok for r in Downloader(settings, cfg.image).iter_fetch(urls))
    return ok, time.perf_counter() - started


def _facecap_worker(job: tuple[list[str], int, Config]) -> tuple[int, float, float]:
    urls, connections, cfg = job
    start = time.time()  # wall clock: comparable across processes, like img2dataset's stats
    ok, _ = facecap_download(urls, connections, cfg)
    return ok, start, time.time()


def facecap_processes(urls: list[str], processes: int, threads: int, cfg: Config) -> dict:
    """facecap_download split over spawned processes, each with `threads` connections over a contiguous share."""
    share = math.ceil(len(urls) / processes)
    jobs = [(urls[i:i + share], threads, cfg) for i in range(0, len(urls), share)]
    cpu_before = _children_cpu()
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(_facecap_worker, jobs)
    wall = time.perf_counter() - started  # leaving the block ends and reaps the workers: their CPU is counted
    span = max(r[2] for r in results) - min(r[1] for r in results)
    return {"wall_s": wall, "own_span_s": span, "cpu_s": _children_cpu() - cpu_before,
            "ok": sum(r[0] for r in results)}


# -- one comparison --------------------------------------------------------------
def measure(exe: Path | None, urls: list[str], image: str, processes: int, threads: int, cfg: Config) -> dict:
    row: dict = {}
    if exe is not None:
        with tempfile.TemporaryDirectory(prefix="bench-img2dataset-") as tmp:
            row["img2dataset"] = run_img2dataset(exe, urls, image, processes, threads, Path(tmp))
    cpu_before = time.process_time()
    ok, seconds = facecap_download(urls, processes * threads, cfg)
    row["facecap_one_process"] = {"wall_s": seconds, "cpu_s": time.process_time() - cpu_before, "ok": ok}
    row["facecap_processes"] = facecap_processes(urls, processes, threads, cfg)
    return row


def median_row(rows: list[dict]) -> dict:
    """Per side and figure, the median over repeats (the ok counts: the smallest)."""
    out: dict = {}
    for side in rows[0]:
        out[side] = {}
        for key, value in rows[0][side].items():
            values = [r[side][key] for r in rows]
            if isinstance(value, float):
                out[side][key] = statistics.median(values)
            elif isinstance(value, int):
                out[side][key] = min(values)
            else:
                out[side][key] = value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=600, help="URLs, the same list for every side (default 600)")
    ap.add_argument("--latency", type=float, default=0.1, help="server delay per request in seconds (default 0.1)")
    ap.add_argument("--processes", type=int, default=2, help="img2dataset processes (default 2)")
    ap.add_argument("--threads", type=int, default=16, help="img2dataset threads per process (default 16)")
    ap.add_argument("--image", choices=sorted(IMAGES), default="png",
                    help="png: 96 px PNGs, 28 kB (default); jpeg: a 512 x 512 JPEG, 68 kB")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every side; medians are reported (default 1)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CI size ({SMOKE['urls']} URLs, {SMOKE['processes']} x {SMOKE['threads']})")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"img2dataset's venv (default {DEFAULT_VENV})")
    ap.add_argument("--install-timeout", type=float, default=600, help="seconds allowed for a fresh venv install")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.urls > 20_000 or args.repeat > 10 or args.processes * args.threads > 512:
        ap.error("keep it bounded: at most 20,000 URLs, 10 repeats and 512 connections")
    bench_started = time.perf_counter()
    load_before = os.getloadavg()[0]
    connections = args.processes * args.threads
    ideal = connections / args.latency

    exe, install_s, note = img2dataset_venv(args.venv, args.install_timeout)
    install_text = "reused, not timed" if install_s is None else f"{install_s:.1f} s (fresh install)"
    print(f"img2dataset {IMG2DATASET_VERSION} venv: {note}; install {install_text if exe else 'failed'}", flush=True)
    if exe is None:
        print("img2dataset NOT MEASURED: its venv could not be made (no network to PyPI?). "
              "Only FaceCap's side runs." + ("" if args.smoke else " This is no comparison; exit 1."), flush=True)

    cfg = facecap_config()
    proc, base = start_server()
    try:
        # The same list for every side and repeat; the query keeps every URL distinct.
        names = IMAGES[args.image][0]
        urls = [f"{base}/slow/{args.latency}/{names[i % len(names)]}?n={i}" for i in range(args.urls)]
        rows = []
        for run in range(args.repeat):
            rows.append(measure(exe, urls, args.image, args.processes, args.threads, cfg))
            if args.repeat > 1:
                print(f"run {run + 1}/{args.repeat}: " + ", ".join(
                    f"{side} {args.urls / r['wall_s']:.1f} img/s" for side, r in rows[-1].items()), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    row = median_row(rows)

    n = args.urls

    def cpu_ms(side: dict) -> str:
        return f"{side['cpu_s'] * 1000 / n:.2f} ms/image"

    print(f"\n{n} URLs ({args.image}), latency {args.latency} s, {args.processes} processes x {args.threads} threads = "
          f"{connections} connections; ideal {ideal:.0f} img/s"
          + (f"; median of {args.repeat} runs" if args.repeat > 1 else ""))
    complete = True
    i2d = row.get("img2dataset")
    if i2d:
        complete &= i2d["successes"] == n and i2d["images_in_tars"] == n
        print(f"  img2dataset            wall {i2d['wall_s']:6.2f} s  {n / i2d['wall_s']:7.1f} img/s (start-up "
              f"included) | own span {i2d['own_span_s']:6.2f} s  {n / i2d['own_span_s']:7.1f} img/s | successes "
              f"{i2d['successes']}/{n}, images in tars {i2d['images_in_tars']} | CPU {cpu_ms(i2d)}"
              + (f", failures {i2d['failures']}" if i2d["failures"] else ""))
    one, many = row["facecap_one_process"], row["facecap_processes"]
    complete &= one["ok"] == n and many["ok"] == n
    print(f"  FaceCap, 1 process     wall {one['wall_s']:6.2f} s  {n / one['wall_s']:7.1f} img/s (in-process, "
          f"{connections} connections) | ok {one['ok']}/{n} | CPU {cpu_ms(one)}")
    print(f"  FaceCap, {args.processes} processes    wall {many['wall_s']:6.2f} s  {n / many['wall_s']:7.1f} img/s "
          f"(process start included) | own span {many['own_span_s']:6.2f} s  {n / many['own_span_s']:7.1f} img/s"
          f" | ok {many['ok']}/{n} | CPU {cpu_ms(many)}")

    ratios = {"facecap_one_process_vs_ideal": round(n / one["wall_s"] / ideal, 3),
              "facecap_processes_span_vs_ideal": round(n / many["own_span_s"] / ideal, 3)}
    if i2d:
        ratios.update({
            "img2dataset_span_vs_ideal": round(n / i2d["own_span_s"] / ideal, 3),
            # images/s FaceCap / images/s img2dataset = img2dataset seconds / FaceCap seconds
            "one_process_vs_img2dataset_wall": round(i2d["wall_s"] / one["wall_s"], 3),
            "one_process_vs_img2dataset_span": round(i2d["own_span_s"] / one["wall_s"], 3),
            "processes_wall_vs_img2dataset_wall": round(i2d["wall_s"] / many["wall_s"], 3),
            "processes_span_vs_img2dataset_span": round(i2d["own_span_s"] / many["own_span_s"], 3)})
        print("  FaceCap / img2dataset images/s: "
              f"1 process vs wall {ratios['one_process_vs_img2dataset_wall']:.2f}, "
              f"vs span {ratios['one_process_vs_img2dataset_span']:.2f} | "
              f"{args.processes} processes wall vs wall {ratios['processes_wall_vs_img2dataset_wall']:.2f}, "
              f"span vs span {ratios['processes_span_vs_img2dataset_span']:.2f}")
    print("  vs ideal: " + ", ".join(f"{k.removesuffix('_vs_ideal')} {v:.2f}"
                                     for k, v in ratios.items() if k.endswith("_vs_ideal")))
    if not complete:
        print("INCOMPLETE: a side did not fetch every URL; its figures are not comparable.")
    print(f"load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}; "
          f"bench took {time.perf_counter() - bench_started:.1f} s")

    figures = {"urls": n, "image": args.image, "latency_s": args.latency, "processes": args.processes, "threads": args.threads,
               "connections": connections, "ideal_img_s": ideal, "repeat": args.repeat, "smoke": args.smoke,
               "img2dataset_version": IMG2DATASET_VERSION, "img2dataset_measured": exe is not None,
               "img2dataset_install_s": None if install_s is None else round(install_s, 1),
               "complete": bool(complete), "load_average_before": round(load_before, 2),
               **{side: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for side, r in row.items()},
               "img_s": {side: round(n / r["wall_s"], 1) for side, r in row.items()},
               "ratios": ratios, "runs": rows if args.repeat > 1 else None}
    line = json.dumps(figures)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    if not complete or (exe is None and not args.smoke):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
