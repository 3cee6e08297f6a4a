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


# --- robots.txt ----------------------------------------------------------------------------------
ROBOTS = """# a site that shuts out every crawler but grants facecap its JPEGs and one PNG
User-agent: *
Disallow: /

User-agent: otherbot
User-agent: FaceCap/2.0
Disallow: /img/*.png$
Allow: /img/gen0.png
Disallow: /redirect/   # trailing comment
Sitemap: https://example.org/sitemap.xml
"""


def test_robots_rules_follow_rfc_9309():
    from facecap.sources.downloader import RobotsRules

    rules = RobotsRules.parse("http://x/robots.txt", ROBOTS, "facecap")
    allowed = {path: rules.verdict(path, "facecap") is None for path in (
        "/img/astronaut.jpg", "/img/gen0.png", "/img/gen1.png", "/img/gen1.png?v=2", "/redirect/1/a.png",
        "/status/404", "/robots.txt", "/img/gen%31.png")}
    assert allowed == {"/img/astronaut.jpg": True, "/img/gen0.png": True, "/img/gen1.png": False,
                       "/img/gen1.png?v=2": True, "/redirect/1/a.png": False, "/status/404": True,
                       "/robots.txt": True, "/img/gen%31.png": False}
    assert "Disallow: /img/*.png$" in rules.verdict("/img/gen1.png", "facecap")[1]
    bom = RobotsRules.parse("http://x/robots.txt", "\ufeffUser-agent: *\r\nDisallow: /\r\n", "facecap")
    assert bom.verdict("/img/gen0.png", "facecap")  # a BOM and CRLF line ends still read as rules
    star = RobotsRules.parse("http://x/robots.txt", ROBOTS, "mybot")
    assert star.verdict("/img/astronaut.jpg", "mybot")[0] == "opted_out"
    # Equal length: allow wins; an empty Disallow allows everything.
    tie = RobotsRules.parse("s", "User-agent: *\nDisallow: /a\nAllow: /a\n", "facecap")
    assert tie.verdict("/a/b.jpg", "facecap") is None
    assert RobotsRules.parse("s", "User-agent: *\nDisallow:\n", "facecap").verdict("/x", "facecap") is None


@pytest.fixture
def fresh_robots():
    from facecap.sources.downloader import clear_robots_cache

    clear_robots_cache()
    yield
    clear_robots_cache()


def test_robots_disallowed_paths_are_never_requested(fresh_robots):
    with ServerThread(default_images(), robots=ROBOTS) as site:
        cases = {"/img/astronaut.jpg": "ok", "/img/gen0.png": "ok", "/img/gen1.png": "opted_out",
                 "/redirect/1/gen3.png": "opted_out",
                 "/to/" + urllib.parse.quote("/img/gen2.png", safe=""): "opted_out"}  # disallowed redirect target
        results = fetch(site, list(cases))
        assert {p: r.status for p, r in zip(cases, results)} == cases
        again = fetch(site, ["/img/gen1.png", "/img/astronaut.jpg"])  # a second shard of the same run
        assert [r.status for r in again] == ["opted_out", "ok"]
        for path in ("/img/gen1.png", "/redirect/1/gen3.png", "/img/gen2.png"):
            assert site.count(path) == 0, path
        assert site.count("/robots.txt") == 1  # once per site per run (this worker process)
        assert "Disallow: /img/*.png$" in results[2].detail and "robots.txt" in results[2].detail

        # Another user agent is another robots.txt group: here, the one that disallows everything.
        other = fetch(site, ["/img/astronaut.jpg"], user_agent="mybot/1.0 (+https://example.org)")
        assert other[0].status == "opted_out" and site.count("/img/astronaut.jpg") == 2
        # Turned off: the disallowed path is asked for.
        assert fetch(site, ["/img/gen1.png"], respect_robots_txt=False)[0].ok and site.count("/img/gen1.png") == 1


