"""The output's file system refusing writes mid-run: a real small file system (a tmpfs mount).

A full disk and a read-only mount each fail the run with one message naming the cause and a
path under OUT, publish nothing, and the rerun after the fix completes with the same release
as a run that never failed. Mounting needs root; elsewhere these tests skip, saying so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import offline_config, run_curate

from facecap.flows.curate import CurateFailed

CFG = offline_config(ingest={"shard_size": 4}, execution={"n_workers": 1})


def sources(example_dir: Path) -> list[Path]:
    return [example_dir / "folder", example_dir / "webdataset" / "*.tar"]


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MB tmpfs, unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def remount(mount: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


def release_rows(out: Path) -> tuple[list[dict], list[dict]]:
    def rows(folder: str) -> list[dict]:
        table = pq.read_table(sorted((out / "release" / folder).glob("*.parquet")))
        return sorted(table.to_pylist(), key=lambda r: (str(r.get("sample_id")), str(r.get("source_offset")),
                                                         str(r.get("stage")), str(r.get("reason"))))
    return rows("data"), rows("rejects")


def test_full_disk_and_read_only_mount_fail_cleanly_and_the_rerun_completes(prefect_api_url, example_dir, small_fs,
                                                                            tmp_path):
    reference = tmp_path / "reference"
    run_curate(sources(example_dir), reference, CFG)
    needed = tree_bytes(reference)

    # A read-only mount: refused before any work, naming the cause and the path.
    out = small_fs / "out"
    remount(small_fs, "ro")
    with pytest.raises(CurateFailed, match="Read-only file system") as refused:
        run_curate(sources(example_dir), out, CFG)
    assert str(small_fs) in str(refused.value) and "Nothing was published" in str(refused.value)
    remount(small_fs, "rw")

    # A full disk mid-run: a filler leaves room for about a third of what the run writes.
    free = subprocess.run(["df", "--output=avail", "-B1", str(small_fs)], capture_output=True, text=True, check=True)
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (int(free.stdout.split()[-1]) - needed // 3))
    with pytest.raises(CurateFailed, match="No space left on device") as full:
        run_curate(sources(example_dir), out, CFG)
    assert str(out) in str(full.value)
    assert not (out / "release").exists(), "a partial release was published"

    # Space freed: the same command finishes, and its release is the one a clean run made.
    filler.unlink()
    result = run_curate(sources(example_dir), out, CFG)
    assert result.records > 0
    assert release_rows(out) == release_rows(reference)
