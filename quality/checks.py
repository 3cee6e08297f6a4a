"""The release's expectations, defined as code: what is checked, on which column, with which bounds.

Each check is one number computed by a DuckDB aggregate over the release's
Parquet files (a count of offending rows, or a rate), and one Great
Expectations expectation on that number. The heavy work (15M rows) stays in
DuckDB; GX validates the small frame of numbers DuckDB produced. (GX 1.24's
own DuckDB path through duckdb-engine fails with "list index out of range":
see DESIGN.md.)

Thresholds come from the config that produced the release (its
config.yaml): the same settings the stages used.
"""

from __future__ import annotations

from dataclasses import dataclass

from facecap.attributes import ATTRIBUTES
from facecap.config import Config

# Suites, in report order. A suite's checks are not applicable when the
# stage that writes their columns was off.
SUITE_STAGE = {"faces": "detect", "near_duplicates": "dedup", "attributes": "annotate", "captions": "caption",
               "release": None}

# Regular expressions (RE2, as DuckDB runs them) for caption defects.
HTML_PATTERN = r"<\s*/?\s*[A-Za-z][A-Za-z0-9]*(\s[^>]*)?/?>|&(#[0-9]+|#x[0-9A-Fa-f]+|[A-Za-z]+);"
# Grammar leftovers: braces/brackets of unexpanded symbols, $variables, and
# identifier-like tokens (NON_TERMINAL, Black_Hair) that no sentence contains.
TEMPLATE_PATTERN = r"[{}\[\]]|\$[A-Za-z_]|[A-Za-z0-9]+_[A-Za-z0-9_]+"


@dataclass(frozen=True)
class Check:
    """One expectation: `metric` (a DuckDB aggregate expression) must lie in [min_value, max_value]."""

    name: str
    suite: str
    description: str  # what must hold, with the configured bounds filled in
    metric: str | None  # SQL aggregate over the `faces` view; None: computed in Python (see suites.py)
    columns: tuple[str, ...]  # release columns it reads: missing ones fail the check
    min_value: float | None = 0  # counts and rates: 0 .. max_value
    max_value: float | None = 0

    @property
    def row_condition(self) -> str | None:
        """For a count of offending rows, the SQL condition that picks them (to show examples)."""
        prefix = "count(*) FILTER ("
        if self.metric and self.metric.startswith(prefix) and self.metric.endswith(")"):
            return self.metric[len(prefix):-1]
        return None


def caption_words_sql(column: str) -> str:
    """Words = space-separated tokens: 1 + the number of spaces (captions are single-spaced, the blank
    check catches empty ones). Counting bytes is several times cheaper in DuckDB than trimming or
    splitting on a regex, which matters at 15M captions."""
    return f"(strlen({column}) - strlen(replace({column}, ' ', '')) + 1)"


def caption_blank_sql(column: str) -> str:
    """Null, empty or only whitespace; trims only captions that start or end with a space (cheap)."""
    return (f"(CASE WHEN {column} IS NULL OR strlen({column}) = 0 THEN true "
            f"WHEN {column}[1] IN (' ', chr(10), chr(9)) OR {column}[-1] IN (' ', chr(10), chr(9)) "
            f"THEN trim({column}, ' ' || chr(10) || chr(9) || chr(13)) = '' ELSE false END)")


def derived_columns(columns: list[str]) -> dict[str, str]:
    """Per-row values several checks share, computed once per row in a subquery (DuckDB does not
    reuse a repeated expression by itself)."""
    if "caption" not in columns:
        return {}
    return {"_caption_words": caption_words_sql("caption"), "_caption_blank": caption_blank_sql("caption")}


def _regex_count(pattern: str, needles: str) -> str:
    """Rows whose caption matches `pattern`, running the regex only on captions holding one of the
    characters any match needs (a CASE short-circuits in DuckDB, AND does not): ~4x cheaper."""
    guard = " OR ".join(f"contains(caption, '{c}')" for c in needles)
    return f"count(*) FILTER (CASE WHEN {guard} THEN regexp_matches(caption, '{pattern}') ELSE false END)"


def _attribute_names_sql() -> str:
    return "[" + ", ".join(f"'{name}'" for name in ATTRIBUTES) + "]"


def _landmarks_outside_sql(margin: float) -> str:
    # Landmarks may sit slightly outside RetinaFace's box on turned faces:
    # allow `margin` x the box side. Spelled out per point (no lambda): fast.
    terms = []
    for i in range(5):
        x, y = f"landmarks[{2 * i + 1}]", f"landmarks[{2 * i + 2}]"
        mx, my = f"{margin} * (bbox[3] - bbox[1])", f"{margin} * (bbox[4] - bbox[2])"
        terms.append(f"{x} < bbox[1] - {mx} OR {x} > bbox[3] + {mx} OR {y} < bbox[2] - {my} OR {y} > bbox[4] + {my}")
    return "count(*) FILTER (landmarks IS NULL OR len(landmarks) != 10 OR " + " OR ".join(terms) + ")"


