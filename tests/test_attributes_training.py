"""facecap train-attributes: CelebA readers, learnability, resume, export into the annotate stage, the CLI.

Models are tiny ViTs (2 layers, hidden 32, 32 px) trained on synthetic
CelebA-format data whose Eyeglasses label is drawn as a red band; the other 39
labels are random, so only the band can be learnt.
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
from attribute_helpers import BAND_ATTRIBUTE, synthetic_image, write_celeba_official, write_celeba_parquet
from PIL import Image
from safetensors.numpy import load_file

from facecap.attributes import ATTRIBUTES
from facecap.cli import main
from facecap.settings import ConfigError
from facecap.config import Config
from facecap.models.attributes import CALIBRATION_FILE, load_attribute_model
from facecap.training.attributes import train_attributes
from facecap.training.celeba import TEST, TRAIN, VALID, load_celeba

BAND = ATTRIBUTES.index(BAND_ATTRIBUTE)


def _cfg(**train) -> Config:
    base = {"arch": "vit-tiny", "lr": 3e-3, "batch_size": 32, "warmup_steps": 5, "num_workers": 0, "threads": 1,
            "log_every": 10, "checkpoint_every": 50, "eval_batch_size": 64}
    return Config(profile="offline", attributes={"train": {**base, **train}})


def test_both_layouts_are_read_with_their_splits(tmp_path):
    root, labels = write_celeba_official(tmp_path / "official", n=40)
    data = load_celeba(root)
    np.testing.assert_array_equal(data.labels, labels)
    assert [len(data.indices(s)) for s in (TRAIN, VALID, TEST)] == [28, 6, 6]
    assert Image.open(io.BytesIO(data.image_bytes(5))).size == (40, 40)

    path, plabels = write_celeba_parquet(tmp_path / "pq" / "train.parquet", n=80, row_group=16)
    pdata = load_celeba(path, held_out_fraction=0.25)
    np.testing.assert_array_equal(pdata.labels, plabels)
    held_out = {pdata.image_bytes(i) for i in pdata.indices(VALID)}
    assert 8 <= len(held_out) <= 32 and not len(pdata.indices(TEST))
    # The held-out choice follows image content, not row order: reversed rows hold out the same images.
    table = pq.read_table(path)
    pq.write_table(table.take(list(range(79, -1, -1))), tmp_path / "reversed.parquet", row_group_size=16)
    rdata = load_celeba(tmp_path / "reversed.parquet", held_out_fraction=0.25)
    assert {rdata.image_bytes(i) for i in rdata.indices(VALID)} == held_out
    # DataLoader worker processes receive the data pickled: both layouts must survive that.
    for d in (data, pdata):
        assert pickle.loads(pickle.dumps(d)).image_bytes(3) == d.image_bytes(3)


def test_malformed_celeba_data_is_a_clear_error(tmp_path):
    root, _ = write_celeba_official(tmp_path / "official", n=10)
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    (root / "list_attr_celeba.txt").write_text("\n".join(lines[:5] + [lines[5] + " 1"] + lines[6:]) + "\n")
    with pytest.raises(ConfigError, match="list_attr_celeba.txt:6"):
        load_celeba(root)
    path, _ = write_celeba_parquet(tmp_path / "pq.parquet", n=8)
    table = pq.read_table(path).drop_columns(["Bald"])
    pq.write_table(table, tmp_path / "nobald.parquet")
    with pytest.raises(ConfigError, match="Bald"):
        load_celeba(tmp_path / "nobald.parquet")


@pytest.mark.slow
def test_training_learns_a_visible_attribute_and_annotate_loads_the_result(tmp_path):
    root, _ = write_celeba_official(tmp_path / "celeba", n=300, seed=1)
    lines: list[str] = []
    result = train_attributes(str(root), str(tmp_path / "out"), _cfg(max_steps=150), log=lines.append)
    metrics = json.loads((tmp_path / "out" / "model" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["samples"] == 45 and result["steps"] == 150
    band_ap = metrics["per_attribute"][BAND_ATTRIBUTE]["ap"]
    others = [v["ap"] for k, v in metrics["per_attribute"].items() if k != BAND_ATTRIBUTE and v["ap"] is not None]
    assert band_ap > 0.9, f"the band attribute should be learnt (AP {band_ap:.3f})"
    assert np.mean(others) < band_ap - 0.3, "random labels must not look learnt"
    assert any(line.startswith("step 150/150") for line in lines) and any("checkpoint" in line for line in lines)

    model_dir = tmp_path / "out" / "model"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", CALIBRATION_FILE} <= {
        p.name for p in model_dir.iterdir()}
    model = load_attribute_model(Config(profile="offline", attributes={"backend": "classifier",
                                                                      "model": str(model_dir)}))
    rng = np.random.default_rng(7)
    with_band = [Image.open(io.BytesIO(synthetic_image(rng, True))) for _ in range(16)]
    without = [Image.open(io.BytesIO(synthetic_image(rng, False))) for _ in range(16)]
    p_with, p_without = model.predict(with_band)[:, BAND], model.predict(without)[:, BAND]
    assert p_with.mean() > p_without.mean() + 0.4, (p_with, p_without)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    path, _ = write_celeba_parquet(tmp_path / "data.parquet", n=96, row_group=24)
    cfg = _cfg(max_steps=12, batch_size=16, checkpoint_every=4, log_every=4)
    train_attributes(str(path), str(tmp_path / "straight"), cfg, log=lambda line: None)

    class Killed(Exception):
        pass

    def die_after_second_checkpoint(line: str) -> None:
        if line == "checkpoint step-0000008 written":
            raise Killed(line)

    with pytest.raises(Killed):
        train_attributes(str(path), str(tmp_path / "resumed"), cfg, log=die_after_second_checkpoint)
    assert not (tmp_path / "resumed" / "model").exists()
    lines: list[str] = []
    train_attributes(str(path), str(tmp_path / "resumed"), cfg, log=lines.append)
    assert "resuming from step-0000008 (step 8 of 12)" in lines
    assert not any(line.startswith("step 4/") for line in lines), "finished steps must not be redone"
    straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Older checkpoints are pruned to keep_checkpoints.
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [
        "step-0000008", "step-0000012"]
    # Different settings must not silently continue someone else's run.
    with pytest.raises(ConfigError, match="--fresh"):
        train_attributes(str(path), str(tmp_path / "resumed"), _cfg(max_steps=12, batch_size=16, lr=1e-3),
                         log=lambda line: None)


def test_cli_trains_through_the_prefect_flow(prefect_api_url, tmp_path):
    # No capsys here: Prefect's console log handler would keep writing to its closed stream in later tests.
    path, _ = write_celeba_parquet(tmp_path / "celeba.parquet", n=48, row_group=16)
    args = ["train-attributes", str(path), "--out", str(tmp_path / "out"), "--profile", "offline",
            "--arch", "vit-tiny", "--max-steps", "4", "--batch-size", "8",
            "--set", "attributes.train.num_workers=0", "--set", "attributes.train.threads=1",
            "--set", "attributes.train.log_every=2"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "model" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["split"] == "valid"
    assert main(["train-attributes", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists(), "a user error must stop before any work"
