"""FLIP model and data loading: tiny random-init models of the real architecture, synthetic releases on disk.

Outputs of these tiny models mean nothing; the tests check the mechanics (round
trips, local init, queue, split rules, streaming order and resume).
"""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import torch

from facecap.settings import ConfigError, ImageLimits, TrainSettings
from facecap.models.flip import FlipConfig, FlipModel, load_tokenizer
from facecap.models.weights import WeightsError
from facecap.training.flip_data import (FlipBatches, LoaderPosition, ReleaseSplit, in_test_split, make_loader,
                                        release_fingerprint)
from facecap.training.flip_synthetic import COLOURS, write_synthetic_release

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def tiny_settings(**kw) -> TrainSettings:
    return TrainSettings(model_size="tiny", max_text_tokens=16, **{"queue_size": 16, **kw})


def test_offline_tokenizer_is_bert_uncased_wordpiece(tokenizer):
    ids = tokenizer("A Red Circle")["input_ids"]
    assert tokenizer.vocab_size == 30522
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle", "[SEP]"]


def test_safetensors_round_trip_gives_the_same_model(tmp_path, tokenizer):
    model = FlipModel.from_config(FlipConfig.from_settings(tiny_settings(), tokenizer.vocab_size))
    batch = tokenizer(["a red circle", "a blue square"], padding="max_length", max_length=16, return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32)
    model.train()
    model(pixels, batch["input_ids"], batch["attention_mask"])  # fills part of the queue
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = FlipModel.from_pretrained(tmp_path / "m")
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert int(loaded.queue_filled) == 2
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model.image_features(pixels), loaded.image_features(pixels))
        itm = model.itm_logits(batch["input_ids"], batch["attention_mask"], model.encode_image(pixels))
        assert torch.equal(itm, loaded.itm_logits(batch["input_ids"], batch["attention_mask"],
                                                  loaded.encode_image(pixels)))
    with pytest.raises(WeightsError, match="not a FLIP checkpoint"):
        FlipModel.from_pretrained(tmp_path)


