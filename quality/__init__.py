"""Release quality: checks defined as code (checks.py) computed by DuckDB over the release's Parquet
files and validated by Great Expectations (suites.py), the self-contained report (report.py), the
dataset card (card.py), WebDataset export (export.py), and validate_release tying them together
(validate.py)."""
