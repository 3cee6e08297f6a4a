"""The validate stage of the real curate flow (real Prefect API, real Dask, real detections on real photos)."""

from __future__ import annotations

import json

import duckdb
import pytest
from helpers import offline_config, run_curate

from facecap.quality.validate import ReleaseBlocked, validate_release


def _manifest_rows(out, sql: str, params: list | None = None) -> list[tuple]:
    # Not in the test's own frame: the flow's exception, which Prefect's result store keeps until exit,
    # holds that frame through its traceback, and nanobind reports a DuckDB connection still alive at exit.
    with duckdb.connect(str(out / "manifest.duckdb"), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def test_a_failing_release_stays_in_staging_and_allow_failures_publishes_it(prefect_api_url, example_dir, tmp_path):
    from prefect.client.orchestration import get_client

    # The tar repeats two of the folder's photos byte for byte. The share of repeated crops is a policy: with
    # quality.max_duplicate_image_rate set to 0.05 their identical crops block the release, and the failure
    # says which records to look at.
    sources = [example_dir / "folder", example_dir / "webdataset" / "*.tar"]
    out = tmp_path / "out"
    cfg = offline_config(ingest={"shard_size": 8}, execution={"n_workers": 2},
                         quality={"max_duplicate_image_rate": 0.05})
    with pytest.raises(ReleaseBlocked, match="duplicate_image_rate") as blocked:
        run_curate(sources, out, cfg)
    assert not (out / "release").exists(), "a release that fails its checks must not be published"
    (staged,) = (out / "staging").iterdir()
    assert str(staged) in str(blocked.value)
    query = str(blocked.value).split('duckdb -c "')[1].split('"')[0]
    repeated = duckdb.sql(query).fetchall()
    assert len(repeated) >= 4 and len({r[2] for r in repeated}) < len(repeated), "the copies, grouped by their hash"
    report = (staged / "report" / "index.html").read_text()
    assert "NOT PUBLISHED" in report and "duplicate_image_rate" in report
    info = json.loads((staged / "release.json").read_text())
    assert info["published"] is False and info["validation"]["failed"] == ["duplicate_image_rate"]
    ((status, message),) = _manifest_rows(out, "SELECT status, message FROM runs WHERE run_id = ?", [staged.name])
    assert status == "blocked" and "duplicate_image_rate" in message
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(staged.name)
    assert run.state.is_failed()

    # Rerun (every shard cached) with the explicit override.
    from facecap.flows.curate import curate, task_runner_for

    result = curate.with_options(task_runner=task_runner_for(cfg))(
        sources=[str(s) for s in sources], out=str(out), config=cfg.model_dump(mode="json"), allow_failures=True)
    release = out / "release"
    info = json.loads((release / "release.json").read_text())
    assert info["published"] is True and result.validation.allow_failures is True
    assert info["validation"]["failed"] == ["duplicate_image_rate"] and "override" in info["validation"]
    assert info["stages"]["validate"]["override"] == "allow_failures"
    assert (release / "README.md").exists() and (release / "report" / "index.html").exists()
    assert sorted(p.name.split("-")[0] for p in (release / "data").glob("*.parquet"))[0] in ("test", "train")

    # Real detections pass every geometric check (bbox in image, landmarks in bbox, decode, funnel).
    verdict = validate_release(str(release), overrides=["quality.max_duplicate_image_rate=0.5"], log=lambda _: None)
    assert verdict.passed, verdict.failed
    checks = {c["name"]: c for c in verdict.checks}
    for name in ("bbox_inside_source", "landmarks_inside_bbox", "image_bytes_decode", "rows_match_funnel",
                 "crop_at_least_min_px", "det_score_at_least_threshold"):
        assert checks[name]["status"] == "passed", name
    assert checks["min_kept_attributes"]["status"] == "not applicable"  # annotate is off in this profile
    assert "stage annotate off" in checks["min_kept_attributes"]["why"]
