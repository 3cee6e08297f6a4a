"""Exclude: an exclusion list (URLs, domains, sha256 of source bytes, face hashes) applied release-wide.

The list is a text file, one entry per line (docs/takedown.md)::

    # comments and blank lines are ignored
    url https://example.com/photos/me.jpg
    domain example.org            # the host and every subdomain
    sha256 <64 hex>               # sha256 of the source image's bytes
    face <16 hex>                 # dedup's 64-bit pHash of a face (either orientation matches)

It is read at every run, in the release pass only: the stage has no per-shard
work, and neither the list's path nor its content keys any stage output, so a
takedown on a 15M-face release reruns no detection. The content's sha256 goes
into the release's content key, so a changed list publishes a new release.

A face record matches a `url`/`domain` entry by its source URL (URL lists), a
`sha256` entry by the bytes it came from, a `face` entry when its pHash (or
its mirror's) is within `dedup.max_distance` bits. Every face in the
near-duplicate cluster of a matching face is excluded too (clusters as dedup
forms them), so no other copy of that face stays or replaces it as the one
dedup keeps. The exclude pass runs before dedup's, so the copies are rejected
as `excluded`, not as near-duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from pydantic import Field

from facecap.schema import Reason
from facecap.settings import ConfigError, Section
from facecap.stages.base import FACE_REJECT_COLUMNS, ReleasePass, ReportSection, Stage, StagePlan, reject_row
from facecap.stages.base import rejected as reject_table

KINDS = ("url", "domain", "sha256", "face")
DEFAULT_LIST = "exclusions.txt"  # in OUT, when exclude.list is unset


class ExcludeSettings(Section):
    """An exclusion list applied to every release (docs/takedown.md)."""

    list: str | None = Field(
        None, description="Exclusion list file (lines `url URL`, `domain HOST`, `sha256 HEX`, `face HEX`). Unset: "
                          "OUT/exclusions.txt, read when it exists; `facecap takedown` adds to the same file. Read "
                          "at every run; it keys no stage output, only the release.")


class ExcludeReason(Reason):
    EXCLUDED = "excluded"  # matches an entry of the exclusion list, or is a near-duplicate of a face that does


@dataclass(frozen=True)
class Entry:
    kind: str
    value: str
    line: int = 0

    def text(self) -> str:
        return f"{self.kind} {self.value}"

    def shown(self) -> str:
        """The entry as a reject's detail names it: a domain by name, a URL or a hash only by its line (the
        published rejects must not point back at a person's image)."""
        return f"line {self.line} ({self.text()})" if self.kind == "domain" else f"line {self.line} ({self.kind})"


def normalise(kind: str, value: str, where: str = "") -> Entry:
    """One entry, checked; `where` names the line in the error."""
    value = value.strip()
    if kind == "url":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}url entry {value!r} is not an http(s) URL")
    elif kind == "domain":
        value = value.lower().rstrip(".")
        if not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)*", value):
            raise ConfigError(f"{where}domain entry {value!r} is not a host name")
    elif kind == "sha256":
        value = value.lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ConfigError(f"{where}sha256 entry {value!r} is not 64 hex digits")
    elif kind == "face":
        value = value.lower()
        if not re.fullmatch(r"[0-9a-f]{16}", value):
            raise ConfigError(f"{where}face entry {value!r} is not 16 hex digits (a 64-bit face hash)")
    else:
        raise ConfigError(f"{where}unknown entry kind {kind!r}: an entry is one of {', '.join(KINDS)}, then its "
                          "value (docs/takedown.md)")
    return Entry(kind, value)


def parse_list(text: str, path: str = "exclusion list") -> list[Entry]:
    """The entries of an exclusion list's text; a line that is not an entry is an error naming it."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = re.split(r"\s#", line, maxsplit=1)[0].strip()  # a URL's own '#' (a fragment) follows no space
        kind, _, value = line.partition(" ")
        if not value.strip():
            raise ConfigError(f"{path}:{number}: {raw.strip()!r} has no value: a line is `KIND VALUE` with KIND one "
                              f"of {', '.join(KINDS)}")
        e = normalise(kind, value, f"{path}:{number}: ")
        entries.append(Entry(e.kind, e.value, number))
    return entries


def list_path(cfg, out: str | None) -> str | None:
    """The run's exclusion list: exclude.list, else OUT/exclusions.txt (None without an OUT)."""
    if cfg.exclude.list:
        return os.path.abspath(cfg.exclude.list)
    return os.path.join(out, DEFAULT_LIST) if out else None


