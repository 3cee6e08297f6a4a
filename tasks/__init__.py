"""Prefect tasks: thin wrappers that run one pipeline stage on one shard.

Stage logic lives in facecap.stages and facecap.pipeline; a task adds only
what orchestration needs: a readable run name, tags, retries where a retry
can help (I/O), and the Dask resource annotation for GPU stages.
"""
