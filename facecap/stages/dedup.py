"""Dedup: near-duplicate faces (resized, re-encoded, re-cropped or mirrored copies of one photo), found release-wide.

Per shard, the stage hashes every face's inner face and its mirror image with
a 64-bit perceptual hash (pHash: the signs of the 8x8 lowest frequencies of a
32x32 DCT against their median, bit for bit what ``imagehash.phash`` gives of
the thumbnail). The inner face is normalised by the five landmarks: a
similarity transform maps them onto a fixed mirror-symmetric template and the
hash sees only a region inside the face (brows to chin, cheek to cheek), never
the black padding of a crop cut at the image edge, the background or the
crop's scale, which the whole crop's pHash saw (docs/stages.md has the
measurement). Hashing is cheap and needs no model, so the stage is on in every
profile.

Clusters are formed once all shards are done, over the whole release
(:class:`NearDuplicates`, run by the driver before the release is written):

1. Candidate pairs: up to ``dedup.exact_max_faces`` faces, all pairs
   (exact). Above, banded LSH: each of ``dedup.lsh_tables`` tables keys a
   face by ``dedup.lsh_bits`` fixed, randomly chosen bits of its hash, and
   faces (or a face and another's mirror hash) that share a key in some table
   are candidates. Sorting keys, never an all-pairs join.
2. A candidate is a near-duplicate when the Hamming distance of the hashes
   (either orientation) is at most ``dedup.max_distance``.
3. A cluster is a set of faces linked by such pairs (connected components),
   so copies that each differ a little from the next stay together. Its
   faces are ranked best first: highest ``det_score``, then larger crop,
   then ``sample_id``, and the first is kept. Pairs, and so clusters, depend
   only on the set of hashes, never on the order shards finished.

With ``dedup.keep=best`` the other faces of a cluster are rejects
``near_duplicate`` naming the kept face; with ``all`` every face stays and
the clusters are only recorded (``dedup_cluster``, ``dedup_cluster_size``).

Splits: the release assigns train/test per group of faces linked by a
cluster or by a shared source image, so no cluster and no image straddles
the split; groups fill test in the order of their leader's hash up to
``quality.test_fraction`` of the released faces (``assign_split``). With
``dedup.identity`` on (full profile, FaceNet VGGFace2
weights), faces whose identity embeddings are close are linked too, for the
split only: identities are never written to the release.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pydantic import Field

from facecap.settings import ImageLimits, Section
from facecap.schema import Reason, image_bytes, keyed_schema
from facecap.stages.base import (FACE_REJECT_COLUMNS, Chunk, Counters, ReleasePass, ReportSection, Stage, StagePlan,
                                 reject_row)
from facecap.stages.base import rejected as reject_table
from facecap.sources.images import decode_rgb


class DedupSettings(Section):
    """Near-duplicate faces: perceptual hashes per face, clusters over the whole release, leak-free splits."""

    enabled: bool = Field(True, description="Hash every face crop and cluster near-duplicates release-wide.")
    keep: Literal["best", "all"] = Field(
        "best", description="best: keep one face per cluster (highest det_score, then larger crop, then sample_id); "
                            "the others are near_duplicate rejects. all: keep every face, record the clusters.")
    max_distance: int = Field(
        8, ge=0, le=32, description="Faces whose 64-bit pHashes (either orientation) differ in at most this many "
                                    "bits are near-duplicates (why 8: README, 'Near-duplicates and leak-free splits').")
    exact_max_faces: int = Field(
        20_000, ge=0, description="Releases with at most this many faces compare all pairs (exact, ~3 s at 20,000 "
                                  "on 2 cores); larger ones find candidate pairs by LSH (recall: bench/README.md).")
    lsh_tables: int = Field(20, ge=1, le=200, description="LSH tables: more find more of the pairs near "
                                                          "max_distance, at proportional cost.")
    lsh_bits: int = Field(24, ge=8, le=32, description="Hash bits one LSH table keys on: fewer find more pairs but "
                                                       "verify quadratically more candidates.")
    max_bucket: int = Field(2000, ge=2, description="Faces paired within one LSH bucket at most (bounds the work "
                                                    "on degenerate hashes such as blank crops).")
    identity: Literal["auto", "on", "off"] = Field(
        "auto", description="Group faces of one person for the split (never released): FaceNet VGGFace2 "
                            "embeddings. auto: on in the full profile (weights fetched), off offline.")
    identity_weights: str | None = Field(
        None, description="FaceNet VGGFace2 state dict (20180402-114759-vggface2.pt); unset: models.cache_dir.")
    identity_max_distance: int = Field(
        12, ge=0, le=64, description="Faces whose 64-bit identity hashes (random projections of the embedding) "
                                     "differ in at most this many bits share a split. Uncalibrated: see README.")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where the identity model runs.")
    gallery_clusters: int = Field(8, ge=0, description="Largest clusters shown in the report.")


class DedupReason(Reason):
    NEAR_DUPLICATE = "near_duplicate"  # within dedup.max_distance of a better face kept for its cluster

HASH_BITS = 64
_HASH_SIDE = 8  # 8x8 lowest DCT frequencies -> 64 bits
_HASH_INPUT = 32  # the crop is hashed at 32x32 grey (as imagehash.phash)


def _dct_rows(n_out: int, n_in: int) -> np.ndarray:
    """Rows 0..n_out-1 of the unnormalised DCT-II (scipy.fftpack.dct's scaling), as a matrix."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * n_in))


_DCT = _dct_rows(_HASH_SIDE, _HASH_INPUT)


def grey_thumbnail(rgb: np.ndarray) -> np.ndarray:
    """The 32x32 grey image pHash is computed on (PIL's L conversion and Lanczos resize, as imagehash)."""
    grey = Image.fromarray(rgb).convert("L").resize((_HASH_INPUT, _HASH_INPUT), Image.Resampling.LANCZOS)
    return np.asarray(grey, dtype=np.float64)


def phash(thumbs: np.ndarray) -> np.ndarray:
    """64-bit pHashes (uint64, first bit most significant) of grey thumbnails [n, 32, 32]."""
    low = np.einsum("ki,nij,lj->nkl", _DCT, thumbs, _DCT).reshape(len(thumbs), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).reshape(-1)


# Five-point face template (eyes, nose tip, mouth corners) in a 112 x 112 frame: ArcFace's, made mirror-symmetric
# about x = 56 so that the canonical face of a mirrored photo is the mirror image of the original's.
FACE_TEMPLATE = np.array([[38.3, 51.6], [73.7, 51.6], [56.0, 71.7], [41.5, 92.3], [70.5, 92.3]])
# The hashed region of that frame: brows to chin, cheek to cheek. It lies inside the face, so neither the padding
# of a crop cut at the image edge nor the background and hair that a re-crop or a rescale changes enter the hash.
FACE_REGION = (18.0, 30.0, 94.0, 106.0)
_CANONICAL_PX = 128  # the region is warped to this many pixels, then reduced to 32x32 with Lanczos as pHash


def crop_landmarks(landmarks: Iterable[float], crop_box: Iterable[float], align_angle: float,
                   crop_px: int) -> np.ndarray:
    """The five landmarks (source pixels) in the aligned crop's pixels [5, 2].

    detect cuts the crop about the centre of `crop_box`, rotated by
    `align_angle` and not resized (`crop_px` = its side), so this inverts
    that map: crop = R(-angle) (source - centre) + side / 2.
    """
    x1, y1, x2, y2 = (float(v) for v in crop_box)
    a = np.radians(float(align_angle))
    cos, sin = np.cos(a), np.sin(a)
    p = np.asarray(list(landmarks), np.float64).reshape(5, 2) - [(x1 + x2) / 2.0, (y1 + y2) / 2.0]
    return np.stack([cos * p[:, 0] + sin * p[:, 1], -sin * p[:, 0] + cos * p[:, 1]], axis=1) + crop_px / 2.0


def face_thumbnail(rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
    """32x32 grey thumbnail of the inner face, normalised by its landmarks (`points`, crop pixels [5, 2]).

    A similarity transform (least squares over the five points) maps the face
    template onto the crop; the template's FACE_REGION is sampled from it. Two
    copies of one photo, whatever their crop, scale, rotation or padding, give
    the same thumbnail up to landmark noise and resampling.
    """
    img = Image.fromarray(rgb)
    points = np.asarray(points, np.float64).reshape(5, 2)
    a, b, tx, ty = _similarity(points)
    scale = float(np.hypot(a, b))  # crop pixels per canonical pixel
    if scale > _MAX_SAMPLING:
        # Bicubic sampling of a much larger face would alias: reduce it with Lanczos first, as a rescale would.
        shrink = _MAX_SAMPLING / scale
        size = (max(1, round(img.width * shrink)), max(1, round(img.height * shrink)))
        points = points * [size[0] / img.width, size[1] / img.height]
        img = img.resize(size, Image.Resampling.LANCZOS)
        a, b, tx, ty = _similarity(points)
    face = img.transform((_CANONICAL_PX, _CANONICAL_PX), Image.AFFINE, (a, -b, tx, b, a, ty),
                         resample=Image.BICUBIC)
    return grey_thumbnail(np.asarray(face))


_MAX_SAMPLING = 1.5  # crop pixels per canonical pixel above which the crop is reduced before the warp


def _similarity(points: np.ndarray) -> tuple[float, float, float, float]:
    """(a, b, tx, ty) of the least-squares similarity taking the template's region frame onto `points`:
    crop point = [[a, -b], [b, a]] @ canonical point + (tx, ty)."""
    x0, y0, x1, y1 = FACE_REGION
    dst = (FACE_TEMPLATE - [x0, y0]) * (_CANONICAL_PX / (x1 - x0))
    u, v = dst[:, 0], dst[:, 1]
    rows = np.zeros((10, 4))
    rows[0::2] = np.stack([u, -v, np.ones(5), np.zeros(5)], axis=1)
    rows[1::2] = np.stack([v, u, np.zeros(5), np.ones(5)], axis=1)
    a, b, tx, ty = np.linalg.lstsq(rows, points.reshape(-1), rcond=None)[0]
    return float(a), float(b), float(tx), float(ty)


def face_hashes(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hash, hash of the mirror image) per thumbnail: a mirrored copy matches the other's mirror hash."""
    return phash(thumbs), phash(thumbs[:, :, ::-1])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int8)


# --- release-wide clustering --------------------------------------------------------------------

def lsh_masks(tables: int, bits: int, seed: int = 0) -> np.ndarray:
    """The bit positions each LSH table keys on: `tables` random, fixed sets of `bits` positions."""
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(HASH_BITS, size=bits, replace=False)) for _ in range(tables)])


