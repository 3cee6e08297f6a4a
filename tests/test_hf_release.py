"""The release as people load it: `datasets.load_dataset("parquet", data_dir=RELEASE/data)`.

The release's Parquet files carry the `huggingface` schema metadata `datasets` writes itself,
so a loader gets typed features without being told them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import offline_config
from quality_helpers import write_synthetic_release


@pytest.fixture(scope="module")
def curated(curated_example) -> Path:
    """A real curate run (offline profile) of the example data: one-face and two-face photos among others."""
    out, _, _ = curated_example
    return out / "release"


@pytest.fixture(scope="module")
def full_columns(tmp_path_factory) -> Path:
    """A release with every column (attributes and captions too), through release.assemble."""
    cfg = offline_config(quality={"test_fraction": 0.3})
    return write_synthetic_release(tmp_path_factory.mktemp("hf-full"), n_images=12, cfg=cfg)


def _load(release: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from datasets import load_dataset

    loaded = load_dataset("parquet", data_dir=str(release / "data"), cache_dir=str(tmp_path / "cache"))
    info = json.loads((release / "release.json").read_text())
    assert {k: loaded[k].num_rows for k in loaded} == info["splits"]
    return loaded


# `curated` comes through request.getfixturevalue, which the automatic flow mark cannot see.
@pytest.mark.parametrize("release_fixture", [pytest.param("curated", marks=pytest.mark.flow), "full_columns"])
def test_parquet_files_carry_the_features_datasets_writes(release_fixture, request):
    from datasets import Features

    release = request.getfixturevalue(release_fixture)
    files = sorted((release / "data").glob("*.parquet"))
    assert files
    for path in files:
        schema = pq.read_schema(path)
        written = json.loads(schema.metadata[b"huggingface"])
        # What datasets itself writes for these columns (Features.arrow_schema, as arrow_writer embeds it).
        own = json.loads(Features.from_arrow_schema(schema.remove_metadata()).arrow_schema.metadata[b"huggingface"])
        assert set(written) == set(own) == {"info"} and set(written["info"]) == {"features"}
        features = written["info"]["features"]
        assert list(features) == schema.names
        assert Features.from_dict(features).to_dict() == features
        assert {k: v for k, v in features.items() if k != "image"} == \
            {k: v for k, v in own["info"]["features"].items() if k != "image"}
        assert features["image"] == {"_type": "Image"}


def test_list_columns_load_as_typed_lists(curated, full_columns, tmp_path, monkeypatch):
    from datasets import List, Value

    faces = _load(curated, tmp_path / "curated", monkeypatch)
    for split in faces:
        assert faces[split].features["bbox"] == List(Value("float32"), length=4)
        assert faces[split].features["landmarks"] == List(Value("float32"), length=10)
        for row in faces[split]:
            assert len(row["bbox"]) == 4 and all(isinstance(v, float) for v in row["bbox"])
            assert len(row["landmarks"]) == 10 and all(isinstance(v, float) for v in row["landmarks"])
            x1, y1, x2, y2 = row["bbox"]
            assert 0 <= x1 < x2 <= row["source_width"] and 0 <= y1 < y2 <= row["source_height"]
    full = _load(full_columns, tmp_path / "full", monkeypatch)
    row = full["train"][0]
    assert full["train"].features["attribute_probs"] == List(Value("float32"), length=40)
    assert full["train"].features["attributes"] == List(Value("string"))
    assert len(row["attribute_probs"]) == 40 and all(0.0 <= p <= 1.0 for p in row["attribute_probs"])
    assert row["attributes"] and all(isinstance(a, str) for a in row["attributes"])


def test_image_loads_as_a_pil_image_of_the_recorded_size(curated, tmp_path, monkeypatch):
    from datasets import Image
    from PIL import Image as PILImage

    faces = _load(curated, tmp_path, monkeypatch)
    for split in faces:
        assert faces[split].features["image"] == Image()
        for row in faces[split]:
            assert isinstance(row["image"], PILImage.Image)
            assert row["image"].size == (row["width"], row["height"])

