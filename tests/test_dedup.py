"""Near-duplicate faces: the dedup stage's hashes, the release-wide clusters, keep=best|all, leak-free splits.

The flow tests curate a folder of randomly cropped, rescaled, mirrored and
re-encoded copies of real photos (NASA's astronaut portrait, Kafka's
portrait, scikit-image's cameraman) next to distinct real faces (LFW faces
shipped with scikit-image), through the real flow on a real Dask cluster.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import offline_config, read_release, run_curate
from PIL import Image

from facecap.stages.dedup import DedupSettings
from facecap.example_data import astronaut
from facecap.schema import is_test
from facecap import package_photos
from facecap.stages.base import Counters
from facecap.stages.dedup import (NearDuplicates, assign_split, cluster_faces, component_keys, face_hashes,
                                  published_splits,
                                  grey_thumbnail, hamming, hash_faces, near_duplicate_pairs)
from facecap.webcopies import PERSONS, detect_copies, pair_scores, web_copies, web_copy

def kafka() -> Image.Image:
    return package_photos.photo("kafka")


def cameraman() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.camera()).convert("RGB").resize((768, 768), Image.Resampling.BICUBIC)


def lfw_faces(n: int) -> list[Image.Image]:
    """Distinct real faces: LFW crops (25x25 grey) enlarged and set on a grey canvas so the detector finds them."""
    from skimage import data

    faces = []
    for face in data.lfw_subset()[:n]:
        img = Image.fromarray((face * 255).astype(np.uint8)).convert("RGB")
        img = img.resize((200, 200), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (400, 400), (128, 128, 128))
        canvas.paste(img, (100, 100))
        faces.append(canvas)
    return faces


def copy_of(img: Image.Image, rng: np.random.Generator) -> bytes:
    """A near-duplicate as the web makes them: cropped up to 8 % a side, rescaled 0.7-1.3x, maybe mirrored,
    re-encoded as JPEG at quality 60-95."""
    w, h = img.size
    box = (int(rng.uniform(0, .08) * w), int(rng.uniform(0, .08) * h),
           w - int(rng.uniform(0, .08) * w), h - int(rng.uniform(0, .08) * h))
    img = img.crop(box)
    scale = rng.uniform(0.7, 1.3)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
    return buf.getvalue()


PHOTOS = {"astronaut": (astronaut, 8), "kafka": (kafka, 8), "cameraman": (cameraman, 6)}


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> Path:
    """photo name -> several copies (files <photo>_<i>.jpg), and eight distinct LFW faces (lfw<i>_0.jpg)."""
    folder = folder_whose_photos_use_both_splits(tmp_path_factory.mktemp("copies"))
    folder.mkdir()
    rng = np.random.default_rng(7)
    for name, (load, n) in PHOTOS.items():
        img = load()
        for i in range(n):
            (folder / f"{name}_{i:02d}.jpg").write_bytes(copy_of(img, rng))
    for i, face in enumerate(lfw_faces(8)):
        buf = io.BytesIO()
        face.save(buf, format="JPEG", quality=92)
        (folder / f"lfw{i}_0.jpg").write_bytes(buf.getvalue())
    return folder


def folder_whose_photos_use_both_splits(parent: Path) -> Path:
    """The copies' folder. At test_fraction 0.5 the split fills test with whole groups up to half the faces,
    so both splits hold faces whatever the ids (they hash pytest's temporary path), and a straddling
    cluster would show."""
    return parent / "src"


def photo_of(offset: str) -> str:
    return offset.rsplit("_", 1)[0]


def config(**dedup):
    # Two shards (12 files each): clusters must form across shards. test_fraction 0.5 so that both splits
    # hold faces and a straddling cluster would show.
    return offline_config(ingest={"shard_size": 12}, detect={"min_face_px": 64}, execution={"n_workers": 2},
                          quality={"test_fraction": 0.5, "max_duplicate_image_rate": 0.0}, dedup=dedup)


def split_of(out: Path) -> dict[str, str]:
    """sample_id -> split, from the release's file names."""
    import pyarrow.dataset as ds

    split = {}
    for f in sorted((out / "release" / "data").glob("*.parquet")):
        for sid in ds.dataset(f).to_table(columns=["sample_id"]).column("sample_id").to_pylist():
            split[sid] = f.name.split("-")[0]
    return split


@pytest.fixture(scope="module")
def kept_best(prefect_api_url, copies, tmp_path_factory):
    out = tmp_path_factory.mktemp("best") / "out"
    result = run_curate([copies], out, config(keep="best"))
    return out, result


@pytest.fixture(scope="module")
def kept_all(prefect_api_url, copies, tmp_path_factory):
    out = tmp_path_factory.mktemp("all") / "out"
    result = run_curate([copies], out, config(keep="all"))
    return out, result


def test_keep_all_records_clusters_that_are_the_photos(kept_all, copies):
    out, result = kept_all
    data, rejects = read_release(out)
    assert not rejects or "near_duplicate" not in rejects.column("reason").to_pylist()
    rows = data.select(["sample_id", "source_offset", "dedup_cluster", "dedup_cluster_size"]).to_pylist()
    photos_by_cluster: dict[str, set] = {}
    for r in rows:
        photos_by_cluster.setdefault(r["dedup_cluster"], set()).add(photo_of(r["source_offset"]))
    # Distinct photos are never merged: a cluster holds one photo's copies.
    assert all(len(p) == 1 for p in photos_by_cluster.values()), photos_by_cluster
    # Every copy of a photo was found: one cluster per photo, holding all of its detected faces.
    clusters_by_photo: dict[str, set] = {}
    for r in rows:
        clusters_by_photo.setdefault(photo_of(r["source_offset"]), set()).add(r["dedup_cluster"])
    assert all(len(c) == 1 for c in clusters_by_photo.values()), clusters_by_photo
    for name, (_, n) in PHOTOS.items():
        sizes = {r["dedup_cluster_size"] for r in rows if photo_of(r["source_offset"]) == name}
        assert sizes == {n}, (name, sizes)
    # A cluster lies in one split, and both splits are used (so the check could have failed).
    split = split_of(out)
    for cluster in photos_by_cluster:
        assert len({split[r["sample_id"]] for r in rows if r["dedup_cluster"] == cluster}) == 1
    assert set(split.values()) == {"train", "test"}
    assert result.validation.passed and not result.validation.failed
    report = json.loads((out / "release" / "report" / "report.json").read_text())
    status = {c["name"]: (c["status"], c["observed"]) for c in report["validation"]["checks"]}
    assert status["clusters_in_one_split"] == status["images_in_one_split"] == ("passed", 0)


def test_keep_best_keeps_one_face_per_photo_and_names_it_in_the_rejects(kept_best):
    out, result = kept_best
    data, rejects = read_release(out)
    kept = data.select(["sample_id", "source_offset", "det_score", "width", "dedup_cluster_size"]).to_pylist()
    per_photo: dict[str, int] = {}
    for r in kept:
        per_photo[photo_of(r["source_offset"])] = per_photo.get(photo_of(r["source_offset"]), 0) + 1
    assert {p: n for p, n in per_photo.items() if not p.startswith("lfw")} == {name: 1 for name in PHOTOS}
    assert sum(1 for p in per_photo if p.startswith("lfw")) >= 6  # the distinct faces stay
    near = rejects.filter(pa.compute.equal(rejects.column("reason"), "near_duplicate")).to_pylist()
    assert len(near) == sum(n - 1 for _, n in PHOTOS.values())
    by_id = {r["sample_id"]: r for r in kept}
    for r in near:
        kept_id = re.match(r"near-duplicate of (\S+?),", r["detail"]).group(1)
        winner = by_id[kept_id]
        assert photo_of(winner["source_offset"]) == photo_of(r["source_offset"])
        # The kept face is the best of its cluster: highest det_score (then larger crop).
        assert (winner["det_score"], winner["width"]) >= (r["det_score"], 0)
    funnel = {row.stage: row.to_dict() for row in result.funnel}
    assert funnel["dedup (release-wide)"]["rejects"] == {"near_duplicate": len(near)}
    assert funnel["dedup (release-wide)"]["rows_out"] == data.num_rows
    report = (out / "release" / "report" / "index.html").read_text()
    assert "Near-duplicates" in report and "removed" in report
    shown = re.findall(r'src="(cluster-[0-9]+-[0-9]+\.jpg)"', report)
    assert shown and all((out / "release" / "report" / name).is_file() for name in shown)


def test_a_new_copy_joins_its_cluster_and_only_its_shard_is_computed(kept_best, copies, tmp_path):
    out, _ = kept_best
    grown = tmp_path / "src"
    shutil.copytree(copies, grown)
    work = tmp_path / "out"
    shutil.copytree(out, work)
    # Same sources under a new path would change every key: curate the copy once, then add the file.
    run_curate([grown], work, config(keep="best"))
    (grown / "zz_kafka_new.jpg").write_bytes(copy_of(kafka(), np.random.default_rng(99)))
    result = run_curate([grown], work, config(keep="best"))
    funnel = {row.stage: row.to_dict() for row in result.funnel}
    assert funnel["dedup"]["shards"] == 3 and funnel["dedup"]["cached"] == 2  # only the new file's shard ran
    data, rejects = read_release(work)
    kafkas = [r for r in data.select(["source_offset"]).to_pylist() if "kafka" in r["source_offset"]]
    assert len(kafkas) == 1
    near = [r for r in rejects.to_pylist() if r["reason"] == "near_duplicate" and "kafka" in r["source_offset"]]
    assert len(near) == PHOTOS["kafka"][1]  # the eight copies, one of them the new one or the old winner


# --- units: hashes and clustering ---------------------------------------------------------------

def astronaut_crops(n: int = 12) -> list[np.ndarray]:
    img = np.asarray(astronaut())
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(n):
        x, y, s = int(rng.integers(150, 190)), int(rng.integers(40, 80)), int(rng.integers(110, 170))
        crops.append(np.ascontiguousarray(img[y:y + s, x:x + s]))
    return crops


def test_phash_is_imagehash_phash_bit_for_bit():
    imagehash = pytest.importorskip("imagehash")
    crops = astronaut_crops()
    hashes, mirrors = face_hashes(np.stack([grey_thumbnail(c) for c in crops]))
    for crop, h, m in zip(crops, hashes, mirrors):
        assert int(h) == int(str(imagehash.phash(Image.fromarray(crop))), 16)
        mirrored = Image.fromarray(crop).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert int(m) == int(str(imagehash.phash(mirrored)), 16)


def test_hash_faces_rejects_a_damaged_crop_and_hashes_the_rest(web_faces):
    faces = web_faces["faces"].slice(0, 2)
    damaged = faces.column("image").to_pylist()
    damaged[1] = damaged[1][:200]
    table = faces.set_column(faces.column_names.index("image"), "image", pa.array(damaged, pa.binary()))
    counters = Counters()
    chunks = list(hash_faces([table], offline_config().image, counters))
    kept = pa.concat_tables([c.kept for c in chunks if c.kept is not None])
    rejected = pa.concat_tables([c.rejected for c in chunks if c.rejected is not None])
    assert kept.column("sample_id").to_pylist() == faces.column("sample_id").to_pylist()[:1]
    assert rejected.column("reason").to_pylist() == ["decode_error"]
    assert rejected.column("sample_id").to_pylist() == faces.column("sample_id").to_pylist()[1:]
    assert counters.rows_in == 2 and counters.rows_out == 1


# --- web copies of real photos: what the hash must survive ---------------------------------------

WEB_COPIES = 96


@pytest.fixture(scope="module")
def web_faces():
    """Faces the offline detector finds in web copies of the six packaged photos, labelled with their person,
    hashed by the stage, clustered and split by its release pass (keep=best, test_fraction 0.05)."""
    copies = web_copies(WEB_COPIES, seed=3)
    faces, rejects = detect_copies(copies)
    chunks = list(hash_faces([faces], offline_config().image, Counters()))
    hashed = pa.concat_tables([c.kept for c in chunks if c.kept is not None])
    records = faces.select(["sample_id", "image_id", "det_score", "width"]).append_column(
        "phash", hashed.column("phash")).append_column("phash_mirror", hashed.column("phash_mirror"))
    release = NearDuplicates(DedupSettings(keep="best"), test_fraction=0.05)
    release.fit(records)
    return {"copies": copies, "faces": faces, "hashed": hashed, "records": records, "release": release,
            "persons": faces.column("person").to_pylist()}


def test_web_copies_are_deterministic_and_their_boxes_find_the_detected_faces(web_faces):
    copies = web_faces["copies"]
    assert web_copies(5, seed=3) == copies[:5]  # copy i depends on (seed, i) only
    assert web_copies(5, seed=4) != copies[:5]
    ops = {op for name, _, _ in copies for op in name.split("_")[2].split("-")}
    assert {"crop", "edge", "rotate", "mirror", "scale", "colour"} <= ops
    for name, data, boxes in copies:
        w, h = Image.open(io.BytesIO(data)).size
        assert all(0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h for _, b in boxes), name
    # Every detected face lies where a carried box says a person's face is: the transforms are tracked right.
    persons = web_faces["persons"]
    assert len(persons) >= 40 and None not in persons
    assert set(persons) == set(PERSONS)


def test_web_copies_pair_recall_and_precision(web_faces):
    persons, release = web_faces["persons"], web_faces["release"]
    now = pair_scores(persons, release.kept_index.tolist())
    # The pHash of the whole crop (padding, background and scale included), on the same faces.
    thumbs = np.stack([grey_thumbnail(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
                       for b in web_faces["faces"].column("image").to_pylist()])
    h, m = face_hashes(thumbs)
    before = pair_scores(persons, cluster_faces(h, m, np.arange(len(h)), DedupSettings()).kept.tolist())
    assert now["pair_precision"] == 1.0 and now["mixed_clusters"] == 0
    assert now["pair_recall"] >= 0.75, (now, before)
    assert now["pair_recall"] > before["pair_recall"], (now, before)


def test_the_group_photos_six_people_never_merge(web_faces):
    persons = np.array(web_faces["persons"], dtype=object)
    kept = web_faces["release"].kept_index
    for cluster in np.unique(kept):
        assert len(set(persons[kept == cluster])) == 1, set(persons[kept == cluster])
    # Pairwise, faces of two different people (group copies, also mirrored ones) are never within max_distance.
    h = web_faces["hashed"].column("phash").to_numpy().astype(np.uint64)
    m = web_faces["hashed"].column("phash_mirror").to_numpy().astype(np.uint64)
    group = np.flatnonzero([p.startswith("group") for p in persons])
    d = np.minimum(np.minimum(hamming(h[group, None], h[None, group]), hamming(h[group, None], m[None, group])),
                   hamming(m[group, None], h[None, group]))
    other = persons[group][:, None] != persons[group][None, :]
    assert d[other].min() > DedupSettings().max_distance


def test_the_hash_sees_the_face_not_the_padding_of_a_crop_cut_at_the_image_edge():
    """Faces of the group photo from plain copies and from copies cut through or next to a face (the aligned
    crop then runs past the image and is padded black): same-person pairs, one padded and one not, are closer
    by the face-normalised hash than by the whole crop's pHash."""
    copies = [web_copy(i, seed=0) for i in range(2, 600, 6)]  # the group photo's copies
    edge = [c for c in copies if "edge" in c[0]][:10]
    plain = [c for c in copies if c[0].split("_")[2].startswith("q")][:3]
    faces, _ = detect_copies(plain + edge)
    hashed = pa.concat_tables([c.kept for c in hash_faces([faces], offline_config().image, Counters()) if c.kept])
    persons = faces.column("person").to_pylist()
    pad = faces.column("pad_fraction").to_pylist()
    h = hashed.column("phash").to_numpy().astype(np.uint64)
    m = hashed.column("phash_mirror").to_numpy().astype(np.uint64)
    thumbs = np.stack([grey_thumbnail(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
                       for b in faces.column("image").to_pylist()])
    ch, cm = face_hashes(thumbs)
    now, before = [], []
    for i, p in enumerate(persons):
        for j in range(i):
            if persons[j] == p and (pad[i] > 0.02) != (pad[j] > 0.02):  # one padded crop, one whole
                now.append(min(hamming(h[i], h[j]), hamming(h[i], m[j]), hamming(m[i], h[j])))
                before.append(min(hamming(ch[i], ch[j]), hamming(ch[i], cm[j]), hamming(cm[i], ch[j])))
    assert len(now) >= 5
    limit = DedupSettings().max_distance
    assert np.median(now) < np.median(before), (now, before)
    assert np.mean(np.array(now) <= limit) > np.mean(np.array(before) <= limit), (now, before)


# --- splits: whole components, as close to the target as their sizes allow ---------------------

def test_split_share_reaches_the_target_with_one_big_component(web_faces):
    """The web copies' release: the group photo's faces form one large component (its six people share
    source images). The per-leader rule put it wherever its leader's hash fell; now it goes to train with a
    warning naming it, and the other components fill test."""
    release, records = web_faces["release"], web_faces["records"]
    split = release.stats["split"]
    kept = release.kept_index == np.arange(records.num_rows)
    assert split["oversized"] and split["oversized"][0]["size"] > 0.05 * kept.sum()
    assert split["oversized"][0]["leader"] in records.column("sample_id").to_pylist()
    assert abs(split["achieved"] - 0.05) <= 1 / kept.sum()  # one face of the kept ones at most
    # A larger corpus of the same shape: one component with 40 % of the faces, 300 small ones of 1-6 faces.
    rng = np.random.default_rng(0)
    small = rng.integers(1, 7, size=300)
    big = int(0.4 * small.sum() / 0.6)
    groups = np.repeat(np.arange(301), np.r_[big, small])
    image_ids = pa.array([f"img{g:04d}-{i}" for i, g in enumerate(groups)])
    for fraction in (0.05, 0.1, 0.3):
        s = assign_split(groups, image_ids, fraction)
        assert abs(s.achieved - fraction) <= small.max() / 2 / len(groups), (fraction, s.achieved)
        assert [c["size"] for c in s.oversized] == [big] and not s.test[groups == 0].any()
        # Whole components: no component straddles.
        assert all(len(set(s.test[groups == g])) == 1 for g in range(301))
        # The rule of before (a group goes where its leader's hash falls), for comparison.
        old = is_test([f"img{g:04d}-{np.flatnonzero(groups == g)[0]}" for g in range(301)], fraction)
        old_share = np.asarray(old)[groups].mean()
        assert abs(s.achieved - fraction) <= abs(old_share - fraction)


def test_the_card_report_and_log_show_the_achieved_share_and_name_the_big_component(web_faces):
    from facecap.stages.dedup import Dedup

    release = web_faces["release"]
    stats = release.summary()
    split, big = stats["split"], stats["split"]["oversized"][0]
    info = {"split_by": release.split_by, "release_passes": {"dedup": stats}}
    notes = Dedup.card_notes(info)
    assert f"{split['achieved']:.1%}" in notes["split"] and f"{split['target']:.1%}" in notes["split"]
    assert big["leader"] in notes["warning"] and f"{big['size']:,} faces" in notes["warning"]
    html = Dedup.report.html({"release": {"release_passes": {"dedup": stats}}})
    assert f"{split['achieved']:.2%}" in html and big["leader"] in html
    assert big["leader"] in release.outcome() and f"{split['achieved']:.2%}" in release.outcome()


def test_web_copy_groups_keep_their_split_when_more_copies_are_added(web_faces):
    """The release of the fixture's copies, then of those plus 48 more (new sources): every old group that
    neither merged nor changed its leader keeps its side, unless its key lies between the two cuts."""
    more = web_copies(WEB_COPIES + 48, seed=3)[WEB_COPIES:]
    faces, _ = detect_copies(more)
    hashed = pa.concat_tables([c.kept for c in hash_faces([faces], offline_config().image, Counters()) if c.kept])
    new = faces.select(["sample_id", "image_id", "det_score", "width"]).append_column(
        "phash", hashed.column("phash")).append_column("phash_mirror", hashed.column("phash_mirror"))
    old_records, first = web_faces["records"], web_faces["release"]
    for fraction in (0.05, 0.3):
        before, after = NearDuplicates(DedupSettings(keep="best"), fraction), \
            NearDuplicates(DedupSettings(keep="best"), fraction)
        before.fit(old_records)
        after.fit(pa.concat_tables([old_records, new]))
        n_old = old_records.num_rows
        ids = np.array(old_records.column("image_id").to_pylist())
        low, high = sorted((before.split.cut, after.split.cut))
        kept_side = 0
        for g in np.unique(before.groups):
            members = np.flatnonzero(before.groups == g)
            now = np.flatnonzero(after.groups[:n_old] == after.groups[members[0]])
            merged = not np.array_equal(members, now)
            leader_changed = after.groups[n_old:].tolist().count(after.groups[members[0]]) and \
                min(np.r_[ids[members], np.array(new.column("image_id").to_pylist())[
                    after.groups[n_old:] == after.groups[members[0]]]]) != min(ids[members])
            if merged or leader_changed:
                continue
            key = int(component_keys([min(ids[members])])[0])
            if before.test[members[0]] != after.test[members[0]]:
                assert low <= key <= high, (g, key, low, high)
            else:
                kept_side += 1
        assert kept_side >= 1
    assert first.split.components == before.split.components  # the fixture's release, refitted alike


def test_a_split_is_deterministic_and_stable_when_sources_are_added():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 8, size=400)
    groups = np.repeat(np.arange(400), sizes)
    ids = [f"src-a/{g}/{i}" for i, g in enumerate(groups)]
    first = assign_split(groups, pa.array(ids), 0.1)
    assert np.array_equal(first.test, assign_split(groups, pa.array(ids), 0.1).test)
    # The same components in another order: each keeps its split.
    order = rng.permutation(len(groups))
    shuffled = assign_split(groups[order], pa.array([ids[i] for i in order]), 0.1)
    assert np.array_equal(shuffled.test, first.test[order])
    # New sources: 100 new components. Old components keep their split, except those whose key lies between
    # the old cut and the new one.
    more = rng.integers(1, 8, size=100)
    groups2 = np.r_[groups, np.repeat(np.arange(400, 500), more)]
    ids2 = ids + [f"src-b/{g}/{i}" for i, g in enumerate(groups2[len(groups):])]
    second = assign_split(groups2, pa.array(ids2), 0.1)
    assert abs(second.achieved - 0.1) <= 7 / 2 / len(groups2)
    leaders = [ids[np.flatnonzero(groups == g)[0]] for g in range(400)]
    keys = component_keys(leaders)
    was, now = first.test[np.searchsorted(groups, np.arange(400))], second.test[np.searchsorted(groups, np.arange(400))]
    flipped = np.flatnonzero(was != now)
    low, high = sorted((first.cut, second.cut))
    assert all(low <= int(keys[g]) <= high for g in flipped)
    assert len(flipped) <= 0.03 * 400, len(flipped)


def test_with_the_published_split_every_group_that_does_not_merge_keeps_its_side(tmp_path):
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 8, size=400)
    groups = np.repeat(np.arange(400), sizes)
    ids = [f"src-a/{g}/{i}" for i, g in enumerate(groups)]
    first = assign_split(groups, pa.array(ids), 0.1)
    # The published release, as the release writes it: data/<split>-NNNNN.parquet and its split summary.
    release = tmp_path / "release"
    (release / "data").mkdir(parents=True)
    for side, flag in (("test", True), ("train", False)):
        pq.write_table(pa.table({"image_id": [i for i, t in zip(ids, first.test) if t == flag]}),
                       release / "data" / f"{side}-00000.parquet")
    (release / "release.json").write_text(json.dumps({"release_passes": {"dedup": {"split": {"target": 0.1}}}}))
    assert published_splits(str(release), 0.2) is None  # another target re-draws the split
    published = published_splits(str(release), 0.1)

    # New sources: 150 new groups, and one new face that links an old test group with an old train group.
    more = rng.integers(1, 8, size=150)
    groups2 = np.r_[groups, np.repeat(np.arange(400, 550), more)]
    ids2 = ids + [f"src-b/{g}/{i}" for i, g in enumerate(groups2[len(groups):])]
    test_group = int(groups[np.flatnonzero(first.test)[0]])
    train_group = int(groups[np.flatnonzero(~first.test)[0]])
    groups2[groups2 == train_group] = test_group  # the merge
    image_ids = pa.array(ids2)
    previous = np.full(len(ids2), -1, np.int8)
    previous[pc.is_in(image_ids, value_set=published[1]).to_numpy(zero_copy_only=False)] = 0
    previous[pc.is_in(image_ids, value_set=published[0]).to_numpy(zero_copy_only=False)] = 1
    second = assign_split(groups2, image_ids, 0.1, previous=previous)
    old = np.arange(len(ids))
    unmerged = ~np.isin(groups2[old], [test_group])
    assert np.array_equal(second.test[old][unmerged], first.test[old][unmerged])  # not one old group moved
    assert second.kept == 398
    assert abs(second.achieved - 0.1) <= 0.02, second.achieved  # the new groups fill toward the target
    # Without the published split the fill order alone decides, and some old groups change side.
    assert not np.array_equal(assign_split(groups2, image_ids, 0.1).test[old][unmerged], first.test[old][unmerged])


def planted(n_distinct: int, groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random hashes plus groups of copies (2-6 bit flips from the group's first, some mirrored); group per face."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, size=n_distinct, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    mirrors = rng.integers(0, 2**63, size=n_distinct, dtype=np.int64).astype(np.uint64)
    group = list(range(n_distinct))
    h, m = list(hashes), list(mirrors)
    for g in range(groups):
        base, base_m = h[g], m[g]
        for _ in range(int(rng.integers(1, 5))):
            flips = np.uint64(0)
            for bit in rng.choice(64, size=int(rng.choice([0, 2, 4])), replace=False):
                flips |= np.uint64(1) << np.uint64(int(bit))
            copy, copy_m = base ^ flips, base_m ^ flips
            if rng.random() < 0.5:
                copy, copy_m = copy_m, copy
            h.append(copy)
            m.append(copy_m)
            group.append(g)
    return np.array(h, np.uint64), np.array(m, np.uint64), np.array(group)


def brute_force_pairs(h: np.ndarray, m: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    d = np.minimum(np.minimum(hamming(h[:, None], h[None, :]), hamming(h[:, None], m[None, :])),
                   hamming(m[:, None], h[None, :]))
    a, b = np.nonzero(np.triu(d <= max_distance, 1))
    return set(zip(a.tolist(), b.tolist()))


def test_lsh_pairs_are_true_pairs_and_find_the_planted_copies():
    h, m, group = planted(3000, 300)
    settings = DedupSettings()
    pairs = near_duplicate_pairs(h, m, settings.max_distance, settings.lsh_tables, settings.lsh_bits)
    found = set(zip(pairs.left.tolist(), pairs.right.tolist()))
    truth = brute_force_pairs(h, m, settings.max_distance)
    assert found <= truth  # every pair reported is within max_distance
    # LSH misses some pairs near max_distance (bench/README.md gives recall by distance); close pairs it finds.
    assert len(found) >= 0.9 * len(truth)
    close = brute_force_pairs(h, m, 4)
    assert len(found & close) >= 0.95 * len(close)
    # Exact duplicates are always found (every table's bits agree).
    exact = brute_force_pairs(h, m, 0)
    assert exact <= found
    assert pairs.candidates < len(h) * 50  # no all-pairs work
    # Up to dedup.exact_max_faces, every pair is compared: exactly the brute-force pairs.
    exact = near_duplicate_pairs(h, m, settings.max_distance, exact_max=len(h))
    assert set(zip(exact.left.tolist(), exact.right.tolist())) == truth


def test_clusters_do_not_depend_on_the_order_of_faces():
    h, m, group = planted(2000, 200, seed=1)
    rank = np.random.default_rng(2).permutation(len(h))
    settings = DedupSettings()
    first = cluster_faces(h, m, rank, settings)
    order = np.random.default_rng(3).permutation(len(h))
    second = cluster_faces(h[order], m[order], rank[order], settings)
    # Map the second run's kept indices back to the original faces: the same face is kept for every face.
    assert np.array_equal(order[second.kept], first.kept[order])
    # Distinct planted groups are never merged.
    for kept in np.unique(first.kept):
        assert len(set(group[first.kept == kept])) == 1


def test_the_kept_face_is_the_best_and_splits_follow_groups_not_order():
    h = np.array([0, 0b11, 0, 2**40 - 1, (2**40 - 1) | 2**50], np.uint64)  # faces 0-2 alike, and 3-4
    table = pa.table({"sample_id": ["e-00", "c-00", "d-00", "a-00", "b-00"], "image_id": ["e", "c", "d", "a", "x"],
                      "source": ["/s"] * 5, "source_offset": ["e", "c", "d", "a", "x"], "bbox": [[0, 0, 9, 9]] * 5,
                      "det_score": pa.array([0.99, 0.995, 0.995, 0.9, 0.9], pa.float32()),
                      "width": pa.array([200, 150, 180, 100, 100], pa.int32()),
                      "phash": pa.array(h), "phash_mirror": pa.array(~h)})
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        p = NearDuplicates(DedupSettings(keep="best"), test_fraction=0.5)
        p.fit(table.take(order))
        kept, index, rejects = p.apply(np.arange(5), table.take(order))
        results.append((sorted(kept.column("sample_id").to_pylist()),
                        dict(zip(kept.column("sample_id").to_pylist(), kept.column("_test").to_pylist()))))
        # d-00 beats c-00 (same score, larger crop) and e-00 (lower score); a-00 beats b-00 by sample_id.
        assert sorted(kept.column("sample_id").to_pylist()) == ["a-00", "d-00"]
        assert sorted(rejects.column("sample_id").to_pylist()) == ["b-00", "c-00", "e-00"]
    assert results[0] == results[1]


# --- identity grouping (split only) -------------------------------------------------------------

def test_identity_is_off_offline_with_the_reason_and_fetched_in_full(tmp_path, monkeypatch):
    import dataclasses
    import socket

    from facecap.chain import plan_run
    from facecap.config import Config
    from facecap.models import catalog
    from facecap.models.identity import plan_identity
    from facecap.models.weights import WeightsError

    plan = plan_run(offline_config())
    assert plan.stages["dedup"].on and plan.stages["dedup"].model is None
    assert plan.stages["dedup"].info["identity"].startswith("off: offline profile")
    # The full profile fetches the weights on planning; GitHub is out of reach here, so the catalog entry
    # points at a closed local port (the download's boundary) and the plan must fail saying what to do.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/20180402-114759-vggface2.pt"
    entry = dataclasses.replace(catalog.CATALOG[catalog.FACENET_KEY], urls=(url,))
    monkeypatch.setitem(catalog.CATALOG, catalog.FACENET_KEY, entry)
    full = Config.model_validate({"models": {"cache_dir": str(tmp_path), "allow_addresses": ["127.0.0.1/32"]}})
    with pytest.raises(WeightsError) as missing:
        plan_identity(full)
    for needed in (url, "facecap models fetch --profile full", "dedup.identity=off", "dedup.identity_weights"):
        assert needed in str(missing.value)
    off = Config.model_validate({"models": {"cache_dir": str(tmp_path)}, "dedup": {"identity": "off"}})
    assert plan_identity(off) == (None, "dedup.identity is off: the split keeps clusters and source images "
                                        "together, not persons")


def test_identity_links_group_the_split_and_are_never_released(prefect_api_url, copies, tmp_path):
    """Random weights of the real FaceNet architecture (the real ones cannot be downloaded here): the embeddings
    mean nothing, so the test links every face (identity_max_distance=64) and checks the mechanism only."""
    import torch

    from facecap.models.facenet import InceptionResnetV1

    torch.manual_seed(0)
    weights = tmp_path / "facenet-random.pt"
    torch.save(InceptionResnetV1().state_dict(), weights)
    out = tmp_path / "out"
    cfg = config(keep="all", identity="on", identity_weights=str(weights), identity_max_distance=64)
    result = run_curate([copies], out, cfg)
    data, _ = read_release(out)
    assert "identity_hash" not in data.column_names
    assert data.num_rows >= 20
    assert len(set(split_of(out).values())) == 1  # every face linked: one group, one split
    info = json.loads((out / "release" / "release.json").read_text())
    assert info["stages"]["dedup"]["model"].startswith("facenet-vggface2:")
    assert info["release_passes"]["dedup"]["identity_links"] > 0
    assert "identity" in info["split_by"]
    assert "used for the split only and are never released" in (out / "release" / "README.md").read_text()
    assert result.validation.failed == []


def test_a_cluster_on_both_sides_of_the_split_fails_its_check(tmp_path):
    """The check could fail: move one face of a cluster into the other split's file."""
    import pyarrow.parquet as pq
    from quality_helpers import write_synthetic_release

    from facecap.quality.validate import validate_release

    staged = write_synthetic_release(tmp_path / "out", n_images=20)
    tables = {f: pq.read_table(f) for f in sorted((staged / "data").glob("*.parquet"))}
    # A face of a cluster of several (the synthetic crops are cut from one photo), moved to the other split.
    source, table = next((f, t) for f, t in tables.items() if max(t.column("dedup_cluster_size").to_pylist()) > 1)
    row = table.column("dedup_cluster_size").to_pylist().index(max(table.column("dedup_cluster_size").to_pylist()))
    other = staged / "data" / ("test-00009.parquet" if source.name.startswith("train") else "train-00009.parquet")
    pq.write_table(table.slice(row, 1), other)
    pq.write_table(pa.concat_tables([table.slice(0, row), table.slice(row + 1)]), source)
    verdict = validate_release(str(staged), log=lambda _: None)
    assert verdict.failed == ["clusters_in_one_split"]


def test_the_offline_plan_does_not_import_torch():
    """Identity is off offline, so planning the chain must not pay for importing the model's torch."""
    code = ("import sys\nfrom facecap.config import Config\nfrom facecap.chain import plan_run\n"
            "plan = plan_run(Config(profile='offline'))\n"
            "assert plan.stages['dedup'].on and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
