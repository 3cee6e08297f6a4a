"""Runs that should not publish, and how they tell the user: an empty release is blocked
(quality.min_records), the both caption path loses no face the facecaption path keeps, and
expected failures print one line and an exit status on the console while the traceback goes
to the flow run's logs on the Prefect API.

Real components throughout: the `facecap` CLI in its own process, a real Prefect API (the
session's test harness), real Dask, real detections on the astronaut photo, a tiny attribute
model trained by train_attributes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).parent))
from helpers import offline_config, read_release, run_curate  # noqa: E402
from http_fixture_server import astronaut_jpeg  # noqa: E402
from test_attributes_flow import attribute_model_dir  # noqa: E402,F401 (a fixture)
from test_text_path import face_batch  # noqa: E402

from facecap.stages.text import TextSettings  # noqa: E402
from facecap.stages.base import Counters  # noqa: E402
from facecap.stages.text import FACE_CAPTION, TextTools, filter_captions, text_schema  # noqa: E402
from facecap.text.keywords import KeywordMatcher  # noqa: E402
from facecap.text.text_filter import load_text_filter  # noqa: E402

NOT_ABOUT_A_FACE = "vintage car parked on a city street"


def mirrored(jpeg: bytes) -> bytes:
    buf = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(jpeg))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def photo_folder(root: Path, captions: dict[str, str | None]) -> Path:
    """Astronaut photos (alternately mirrored, so crops differ) with these alt-texts (None: no sidecar)."""
    root.mkdir(parents=True)
    photo = astronaut_jpeg()
    for i, (stem, caption) in enumerate(captions.items()):
        (root / f"{stem}.jpg").write_bytes(mirrored(photo) if i % 2 else photo)
        if caption is not None:
            (root / f"{stem}.txt").write_text(caption + "\n")
    return root


def run_cli(argv: list[str], api_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run([sys.executable, "-m", "facecap", *argv], env=env, capture_output=True, text=True,
                          timeout=600)


def flow_run_logs(out: Path) -> tuple[object, list[str]] | None:
    """The CLI's curate flow run for OUT (named `curate OUT`) and its log messages, from the API; None if no run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"curate {out}"])))
        if not runs:
            return None
        (run,) = runs
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return run, [log.message for log in logs]


@pytest.mark.e2e
def test_an_empty_release_is_blocked_in_one_line_and_its_traceback_goes_to_the_api(prefect_api_url, tmp_path):
    # flip80m keeps only faces whose alt-text is about a face: here none is, so every face is rejected.
    folder = photo_folder(tmp_path / "photos", {"a": NOT_ABOUT_A_FACE, "b": NOT_ABOUT_A_FACE})
    out = tmp_path / "out"
    done = run_cli(["curate", str(folder), "--out", str(out), "--profile", "offline", "--workers", "1",
                    "--set", "text.caption_path=flip80m"], prefect_api_url)
    console = done.stdout + done.stderr
    assert done.returncode == 1, console
    assert "Traceback" not in console and "Encountered exception" not in console, console
    assert "Finished in state Failed" not in console  # it would repeat the message
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("facecap: ")]
    assert done.stderr.rstrip().endswith(line)
    assert "min_face_records" in line and "quality.min_records (1)" in line and "observed 0" in line
    assert "Release: 0 face records" not in console
    assert not (out / "release").exists(), "an empty release must not be published"
    (staged,) = (out / "staging").iterdir()
    assert str(staged) in line

    run, messages = flow_run_logs(out)
    assert str(run.id) == staged.name and run.state.is_failed()
    engine = [m for m in messages if m.startswith("Encountered exception during execution")]
    assert engine and "Traceback" in engine[0] and "ReleaseBlocked" in engine[0] and "min_face_records" in engine[0]
    assert any(m.startswith("Finished in state Failed") and "min_face_records" in m for m in messages)


@pytest.mark.parametrize("setting, says, in_flow", [
    ("text.denoise=true", "llm.endpoint", True),  # a ConfigError found while planning, inside the flow
    # A WeightsError: the CLI names the detector before it starts the flow, so this one stops earlier.
    ("detect.weights=/nowhere/retinaface.onnx", "/nowhere/retinaface.onnx", False),
])
@pytest.mark.e2e
def test_a_config_error_or_missing_model_exits_2_in_one_line(prefect_api_url, tmp_path, setting, says, in_flow):
    folder = photo_folder(tmp_path / "photos", {"a": "a smiling astronaut"})
    out = tmp_path / "out"
    done = run_cli(["curate", str(folder), "--out", str(out), "--profile", "offline", "--workers", "1",
                    "--set", "text.caption_path=flip80m", "--set", setting], prefect_api_url)
    console = done.stdout + done.stderr
    assert done.returncode == 2, console
    assert "Traceback" not in console and "Encountered exception" not in console, console
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("facecap: ")]
    assert says in line
    if not in_flow:
        assert flow_run_logs(out) is None
        return
    run, messages = flow_run_logs(out)
    assert run.state.is_failed()
    assert any(m.startswith("Encountered exception during execution") and "Traceback" in m for m in messages)


