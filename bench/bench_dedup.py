"""Near-duplicate clustering of N synthetic 64-bit pHashes (target: N = 15M in < 2 min and < 4 GB, 2 cores).

Runs `facecap.stages.dedup.cluster_faces` (banded LSH by bit sampling, exact
Hamming verification, connected components, best face per cluster; all pairs
compared instead of LSH up to `dedup.exact_max_faces` faces) with the
default `DedupSettings` on N faces, a share of which are planted
near-duplicate groups, and prints per phase the seconds and the peak RSS,
the LSH's work (candidate pairs verified, pairs found) and how well the
planted groups come back (recall, precision, recall per planted distance).

The data (seeded, vectorised numpy):

- distinct faces: a uniform random 64-bit hash and another for the mirror hash;
- planted groups (`--dup-share` of the faces, default 5 %, in groups of 2-10
  faces, sizes uniform): one original with random hashes, and copies whose
  hash is the original's with k random bits flipped, k drawn from the
  distances measured on real re-encoded / rescaled / cropped copies of
  aligned face crops (P(0)=.05, P(2)=.2, P(4)=.3, P(6)=.3, P(8)=.15);
- `--mirrored` of the copies (default 20 %) are mirror images: their hash is
  the original's mirror hash with k flips, and their mirror hash the
  original's hash with k flips;
- the mirror hash of a copy flips the same k bit positions as its hash
  (`--mirror-flips same`, the default). On real crops the bits that a re-crop
  flips in the hash and in the mirror hash are mostly the same coefficients, so
  this is the conservative model; `independent` draws them apart, which gives
  the LSH a second, independent chance per pair.

Faces are shuffled, so a group's members are spread over the index range.

Recall: of all planted same-group pairs, the share that end in one cluster;
the share of groups whose members all end in one cluster (and in a cluster
holding nothing else); and per planted distance k, the share of copy-original
pairs found as a pair by the LSH and the share in one cluster. Precision:
over clusters of two or more faces, the share of same-cluster pairs that are
planted same-group pairs (counted per (cluster, group) cell, never pair by
pair), and the share of their faces whose cluster mixes groups / distinct faces.

It also times the per-face hash: `grey_thumbnail` + `face_hashes` (ours)
against `imagehash.phash` of the crop and of its mirror image, on crops of
the skimage astronaut's face at varied boxes resized to ~160 px, and counts
the crops where the two disagree (expected 0).

    python bench/bench_dedup.py                      # N = 15,000,000; 200 crops
    python bench/bench_dedup.py --n 3000000 --mirror-flips independent
    python bench/bench_dedup.py --smoke              # CI size: N = 200,000 and 20 crops, a few seconds

Peak RSS is the process's, so it includes the generated arrays (reported as
the RSS before clustering). Per phase it is /proc VmHWM, reset when the phase
starts with /proc/self/clear_refs where the kernel allows it; that reset also
resets getrusage's ru_maxrss, so the run's peak is the largest phase peak
(ru_maxrss where VmHWM cannot be reset). tracemalloc is not used: RSS counts.
It prints the figures, then them as JSON on the last line; it exits non-zero
when the run fails or our hash differs from imagehash's on some crop, never
because a time or memory target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from contextlib import contextmanager

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from facecap.stages.dedup import DedupSettings  # noqa: E402
from facecap.stages import dedup  # noqa: E402

TARGET_SECONDS = 120
TARGET_GIB = 4
DISTANCES = np.array([0, 2, 4, 6, 8])
DISTANCE_P = np.array([0.05, 0.2, 0.3, 0.3, 0.15])
SMOKE = {"n": 200_000, "crops": 20, "copies": 60}
GIB = 2 ** 30


# --------------------------------------------------------------------------- memory


def proc_status(field: str) -> int:
    """A size from /proc/self/status in bytes (VmRSS: current, VmHWM: peak since start or the last reset)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Phases:
    """Wall seconds and peak RSS (VmHWM since the phase began) per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.open: list[str] = []  # nested phases: an inner phase's peak is also its outer phases'
        self.resettable = reset_peak()

    @contextmanager
    def __call__(self, name: str):
        if self.resettable:
            reset_peak()
        self.open.append(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.open.pop()
            peak = proc_status("VmHWM")
            for phase in self.open + [name]:
                self.peak[phase] = max(self.peak.get(phase, 0), peak)


# --------------------------------------------------------------------------- synthetic hashes


def random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2 ** 64, size=n, dtype=np.uint64)


def flip_masks(rng: np.random.Generator, k: np.ndarray) -> np.ndarray:
    """Per row, a uint64 with k[i] distinct random bits set (draws without replacement, redrawing collisions)."""
    mask = np.zeros(len(k), np.uint64)
    one = np.uint64(1)
    for j in range(int(k.max(initial=0))):
        todo = np.flatnonzero(k > j)
        while len(todo):
            bit = one << rng.integers(0, 64, size=len(todo)).astype(np.uint64)
            free = (mask[todo] & bit) == 0
            mask[todo[free]] |= bit[free]
            todo = todo[~free]
    return mask


class Planted:
    """The generated faces and what was planted: a label per face, the groups and the copies."""

    def __init__(self, n: int, seed: int, dup_share: float, mirrored: float, mirror_flips: str) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.hashes = random_hashes(rng, n)
        self.mirrors = random_hashes(rng, n)
        self.rank = rng.permutation(n).astype(np.int64)  # best face per cluster: an arbitrary fixed order
        # Group sizes 2..10 until dup_share of the faces are members.
        target = int(round(dup_share * n))
        sizes = rng.integers(2, 11, size=target // 2 + 1)
        sizes = sizes[np.cumsum(sizes) <= target]
        self.group_sizes = sizes
        members = int(sizes.sum())
        self.group_starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)  # into self.members
        # Member faces: a random subset of the indices (shuffled: a group is not contiguous).
        self.members = rng.permutation(n)[:members].astype(np.int64)  # group g = members[start_g : start_g + size_g]
        group_of_member = np.repeat(np.arange(len(sizes)), sizes)
        is_original = np.zeros(members, bool)
        is_original[self.group_starts] = True
        original = self.members[self.group_starts][group_of_member]  # per member: its group's original face
        copies = ~is_original
        self.copy = self.members[copies]
        self.original = original[copies]
        m = len(self.copy)
        self.k = rng.choice(DISTANCES, size=m, p=DISTANCE_P).astype(np.int64)
        self.mirrored = rng.random(m) < mirrored
        flips = flip_masks(rng, self.k)
        flips_m = flips if mirror_flips == "same" else flip_masks(rng, self.k)
        base_h, base_m = self.hashes[self.original], self.mirrors[self.original]
        self.hashes[self.copy] = np.where(self.mirrored, base_m, base_h) ^ flips
        self.mirrors[self.copy] = np.where(self.mirrored, base_h, base_m) ^ flips_m
        # Label per face: its group, or a label of its own for a distinct face.
        self.label = np.arange(n, dtype=np.int64) + len(sizes)
        self.label[self.members] = group_of_member


# --------------------------------------------------------------------------- scores


def evaluate(p: Planted, kept: np.ndarray, pairs: dedup.Pairs) -> dict:
    n = p.n
    out: dict = {}
    size_of_cluster = np.bincount(kept, minlength=n)
    out["clusters"] = int((size_of_cluster > 0).sum())
    out["clusters_2plus"] = int((size_of_cluster > 1).sum())
    out["faces_in_clusters_2plus"] = int(size_of_cluster[size_of_cluster > 1].sum())
    out["largest_cluster"] = int(size_of_cluster.max(initial=0))

    # Recall over every planted same-group pair (member i with member i + o of the same group).
    group_of_member = np.repeat(np.arange(len(p.group_sizes)), p.group_sizes)
    planted_pairs = together = 0
    for o in range(1, int(p.group_sizes.max(initial=1))):
        same = group_of_member[o:] == group_of_member[:-o]
        a, b = p.members[:-o][same], p.members[o:][same]
        planted_pairs += len(a)
        together += int((kept[a] == kept[b]).sum())
    out["planted_pairs"] = planted_pairs
    out["pair_recall"] = together / planted_pairs if planted_pairs else None

    # Groups fully recovered: every member in the original's cluster (and: that cluster holds nothing else).
    orig_kept = np.repeat(kept[p.members[p.group_starts]], p.group_sizes)
    whole = np.logical_and.reduceat(kept[p.members] == orig_kept, p.group_starts) if len(p.members) else np.zeros(0)
    exact = whole & (size_of_cluster[kept[p.members[p.group_starts]]] == p.group_sizes)
    out["groups"] = len(p.group_sizes)
    out["groups_fully_recovered"] = float(whole.mean()) if len(whole) else None
    out["groups_exactly_recovered"] = float(exact.mean()) if len(exact) else None

    # Precision over clusters of 2+ faces: same-cluster pairs that are planted same-group pairs, via
    # (cluster, label) cells: sum C(cell, 2) / sum C(cluster, 2). Linear whatever the cluster sizes.
    faces = np.flatnonzero(size_of_cluster[kept] > 1)
    cells, cell_counts = np.unique(kept[faces] * np.int64(2 * n + 1) + p.label[faces], return_counts=True)
    cell_cluster = cells // np.int64(2 * n + 1)
    sizes = size_of_cluster[size_of_cluster > 1].astype(np.float64)
    cluster_pairs = float((sizes * (sizes - 1) / 2).sum())
    true_pairs = float((cell_counts.astype(np.float64) * (cell_counts - 1) / 2).sum())
    out["same_cluster_pairs"] = int(cluster_pairs)
    out["pair_precision"] = true_pairs / cluster_pairs if cluster_pairs else None
    labels_per_cluster = np.bincount(cell_cluster, minlength=n)
    mixed = labels_per_cluster > 1
    out["mixed_clusters"] = int(mixed.sum())
    out["faces_in_mixed_clusters"] = int(size_of_cluster[mixed].sum())
    out["face_precision"] = (1 - out["faces_in_mixed_clusters"] / len(faces)) if len(faces) else None

    # Per planted distance k: copy-original pairs found by the LSH (as a pair), and in one cluster.
    codes = np.sort(pairs.left.astype(np.int64) * n + pairs.right)
    lo, hi = np.minimum(p.copy, p.original), np.maximum(p.copy, p.original)
    want = lo * n + hi
    at = np.minimum(np.searchsorted(codes, want), max(len(codes) - 1, 0))
    found = (codes[at] == want) if len(codes) else np.zeros(len(want), bool)
    same = kept[p.copy] == kept[p.original]
    per_k = {}
    for k in DISTANCES:
        for name, sel in (("all", p.k == k), ("mirrored", (p.k == k) & p.mirrored)):
            c = int(sel.sum())
            per_k.setdefault(int(k), {})[name] = {"copies": c, "pair_found": float(found[sel].mean()) if c else None,
                                                   "same_cluster": float(same[sel].mean()) if c else None}
    out["per_distance"] = per_k
    out["copy_pairs_found"] = float(found.mean()) if len(found) else None
    out["copy_pairs_same_cluster"] = float(same.mean()) if len(same) else None
    return out


def lsh_expected(k: int, tables: int, bits: int, chances: int) -> float:
    """Approximate P(some table keys on none of k flipped bits): tables taken as independent draws."""
    agree = 1.0
    for i in range(k):
        agree *= (64 - bits - i) / (64 - i)
    return 1 - (1 - agree) ** (tables * chances)


# --------------------------------------------------------------------------- hash cost


def face_crops(count: int, seed: int) -> list[np.ndarray]:
    """The astronaut's face (about x 170..270, y 50..180 of skimage's 512 x 512) cut at varied boxes, ~160 px."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    img = Image.fromarray(data.astronaut())
    crops = []
    for _ in range(count):
        x0, y0 = int(rng.integers(140, 190)), int(rng.integers(20, 60))
        x1, y1 = int(rng.integers(250, 300)), int(rng.integers(170, 220))
        side = int(rng.integers(140, 181))
        crops.append(np.asarray(img.crop((x0, y0, x1, y1)).resize((side, side), Image.Resampling.BICUBIC)))
    return crops