def test_encoders_initialise_from_local_directories(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False)
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    cfg = FlipConfig.from_settings(tiny_settings(vision_init=str(tmp_path / "vit"), text_init=str(tmp_path / "bert")),
                                   tokenizer.vocab_size)
    model = FlipModel.from_config(cfg)
    assert torch.equal(model.vision_encoder.embeddings.patch_embeddings.projection.weight,
                       vit.embeddings.patch_embeddings.projection.weight)
    assert torch.equal(model.text_encoder.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    # The momentum encoders start as copies of the loaded ones.
    assert torch.equal(model.text_encoder_m.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    with pytest.raises(WeightsError, match="local directory"):
        FlipModel.from_config(FlipConfig.from_settings(tiny_settings(vision_init=str(tmp_path / "missing")),
                                                       tokenizer.vocab_size))


def test_queue_wraps_and_only_filled_slots_count(tokenizer):
    model = FlipModel.from_config(FlipConfig.from_settings(tiny_settings(queue_size=5), tokenizer.vocab_size))
    for i in range(3):  # 3 batches of 2 into 5 slots: the third wraps around
        feats = torch.full((2, model.config.embed_dim), float(i))
        model._enqueue(feats, feats)
    assert int(model.queue_filled) == 5 and int(model.queue_ptr) == 1
    assert model.image_queue[:, 0].tolist() == [2.0, 0.0, 1.0, 1.0, 2.0]
    assert torch.equal(model.text_queue, model.image_queue)


@pytest.mark.parametrize("layout", ["split-files", "split-column", "unsplit"])
def test_split_rules(tmp_path, layout):
    counts = write_synthetic_release(str(tmp_path), train_per_class=2, layout=layout, no_text_rows=3)
    train, test = ReleaseSplit(str(tmp_path), "train", 0.2), ReleaseSplit(str(tmp_path), "test", 0.2)
    train.count(), test.count()
    if layout == "unsplit":
        assert "hash of image_id" in train.stats.split_source
        ids = pq.read_table(tmp_path / "data" / "part-00000.parquet", columns=["image_id"]).column(0).to_pylist()
        assert test.stats.rows + test.stats.no_text == sum(in_test_split(i, 0.2) for i in ids) > 0
        assert train.stats.rows + test.stats.rows == counts["train"] + counts["test"]
    else:
        assert (train.stats.rows, test.stats.rows) == (counts["train"], counts["test"])
        assert counts["test"] == len(COLOURS)
    # Rows without a caption are skipped and counted, never trained on.
    assert train.stats.no_text + test.stats.no_text == 3


def _batches(split, workers, start=0, **kw):
    data = FlipBatches(split, 8, 32, 16, None, ImageLimits(), seed=3, augment=True, shuffle=True, drop_last=True,
                       position=LoaderPosition(1, start), **kw)
    return [(b["local_batch"], tuple(b["sample_ids"]), round(float(b["pixel_values"].sum()), 3))
            for b in make_loader(data, workers)]


def test_stream_order_is_exact_across_workers_and_resume(tmp_path):
    write_synthetic_release(str(tmp_path), train_per_class=2, row_group_size=10)
    split = ReleaseSplit(str(tmp_path), "train", 0.0)
    single = _batches(split, 0)
    assert len(single) == 48 // 8 and [b[0] for b in single] == list(range(6))
    assert len({s for b in single for s in b[1]}) == 48  # every sample once per epoch
    assert _batches(split, 2) == single  # two workers: same batches, same order, same augmentation
    assert _batches(split, 2, start=4) == single[4:]  # resume mid-epoch
    # Two ranks split the epoch between them.
    rank0, rank1 = _batches(split, 0, rank=0, world_size=2), _batches(split, 0, rank=1, world_size=2)
    assert [b[1] for b in rank0] == [single[0][1], single[2][1], single[4][1]]
    assert [b[1] for b in rank1] == [single[1][1], single[3][1], single[5][1]]


def test_undecodable_images_are_counted_not_fatal(tmp_path):
    write_synthetic_release(str(tmp_path), train_per_class=1, layout="unsplit")
    path = tmp_path / "data" / "part-00000.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[0], images[1] = b"not an image", b""
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", [images]), path)
    split = ReleaseSplit(str(tmp_path), "train", 0.0)
    batches = list(make_loader(FlipBatches(split, 64, 32, 16, None, ImageLimits(), shuffle=False), 0))
    assert sum(b["bad_images"] for b in batches) == 2
    assert sum(b["pixel_values"].shape[0] for b in batches) == split.stats.rows - 2


def test_webdataset_tars_are_read_when_there_is_no_parquet(tmp_path):
    write_synthetic_release(str(tmp_path / "src"), train_per_class=1, layout="split-files")
    release = tmp_path / "release"
    (release / "webdataset").mkdir(parents=True)
    for split in ("train", "test"):
        rows = pq.read_table(tmp_path / "src" / "data" / f"{split}-00000.parquet").to_pylist()
        with tarfile.open(release / "webdataset" / f"{split}-000000.tar", "w") as tar:
            for row in rows:
                for ext, payload in ((".jpg", row["image"]), (".txt", row["caption"].encode()),
                                     (".json", json.dumps({"sample_id": row["sample_id"]}).encode())):
                    info = tarfile.TarInfo(row["sample_id"] + ext)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    split = ReleaseSplit(str(release), "test", 0.05)
    assert split.format == "webdataset" and split.count().rows == len(COLOURS)
    batch = next(iter(make_loader(FlipBatches(split, 4, 32, 16, None, ImageLimits()), 0)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["texts"][0].endswith("grey background")


def test_release_fingerprint_and_bad_release_dirs(tmp_path):
    write_synthetic_release(str(tmp_path / "r"), train_per_class=1)
    before = release_fingerprint(str(tmp_path / "r"))
    assert before == release_fingerprint(str(tmp_path / "r"))
    write_synthetic_release(str(tmp_path / "r"), train_per_class=2)
    assert release_fingerprint(str(tmp_path / "r")) != before
    with pytest.raises(ConfigError, match="not a directory"):
        ReleaseSplit(str(tmp_path / "nope"), "train", 0.05)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no data"):
        ReleaseSplit(str(tmp_path / "empty"), "train", 0.05)
