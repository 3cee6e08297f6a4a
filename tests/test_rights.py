"""Rights per sample: each record's source URL, domain and licence, read from what real sources carry
(LAION metadata's URL/LICENSE columns, img2dataset's JSON sidecars, Parquet columns, folder sidecars),
and the licence/domain shares and opt-out counts that the dataset card and the report show.

Images are web copies of real photos (facecap.webcopies: crops, rescales, mirrors, re-encodes); URL
lists are downloaded from a real HTTP server on 127.0.0.1 (tests/http_fixture_server.py).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facecap.sources.captions import rights_from_meta
from facecap.webcopies import web_copies

sys.path.insert(0, str(Path(__file__).parent))
from helpers import ingest_sources, offline_config, read_release  # noqa: E402
from http_fixture_server import ServerThread  # noqa: E402

LOOPBACK = ["127.0.0.1/32"]
FAST = {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.01, "connections": 4}
LICENSES = ("CC BY-SA 4.0", "?", "CC0 1.0", None)  # LAION writes "?" for an unknown licence


def _copies(n: int) -> list[tuple[str, bytes]]:
    return [(name, data) for name, data, _ in web_copies(n, seed=23)]


def _write_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    """img2dataset's layout: key.jpg + key.txt + key.json, the JSON carrying url and any copied columns."""
    with tarfile.open(path, "w") as tar:
        for key, data, meta in samples:
            for member, payload in ((f"{key}.jpg", data), (f"{key}.txt", b"a person"),
                                    (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


# --- reading rights from metadata ------------------------------------------------------------------------
@pytest.mark.parametrize("meta, expected", [
    # a LAION row's other columns, as a URL list's download records them
    ({"URL": "https://I.PINIMG.com/736x/a.jpg", "TEXT": "x", "LICENSE": "?", "NSFW": "UNLIKELY"},
     ("https://I.PINIMG.com/736x/a.jpg", "i.pinimg.com", "?")),
    # img2dataset's sidecar, with the licence column it was told to keep
    ({"url": "http://user:pw@cdn.example.org:8080/p.jpg?s=1", "caption": "x", "key": "000000001",
      "status": "success", "license": "CC BY 2.0"}, ("http://user:pw@cdn.example.org:8080/p.jpg?s=1",
                                                    "cdn.example.org", "CC BY 2.0")),
    ({"Image_URL": "https://photos.example.com./a.png", "Licence": "  CC0  "},
     ("https://photos.example.com./a.png", "photos.example.com", "CC0")),
    ({"url": "photos/a.jpg", "license": ""}, ("photos/a.jpg", None, None)),  # a path names no host
    ({"url": "http://[::1/x.jpg", "license": 4}, ("http://[::1/x.jpg", None, "4")),  # unparsable host
    ({"caption": "no rights stated"}, (None, None, None)),
])
def test_rights_are_read_from_the_keys_sources_use_in_any_case(meta, expected):
    assert rights_from_meta(json.dumps(meta)) == expected


def test_metadata_that_is_not_an_object_states_no_rights():
    for meta in (None, "", "not json", "[1, 2]", '"https://example.org/a.jpg"'):
        assert rights_from_meta(meta) == (None, None, None)


# --- local sources ---------------------------------------------------------------------------------------
def test_local_sources_carry_the_url_and_licence_their_metadata_states(tmp_path):
    copies = _copies(6)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, (_, data) in enumerate(copies[:3]):
        (folder / f"p{i}.jpg").write_bytes(data)
    (folder / "p0.json").write_text(json.dumps({"url": "https://Faces.Example.net/p0.jpg", "License": "CC BY 4.0"}))
    (folder / "p1.json").write_text(json.dumps({"caption": "no url, no licence"}))
    tar = tmp_path / "shard.tar"
    _write_tar(tar, [("000000000", copies[3][1], {"url": "https://img.example.org/a.jpg", "LICENSE": "CC0 1.0",
                                                  "status": "success"}),
                     ("000000001", copies[4][1], {"url": "https://img.example.org/b.jpg", "status": "success"})])
    parquet = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"image": [copies[5][1]], "url": ["http://other.example.com/c.jpg"],
                             "LICENSE": ["CC BY-NC 4.0"]}), parquet)

    _, _, kept, _, _ = ingest_sources([folder, tar, parquet])
    got = {(Path(r["source"]).name, r["source_offset"]): (r["source_url"], r["domain"], r["license"])
           for r in kept.to_pylist()}
    assert got == {
        ("folder", "p0.jpg"): ("https://Faces.Example.net/p0.jpg", "faces.example.net", "CC BY 4.0"),
        ("folder", "p1.jpg"): (None, None, None),
        ("folder", "p2.jpg"): (None, None, None),  # no sidecar: a local file
        ("shard.tar", "000000000"): ("https://img.example.org/a.jpg", "img.example.org", "CC0 1.0"),
        ("shard.tar", "000000001"): ("https://img.example.org/b.jpg", "img.example.org", None),
        ("bytes.parquet", "0"): ("http://other.example.com/c.jpg", "other.example.com", "CC BY-NC 4.0"),
    }


