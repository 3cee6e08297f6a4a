"""Validation in the child process started ahead of need: the same verdict as in-process, its log lines
relayed, and a child that cannot answer never costs the run its validation."""

from __future__ import annotations

import pytest
from prefect import flow
from quality_helpers import write_synthetic_release

from facecap.quality import process
from facecap.quality.process import ChildUnavailable, ValidationFailed, ValidationProcess
from facecap.quality.validate import validate_release
from facecap.tasks.validate import validate_task, validation_ahead


def _comparable(verdict: dict) -> dict:
    return {k: verdict[k] for k in ("passed", "publishable", "failed", "counts")} | \
        {"checks": [(c["name"], c["status"], c["observed"]) for c in verdict["checks"]]}


def test_the_child_gives_the_in_process_verdict_and_relays_its_log(tmp_path):
    here = write_synthetic_release(tmp_path / "here", defect="html_caption")
    there = write_synthetic_release(tmp_path / "there", defect="html_caption")
    expected = validate_release(str(here), log=lambda _: None)
    lines: list[str] = []
    child = ValidationProcess()
    try:
        verdict = child.validate(str(there), None, False, log=lines.append)
    finally:
        child.close()
    assert _comparable(verdict) == _comparable(expected) and verdict["failed"]  # a failing check, so it could differ
    assert any("running quality suites" in line for line in lines) and any("failed" in line for line in lines)
    assert (there / "report" / "index.html").exists()


def test_an_error_in_validation_comes_back_with_its_traceback(tmp_path):
    child = ValidationProcess()
    try:
        with pytest.raises(ValidationFailed, match=r"(?s)validating .*missing.* failed:.*Traceback"):
            child.validate(str(tmp_path / "missing"), None, False, log=lambda _: None)
    finally:
        child.close()


def test_a_dead_child_says_so_and_the_task_validates_in_the_flow_instead(prefect_api_url, tmp_path, caplog):
    child = ValidationProcess()
    child.proc.kill()
    child.proc.wait()
    with pytest.raises(ChildUnavailable, match="exit code -9"):
        child.validate(str(tmp_path), None, False, log=lambda _: None)
    child.close()

    staged = write_synthetic_release(tmp_path / "release")

    @flow
    def validate_with_a_dead_child() -> dict:
        with validation_ahead(True) as needed:
            needed()
            ahead = process._ahead[0]
            ahead.proc.kill()  # as an OOM kill would
            ahead.proc.wait()
            return validate_task(str(staged))

    verdict = validate_with_a_dead_child()
    assert verdict["publishable"] and not process._ahead
    assert "validating in the flow's process instead" in caplog.text


def test_a_refused_write_in_the_child_is_raised_as_the_flow_would_meet_it():
    """A full disk during validation must reach the flow as the OSError it handles (`storage.write_refused`),
    not as an opaque failure; tests/test_disk_full.py runs this through the flow on a real full file system."""
    from facecap import storage
    from facecap.quality.process import _rebuilt

    exc = _rebuilt({"error": "Traceback ...", "os_error": [28, "No space left on device", "/out/report/x"]}, "/r")
    assert isinstance(exc, OSError) and storage.write_refused(exc) == "No space left on device: /out/report/x"
    assert "raised in the validation process" in exc.__notes__[0]
    import duckdb

    exc = _rebuilt({"error": "Traceback ...", "duckdb": ["IOException", "IO Error: No space left on device"]}, "/r")
    assert isinstance(exc, duckdb.IOException) and storage.write_refused(exc) == "No space left on device"
    assert isinstance(_rebuilt({"error": "Traceback ..."}, "/r"), ValidationFailed)
