"""What every stage shares: the Stage class, its plan, and the (kept, rejected) chunks it yields.

A stage is one class: its name and version, the config sections that key its
outputs, the model it needs and how it plans itself on or off, its Dask
placement and retries, and ``process(records) -> chunks of kept + rejects``.
It also declares what it owns, which the config, the record layout, the
quality suites, the dataset card and the report read from every registered
stage (facecap.chain): its settings section, the columns it adds, its reject
reasons, what its columns mean, its quality checks and its report section.
It knows nothing of Prefect, Dask or storage: the generic shard runner
(facecap.runner) feeds it the columns it reads and writes what it yields, so
a stage can be unit-tested and benchmarked on in-memory tables. Nor does it
know how outputs are read back: the runner builds the view of its `reads`.

A stage's output holds only the columns it adds, keyed by ``sample_id`` (or
``image_id`` for ingest); readers join the outputs of a shard's chain
(facecap.records).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator

import pyarrow as pa
from pydantic import BaseModel

from facecap.settings import settings_hash
from facecap.schema import reject_rows
from facecap.shards import ShardInput, ShardStats

if TYPE_CHECKING:
    import numpy as np

    from facecap.config import Config
    from facecap.quality.primitives import Check
    from facecap.quality.release_db import ReleaseDB
    from facecap.sources.batch import Batch


@dataclass
class Chunk:
    """Part of a stage's output: records that go on, and records rejected with a reason."""

    kept: pa.Table | None = None
    rejected: pa.Table | None = None


@dataclass
class Counters:
    """What a stage saw and did to one shard; written next to the shard and into the manifest."""

    rows_in: int = 0
    rows_out: int = 0
    rejects: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)  # stage-specific counts (e.g. faces found)

    def add_rejects(self, table: pa.Table | None) -> None:
        if table is not None and table.num_rows:
            self.rejects.update(table.column("reason").to_pylist())

    def count(self, chunk: Chunk) -> Chunk:
        """Count a chunk's kept rows and rejects; returns it (stages yield ``counters.count(chunk)``)."""
        self.rows_out += chunk.kept.num_rows if chunk.kept is not None else 0
        self.add_rejects(chunk.rejected)
        return chunk

    def count_batch(self, batch: "Batch") -> Chunk:
        """A batch of image records read from a source as a chunk, counted with what reading it counted."""
        self.rows_in += batch.rows_in
        self.extra.update(batch.extra)
        return self.count(Chunk(kept=batch.kept, rejected=batch.rejected))


def rejected(rows: list[dict]) -> pa.Table | None:
    return reject_rows(rows) if rows else None


# How the LLM endpoint is reached, not what it answers: stages that call it leave these out of their key
# (the model identity, temperature and prompts stay in), so moving the server re-runs nothing.
LLM_TRANSPORT = frozenset({"llm.endpoint", "llm.api_key_env", "llm.concurrency", "llm.timeout_s", "llm.retries",
                           "llm.backoff_s", "llm.max_backoff_s", "llm.cache_dir"})


@dataclass(frozen=True)
class StagePlan:
    """What the driver decided for one stage before any work."""

    on: bool
    model: str | None = None  # identity (name + weights hash): part of the stage key and of every record
    why: str | None = None  # why the stage is off
    info: dict = field(default_factory=dict)  # settings worth showing in the release (thresholds, files)


