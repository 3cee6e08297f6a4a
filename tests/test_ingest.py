"""Planning and reading sources: folders, WebDataset tars, Parquet; bad input becomes rejects."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ingest_sources, offline_config

from facecap.example_data import astronaut, bomb_png, write_folder, write_webdataset
from facecap.sources.plan import chunk_names, plan_shards
from facecap.sources.raw import fingerprint_bytes
from facecap.sources.spec import ShardSpec
from facecap.stages.base import Counters
from facecap.stages.ingest import ingest_shard


def _png() -> bytes:
    buf = io.BytesIO()
    astronaut().resize((64, 64)).save(buf, format="PNG")
    return buf.getvalue()


def _ingest(sources, **ingest) -> tuple[list[ShardSpec], pa.Table, pa.Table, Counters]:
    specs, _, kept, rejects, counters = ingest_sources(sources, **ingest)
    return specs, kept, rejects, counters


def _reasons(rejects: pa.Table) -> dict:
    return dict(zip(rejects.column("source_offset").to_pylist(), rejects.column("reason").to_pylist()))


def test_folder_with_txt_and_json_sidecars(tmp_path):
    write_folder(tmp_path / "a", {"one.png": (_png(), "caption from txt")}, sidecar="txt")
    write_folder(tmp_path / "a", {"two.png": (_png(), "caption from json")}, sidecar="json")
    (tmp_path / "a" / "notes.md").write_text("not an image")
    specs, kept, rejects, counters = _ingest([tmp_path / "a"])
    rows = {r["source_offset"]: r for r in kept.to_pylist()}
    assert rows["one.png"]["source_caption"] == "caption from txt"
    assert rows["two.png"]["source_caption"] == "caption from json"
    assert json.loads(rows["two.png"]["source_meta"]) == {"caption": "caption from json"}
    assert rows["one.png"]["source"] == str(tmp_path / "a") and rows["one.png"]["source_width"] == 64
    assert rejects is None and counters.rows_in == 2 and counters.rows_out == 2
    _, notes = plan_shards([str(tmp_path / "a")], offline_config().ingest)
    assert any("ignored 1 file" in n for n in notes), "files that are skipped are said, not silently dropped"


def test_webdataset_tar_in_img2dataset_layout(tmp_path):
    write_webdataset(tmp_path / "00000.tar", {"a.jpg": (_png(), "first"), "b.png": (_png(), "second")})
    _, kept, rejects, _ = _ingest([tmp_path / "*.tar"])
    assert kept.column("source_offset").to_pylist() == ["000000000", "000000001"]
    assert kept.column("source_caption").to_pylist() == ["first", "second"]
    assert json.loads(kept.column("source_meta")[0].as_py())["status"] == "success"
    assert rejects is None


def test_truncated_tar_keeps_what_was_read_and_records_the_break(tmp_path):
    write_webdataset(tmp_path / "full.tar", {f"{i}.png": (_png(), f"c{i}") for i in range(4)})
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: int(len(data) * 0.6)])
    _, kept, rejects, _ = _ingest([tmp_path / "cut.tar"])
    assert 1 <= kept.num_rows < 4
    assert "unreadable_source" in rejects.column("reason").to_pylist()
    assert any("tar stream unreadable" in d for d in rejects.column("detail").to_pylist())


def test_tar_key_without_image_is_rejected(tmp_path):
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        for name, payload in (("k1.txt", b"caption only"), ("k2.png", _png())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    _, kept, rejects, _ = _ingest([tmp_path / "x.tar"])
    assert kept.column("source_offset").to_pylist() == ["k2"]
    assert _reasons(rejects) == {"k1": "unreadable_member"}


def test_parquet_bytes_structs_paths_urls_and_nulls(tmp_path):
    png = _png()
    (tmp_path / "img.png").write_bytes(png)
    pq.write_table(pa.table({"image": pa.array([png, None], pa.binary()), "caption": ["a", "b"],
                             "score": [0.5, 0.7]}), tmp_path / "bytes.parquet")
    struct = pa.array([{"bytes": png, "path": "x.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "text": ["hf"]}), tmp_path / "hf.parquet")
    pq.write_table(pa.table({"image_path": ["img.png", "gone.png", "https://example.invalid/a.jpg"],
                             "TEXT": ["p", "q", "r"]}), tmp_path / "paths.parquet")
    _, kept, rejects, counters = _ingest([tmp_path / "*.parquet"])
    by_source = {(r["source"].rsplit("/", 1)[1], r["source_offset"]): r for r in kept.to_pylist()}
    assert by_source[("bytes.parquet", "0")]["source_caption"] == "a"
    assert json.loads(by_source[("bytes.parquet", "0")]["source_meta"]) == {"score": 0.5}
    assert by_source[("hf.parquet", "0")]["source_caption"] == "hf"
    # Referenced, not copied: the record holds where the bytes are and their fingerprint.
    assert by_source[("paths.parquet", "0")]["source_image"] is None
    assert by_source[("paths.parquet", "0")]["source_fingerprint"] == fingerprint_bytes(png)
    reasons = {(r["source"].rsplit("/", 1)[1], r["source_offset"]): r["reason"] for r in rejects.to_pylist()}
    assert reasons == {("bytes.parquet", "1"): "empty_file", ("paths.parquet", "1"): "missing_file",
                       ("paths.parquet", "2"): "url_not_downloaded"}
    assert counters.rows_in == 6


def test_parquet_without_image_column_rejects_every_row_and_says_how_to_fix(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x", b"y"], "caption": ["a", "b"]}), tmp_path / "odd.parquet")
    _, kept, rejects, _ = _ingest([tmp_path / "odd.parquet"])
    assert kept is None and _reasons(rejects) == {"0": "missing_columns", "1": "missing_columns"}
    assert "ingest.image_column" in rejects.column("detail")[0].as_py()
    # Naming the column fixes it (and the bytes are then judged as images).
    _, kept, rejects, _ = _ingest([tmp_path / "odd.parquet"], image_column="pixels")
    assert kept is None and set(_reasons(rejects).values()) == {"decode_error"}


def test_corrupt_parquet_row_group_rejects_its_rows_and_keeps_the_others(tmp_path):
    png = _png()
    path = tmp_path / "rg.parquet"
    pq.write_table(pa.table({"image": [png] * 4, "caption": list("abcd")}), path, row_group_size=2,
                   compression="zstd")
    data = bytearray(path.read_bytes())
    start = pq.read_metadata(path).row_group(1).column(0).data_page_offset
    for i in range(start, start + 64):  # garble the second row group's page header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    _, kept, rejects, counters = _ingest([path])
    assert kept.column("source_offset").to_pylist() == ["0", "1"]
    assert _reasons(rejects) == {"2": "unreadable_member", "3": "unreadable_member"}
    assert "row group 1" in rejects.column("detail")[0].as_py() and counters.rows_in == 4


def test_unreadable_and_missing_sources_are_reported_not_fatal(tmp_path):
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "data.csv").write_text("a,b\n")
    specs, kept, rejects, _ = _ingest([tmp_path / "corrupt.parquet", tmp_path / "data.csv",
                                       tmp_path / "missing", tmp_path / "none-*.tar"])
    assert [s.kind for s in specs] == ["unreadable"] * 4
    assert kept is None and rejects.num_rows == 4
    assert set(rejects.column("reason").to_pylist()) == {"unreadable_source"}
    assert all(rejects.column("image_id").is_null().to_pylist())
    details = " ".join(rejects.column("detail").to_pylist())
    assert "no such file" in details and "no file matches" in details and "not a folder" in details


def test_oversized_files_and_tar_members_are_rejected_unread(tmp_path):
    png = _png()
    write_folder(tmp_path / "f", {"big.png": (png, "c"), "ok.png": (png, "d")})
    (tmp_path / "f" / "big.png").write_bytes(png + b"\0" * 5000)
    write_webdataset(tmp_path / "t.tar", {"big.png": (png + b"\0" * 5000, "c"), "ok.png": (png, "d")})
    limit = len(png) + 100
    cfg = offline_config(image={"max_bytes": limit})
    specs, _ = plan_shards([str(tmp_path / "f"), str(tmp_path / "t.tar")], cfg.ingest)
    counters = Counters()
    chunks = [c for spec in specs for c in ingest_shard(spec, cfg.ingest, cfg.image, counters)]
    rejects = pa.concat_tables([c.rejected for c in chunks if c.rejected is not None])
    kept = pa.concat_tables([c.kept for c in chunks if c.kept is not None])
    assert sorted(kept.column("source_offset").to_pylist()) == ["000000001", "ok.png"]
    assert _reasons(rejects) == {"big.png": "too_large", "000000000": "too_large"}
    assert all("(not read)" in d for d in rejects.column("detail").to_pylist())


def test_bad_images_in_a_folder_are_rejected_at_ingest(tmp_path):
    jpeg = io.BytesIO()
    astronaut().save(jpeg, format="JPEG")
    write_folder(tmp_path, {"empty.jpg": (b"", ""), "text.jpg": (b"hello" * 20, ""), "bomb.png": (bomb_png(), ""),
                            "fine.jpg": (jpeg.getvalue(), "")})
    _, kept, rejects, counters = _ingest([tmp_path])
    assert kept.column("source_offset").to_pylist() == ["fine.jpg"]
    assert _reasons(rejects) == {"empty.jpg": "empty_file", "text.jpg": "decode_error", "bomb.png": "too_large"}
    assert counters.rows_in == 4 and sum(counters.rejects.values()) == 3


def test_same_source_twice_is_read_once_and_ids_are_stable(tmp_path):
    write_folder(tmp_path, {"a.png": (_png(), "x"), "b.png": (_png(), "y")})
    specs, kept, _, _ = _ingest([tmp_path, str(tmp_path) + "/", tmp_path / "a.png", tmp_path])
    assert kept.num_rows == 2 and sorted(kept.column("source_offset").to_pylist()) == ["a.png", "b.png"]
    # A file given alone is identified as part of its folder: the same id either way.
    _, alone, _, _ = _ingest([tmp_path / "a.png"])
    ids = dict(zip(kept.column("source_offset").to_pylist(), kept.column("image_id").to_pylist()))
    assert alone.column("image_id").to_pylist() == [ids["a.png"]]
    _, again, _, _ = _ingest([tmp_path])
    assert kept.column("image_id").equals(again.column("image_id"))


def test_shards_respect_size_and_fingerprints_follow_content(tmp_path):
    write_folder(tmp_path, {f"{i:03d}.png": (_png(), "") for i in range(40)})
    specs, _, _, _ = _ingest([tmp_path], shard_size=8)
    assert sum(len(s.members) for s in specs) == 40 and all(len(s.members) <= 16 for s in specs)
    before = {s.members: s.fingerprint for s in specs}
    (tmp_path / "005.png").write_bytes(_png() + b"")  # rewrite: same bytes, new mtime
    (tmp_path / "039.png").write_bytes(bomb_png())  # changed content
    after, _, _, _ = _ingest([tmp_path], shard_size=8)
    changed = [s for s in after if before.get(s.members) != s.fingerprint]
    assert 1 <= len(changed) <= 2


@pytest.mark.parametrize("size", [1, 4, 100])
def test_content_defined_chunks_survive_insertions(size):
    names = [f"img{i:05d}.jpg" for i in range(2000)]
    before = chunk_names(names, size)
    assert [n for c in before for n in c] == names
    grown = sorted(names + ["img01000a.jpg"])
    after = chunk_names(grown, size)
    assert len(set(after) - set(before)) <= 3, "an insertion may touch only the shards around it"