@dataclass(frozen=True)
class Pairs:
    """Near-duplicate pairs: face indices (left < right), their distance and whether it is mirrored."""

    left: np.ndarray
    right: np.ndarray
    distance: np.ndarray
    mirrored: np.ndarray
    candidates: int = 0  # candidate pairs verified (the LSH's work)
    oversized_buckets: int = 0  # buckets cut to `max_bucket` (degenerate hashes such as blank crops)


def face_distance(hashes: np.ndarray, mirrors: np.ndarray, left: np.ndarray,
                  right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance, mirrored) of face pairs: the fewest differing bits, directly or with one face mirrored."""
    direct = hamming(hashes[left], hashes[right])
    mirrored = np.minimum(hamming(hashes[left], mirrors[right]), hamming(mirrors[left], hashes[right]))
    return np.minimum(direct, mirrored), mirrored < direct


def exact_pairs(hashes: np.ndarray, mirrors: np.ndarray, max_distance: int, block: int = 1024) -> Pairs:
    """Every pair within `max_distance`, by comparing all pairs (block by block): for releases small enough."""
    n = len(hashes)
    lefts, rights = [], []
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        h, m = hashes[rows, None], mirrors[rows, None]
        rest_h, rest_m = hashes[None, start:], mirrors[None, start:]
        d = np.minimum(np.minimum(hamming(h, rest_h), hamming(h, rest_m)), hamming(m, rest_h))
        i, j = np.nonzero(d <= max_distance)
        j = j + start
        upper = rows[i] < j
        lefts.append(rows[i][upper])
        rights.append(j[upper])
    left = np.concatenate(lefts + [np.zeros(0, np.int64)]).astype(np.int64)
    right = np.concatenate(rights + [np.zeros(0, np.int64)]).astype(np.int64)
    distance, mirrored = face_distance(hashes, mirrors, left, right)
    return Pairs(left, right, distance, mirrored, n * (n - 1) // 2, 0)


def near_duplicate_pairs(hashes: np.ndarray, mirrors: np.ndarray, max_distance: int, tables: int = 20,
                         bits: int = 24, max_bucket: int = 2000, seed: int = 0, exact_max: int = 0) -> Pairs:
    """Every pair the LSH tables make candidates whose hashes are within `max_distance` (either orientation);
    with at most `exact_max` faces, every pair within it (all pairs compared).

    Rows are each face's hash and its mirror hash; within a table, rows are
    sorted by key and each run of equal keys yields its pairs. A pair is
    found when some table's bits agree on both (exactly, for distance 0).
    Only the first `max_bucket` rows of a longer run (thousands of equal
    keys: blank or constant crops) are paired in that table, which bounds the
    work; such runs are counted in `oversized_buckets`.
    """
    n = len(hashes)
    if n <= exact_max:
        return exact_pairs(hashes, mirrors, max_distance)
    return _lsh_pairs(hashes, mirrors, max_distance, tables, bits, max_bucket, seed)


def _byte_tables(positions: np.ndarray) -> np.ndarray:
    """Per little-endian byte of a hash: a 256-entry table giving that byte's bits' share of the table key."""
    tables = np.zeros((8, 256), np.uint64)
    values = np.arange(256, dtype=np.uint64)
    for out_bit, pos in enumerate(positions):
        byte, shift = divmod(HASH_BITS - 1 - int(pos), 8)  # counted from the least significant bit
        tables[byte] |= ((values >> np.uint64(shift)) & np.uint64(1)) << np.uint64(out_bit)
    return tables


def _word_tables(positions: np.ndarray, shift: int) -> list[np.ndarray]:
    """Per little-endian 16-bit word of a hash: a 65,536-entry table giving its share of (key << shift).

    Four lookups build a table's key for a hash, instead of one pass per sampled bit.
    """
    byte = _byte_tables(positions)
    words = np.arange(65536, dtype=np.uint64)
    lo, hi = (words & np.uint64(255)).astype(np.intp), (words >> np.uint64(8)).astype(np.intp)
    return [(byte[2 * w][lo] | byte[2 * w + 1][hi]) << np.uint64(shift) for w in range(4)]


_BLOCK = 1 << 20  # sorted rows handled at once: bounds the temporaries (and their page faults) at 15M faces


def _lsh_pairs(hashes: np.ndarray, mirrors: np.ndarray, max_distance: int, tables: int, bits: int, max_bucket: int,
               seed: int) -> Pairs:
    n = len(hashes)
    m = 2 * n  # rows: every face's hash, then every face's mirror hash (row r belongs to face r % n)
    rows = np.concatenate([hashes, mirrors]).astype("<u8")
    words = np.ascontiguousarray(rows.view(np.uint16).reshape(-1, 4).T)
    index_bits = max(1, int(m - 1).bit_length())
    if bits + index_bits > 64:
        raise ValueError(f"dedup.lsh_bits={bits} leaves too few bits to number {m:,} rows; lower it")
    index_mask, shift = np.uint64((1 << index_bits) - 1), np.uint64(index_bits)
    key = np.empty(m, np.uint64)
    sorted_rows = np.empty(m, np.uint64)
    order = np.empty(m, np.int64)
    found: list[np.ndarray] = []
    candidates = oversized = 0
    for positions in lsh_masks(tables, bits, seed):
        # (key << index_bits | row) sorted as plain integers is the (key, row) order a stable argsort would
        # give, at a fraction of its cost.
        luts = _word_tables(positions, index_bits)
        for s in range(0, m, _BLOCK):
            e = min(s + _BLOCK, m)
            block = np.arange(s, e, dtype=np.uint64)
            for w in range(4):
                block |= luts[w][words[w, s:e]]
            key[s:e] = block
        key.sort()
        for s in range(0, m, _BLOCK):
            e = min(s + _BLOCK, m)
            o = (key[s:e] & index_mask).view(np.int64)
            order[s:e] = o
            sorted_rows[s:e] = np.take(rows, o)
            key[s:e] >>= shift
        skip = None  # rows past the first max_bucket of their run: paired with none in this table
        if m > max_bucket and (key[max_bucket:] == key[:-max_bucket]).any():
            starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            sizes = np.diff(np.r_[starts, m])
            too_big = sizes > max_bucket
            oversized += int(too_big.sum())
            skip = np.zeros(m, bool)
            for start, size in zip(starts[too_big], sizes[too_big]):
                skip[start + max_bucket:start + size] = True
        # Rows i and i + k of one run of equal keys are a candidate pair, for k = 1 .. max_bucket - 1.
        for s in range(0, m - 1, _BLOCK):
            e = min(s + _BLOCK, m - 1)
            for k in range(1, max_bucket):
                end = min(e + k, m)
                if end - k <= s:
                    break
                first = s + np.flatnonzero(key[s + k:end] == key[s:end - k])
                if not len(first):
                    break  # runs are contiguous: none spans k rows here, so none spans more
                second = first + k
                if skip is not None:
                    keep = ~skip[second]
                    first, second = first[keep], second[keep]
                a, b = order[first], order[second]
                other_face = np.abs(a - b) != n  # not a face's own hash and mirror hash
                first, second, a, b = first[other_face], second[other_face], a[other_face], b[other_face]
                candidates += len(first)
                close = np.bitwise_count(sorted_rows[first] ^ sorted_rows[second]) <= max_distance
                if close.any():
                    found.append(np.stack([a[close], b[close]], axis=1))
    if not found:
        empty = np.zeros(0, np.int64)
        return Pairs(empty, empty, np.zeros(0, np.int8), np.zeros(0, bool), candidates, oversized)
    pairs = np.concatenate(found)
    del found
    a_face, b_face = pairs[:, 0] % n, pairs[:, 1] % n
    code = np.unique(np.minimum(a_face, b_face) * np.int64(n) + np.maximum(a_face, b_face))
    left, right = code // n, code % n
    distance, mirrored = face_distance(hashes, mirrors, left, right)
    keep = distance <= max_distance
    return Pairs(left[keep], right[keep], distance[keep], mirrored[keep], candidates, oversized)


@dataclass(frozen=True)
class Clusters:
    """Per face: the index of the face kept for its cluster (itself when kept), and its distance to it."""

    kept: np.ndarray  # int64
    distance: np.ndarray  # int8, 0 for kept faces: Hamming distance to the kept face (either orientation)
    mirrored: np.ndarray  # bool: the distance is to the kept face's mirror image
    pairs: Pairs

    @property
    def sizes(self) -> np.ndarray:
        """Cluster size per face (1 for a face with no near-duplicate)."""
        return np.bincount(self.kept, minlength=len(self.kept))[self.kept]


def components(n: int, links: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected-component label per face over the given (a, b) index links."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.concatenate([np.asarray(x, np.int64) for x, _ in links] + [np.zeros(0, np.int64)])
    b = np.concatenate([np.asarray(y, np.int64) for _, y in links] + [np.zeros(0, np.int64)])
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def best_of(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Per face: the index of the best-ranked face (lowest rank) with the same label.

    Only labels held by two or more faces are sorted: most faces have no near-duplicate and keep themselves.
    """
    best = np.arange(len(labels), dtype=np.int64)
    multi = np.flatnonzero(np.bincount(labels)[labels] > 1) if len(labels) else best
    if len(multi):
        sub_labels, sub_rank = labels[multi], rank[multi]
        order = np.lexsort((sub_rank, sub_labels))
        first = np.r_[True, sub_labels[order][1:] != sub_labels[order][:-1]]
        table = np.empty(int(labels.max()) + 1, np.int64)
        table[sub_labels[order[first]]] = multi[order[first]]
        best[multi] = table[sub_labels]
    return best


