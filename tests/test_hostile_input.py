"""Hostile and odd input to ingest: every case ends as a reject with a reason (or a recorded, recoverable
change), in bounded time and memory, never as a crash of the shard or a silent drop."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ingest_sources, offline_config

from facecap.example_data import astronaut, write_folder
from facecap.records import record_columns
from facecap.shards import OutputRef, ShardInput
from facecap.sources.captions import MAX_TEXT_BYTES
from facecap.sources.plan import plan_shards
from facecap.sources.raw import fingerprint_bytes
from facecap.sources.reader import read_source
from facecap.sources.tar import MAX_MEMBER_NAME
from facecap.stages.ingest import Ingest


def _png(side: int = 64) -> bytes:
    buf = io.BytesIO()
    astronaut().resize((side, side)).save(buf, format="PNG")
    return buf.getvalue()


def _ingest(sources, image=None, **ingest):
    specs, notes, kept, rejects, counters = ingest_sources(sources, image, **ingest)
    return specs, notes, kept.to_pylist() if kept else [], rejects.to_pylist() if rejects else [], counters


def _add(tar: tarfile.TarFile, name: str, payload: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(payload) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)


# --------------------------------------------------------------------------- tar members


def test_tar_links_devices_and_unsafe_names_are_rejected_as_unsafe_member(tmp_path):
    png = _png()
    long_name = "n" * 10_000 + ".png"
    with tarfile.open(tmp_path / "hostile.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "ok.png", png)
        _add(tar, "ok.txt", b"a fine caption")
        _add(tar, "folder", kind=tarfile.DIRTYPE)  # a folder entry: not a record, nothing to reject
        _add(tar, "/abs/x.png", png)
        _add(tar, "../up.png", png)
        _add(tar, "a/../../down.png", png)
        _add(tar, "sym.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "hard.png", kind=tarfile.LNKTYPE, link="ok.png")
        _add(tar, "tty.png", kind=tarfile.CHRTYPE)
        _add(tar, "disk.png", kind=tarfile.BLKTYPE)
        _add(tar, "pipe.png", kind=tarfile.FIFOTYPE)
        _add(tar, long_name, png)
        _add(tar, "esc\x1b[2J.png", png)
        _add(tar, "bad\udcff.png", png)  # a name that is not UTF-8 (tarfile reads it with surrogateescape)
        _add(tar, "last.png", png)
    _, _, kept, rejects, counters = _ingest([tmp_path / "hostile.tar"])

    assert [r["source_offset"] for r in kept] == ["ok", "last"]
    assert kept[0]["source_caption"] == "a fine caption"
    assert {r["reason"] for r in rejects} == {"unsafe_member"} and len(rejects) == 11
    details = {r["source_offset"]: r["detail"] for r in rejects}
    assert all(o.startswith("@member") for o in details), "a hostile name never becomes a key or an offset"
    text = " | ".join(details.values())
    for expected in ("absolute path", "'..' path component", "symbolic link to '/etc/passwd'", "hard link to 'ok.png'",
                     "character device", "block device", "FIFO", f"name of {len(long_name)} characters > "
                     f"{MAX_MEMBER_NAME}", "control character in name", "not valid UTF-8"):
        assert expected in text, expected
    assert max(len(d) for d in details.values()) <= 500
    assert all(r["image_id"] for r in rejects)
    assert counters.rows_in == 13 and counters.rows_out == 2  # two records, eleven rejects; the folder is none


def test_tar_duplicate_keys_keep_the_first_image_and_reject_the_others_naming_it(tmp_path):
    first, second = _png(64), _png(48)
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        _add(tar, "x.jpg", first)  # not a JPEG, but the key's image all the same (probed as PNG)
        _add(tar, "x.txt", b"caption of x")
        _add(tar, "x.png", second)
        _add(tar, "y.png", first)
        _add(tar, "y.png", second)
        _add(tar, "y.txt", b"one")
        _add(tar, "y.txt", b"two")
        _add(tar, "z.png", first)
        _add(tar, "w.png", second)
        _add(tar, "z.png", second)  # the key comes back after another
        _add(tar, "z.txt", b"late caption")
    _, _, kept, rejects, counters = _ingest([tmp_path / "dup.tar"])

    by_key = {r["source_offset"]: r for r in kept}
    assert list(by_key) == ["x", "y", "z", "w"]
    assert len({r["image_id"] for r in kept}) == 4, "one record, one id per key"
    assert by_key["x"]["source_fingerprint"] == fingerprint_bytes(first)
    assert by_key["x"]["source_caption"] == "caption of x"
    assert by_key["y"]["source_fingerprint"] == fingerprint_bytes(first) and by_key["y"]["source_caption"] == "one"
    assert by_key["z"]["source_fingerprint"] == fingerprint_bytes(first) and by_key["z"]["source_caption"] is None
    details = {r["source_offset"]: r["detail"] for r in rejects}
    assert {r["reason"] for r in rejects} == {"duplicate_member"}
    assert sorted(details) == ["@member10", "@member2", "@member4", "@member6", "@member9"]
    assert "'x.png' is a second image for key 'x'; kept 'x.jpg' (member 0)" in details["@member2"]
    assert "kept 'y.png' (member 3)" in details["@member4"] and "second txt" in details["@member6"]
    assert "already read from member 7" in details["@member9"] and "already read" in details["@member10"]
    assert counters.rows_in == 4 + 5

    # Reading the bytes again (detect) walks the same records in the same order.
    cfg = offline_config()
    spec = plan_shards([str(tmp_path / "dup.tar")], cfg.ingest)[0][0]
    again = [r for r in read_source(spec, cfg.ingest, cfg.image, with_text=False) if hasattr(r, "data")]
    assert [(r.offset, fingerprint_bytes(r.data)) for r in again] == \
        [(k, by_key[k]["source_fingerprint"]) for k in by_key]


def test_folder_fifos_and_links_to_devices_are_skipped_with_a_note_never_opened(tmp_path):
    png = _png()
    write_folder(tmp_path / "f", {"real.png": (png, "real"), "z.png": (png, "")})
    root = tmp_path / "f"
    os.mkfifo(root / "pipe.jpg")  # opening it would wait for a writer forever
    os.symlink("/dev/zero", root / "zero.jpg")  # reading it would never end
    os.unlink(root / "z.txt")
    os.symlink("/dev/zero", root / "z.txt")
    os.symlink(root / "real.png", root / "alias.png")  # a link to a regular file is read like one
    _, notes, kept, rejects, _ = _ingest([root])
    assert sorted(r["source_offset"] for r in kept) == ["alias.png", "real.png", "z.png"]
    assert rejects == [] and next(r for r in kept if r["source_offset"] == "z.png")["source_caption"] is None
    note = next(n for n in notes if "not regular files" in n)
    assert "ignored 3 entries" in note and all(name in note for name in ("'pipe.jpg'", "'zero.jpg'", "'z.txt'"))


# --------------------------------------------------------------------------- text fields


def test_huge_sidecars_are_rejected_unread_in_bounded_memory(tmp_path):
    png = _png()
    write_folder(tmp_path / "f", {"sparse.png": (png, ""), "big_caption.png": (png, ""), "edge.png": (png, ""),
                                  "fine.png": (png, "")})
    root = tmp_path / "f"
    for name in os.listdir(root):
        if name.endswith(".txt"):
            os.unlink(root / name)
    with open(root / "sparse.json", "wb") as fh:  # 1 GB, sparse: costs no disk, and must never be read
        fh.truncate(2**30)
    (root / "big_caption.txt").write_bytes(b"word " * (2 * 2**20))  # a 10 MB caption
    (root / "edge.json").write_bytes(b'{"caption": "' + b"x" * (MAX_TEXT_BYTES - 14) + b'"}')  # one byte over
    (root / "fine.json").write_bytes(b'{"caption": "' + b"x" * (MAX_TEXT_BYTES - 15) + b'"}')  # exactly at it
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        _add(tar, "a.png", png)
        _add(tar, "a.json", b" " * (20 * 2**20))
        _add(tar, "b.png", png)
        _add(tar, "b.txt", b"caption " * (2**20 // 8 + 1))

    tracemalloc.start()
    try:
        _, _, kept, rejects, _ = _ingest([root, tmp_path / "t.tar"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 6 * 2**20, f"peak {peak} bytes: a sidecar was read whole"
    assert [r["source_offset"] for r in kept] == ["fine.png"]
    assert len(kept[0]["source_caption"]) == MAX_TEXT_BYTES - 15
    reasons = {r["source_offset"]: (r["reason"], r["detail"]) for r in rejects}
    assert {k: v[0] for k, v in reasons.items()} == {"sparse.png": "too_large", "big_caption.png": "too_large",
                                                     "edge.png": "too_large", "a": "too_large", "b": "too_large"}
    assert reasons["sparse.png"][1].startswith(f"metadata sidecar sparse.json: {2**30} bytes > {MAX_TEXT_BYTES}")
    assert reasons["big_caption.png"][1].startswith("caption sidecar big_caption.txt: 10485760 bytes")
    assert "member 'a.json'" in reasons["a"][1] and "member 'b.txt'" in reasons["b"][1]
    assert all("not read" in d for _, d in reasons.values())


def test_oversized_caption_in_a_parquet_column_is_rejected(tmp_path):
    png = _png()
    pq.write_table(pa.table({"image": [png, png], "caption": ["x" * (MAX_TEXT_BYTES + 1), "fine"]}),
                   tmp_path / "p.parquet")
    _, _, kept, rejects, _ = _ingest([tmp_path / "p.parquet"])
    assert [r["source_offset"] for r in kept] == ["1"]
    assert [(r["source_offset"], r["reason"]) for r in rejects] == [("0", "too_large")]
    assert rejects[0]["detail"].startswith(f"caption: {MAX_TEXT_BYTES + 1} bytes > {MAX_TEXT_BYTES}")


def test_control_characters_are_removed_from_captions_and_counted(tmp_path):
    png = _png()
    noisy = "an\x00 astro\x1b[31mnaut\x07\tin\x85\r\nspace\x7f"
    write_folder(tmp_path / "f", {"noisy.png": (png, noisy), "only.png": (png, "\x01\x02\x03"),
                                  "clean.png": (png, "an astronaut")})
    write_folder(tmp_path / "f", {"meta.png": (png, "from\x00 json")}, sidecar="json")
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        _add(tar, "k.png", png)
        _add(tar, "k.txt", noisy.encode())
    pq.write_table(pa.table({"image": [png], "caption": [noisy]}), tmp_path / "p.parquet")
    _, _, kept, rejects, counters = _ingest([tmp_path / "f", tmp_path / "t.tar", tmp_path / "p.parquet"])

    assert rejects == []
    rows = {r["source_offset"]: r for r in kept}
    for offset in ("noisy.png", "k", "0"):
        assert rows[offset]["source_caption"] == "an astro[31mnaut\tin\r\nspace"
        assert rows[offset]["source_caption_chars_removed"] == 5
    assert rows["only.png"]["source_caption"] == "" and rows["only.png"]["source_caption_chars_removed"] == 3
    assert rows["meta.png"]["source_caption"] == "from json" and rows["meta.png"]["source_caption_chars_removed"] == 1
    assert "\\u0000" in rows["meta.png"]["source_meta"], "the metadata stays verbatim"
    assert rows["clean.png"]["source_caption_chars_removed"] == 0
    assert counters.extra["caption_control_chars_removed"] == 5 * 3 + 3 + 1


# --------------------------------------------------------------------------- non-UTF-8 captions


def test_non_utf8_captions_are_decoded_without_loss_and_their_encoding_recorded(tmp_path):
    png = _png()
    cp1252 = "café – naïve “quote” €5".encode("cp1252")
    latin1 = b"na\xefve \x81"  # 0x81 is undefined in cp1252: only latin-1 decodes it
    write_folder(tmp_path / "f", {n: (png, "") for n in ("cp.png", "l1.png", "u8.png", "u16.png", "bom.png",
                                                        "none.png")})
    root = tmp_path / "f"
    (root / "cp.txt").write_bytes(cp1252)
    (root / "l1.txt").write_bytes(latin1)
    (root / "u8.txt").write_bytes("café €5".encode())
    (root / "u16.txt").write_bytes("ein Foto".encode("utf-16"))
    (root / "bom.txt").write_bytes(b"\xef\xbb\xbfwith a mark")
    os.unlink(root / "none.txt")
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        _add(tar, "k.png", png)
        _add(tar, "k.json", b'{"caption": "caf\xe9", "status": "success"}')
    bad_utf8 = pa.array([b"caf\xe9 au lait", b"plain"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"image": [png, png], "caption": bad_utf8,
                             "note": pa.array([b"fine", b"\xff"], pa.binary()).view(pa.string())}),
                   tmp_path / "p.parquet")
    _, _, kept, rejects, _ = _ingest([root, tmp_path / "t.tar", tmp_path / "p.parquet"])

    rows = {r["source_offset"]: r for r in kept}
    encodings = {k: (r["source_caption"], r["source_caption_encoding"]) for k, r in rows.items()}
    assert encodings == {
        "cp.png": ("café – naïve “quote” €5", "cp1252"), "l1.png": ("naïve", "latin-1"),
        "u8.png": ("café €5", None), "u16.png": ("ein Foto", "utf-16"), "bom.png": ("with a mark", "utf-8-sig"),
        "none.png": (None, None), "k": ("café", "cp1252"), "0": ("café au lait", "cp1252"),
    }
    assert rows["cp.png"]["source_caption"].encode("cp1252") == cp1252, "the original bytes come back"
    assert rows["l1.png"]["source_caption_chars_removed"] == 1  # U+0081, a C1 control, is removed and counted
    assert "\ufffd" not in " ".join(c for c, _ in encodings.values() if c)
    # Another string column that is not UTF-8 loses its row only, with a reason; never the shard.
    assert [(r["source_offset"], r["reason"]) for r in rejects] == [("1", "unreadable_member")]
    assert "UnicodeDecodeError" in rejects[0]["detail"]


def test_the_new_columns_are_ingest_output_and_reach_the_release():
    names = Ingest(offline_config()).schema().names
    assert {"source_caption_encoding", "source_caption_chars_removed"} <= set(names)
    ingest = OutputRef("ingest", "k", "i.parquet", "image_id", tuple(names), 1)
    detect = OutputRef("detect", "k", "d.parquet", "sample_id", ("sample_id", "image_id", "image"), 1)
    published = record_columns(ShardInput(spec=None, outputs=(ingest, detect)))
    assert "source_caption_encoding" in published and "source_caption_chars_removed" in published


# --------------------------------------------------------------------------- Parquet sources


@pytest.mark.slow
def test_parquet_of_100k_tiny_row_groups_is_read_in_bounded_time(tmp_path):
    n = 100_000
    png = _png(16)
    images = pa.array([png if i % 1000 == 0 else None for i in range(n)], pa.binary())
    pq.write_table(pa.table({"image": images}), tmp_path / "tiny.parquet", row_group_size=1,
                   write_statistics=False)
    assert pq.read_metadata(tmp_path / "tiny.parquet").num_row_groups == n

    started = time.monotonic()
    specs, notes, kept, rejects, counters = _ingest([tmp_path / "tiny.parquet"], shard_size=2000)
    took = time.monotonic() - started

    assert len(specs) == 50, "shards follow rows, never one task per row group"
    assert any("100000 row groups" in note for note in notes)
    assert len(kept) == 100 and len(rejects) == n - 100 and counters.rows_in == n
    assert {r["reason"] for r in rejects} == {"empty_file"}
    # Read shard by shard, one row group at a time, this took 88 s here (every shard parsed the
    # footer and read its row groups one by one); about 6 s now.
    assert took < 60, f"{took:.0f} s to ingest 100,000 one-row row groups"


def test_parquet_image_column_of_a_wrong_type_is_rejected_naming_column_and_type(tmp_path):
    png = _png()
    pq.write_table(pa.table({"image": pa.array([10**12, 7], pa.int64()), "caption": ["a", "b"]}),
                   tmp_path / "ints.parquet")
    pq.write_table(pa.table({"image": pa.array([[png], [png]], pa.list_(pa.binary()))}), tmp_path / "lists.parquet")
    _, _, kept, rejects, _ = _ingest([tmp_path / "ints.parquet", tmp_path / "lists.parquet"])
    assert kept == [] and len(rejects) == 4 and {r["reason"] for r in rejects} == {"wrong_column_type"}
    details = {r["source"].rsplit("/", 1)[1]: r["detail"] for r in rejects}
    assert details["ints.parquet"].startswith("column 'image' is int64: an image column holds binary")
    assert details["lists.parquet"].startswith("column 'image' is list<element: binary>")
    assert "ingest.image_column" in details["ints.parquet"]

    # Configured to a wrong-typed column: the same reject; auto-detection passes over it to a usable one.
    _, _, kept, rejects, _ = _ingest([tmp_path / "ints.parquet"], image_column="caption", caption_column="image")
    assert {r["reason"] for r in rejects} == {"wrong_column_type"}
    assert rejects[0]["detail"].startswith("column 'image' is int64: a caption column holds strings")
    pq.write_table(pa.table({"image": pa.array([3], pa.int64()), "jpg": [png],
                             "text": pa.array([["two", "captions"]], pa.list_(pa.string()))}), tmp_path / "ids.parquet")
    _, _, kept, rejects, _ = _ingest([tmp_path / "ids.parquet"])
    assert rejects == [] and kept[0]["source_caption"] is None
    assert json.loads(kept[0]["source_meta"]) == {"image": 3, "text": ["two", "captions"]}


def test_parquet_nested_nulls_become_per_row_rejects(tmp_path):
    png = _png()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([None, {"bytes": None, "path": None}, {"bytes": None, "path": "gone.png"},
                       {"bytes": png, "path": None}, {"bytes": png, "path": "x.png"}, {"bytes": b"", "path": None}],
                      struct)
    extra = pa.array([None, {"w": None}, {"w": 1}, None, {"w": 2}, None], pa.struct([("w", pa.int64())]))
    pq.write_table(pa.table({"image": images, "caption": [None, "b", None, None, "kept", "f"], "extra": extra}),
                   tmp_path / "hf.parquet")
    _, _, kept, rejects, counters = _ingest([tmp_path / "hf.parquet"])
    assert [(r["source_offset"], r["source_caption"]) for r in kept] == [("3", None), ("4", "kept")]
    assert json.loads(kept[1]["source_meta"]) == {"extra": {"w": 2}}
    reasons = {r["source_offset"]: (r["reason"], r["detail"]) for r in rejects}
    assert reasons == {
        "0": ("empty_file", "column image is null"),
        "1": ("empty_file", "column image: struct with no bytes and no path"),
        "2": ("missing_file", f"{tmp_path}/gone.png does not exist"),
        "5": ("empty_file", "column image: struct with no bytes and no path"),
    }
    assert counters.rows_in == 6
