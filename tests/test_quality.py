"""Quality suites on real DuckDB scans and real Great Expectations: clean releases pass, each defect is caught."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from quality_helpers import DEFECTS, write_synthetic_release

from facecap.cli import main as facecap_main
from facecap.quality.validate import ReleaseBlocked, blocked_message, validate_release


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, dict]:
    staged = write_synthetic_release(tmp_path_factory.mktemp("clean"))
    return staged, validate_release(str(staged), log=_quiet)


def _by_name(verdict: dict) -> dict[str, dict]:
    return {c["name"]: c for c in verdict.checks}


def test_a_clean_release_with_every_column_passes_every_check(clean):
    staged, verdict = clean
    checks = _by_name(verdict)
    assert verdict.passed and verdict.publishable and not verdict.failed
    assert {c["status"] for c in checks.values()} == {"passed"}, "with every stage on nothing is n/a"
    assert checks["rows_match_funnel"]["observed"] == 0
    assert verdict.decoded_sample > 0 and checks["image_bytes_decode"]["observed"] == 0
    recorded = json.loads((staged / "release.json").read_text())
    assert recorded["validation"]["passed"] is True and recorded["stages"]["validate"]["status"] == "on"


def test_data_docs_pages_share_their_compiled_templates(clean):
    """GX would compile its Data Docs templates again for every page; here once per process. If a GX upgrade
    drops the hook this fails, rather than validation quietly getting a second slower."""
    from facecap.quality.suites import share_compiled_templates

    staged, verdict = clean
    store = share_compiled_templates()
    assert store and all(isinstance(code, bytes) and code for code in store.values())
    pages = list((staged / "report" / "gx").rglob("*.html"))
    assert len(pages) >= 4 and any("values must be" in p.read_text() for p in pages), "the pages render"


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_injected_defect_fails_its_expectation_and_blocks_publication(defect, tmp_path):
    staged = write_synthetic_release(tmp_path, defect=defect)
    verdict = validate_release(str(staged), log=_quiet)
    check = _by_name(verdict)[DEFECTS[defect]]
    assert check["status"] == "failed" and check["observed"] != 0, check
    assert verdict.failed == [DEFECTS[defect]], "the defect must fail its own check and no other"
    assert not verdict.publishable
    if check["examples"] and check["look_at"]:  # a row check names its records with a query that runs as is
        import duckdb

        listed = {r[0] for r in duckdb.sql(check["look_at"]).fetchall()}
        assert set(check["examples"]) <= listed and len(listed) == check["observed"], (listed, check)
    report = (staged / "report" / "index.html").read_text()
    assert "NOT PUBLISHED" in report and DEFECTS[defect] in report


def test_thresholds_come_from_the_release_config(tmp_path):
    staged = write_synthetic_release(tmp_path)
    # The clean release's scores are 0.985..0.9999: a stricter detect.min_score than the stages used must fail.
    verdict = validate_release(str(staged), overrides=["detect.min_score=0.999"], log=_quiet)
    assert "det_score_at_least_threshold" in verdict.failed
    assert "0.999" in _by_name(verdict)["det_score_at_least_threshold"]["description"]


def test_checks_of_stages_that_were_off_are_not_applicable_not_passed(tmp_path):
    staged = write_synthetic_release(tmp_path)
    info = json.loads((staged / "release.json").read_text())
    info["stages"]["caption"] = {"status": "off", "why": "no LLM endpoint configured"}
    (staged / "release.json").write_text(json.dumps(info))
    verdict = validate_release(str(staged), log=_quiet)
    captions = [c for c in verdict.checks if c["suite"] == "captions"]
    assert captions and all(c["status"] == "not applicable" and "no LLM endpoint" in c["why"] for c in captions)
    assert verdict.passed, "not applicable is neither a pass nor a failure"

    # A stage that was on but whose column is missing is a failure, not "not applicable".
    info["stages"]["caption"] = {"status": "on"}
    (staged / "release.json").write_text(json.dumps(info))
    import pyarrow.parquet as pq

    for f in (staged / "data").glob("*.parquet"):
        table = pq.read_table(f)
        pq.write_table(table.drop_columns(["caption"]), f)
    verdict = validate_release(str(staged), log=_quiet)
    assert "caption_not_empty" in verdict.failed


def test_report_is_self_contained_and_holds_the_figures(clean):
    staged, verdict = clean
    html = (staged / "report" / "index.html").read_text()
    data = json.loads((staged / "report" / "report.json").read_text())
    # Offline: no external stylesheet, script or image; thumbnails are data URIs; charts are inline SVG.
    assert not re.search(r"""(src|href)=["']https?://""", html) and "<script" not in html
    assert html.count("data:image/jpeg;base64,") >= 4 and html.count("<svg") >= 6
    fig = data["figures"]
    assert fig["rows"] == data["release"]["records"] == sum(fig["splits"].values())
    assert fig["crop"]["paper_mean"] == 285 and 140 <= fig["crop"]["mean_width"] <= 220
    shares = fig["attributes"]["category_share_pct"]
    assert set(shares) == set(fig["attributes"]["paper_category_share_pct"]) and abs(sum(shares.values()) - 100) < 0.5
    assert fig["attributes"]["mean_per_face"] >= 6
    assert fig["caption_words"]["mean"] > 10 and fig["caption_words"]["paper_mean"] == 30
    curve = fig["four_grams"]["points"]
    assert len(curve) == 10 and all(a["unique_4grams"] <= b["unique_4grams"] for a, b in zip(curve, curve[1:]))
    assert fig["rewrite"]["checks"]["passed"] > 0 and 0 < fig["rewrite"]["not_rewritten_share"] < 1
    # Fallback reasons are grouped by kind, without their per-record details.
    assert fig["rewrite"]["checks"]["omission"] > 0 and not any(":" in k for k in fig["rewrite"]["checks"])
    assert fig["rewrite"]["run_counts"] == {"hallucinated_attributes": 2, "llm_cache_hits": 5, "omitted_attributes": 7}
    assert "hallucinated_attributes" in html
    for check in verdict.checks:  # every expectation with its observed value
        assert check["name"] in html
    assert "33.9" in json.dumps(fig["attributes"]["paper_category_share_pct"])
    assert (staged / "report" / "gx" / "index.html").exists(), "GX Data Docs are kept with the report"
    card = (staged / "README.md").read_text()
    assert "split: train" in card and "No identities" in card and f"{fig['rows']}" in card.replace(",", "")