@pytest.mark.e2e
def test_a_config_error_before_the_flow_exits_2_in_one_line(prefect_api_url):
    done = run_cli(["curate", "/nowhere", "--out", "/tmp/unused", "--set", "quality.min_records=-1"],
                   prefect_api_url)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "quality.min_records" in done.stderr


def test_an_unexpected_error_still_shows_its_traceback_on_the_console():
    import logging

    from facecap.cli import ExpectedFailureFilter
    from facecap.settings import ConfigError
    from facecap.quality.validate import ReleaseBlocked

    def record(exc: BaseException | None, msg: str = "Encountered exception during execution: %r") -> logging.LogRecord:
        exc_info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, msg, (exc,), exc_info)

    console = ExpectedFailureFilter()
    assert not console.filter(record(ReleaseBlocked("x"))) and not console.filter(record(ConfigError("x")))
    assert console.filter(record(ValueError("x")))
    assert not console.filter(record(None, "Finished in state Failed('Flow run encountered an exception: "
                                           "ReleaseBlocked: quality checks failed')"))
    assert console.filter(record(None, "Finished in state Failed('Flow run encountered an exception: "
                                       "KeyError: x')"))
    assert console.filter(record(None, "detect: 1/1 shards"))


# --------------------------------------------------------------------------- the both caption path


def text_of(captions: list[str | None], **settings) -> tuple[list[dict], list[dict]]:
    matcher = KeywordMatcher.from_file()
    text = TextSettings(**settings)
    tools = TextTools(matcher, load_text_filter(text, matcher), "clean-1")
    chunks = list(filter_captions(iter([face_batch(captions)]), tools, text, text_schema(text), Counters()))
    kept = [c.kept for c in chunks if c.kept is not None]
    rejects = [c.rejected for c in chunks if c.rejected is not None]
    return (pa.concat_tables(kept).to_pylist() if kept else []), (pa.concat_tables(rejects).to_pylist()
                                                                   if rejects else [])


def test_both_keeps_faces_without_a_face_caption_unless_asked_to_reject_them():
    captions = ["a smiling woman", NOT_ABOUT_A_FACE, None, "a sad boy"]
    kept, rejects = text_of(captions, caption_path="both")
    assert not rejects and [r["sample_id"] for r in kept] == ["img0-00", "img1-00", "img2-00", "img3-00"]
    verdicts = {r["sample_id"]: (r["text_verdict"], r["text_caption"]) for r in kept}
    assert verdicts == {"img0-00": (FACE_CAPTION, "a smiling woman"), "img1-00": ("not_face_caption", None),
                        "img2-00": ("no_caption", None), "img3-00": (FACE_CAPTION, "a sad boy")}
    assert kept[1]["keywords"] is None and kept[1]["text_score"] == 0.0 and kept[2]["text_score"] is None

    for settings in ({"caption_path": "both", "reject_non_face_alt_text": True}, {"caption_path": "flip80m"}):
        kept, rejects = text_of(captions, **settings)
        assert [r["sample_id"] for r in kept] == ["img0-00", "img3-00"]
        assert {r["sample_id"]: r["reason"] for r in rejects} == {"img1-00": "not_face_caption",
                                                                  "img2-00": "no_caption"}


def test_both_keeps_every_face_facecaption_keeps(prefect_api_url, tmp_path, attribute_model_dir):  # noqa: F811
    folder = photo_folder(tmp_path / "photos", {"a": "Smiling astronaut portrait with bright eyes",
                                                 "b": NOT_ABOUT_A_FACE, "c": None, "d": "map of europe 1900"})

    def cfg(path: str):
        # The random attribute model's captions would not pass the caption suite; its quality is not the point.
        return offline_config(ingest={"shard_size": 2}, execution={"n_workers": 1}, quality={"enabled": False},
                              attributes={"backend": "classifier", "model": attribute_model_dir,
                                          "keep_threshold": 0.0, "min_attributes": 0},
                              text={"caption_path": path})

    out = tmp_path / "out"  # one OUT: the second run reuses ingest, detect and annotate
    run_curate([folder], out, cfg("facecaption"))
    facecaption, _ = read_release(out)
    result = run_curate([folder], out, cfg("both"))
    both, rejects = read_release(out)
    assert facecaption.num_rows >= 4 and result.records == both.num_rows
    assert set(facecaption.column("sample_id").to_pylist()) <= set(both.column("sample_id").to_pylist())
    assert not [r for r in (rejects.to_pylist() if rejects is not None else []) if r["stage"] == "text"]
    rows = both.select(["source_offset", "text_verdict", "text_caption", "caption", "caption_check"]).to_pylist()
    by_stem = {}
    for row in rows:
        by_stem.setdefault(Path(row["source_offset"]).stem, []).append(row)
    assert {s: {r["text_verdict"] for r in rs} for s, rs in by_stem.items()} == {
        "a": {FACE_CAPTION}, "b": {"not_face_caption"}, "c": {"no_caption"}, "d": {"not_face_caption"}}
    assert all(r["text_caption"] for r in by_stem["a"])
    assert all(r["text_caption"] is None for s in "bcd" for r in by_stem[s])
    assert all(r["caption"] and r["caption_check"] for r in rows)  # the attribute caption, for every face