class Stage:
    """One step of the curate chain. Subclasses set the class attributes and implement `process`.

    The runner makes one instance per worker process and configuration, calls
    `load` once before the first shard that needs work (never for a shard
    whose output is cached), then `process` per shard.
    """

    name: ClassVar[str]
    version: ClassVar[str]  # bump when the code changes what the stage writes: old outputs are recomputed
    key_column: ClassVar[str] = "sample_id"  # what a row of the output is keyed by
    reads: ClassVar[tuple[str, ...]] = ()  # upstream columns `process` needs
    # Config sections whose settings key the outputs. Every field is in the key
    # unless listed in `unkeyed` ("section.field"): a new setting is keyed by
    # default, so it can never silently reuse outputs made without it.
    keyed_sections: ClassVar[tuple[str, ...]] = ()
    unkeyed: ClassVar[frozenset[str]] = frozenset()
    # Placement: later stages get higher Dask priority, so a ready downstream task runs before
    # more upstream work and shards reach the release early.
    priority: ClassVar[int] = 0
    device_section: ClassVar[str | None] = None  # config section whose `device: cuda` asks for a GPU=1 worker
    io_bound: ClassVar[bool] = False  # waits on the network, not the CPU: never holds a CPU slot
    retries: ClassVar[int] = 0
    retry_delay_seconds: ClassVar[tuple[float, ...]] = ()
    batch_rows: ClassVar[int] = 64  # records per batch read from upstream
    unreleased: ClassVar[tuple[str, ...]] = ()  # columns kept in the stage output but never published
    # False: the stage has only a release pass (no shard outputs, so nothing cached to recompute when it changes).
    shard_work: ClassVar[bool] = True

    # What the stage owns. Config, the record layout, the dataset card, the quality suites, the report and
    # the release loop over the registered stages (facecap.chain) and read these; none of them names a stage.
    section: ClassVar[str | None] = None  # its config section (YAML key, --set section.key=value)
    settings_model: ClassVar[type[BaseModel] | None] = None  # that section's settings (a config.Section)
    section_after: ClassVar[str | None] = None  # the section it follows in config files and `facecap config`
    output_fields: ClassVar[tuple[pa.Field, ...]] = ()  # the columns it adds to a face record
    reasons: ClassVar[type | None] = None  # its reject reasons: a class of stable string constants
    column_docs: ClassVar[dict[str, str]] = {}  # what each of its columns means, for the dataset card
    suite: ClassVar[str | None] = None  # its quality suite: checks not applicable while the stage is off
    report: ClassVar["ReportSection | None"] = None  # its figures in the release report
    model_in_release: ClassVar[str | None] = None  # a release.json key naming its model identity
    # Columns and per-row values (derived_columns, the report's) so wide that the aggregates over them run in a
    # DuckDB scan of their own: measured on 15M rows, narrow scans per group beat one wide scan by 2x.
    own_scan: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def resolve_settings(cls, cfg: "Config") -> None:
        """Fill settings whose default depends on the profile, when the config is built."""

    @classmethod
    def quality_checks(cls, cfg: "Config") -> list["Check"]:
        """The release checks on its columns (suite `suite`), with bounds from `cfg`."""
        return []

    @classmethod
    def derived_columns(cls, columns: list[str]) -> dict[str, str]:
        """Per-row SQL values its checks share, computed once per row (name -> expression)."""
        return {}

    @classmethod
    def card_notes(cls, info: dict[str, Any]) -> dict[str, str]:
        """Sentences for the dataset card, by place: "warning" (under the verdict), "split" (how splits are
        kept apart) and "ethics" (what was used and never released); from release.json (`info`)."""
        return {}

    def __init__(self, cfg: "Config", plan: StagePlan | None = None, out: str | None = None):
        self.cfg = cfg
        self.stage_plan = plan or StagePlan(True)
        self.out = out

    # -- planning (driver) ----------------------------------------------------
    @classmethod
    def plan(cls, cfg: "Config", planned: dict[str, StagePlan] | None = None) -> StagePlan:
        """On or off (and why) and the model identity; raise ConfigError to stop the run before any work.

        `planned` holds the stages planned before this one: a stage that needs
        another's output is off when that one is off.
        """
        return StagePlan(True)

    @classmethod
    def settings(cls, cfg: "Config") -> dict[str, Any]:
        """The settings that key this stage's outputs (hashed the same way for every stage)."""
        out = {}
        for section in cls.keyed_sections:
            skip = {f.split(".", 1)[1] for f in cls.unkeyed if f.split(".", 1)[0] == section}
            out[section] = getattr(cfg, section).model_dump(mode="json", exclude=skip)
        return out

    @classmethod
    def settings_hash(cls, cfg: "Config") -> str:
        return settings_hash(cls.settings(cfg))

    # -- work (worker) --------------------------------------------------------
    def load(self) -> None:
        """Load the model (once per worker process); check it is the one the driver planned."""

    def schema(self) -> pa.Schema:
        """The columns this stage writes: its key column(s) and what it adds."""
        raise NotImplementedError

    def source_records(self, shard: ShardInput, previous: ShardStats | None = None) -> Iterable | None:
        """What `process` reads when the stage reads the shard's source itself (ingest), not upstream
        outputs. None (every other stage): the runner gives it the columns in `reads` from the shard's
        chain so far, `batch_rows` at a time."""
        return None

    def another_pass(self, cached: ShardStats, shard: ShardInput) -> bool:
        """Whether a finished shard gets a next generation (built on `cached`) instead of being reused."""
        return False

    def process(self, records: Iterable[pa.Table], counters: Counters) -> Iterator[Chunk]:
        """Records in (the columns in `reads`), chunks of kept rows and rejects out, in input order."""
        raise NotImplementedError

    @classmethod
    def release_key(cls, cfg: "Config", out: str | None) -> str | None:
        """What its release pass reads beyond shard outputs and settings (e.g. a file's hash), for the release's
        content key: a change publishes a new release without recomputing any shard. None: nothing."""
        return None

    def release_pass(self, published: str | None = None) -> ReleasePass | None:
        """Release-wide work this stage needs once all shards are done (None: none). `published`: the folder of
        the release this run will replace (it may not exist), for work that must stay stable across releases."""
        return None

    def check_loaded(self, what: str, loaded: str) -> None:
        """A worker must run the model the driver planned (and keyed the outputs by)."""
        if loaded != self.stage_plan.model:
            raise RuntimeError(f"worker loaded {what} {loaded}, the run planned {self.stage_plan.model}: the files "
                               "differ between the driver and this worker")