def test_validate_command_exits_1_on_failure_and_records_allow_failures(tmp_path, capsys):
    staged = write_synthetic_release(tmp_path, defect="html_caption")
    assert facecap_main(["validate", str(staged)]) == 1
    assert "caption_no_html" in capsys.readouterr().err
    assert facecap_main(["validate", str(staged), "--allow-failures"]) == 0
    info = json.loads((staged / "release.json").read_text())
    assert info["validation"]["allow_failures"] is True and info["validation"]["failed"] == ["caption_no_html"]
    assert "allow-failures" in (staged / "report" / "index.html").read_text()
    assert facecap_main(["validate", str(tmp_path / "nowhere")]) == 2


def test_validate_flow_fails_on_a_defective_release(prefect_api_url, tmp_path):
    from facecap.flows.validate import validate

    staged = write_synthetic_release(tmp_path, defect="duplicate_id")
    state = validate(str(staged), return_state=True)
    assert state.is_failed()
    with pytest.raises(ReleaseBlocked, match="sample_id_unique"):
        state.result()
    good = write_synthetic_release(tmp_path / "good")
    assert validate(str(good)).passed is True
    shutil.rmtree(tmp_path)


def test_an_empty_release_is_not_failed_for_missing_columns(tmp_path):
    # Every record rejected: nothing to check per row, but the funnel must still agree and the report render.
    staged = write_synthetic_release(tmp_path, n_images=0)
    verdict = validate_release(str(staged), log=_quiet)
    checks = _by_name(verdict)
    # Only the floor on face records fails it (quality.min_records, default 1); with no floor it passes.
    assert verdict.failed == ["min_face_records"] and checks["min_face_records"]["observed"] == 0
    assert "quality.min_records" in blocked_message(verdict, str(staged))
    verdict = validate_release(str(staged), overrides=["quality.min_records=0"], log=_quiet)
    checks = _by_name(verdict)
    assert verdict.passed and checks["rows_match_funnel"]["status"] == "passed"
    assert checks["sample_id_unique"]["status"] == "not applicable"
    assert "no face records" in checks["sample_id_unique"]["why"]
    assert json.loads((staged / "report" / "report.json").read_text())["figures"]["rows"] == 0


def test_a_mean_that_used_to_block_publishes_and_blocks_only_as_a_policy(tmp_path):
    """Every face padded 0.2 (an edge-crop corpus; each within detect.max_pad_fraction): the mean 0.2 is above the
    0.1 that used to refuse the release. Unset, the mean is reported; set as a policy, it blocks and says which
    records to look at, with a query that runs on the release as it is."""
    import duckdb

    staged = write_synthetic_release(tmp_path, pad_fraction=0.2)
    verdict = validate_release(str(staged), log=_quiet)
    mean = _by_name(verdict)["mean_pad_fraction"]
    assert verdict.passed and verdict.publishable, verdict.failed
    assert mean["status"] == "passed" and abs(mean["observed"] - 0.2) < 1e-6 and mean["policy"]
    assert "reported, no policy" in mean["description"]
    assert _by_name(verdict)["pad_fraction_within_rule"]["status"] == "passed"

    verdict = validate_release(str(staged), overrides=["quality.max_mean_pad_fraction=0.1"], log=_quiet)
    assert verdict.failed == ["mean_pad_fraction"] and not verdict.publishable
    check = _by_name(verdict)["mean_pad_fraction"]
    assert "a policy set for this run" in check["description"]
    rows = duckdb.sql(check["look_at"]).fetchall()
    n = sum(1 for _ in pq_rows(staged))
    assert len(rows) == n and all(abs(pad - 0.2) < 1e-6 for _, pad in rows), "every padded face is listed"
    assert check["look_at"] in blocked_message(verdict, str(staged))


@pytest.mark.parametrize("defect, check", [("duplicate_image", "duplicate_image_rate"),
                                           ("duplicate_caption", "duplicate_caption_rate")])
def test_duplicate_shares_block_only_as_policies_and_name_the_repeated_records(defect, check, tmp_path):
    """Copies of one photo are dedup's to remove per face, and faces alike get alike template captions: the
    shares of repeats are reported, and block only when the user sets a limit."""
    import duckdb

    staged = write_synthetic_release(tmp_path, defect=defect)
    verdict = validate_release(str(staged), log=_quiet)
    assert verdict.passed and _by_name(verdict)[check]["observed"] > 0
    verdict = validate_release(str(staged), overrides=[f"quality.max_{check}=0.01"], log=_quiet)
    assert verdict.failed == [check]
    listed = {r[0] for r in duckdb.sql(_by_name(verdict)[check]["look_at"]).fetchall()}
    assert len(listed) == 2, listed


def pq_rows(staged: Path):
    import pyarrow.parquet as pq

    for f in sorted((staged / "data").glob("*.parquet")):
        yield from pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist()
