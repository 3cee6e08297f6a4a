"""The release as DuckDB sees it: views over its Parquet files, its release.json and its config.

Everything the suites and the report compute goes through one in-memory
DuckDB connection whose views read the Parquet files directly, so a
15M-row release is scanned, never loaded.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import duckdb

from facecap.settings import ConfigError
from facecap.config import Config, load_config
from facecap.quality.primitives import data_files


@dataclass
class ReleaseDB:
    path: str
    con: duckdb.DuckDBPyConnection
    info: dict[str, Any]  # release.json
    cfg: Config
    columns: list[str] = field(default_factory=list)
    has_rejects: bool = False
    has_data: bool = True  # False when the release has no data files (every record was rejected)
    spill_dir: str | None = None

    def stage(self, name: str) -> dict:
        """release.json's entry for a stage ({} when the release predates stage records)."""
        return (self.info.get("stages") or {}).get(name) or {}

    def stage_off_reason(self, name: str | None) -> str | None:
        """Why a stage was off (None if it was on)."""
        if name is None:
            return None
        entry = self.stage(name)
        if entry.get("status") == "off":
            return entry.get("why") or "off"
        return None

    def scalar(self, sql: str, params: list | None = None) -> Any:
        return self.con.execute(sql, params or []).fetchone()[0]

    def close(self) -> None:
        self.con.close()
        if self.spill_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def _sql_list(paths: list[str]) -> str:
    # Views cannot take prepared parameters: quote the paths as SQL literals.
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"





def open_release(release_dir: str, overrides: list[str] | None = None, threads: int | None = None,
                 memory_limit: str = "2GB") -> ReleaseDB:
    """Open RELEASE_DIR for checks; a missing or malformed release is a ConfigError saying what is wrong."""
    release_dir = os.path.abspath(release_dir)
    info_path = os.path.join(release_dir, "release.json")
    if not os.path.isfile(info_path):
        raise ConfigError(f"{release_dir} is not a FaceCap release: it has no release.json "
                          "(give the release folder, e.g. OUT/release, or a staged one under OUT/staging/)")
    try:
        with open(info_path) as fh:
            info = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{info_path} is not valid JSON: {exc}") from exc
    config_path = os.path.join(release_dir, "config.yaml")
    # The thresholds the stages used: the release's own config, then any --set.
    cfg = load_config(config_path if os.path.isfile(config_path) else None, overrides)

    # Under 4 GB for the whole process at 15M rows: DuckDB spills its hash tables (distinct ids) to a
    # temporary folder of its own, removed on close, instead of the current directory.
    spill = tempfile.mkdtemp(prefix="facecap-validate-")
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute(f"SET temp_directory = '{spill}'")
        con.execute("SET preserve_insertion_order = false")  # aggregates only: lets DuckDB stream
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        files = data_files(release_dir)
        if files:
            # _split: the split a row was published in, from its file name (data/<split>-NNNNN.parquet).
            source = (f"(SELECT * EXCLUDE (filename), regexp_extract(filename, '(train|test)-[0-9]+[.]parquet$', 1) "
                      f"AS _split FROM read_parquet({_sql_list(files)}, union_by_name = true, filename = true))")
            con.execute(f"CREATE VIEW faces AS SELECT * FROM {source}")
            types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE faces)").fetchall())
            if types.get("image", "").startswith("STRUCT"):
                # The checks hash and measure the JPEG, not the {bytes, path} struct datasets reads.
                con.execute(f"CREATE OR REPLACE VIEW faces AS SELECT * REPLACE (image.bytes AS image) FROM {source}")
        else:
            con.execute("CREATE VIEW faces AS SELECT NULL::VARCHAR AS sample_id WHERE false")
        reject_files = sorted(glob.glob(os.path.join(release_dir, "rejects", "*.parquet")))
        if reject_files:
            con.execute(f"CREATE VIEW rejects AS SELECT * FROM read_parquet({_sql_list(reject_files)}, "
                        "union_by_name = true)")
        columns = [row[0] for row in con.execute("DESCRIBE faces").fetchall() if row[0] != "_split"]
    except BaseException as exc:
        # Nobody else holds the connection yet: left open it would outlive the error (in its traceback,
        # until interpreter exit) together with the spill folder.
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
        if isinstance(exc, duckdb.Error):
            raise ConfigError(f"{release_dir}: its Parquet files cannot be read: {exc}") from exc
        raise
    return ReleaseDB(release_dir, con, info, cfg, columns, bool(reject_files), bool(files), spill)
