"""URL-list download: every status, retries on transient failures only, the address guard,
--retry-failed generations, resume after a kill, and URL-list planning.

Everything is fetched from a real HTTP server on 127.0.0.1 (tests/http_fixture_server.py)
serving real images (the skimage astronaut JPEG, generated PNGs). An autouse guard wraps
socket connects in this process: every attempt is recorded, and any to a non-loopback
address fails without a packet, so the blocked-address tests can prove none was made.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facecap.settings import DownloadSettings, ImageLimits
from facecap.config import Config
from facecap.runner import run_ingest
from facecap.sources.downloader import Downloader
from facecap.sources.plan import plan_shards

sys.path.insert(0, str(Path(__file__).parent))
from http_fixture_server import ServerThread, default_images  # noqa: E402

LOOPBACK = ["127.0.0.1/32"]
LIMITS = {"max_bytes": 300_000, "max_pixels": 10_000_000}
FAST = {"timeout_s": 0.5, "retries": 2, "backoff_s": 0.01, "connections": 8}


@pytest.fixture(scope="module")
def server():
    with ServerThread(default_images()) as srv:
        yield srv


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """Every TCP connect made in this process; non-loopback ones are refused unsent."""
    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address) -> None:
        host = str(address[0]) if isinstance(address, tuple) else ""
        if host:
            attempts.append(host)
            if not ipaddress.ip_address(host).is_loopback:
                raise ConnectionRefusedError(f"test guard: no traffic to {host}")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return attempts


def to(location: str) -> str:
    return "/to/" + urllib.parse.quote(location, safe="")


# path on the fixture server -> the status its URL must end with
CASES = {
    "/img/astronaut.jpg": "ok",
    "/img/gen0.png": "ok",
    "/redirect/2/gen1.png": "ok",
    "/flaky/1/gen2.png": "ok",  # one 503, then the image: retried
    "/status/404": "http_404",
    "/status/410": "http_410",
    "/status/503": "http_503",  # transient: retried, then given up
    "/slow/3/gen3.png": "timeout",  # transient: retried, then given up
    "/redirect/9/gen1.png": "too_many_redirects",
    "/loop": "redirect_loop",
    to("http://10.0.0.1:9/private.jpg"): "blocked_address",
    to("http://169.254.169.254/latest/meta-data/"): "blocked_address",
    to("file:///etc/passwd"): "invalid_url",
    "/html/gen0.png": "not_image",
    "/noai/gen0.png": "opted_out",
    "/big": "too_large",  # no Content-Length: stopped while streaming
    "/big-announced": "too_large",  # Content-Length says 10 GB: never read
    "/bomb": "too_large",  # header claims 10^10 pixels
    "/truncated": "decode_error",
}
TRANSIENT = {"/flaky/1/gen2.png": 2, "/status/503": 3, "/slow/3/gen3.png": 3}  # requests made (retries=2)


def url_list(path: Path, server, paths: list[str], **extra_columns) -> Path:
    """A LAION-style metadata Parquet: URL, TEXT, SAMPLE_ID, WIDTH, HEIGHT, NSFW."""
    n = len(paths)
    table = pa.table({"SAMPLE_ID": list(range(1000, 1000 + n)), "URL": [server.url(p) for p in paths],
                      "TEXT": [f"caption {i}: a smiling face" for i in range(n)], "WIDTH": [512] * n,
                      "HEIGHT": [512] * n, "NSFW": ["UNLIKELY"] * n, **extra_columns})
    pq.write_table(table, path)
    return path


def cfg_for(**download) -> Config:
    return Config.model_validate({"profile": "offline", "image": LIMITS,
                                  "download": {"allow_addresses": LOOPBACK, **FAST, **download}})


def shard_tables(stats) -> tuple[pa.Table, pa.Table]:
    return pq.read_table(stats.output), pq.read_table(stats.rejects_output)


def test_every_url_ends_in_the_shard_or_in_rejects_with_its_status(tmp_path, server, connections):
    paths = list(CASES)
    lst = url_list(tmp_path / "laion.parquet", server, paths)
    cfg = cfg_for()
    specs, notes = plan_shards([str(lst)], cfg.ingest)
    assert [s.kind for s in specs] == ["urls"] and not notes
    before = {p: server.count(p) for p in paths}
    stats = run_ingest(specs[0], str(tmp_path / "out"), cfg)
    kept, rejects = shard_tables(stats)

    outcome = {r["source_offset"]: "ok" for r in kept.to_pylist()}
    for r in rejects.to_pylist():
        assert r["source_offset"] not in outcome, "a URL is both kept and rejected"
        outcome[r["source_offset"]] = r["reason"]
    assert {paths[int(o)]: s for o, s in outcome.items()} == CASES
    assert stats.rows_in == len(paths) and stats.rows_out == list(CASES.values()).count("ok")
    assert sum(stats.rejects.values()) + stats.rows_out == len(paths)

    # Provenance: the LAION columns travel in source_meta with the URL; TEXT is the caption.
    astro = next(r for r in kept.to_pylist() if r["source_offset"] == "0")
    meta = json.loads(astro["source_meta"])
    assert meta["SAMPLE_ID"] == 1000 and meta["NSFW"] == "UNLIKELY" and meta["url"] == server.url(paths[0])
    assert astro["source_caption"] == "caption 0: a smiling face" and astro["source_width"] == 512
    assert astro["source_image"] == default_images()["astronaut.jpg"]
    redirected = json.loads(next(r for r in kept.to_pylist() if r["source_offset"] == "2")["source_meta"])
    assert redirected["download"]["final_url"].endswith("/img/gen1.png")

    # Retries on transient failures only: everything else was asked exactly once.
    asked = {p: server.count(p) - before[p] for p in paths}
    details = {paths[int(r["source_offset"])]: r["detail"] for r in rejects.to_pylist()}
    # On a loaded machine an attempt can time out before the server reads it (so the server sees
    # fewer requests than the client made), or reach the server after the client gave up. What must
    # hold: the client made every attempt and never more (the flaky image needs its retry to pass).
    for p in paths:
        if p in TRANSIENT:
            assert asked[p] <= TRANSIENT[p], (p, asked[p])
        else:
            assert asked[p] == 1, p
    for p in ("/status/503", "/slow/3/gen3.png"):
        assert details[p].endswith(f"({TRANSIENT[p]} attempts)"), details[p]
    assert "attempts" not in details["/status/404"]
    # The blocked targets were refused after resolution, before any connection.
    assert connections and set(connections) == {"127.0.0.1"}


def test_loopback_is_blocked_unless_allow_listed(tmp_path, server, connections):
    limits = ImageLimits(**LIMITS)
    url = server.url("/img/gen3.png")
    before = server.count("/img/gen3.png")
    [blocked] = Downloader(DownloadSettings(**FAST), limits).iter_fetch([url])
    assert blocked.status == "blocked_address" and "download.allow_addresses" in blocked.detail
    assert server.count("/img/gen3.png") == before and connections == []
    [fetched] = Downloader(DownloadSettings(**FAST, allow_addresses=LOOPBACK), limits).iter_fetch([url])
    assert fetched.ok and fetched.data == default_images()["gen3.png"]
    # models.allow_addresses is honoured too (one allow-list for a machine's downloads).
    [also] = Downloader(DownloadSettings(**FAST), limits, extra_allow=LOOPBACK).iter_fetch([url])
    assert also.ok


def test_noai_is_configurable_and_huge_images_are_resized(server):
    limits = ImageLimits(**LIMITS)
    settings = DownloadSettings(**FAST, allow_addresses=LOOPBACK, respect_noai=False, resize_max_side=128)
    noai, astro = Downloader(settings, limits).iter_fetch([server.url("/noai/gen0.png"), server.url("/img/astronaut.jpg")])
    assert noai.ok  # opt-out ignored only when asked
    assert astro.resized_from == (512, 512) and (astro.width, astro.height) == (128, 128) and astro.format == "JPEG"


def test_retry_failed_redownloads_only_transient_failures_of_finished_shards(tmp_path, server):
    # Shard 0: ok + permanent failure. Shard 1: ok + a URL that fails twice (503) then works.
    # A query of their own: the module's server counts requests per URL across tests.
    paths = [p + "?t=retry" for p in ("/img/gen0.png", "/status/404", "/img/gen1.png", "/flaky/3/gen2.png")]
    lst = url_list(tmp_path / "list.parquet", server, paths)
    out = str(tmp_path / "out")
    cfg = cfg_for(retries=1)
    cfg.ingest.shard_size = 2
    specs, _ = plan_shards([str(lst)], cfg.ingest)
    first = [run_ingest(s, out, cfg) for s in specs]
    assert first[0].rejects == {"http_404": 1} and first[1].rejects == {"http_503": 1}
    assert server.count("/flaky/3/gen2.png?t=retry") == 2

    # A plain rerun reuses both shards and asks nothing.
    again = [run_ingest(s, out, cfg) for s in specs]
    assert [a.key for a in again] == [f.key for f in first] and all(a.cached for a in again)
    assert server.count("/flaky/3/gen2.png?t=retry") == 2 and server.count("/status/404?t=retry") == 1

    cfg.download.retry_failed = True
    retried = [run_ingest(s, out, cfg) for s in specs]
    assert retried[0].key == first[0].key and retried[0].cached  # no transient failure: untouched
    assert retried[1].key != first[1].key and retried[1].retry_generation == 1
    assert retried[1].rejects == {} and retried[1].rows_out == 2 and retried[1].rows_in == 2
    assert server.count("/flaky/3/gen2.png?t=retry") == 4 and server.count("/img/gen1.png?t=retry") == 1  # only the failure
    assert server.count("/status/404?t=retry") == 1  # permanent failures are not retried
    kept, _ = shard_tables(retried[1])
    assert sorted(kept.column("source_offset").to_pylist()) == ["2", "3"]  # merged, nothing duplicated

    # Later reruns (with or without the flag) find the latest generation: nothing lost, nothing asked.
    cfg.download.retry_failed = False
    latest = run_ingest(specs[1], out, cfg)
    assert latest.key == retried[1].key and latest.cached and server.count("/flaky/3/gen2.png?t=retry") == 4
    # Timeouts, connections and retries do not re-key finished shards (they decide only whether a fetch works).
    cfg.download.timeout_s, cfg.download.connections, cfg.download.retries = 5.0, 2, 4
    assert run_ingest(specs[0], out, cfg).key == first[0].key


_KILLED_RUN = textwrap.dedent("""
    import sys
    from facecap.config import Config
    from facecap.runner import run_ingest
    from facecap.sources.plan import plan_shards
    cfg = Config.model_validate({"profile": "offline", "download": {"allow_addresses": ["127.0.0.1/32"],
                                 "connections": 2, "timeout_s": 5}})
    specs, _ = plan_shards([sys.argv[1]], cfg.ingest)
    run_ingest(specs[0], sys.argv[2], cfg)
