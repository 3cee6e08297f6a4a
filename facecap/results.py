"""What a run hands back across layers: the funnel, the quality verdict and the curate result.

Typed, so that the flow, the command line, the deployments and the benchmarks
read named fields instead of string keys of a dict. `to_dict` gives the JSON
form that release.json and the run's artifacts hold; `from_dict` reads it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of `data` that are fields of `cls` (a release.json written by another version may hold more)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class FunnelRow:
    """One stage of a run: rows in and out, rejects by reason, and how its shards went."""

    stage: str
    rows_in: int
    rows_out: int
    rejects: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    cached: int = 0  # shards whose output an earlier run left intact
    failed: int = 0
    extra: dict[str, int] = field(default_factory=dict)  # stage-specific counts (e.g. faces found)
    release_wide: bool = False  # a pass over the whole release, not a map over shards

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FunnelRow:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class ValidationSummary:
    """The quality verdict as release.json records it: enough to tell whether and why a release was published."""

    passed: bool
    failed: list[str]
    counts: dict[str, int]
    allow_failures: bool = False  # published although checks failed (--allow-failures)
    validated_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ValidationSummary | None:
        return None if not data else cls(**_known(cls, data))


@dataclass(frozen=True)
class Verdict:
    """Every quality check's result on one staged release, and whether it may be published."""

    passed: bool  # every applicable check passed
    publishable: bool  # passed, or failures overridden by allow_failures
    allow_failures: bool  # failures were overridden
    failed: list[str]
    counts: dict[str, int]  # checks by status: passed, failed, not applicable
    checks: list[dict[str, Any]]  # each check's result (CheckResult.to_dict)
    validated_at: str
    report: str  # the report's index.html
    seconds: float
    funnel_check: dict[str, Any] | None = None  # how the release's rows were matched against the funnel
    decoded_sample: dict[str, Any] | None = None  # the sample of crops decoded to check them

    def summary(self) -> ValidationSummary:
        return ValidationSummary(self.passed, list(self.failed), dict(self.counts), self.allow_failures,
                                 self.validated_at)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CurateResult:
    """What the curate flow returns: where the release is, its size, the funnel and the verdict."""

    run_id: str
    release: str  # the published release directory
    records: int  # face records in it
    rejects: int  # reject rows in it
    funnel: list[FunnelRow]
    validation: ValidationSummary | None  # None when quality.enabled is false
    unchanged: bool = False  # every shard was done and the release already held this content

    def stage(self, name: str) -> FunnelRow:
        """The funnel row of one stage (KeyError when the run had no such stage)."""
        for row in self.funnel:
            if row.stage == name:
                return row
        raise KeyError(f"no stage {name!r} in the funnel: {[row.stage for row in self.funnel]}")
