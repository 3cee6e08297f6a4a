"""What one ingest task reads: a source container and the part of it that makes the shard."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class ShardSpec:
    """What one ingest task reads. Small and picklable: it travels to workers."""

    kind: Literal["folder", "tar", "parquet", "urls", "unreadable"]
    source: str  # container URI, absolute
    members: tuple[str, ...] = ()  # folder: image paths relative to `source`
    start: int = 0  # parquet: row range [start, stop)
    stop: int = 0
    fingerprint: str = ""  # identity of the bytes this spec covers (from sizes and mtimes / ETags)
    detail: str = ""  # unreadable: why
    sidecars: tuple[str, ...] = field(default=(), compare=False)  # folder: caption/meta files present

    @property
    def label(self) -> str:
        name = posixpath.basename(self.source.rstrip("/")) or self.source
        if self.kind == "folder":
            return f"{name}[{self.members[0]}..+{len(self.members)}]" if self.members else name
        if self.kind in ("parquet", "urls"):
            return f"{name}[{self.start}:{self.stop}]"
        return name

    def key_material(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("sidecars")
        data["members"] = hashlib.sha256("\n".join(self.members).encode()).hexdigest()
        return data