def read_list(path: str | None, required: bool = False) -> tuple[list[Entry], str]:
    """(entries, sha256 of the file's bytes); a missing default list is empty, a missing configured one an error."""
    if path is None or not os.path.exists(path):
        if required:
            raise ConfigError(f"exclude.list {path}: no such file")
        return [], "none"
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    return parse_list(text, path), hashlib.sha256(data).hexdigest()


def append_entries(path: str, entries: list[Entry], comment: str) -> list[Entry]:
    """Add the entries the list does not hold yet (with a comment line); returns those added."""
    have = {e.text() for e in read_list(path)[0]}
    new = []
    for e in entries:
        if e.text() not in have:
            have.add(e.text())
            new.append(e)
    if new:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"# {comment}\n" + "".join(e.text() + "\n" for e in new))
    return new


def record_url(meta: str | None) -> str | None:
    """The URL a record was downloaded from (URL lists keep it in source_meta)."""
    if not meta:
        return None
    try:
        value = json.loads(meta)
    except ValueError:
        return None
    url = value.get("url") if isinstance(value, dict) else None
    return url if isinstance(url, str) else None


class UrlMatcher:
    """The `url` and `domain` entries of a list, matched against one URL at a time (a domain entry covers the
    host and every subdomain): one set lookup per label of the host, however long the list."""

    def __init__(self, entries: Iterable[Entry]):
        self.urls: dict[str, Entry] = {}
        self.domains: dict[str, Entry] = {}
        for e in entries:
            if e.kind == "url":
                self.urls.setdefault(e.value, e)
            elif e.kind == "domain":
                self.domains.setdefault(e.value, e)

    def __bool__(self) -> bool:
        return bool(self.urls or self.domains)

    def match(self, url: str | None) -> Entry | None:
        if not url or not isinstance(url, str):
            return None
        hit = self.urls.get(url)
        if hit is None and self.domains:
            try:
                host = urlsplit(url).hostname or ""
            except ValueError:
                return None
            labels = host.lower().rstrip(".").split(".")
            hit = next((self.domains[d] for d in (".".join(labels[i:]) for i in range(len(labels)))
                        if d in self.domains), None)
        return hit


_LISTS: dict[tuple[str, float, int], list[Entry]] = {}


def current_url_matcher(path: str | None) -> UrlMatcher:
    """The url/domain entries of the list at `path` as it is now (read again when the file changes), for a
    download to consult before it fetches; an unreadable or missing list matches nothing here (the run's
    plan already refused a broken configured list, and the release pass applies the list again)."""
    if not path:
        return UrlMatcher(())
    try:
        st = os.stat(path)
    except OSError:
        return UrlMatcher(())
    key = (path, st.st_mtime, st.st_size)
    if key not in _LISTS:
        try:
            _LISTS.clear()
            _LISTS[key] = read_list(path)[0]
        except ConfigError:
            return UrlMatcher(())
    return UrlMatcher(_LISTS[key])


