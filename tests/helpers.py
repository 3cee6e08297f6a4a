"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from facecap.config import Config


def offline_config(**sections) -> Config:
    # The example data holds each photo in several containers (folder, tar, Parquet), so its faces are
    # near-duplicates of each other: tests that count faces per container
    # keep them all (clusters are still formed and recorded, and splits follow them); tests/test_dedup.py
    # covers dedup.keep=best.
    sections.setdefault("dedup", {"keep": "all"})
    return Config.model_validate({"profile": "offline", **sections})


def example_sources(example_dir: Path) -> list[Path]:
    """Every kind of source in the example data, and one that does not exist."""
    return [example_dir / "folder", example_dir / "webdataset" / "*.tar", example_dir / "parquet" / "bytes.parquet",
            example_dir / "paths" / "paths.parquet", example_dir / "does-not-exist"]


def example_config() -> Config:
    """The settings of the session's curate of the example data (conftest.py `curated_example`)."""
    return offline_config(ingest={"shard_size": 4}, execution={"n_workers": 2})


def read_release(out: Path) -> tuple[pa.Table, pa.Table]:
    """The release's face records (sorted by sample_id) and its rejects."""
    data = ds.dataset(out / "release" / "data", format="parquet").to_table().sort_by("sample_id")
    rejects_dir = out / "release" / "rejects"
    rejects = ds.dataset(rejects_dir, format="parquet").to_table() if rejects_dir.exists() else None
    return data, rejects


def run_curate(sources: list, out: Path, cfg: Config) -> dict:
    """Run the real curate flow on a local Dask cluster against the current Prefect API."""
    from facecap.flows.curate import curate, task_runner_for

    return curate.with_options(task_runner=task_runner_for(cfg))(
        sources=[str(s) for s in sources], out=str(out), config=cfg.model_dump(mode="json"))


def ingest_sources(sources: list, image: dict | None = None, **ingest):
    """Plan and ingest `sources` in this process (offline config): specs, planning notes, the kept rows
    and the reject rows as tables (None when empty), and the counters."""
    from facecap.sources.plan import plan_shards
    from facecap.stages.base import Counters
    from facecap.stages.ingest import ingest_shard

    cfg = offline_config(ingest=ingest, image=image or {})
    specs, notes = plan_shards([str(s) for s in sources], cfg.ingest)
    counters = Counters()
    kept, rejected = [], []
    for spec in specs:
        for chunk in ingest_shard(spec, cfg.ingest, cfg.image, counters):
            if chunk.kept is not None:
                kept.append(chunk.kept)
            if chunk.rejected is not None:
                rejected.append(chunk.rejected)
    return (specs, notes, pa.concat_tables(kept) if kept else None, pa.concat_tables(rejected) if rejected else None,
            counters)


def published_layout(keys_file: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) per line of a facecap/data/*_keys.txt list: a published checkpoint's state-dict layout."""
    from importlib import resources

    layout = []
    for line in resources.files("facecap.data").joinpath(keys_file).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, shape = line.partition("\t")
        layout.append((name.strip(), tuple(int(d) for d in shape.split(",") if d.strip())))
    return layout


def random_facenet(seed: int, batchnorm: bool = False):
    """A RANDOM FaceNet (InceptionResnetV1): the real VGGFace2 weights cannot be downloaded here. He-initialised
    so that different crops give different embeddings (with PyTorch's default init every input maps to nearly
    the same one); with `batchnorm`, BatchNorm statistics and affines are randomised too, so a tensor a loader
    skipped shows. Its distances say nothing about who is who."""
    import torch

    from facecap.models.facenet import InceptionResnetV1

    torch.manual_seed(seed)
    model = InceptionResnetV1().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if batchnorm and module.bias is not None:
                    module.bias.normal_(0.0, 0.01)
            elif batchnorm and isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model
