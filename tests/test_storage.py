"""Leftovers of a killed run: stale partial files are removed, fresh ones and real outputs are kept."""

import os

from facecap import storage


def test_remove_stale_temporaries_keeps_outputs_and_files_being_written(tmp_path):
    shard_dir = tmp_path / "shards" / "detect"
    shard_dir.mkdir(parents=True)
    stale = shard_dir / ".tmp-0123-abc.parquet"
    stale_link = shard_dir / "abc.parquet.tmp-0456"
    writing = shard_dir / ".tmp-0789-def.parquet"
    output = shard_dir / "abc.parquet"
    for path in (stale, stale_link, writing, output):
        path.write_bytes(b"x")
    for path in (stale, stale_link, output):
        os.utime(path, (0, 0))  # untouched for decades

    assert storage.remove_stale_temporaries(str(tmp_path / "shards")) == 2
    assert sorted(p.name for p in shard_dir.iterdir()) == [".tmp-0789-def.parquet", "abc.parquet"]
    assert storage.remove_stale_temporaries(str(tmp_path / "missing")) == 0
