"""What travels between the driver, the shard runner and the stages: a shard's input and a stage's result on it.

A leaf: plain dataclasses that the flows, the runner, the stages and the
readers all pass around, so none of them has to import another for its types.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from facecap.sources.spec import ShardSpec


@dataclass(frozen=True)
class OutputRef:
    """One stage's output for one shard: where it is and what it holds."""

    stage: str
    key: str
    data: str  # Parquet path
    key_column: str
    columns: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class ShardInput:
    """What a stage task needs to read its shard: the source spec and the outputs of the stages before it."""

    spec: ShardSpec
    outputs: tuple[OutputRef, ...] = ()
    ingest_settings: dict = field(default_factory=dict, compare=False)  # to re-read the source's bytes

    @property
    def label(self) -> str:
        return self.spec.label

    def then(self, output: OutputRef) -> "ShardInput":
        return ShardInput(self.spec, self.outputs + (output,), self.ingest_settings)

    @property
    def columns(self) -> set[str]:
        return {c for o in self.outputs for c in o.columns}


@dataclass
class ShardStats:
    """What one stage did to one shard. Written next to its outputs, returned to the flow, recorded in the manifest."""

    stage: str
    input: str  # human-readable shard label
    source: str
    key: str = ""
    input_key: str = ""
    kind: str = ""
    stage_version: str = ""
    settings_hash: str = ""
    model: str | None = None
    output: str = ""
    rejects_output: str = ""
    key_column: str = ""
    columns: list[str] = field(default_factory=list)
    extends: list[str] = field(default_factory=list)  # the outputs (stage:key) this one's rows join
    rows_in: int = 0
    rows_out: int = 0
    rows_written: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    rejects_written: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)  # data / rejects: bytes and sha256
    retry_generation: int = 0
    seconds: float = 0.0
    started_at: str = ""
    worker: str = ""
    facecap_version: str = ""
    cached: bool = False  # not stored: set when a rerun reuses the outputs
    repaired: str | None = None  # not stored: why a cached output was recomputed
    error: str | None = None  # a failed task's exception

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for transient in ("cached", "repaired", "error"):
            data.pop(transient)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardStats":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def failure(cls, stage: str, shard: ShardInput, exc: BaseException) -> "ShardStats":
        return cls(stage=stage, input=shard.label, source=shard.spec.source,
                   error=f"{type(exc).__name__}: {exc}"[:2000])

    @property
    def ref(self) -> OutputRef:
        return OutputRef(self.stage, self.key, self.output, self.key_column, tuple(self.columns), self.rows_written)