# --- downloads and a real curate ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    images = {f"c{i}.jpg": data for i, (_, data) in enumerate(_copies(6))}
    with ServerThread(images) as srv:
        yield srv


def _laion_list(path: Path, server, paths: list[str]) -> dict[str, str | None]:
    """A LAION-style metadata Parquet (URL, TEXT, LICENSE...); returns URL -> licence."""
    urls = [server.url(p) for p in paths]
    licenses = [LICENSES[i % len(LICENSES)] for i in range(len(paths))]
    pq.write_table(pa.table({"SAMPLE_ID": list(range(len(paths))), "URL": urls,
                             "TEXT": ["a photo of a person"] * len(paths), "LICENSE": pa.array(licenses, pa.string()),
                             "NSFW": ["UNLIKELY"] * len(paths)}), path)
    return dict(zip(urls, licenses))


def test_downloaded_records_keep_the_listed_url_its_host_and_licence(tmp_path, server):
    from facecap.runner import run_ingest
    from facecap.sources.plan import plan_shards

    paths = ["/img/c0.jpg", "/redirect/2/c1.jpg", "/img/c2.jpg?n=1", "/img/c3.jpg", "/status/404"]
    expected = _laion_list(tmp_path / "list.parquet", server, paths)
    cfg = offline_config(download={"allow_addresses": LOOPBACK, **FAST})
    [spec], _ = plan_shards([str(tmp_path / "list.parquet")], cfg.ingest)
    stats = run_ingest(spec, str(tmp_path / "out"), cfg)
    rows = pq.read_table(stats.output).to_pylist()
    assert len(rows) == 4  # the 404 is a reject
    for r in rows:
        assert r["source_url"] in expected
        assert r["license"] == expected[r["source_url"]]
        assert r["domain"] == "127.0.0.1"
    assert {r["license"] for r in rows} == {LICENSES[i % len(LICENSES)] for i in range(4)}
    # the listed URL, not where its redirect ended: that is what the source vouches for
    assert any("/redirect/2/" in r["source_url"] for r in rows)
    assert not any(r["source_url"].endswith("/img/c1.jpg") for r in rows)


def _card_rows(card: str, header: str) -> dict[str, int]:
    """The rows of the card's Markdown table under `header`: first cell -> second cell as a number."""
    lines = card.splitlines()
    start = lines.index(header) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = int(cells[1].replace(",", ""))
    return rows


