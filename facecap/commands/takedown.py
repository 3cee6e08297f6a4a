"""`facecap takedown OUT`: take a person's faces out of the release, and keep them out (docs/takedown.md)."""

from __future__ import annotations

import argparse
import os
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facecap.settings import ConfigError


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "takedown", help="remove a person's faces from the release and add them to the exclusion list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Find a person's face records in OUT's current release, add them to the
            exclusion list, and publish a new release version without them:

              facecap takedown runs/demo --image me.jpg            # by a photo of the person
              facecap takedown runs/demo --url https://x.org/a.jpg # by a source URL
              facecap takedown runs/demo --sample-id ID --dry-run  # show what would go

            --image: the photo's faces are detected (the release's detector) and
            hashed as dedup hashes faces; every release face within dedup.max_distance
            bits matches, and the command prints how close each was. When the
            release's dedup ran with an identity model (dedup.identity, full profile),
            faces whose identity hash is within dedup.identity_max_distance bits of the
            photo's match too: other photos of the same person. --url: records
            downloaded from that URL. --sample-id: that record. Every near-duplicate
            copy of a matched face goes too.

            The exclusion list is the release's exclude.list, else OUT/exclusions.txt.
            Entries added: `face` (each matched face's hash and the photo's), `url`.
            The new release is made by re-running the release's curate (sources and
            config from OUT/release): every shard is cached, the list is applied
            release-wide, and the release is validated and promoted by one rename as
            always. Later curates read the list, so the faces never come back.
            The manifest's `takedowns` table records what was asked (kind and id or
            URL; never the photo or its face hash) and the release versions.
            --dry-run prints what would be removed and changes nothing."""))
    p.add_argument("out", metavar="OUT", help="a curate output folder (its release/ is the current release)")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="a photo of the person (repeatable)")
    p.add_argument("--url", action="append", default=[], metavar="URL", help="a source URL (repeatable)")
    p.add_argument("--sample-id", action="append", default=[], metavar="ID", dest="sample_id",
                   help="a face record's sample_id (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed; change nothing")
    p.set_defaults(handler=run)


@dataclass
class Match:
    sample_id: str
    how: str  # what request matched it, and how closely


@dataclass
class TakedownResult:
    matches: list[Match]
    removed: list[str]  # sample_ids the new release would not hold (matches and their near-duplicate copies)
    entries: list[str]  # exclusion list lines added (or that would be)
    exclusion_list: str
    records_before: int
    records_after: int | None = None
    release_before: str | None = None
    release_after: str | None = None
    status: str = "dry-run"
    left: list[str] = field(default_factory=list)  # removed records still in the new release (a bug if any)
    notes: list[str] = field(default_factory=list)


RELEASE_COLUMNS = ("sample_id", "source_meta", "phash", "phash_mirror", "dedup_cluster")


def _release(out: str) -> tuple[str, dict, Any, pa.Table]:
    from facecap import storage
    from facecap.config import load_config

    rel = os.path.join(out, "release")
    if not os.path.isfile(os.path.join(rel, "release.json")):
        raise ConfigError(f"{out}: no published release (no {rel}/release.json)")
    info = storage.read_json(os.path.join(rel, "release.json"))
    cfg = load_config(os.path.join(rel, "config.yaml"))
    import pyarrow.dataset as ds

    data = ds.dataset(os.path.join(rel, "data"), format="parquet")
    columns = [c for c in RELEASE_COLUMNS if c in data.schema.names]
    return rel, info, cfg, data.to_table(columns=columns)


def photo_faces(path: str, cfg, embedder=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(hashes, mirror hashes, identity hashes or None) of the faces the release's detector finds in the photo,
    as dedup hashes them (identity hashes with `embedder`, the release's identity model)."""
    from facecap.models.registry import load_detector
    from facecap.records import SOURCE_IMAGE
    from facecap.stages.base import Counters
    from facecap.stages.dedup import hash_faces
    from facecap.stages.detect import detect_faces

    with open(path, "rb") as fh:
        data = fh.read()
    rows = pa.Table.from_pylist([{"image_id": "takedown", "source": "takedown", "source_offset": "photo",
                                  SOURCE_IMAGE: data}])
    faces = [c.kept for c in detect_faces([rows], load_detector(cfg), cfg.detect, cfg.image, Counters())
             if c.kept is not None and c.kept.num_rows]
    hashed = []
    if faces:
        table = pa.concat_tables(faces)
        for name in ("source", "source_offset"):
            if name not in table.column_names:
                table = table.append_column(name, pa.array([name] * table.num_rows, pa.string()))
        hashed = [c.kept for c in hash_faces([table], cfg.image, Counters(), embedder) if c.kept is not None]
    h = pa.concat_tables(hashed) if hashed else None

    def column(name: str) -> np.ndarray:
        if h is None:
            return np.zeros(0, np.uint64)
        return h.column(name).to_numpy(zero_copy_only=False).astype(np.uint64)

    return column("phash"), column("phash_mirror"), column("identity_hash") if embedder is not None else None


