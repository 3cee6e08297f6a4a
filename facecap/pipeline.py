"""The curate pipeline's stages as shard jobs: stage logic + keys + storage.

Each ``run_*`` function runs one stage on one shard and returns its stats
dict. They know nothing of Prefect or Dask (tasks/ wraps them), so a test or
a benchmark can call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from facecap import storage
from facecap.config import Config, settings_hash
from facecap.schema import FACE_SCHEMA, IMAGE_SCHEMA
from facecap.shards import ShardPaths, iter_shard, run_shard, stage_key
from facecap.stages.detect import detect_faces
from facecap.stages.ingest import ShardSpec, ingest_shard

# Bump a stage's version when its code changes what it writes: old outputs
# then no longer match and are recomputed.
INGEST_VERSION = "1"
DETECT_VERSION = "1"


@dataclass(frozen=True)
class StageInfo:
    name: str
    version: str
    priority: int  # later stages first: Dask runs a ready downstream task before more upstream work
    needs_gpu: bool = False


INGEST = StageInfo("ingest", INGEST_VERSION, priority=0)
DETECT = StageInfo("detect", DETECT_VERSION, priority=1, needs_gpu=True)


def ingest_settings_hash(cfg: Config) -> str:
    return settings_hash({"ingest": cfg.ingest.model_dump(mode="json"), "image": cfg.image.model_dump(mode="json")})


def detect_settings_hash(cfg: Config) -> str:
    # Only what changes the records: device, threads and batch size do not.
    settings = cfg.detect.model_dump(mode="json", exclude={"device", "threads", "batch_size", "weights", "weights_sha256"})
    return settings_hash({"detect": settings, "image": cfg.image.model_dump(mode="json")})


def run_ingest(spec: ShardSpec, out: str, cfg: Config) -> dict:
    key = stage_key(INGEST.name, INGEST.version, ingest_settings_hash(cfg), "", settings_hash(spec.key_material()))
    meta = {"input": spec.label, "input_key": spec.fingerprint, "source": spec.source, "kind": spec.kind,
            "stage_version": INGEST.version, "settings_hash": ingest_settings_hash(cfg), "model": None}
    return run_shard(ShardPaths(out, INGEST.name, key), IMAGE_SCHEMA,
                     lambda counters: ingest_shard(spec, cfg.ingest, cfg.image, counters), meta)


def run_detect(ingested: dict, out: str, cfg: Config, detector_id: str) -> dict:
    from facecap.models.registry import load_detector

    settings = detect_settings_hash(cfg)
    key = stage_key(DETECT.name, DETECT.version, settings, detector_id, ingested["key"])
    meta = {"input": ingested["input"], "input_key": ingested["key"], "source": ingested["source"],
            "stage_version": DETECT.version, "settings_hash": settings, "model": detector_id}

    paths = ShardPaths(out, DETECT.name, key)
    detector = None
    if not storage.exists(paths.stats):
        # Loaded (once per worker process) before the shard's clock starts, so
        # shard seconds measure detection, not start-up.
        detector = load_detector(cfg)
        if detector.identity != detector_id:
            raise RuntimeError(f"worker loaded {detector.identity}, the run planned {detector_id}: weights differ")

    def produce(counters):
        return detect_faces(iter_shard(ingested["output"]), detector, cfg.detect, cfg.image, counters)

    return run_shard(paths, FACE_SCHEMA, produce, meta)