def test_a_curated_release_carries_rights_and_its_card_and_report_show_them(prefect_api_url, tmp_path, server):
    from helpers import run_curate

    from facecap.quality.release_db import open_release
    from facecap.quality.report import rights_figures

    paths = [f"/img/c{i % 3}.jpg?n={i}" for i in range(8)] + ["/noai/c1.jpg", "/status/404"]
    listed = _laion_list(tmp_path / "laion.parquet", server, paths)
    tar = tmp_path / "img2dataset" / "00000.tar"
    tar.parent.mkdir()
    tar_licenses = {"000000000": "CC BY 4.0", "000000001": None, "000000002": "CC BY 4.0"}
    _write_tar(tar, [(key, data, {"url": f"https://Photos.Example.org/{key}.jpg", "caption": "a person",
                                  "status": "success", **({"license": lic} if lic else {})})
                     for (key, lic), (_, data) in zip(tar_licenses.items(), _copies(3))])
    cfg = offline_config(ingest={"shard_size": 4}, download={"allow_addresses": LOOPBACK, **FAST})
    out = tmp_path / "out"
    run_curate([tmp_path / "laion.parquet", tar], out, cfg)

    data, rejects = read_release(out)
    rows = data.select(["source", "source_offset", "source_url", "domain", "license"]).to_pylist()
    assert rows
    for r in rows:  # every face record carries what its source said
        if r["source"].endswith(".tar"):
            assert (r["source_url"], r["domain"], r["license"]) == (
                f"https://Photos.Example.org/{r['source_offset']}.jpg", "photos.example.org",
                tar_licenses[r["source_offset"]])
        else:
            assert (r["domain"], r["license"]) == ("127.0.0.1", listed[r["source_url"]])
    licenses = Counter(r["license"] or "(none stated)" for r in rows)
    domains = Counter(r["domain"] for r in rows)
    assert len(licenses) >= 3 and len(domains) == 2
    opted_out = sum(1 for reason in rejects.column("reason").to_pylist() if reason in ("opted_out", "robots_noai"))
    assert opted_out == 1  # the /noai/ URL

    card = (out / "release" / "README.md").read_text()
    assert _card_rows(card, "| license | face records | share |") == dict(licenses)
    assert _card_rows(card, "| domain | face records | share |") == dict(domains)
    assert _card_rows(card, "| records left out | rejects |") == {
        "opted_out (download opt-outs)": opted_out, "excluded (exclusion list)": 0, "taken down (from rejects)": 0}
    assert "`license`" in card and "`domain`" in card and "`source_url`" in card  # the fields table documents them

    report = json.loads((out / "release" / "report" / "report.json").read_text())
    rights = report["figures"]["rights"]
    assert {s["value"]: s["records"] for s in rights["licenses"]} == dict(licenses)
    assert abs(sum(s["share"] for s in rights["domains"]) - 1) < 1e-3
    assert report["headline"]["opted out / excluded / taken down"] == f"{opted_out} / 0 / 0"
    html = (out / "release" / "report" / "index.html").read_text()
    assert "<h2>Rights</h2>" in html and "photos.example.org" in html and "CC BY 4.0" in html

    # Exclusions and takedowns are counted from the rejects by reason, whichever stage wrote them.
    copy = tmp_path / "copy"
    shutil.copytree(out / "release", copy)
    faces = data.slice(0, 3).to_pylist()
    pq.write_table(pa.table({
        "stage": ["exclude"] * 3, "reason": ["excluded"] * 3, "image_id": [f["image_id"] for f in faces],
        "sample_id": [f["sample_id"] for f in faces], "source": [f["source"] for f in faces],
        "detail": ["url entry line 3", "Takedown 2026-12-04: near-duplicate of the given photo", "domain entry"]}),
        copy / "rejects" / "exclude-test.parquet")
    db = open_release(str(copy))
    try:
        fig = rights_figures(db)
    finally:
        db.close()
    assert (fig["opted_out"], fig["excluded"], fig["taken_down"], fig["taken_down_from"]) == (
        opted_out, 3, 1, "rejects")
    info = json.loads((copy / "release.json").read_text())
    (copy / "release.json").write_text(json.dumps({**info, "taken_down": 5}))
    db = open_release(str(copy))
    try:
        assert (rights_figures(db)["taken_down"], rights_figures(db)["taken_down_from"]) == (5, "release.json")
    finally:
        db.close()


def test_shares_name_the_most_frequent_values_and_sum_the_rest_as_other(tmp_path):
    import duckdb

    from facecap.quality.card import rights_lines
    from facecap.quality.release_db import ReleaseDB
    from facecap.quality.report import NO_URL, OTHER, RIGHTS_TOP, rights_figures

    # 15 domains of falling frequency (15 records down to 1), and 4 local files without a URL
    domains = [f"img{d}.example.com" for d in range(15) for _ in range(15 - d)] + [None] * 4
    con = duckdb.connect()
    con.register("t", pa.table({"domain": pa.array(domains, pa.string()),
                                "license": pa.array(["CC|BY\n4.0"] * len(domains), pa.string())}))
    con.execute("CREATE VIEW faces AS SELECT * FROM t")
    db = ReleaseDB(str(tmp_path), con, {}, offline_config(), ["domain", "license"], has_rejects=False)
    fig = rights_figures(db)
    shares = {s["value"]: s for s in fig["domains"]}
    assert list(shares)[:RIGHTS_TOP] == [f"img{d}.example.com" for d in range(RIGHTS_TOP)]
    assert shares[OTHER]["records"] == sum(range(1, 15 - RIGHTS_TOP + 1)) and shares[OTHER]["values"] == 5
    assert shares[NO_URL]["records"] == 4
    assert sum(s["records"] for s in fig["domains"]) == len(domains)
    assert (fig["opted_out"], fig["excluded"], fig["taken_down"]) == (0, 0, 0)  # no rejects at all: zeros
    card = "\n".join(rights_lines(fig))
    assert f"| {OTHER} (5 values) | 15 |" in card
    assert "| CC/BY 4.0 |" in card  # a licence's free text cannot break the table