def build_checks(cfg: Config) -> list[Check]:
    """Every expectation of a release, with bounds from `cfg`."""
    q, d, a = cfg.quality, cfg.detect, cfg.attributes
    tol = q.bbox_tolerance_px
    keep = a.keep_threshold
    names = _attribute_names_sql()
    return [
        # --- faces (detect) ----------------------------------------------
        Check("sample_id_not_null", "faces", "sample_id is never null", "count(*) - count(sample_id)",
              ("sample_id",)),
        Check("sample_id_unique", "faces", "sample_id is unique", "count(sample_id) - count(DISTINCT sample_id)",
              ("sample_id",)),
        Check("det_score_at_least_threshold", "faces", f"det_score >= detect.min_score ({d.min_score})",
              f"count(*) FILTER (det_score IS NULL OR det_score < CAST({d.min_score} AS FLOAT))", ("det_score",)),
        Check("crop_at_least_min_px", "faces", f"crop width and height >= detect.min_face_px ({d.min_face_px})",
              f"count(*) FILTER (width IS NULL OR height IS NULL OR least(width, height) < {d.min_face_px})",
              ("width", "height")),
        Check("bbox_inside_source", "faces",
              f"bbox lies inside the source image (tolerance {tol} px) and has positive size",
              f"count(*) FILTER (bbox IS NULL OR len(bbox) != 4 OR bbox[1] < -{tol} OR bbox[2] < -{tol} "
              f"OR bbox[3] > source_width + {tol} OR bbox[4] > source_height + {tol} "
              f"OR bbox[3] <= bbox[1] OR bbox[4] <= bbox[2])",
              ("bbox", "source_width", "source_height")),
        Check("landmarks_inside_bbox", "faces",
              f"the 5 landmarks lie inside the bbox (tolerance {q.landmark_tolerance:g} x box side)",
              _landmarks_outside_sql(q.landmark_tolerance), ("landmarks", "bbox")),
        Check("mean_pad_fraction", "faces",
              f"mean share of a crop lying outside its source image <= quality.max_mean_pad_fraction "
              f"({q.max_mean_pad_fraction})",
              "coalesce(avg(pad_fraction), 0)", ("pad_fraction",), max_value=q.max_mean_pad_fraction),
        Check("image_bytes_decode", "faces", f"image bytes decode (a sample of {q.decode_sample})", None,
              ("image",)),
        Check("duplicate_image_rate", "faces",
              f"share of rows repeating another row's image bytes <= quality.max_duplicate_image_rate "
              f"({q.max_duplicate_image_rate})",
              "coalesce(1 - count(DISTINCT hash(image)) / nullif(count(*), 0), 0)", ("image",),
              max_value=q.max_duplicate_image_rate),
        # --- near-duplicates (dedup) ----------------------------------------
        # Straddling clusters = distinct (cluster, split) pairs - distinct clusters: each cluster on both
        # sides adds one. The same for source images, which the split has always kept together.
        Check("clusters_in_one_split", "near_duplicates",
              "no near-duplicate cluster has faces in both train and test",
              "count(DISTINCT dedup_cluster || '/' || _split) - count(DISTINCT dedup_cluster)", ("dedup_cluster",)),
        Check("images_in_one_split", "near_duplicates", "no source image has faces in both train and test",
              "count(DISTINCT image_id || '/' || _split) - count(DISTINCT image_id)", ("dedup_cluster", "image_id")),
        # --- attributes (annotate) -----------------------------------------
        Check("min_kept_attributes", "attributes",
              f"at least attributes.min_attributes ({a.min_attributes}) kept attributes",
              f"count(*) FILTER (attributes IS NULL OR len(attributes) < {a.min_attributes})", ("attributes",)),
        Check("attribute_probs_valid", "attributes", "attribute_probs has 40 values within [0, 1]",
              "count(*) FILTER (attribute_probs IS NULL OR len(attribute_probs) != 40 "
              "OR list_min(attribute_probs) < 0 OR list_max(attribute_probs) > 1 "
              "OR list_max(attribute_probs) IS NULL)", ("attribute_probs",)),
        Check("kept_attributes_match_probs", "attributes",
              f"every kept attribute is a CelebA name whose probability > attributes.keep_threshold ({keep})",
              f"count(*) FILTER (len(attributes) > 0 AND coalesce(list_min(list_transform(attributes, "
              f"lambda n: coalesce(attribute_probs[list_position({names}, n)], -1))) <= CAST({keep} AS FLOAT), "
              f"true))", ("attributes", "attribute_probs")),
        # --- captions (caption) --------------------------------------------
        Check("caption_not_empty", "captions", "caption is not null or blank",
              "count(*) FILTER (_caption_blank)", ("caption",)),
        Check("caption_words_in_bounds", "captions",
              f"caption length in words within quality.min/max_caption_words "
              f"({q.min_caption_words}..{q.max_caption_words})",
              f"count(*) FILTER (NOT _caption_blank AND "
              f"_caption_words NOT BETWEEN {q.min_caption_words} AND {q.max_caption_words})", ("caption",)),
        Check("caption_no_template_leftovers", "captions",
              "caption has no grammar leftovers (braces, $vars, IDENTIFIER_LIKE tokens)",
              _regex_count(TEMPLATE_PATTERN, "{}[]$_"), ("caption",)),
        Check("caption_no_html", "captions", "caption has no HTML tags or entities",
              _regex_count(HTML_PATTERN, "<&"), ("caption",)),
        Check("duplicate_caption_rate", "captions",
              f"share of rows repeating another row's caption <= quality.max_duplicate_caption_rate "
              f"({q.max_duplicate_caption_rate})",
              # 64-bit hashes: a collision in 15M captions is ~1e-5 likely and would only add one "duplicate"
              "coalesce(1 - count(DISTINCT hash(caption)) / nullif(count(*), 0), 0)", ("caption",),
              max_value=q.max_duplicate_caption_rate),
        # --- the release as a whole ----------------------------------------
        # No columns: it applies to every release, an empty one above all.
        Check("min_face_records", "release",
              f"the release holds at least quality.min_records ({q.min_records}) face records",
              "count(*)", (), min_value=q.min_records, max_value=None),
        Check("rows_match_funnel", "release",
              "release rows == rows_out of the manifest funnel's last stage (observed: the difference)", None, ()),
    ]
