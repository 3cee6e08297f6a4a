"""The exclusion list and takedown, on a real curate of web copies of real photos (facecap.webcopies).

The release holds web copies (crops, mirrors, rescales, re-encodes) of the
astronaut, Kafka and the six-person group photo, from a folder and from a URL
list served on loopback. Each face's person is known (label_faces), so a test
can check that a takedown removes every copy of one person's face and no one
else's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import re

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import offline_config, random_facenet, read_release, run_curate
from http_fixture_server import ServerThread

from facecap.settings import ConfigError
from facecap.stages.dedup import hamming
from facecap.stages.exclude import parse_list, read_list
from facecap.webcopies import label_faces, web_copy

FOLDER = range(0, 12)  # two copies of each photo (astronaut, kafka, group, and three without a face)
SERVED = range(12, 18)  # one more of each, downloaded from a URL list
KAFKA_PHOTO = 19  # a copy of Kafka's portrait in no source: the photo a person sends
NEW_KAFKA = 25  # a copy that appears in a later crawl


def write_copy(folder: Path, i: int) -> None:
    name, data, _ = web_copy(i)
    (folder / f"{name}.jpg").write_bytes(data)


@pytest.fixture(scope="module")
def server():
    with ServerThread({f"{web_copy(i)[0]}.jpg": web_copy(i)[1] for i in SERVED}) as srv:
        yield srv


def config(**dedup):
    # keep=all: every copy stays in the release, so a takedown must remove each one itself (with keep=best
    # the other copies are already near_duplicate rejects).
    return offline_config(ingest={"shard_size": 6}, execution={"n_workers": 2}, detect={"min_face_px": 64},
                          download={"allow_addresses": ["127.0.0.1/32"], "timeout_s": 5, "retries": 1},
                          dedup={"keep": "all", **dedup})


@pytest.fixture(scope="module")
def sources(tmp_path_factory, server) -> list[Path]:
    root = tmp_path_factory.mktemp("takedown-src")
    folder = root / "folder"
    folder.mkdir()
    for i in FOLDER:
        write_copy(folder, i)
    urls = [server.url(f"/img/{web_copy(i)[0]}.jpg") for i in SERVED]
    pq.write_table(pa.table({"URL": urls, "TEXT": ["a photo"] * len(urls)}), root / "list.parquet")
    return [folder, root / "list.parquet"]


@pytest.fixture(scope="module")
def curated(prefect_api_url, sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("takedown") / "out"
    run_curate(sources, out, config())
    return out


@pytest.fixture
def out(curated, tmp_path) -> Path:
    """A copy of the curated output, for a test that changes it."""
    copy = tmp_path / "out"
    shutil.copytree(curated, copy)
    return copy


def persons(data: pa.Table) -> dict[str, str | None]:
    """sample_id -> the person whose face it is (ground truth of the web copies)."""
    truth = {}
    for i in list(FOLDER) + list(SERVED) + [NEW_KAFKA]:
        name, _, faces = web_copy(i)
        truth[name] = faces
    by_image: dict[str, list[dict]] = {}
    for row in data.select(["sample_id", "image_id", "source_offset", "source_meta", "bbox"]).to_pylist():
        meta = json.loads(row["source_meta"]) if row["source_meta"] else {}
        name = (meta.get("url") or row["source_offset"]).rsplit("/", 1)[-1].removesuffix(".jpg")
        by_image.setdefault(name, []).append(row)
    out = {}
    for name, rows in by_image.items():
        for row, person in zip(rows, label_faces([r["bbox"] for r in rows], truth[name])):
            out[row["sample_id"]] = person
    return out


def release_info(out: Path) -> dict:
    return json.loads((out / "release" / "release.json").read_text())


def audit(out: Path) -> list[dict]:
    from facecap import manifest

    return manifest.takedowns(str(out / "manifest.duckdb"))


def test_an_unknown_or_malformed_line_is_an_error_naming_it(tmp_path):
    good = "# opt-outs\nurl https://example.com/a.jpg#frag  # a comment\ndomain Example.ORG\n" \
           f"sha256 {'ab' * 32}\nface 00ff00ff00ff00ff\n"
    entries = parse_list(good, "x.txt")
    assert [(e.kind, e.value, e.line) for e in entries] == [
        ("url", "https://example.com/a.jpg#frag", 2), ("domain", "example.org", 3), ("sha256", "ab" * 32, 4),
        ("face", "00ff00ff00ff00ff", 5)]
    with pytest.raises(ConfigError, match=r"x\.txt:3: unknown entry kind 'photo'"):
        parse_list("url https://example.com/a.jpg\n\nphoto me.jpg\n", "x.txt")
    with pytest.raises(ConfigError, match=r"x\.txt:1: face entry 'abc' is not 16 hex"):
        parse_list("face abc\n", "x.txt")
    with pytest.raises(ConfigError, match="no such file"):
        read_list(str(tmp_path / "missing.txt"), required=True)
    listed = tmp_path / "list.txt"
    listed.write_text("domain example.org\nsha1 abc\n")
    from facecap.chain import plan_run

    with pytest.raises(ConfigError, match=r"list\.txt:2: unknown entry kind 'sha1'"):
        plan_run(offline_config(exclude={"list": str(listed)}))  # before any work


def test_release_holds_every_persons_copies(curated):
    data, _ = read_release(curated)
    who = persons(data)
    assert sum(p == "kafka" for p in who.values()) >= 3  # two in the folder, one downloaded
    assert sum(p == "astronaut" for p in who.values()) >= 2


def linked(data: pa.Table, hashes: list[int], max_distance: int = 8) -> set[str]:
    """sample_ids of the release faces within max_distance bits of any of `hashes` (either orientation)."""
    ph = np.array(data.column("phash").to_pylist(), np.uint64)
    pm = np.array(data.column("phash_mirror").to_pylist(), np.uint64)
    near = np.zeros(len(ph), bool)
    for h in hashes:
        e = np.array([h], np.uint64)
        near |= np.minimum(hamming(ph, e), hamming(pm, e)) <= max_distance
    return {s for s, n in zip(data.column("sample_id").to_pylist(), near) if n}


def test_dry_run_shows_what_would_go_and_changes_nothing(out, tmp_path, capsys):
    from facecap.cli import main
    from facecap.commands.takedown import photo_faces

    photo = tmp_path / "me.jpg"
    photo.write_bytes(web_copy(KAFKA_PHOTO)[1])
    before = (out / "release" / "release.json").read_bytes()
    assert main(["takedown", str(out), "--image", str(photo), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    data, _ = read_release(out)
    [face], _, _ = photo_faces(str(photo), offline_config())
    near = linked(data, [int(face)])
    who = persons(data)
    assert len(near) >= 2 and {who[s] for s in near} == {"kafka"}  # the photo's two copies in the folder
    for sid in near:
        assert re.search(rf"match: {sid} \(photo face 1 of 1: \d of 64 bits", printed)
    assert "dry run: nothing changed" in printed
    assert (out / "release" / "release.json").read_bytes() == before
    assert not (out / "exclusions.txt").exists()
    assert audit(out) == []


def test_takedown_by_photo_removes_every_copy_and_stays_removed(out, tmp_path, sources, capsys):
    from facecap.cli import main

    photo = tmp_path / "me.jpg"
    photo.write_bytes(web_copy(KAFKA_PHOTO)[1])
    before_data, _ = read_release(out)
    who = persons(before_data)
    kafka = {s for s, p in who.items() if p == "kafka"}
    others = {s for s, p in who.items() if p != "kafka"}
    before = release_info(out)

    assert main(["takedown", str(out), "--image", str(photo)]) == 0
    after = release_info(out)
    assert after["run_id"] != before["run_id"] and after["published"]
    assert after["validation"]["passed"] is True
    data, rejects = read_release(out)
    kept = set(data.column("sample_id").to_pylist())
    gone = set(who) - kept
    assert len(gone) >= 2 and gone <= kafka and kept >= others  # no one else's face went
    # A copy of Kafka left in the release is one dedup does not link to any removed copy or to the photo: more
    # than dedup.max_distance bits from each (here the downloaded copy, whose face lies on the image edge).
    assert not linked(before_data, [h for s, h in zip(before_data.column("sample_id").to_pylist(),
                                                      before_data.column("phash").to_pylist()) if s in gone]) & kept
    kafka = gone
    excluded = rejects.filter(pa.compute.equal(rejects.column("reason"), "excluded"))
    assert set(excluded.column("sample_id").to_pylist()) == gone
    assert all("exclusion list line" in d for d in excluded.column("detail").to_pylist())
    # No stage recomputed a shard: detection is never rerun for a takedown.
    con = duckdb.connect(str(out / "manifest.duckdb"), read_only=True)
    statuses = con.execute("SELECT DISTINCT status FROM stage_runs WHERE run_id = ?", [after["run_id"]]).fetchall()
    con.close()
    assert statuses == [("cached",)]
    # The audit log: what was asked and what changed, and nothing of the photo.
    [row] = audit(out)
    assert json.loads(row["requests"]) == [{"kind": "image"}]
    assert row["matched"] == len(gone) and row["status"] == "published"
    assert (row["records_before"], row["records_after"]) == (len(who), len(who) - len(gone))
    assert (row["release_before"], row["release_after"]) == (before["run_id"], after["run_id"])
    listed = (out / "exclusions.txt").read_text()
    assert "face " in listed
    for value in row.values():
        assert "me.jpg" not in str(value)
        assert not any(line.split()[1] in str(value) for line in listed.splitlines() if line.startswith("face"))

    # The nightly re-curation of the same sources, and of a later crawl holding a new copy: Kafka stays out.
    run_curate(sources, out, config())
    assert not set(read_release(out)[0].column("sample_id").to_pylist()) & kafka
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    write_copy(crawl, NEW_KAFKA)
    result = run_curate(sources + [crawl], out, config())
    data, rejects = read_release(out)
    assert result.records == len(who) - len(gone) and not set(data.column("sample_id").to_pylist()) & gone
    # The new copy is kept out too. An excluded face's published reject holds no source, so it is found as the
    # one excluded face that is not an earlier copy.
    excluded = rejects.filter(pa.compute.equal(rejects.column("reason"), "excluded"))
    assert len(set(excluded.column("sample_id").to_pylist()) - gone) == 1


def removed_only_linked_copies(before: pa.Table, after: pa.Table, persons_asked: set[str]) -> set[str]:
    """The faces that left: all of the asked persons, every one within dedup.max_distance of another that left
    (so no linked copy stays), and no face of the asked persons that stayed is linked to one that left."""
    who = persons(before)
    kept = set(after.column("sample_id").to_pylist())
    gone = set(who) - kept
    assert gone and {who[s] for s in gone} <= persons_asked  # no one else's face went
    hashes = [h for s, h in zip(before.column("sample_id").to_pylist(), before.column("phash").to_pylist())
              if s in gone]
    assert not linked(before, hashes) & kept
    return gone


def test_takedown_by_url_and_sample_id_through_the_cli(out, server):
    from facecap.cli import main

    before, _ = read_release(out)
    who = persons(before)
    astronaut_url = server.url(f"/img/{web_copy(12)[0]}.jpg")
    group = sorted(s for s, p in who.items() if p == "group-3")
    assert main(["takedown", str(out), "--url", astronaut_url, "--sample-id", group[0]]) == 0
    after, rejects = read_release(out)
    gone = removed_only_linked_copies(before, after, {"astronaut", "group-3"})
    assert group[0] in gone
    by_url = [m for m in before.to_pylist() if m["source_meta"] and astronaut_url in m["source_meta"]]
    assert by_url and {m["sample_id"] for m in by_url} <= gone
    [row] = audit(out)
    assert json.loads(row["requests"]) == [{"kind": "url", "value": astronaut_url},
                                           {"kind": "sample_id", "value": group[0]}]
    assert row["matched"] == len(gone) and row["records_after"] == len(who) - len(gone)
    assert f"url {astronaut_url}" in (out / "exclusions.txt").read_text()


def test_takedown_flow(out):
    from facecap.flows.takedown import takedown

    before, _ = read_release(out)
    who = persons(before)
    target = sorted(s for s, p in who.items() if p == "group-0")
    result = takedown(out=str(out), sample_ids=target[:1])
    assert result["status"] == "published"
    after, _ = read_release(out)
    gone = removed_only_linked_copies(before, after, {"group-0"})
    assert target[0] in gone and set(result["removed"]) == gone
    assert release_info(out)["run_id"] == result["release_after"]
    assert "group-1" in persons(after).values()  # the people beside them stay


def test_with_dedup_keeping_one_copy_every_copy_is_excluded_not_a_near_duplicate(prefect_api_url, sources, tmp_path,
                                                                                  server):
    """dedup.keep=best (the default): the release holds one copy per cluster, the others are near_duplicate rejects.
    A takedown of the kept copy excludes the whole cluster; the funnel and the row count check stay exact."""
    from facecap.cli import main

    cfg = config()
    cfg.dedup.keep = "best"
    out = tmp_path / "out"
    run_curate(sources, out, cfg)
    before, rejects = read_release(out)
    near = rejects.filter(pa.compute.equal(rejects.column("reason"), "near_duplicate")).to_pylist()
    assert near  # copies of the group photo, Kafka, the astronaut
    kept_for = near[0]["detail"].split()[2].rstrip(",")  # "near-duplicate of <sample_id>, kept for ..."
    copies = {r["sample_id"] for r in near if f"near-duplicate of {kept_for}," in r["detail"]}
    assert main(["takedown", str(out), "--sample-id", kept_for]) == 0
    after, rejects = read_release(out)
    info = release_info(out)
    assert info["validation"]["passed"] is True and after.num_rows == before.num_rows - 1
    excluded = set(rejects.filter(pa.compute.equal(rejects.column("reason"), "excluded")).column("sample_id")
                   .to_pylist())
    assert excluded == copies | {kept_for}
    funnel = {row["stage"]: row for row in info["funnel"]}
    assert funnel["exclude (release-wide)"]["rejects"] == {"excluded": len(excluded)}
    assert funnel["dedup (release-wide)"]["rows_in"] == funnel["exclude (release-wide)"]["rows_out"]
    assert funnel["dedup (release-wide)"]["rows_out"] == after.num_rows


def test_a_configured_list_excludes_by_sha256_and_domain_without_recomputing_a_shard(out, sources, tmp_path):
    import hashlib

    folder = sources[0]
    astronaut = sorted(folder.glob("astronaut_*.jpg"))[0]
    listed = tmp_path / "optouts.txt"
    listed.write_text(f"# opt-outs\nsha256 {hashlib.sha256(astronaut.read_bytes()).hexdigest()}\ndomain 127.0.0.1\n")
    cfg = config()
    cfg.exclude.list = str(listed)
    before, _ = read_release(out)
    result = run_curate(sources, out, cfg)
    after, rejects = read_release(out)
    excluded = rejects.filter(pa.compute.equal(rejects.column("reason"), "excluded")).to_pylist()
    details = {r["sample_id"]: r["detail"] for r in excluded}
    downloaded = {r["sample_id"] for r in before.to_pylist() if r["source_meta"]}
    from_file = {r["sample_id"] for r in before.to_pylist() if r["source_offset"] == astronaut.name}
    assert downloaded and from_file
    for sid in downloaded:
        assert "line 3 (domain 127.0.0.1)" in details[sid]
    for sid in from_file:
        assert "line 2 (sha256" in details[sid]
    assert not set(after.column("sample_id").to_pylist()) & (downloaded | from_file)
    carried = set(details) - downloaded - from_file  # copies of those faces from the folder
    assert all(details[sid].startswith("near-duplicate (cluster of") for sid in carried)
    excluded_n = len(details)
    assert f"<b>{excluded_n} faces excluded</b>" in (out / "release" / "report" / "index.html").read_text()
    assert f"An exclusion list of 2 entries (opt-outs and takedowns) removed {excluded_n} faces" in \
        (out / "release" / "README.md").read_text()
    con = duckdb.connect(str(out / "manifest.duckdb"), read_only=True)
    statuses = con.execute("SELECT DISTINCT status FROM stage_runs WHERE run_id = ?", [result.run_id]).fetchall()
    con.close()
    assert statuses == [("cached",)]


def test_the_pass_matches_hosts_by_label_and_carries_a_face_to_its_chain_of_copies():
    from facecap.config import Config
    from facecap.stages.exclude import ExclusionPass

    entry = 0x0F0F_0F0F_0F0F_0F0F
    flip = lambda h, bits: h ^ ((1 << bits) - 1)  # noqa: E731 (h with its lowest `bits` bits flipped)
    rows = [("https://cdn.Example.org/a.jpg", 0xAAAA_AAAA_AAAA_AAAA),
            ("https://notexample.org/a.jpg", 0x5555_5555_5555_5555), ("https://x.com/a.jpg", 0x3333_3333_3333_3333), (None, flip(entry, 3)), (None, flip(entry, 10)),
            (None, 0xFFFF_0000_FFFF_0000)]
    table = pa.table({"sample_id": [f"s{i}" for i in range(len(rows))], "image_id": [f"i{i}" for i in range(len(rows))],
                      "source_meta": [json.dumps({"url": u}) if u else None for u, _ in rows],
                      "phash": pa.array([h for _, h in rows], pa.uint64()),
                      "phash_mirror": pa.array([h ^ (1 << 63) for _, h in rows], pa.uint64()),
                      "source": ["list.parquet"] * len(rows), "source_offset": [str(i) for i in range(len(rows))],
                      "det_score": [0.99] * len(rows), "bbox": [[0.0, 0.0, 10.0, 10.0]] * len(rows)})
    p = ExclusionPass(parse_list(f"domain example.org\nurl https://x.com/a.jpg\nface {entry:016x}\n"),
                      Config.model_validate({"profile": "offline"}).dedup)
    p.fit_batches([table.slice(0, 3), table.slice(3)])
    kept, index, rejected = p.apply(np.arange(len(rows)), table)
    assert kept.column("sample_id").to_pylist() == ["s1", "s5"]
    details = dict(zip(rejected.column("sample_id").to_pylist(), rejected.column("detail").to_pylist()))
    assert "line 1 (domain example.org)" in details["s0"] and "line 2 (url)" in details["s2"]
    # The published reject says which line and why, never where the person's image is.
    assert not any("x.com" in d for d in details.values())
    for row in rejected.to_pylist():
        assert row["reason"] == "excluded" and row["image_id"] and row["sample_id"]
        assert (row["source"], row["source_offset"], row["bbox"], row["det_score"]) == ("", None, None, None)
    assert details["s3"].startswith("face within 3 of 64 bits of exclusion list line 3 (face)")
    # 10 bits from the entry, 7 from s3: a copy of a copy, carried by the cluster
    assert details["s4"].startswith("near-duplicate (cluster of 2 faces") and f"{entry:016x}" not in details["s4"]
    assert p.summary()["excluded"] == 4 and p.summary()["near_duplicates_carried"] == 1


def test_takedown_by_photo_matches_by_identity_when_the_release_has_an_identity_model(prefect_api_url, sources,
                                                                                      tmp_path, capsys):
    """With dedup.identity on, a photo also matches the release faces whose identity hash is close. The
    identity hashes are never released: they come from the dedup outputs of the run that made the release.
    Random weights (named above), so the threshold is 64 bits (every face) and the test checks what is read
    and reported: the face cut from the very bytes of the photo is at 0 bits, every face carries its distance."""
    import torch

    from facecap.cli import main

    weights = tmp_path / "facenet-random.pt"
    torch.save(random_facenet(3).state_dict(), weights)
    out = tmp_path / "out"
    run_curate(sources, out, config(identity="on", identity_weights=str(weights), identity_max_distance=64))
    data, _ = read_release(out)
    assert "identity_hash" not in data.column_names
    who = persons(data)
    kafka_copy = next(i for i in FOLDER if web_copy(i)[2] and "kafka" in str(web_copy(i)[2]))
    photo = tmp_path / "me.jpg"
    photo.write_bytes(web_copy(kafka_copy)[1])  # the bytes of a source image: its face is at 0 bits

    assert main(["takedown", str(out), "--image", str(photo), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    bits = {m[0]: int(m[1]) for m in re.findall(r"match: (\S+) \(.*?identity (\d+) of 64 bits "
                                                r"\(dedup.identity_max_distance=64\)", printed)}
    assert set(bits) == set(who)  # every face of the release, each with its identity distance
    assert 0 in bits.values() and who[min(bits, key=bits.get)] == "kafka"
    assert len(set(bits.values())) > 2  # distances measured, not a constant
    assert "dry run: nothing changed" in printed

    # Other weights at the same path give other hashes: the command refuses to compare them.
    torch.save(random_facenet(4).state_dict(), weights)
    assert main(["takedown", str(out), "--image", str(photo), "--dry-run"]) != 0
    assert "cannot be compared" in capsys.readouterr().err
