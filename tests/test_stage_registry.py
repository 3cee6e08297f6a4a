"""Stages own their settings, columns, reasons, checks and report: registering one is all it takes."""

from __future__ import annotations

from facecap.chain import STAGES
from facecap.config import Config

# Every stage's settings hash on the default offline and full configs, as computed before the stages owned
# their settings sections: a changed hash would recompute every cached stage output of every user.
HASHES_OFFLINE = {"ingest": "8c880df7ce7f15fc", "detect": "bd895532446b7bf8", "face_quality": "0a26ce36ffd2aba7",
                  "exclude": "44136fa355b3678a", "dedup": "430562bcccede6a7",
                  "annotate": "2c95387e8091265d", "text": "35c3dc14243028c5", "caption": "7641201906b2f8f5"}
HASHES_FULL = {**HASHES_OFFLINE, "annotate": "869a41d359aaf921"}
SECTION_ORDER = ["profile", "ingest", "image", "detect", "face_quality", "execution", "models", "attributes",
                 "caption", "llm", "quality", "train", "download", "text", "dedup", "deploy", "exclude"]


def test_stage_settings_hashes_are_unchanged():
    for profile, expected in (("offline", HASHES_OFFLINE), ("full", HASHES_FULL)):
        cfg = Config.model_validate({"profile": profile})
        assert {s.name: s.settings_hash(cfg) for s in STAGES} == expected, profile


def test_config_sections_keep_their_order():
    # config.yaml is written next to every release: the same sections in the same order as before.
    assert list(Config.model_fields) == SECTION_ORDER
    assert list(Config.model_validate({"profile": "offline"}).model_dump()) == SECTION_ORDER


# --- a stage that lives in this file alone -------------------------------------------------------------
import json  # noqa: E402
from typing import Iterator  # noqa: E402

import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
from pydantic import Field  # noqa: E402

from facecap import chain  # noqa: E402
from facecap.settings import Section
from facecap.config import config_model, load_config  # noqa: E402
from facecap.schema import Reason, keyed_schema  # noqa: E402
from facecap.stages.base import (FACE_REJECT_COLUMNS, Chunk, Counters, ReportSection, Stage,  # noqa: E402
                                 reject_row, rejected)


class StampSettings(Section):
    """The stamp stage: writes a marker into every face record it keeps."""

    marker: str = Field("stamped", description="What the stamp stage writes into stamp_mark.")
    reject_every: int = Field(2, ge=1, description="Reject every n-th face a batch holds (the first of each n).")


class StampReason(Reason):
    UNSTAMPED = "unstamped"


class StampReport(ReportSection):
    def aggregates(self, db):
        return ({"stamped": "count(*) FILTER (stamp_mark IS NOT NULL)"} if "stamp_mark" in db.columns else {}), {}

    def figures(self, db, agg):
        return {"stamp": {"stamped": int(agg.get("stamped") or 0)}} if "stamped" in agg else {}

    def headline(self, fig):
        return {"stamped faces": fig["stamp"]["stamped"]} if "stamp" in fig else {}

    def html(self, report):
        fig = report["figures"].get("stamp")
        return f"<p id=\"stamp\">Stamped faces: {fig['stamped']}</p>" if fig else ""


class Stamp(Stage):
    name = "stamp"
    version = "1"
    section, settings_model, section_after = "stamp", StampSettings, "dedup"
    keyed_sections = ("stamp",)
    reads = FACE_REJECT_COLUMNS
    output_fields = (pa.field("stamp_mark", pa.string(), nullable=False),)
    reasons = StampReason
    column_docs = {"stamp_mark": "the stamp stage's marker"}
    suite = "stamps"
    report = StampReport()
    priority = 9

    @classmethod
    def quality_checks(cls, cfg):
        from facecap.quality.primitives import Check

        return [Check("stamp_mark_is_the_marker", "stamps", f"stamp_mark is stamp.marker ({cfg.stamp.marker})",
                      f"count(*) FILTER (stamp_mark IS DISTINCT FROM '{cfg.stamp.marker}')", ("stamp_mark",))]

    def schema(self) -> pa.Schema:
        return keyed_schema(list(self.output_fields))

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        every = self.cfg.stamp.reject_every
        for batch in records:
            rows = batch.to_pylist()
            counters.rows_in += len(rows)
            keep = [r for i, r in enumerate(rows) if i % every]
            drop = [reject_row(self.name, r, StampReason.UNSTAMPED, "first of its batch's group")
                    for i, r in enumerate(rows) if not i % every]
            kept = pa.table({"sample_id": [r["sample_id"] for r in keep],
                             "stamp_mark": [self.cfg.stamp.marker] * len(keep)}, schema=self.schema())
            yield counters.count(Chunk(kept=kept, rejected=rejected(drop)))