def time_hashes(crops: list[np.ndarray], repeats: int) -> dict:
    """ms per crop (crop and mirror hashes) for ours and imagehash.phash; mismatches between the two."""
    out: dict = {"crops": len(crops)}
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        ours_h, ours_m = dedup.face_hashes(np.stack([dedup.grey_thumbnail(c) for c in crops]))
        best = min(best, time.perf_counter() - started)
    out["ours_ms_per_crop"] = 1000 * best / len(crops)
    try:
        import imagehash
        from PIL import Image, ImageOps
    except ImportError as exc:
        out["imagehash"] = f"skipped: {exc} (pip install imagehash==4.3.2)"
        return out
    out["imagehash"] = imagehash.__version__ if hasattr(imagehash, "__version__") else "installed"
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        theirs = []
        for c in crops:
            img = Image.fromarray(c)
            theirs.append((imagehash.phash(img), imagehash.phash(ImageOps.mirror(img))))
        best = min(best, time.perf_counter() - started)
    out["imagehash_ms_per_crop"] = 1000 * best / len(crops)
    out["mismatches_hash"] = int(sum(int(str(h), 16) != int(o) for (h, _), o in zip(theirs, ours_h)))
    out["mismatches_mirror"] = int(sum(int(str(m), 16) != int(o) for (_, m), o in zip(theirs, ours_m)))
    return out


