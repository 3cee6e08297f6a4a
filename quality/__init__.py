"""Data-quality suites and release reports (Great Expectations on DuckDB): not implemented yet; see README."""
