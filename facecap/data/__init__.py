"""Editable data files (caption grammar, lexicons, keyword lists, prompts), versioned with the code."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_file(name: str) -> Path:
    """The path of a built-in data file shipped in this package."""
    return Path(str(resources.files(__name__).joinpath(name)))


def file_state(path: Path, what: str, setting: str) -> tuple[str, int, int]:
    """(resolved path, mtime, size) of a user-editable data file: a cache key that changes when the
    file does, so per-process caches reload an edited file. A missing file is a ConfigError."""
    from facecap.settings import ConfigError

    try:
        stat = path.stat()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}. Set {setting} to an existing "
                          f"file, or unset it for the built-in {what}.") from exc
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size