def cluster_faces(hashes: np.ndarray, mirrors: np.ndarray, rank: np.ndarray, settings: DedupSettings) -> Clusters:
    """Near-duplicate clusters: faces linked by near-duplicate pairs; each keeps its best-ranked face (rank 0 best).

    The pairs, and so the clusters, depend only on the set of hashes: never on the
    order of the faces or of the shards they came from.
    """
    pairs = near_duplicate_pairs(hashes, mirrors, settings.max_distance, settings.lsh_tables, settings.lsh_bits,
                                 settings.max_bucket, exact_max=settings.exact_max_faces)
    kept = best_of(components(len(hashes), [(pairs.left, pairs.right)]), rank)
    distance, mirrored = face_distance(hashes, mirrors, np.arange(len(hashes)), kept)
    return Clusters(kept, distance, mirrored, pairs)


def same_value_links(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Links between consecutive faces (in sort order) that share a value (the source image)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    codes = pc.dictionary_encode(values).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(codes, kind="stable")
    same = codes[order][1:] == codes[order][:-1]
    return order[:-1][same], order[1:][same]


@dataclass(frozen=True)
class Split:
    """Test flag per face and how the components were assigned."""

    test: np.ndarray  # bool per face
    target: float  # quality.test_fraction
    achieved: float  # share of faces in test
    components: int
    test_components: int
    oversized: list[dict[str, Any]]  # components alone larger than the target: leader sample_id, size (train)
    cut: int = 0  # components whose key is at most this went to test (oversized ones aside); 0: none
    kept: int = 0  # components that kept the split the published release gave them


def component_keys(image_ids: list[str]) -> np.ndarray:
    """A component's place in the fill order: blake2b of its leader image_id as a uint64 (schema.is_test's)."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") for i in image_ids],
                    np.uint64)


def assign_split(groups: np.ndarray, image_ids: pa.ChunkedArray | pa.Array, test_fraction: float,
                 sample_ids: pa.ChunkedArray | pa.Array | None = None, released: np.ndarray | None = None,
                 previous: np.ndarray | None = None) -> Split:
    """Whole components to test, as close to `test_fraction` of the released faces as their sizes allow.

    A component's size is its number of released faces (`released`, a bool per
    face: with dedup.keep=best one per near-duplicate cluster; default all).

    Each component's leader is its face with the smallest image_id (then
    sample_id), and its key the blake2b hash of that image_id. Components are
    taken in key order and test is the prefix whose face count comes closest to
    the target (the shorter prefix on a tie); a component of more than one face
    that alone exceeds the target never goes to test, and is named in
    `oversized`. With many small components the cut lands near
    key = test_fraction x 2^64, which is the old per-image rule; whatever the
    sizes, one large component can no longer pull the share far from the target.

    Deterministic, and stable under added sources: a component that does not
    merge keeps its leader and key, so it keeps its split unless its key lies
    between the old cut and the new one (the cut moves by about the share the
    new faces shift; see docs/quality.md).

    `previous` (int8 per face: 1 released in test by the published release, 0
    in train, -1 not in it) makes it strict: a component whose faces the
    published release held all in one split keeps that split, and only the
    others (new components, and merges of a test and a train component) fill
    test toward the target, after the kept ones.
    """
    n = len(groups)
    if not n:
        return Split(np.zeros(0, bool), test_fraction, 0.0, 0, 0, [])
    cols = {"group": groups, "image_id": image_ids}
    keys = [("group", "ascending"), ("image_id", "ascending")]
    if sample_ids is not None:
        cols["sample_id"] = sample_ids
        keys.append(("sample_id", "ascending"))
    order = pc.sort_indices(pa.table(cols), keys).to_numpy()
    first = np.r_[True, groups[order][1:] != groups[order][:-1]]
    leaders = order[first]  # per component (in label order): its leader face
    weight = np.ones(n, np.int64) if released is None else np.asarray(released, np.int64)
    sizes = np.bincount(groups, weights=weight).astype(np.int64)[groups[leaders]]
    total = int(weight.sum())
    key = component_keys(pc.take(image_ids, pa.array(leaders)).to_pylist())
    target = test_fraction * total
    kept_test = kept_train = np.zeros(len(leaders), bool)
    if previous is not None:  # per component (in leader order): the published release's split of its faces
        labels = groups[leaders]
        was_test = np.bincount(groups, weights=previous == 1, minlength=int(groups.max()) + 1)[labels] > 0
        was_train = np.bincount(groups, weights=previous == 0, minlength=int(groups.max()) + 1)[labels] > 0
        kept_test, kept_train = was_test & ~was_train, was_train & ~was_test
    oversized = (sizes > target) & (sizes > 1) & ~kept_test & ~kept_train  # one face: the finest grain, never held
    fill = np.flatnonzero(~oversized & ~kept_test & ~kept_train)
    fill = fill[np.lexsort((groups[leaders][fill], key[fill]))]
    counts = np.r_[0, np.cumsum(sizes[fill])] + int(sizes[kept_test].sum())
    take = int(np.argmin(np.abs(counts - target)))  # argmin takes the first, i.e. the shorter prefix, on a tie
    by_group = np.zeros(int(groups.max()) + 1, bool)
    by_group[groups[leaders][fill[:take]]] = True
    by_group[groups[leaders][kept_test]] = True
    test = by_group[groups]
    named = sample_ids if sample_ids is not None else image_ids
    big = np.flatnonzero(oversized)
    big = big[np.argsort(-sizes[big], kind="stable")]
    achieved = float((test * weight).sum()) / total if total else 0.0
    cut = int(key[fill[take - 1]]) if take else 0
    return Split(test, test_fraction, achieved, len(leaders), take + int(kept_test.sum()),
                 [{"leader": pc.take(named, pa.array([leaders[g]]))[0].as_py(), "size": int(sizes[g]),
                   "share": round(float(sizes[g]) / total, 4)} for g in big], cut,
                 int(kept_test.sum() + kept_train.sum()))


def split_test_flags(groups: np.ndarray, image_ids: pa.ChunkedArray | pa.Array, test_fraction: float) -> np.ndarray:
    """Test-split flag per face, whole components at a time (see assign_split)."""
    return assign_split(groups, image_ids, test_fraction).test


# --- identity links (split only) ------------------------------------------------------------------

IDENTITY_PROJECTION_SEED = 20180402


def identity_hashes(embeddings: np.ndarray) -> np.ndarray:
    """64-bit sign-of-random-projection hashes of unit embeddings: Hamming distance ~ 64 x angle / pi."""
    rng = np.random.default_rng(IDENTITY_PROJECTION_SEED)
    planes = rng.standard_normal((embeddings.shape[1], HASH_BITS)).astype(np.float32)
    bits = (embeddings.astype(np.float32) @ planes) > 0
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).reshape(-1)


# --- the stage ------------------------------------------------------------------------------------

DEDUP_SCHEMA = keyed_schema([
    pa.field("phash", pa.uint64()),  # pHash of the normalised inner face (imagehash.phash's bits, MSB first)
    pa.field("phash_mirror", pa.uint64()),  # pHash of it mirrored left-right
])
# Added by the release-wide pass.
CLUSTER_FIELDS = [
    pa.field("dedup_cluster", pa.string()),  # sample_id of the face kept for this face's near-duplicate cluster
    pa.field("dedup_cluster_size", pa.int32()),  # faces in the cluster, this one included (1: no near-duplicate)
]
IDENTITY_FIELD = pa.field("identity_hash", pa.uint64())  # split grouping only: never released


def hash_faces(batches: Iterable[pa.Table], limits: ImageLimits, counters: Counters, embedder=None) -> Iterator[Chunk]:
    """Face records (sample_id and crop) in, their hashes out; a crop that does not decode is a reject."""
    schema = DEDUP_SCHEMA.append(IDENTITY_FIELD) if embedder is not None else DEDUP_SCHEMA
    for table in batches:
        counters.rows_in += table.num_rows
        rows, thumbs, crops, rejects = [], [], [], []
        meta = table.select(list(FACE_REJECT_COLUMNS)).to_pylist()
        geometry = zip(table.column("landmarks").to_pylist(), table.column("crop_box").to_pylist(),
                       table.column("align_angle").to_pylist())
        for i, (data, (landmarks, crop_box, angle)) in enumerate(zip(table.column("image").to_pylist(), geometry)):
            rgb, p = decode_rgb(data, limits)
            if rgb is None:  # crops come from detect, so this means a damaged shard: record it, do not crash
                rejects.append(reject_row("dedup", meta[i], p.reason, f"face crop: {p.detail}"))
                continue
            rows.append(i)
            thumbs.append(face_thumbnail(rgb, crop_landmarks(landmarks, crop_box, angle, rgb.shape[1])))
            if embedder is not None:
                crops.append(rgb)
        kept = None
        if rows:
            hashes, mirrors = face_hashes(np.stack(thumbs))
            columns = [table.column("sample_id").take(pa.array(rows, pa.int64())), pa.array(hashes, pa.uint64()),
                       pa.array(mirrors, pa.uint64())]
            if embedder is not None:
                columns.append(pa.array(identity_hashes(embedder.embed(crops)), pa.uint64()))
            kept = pa.table(columns, schema=schema)
        yield counters.count(Chunk(kept=kept, rejected=reject_table(rejects)))


class Dedup(Stage):
    """Aligned face crops in, their perceptual hashes out; clusters are formed release-wide (NearDuplicates)."""

    name = "dedup"
    section, settings_model, section_after = "dedup", DedupSettings, "text"
    output_fields, reasons = tuple(DEDUP_SCHEMA)[1:] + tuple(CLUSTER_FIELDS), DedupReason
    column_docs = {
        "phash": "64-bit perceptual hash (imagehash.phash bits) of the inner face, normalised by its five "
                 "landmarks to a fixed template: padding, background and scale do not enter it",
        "phash_mirror": "the same hash of the mirrored inner face",
        "dedup_cluster": "sample_id of the face kept for this face's near-duplicate cluster; clusters never "
                         "straddle the split, and whole groups of them fill test up to quality.test_fraction",
        "dedup_cluster_size": "faces in the near-duplicate cluster, this one included (before removal)",
    }
    version = "2"
    reads = FACE_REJECT_COLUMNS + ("image", "landmarks", "crop_box", "align_angle")
    keyed_sections = ("dedup", "image")
    # What is decided release-wide changes no hash: only the identity model (by its identity) keys the outputs.
    unkeyed = frozenset({"dedup.keep", "dedup.max_distance", "dedup.lsh_tables", "dedup.lsh_bits",
                         "dedup.exact_max_faces", "dedup.max_bucket", "dedup.identity_max_distance",
                         "dedup.identity_weights", "dedup.device", "dedup.gallery_clusters", "dedup.enabled"})
    priority = 2
    device_section = "dedup"
    unreleased = ("identity_hash",)

    suite = "near_duplicates"

    @classmethod
    def quality_checks(cls, cfg) -> list:
        from facecap.quality.primitives import Check

        # Straddling clusters = distinct (cluster, split) pairs - distinct clusters: each cluster on both
        # sides adds one. The same for source images, which the split has always kept together.
        return [
            Check("clusters_in_one_split", "near_duplicates",
                  "no near-duplicate cluster has faces in both train and test",
                  "count(DISTINCT dedup_cluster || '/' || _split) - count(DISTINCT dedup_cluster)",
                  ("dedup_cluster",)),
            Check("images_in_one_split", "near_duplicates", "no source image has faces in both train and test",
                  "count(DISTINCT image_id || '/' || _split) - count(DISTINCT image_id)",
                  ("dedup_cluster", "image_id")),
        ]

    @classmethod
    def card_notes(cls, info: dict) -> dict[str, str]:
        split_by = info.get("split_by") or "image_id"
        notes = {}
        if "near-duplicate" in split_by:
            notes["split"] = " or one near-duplicate cluster (`dedup_cluster`)"
        split = ((info.get("release_passes") or {}).get("dedup") or {}).get("split") or {}
        if split:
            notes["split"] = notes.get("split", "") + (
                f" (test holds {split['achieved']:.1%} of the faces for a target of {split['target']:.1%}: "
                "whole groups are assigned, so the share is as close as their sizes allow)")
        if split.get("oversized"):
            big = "; ".join(f"`{c['leader']}` ({c['size']:,} faces, {c['share']:.1%})" for c in split["oversized"][:5])
            notes["warning"] = (f"{len(split['oversized'])} group(s) of linked faces alone exceed the test share "
                                f"{split['target']:.1%} and were put in train: {big}. Check what links them "
                                "(near-duplicate clusters or shared source images).")
        if "identity" in split_by:
            notes["ethics"] = (" Face embeddings (FaceNet) grouped likely photos of one person so that they share "
                               "a split; the embeddings, their hashes and the groups were used for the split only "
                               "and are never released.")
        return notes

    @classmethod
    def plan(cls, cfg, planned=None) -> StagePlan:
        s = cfg.dedup
        if not s.enabled:
            return StagePlan(False, why="dedup.enabled is false: near-duplicate faces are neither found nor removed, "
                                        "and the split is by source image only")
        info: dict[str, Any] = {"keep": s.keep, "max_distance": s.max_distance,
                                "hash": "pHash 64-bit + mirror of the landmark-normalised inner face",
                                "lsh": f"{s.lsh_tables} tables x {s.lsh_bits} bits"}
        from facecap.models.identity import plan_identity

        identity, why = plan_identity(cfg)
        info["identity"] = identity or f"off: {why}"
        return StagePlan(True, identity, info=info)

    def load(self) -> None:
        self.embedder = None
        if self.stage_plan.model:
            from facecap.models.identity import load_identity_model

            self.embedder = load_identity_model(self.cfg)
            self.check_loaded("identity model", self.embedder.identity)

    def schema(self) -> pa.Schema:
        return DEDUP_SCHEMA.append(IDENTITY_FIELD) if self.stage_plan.model else DEDUP_SCHEMA

    def process(self, records, counters: Counters) -> Iterator[Chunk]:
        return hash_faces(records, self.cfg.image, counters, self.embedder)

    def release_pass(self, published: str | None = None) -> "NearDuplicates":
        return NearDuplicates(self.cfg.dedup, self.cfg.quality.test_fraction, identity=bool(self.stage_plan.model),
                              published=published_splits(published, self.cfg.quality.test_fraction))


# --- the release-wide pass ------------------------------------------------------------------------


def published_splits(release_dir: str | None, test_fraction: float) -> tuple[pa.Array, pa.Array] | None:
    """The image_ids the published release in `release_dir` put in test and in train, if it split with the same
    `test_fraction` (a changed target re-draws the split); None when there is no such release."""
    from facecap import storage

    if not release_dir or not storage.exists(storage.join(release_dir, "release.json")):
        return None
    info = storage.read_json(storage.join(release_dir, "release.json"))
    split = ((info.get("release_passes") or {}).get("dedup") or {}).get("split") or {}
    if split.get("target") != test_fraction:
        return None
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(storage.join(release_dir, "data"))
    ids: dict[bool, list[pa.Array]] = {True: [], False: []}
    for path in sorted(fs.glob(root.rstrip("/") + "/*.parquet")):
        column = pq.read_table(path, columns=["image_id"], filesystem=fs).column("image_id")
        ids[path.rsplit("/", 1)[-1].startswith("test-")].extend(column.chunks)
    return tuple(pc.unique(pa.chunked_array(ids[side], pa.string())) for side in (True, False))


def _size_histogram(sizes: np.ndarray) -> dict[str, int]:
    bins = (("1", 1, 1), ("2", 2, 2), ("3", 3, 3), ("4-9", 4, 9), ("10-99", 10, 99), ("100+", 100, None))
    out = {}
    for name, lo, hi in bins:
        n = int(((sizes >= lo) & (sizes <= (hi if hi is not None else sizes.max(initial=0)))).sum())
        if n:
            out[name] = n
    return out


@dataclass
class NearDuplicates(ReleasePass):
    """Release-wide: clusters of near-duplicate faces, the faces kept, and the split groups."""

    settings: DedupSettings
    test_fraction: float
    identity: bool = False
    name: str = "dedup"
    split_by: str = ("groups of faces linked by a near-duplicate cluster or a shared source image (whole groups "
                     "to test in the order of the blake2b of their smallest image_id, up to quality.test_fraction)")
    reads: tuple[str, ...] = ("sample_id", "image_id", "det_score", "width", "phash", "phash_mirror")
    kept_index: np.ndarray = field(default=None, repr=False)
    stats: dict[str, Any] = field(default_factory=dict)
    # image_ids the published release put in test and in train: its components keep their split
    published: tuple[pa.Array, pa.Array] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.identity:
            self.reads = self.reads + ("identity_hash",)
            self.split_by = self.split_by.replace(" or a shared source image", ", a shared source image or a likely "
                                                  "shared identity (FaceNet)")

    def fit(self, records: pa.Table) -> None:
        n = records.num_rows
        s = self.settings
        rank = np.empty(n, np.int64)
        rank[pc.sort_indices(records, [("det_score", "descending"), ("width", "descending"),
                                       ("sample_id", "ascending")]).to_numpy()] = np.arange(n)
        hashes = records.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
        mirrors = records.column("phash_mirror").to_numpy(zero_copy_only=False).astype(np.uint64)
        clusters = cluster_faces(hashes, mirrors, rank, s)
        self.kept_index, self.distance, self.mirrored = clusters.kept, clusters.distance, clusters.mirrored
        self.sizes = clusters.sizes
        self.sample_ids = records.column("sample_id")
        links = [(np.arange(n), clusters.kept), same_value_links(records.column("image_id"))]
        identity_links = 0
        if self.identity:
            ids = records.column("identity_hash").to_numpy(zero_copy_only=False).astype(np.uint64)
            same = near_duplicate_pairs(ids, ids, s.identity_max_distance, s.lsh_tables, s.lsh_bits, s.max_bucket,
                                        exact_max=s.exact_max_faces)
            links.append((same.left, same.right))
            identity_links = len(same.left)
        groups = components(n, links)
        self.groups = groups
        is_kept = self.kept_index == np.arange(n)
        previous = None
        if self.published is not None:
            image_ids = records.column("image_id")
            previous = np.full(n, -1, np.int8)
            previous[pc.is_in(image_ids, value_set=self.published[1]).to_numpy(zero_copy_only=False)] = 0
            previous[pc.is_in(image_ids, value_set=self.published[0]).to_numpy(zero_copy_only=False)] = 1
        split = assign_split(groups, records.column("image_id"), self.test_fraction, self.sample_ids,
                             released=is_kept if s.keep == "best" else None, previous=previous)
        self.test, self.split = split.test, split
        multi = is_kept & (self.sizes > 1)
        self.removed = int((~is_kept).sum()) if s.keep == "best" else 0
        # The largest clusters first (then by kept sample_id): the report's gallery.
        big = np.flatnonzero(multi)
        big = big[np.lexsort((np.asarray(self.sample_ids.take(pa.array(big)).to_pylist(), dtype=object).astype(str),
                              -self.sizes[big]))][: s.gallery_clusters] if len(big) else big
        self.gallery_members = {int(k): [] for k in big}
        self.stats = {
            "faces": n, "clusters": int(is_kept.sum()), "clusters_with_duplicates": int(multi.sum()),
            "faces_in_duplicate_clusters": int((self.sizes > 1).sum()), "removed": self.removed,
            "keep": s.keep, "max_distance": s.max_distance, "cluster_sizes": _size_histogram(self.sizes[is_kept]),
            "candidate_pairs": clusters.pairs.candidates, "near_duplicate_pairs": len(clusters.pairs.left),
            "oversized_buckets": clusters.pairs.oversized_buckets,
            "split_groups": int(groups.max(initial=-1)) + 1,
            "split": {"target": split.target, "achieved": round(split.achieved, 4), "components": split.components,
                      "test_components": split.test_components,
                      "test_faces": int((split.test & (is_kept | (s.keep == "all"))).sum()),
                      "kept_from_published": split.kept,
                      "oversized": split.oversized},
            "identity_links": identity_links if self.identity else None,
            "largest": [{"kept": self.sample_ids[int(k)].as_py(), "size": int(self.sizes[k])} for k in big],
        }

    def apply(self, index: np.ndarray, table: pa.Table) -> tuple[pa.Table, np.ndarray, pa.Table | None]:
        """Records at release positions `index`: kept rows with their cluster columns, their positions, rejects."""
        kept_of = self.kept_index[index]
        if "image" in table.column_names:
            for i in np.flatnonzero(np.isin(kept_of, list(self.gallery_members))):
                members = self.gallery_members[int(kept_of[i])]
                if len(members) < 7 or index[i] == kept_of[i]:  # the kept face always shows
                    members.append((int(index[i] != kept_of[i]), table.column("sample_id")[int(i)].as_py(),
                                    image_bytes(table.column("image")[int(i)].as_py())))
        table = table.append_column(CLUSTER_FIELDS[0], self.sample_ids.take(pa.array(kept_of)))
        table = table.append_column(CLUSTER_FIELDS[1], pa.array(self.sizes[index].astype(np.int32)))
        table = table.append_column("_test", pa.array(self.test[index]))
        drop = kept_of != index
        if self.settings.keep == "all" or not drop.any():
            return table, index, None
        rejects = []
        meta = table.filter(pa.array(drop)).select(list(FACE_REJECT_COLUMNS)).to_pylist()
        for row, g in zip(meta, index[drop]):
            how = ", one of the two mirrored" if self.mirrored[g] else ""
            rejects.append(reject_row(
                "dedup", row, DedupReason.NEAR_DUPLICATE,
                f"near-duplicate of {self.sample_ids[int(self.kept_index[g])].as_py()}, kept for a cluster of "
                f"{int(self.sizes[g])} faces linked by pHash distances <= dedup.max_distance="
                f"{self.settings.max_distance} (this face is {int(self.distance[g])} of 64 bits from the kept "
                f"one{how})"))
        return table.filter(pa.array(~drop)), index[~drop], reject_table(rejects)

    def write_gallery(self, folder: str) -> None:
        """Thumbnails of the largest clusters' faces (kept first) for the report, under `folder`."""
        rows = []
        for rank, (kept, members) in enumerate(self.gallery_members.items()):
            faces = []
            for j, (removed, sample_id, data) in enumerate(sorted(members, key=lambda m: m[0])):
                name = f"cluster-{rank:02d}-{j}.jpg"
                if data and _write_thumbnail(data, os.path.join(folder, name)):
                    faces.append({"sample_id": sample_id, "file": name, "kept": not removed})
            rows.append({"kept": self.sample_ids[kept].as_py(), "size": int(self.sizes[kept]), "faces": faces})
        self.stats["gallery"] = rows

    def summary(self) -> dict[str, Any]:
        return self.stats

    def outcome(self) -> str | None:
        found = self.stats
        if not found.get("faces"):
            return None
        split = found["split"]
        line = (f"{found['faces']:,} faces in {found['clusters']:,} clusters ({found['clusters_with_duplicates']:,} "
                f"with near-duplicates); {found['removed']:,} removed (dedup.keep={found['keep']}); test share "
                f"{split['achieved']:.2%} for a target of {split['target']:.2%}")
        for c in split["oversized"]:
            line += f"; WARNING: group led by {c['leader']} ({c['size']:,} faces) alone exceeds the test share"
        return line

    def funnel_row(self) -> dict[str, Any]:
        n = self.stats.get("faces", 0)
        return {"stage": "dedup (release-wide)", "release_wide": True, "shards": 0, "cached": 0, "failed": 0,
                "rows_in": n,
                "rows_out": n - self.removed,
                "rejects": {DedupReason.NEAR_DUPLICATE: self.removed} if self.removed else {},
                "extra": {"clusters_with_duplicates": self.stats.get("clusters_with_duplicates", 0)}}