# --------------------------------------------------------------------------- web copies (real photos, real detector)


def web_copy_figures(n: int, seed: int, test_fraction: float = 0.05) -> dict:
    """Pair recall/precision of the release-wide clusters over the faces detected in `n` web copies.

    The copies and their ground truth come from facecap.webcopies; the faces
    from the detect stage's code with the offline detector (RetinaFace
    mobilenet0.25, no identity model); the hashes from the dedup stage's
    `hash_faces`, the clusters and the split from its release pass. The same
    faces hashed as before (pHash of the whole aligned crop) give the baseline.
    """
    import pyarrow as pa

    from facecap.config import Config
    from facecap.stages.base import Counters
    from facecap.webcopies import detect_copies, pair_scores, web_copies

    cfg = Config.model_validate({"profile": "offline"})
    out: dict = {"copies": n, "seed": seed}
    started = time.perf_counter()
    copies = web_copies(n, seed)
    out["make_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    faces, rejects = detect_copies(copies, cfg)
    out["detect_seconds"] = round(time.perf_counter() - started, 1)
    out["detect_rejects"] = rejects
    started = time.perf_counter()
    chunks = list(dedup.hash_faces([faces], cfg.image, Counters()))
    hashed = pa.concat_tables([c.kept for c in chunks if c.kept is not None])
    out["hash_ms_per_face"] = round(1000 * (time.perf_counter() - started) / max(1, faces.num_rows), 2)
    assert hashed.column("sample_id").equals(faces.column("sample_id")), "hash_faces reordered or dropped faces"
    persons = faces.column("person").to_pylist()
    records = faces.select(["sample_id", "image_id", "det_score", "width"]).append_column(
        "phash", hashed.column("phash")).append_column("phash_mirror", hashed.column("phash_mirror"))
    settings = DedupSettings(keep="best")
    release = dedup.NearDuplicates(settings, test_fraction)
    release.fit(records)
    out["face_normalised"] = pair_scores(persons, release.kept_index.tolist())
    out["split"] = release.stats["split"]
    kept = release.kept_index == np.arange(len(persons))
    out["kept_faces"] = int(kept.sum())
    out["kept_per_person"] = {p: int(sum(1 for k, q in zip(kept, persons) if k and q == p))
                              for p in sorted({q for q in persons if q})}
    # The hash before: pHash of the whole aligned crop (padding, background and scale included).
    from PIL import Image
    import io

    thumbs = np.stack([dedup.grey_thumbnail(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
                       for b in faces.column("image").to_pylist()])
    h, m = dedup.face_hashes(thumbs)
    before = dedup.cluster_faces(h, m, np.arange(len(h)), settings)
    out["whole_crop"] = pair_scores(persons, before.kept.tolist())
    out["whole_crop"]["kept_faces"] = int((before.kept == np.arange(len(h))).sum())
    return out


def print_web_copies(w: dict) -> None:
    print(f"web copies: {w['copies']} copies (seed {w['seed']}) of 6 real photos, made in {w['make_seconds']} s; "
          f"offline detector kept {w['face_normalised']['faces'] + w['face_normalised']['unlabelled_faces']} faces "
          f"in {w['detect_seconds']} s (rejects {w['detect_rejects']}); {w['face_normalised']['unlabelled_faces']} "
          f"matched no carried face box; hash {w['hash_ms_per_face']} ms per face")
    print(f"{'hash':<34}{'recall':>8}{'precision':>11}{'true pairs':>12}{'false pairs':>13}{'missed':>8}"
          f"{'clusters':>10}{'mixed':>7}")
    for name, key in (("face-normalised inner face (now)", "face_normalised"), ("whole aligned crop (before)",
                                                                                 "whole_crop")):
        s = w[key]
        print(f"{name:<34}{pct(s['pair_recall']):>8}{pct(s['pair_precision']):>11}{s['true_pairs']:>12,}"
              f"{s['false_pairs']:>13,}{s['missed_pairs']:>8,}{s['clusters']:>10}{s['mixed_clusters']:>7}")
    s = w["face_normalised"]
    print(f"goal: pair recall >= 95 % (ratio {(s['pair_recall'] or 0) / 0.95:.3f}), pair precision >= 99 % (ratio "
          f"{(s['pair_precision'] or 0) / 0.99:.3f}); faces kept with dedup.keep=best: {w['kept_faces']} for "
          f"{s['persons']} persons (before: {w['whole_crop']['kept_faces']}); per person {w['kept_per_person']}")
    sp = w["split"]
    print(f"split: test share {sp['achieved']:.2%} of the kept faces for a target of {sp['target']:.2%} "
          f"({sp['test_components']} of {sp['components']} groups); groups alone above the target: "
          f"{sp['oversized'] or 'none'}")


# --------------------------------------------------------------------------- driver


@contextmanager
def timed_module(phases: Phases, names: dict[str, str]):
    """Time dedup's module functions that cluster_faces calls (it looks them up at call time)."""
    saved = {fn: getattr(dedup, fn) for fn in names}

    def wrap(fn, phase):
        def inner(*a, **kw):
            with phases(phase):
                return fn(*a, **kw)
        return inner

    for fn, phase in names.items():
        setattr(dedup, fn, wrap(saved[fn], phase))
    try:
        yield
    finally:
        for fn, original in saved.items():
            setattr(dedup, fn, original)


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=15_000_000, help="faces (default 15,000,000)")
    ap.add_argument("--dup-share", type=float, default=0.05, help="share of faces in planted groups (default 0.05)")
    ap.add_argument("--mirrored", type=float, default=0.2, help="share of copies that are mirror images (0.2)")
    ap.add_argument("--mirror-flips", choices=("same", "independent"), default="same",
                    help="a copy's mirror hash flips the same bit positions as its hash (default), or others")
    ap.add_argument("--crops", type=int, default=200, help="face crops for the hash timing (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    ap.add_argument("--copies", type=int, default=600, help="web copies for recall/precision (default 600; 0: skip)")
    ap.add_argument("--copies-only", action="store_true", help="only the web-copy figures, not the N-hash clustering")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CI size: N = {SMOKE['n']:,}, {SMOKE['crops']} crops, {SMOKE['copies']} web copies")
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.copies_only:
        web = web_copy_figures(args.copies, args.seed)
        print_web_copies(web)
        print(json.dumps({"web_copies": web}), flush=True)
        return 0
    settings = DedupSettings()
    load_before = os.getloadavg()[0]
    phases = Phases()
    rss_start = proc_status("VmRSS")

    print(f"generating {args.n:,} hashes ...", flush=True)
    with phases("generate"):
        planted = Planted(args.n, args.seed, args.dup_share, args.mirrored, args.mirror_flips)
    rss_data = proc_status("VmRSS")
    print(f"  {phases.seconds['generate']:.1f} s: {len(planted.group_sizes):,} groups, {len(planted.members):,} "
          f"member faces, {len(planted.copy):,} copies ({int(planted.mirrored.sum()):,} mirrored); RSS "
          f"{rss_data / 2**20:,.0f} MiB", flush=True)

    exact_max = getattr(settings, "exact_max_faces", 0)
    path = "all pairs compared (exact)" if args.n <= exact_max else "LSH candidates"
    print(f"cluster_faces: max_distance {settings.max_distance}, {settings.lsh_tables} tables x "
          f"{settings.lsh_bits} bits, max_bucket {settings.max_bucket}, exact up to {exact_max:,} faces: "
          f"{path} ...", flush=True)
    started = time.perf_counter()
    with timed_module(phases, {"near_duplicate_pairs": "pairs", "components": "components", "best_of": "best_of"}):
        with phases("cluster_faces"):
            clusters = dedup.cluster_faces(planted.hashes, planted.mirrors, planted.rank, settings)
    cluster_seconds = time.perf_counter() - started
    # cluster_faces = pairs + components + best_of + the rest (each face's distance to its kept face).
    rest = cluster_seconds - phases.seconds["pairs"] - phases.seconds["components"] - phases.seconds["best_of"]
    # The process's peak: VmHWM per phase (resetting VmHWM also resets what getrusage reports as ru_maxrss).
    peak_total = max(phases.peak.values()) if phases.resettable else ru_maxrss()

    with phases("evaluate"):
        scores = evaluate(planted, clusters.kept, clusters.pairs)
    with phases("hash timing"):
        hashing = time_hashes(face_crops(args.crops, args.seed), repeats=3)

    web = None
    if args.copies:
        print(f"web copies: {args.copies} ...", flush=True)
        with phases("web copies"):
            web = web_copy_figures(args.copies, args.seed)

    pairs = clusters.pairs
    s = scores
    print()
    print(f"faces {args.n:,} | 2 cores here: {os.cpu_count()} | load avg {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"{'phase':<34}{'seconds':>9}{'peak RSS MiB':>14}")
    rows = [("generate (not part of dedup)", phases.seconds["generate"], phases.peak["generate"]),
            ("pairs: near_duplicate_pairs (LSH)", phases.seconds["pairs"], phases.peak["pairs"]),
            ("components: connected_components", phases.seconds["components"], phases.peak["components"]),
            ("best_of: kept face per cluster", phases.seconds["best_of"], phases.peak["best_of"]),
            ("distances to kept (the rest)", rest, None),
            ("cluster_faces total", cluster_seconds, phases.peak["cluster_faces"])]
    for name, sec, peak in rows:
        print(f"{name:<34}{sec:>9.1f}{'' if peak is None else f'{peak / 2**20:>14,.0f}'}")
    print(f"cluster_faces: {cluster_seconds:.1f} s (target < {TARGET_SECONDS} s: ratio "
          f"{cluster_seconds / TARGET_SECONDS:.2f}); with generation "
          f"{cluster_seconds + phases.seconds['generate']:.1f} s")
    print(f"peak RSS ({'largest VmHWM of the phases' if phases.resettable else 'ru_maxrss'}, whole process, generated "
          f"data included): {peak_total / GIB:.2f} GiB (target < "
          f"{TARGET_GIB} GiB: ratio {peak_total / GIB / TARGET_GIB:.2f}); RSS holding the generated data before "
          f"clustering: {rss_data / GIB:.2f} GiB (interpreter and imports {rss_start / 2**20:.0f} MiB)"
          + ("" if phases.resettable else " (per-phase peaks are cumulative: clear_refs not allowed here)"))
    print(f"{path}: {pairs.candidates:,} candidate pairs verified, {len(pairs.left):,} near-duplicate pairs found, "
          f"{pairs.oversized_buckets} oversized buckets")
    print(f"clusters of 2+ faces: {s['clusters_2plus']:,} holding {s['faces_in_clusters_2plus']:,} faces; largest "
          f"cluster {s['largest_cluster']:,} faces")
    print(f"recall: planted same-group pairs in one cluster {pct(s['pair_recall'])} (all {s['planted_pairs']:,} "
          f"pairs) | groups fully in one cluster {pct(s['groups_fully_recovered'])}, exactly (nothing else in it) "
          f"{pct(s['groups_exactly_recovered'])} of {s['groups']:,}")
    print(f"precision: same-cluster pairs that are planted same-group pairs {pct(s['pair_precision'])} (of "
          f"{s['same_cluster_pairs']:,}) | faces in clusters without another group or distinct face "
          f"{pct(s['face_precision'])} ({s['mixed_clusters']:,} mixed clusters, "
          f"{s['faces_in_mixed_clusters']:,} faces)")
    chances = 1 if args.mirror_flips == "same" else 2
    print(f"copy-original pairs by planted distance k (mirror flips: {args.mirror_flips}; 'LSH model' = "
          f"1 - (1 - C(64-k,{settings.lsh_bits})/C(64,{settings.lsh_bits}))^({settings.lsh_tables} x {chances})):")
    print(f"{'k':>3}{'copies':>10}{'found as pair':>15}{'same cluster':>14}{'LSH model':>11}{'mirrored: found':>17}")
    for k, v in s["per_distance"].items():
        a, m = v["all"], v["mirrored"]
        print(f"{k:>3}{a['copies']:>10,}{pct(a['pair_found']):>15}{pct(a['same_cluster']):>14}"
              f"{pct(lsh_expected(k, settings.lsh_tables, settings.lsh_bits, chances)):>11}{pct(m['pair_found']):>17}")
    print(f"all copies: found as pair {pct(s['copy_pairs_found'])}, same cluster {pct(s['copy_pairs_same_cluster'])}")
    line = (f"hash per crop (crop + mirror, {hashing['crops']} crops, best of 3): ours "
            f"{hashing['ours_ms_per_crop']:.3f} ms")
    if "imagehash_ms_per_crop" in hashing:
        line += (f" | imagehash {hashing['imagehash']} {hashing['imagehash_ms_per_crop']:.3f} ms (ratio "
                 f"{hashing['imagehash_ms_per_crop'] / hashing['ours_ms_per_crop']:.1f}) | mismatches: hash "
                 f"{hashing['mismatches_hash']}, mirror {hashing['mismatches_mirror']}")
    else:
        line += f" | imagehash {hashing['imagehash']}"
    print(line)
    if web:
        print_web_copies(web)

    figures = {"n": args.n, "seed": args.seed, "dup_share": args.dup_share, "mirrored": args.mirrored,
               "mirror_flips": args.mirror_flips, "settings": settings.model_dump(mode="json"), "path": path,
               "seconds": {k: round(v, 2) for k, v in phases.seconds.items()} | {"rest": round(rest, 2)},
               "cluster_seconds": round(cluster_seconds, 2),
               "peak_rss_gib": round(peak_total / GIB, 3),
               "phase_peak_rss_mib": {k: round(v / 2**20) for k, v in phases.peak.items()},
               "rss_after_generate_gib": round(rss_data / GIB, 3),
               "candidates": pairs.candidates, "pairs": len(pairs.left), "oversized_buckets": pairs.oversized_buckets,
               "scores": scores, "hashing": hashing, "web_copies": web, "load_avg_before": round(load_before, 2)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    print(json.dumps(figures), flush=True)
    if hashing.get("mismatches_hash") or hashing.get("mismatches_mirror"):
        print("bench: our pHash differs from imagehash.phash on some crops", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