def face_matches(hashes: np.ndarray, mirrors: np.ndarray | None, entries: np.ndarray,
                 block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Per face: (index of the closest entry, its distance in bits), either orientation (`mirrors`: the hashes
    of the mirrored faces; None for hashes that have no orientation, such as identity hashes)."""
    from facecap.stages.dedup import hamming

    n = len(hashes)
    best = np.full(n, -1, np.int64)
    dist = np.full(n, 127, np.int8)
    if not len(entries) or not n:
        return best, dist
    for s in range(0, n, block):
        d = hamming(hashes[s:s + block, None], entries[None, :])
        if mirrors is not None:
            d = np.minimum(d, hamming(mirrors[s:s + block, None], entries[None, :]))
        best[s:s + block] = d.argmin(axis=1)
        dist[s:s + block] = d.min(axis=1)
    return best, dist


def anonymous_reject(stage: str, row: dict, detail: str) -> dict:
    """An `excluded` reject as the release publishes it: its ids and why, never where the image is (source,
    offset) nor the face's box or score, since the person asked to be taken out, not to be pointed at."""
    return reject_row(stage, {"image_id": row.get("image_id"), "sample_id": row.get("sample_id")},
                      ExcludeReason.EXCLUDED, detail)


@dataclass
class ExclusionPass(ReleasePass):
    """Release-wide: the faces the exclusion list matches, and every face of their near-duplicate clusters."""

    entries: list[Entry]
    dedup: Any = None  # DedupSettings when dedup is on: face entries and clusters use its hashes and distance
    name: str = "exclude"
    reads: tuple[str, ...] = ("sample_id", "image_id", "source_meta")  # image_id joins ingest's columns
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dedup is not None:
            self.reads = self.reads + ("phash", "phash_mirror")
        if any(e.kind == "sha256" for e in self.entries):
            from facecap.records import SOURCE_IMAGE

            self.reads = self.reads + (SOURCE_IMAGE,)

    def fit_batches(self, tables: Iterable[pa.Table]) -> None:
        by_kind = {k: {e.value: e for e in self.entries if e.kind == k} for k in KINDS}
        by_url = UrlMatcher(self.entries)
        self.via: dict[int, tuple[int, int]] = {}  # face -> (the matching face it was carried from, cluster size)
        entry_of: list[Entry | None] = []
        distance: list[int] = []
        hashes, mirrors = [], []
        for table in tables:
            urls = [record_url(m) for m in table.column("source_meta").to_pylist()]
            digests = [None] * table.num_rows
            if by_kind["sha256"]:
                from facecap.records import SOURCE_IMAGE

                digests = [hashlib.sha256(b).hexdigest() if b else None
                           for b in table.column(SOURCE_IMAGE).to_pylist()]
            for url, digest in zip(urls, digests):
                hit = by_url.match(url)
                if hit is None and digest:
                    hit = by_kind["sha256"].get(digest)
                entry_of.append(hit)
                distance.append(-1)
            if self.dedup is not None:
                hashes.append(table.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64))
                mirrors.append(table.column("phash_mirror").to_numpy(zero_copy_only=False).astype(np.uint64))
        n = len(entry_of)
        faces = [e for e in self.entries if e.kind == "face"]
        carried = 0
        if self.dedup is not None and n:
            h, m = np.concatenate(hashes), np.concatenate(mirrors)
            best, dist = face_matches(h, m, np.array([int(e.value, 16) for e in faces], np.uint64))
            for i in np.flatnonzero((dist <= self.dedup.max_distance) & (best >= 0)):
                if entry_of[i] is None:
                    entry_of[i], distance[i] = faces[int(best[i])], int(dist[i])
            hit = np.array([e is not None for e in entry_of])
            if hit.any():
                carried = self._carry_to_clusters(h, m, hit, entry_of)
        self.hit = np.array([e is not None for e in entry_of], bool)
        self.entry_of, self.distance = entry_of, distance
        lines: dict[str, int] = {}
        for e in entry_of:
            if e is not None:
                lines[e.kind] = lines.get(e.kind, 0) + 1
        self.stats = {"entries": len(self.entries), "entry_kinds": {k: sum(e.kind == k for e in self.entries)
                                                                    for k in KINDS if any(e.kind == k
                                                                                          for e in self.entries)},
                      "faces": n, "excluded": int(self.hit.sum()), "removed": int(self.hit.sum()), "by_kind": lines,
                      "near_duplicates_carried": carried}

    def _carry_to_clusters(self, h: np.ndarray, m: np.ndarray, hit: np.ndarray, entry_of: list) -> int:
        """Every face of a near-duplicate cluster (dedup's pairs, connected) that holds a matched face."""
        from facecap.stages.dedup import components, near_duplicate_pairs

        s = self.dedup
        pairs = near_duplicate_pairs(h, m, s.max_distance, s.lsh_tables, s.lsh_bits, s.max_bucket,
                                     exact_max=s.exact_max_faces)
        labels = components(len(h), [(pairs.left, pairs.right)])
        sizes = np.bincount(labels)
        source: dict[int, int] = {}
        for i in np.flatnonzero(hit):
            source.setdefault(int(labels[i]), int(i))
        carried = 0
        for i in np.flatnonzero(~hit & np.isin(labels, list(source))):
            first = source[int(labels[i])]
            entry_of[i] = entry_of[first]
            self.via[int(i)] = (first, int(sizes[labels[i]]))
            carried += 1
        return carried

    def fit(self, records: pa.Table) -> None:
        self.fit_batches([records])

    def apply(self, index: np.ndarray, table: pa.Table) -> tuple[pa.Table, np.ndarray, pa.Table | None]:
        drop = self.hit[index]
        if not drop.any():
            return table, index, None
        meta = table.filter(pa.array(drop)).select(list(FACE_REJECT_COLUMNS)).to_pylist()
        rejects = []
        for row, g in zip(meta, index[drop]):
            g = int(g)
            entry = self.entry_of[g]
            if g in self.via:
                first, size = self.via[g]
                detail = (f"near-duplicate (cluster of {size} faces, dedup.max_distance={self.dedup.max_distance}) of "
                          f"a face matching exclusion list {entry.shown()}")
            elif entry.kind == "face":
                detail = f"face within {self.distance[g]} of 64 bits of exclusion list {entry.shown()}"
            else:
                detail = f"matches exclusion list {entry.shown()}"
            rejects.append(anonymous_reject("exclude", row, detail))
        return table.filter(pa.array(~drop)), index[~drop], reject_table(rejects)

    def summary(self) -> dict[str, Any]:
        return self.stats

    def outcome(self) -> str | None:
        if not self.entries:
            return None
        return (f"{self.stats.get('excluded', 0):,} of {self.stats.get('faces', 0):,} faces excluded by "
                f"{len(self.entries):,} list entries ({self.stats.get('near_duplicates_carried', 0):,} as "
                "near-duplicates of a matching face)")

    def funnel_row(self) -> dict[str, Any]:
        n, x = self.stats.get("faces", 0), self.stats.get("excluded", 0)
        return {"stage": "exclude (release-wide)", "release_wide": True, "shards": 0, "cached": 0, "failed": 0,
                "rows_in": n, "rows_out": n - x, "rejects": {ExcludeReason.EXCLUDED: x} if x else {}, "extra": {}}


