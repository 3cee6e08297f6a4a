"""Stage logic: plain functions over record batches, free of orchestration."""