@pytest.mark.parametrize("status,expected", [(404, "ok"), (403, "ok"), (503, "opted_out"), (429, "opted_out")])
def test_robots_txt_errors_follow_rfc_9309(fresh_robots, status, expected):
    with ServerThread(default_images(), robots="User-agent: *\nDisallow: /\n", robots_status=status) as site:
        results = fetch(site, ["/img/gen0.png", "/img/gen1.png"], retries=0)
        assert [r.status for r in results] == [expected] * 2
        assert site.count("/robots.txt") == 1
        if expected == "opted_out":
            assert f"HTTP {status}" in results[0].detail
            assert site.count("/img/gen0.png") == site.count("/img/gen1.png") == 0


def test_an_unreachable_robots_txt_fetches_nothing_of_the_site_and_stays_transient(fresh_robots):
    with ServerThread(default_images(), robots="", robots_delay=1.0) as site:
        results = fetch(site, ["/img/gen0.png", "/img/gen1.png"], timeout_s=0.3, retries=0)
        assert [r.status for r in results] == ["timeout", "timeout"] and "robots.txt" in results[0].detail
        assert site.count("/img/gen0.png") == site.count("/img/gen1.png") == 0


def test_the_default_user_agent_names_the_tool_and_the_contact_url():
    agent = DownloadSettings(contact_url="mailto:data@example.org").agent()
    assert agent.startswith("facecap/") and "mailto:data@example.org" in agent
    assert DownloadSettings(user_agent="mybot/1.0").agent() == "mybot/1.0"


# --- per-host politeness -------------------------------------------------------------------------
def _spread(sites, per_site: int, tag: str) -> list[str]:
    return [site.url(f"/img/gen{i % 4}.png?{tag}{i}") for i in range(per_site) for site in sites]


def _span(site, tag: str) -> tuple[float, float]:
    times = [t for t, path in site.arrivals if tag in path]
    return min(times), max(times)


def test_one_slow_rate_limiting_host_never_slows_the_others_nor_gets_more_than_its_share(fresh_robots):
    images = default_images()
    fast = [ServerThread(images, host=f"127.0.0.{i}", delay=0.05) for i in range(2, 6)]
    slow = ServerThread(images, host="127.0.0.9", delay=0.2, throttle_every=3, retry_after="1")
    settings = DownloadSettings(**{**FAST, "retries": 6, "connections": 8}, allow_addresses=LOOPBACK,
                                domain_connections=2, domain_requests_per_s=None)
    with fast[0] as a, fast[1] as b, fast[2] as c, fast[3] as d, slow as s:
        sites = [a, b, c, d]
        alone = list(Downloader(settings, ImageLimits(**LIMITS)).iter_fetch(_spread(sites, 16, "alone")))
        assert all(r.ok for r in alone)
        alone_span = max(_span(x, "alone")[1] for x in sites) - min(_span(x, "alone")[0] for x in sites)

        urls = _spread(sites, 16, "mixed")
        slow_urls = [s.url(f"/img/gen{i % 4}.png?mixed{i}") for i in range(12)]
        for i, url in enumerate(slow_urls):
            urls.insert(i * 6, url)  # the slow host's URLs lead and are spread through the list
        results = list(Downloader(settings, ImageLimits(**LIMITS)).iter_fetch(urls))
        assert [r.url for r in results] == urls and all(r.ok for r in results), [
            (r.url, r.status, r.detail) for r in results if not r.ok]

        start = min(_span(x, "mixed")[0] for x in sites + [s])
        fast_end = max(_span(x, "mixed")[1] for x in sites)
        slow_end = _span(s, "mixed")[1]
        assert len(s.throttled) >= 3 and slow_end - start > 2.0  # it paused a second after each 429
        # The others went at the speed they had alone, not at the slow host's.
        assert fast_end - start <= 1.5 * alone_span + 0.3, (fast_end - start, alone_span)
        assert fast_end - start < 0.5 * (slow_end - start)
        # Counted by the servers: never more than the per-host limit at once.
        assert max(x.max_in_flight for x in sites + [s]) == 2
        # Retry-After honoured: in the second after a 429 no new request reached the slow host. With two
        # connections to it, one request may already be on its way when the 429 leaves the server (on a loaded
        # machine it can arrive tens of milliseconds later): at most that one.
        for sent in s.throttled:
            early = [t for t, path in s.arrivals if sent < t < sent + 0.95]
            assert len(early) <= settings.domain_connections - 1, (sent, early)