def release_identity(out: str, info: dict, cfg, sample_ids: pa.ChunkedArray) -> tuple[Any, np.ndarray] | None:
    """(the release's identity model, each release face's identity hash), or None when its dedup ran without one.

    The hashes are never released: they are read from the dedup outputs of the run that made the release.
    """
    import pyarrow.parquet as pq

    from facecap import manifest, storage

    model = ((info.get("stages") or {}).get("dedup") or {}).get("model")
    if not model:
        return None
    from facecap.models.identity import load_identity_model

    embedder = load_identity_model(cfg)
    if embedder.identity != model:
        raise ConfigError(f"the release's faces were embedded by {model}, but dedup.identity_weights now loads "
                          f"{embedder.identity}: their identity hashes cannot be compared; point "
                          "dedup.identity_weights at the release's weights")
    parts = []
    for path in manifest.stage_outputs(os.path.join(out, "manifest.duckdb"), info.get("run_id"), "dedup"):
        fs, local = storage.filesystem(path)
        if fs.exists(local):
            parts.append(pq.read_table(local, columns=["sample_id", "identity_hash"], filesystem=fs))
    found = pa.concat_tables(parts) if parts else pa.table({"sample_id": pa.array([], pa.string()),
                                                            "identity_hash": pa.array([], pa.uint64())})
    where = pc.index_in(sample_ids, value_set=found.column("sample_id"))
    if where.null_count:
        raise ConfigError(f"{where.null_count} of {len(sample_ids)} release faces have no identity hash in the "
                          f"dedup outputs of run {info.get('run_id')} (its cache was removed?): re-run the "
                          "release's curate, then the takedown")
    return embedder, found.column("identity_hash").take(where).to_numpy(zero_copy_only=False).astype(np.uint64)


def find(out: str, images=(), urls=(), sample_ids=()) -> tuple[list[Match], list[str], list, dict, Any, pa.Table]:
    """What the requests match in OUT's release: (matches, removed sample_ids, entries, release.json, config,
    release records)."""
    from facecap.stages.exclude import Entry, face_matches, normalise, record_url

    _, info, cfg, table = _release(out)
    ids = table.column("sample_id").to_pylist()
    have_hash = "phash" in table.column_names
    hashes = table.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64) if have_hash else None
    mirrors = table.column("phash_mirror").to_numpy(zero_copy_only=False).astype(np.uint64) if have_hash else None
    matches: list[Match] = []
    entries: list[Entry] = []
    hit: set[int] = set()
    if sample_ids:
        rows = np.flatnonzero(pc.is_in(table.column("sample_id"), value_set=pa.array(list(sample_ids), pa.string()))
                              .to_numpy(zero_copy_only=False))
        matches += [Match(ids[i], f"sample_id {ids[i]}") for i in rows]
        hit.update(int(i) for i in rows)
    for url in urls:
        entries.append(normalise("url", url, "--url: "))
        # Only rows whose metadata holds the URL's text are parsed (15M JSON parses would take minutes).
        meta = table.column("source_meta")
        maybe = np.flatnonzero(pc.fill_null(pc.match_substring(meta, url), False).to_numpy(zero_copy_only=False))
        rows = [int(i) for i in maybe if record_url(meta[int(i)].as_py()) == url]
        matches += [Match(ids[i], f"url {url}") for i in rows]
        hit.update(rows)
    if images and not have_hash:
        raise ConfigError("the release has no face hashes (dedup was off): a takedown by photo cannot match")
    identity = release_identity(out, info, cfg, table.column("sample_id")) if images else None
    for path in images:
        ph, _, pid = photo_faces(path, cfg, identity[0] if identity else None)
        if not len(ph):
            raise ConfigError(f"--image {path}: the detector finds no face in it")
        for h in ph:
            entries.append(Entry("face", f"{int(h):016x}"))
        how: dict[int, list[str]] = {}
        best, dist = face_matches(hashes, mirrors, ph)
        for i in np.flatnonzero(dist <= cfg.dedup.max_distance):
            how.setdefault(int(i), []).append(f"photo face {int(best[i]) + 1} of {len(ph)}: {int(dist[i])} of 64 "
                                              f"bits (dedup.max_distance={cfg.dedup.max_distance})")
        if identity:  # likely the same person in another photo
            best, dist = face_matches(identity[1], None, pid)
            for i in np.flatnonzero(dist <= cfg.dedup.identity_max_distance):
                how.setdefault(int(i), []).append(
                    f"photo face {int(best[i]) + 1} of {len(ph)}: identity {int(dist[i])} of 64 bits "
                    f"(dedup.identity_max_distance={cfg.dedup.identity_max_distance})")
        for i in sorted(how):
            matches.append(Match(ids[i], "; ".join(how[i])))
            hit.add(i)
    if have_hash:
        entries += [Entry("face", f"{int(hashes[i]):016x}") for i in sorted(hit)]
    removed = set(hit)
    if "dedup_cluster" in table.column_names and hit:  # their near-duplicate copies in the release go too
        clusters = table.column("dedup_cluster").to_pylist()
        taken = {clusters[i] for i in hit}
        removed.update(i for i, c in enumerate(clusters) if c in taken)
    if hit and have_hash:  # and faces near a matched one (the pass carries entries to whole clusters)
        _, dist = face_matches(hashes, mirrors, hashes[sorted(hit)])
        removed.update(int(i) for i in np.flatnonzero(dist <= cfg.dedup.max_distance))
    return matches, sorted(ids[i] for i in removed), entries, info, cfg, table