class ExcludeReport(ReportSection):
    """How many faces the exclusion list removed, by kind of entry."""

    def html(self, report) -> str:
        found = (report["release"].get("release_passes") or {}).get(Exclude.name)
        if not found or not found.get("entries"):
            return ""
        kinds = ", ".join(f"{v:,} {k}" for k, v in (found.get("entry_kinds") or {}).items())
        return (f"<h2>Exclusion list</h2><p>{found['entries']:,} entries ({kinds}): <b>{found.get('excluded', 0):,} "
                f"faces excluded</b>, {found.get('near_duplicates_carried', 0):,} of them as near-duplicates of a "
                "matching face.</p>")


class Exclude(Stage):
    """No per-shard work: the exclusion list is applied by a release pass, before dedup's."""

    name = "exclude"
    version = "1"
    shard_work = False
    section, settings_model, section_after = "exclude", ExcludeSettings, "deploy"
    reasons = ExcludeReason

    @classmethod
    def plan(cls, cfg, planned=None) -> StagePlan:
        info: dict[str, Any] = {"list": cfg.exclude.list or f"OUT/{DEFAULT_LIST}"}
        if cfg.exclude.list:  # a broken or missing configured list stops the run before any work
            info["entries"] = len(read_list(list_path(cfg, None), required=True)[0])
        return StagePlan(True, info=info)

    @classmethod
    def release_key(cls, cfg, out: str | None) -> str | None:
        digest = read_list(list_path(cfg, out), required=bool(cfg.exclude.list))[1]
        return None if digest == "none" else digest  # no list: the release key is what it was without one

    @classmethod
    def card_notes(cls, info: dict) -> dict[str, str]:
        found = (info.get("release_passes") or {}).get(cls.name) or {}
        if not found.get("entries"):
            return {}
        return {"ethics": f" An exclusion list of {found['entries']:,} entries (opt-outs and takedowns) removed "
                          f"{found.get('excluded', 0):,} faces, with every near-duplicate copy of them."}

    def release_pass(self, published: str | None = None) -> ExclusionPass | None:
        entries, _ = read_list(list_path(self.cfg, self.out), required=bool(self.cfg.exclude.list))
        if not entries:
            return None
        return ExclusionPass(entries, self.cfg.dedup if self.cfg.dedup.enabled else None)


Exclude.report = ExcludeReport()