def test_requests_per_second_per_host(fresh_robots):
    with ServerThread(default_images(), host="127.0.0.12") as site:
        results = fetch(site, [f"/img/gen{i % 4}.png?rate{i}" for i in range(8)], domain_requests_per_s=10.0)
        assert all(r.ok for r in results)
        times = sorted(t for t, path in site.arrivals if "rate" in path)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert min(gaps) > 0.08 and times[-1] - times[0] >= 0.65, gaps


def test_a_host_asking_for_a_long_pause_ends_its_urls_as_transient_without_requests(fresh_robots):
    with ServerThread(default_images(), host="127.0.0.13", throttle_every=1, retry_after="3600") as site:
        results = fetch(site, [f"/img/gen{i % 4}.png?pause{i}" for i in range(5)], retries=2,
                        domain_connections=1)
        assert [r.status for r in results] == ["http_429"] * 5
        assert sum(1 for _, path in site.arrivals if "pause" in path) == 1  # the one that got the answer
        assert "Retry-After" in results[1].detail and "max_retry_after_s" in results[1].detail


def test_retry_after_forms():
    from facecap.sources.downloader import retry_after_s

    assert retry_after_s("120") == 120.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    soon = email_date(time.time() + 30)
    assert 25 < retry_after_s(soon) <= 30


def email_date(ts: float) -> str:
    import email.utils

    return email.utils.formatdate(ts, usegmt=True)


def test_a_curated_url_list_of_real_photos_releases_only_the_faces_not_opted_out(prefect_api_url, tmp_path,
                                                                                    fresh_robots):
    """The whole curate flow on a URL list: opted-out photos never reach detect or the release."""
    from helpers import offline_config, read_release, run_curate

    from facecap.package_photos import photo_bytes

    names = ["astronaut", "group", "kafka", "hanks"]
    with ServerThread({f"{n}.img": photo_bytes(n) for n in names}) as site:
        paths = ["/img/astronaut.img", "/img/group.img", "/noai/kafka.img", "/noai-hop/hanks.img"]
        lst = url_list(tmp_path / "faces.parquet", site, paths)
        cfg = offline_config(image=LIMITS | {"max_bytes": 5_000_000},
                             download={"allow_addresses": LOOPBACK, **FAST, "timeout_s": 10},
                             quality={"test_fraction": 0.5, "max_duplicate_image_rate": 1.0})
        run_curate([lst], tmp_path / "out", cfg)
        assert site.count("/img/hanks.img") == 0  # the opted-out redirect's target was never asked for
    data, rejects = read_release(tmp_path / "out")
    offsets = set(data.column("source_offset").to_pylist())
    assert offsets == {"0", "1"}, offsets  # the astronaut and the group photo's faces only
    assert data.num_rows >= 2
    found = {}
    for path in (tmp_path / "out" / "shards" / "ingest").glob("*rejects*.parquet"):
        for r in pq.read_table(path).to_pylist():
            found[r["source_offset"]] = r["reason"]
    assert found == {"2": "opted_out", "3": "opted_out"}, found


