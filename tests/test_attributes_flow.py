"""The annotate stage inside the curate flow: real Prefect API, real Dask, real photos, a train-attributes model.

The attribute model is a tiny ViT trained for a few steps by train_attributes on
synthetic data: random for faces, so its labels mean nothing. The test derives
its expectations from the probabilities the release records.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from attribute_helpers import write_celeba_parquet
from helpers import offline_config, read_release, run_curate
from test_flow import sources

from facecap.config import Config
from facecap.models.attributes import load_attribute_model
from facecap.schema import Reason
from facecap.stages.annotate import ATTRIBUTE_FIELDS, AnnotateReason
from facecap.stages.annotate import resolve_attributes
from facecap.training.attributes import train_attributes


@pytest.fixture(scope="module")
def attribute_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("attr-model")
    path, _ = write_celeba_parquet(root / "celeba.parquet", n=48, row_group=16)
    cfg = Config(profile="offline", attributes={"train": {"arch": "vit-tiny", "max_steps": 3, "batch_size": 16,
                                                          "num_workers": 0, "threads": 1}})
    return train_attributes(str(path), str(root / "out"), cfg, log=lambda line: None)["model_dir"]


def _cfg(model_dir: str, **attributes):
    # Quality suites (their own tests) would judge this random model's labels and captions; not the point here.
    return offline_config(ingest={"shard_size": 4}, execution={"n_workers": 2}, quality={"enabled": False},
                          attributes={"backend": "classifier", "model": model_dir, **attributes})


def test_curate_annotates_faces_and_applies_min_attributes(prefect_api_url, example_dir, tmp_path,
                                                            attribute_model_dir):
    out = tmp_path / "out"
    # Run 1: every detected face is kept, with every attribute kept (keep_threshold=0; the caption stage
    # after annotate drops faces without any), so the release shows every face's probabilities.
    result = run_curate(sources(example_dir), out, _cfg(attribute_model_dir, keep_threshold=0.0, min_attributes=0))
    data, rejects = read_release(out)
    release = json.loads((out / "release" / "release.json").read_text())
    annotate = release["stages"]["annotate"]
    assert annotate["status"] == "on" and annotate["model"].startswith("classifier:model@sha256:")
    assert {f.name for f in ATTRIBUTE_FIELDS} <= set(data.column_names)
    faces = data.num_rows
    funnel = {row.stage: row.to_dict() for row in result.funnel}
    assert faces == result.records == funnel["detect"]["rows_out"] == funnel["annotate"]["rows_out"] > 0
    assert set(data.column("attribute_model").to_pylist()) == {annotate["model"]}
    assert not rejects.filter(rejects.column("stage").to_numpy(zero_copy_only=False) == "annotate").num_rows
    # The recorded probabilities are the model's on the released crops, and the labels follow from them.
    model = load_attribute_model(Config(profile="offline", attributes={"backend": "classifier",
                                                                      "model": attribute_model_dir}))
    from io import BytesIO

    from PIL import Image

    images = [Image.open(BytesIO(v["bytes"])) for v in data.column("image").to_pylist()]
    probs = np.asarray(data.column("attribute_probs").to_pylist(), np.float32)
    np.testing.assert_allclose(probs, model.predict(images), rtol=1e-4, atol=1e-5)
    for row, p in zip(data.select(["attributes", "absent_attributes", "attribute_rules"]).to_pylist(), probs):
        r = resolve_attributes(p, 0.0, 0.15)
        assert (row["attributes"], row["absent_attributes"], row["attribute_rules"]) == (r.kept, r.absent, r.rules)

    # Run 2, same output: only annotate reruns. A keep threshold where the faces' label counts differ and
    # min_attributes at their maximum reject some faces as few_attributes and keep the others.
    def counts_at(t):
        return [len(resolve_attributes(p, t, 0.15).kept) for p in probs]

    keep = float(max(np.unique(probs), key=lambda t: (np.ptp(counts_at(t)), -abs(t - 0.5))))
    counts = counts_at(keep)
    minimum = max(counts)
    expected_kept = sorted(s for s, c in zip(data.column("sample_id").to_pylist(), counts) if c >= minimum)
    assert 0 < len(expected_kept) < faces
    result2 = run_curate(sources(example_dir), out, _cfg(attribute_model_dir, keep_threshold=keep,
                                                         min_attributes=minimum))
    data2, rejects2 = read_release(out)
    few = rejects2.filter(rejects2.column("reason").to_numpy(zero_copy_only=False) == AnnotateReason.FEW_ATTRIBUTES)
    assert data2.column("sample_id").to_pylist() == expected_kept
    assert data2.num_rows + few.num_rows == faces, "kept + few_attributes rejects = detected faces"
    assert set(few.column("stage").to_pylist()) == {"annotate"}
    assert sorted(few.column("sample_id").to_pylist() + expected_kept) == sorted(data.column("sample_id").to_pylist())
    funnel = {row.stage: row.to_dict() for row in result2.funnel}
    assert funnel["annotate"]["rows_in"] == faces and funnel["annotate"]["rows_out"] == len(expected_kept)
    assert funnel["detect"]["cached"] == funnel["detect"]["shards"], "detect must be reused, not recomputed"
