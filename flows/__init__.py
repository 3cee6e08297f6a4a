"""Prefect flows: the DAGs that map stage tasks over shards (curate)."""