# --- the exclusion list at download ----------------------------------------------------------------
def test_urls_on_the_exclusion_list_are_never_requested_and_are_fetched_once_unlisted(tmp_path, server):
    """A `url` or `domain` entry keeps the URL from being requested at all (not only out of the release);
    once the entry is gone, --retry-failed fetches what it kept back."""
    paths = [f"/img/gen{i}.png?t=excl{i}" for i in range(4)]
    lst = url_list(tmp_path / "list.parquet", server, paths)
    listed = tmp_path / "exclusions.txt"
    listed.write_text(f"# takedown\nurl {server.url(paths[1])}\ndomain example.org\nurl {server.url(paths[3])}\n")
    cfg = Config.model_validate({"profile": "offline", "image": LIMITS, "exclude": {"list": str(listed)},
                                 "download": {"allow_addresses": LOOPBACK, **FAST}})
    specs, _ = plan_shards([str(lst)], cfg.ingest)
    out = str(tmp_path / "out")
    stats = run_ingest(specs[0], out, cfg)
    assert [server.count(p) for p in paths] == [1, 0, 1, 0]
    assert stats.rejects == {"excluded": 2} and stats.extra["excluded_before_download"] == 2
    rejects = pq.read_table(stats.rejects_output).to_pylist()
    assert [(r["source_offset"], r["reason"]) for r in rejects] == [("1", "excluded"), ("3", "excluded")]
    assert rejects[0]["detail"] == "matches exclusion list line 2 (url): not requested"
    assert not any(server.url(p) in r["detail"] for r in rejects for p in paths)  # the reject names no URL
    assert sorted(pq.read_table(stats.output).column("source_offset").to_pylist()) == ["0", "2"]

    # Unchanged list: a rerun reuses the shard, even with --retry-failed.
    again = Config.model_validate({**cfg.model_dump(mode="json"), "download": {**cfg.download.model_dump(
        mode="json"), "retry_failed": True}})
    assert run_ingest(specs[0], out, again).cached
    assert [server.count(p) for p in paths] == [1, 0, 1, 0]
    # Line 2 removed: a next generation fetches that URL only; line 4 still keeps its URL from being asked.
    listed.write_text(f"domain example.org\nurl {server.url(paths[3])}\n")
    retried = run_ingest(specs[0], out, again)
    assert not retried.cached and retried.retry_generation == 1
    assert [server.count(p) for p in paths] == [1, 1, 1, 0]
    assert sorted(pq.read_table(retried.output).column("source_offset").to_pylist()) == ["0", "1", "2"]
    assert retried.rejects == {"excluded": 1}
    assert pq.read_table(retried.rejects_output).column("detail").to_pylist() == [
        "matches exclusion list line 2 (url): not requested"]


def test_host_limits_are_shared_by_the_shards_that_download_at_once():
    import logging

    from facecap.flows.curate import split_host_limits

    cfg = Config.model_validate({"download": {"domain_connections": 8, "domain_requests_per_s": 20}})
    split_host_limits(cfg, 3, logging.getLogger("test"))
    assert (cfg.download.domain_connections, cfg.download.domain_requests_per_s) == (2, 20 / 3)
    few = Config.model_validate({"download": {"domain_connections": 2, "domain_requests_per_s": None}})
    split_host_limits(few, 4, logging.getLogger("test"))
    assert (few.download.domain_connections, few.download.domain_requests_per_s) == (1, None)  # one at least


def test_a_curate_of_several_url_shards_keeps_one_host_within_the_limit(prefect_api_url, tmp_path, fresh_robots):
    """Four URL shards on a local cluster of two workers with two I/O slots each: together, never more than
    download.domain_connections requests at once reach the host (counted by the server)."""
    from helpers import offline_config, run_curate

    from facecap.package_photos import photo_bytes

    with ServerThread({"kafka.img": photo_bytes("kafka")}, host="127.0.0.21", delay=0.15) as site:
        lst = url_list(tmp_path / "one-host.parquet", site, [f"/img/kafka.img?copy={i}" for i in range(24)])
        cfg = offline_config(image=LIMITS | {"max_bytes": 5_000_000}, ingest={"shard_size": 6},
                             execution={"n_workers": 2, "io_threads": 2},
                             download={"allow_addresses": LOOPBACK, **FAST, "timeout_s": 10,
                                       "domain_connections": 4, "domain_requests_per_s": None},
                             quality={"max_duplicate_image_rate": 1.0})
        result = run_curate([lst], tmp_path / "out", cfg)
        assert sum("kafka.img" in path for _, path in site.arrivals) == 24
        assert 1 <= site.max_in_flight <= 4, site.max_in_flight
    assert result.records >= 1
