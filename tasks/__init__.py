"""Prefect tasks: one generic task runs any stage on one shard (stages.py), plus validation.

Stage logic lives in facecap.stages, the shard runner in facecap.runner; a
task adds only what orchestration needs: a readable run name and the stage's
retries. Dask placement lives in flows/executor.py.
"""