def _write_thumbnail(data: bytes, path: str, side: int = 96) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            im.save(path, format="JPEG", quality=80)
        return True
    except OSError:
        return False


# --- report ----------------------------------------------------------------------------------------
def _split_html(split: dict | None, escape) -> str:
    if not split:
        return ""
    out = (f"<p>Split: {split['test_faces']:,} faces in test = <b>{split['achieved']:.2%}</b> (target "
           f"quality.test_fraction = {split['target']:.2%}), {split['test_components']:,} of "
           f"{split['components']:,} groups" + (f"; {split['kept_from_published']:,} groups kept the split the "
                                                  "previous release gave them" if split.get("kept_from_published")
                                                  else "") + ".</p>")
    for c in split.get("oversized") or []:
        out += (f"<p><b>Warning:</b> the group led by <code>{escape(str(c['leader']))}</code> holds {c['size']:,} "
                f"faces ({c['share']:.1%}), more than the test share alone: it went to train.</p>")
    return out


class DedupReport(ReportSection):
    """Clusters of near-duplicate faces: counts, sizes, and the largest clusters' faces (kept one first)."""

    def html(self, report) -> str:
        from html import escape

        from facecap.quality.primitives import table

        found = (report["release"].get("release_passes") or {}).get(Dedup.name)
        if not found:
            return ""
        faces = found.get("faces") or 0
        removed = found.get("removed") or 0
        keep = escape(str(found.get("keep")))
        out = ["<h2>Near-duplicates</h2>",
               f"<p>{faces:,} faces in {found.get('clusters', 0):,} clusters; "
               f"{found.get('clusters_with_duplicates', 0):,} clusters hold "
               f"{found.get('faces_in_duplicate_clusters', 0):,} faces with near-duplicates (64-bit pHash of the crop "
               f"or its mirror within {found.get('max_distance')} bits). dedup.keep={keep}: "
               f"<b>{removed:,} faces removed ({removed / faces if faces else 0:.1%})</b>. Splits keep every cluster "
               "and every source image on one side.</p>",
               _split_html(found.get("split"), escape),
               table(["cluster size", "clusters"],
                     [[k, f"{v:,}"] for k, v in (found.get("cluster_sizes") or {}).items()])]
        for cluster in found.get("gallery") or []:
            cards = "".join(f'<div class="card" style="width:110px"><img src="{escape(f["file"])}" alt="face">'
                            f'<code>{escape(f["sample_id"])}</code>{" <b>kept</b>" if f["kept"] else ""}</div>'
                            for f in cluster["faces"])
            shown = f", first {len(cluster['faces'])} shown" if cluster["size"] > len(cluster["faces"]) else ""
            out.append(f"<p>Cluster of {cluster['size']:,} faces (kept: <code>{escape(cluster['kept'])}</code>{shown})"
                       f"</p><div class=\"grid\">{cards}</div>")
        return "".join(out)


Dedup.report = DedupReport()