@pytest.fixture
def stamp_registered():
    with chain.registered(Stamp):
        yield Stamp


def test_registering_adds_the_section_and_restores_the_chain(stamp_registered):
    cfg = load_config(None, ["stamp.marker=hi"], "offline")
    assert cfg.stamp.marker == "hi" and cfg.stamp.reject_every == 2
    assert list(type(cfg).model_fields).index("stamp") == SECTION_ORDER.index("dedup") + 1
    assert "stamp:\n  marker: hi\n" in cfg.to_yaml()
    assert "unstamped" in vars(chain.BY_NAME["stamp"].reasons).values()
    # Registering a stage leaves every other stage's key alone.
    assert {s.name: s.settings_hash(cfg) for s in chain.STAGES if s is not Stamp} == HASHES_OFFLINE


def test_registration_is_undone():
    with chain.registered(Stamp):
        assert chain.BY_NAME["stamp"] is Stamp
    assert "stamp" not in chain.BY_NAME and Stamp not in chain.STAGES
    assert "stamp" not in config_model().model_fields
    with pytest.raises(Exception, match="stamp"):
        load_config(None, ["stamp.marker=hi"], "offline")


def test_a_registered_stage_runs_in_a_real_curate(stamp_registered, prefect_api_url, example_dir, tmp_path,
                                                  monkeypatch):
    from distributed import LocalCluster

    from facecap.flows.curate import curate, task_runner_for
    from facecap.tasks import validate as validate_tasks

    # The registry is this process's: run the workers as threads of it, and validate here too.
    monkeypatch.setattr(validate_tasks, "take_ahead", lambda: None, raising=False)
    monkeypatch.setattr(validate_tasks, "start_ahead", lambda: None, raising=False)
    out = tmp_path / "out"
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=3, resources={"CPU": 1, "IO": 2},
                      dashboard_address=":0") as cluster:
        cfg = config_model().model_validate({
            "profile": "offline", "quality": {"max_duplicate_image_rate": 0.6}, "dedup": {"keep": "all"},
            "execution": {"dask_address": cluster.scheduler_address}, "stamp": {"marker": "ok"}})
        result = curate.with_options(task_runner=task_runner_for(cfg))(
            sources=[str(example_dir / "folder")], out=str(out), config=cfg.model_dump(mode="json"))

    release = out / "release"
    info = json.loads((release / "release.json").read_text())
    # Planned and run: its column holds its marker, and its rejects carry its reason.
    assert info["stages"]["stamp"]["status"] == "on"
    assert [row["stage"] for row in info["funnel"]].count("stamp") == 1
    import pyarrow.dataset as ds

    data = ds.dataset(release / "data", format="parquet").to_table()
    assert data.num_rows == result.records > 0
    assert set(data.column("stamp_mark").to_pylist()) == {"ok"}
    rejects = ds.dataset(release / "rejects", format="parquet").to_table().to_pylist()
    assert any(r["stage"] == "stamp" and r["reason"] == "unstamped" for r in rejects)
    # Its check ran in the quality verdict.
    report = json.loads((release / "report" / "report.json").read_text())
    checks = {c["name"]: c for c in report["validation"]["checks"]}
    assert checks["stamp_mark_is_the_marker"]["status"] == "passed"
    assert checks["stamp_mark_is_the_marker"]["suite"] == "stamps"
    assert info["validation"]["passed"]
    # The dataset card documents its column; the report shows its figures.
    card = (release / "README.md").read_text()
    assert "| `stamp_mark` | the stamp stage's marker |" in card
    assert report["figures"]["stamp"]["stamped"] == data.num_rows
    assert report["headline"]["stamped faces"] == data.num_rows
    assert f'<p id="stamp">Stamped faces: {data.num_rows}</p>' in (release / "report" / "index.html").read_text()
    assert "stamp:\n  marker: ok\n" in (release / "config.yaml").read_text()
