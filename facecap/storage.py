"""Storage: local paths or any fsspec URL, with atomic writes.

Every output is written under a temporary name and renamed into place, so a
file that exists is complete. That single rule is what makes a killed run
resumable: a stage's stats file is written last and marks the stage done.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from typing import Any

import fsspec


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(url: str) -> str:
    """Make a local path absolute (so ids do not depend on the working directory)."""
    return os.path.abspath(url) if is_local(url) and not url.startswith("file://") else url


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


# The output's file system refusing a write for a reason the user must fix (space, quota,
# permissions, a read-only mount): a failure to report, not a bug to trace.
_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
_DUCKDB_REFUSED = ("No space left on device", "Permission denied", "Read-only file system", "Disk quota exceeded")


def write_refused(exc: BaseException) -> str | None:
    """'<cause>: <path>' when `exc` is a file system refusing a write (full, quota, permissions); else None."""
    if isinstance(exc, OSError) and exc.errno in _REFUSED:
        return f"{exc.strerror or os.strerror(exc.errno)}: {exc.filename or 'path not reported'}"
    # DuckDB raises its own IOException, with the OS message and the path in its text.
    if type(exc).__name__ == "IOException" and any(m in str(exc) for m in _DUCKDB_REFUSED):
        return str(exc).replace("IO Error: ", "")
    return None


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


class AtomicFile:
    """A file written under a temporary name beside `url`; `commit` renames it into place.

    Readers never see a partial file: until commit it does not exist under its
    name, and `abort` removes the temporary.
    """

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = filesystem(url)
        parent, name = self.path.rsplit("/", 1)
        self.fs.makedirs(parent, exist_ok=True)
        self.tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        self.fh = self.fs.open(self.tmp, "wb")

    def commit(self) -> None:
        self.fh.close()
        if is_local(self.url):
            os.replace(self.tmp, self.path)  # atomic on POSIX, also over an existing file
        else:
            self.fs.mv(self.tmp, self.path)  # object stores: the PUT itself is atomic

    def abort(self) -> None:
        self.fh.close()
        if self.fs.exists(self.tmp):
            self.fs.rm(self.tmp)


def write_bytes_atomic(url: str, data: bytes) -> None:
    target = AtomicFile(url)
    try:
        target.fh.write(data)
    except BaseException:
        target.abort()
        raise
    target.commit()


def write_json_atomic(url: str, data: Any) -> None:
    write_bytes_atomic(url, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        return json.load(fh)


def copy_file(src: str, dst: str) -> None:
    """Copy src to dst atomically (hard link when both are on one local disk)."""
    if is_local(src) and is_local(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp-{uuid.uuid4().hex}"
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return
    fs, path = filesystem(src)
    with fs.open(path, "rb") as fh:
        write_bytes_atomic(dst, fh.read())


def remove_stale_temporaries(root: str, older_than_s: float = 3600.0) -> int:
    """Delete `.tmp-*` files a killed run left under a local `root`; returns how many.

    Only files untouched for `older_than_s` go, so a shard another process is
    writing right now is never pulled from under it.
    """
    import time

    if not is_local(root) or not os.path.isdir(root):
        return 0
    removed, cutoff = 0, time.time() - older_than_s
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".tmp-") or ".tmp-" in name:
                path = os.path.join(dirpath, name)
                try:
                    if os.path.getmtime(path) < cutoff:
                        os.remove(path)
                        removed += 1
                except FileNotFoundError:
                    pass
    return removed