def takedown(out: str, images=(), urls=(), sample_ids=(), dry_run: bool = False,
             log: Callable[[str], None] = print) -> TakedownResult:
    """Find, add to the exclusion list, publish without them, audit (see the module's command help)."""
    from facecap import manifest, storage
    from facecap.stages.exclude import append_entries, list_path, read_list

    if not (images or urls or sample_ids):
        raise ConfigError("give at least one --image, --url or --sample-id")
    out = storage.absolute(out)
    matches, removed, entries, info, cfg, table = find(out, images, urls, sample_ids)
    path = list_path(cfg, out)
    read_list(path, required=bool(cfg.exclude.list))  # a broken list stops here, before anything changes
    result = TakedownResult(matches, removed, [e.text() for e in entries], path, table.num_rows,
                            release_before=info.get("run_id"))
    for m in matches:
        log(f"match: {m.sample_id} ({m.how})")
    for sid in sample_ids:
        if not any(m.sample_id == sid for m in matches):
            result.notes.append(f"sample_id {sid}: not in the release")
    for url in urls:
        if not any(m.how == f"url {url}" for m in matches):
            result.notes.append(f"url {url}: no record of the release came from it (the entry still keeps it out)")
    for note in result.notes:
        log(note)
    log(f"{len(removed)} of {table.num_rows} face record(s) would leave the release (matches and their "
        f"near-duplicate copies); {len(entries)} exclusion list entr{'y' if len(entries) == 1 else 'ies'} -> {path}")
    if dry_run:
        return result
    requests = ([{"kind": "image"} for _ in images] + [{"kind": "url", "value": u} for u in urls]
                + [{"kind": "sample_id", "value": s} for s in sample_ids])
    added = append_entries(path, entries, f"takedown {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    result.entries = [e.text() for e in added]
    audit = {"requests": requests, "matched": len(removed), "entries_added": len(added), "exclusion_list": path,
             "records_before": table.num_rows, "release_before": info.get("run_id")}
    manifest_path = os.path.join(out, "manifest.duckdb")
    try:
        new = republish(out, info, cfg)
    except Exception as exc:
        manifest.record_takedown(manifest_path, {**audit, "status": "blocked" if "Blocked" in type(exc).__name__
                                                 else "failed", "message": str(exc)[:2000]})
        raise
    result.records_after, result.release_after = new.records, new.run_id
    result.status = "unchanged" if new.unchanged else "published"
    result.left = sorted(set(removed) & set(_release(out)[3].column("sample_id").to_pylist()))
    if result.left:
        result.notes.append(f"{len(result.left)} matched record(s) are still in the release: {result.left[:5]}")
    manifest.record_takedown(manifest_path, {**audit, "records_after": new.records, "release_after": new.run_id,
                                             "status": result.status,
                                             "message": "; ".join(result.notes) or None})
    log(f"release {result.status}: {result.records_before} -> {result.records_after} face records "
        f"(release {result.release_before} -> {result.release_after})")
    return result


def republish(out: str, info: dict, cfg):
    """Re-run the release's curate (its sources and config): shards cached, the list applied release-wide."""
    from facecap.flows.curate import curate, task_runner_for

    sources = info.get("sources") or []
    if not sources:
        raise ConfigError(f"{out}/release/release.json names no sources to re-curate")
    return curate.with_options(task_runner=task_runner_for(cfg))(sources=list(sources), out=out,
                                                                 config=cfg.model_dump(mode="json"))


def run(args: argparse.Namespace) -> int:
    from facecap.prefect_api import prefect_api

    if args.dry_run:
        takedown(args.out, args.image, args.url, args.sample_id, dry_run=True)
        print("dry run: nothing changed")
        return 0
    with prefect_api():
        result = takedown(args.out, args.image, args.url, args.sample_id)
    return 0 if result.status in ("published", "unchanged") and not result.left else 1