class ReleasePass:
    """Release-wide work of a stage: run by the driver once every shard is done, before the release is written.

    `fit` sees the `reads` columns of every face record, in release order
    (shards in order, rows in order); `apply` then gets the release's record
    tables in the same order, with each row's position in it, and returns the
    rows kept (with any columns the pass adds), their positions, and the rows
    it rejects. A boolean ``_test`` column, when the pass adds one, decides
    each row's split instead of its image_id.
    """

    name: str = ""
    reads: tuple[str, ...] = ()
    split_by: str | None = None  # how the pass's _test column groups faces, for release.json

    def fit(self, records: pa.Table) -> None:
        raise NotImplementedError

    def fit_batches(self, tables: Iterable[pa.Table]) -> None:
        """`fit` over the release's records given batch by batch; a pass that reads wide columns (image bytes)
        overrides it to reduce each batch before the next is read."""
        tables = list(tables)
        self.fit(pa.concat_tables(tables) if tables else None)

    def apply(self, index: "np.ndarray", table: pa.Table) -> tuple[pa.Table, "np.ndarray", pa.Table | None]:
        raise NotImplementedError

    def write_gallery(self, folder: str) -> None:
        """Files for the report, written into the staged release's report folder."""

    def summary(self) -> dict[str, Any]:
        """What the pass found, for release.json and the report."""
        return {}

    def funnel_row(self) -> dict[str, Any]:
        """The pass as a row of the release's funnel (rows in and out, rejects by reason)."""
        return {}

    def outcome(self) -> str | None:
        """One line on what the pass did, for the run's log (None: nothing worth saying)."""
        return None


class ReportSection:
    """A stage's part of the release report (facecap.quality.report): figures computed in the checks' one
    DuckDB scan, then rendered. Figures go into report.json under the keys `figures` returns."""

    def aggregates(self, db: "ReleaseDB") -> tuple[dict[str, str], dict[str, str]]:
        """SQL aggregates over the release's `faces` view (name -> expression) and the per-row values they need."""
        return {}, {}

    def figures(self, db: "ReleaseDB", agg: dict[str, Any]) -> dict[str, Any]:
        """Its figures from the scan's aggregates (`agg`; rows: agg["n_rows"])."""
        return {}

    def headline(self, fig: dict[str, Any]) -> dict[str, Any]:
        """Its lines in the report's headline table."""
        return {}

    def html(self, report: dict[str, Any]) -> str:
        """Its part of index.html (figures: report["figures"], release.json: report["release"])."""
        return ""

    def gallery_columns(self, db: "ReleaseDB") -> dict[str, str]:
        """What the gallery's sample faces show of it: field of a gallery record -> release column to read."""
        return {}

    def gallery_html(self, face: dict[str, Any]) -> str:
        """Its part of a sample face's card (HTML), from the gallery record's fields."""
        return ""


def reject_row(stage: str, row: dict, reason: str, detail: str) -> dict:
    """A reject of one face record, carrying what identifies it in its source."""
    return {"stage": stage, "reason": reason, "detail": detail, "image_id": row.get("image_id"),
            "sample_id": row.get("sample_id"), "source": row.get("source") or "",
            "source_offset": row.get("source_offset"), "det_score": row.get("det_score"), "bbox": row.get("bbox")}


FACE_REJECT_COLUMNS = ("image_id", "sample_id", "source", "source_offset", "det_score", "bbox")
