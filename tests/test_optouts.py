"""Opt-outs at download: X-Robots-Tag and TDM reservation headers on every hop.

Everything is fetched from real HTTP servers on loopback addresses (tests/http_fixture_server.py)
serving real images; the server counts what was asked of it.
"""

from __future__ import annotations

import sys
import time
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from facecap.config import Config
from facecap.runner import run_ingest
from facecap.settings import DownloadSettings, ImageLimits
from facecap.sources.downloader import Downloader, robots_tag_directives
from facecap.sources.plan import plan_shards

sys.path.insert(0, str(Path(__file__).parent))
from http_fixture_server import ServerThread, default_images  # noqa: E402
from test_download import url_list  # noqa: E402

LOOPBACK = ["127.0.0.0/8"]
LIMITS = {"max_bytes": 300_000, "max_pixels": 10_000_000}
FAST = {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.01, "connections": 8}
UA = "facecap/0.1 (+https://example.org/facecap-contact)"


@pytest.fixture(scope="module")
def server():
    with ServerThread(default_images()) as srv:
        yield srv


def xrt(*values: str, name: str = "gen0.png") -> str:
    return "/xrt/" + urllib.parse.quote("|".join(values), safe="") + "/" + name


def fetch(server, paths: list[str], **settings):
    s = DownloadSettings(**{**FAST, "allow_addresses": LOOPBACK, "user_agent": UA, **settings})
    return list(Downloader(s, ImageLimits(**LIMITS)).iter_fetch([server.url(p) for p in paths]))


def test_x_robots_tag_forms_apply_to_our_user_agent_or_to_all():
    assert robots_tag_directives(["noai, noimageai"], UA) == ["noai", "noimageai"]
    assert robots_tag_directives(["NoIndex"], UA) == ["noindex"]
    assert robots_tag_directives(["otherbot: noai"], UA) == []
    assert robots_tag_directives(["otherbot: noindex, nofollow", "FaceCap: noimageai"], UA) == ["noimageai"]
    assert robots_tag_directives(["noai, otherbot: noindex"], UA) == ["noai"]
    # Directives with a value are not user agents.
    assert robots_tag_directives(["unavailable_after: 25 Jun 2010 15:00:00 PST", "max-image-preview: large"],
                                 UA) == ["unavailable_after", "max-image-preview"]
    assert robots_tag_directives(["facecap: unavailable_after: 25 Jun 2010 15:00:00 PST"], UA) == [
        "unavailable_after"]
    # Another user agent string addresses another product token.
    assert robots_tag_directives(["facecap: noai"], "mybot/2.0") == []


HEADER_CASES = {
    xrt("noai"): "opted_out",
    xrt("noindex"): "opted_out",
    xrt("none"): "opted_out",
    xrt("max-snippet: 20", "noimageindex"): "opted_out",  # the directive is in the second header
    xrt("facecap: noai"): "opted_out",
    xrt("otherbot: noai, noindex"): "ok",  # addressed to another crawler
    xrt("nofollow, noarchive"): "ok",
    xrt("unavailable_after: 25 Jun 2010 15:00:00 PST"): "ok",
    "/tdm/gen1.png": "opted_out",
    "/noai-hop/gen2.png": "opted_out",  # the redirect carries the opt-out
    "/to/" + urllib.parse.quote("/noai/gen1.png?t=hop", safe=""): "opted_out",  # on the redirect's target
    "/noai-huge": "opted_out",  # decided on the headers: the 10 GB body is never read
    "/img/gen3.png": "ok",
}


def test_header_opt_outs_are_decided_on_every_hop_before_the_body(server):
    started = time.perf_counter()
    results = fetch(server, list(HEADER_CASES))
    assert {p: r.status for p, r in zip(HEADER_CASES, results)} == HEADER_CASES
    assert time.perf_counter() - started < FAST["timeout_s"]  # nothing waited for the huge body
    by_path = dict(zip(HEADER_CASES, results))
    assert "noimageindex" in by_path[xrt("max-snippet: 20", "noimageindex")].detail
    assert "X-Robots-Tag" in by_path[xrt("noai")].detail
    assert "tdm-reservation: 1" in by_path["/tdm/gen1.png"].detail
    assert "tdm-policy: https://example.org/policy.json" in by_path["/tdm/gen1.png"].detail
    hop = by_path["/noai-hop/gen2.png"]
    assert "302 redirect" in hop.detail and hop.data is None
    assert server.count("/img/gen2.png") == 0  # the redirect's target was never asked for
    assert "reached by redirect" in by_path["/to/" + urllib.parse.quote("/noai/gen1.png?t=hop", safe="")].detail
    assert all(r.data is None for r in results if not r.ok)
    assert by_path["/img/gen3.png"].data == default_images()["gen3.png"]


def test_each_header_check_can_be_turned_off_and_the_directives_are_a_setting(server):
    paths = [xrt("noai", name="gen1.png"), "/tdm/gen2.png", xrt("noindex", name="gen3.png")]
    assert [r.status for r in fetch(server, paths, respect_noai=False)] == ["ok", "opted_out", "ok"]
    assert [r.status for r in fetch(server, paths, respect_tdm_reservation=False)] == [
        "opted_out", "ok", "opted_out"]
    assert [r.status for r in fetch(server, paths, optout_directives=["noai", "noimageai"])] == [
        "opted_out", "opted_out", "ok"]


def test_a_url_list_curates_with_opted_out_images_rejected_and_the_rest_kept(tmp_path, server):
    paths = [f"/img/gen{i % 4}.png?t=list{i}" for i in range(6)] + [
        "/noai/astronaut.jpg", "/noai-hop/gen0.png?t=list", xrt("noai", name="gen1.png") + "?t=list",
        "/tdm/astronaut.jpg?t=list"]
    lst = url_list(tmp_path / "laion.parquet", server, paths)
    cfg = Config.model_validate({"profile": "offline", "image": LIMITS,
                                 "download": {"allow_addresses": LOOPBACK, **FAST}})
    specs, _ = plan_shards([str(lst)], cfg.ingest)
    stats = run_ingest(specs[0], str(tmp_path / "out"), cfg)
    kept, rejects = pq.read_table(stats.output), pq.read_table(stats.rejects_output)
    assert sorted(map(int, kept.column("source_offset").to_pylist())) == list(range(6))
    assert stats.rejects == {"opted_out": 4}
    details = dict(zip(map(int, rejects.column("source_offset").to_pylist()), rejects.column("detail").to_pylist()))
    assert sorted(details) == [6, 7, 8, 9]
    assert "noai" in details[6] and server.url(paths[6]) in details[6]
    assert "redirect" in details[7] and "tdm-reservation" in details[9]
