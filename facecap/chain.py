"""The curate chain: which stages run, in which order, and what the driver planned for each.

Adding a stage is one module under facecap/stages/ (a Stage subclass that
declares its settings section, columns, reasons, checks and report section)
and one line in STAGES: the config, the record layout, the quality suites,
the dataset card, the report and the release loop over STAGES (tests add a
stage with `registered`). Before any work the driver asks each stage in turn for
its plan (`plan_run`): on or off (and why) and the identity of its model.
Stages that are off are left out of the chain, and the release says they
were off and why.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa

from facecap.settings import ConfigError
from facecap.stages.annotate import Annotate
from facecap.stages.base import Stage, StagePlan
from facecap.stages.caption import Caption
from facecap.stages.dedup import Dedup
from facecap.stages.detect import Detect
from facecap.stages.exclude import Exclude
from facecap.stages.face_quality import FaceQuality
from facecap.stages.ingest import Ingest
from facecap.stages.text import Text

if TYPE_CHECKING:
    from facecap.config import Config

STAGES: tuple[type[Stage], ...] = (
    Ingest,  # sources -> image records (references to local bytes; downloaded bytes)
    Detect,  # images -> aligned face crops
    FaceQuality,  # crops -> sharpness, head pose, exposure; per-face rules
    Exclude,  # the exclusion list, release-wide only (its pass runs before dedup's)
    Dedup,  # crops -> perceptual hashes; near-duplicate clusters release-wide
    Annotate,  # crops -> 40 CelebA attributes
    Text,  # FLIP-80M path: alt-text filter and cleaning
    Caption,  # attributes -> grammar caption -> LLM rewrite
)
BY_NAME: dict[str, type[Stage]] = {s.name: s for s in STAGES}


@contextmanager
def registered(stage: type[Stage], after: str | None = None) -> Iterator[type[Stage]]:
    """Run with `stage` in the chain (after the stage named `after`, else last), then restore the chain.

    Readers see the change through `facecap.chain.STAGES` / `BY_NAME` and `facecap.config.config_model()`
    (whose model then has the stage's section). The chain is process-wide: Dask workers in other processes do not see
    a stage registered here, so a registered stage runs on a cluster of threads (processes=False).
    """
    global STAGES
    if stage.name in BY_NAME:
        raise ValueError(f"a stage named {stage.name!r} is already registered")
    saved = STAGES
    at = [s.name for s in STAGES].index(after) + 1 if after else len(STAGES)
    STAGES = STAGES[:at] + (stage,) + STAGES[at:]
    BY_NAME[stage.name] = stage  # in place: modules hold BY_NAME from their imports
    try:
        yield stage
    finally:
        STAGES = saved
        del BY_NAME[stage.name]


@dataclass(frozen=True)
class RunPlan:
    stages: dict[str, StagePlan]  # every stage, in STAGES order

    @property
    def chain(self) -> list[type[Stage]]:
        """The stages that run, in order."""
        return [s for s in STAGES if self.stages[s.name].on]

    def model(self, stage: str) -> str | None:
        return self.stages[stage].model

    def summary(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for name, p in self.stages.items():
            entry: dict = {"status": "on" if p.on else "off"}
            if p.model:
                entry["model"] = p.model
            if p.why:
                entry["why"] = p.why
            entry.update(p.info)
            out[name] = entry
        return out


def plan_run(cfg: "Config") -> RunPlan:
    """Plan every stage (fails here, before any work, if a model a stage needs is missing)."""
    check_stage_names(cfg)
    plans: dict[str, StagePlan] = {}
    for stage in STAGES:
        plans[stage.name] = stage.plan(cfg, plans)
    return RunPlan(plans)


def check_stage_names(cfg: "Config") -> None:
    """execution.stage_resources may only name stages that exist (a typo would silently pin nothing)."""
    unknown = sorted(set(cfg.execution.stage_resources) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"execution.stage_resources names unknown stage(s) {unknown}; stages are {list(BY_NAME)}")


def record_fields() -> list[pa.Field]:
    """A face record's columns: what the registered stages add, in chain order (first declaration wins)."""
    fields: dict[str, pa.Field] = {}
    for stage in STAGES:
        for f in stage.output_fields:
            fields.setdefault(f.name, f)
    return list(fields.values())
