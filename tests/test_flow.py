"""The curate flow end to end: real Prefect API (test harness), real local Dask cluster, real images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from helpers import example_sources, offline_config, read_release, run_curate

from facecap.schema import image_id_for

# What every example record must become: (source file, offset) -> faces kept or the reject reason.
EXPECTED = {
    ("folder", "astronaut.png"): 1, ("folder", "astronaut_webp.webp"): 1, ("folder", "astronaut_exif.jpg"): 1,
    ("folder", "astronaut_tilted.jpg"): 1, ("folder", "astronaut_pair.jpg"): 2,
    ("folder", "astronaut_small.jpg"): "too_small", ("folder", "coffee.png"): "no_face",
    ("folder", "rocket.jpg"): "no_face", ("folder", "noise.jpg"): "no_face", ("folder", "gradient.png"): "no_face",
    ("folder", "shapes.png"): "no_face", ("folder", "truncated.jpg"): "decode_error",
    ("folder", "empty.jpg"): "empty_file", ("folder", "not_an_image.jpg"): "decode_error",
    ("folder", "bomb.png"): "too_large",
    ("folder", "kafka.jpg"): 1, ("folder", "group.jpg"): 6, ("folder", "hanks.png"): "too_small",
    ("00000.tar", "000000000"): 1, ("00000.tar", "000000001"): 2, ("00000.tar", "000000002"): "no_face",
    ("00000.tar", "000000003"): 1,
    ("bytes.parquet", "0"): 1, ("bytes.parquet", "1"): 1, ("bytes.parquet", "2"): "no_face",
    ("bytes.parquet", "3"): 6,
    ("paths.parquet", "0"): 1, ("paths.parquet", "1"): "no_face", ("paths.parquet", "2"): "missing_file",
}


def sources(example_dir: Path) -> list[Path]:
    return example_sources(example_dir)


@pytest.fixture(scope="module")
def curated(curated_example):
    return curated_example


def test_every_input_record_is_released_or_rejected_with_its_reason(curated, example_dir):
    out, result, _ = curated
    data, rejects = read_release(out)
    assert data.num_rows == result.records == sum(v for v in EXPECTED.values() if isinstance(v, int))
    assert len(set(data.column("sample_id").to_pylist())) == data.num_rows, "sample_id must be unique"
    faces: dict = {}
    for row in data.select(["source", "source_offset"]).to_pylist():
        key = (Path(row["source"]).name, row["source_offset"])
        faces[key] = faces.get(key, 0) + 1
    reasons = {}
    for row in rejects.to_pylist():
        if row["image_id"] is None:
            continue
        key = (Path(row["source"]).name, row["source_offset"])
        reasons.setdefault(key, set()).add(row["reason"])
    for key, want in EXPECTED.items():
        if isinstance(want, int):
            assert faces.get(key) == want, key
        else:
            assert key not in faces and reasons.get(key) == {want}, (key, reasons.get(key))
    assert set(faces) | set(reasons) == set(EXPECTED), "no record may appear that was not in the input"
    whole = rejects.filter(rejects.column("image_id").is_null()).to_pylist()
    assert [(Path(r["source"]).name, r["reason"]) for r in whole] == [("does-not-exist", "unreadable_source")]


def test_release_columns_and_thresholds(curated):
    out, _, cfg = curated
    data, _ = read_release(out)
    for col in ("sample_id", "image", "width", "height", "det_score", "bbox", "landmarks", "source",
                "source_caption", "source_offset", "detector", "crop_box", "align_angle"):
        assert col in data.column_names
    assert min(data.column("det_score").to_pylist()) > cfg.detect.min_score
    assert min(data.column("width").to_pylist()) >= cfg.detect.min_face_px
    row = next(r for r in data.to_pylist() if r["source_offset"] == "astronaut.png")
    assert row["source_caption"].startswith("Eileen Collins")
    assert row["image_id"] == image_id_for(row["source"], "astronaut.png")
    release = json.loads((out / "release" / "release.json").read_text())
    assert release["profile"] == "offline" and release["records"] == data.num_rows
    assert release["stages"]["detect"]["status"] == "on"
    assert release["stages"]["annotate"]["status"] == "off" and release["stages"]["annotate"]["why"]
    assert (out / "release" / "config.yaml").read_text().startswith("profile: offline")


def test_manifest_records_every_shard_and_stage(curated):
    out, result, _ = curated
    con = duckdb.connect(str(out / "manifest.duckdb"), read_only=True)
    status = con.execute("SELECT status FROM runs WHERE run_id = ?", [result.run_id]).fetchone()[0]
    per_stage = dict(con.execute(
        "SELECT stage, count(*) FROM stage_runs WHERE run_id = ? AND status = 'done' GROUP BY stage",
        [result.run_id]).fetchall())
    detect_out = con.execute("SELECT sum(rows_out) FROM stage_runs WHERE run_id = ? AND stage = 'detect'",
                             [result.run_id]).fetchone()[0]
    con.close()
    assert status == "completed"
    assert per_stage["ingest"] == per_stage["detect"]  # every shard passes every stage, even an empty one
    assert detect_out == result.records
    funnel = {row.stage: row.to_dict() for row in result.funnel}
    assert funnel["ingest"]["rows_in"] == len(EXPECTED) + 1
    assert funnel["detect"]["rejects"]["no_face"] == sum(v == "no_face" for v in EXPECTED.values())


def test_tasks_ran_on_dask_workers_under_the_prefect_api(curated):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    out, result, _ = curated
    workers = {json.loads(p.read_text())["worker"] for p in (out / "shards").glob("*/*.json")}
    assert workers and all(int(w.rsplit(":", 1)[1]) != os.getpid() for w in workers)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(result.run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert run.state.is_completed()
    names = sorted(t.name for t in tasks)
    assert sum(n.startswith("ingest ") for n in names) == sum(n.startswith("detect ") for n in names) > 1
    assert all(t.state.is_completed() for t in tasks)


def _task_run_names(run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return sorted(t.name for t in tasks)


def test_rerun_skips_finished_work_and_reproduces_the_release(curated, example_dir, monkeypatch):
    from facecap.flows import curate

    out, first, cfg = curated
    before, _ = read_release(out)
    files = {p.name: p.read_bytes() for p in (out / "release" / "data").glob("*.parquet")}
    second = run_curate(sources(example_dir), out, cfg)
    assert all(row.cached == row.shards for row in second.funnel), second.funnel
    # The flow verified every finished output itself: no task ran, so no Dask worker was started.
    assert second.unchanged and _task_run_names(second.run_id) == []
    after, _ = read_release(out)
    assert after.equals(before)
    assert files == {p.name: p.read_bytes() for p in (out / "release" / "data").glob("*.parquet")}

    # Past the flow's verification budget, finished shards go to the workers, which find them done too.
    monkeypatch.setattr(curate, "DRIVER_VERIFY_BYTES", 1)
    third = run_curate(sources(example_dir), out, cfg)
    assert all(row.cached == row.shards for row in third.funnel), third.funnel
    names = _task_run_names(third.run_id)
    assert sum(n.startswith("ingest ") for n in names) == first.funnel[0].shards > 1


def test_changed_settings_and_new_files_recompute_only_what_they_affect(prefect_api_url, example_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(example_dir / "folder", src)
    out = tmp_path / "out"
    cfg = offline_config(ingest={"shard_size": 3}, execution={"n_workers": 2})
    first = run_curate([src], out, cfg)
    shards = {r.stage: r.shards for r in first.funnel}

    strict = cfg.model_copy(deep=True)
    strict.detect.min_score = 0.999  # drops the tilted portrait (0.998), keeps the upright one (0.9995)
    second = run_curate([src], out, strict)
    funnel = {r.stage: r.to_dict() for r in second.funnel}
    assert funnel["ingest"]["cached"] == shards["ingest"], "ingest settings did not change"
    assert funnel["detect"]["cached"] == 0, "detect settings changed: every detect shard reruns"
    assert second.records < first.records
    assert funnel["detect"]["rejects"].get("low_score", 0) > 0

    shutil.copy(example_dir / "folder" / "astronaut.png", src / "zz_new_face.png")
    third = run_curate([src], out, strict)
    funnel = {r.stage: r.to_dict() for r in third.funnel}
    assert funnel["ingest"]["shards"] - funnel["ingest"]["cached"] <= 2
    assert third.records == second.records + 1
    data, _ = read_release(out)
    assert "zz_new_face.png" in data.column("source_offset").to_pylist()


def test_detect_outputs_are_keyed_by_model_and_settings(curated):
    out, _, cfg = curated
    stats = [json.loads(p.read_text()) for p in (out / "shards" / "detect").glob("*.json")]
    assert stats and all(s["model"].startswith("retinaface-mobilenet0.25@sha256:") for s in stats)
    for s in stats:
        table = pq.read_table(s["output"])
        assert table.num_rows == s["rows_written"] == s["rows_out"]


def _manifest_rows(out, sql: str, params: list | None = None) -> list[tuple]:
    # Not in the test's own frame: the flow's exception, which Prefect's result store keeps until exit,
    # holds that frame through its traceback, and nanobind reports a DuckDB connection still alive at exit.
    with duckdb.connect(str(out / "manifest.duckdb"), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def test_failed_shards_fail_the_run_without_a_release_and_a_rerun_finishes_it(prefect_api_url, example_dir,
                                                                               tmp_path):
    from facecap.flows.curate import CurateFailed

    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "detect").write_text("a file where a folder should be: every detect write fails")
    cfg = offline_config(ingest={"shard_size": 8}, execution={"n_workers": 2})
    with pytest.raises(CurateFailed, match="rerun the same command"):
        run_curate([example_dir / "folder"], out, cfg)
    assert not (out / "release").exists(), "a run with failed shards must not publish"
    status = _manifest_rows(out, "SELECT status FROM runs")[0][0]
    failed = _manifest_rows(out, "SELECT stage, error FROM stage_runs WHERE status = 'failed'")
    assert status == "failed" and failed and {stage for stage, _ in failed} == {"detect"}
    assert all(error for _, error in failed)

    (out / "shards" / "detect").unlink()
    result = run_curate([example_dir / "folder"], out, cfg)
    funnel = {r.stage: r.to_dict() for r in result.funnel}
    assert funnel["ingest"]["cached"] == funnel["ingest"]["shards"]
    assert result.records == sum(v for k, v in EXPECTED.items() if k[0] == "folder" and isinstance(v, int))