""")


@pytest.mark.e2e
def test_a_killed_download_resumes_without_losing_or_duplicating_urls(tmp_path, server):
    paths = [f"/slow/0.15/gen{i % 4}.png?n={i}" for i in range(40)]  # ~3 s at 2 connections
    lst = url_list(tmp_path / "list.parquet", server, paths)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(lst), str(out)], start_new_session=True)
    try:
        deadline = time.time() + 60
        while sum(server.count(p) for p in paths) < 6 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the download finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    ingest_dir = out / "shards" / "ingest"

    def published() -> list[str]:
        return sorted(p.name for p in ingest_dir.iterdir() if not p.name.startswith(".tmp-"))

    assert published() == []  # killed mid-shard: only temporaries, nothing half-published

    cfg = cfg_for(connections=8, timeout_s=5)
    specs, _ = plan_shards([str(lst)], cfg.ingest)
    stats = run_ingest(specs[0], str(out), cfg)
    kept, rejects = shard_tables(stats)
    assert rejects.num_rows == 0 and sorted(map(int, kept.column("source_offset").to_pylist())) == list(range(40))
    assert len([n for n in published() if n.endswith(".json")]) == 1


def test_csv_and_jsonl_url_lists_and_img2dataset_output(tmp_path, server):
    (tmp_path / "list.csv").write_text("url,caption,similarity\n"
                                       f"{server.url('/img/gen0.png')},\"a face, smiling\",0.31\n"
                                       f"{server.url('/status/404')},gone,0.2\n")
    odd = ["http://[::1/x.jpg", "http://127.0.0.1:99999/x.jpg", "ftp://example.com/x.jpg",
           "http://[::ffff:10.0.0.1]/x.jpg"]  # broken, bad port, not http, a private IPv4 inside IPv6
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in (
        [{"URL": server.url("/img/gen1.png"), "TEXT": "eyes"}, {"URL": None, "TEXT": "no url"}]
        + [{"URL": u, "TEXT": "odd"} for u in odd])) + "\n")
    # img2dataset's layout: the parquet lists what the tar next to it already holds.
    (tmp_path / "00000.tar").write_bytes(b"")
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "caption": ["c"], "key": ["000000000"],
                             "status": ["success"], "error_message": [None]}), tmp_path / "00000.parquet")
    cfg = cfg_for()
    specs, notes = plan_shards([str(tmp_path / "list.csv"), str(tmp_path / "list.jsonl"),
                                str(tmp_path / "00000.parquet")], cfg.ingest)
    assert [s.kind for s in specs] == ["urls", "urls"]
    assert any("img2dataset" in n and "00000.parquet" in n for n in notes)
    csv_stats, jsonl_stats = (run_ingest(s, str(tmp_path / "out"), cfg) for s in specs)
    kept, rejects = shard_tables(csv_stats)
    assert kept.column("source_caption").to_pylist() == ["a face, smiling"]
    assert json.loads(kept.column("source_meta")[0].as_py())["similarity"] == 0.31
    assert rejects.column("reason").to_pylist() == ["http_404"]
    kept, rejects = shard_tables(jsonl_stats)
    assert kept.column("source_caption").to_pylist() == ["eyes"]
    assert rejects.column("reason").to_pylist() == ["invalid_url"] * 4 + ["blocked_address"]
    assert "non-public" in rejects.column("detail")[4].as_py()


def test_results_keep_input_order_under_a_tight_memory_budget(server, monkeypatch):
    from facecap.sources import downloader

    monkeypatch.setattr(downloader, "BUFFER_BYTES", 1)  # at most one finished body waits behind a slow URL
    paths = ["/slow/0.3/gen0.png?t=order"] + [f"/img/gen{i % 4}.png?t=order{i}" for i in range(12)]
    results = list(Downloader(DownloadSettings(**{**FAST, "timeout_s": 5}, allow_addresses=LOOPBACK),
                              ImageLimits(**LIMITS)).iter_fetch([server.url(p) for p in paths]))
    assert [r.url for r in results] == [server.url(p) for p in paths] and all(r.ok for r in results)
    assert [r.data for r in results[1:5]] == [default_images()[f"gen{i}.png"] for i in range(4)]


def test_a_corrupt_row_group_of_a_url_list_rejects_its_rows_and_keeps_the_others(tmp_path, server):
    path = tmp_path / "rg.parquet"
    pq.write_table(pa.table({"URL": [server.url(f"/img/gen{i}.png?t=rg") for i in range(4)], "TEXT": list("abcd")}),
                   path, row_group_size=2, compression="zstd")
    data = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    for i in range(start, start + 64):  # garble the second row group's page header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    cfg = cfg_for()
    specs, _ = plan_shards([str(path)], cfg.ingest)
    stats = run_ingest(specs[0], str(tmp_path / "out"), cfg)
    kept, rejects = shard_tables(stats)
    assert kept.column("source_offset").to_pylist() == ["0", "1"]
    assert dict(zip(rejects.column("source_offset").to_pylist(), rejects.column("reason").to_pylist())) == {
        "2": "unreadable_member", "3": "unreadable_member"}


def test_downloads_overlap_with_detection_on_one_cpu_slot(prefect_api_url, tmp_path, server):
    """One worker with one CPU slot: folder shards are detected while slow URL shards download.

    Before CPU and I/O slots, a worker thread waiting on the network was a thread detect could not use.
    """
    from helpers import run_curate

    from facecap.example_data import astronaut

    paths = [f"/slow/0.5/gen{i % 4}.png?n=overlap{i}" for i in range(16)]  # 2 shards, ~4 s each at 1 connection
    lst = url_list(tmp_path / "slow.parquet", server, paths)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(16):
        astronaut().rotate(i * 3).save(photos / f"face{i:02d}.jpg", quality=90)
    cfg = cfg_for(connections=1, timeout_s=5)
    cfg.ingest.shard_size = 8
    # Two downloads fill two of three I/O slots; the one CPU slot stays free for detect.
    cfg.execution.n_workers, cfg.execution.threads_per_worker, cfg.execution.io_threads = 1, 1, 3
    cfg.quality.max_duplicate_image_rate = 1.0
    run_curate([photos, lst], tmp_path / "out", cfg)  # the folder's quick ingest first, then the downloads

    def spans(stage: str, kind: str) -> list[tuple[float, float]]:
        found = []
        for path in (tmp_path / "out" / "shards" / stage).glob("*.json"):
            stats = json.loads(path.read_text())
            if kind in stats["input"]:
                start = datetime.fromisoformat(stats["started_at"]).timestamp()
                found.append((start, start + stats["seconds"]))
        return found

    downloads, detects = spans("ingest", "slow.parquet"), spans("detect", "photos")
    assert len(downloads) == 2 and len(detects) >= 1
    overlapping = [d for d in detects if any(d[0] < b and a < d[1] for a, b in downloads)]
    assert overlapping, f"no detect shard ran inside a download: downloads {downloads}, detects {detects}"
