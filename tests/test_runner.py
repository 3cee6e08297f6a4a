"""The generic shard runner and the write-once layout, on real photos and the real detector.

Each stage writes only the columns it adds; ingest of a local source keeps a
reference, not the bytes; detect reads them from the source again. A cached
output is checked (size and sha256) before it is reused: a truncated or
corrupt one is reported and recomputed to the same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import offline_config

from facecap.chain import plan_run
from facecap.example_data import astronaut, generated
from facecap.records import read_view, record_columns
from facecap.runner import run_ingest, run_stage
from facecap.schema import IMAGE_SCHEMA, Reason
from facecap.stages.detect import DetectReason, FACE_SCHEMA
from facecap.shards import ShardInput, ShardStats
from facecap.sources.plan import plan_shards
from facecap.stages.detect import Detect


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    face = astronaut()
    for i in range(4):
        (root / f"face{i}.jpg").write_bytes(_jpeg(face.rotate(i * 4).resize((560 + 40 * i, 560 + 40 * i))))
        (root / f"face{i}.txt").write_text(f"an astronaut, photo {i}")
    (root / "noface.jpg").write_bytes(_jpeg(generated("noise", seed=1)))
    return root


def _run_detect(photos: Path, out: Path, cfg=None) -> tuple[ShardInput, ShardStats, ShardStats]:
    cfg = cfg or offline_config()
    specs, _ = plan_shards([str(photos)], cfg.ingest)
    assert len(specs) == 1
    ingested = run_ingest(specs[0], str(out), cfg)
    shard = ShardInput(specs[0], (ingested.ref,), {"ingest": cfg.ingest.model_dump(mode="json"),
                                                   "image": cfg.image.model_dump(mode="json")})
    detected = run_stage(Detect, shard, str(out), cfg, plan_run(cfg).stages["detect"])
    return shard.then(detected.ref), ingested, detected


def test_each_stage_writes_only_its_own_columns_and_local_bytes_are_referenced(photos, tmp_path):
    shard, ingested, detected = _run_detect(photos, tmp_path / "out")
    ingest_table = pq.read_table(ingested.output)
    assert ingest_table.schema.names == IMAGE_SCHEMA.names and ingest_table.num_rows == 5
    assert ingest_table.column("source_image").null_count == 5, "a local source is referenced, never copied"
    assert sum(ingest_table.column("source_size").to_pylist()) == sum(
        p.stat().st_size for p in photos.glob("*.jpg"))
    faces = pq.read_table(detected.output)
    assert faces.schema.names == FACE_SCHEMA.names, "detect adds face columns only"
    assert faces.num_rows == 4 and detected.rejects == {DetectReason.NO_FACE: 1}
    # Intermediates are a fraction of the source: the crops, once, and small metadata.
    shards_bytes = sum(p.stat().st_size for p in (tmp_path / "out" / "shards").rglob("*") if p.is_file())
    source_bytes = sum(p.stat().st_size for p in photos.glob("*"))
    assert shards_bytes < 0.6 * source_bytes, (shards_bytes, source_bytes)
    # Readers join the chain back into whole records.
    records = [t for t in read_view(shard, record_columns(shard))]
    joined = records[0].to_pylist()
    assert len(joined) == 4 and {r["source_caption"] for r in joined} == {f"an astronaut, photo {i}" for i in range(4)}
    assert all(r["sample_id"].startswith(r["image_id"]) and r["image"][:2] == b"\xff\xd8" for r in joined)


def test_a_corrupt_or_truncated_cached_output_is_reported_and_recomputed(photos, tmp_path):
    out = tmp_path / "out"
    shard, ingested, detected = _run_detect(photos, out)
    original = Path(detected.output).read_bytes()
    cfg = offline_config()
    plan = plan_run(cfg).stages["detect"]
    upstream = ShardInput(shard.spec, shard.outputs[:1], shard.ingest_settings)
    assert run_stage(Detect, upstream, str(out), cfg, plan).cached

    Path(detected.output).write_bytes(original[: len(original) // 2])  # truncated
    again = run_stage(Detect, upstream, str(out), cfg, plan)
    assert not again.cached and detected.output in again.repaired and "truncated" in again.repaired
    assert Path(again.output).read_bytes() == original, "recomputed to the same bytes"

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF  # same size, different content
    Path(detected.output).write_bytes(bytes(flipped))
    again = run_stage(Detect, upstream, str(out), cfg, plan)
    assert "sha256" in again.repaired and Path(again.output).read_bytes() == original

    Path(detected.rejects_output).unlink()
    again = run_stage(Detect, upstream, str(out), cfg, plan)
    assert "missing" in again.repaired and Path(detected.rejects_output).exists()

    stats_file = Path(detected.output).with_suffix(".json")
    stats_file.write_text("{not json")
    again = run_stage(Detect, upstream, str(out), cfg, plan)
    assert "unreadable" in again.repaired and json.loads(stats_file.read_text())["key"] == detected.key
    assert run_stage(Detect, upstream, str(out), cfg, plan).cached


def test_a_source_changed_after_ingest_is_a_reject_not_a_wrong_crop(photos, tmp_path):
    cfg = offline_config()
    specs, _ = plan_shards([str(photos)], cfg.ingest)
    ingested = run_ingest(specs[0], str(tmp_path / "out"), cfg)
    # Replace one photo with another image after ingest recorded its fingerprint.
    (photos / "face1.jpg").write_bytes(_jpeg(generated("shapes", seed=3)))
    (photos / "face2.jpg").unlink()
    shard = ShardInput(specs[0], (ingested.ref,), {"ingest": cfg.ingest.model_dump(mode="json"),
                                                   "image": cfg.image.model_dump(mode="json")})
    detected = run_stage(Detect, shard, str(tmp_path / "out"), cfg, plan_run(cfg).stages["detect"])
    rejects = pq.read_table(detected.rejects_output).to_pylist()
    changed = {r["source_offset"]: r["detail"] for r in rejects if r["reason"] == Reason.SOURCE_CHANGED}
    assert set(changed) == {"face1.jpg", "face2.jpg"}
    assert "differ" in changed["face1.jpg"] and "no longer readable" in changed["face2.jpg"]
    assert detected.rows_out == 2
