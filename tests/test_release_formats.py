"""Release formats people load directly: Parquet splits via `datasets`, WebDataset tars via `webdataset`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from helpers import offline_config
from quality_helpers import write_synthetic_release

from facecap.cli import main as facecap_main


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    cfg = offline_config(quality={"test_fraction": 0.3, "gallery_size": 2, "ngram_sample": 100})
    return write_synthetic_release(tmp_path_factory.mktemp("formats"), n_images=30, cfg=cfg)


def _table(path: Path):
    return ds.dataset(path, format="parquet").to_table()


def test_split_is_by_source_image_and_deterministic(staged, tmp_path):
    train, test = _table(list((staged / "data").glob("train-*.parquet"))), \
        _table(list((staged / "data").glob("test-*.parquet")))
    assert train.num_rows and test.num_rows
    train_ids, test_ids = set(train.column("image_id").to_pylist()), set(test.column("image_id").to_pylist())
    assert not train_ids & test_ids, "faces of one source image must never straddle the split"
    two_face_images = {i for i in train_ids | test_ids
                       if (train.column("image_id").to_pylist() + test.column("image_id").to_pylist()).count(i) == 2}
    assert two_face_images, "the fixture must hold multi-face images for this test to mean anything"
    info = json.loads((staged / "release.json").read_text())
    assert info["splits"] == {"train": train.num_rows, "test": test.num_rows}
    again = write_synthetic_release(tmp_path, n_images=30, cfg=offline_config(quality={"test_fraction": 0.3}))
    assert {p.name: p.read_bytes() for p in (again / "data").glob("*.parquet")} == \
        {p.name: p.read_bytes() for p in (staged / "data").glob("*.parquet")}, "same input, same split, same bytes"


def test_parquet_release_loads_with_datasets(staged, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from datasets import load_dataset

    info = json.loads((staged / "release.json").read_text())
    loaded = load_dataset("parquet", data_dir=str(staged / "data"), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "test"}
    assert {k: loaded[k].num_rows for k in loaded} == info["splits"]
    row = loaded["train"][0]
    assert row["sample_id"] and len(row["attribute_probs"]) == 40
    assert row["image"].format == "JPEG" and row["image"].size == (row["width"], row["height"])


def test_exported_webdataset_reads_back_with_webdataset(staged, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    assert facecap_main(["export", "webdataset", str(staged), str(out), "--samples-per-shard", "10"]) == 0
    sizes = json.loads((out / "sizes.json").read_text())
    data = _table(staged / "data")
    captions = dict(zip(data.column("sample_id").to_pylist(), data.column("caption").to_pylist()))
    assert sum(sizes.values()) == data.num_rows and max(sizes.values()) == 10
    train_tars = sorted(p.name for p in out.glob("train-*.tar"))
    pattern = str(out / f"train-{{000000..{len(train_tars) - 1:06d}}}.tar")
    # The pipeline open_clip's --train-data builds: tar samples, decode, rename jpg/txt, to_tuple.
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(pattern), wds.tarfile_to_samples(), wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt", meta="json"), wds.to_tuple("__key__", "image", "text", "meta"))
    seen = 0
    for key, image, text, meta in pipeline:
        assert text == captions[key] and meta["sample_id"] == key
        assert image.size == (meta["width"], meta["height"]) and "image" not in meta
        seen += 1
    assert seen == sum(n for name, n in sizes.items() if name.startswith("train-"))
    assert os.path.exists(out / "test-000000.tar")
