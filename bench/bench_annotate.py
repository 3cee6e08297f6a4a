"""Annotate-stage throughput: faces/s through the curate flow vs the bare attribute-model loop.

One run:

1. generates N JPEG images (bench_detect's seeded generator: the skimage
   astronaut varied, plus ~20% non-face images);
2. curates them once with the attribute stage off (offline profile, no model)
   so the detect shards exist;
3. curates again into the same output with a local attribute model: ingest and
   detect are reused from their stage keys, so only annotate runs. The
   annotate stage's rate is faces / (first annotate shard start -> last
   annotate shard end), from OUT/shards/annotate/*.json (the caption stage
   that follows annotate runs too and counts only in the end-to-end figure);
4. runs the bare loop in this process on the same face crops (the `image`
   column of the detect outputs the annotate shards extend): decode_rgb +
   model.predict in batches of attributes.batch_size, model load excluded,
   one warm-up batch first.

The model is a randomly initialised ViT classifier (the classifier backend's
real architecture): `--arch small` (default) is ViT-Ti/16 sized (12 layers,
hidden 192, 224 px, ~5.5M parameters), `--arch tiny` is the tests' 2-layer,
32-hidden, 32 px model. Its outputs mean nothing; only the speed is measured.
`--model DIR` measures a model directory of your own instead (e.g. OUT/model
of train-attributes, or a CLIP checkpoint with `--backend zero-shot`).

    python bench/bench_annotate.py [--images N] [--workers W] [--arch small|tiny] [--model DIR] [--json FILE]
    python bench/bench_annotate.py --smoke     # CI size: 16 images, the tiny model, 1 worker, 2-3 shards

It exits 1 when a flow fails or no face is annotated, never because the
ratio misses its target (at smoke size it means nothing, but it is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_detect import write_images  # noqa: E402

from facecap.config import Config  # noqa: E402
from facecap.sources.images import decode_rgb  # noqa: E402

TARGET_RATIO = 0.9
SMOKE = {"images": 16, "workers": 1, "arch": "tiny", "shard_size": 8}


def random_vit(path: Path, arch: str) -> Path:
    """Save a randomly initialised ViT classifier with CelebA labels (safetensors), as train-attributes would."""
    from transformers import ViTConfig, ViTForImageClassification

    from facecap.training.attributes import _label_maps, _vit_processor

    if arch == "tiny":
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, **_label_maps())
    else:  # ViT-Ti/16
        config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12,
                           num_attention_heads=3, intermediate_size=768, **_label_maps())
    import torch

    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(str(path))
    _vit_processor(config.image_size).save_pretrained(str(path))
    return path


def run_flow(folder: Path, out: Path, cfg: Config) -> tuple[dict, float]:
    from facecap.flows.curate import curate, task_runner_for

    started = time.perf_counter()
    result = curate.with_options(task_runner=task_runner_for(cfg))(
        sources=[str(folder)], out=str(out), config=cfg.model_dump(mode="json"))
    return result, time.perf_counter() - started


def annotate_stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "shards" / "annotate").glob("*.json"))]


def annotate_span(out: Path) -> tuple[int, float, float, int]:
    stats = annotate_stats(out)
    starts = [datetime.fromisoformat(s["started_at"]).timestamp() for s in stats]
    ends = [start + s["seconds"] for start, s in zip(starts, stats)]
    return (sum(s["rows_in"] for s in stats), max(ends) - min(starts), sum(s["seconds"] for s in stats), len(stats))


def annotated_crops(out: Path) -> list[bytes]:
    """The crops the annotate shards saw: the `image` column of the detect outputs they extend.

    Annotate writes only the columns it adds; the crops stay where detect wrote them.
    """
    import pyarrow.parquet as pq

    crops: list[bytes] = []
    for stats in annotate_stats(out):
        detect_key = next(e.split(":", 1)[1] for e in stats["extends"] if e.startswith("detect:"))
        detect = json.loads((out / "shards" / "detect" / f"{detect_key}.json").read_text())
        crops += pq.read_table(detect["output"], columns=["image"]).column("image").to_pylist()
    return crops


def bare_loop(crops: list[bytes], cfg: Config) -> tuple[float, int]:
    """decode_rgb + predict over every crop in batches, as the annotate stage does, minus the flow."""
    import torch

    from facecap.models.attributes import load_attribute_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_attribute_model(cfg, threads=os.cpu_count() or 1)
    size = cfg.attributes.batch_size

    def run(batch: list[bytes]) -> int:
        images = [rgb for rgb, _ in (decode_rgb(b, cfg.image) for b in batch) if rgb is not None]
        model.predict(images)
        return len(images)

    run(crops[:size])  # warm-up
    started = time.perf_counter()
    done = sum(run(crops[i:i + size]) for i in range(0, len(crops), size))
    return time.perf_counter() - started, done


def main(argv: list[str] | None = None) -> int:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(description="Annotate-stage faces/s through the curate flow vs the bare "
                                            "attribute-model loop, and their ratio.")
    p.add_argument("--images", type=int, default=300, metavar="N", help="images to generate (default 300)")
    p.add_argument("--workers", type=int, default=cpus, metavar="W", help=f"local Dask workers (default {cpus})")
    p.add_argument("--arch", choices=("small", "tiny"), default="small", help="random ViT size (default small)")
    p.add_argument("--model", metavar="DIR", help="a model directory to measure instead of a random ViT")
    p.add_argument("--backend", choices=("classifier", "zero-shot"), default="classifier")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="attributes.batch_size (default 32)")
    p.add_argument("--shard-size", type=int, metavar="N", help="records per shard (default: N // (4 * W), at least 1)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--smoke", action="store_true",
                   help=f"CI size: {SMOKE['images']} images, the {SMOKE['arch']} model, {SMOKE['workers']} worker, "
                        f"shard size {SMOKE['shard_size']}")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    load_before = os.getloadavg()[0]
    shard_size = args.shard_size or max(1, args.images // (4 * args.workers))

    from facecap.prefect_api import prefect_api

    with tempfile.TemporaryDirectory(prefix="facecap-bench-annotate-") as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else random_vit(tmp / f"random-vit-{args.arch}", args.arch)
        folder, out = tmp / "images", tmp / "out"
        print(f"generating {args.images} images (seed 0)", flush=True)
        write_images(folder, args.images, seed=0)
        # Quality suites are their own stage (and the generated set repeats crops): not part of this measure.
        base = {"ingest": {"shard_size": shard_size}, "execution": {"n_workers": args.workers},
                "quality": {"enabled": False}}
        attributes = {"backend": args.backend, "model": str(model_dir), "min_attributes": 0,
                      "batch_size": args.batch_size}
        with prefect_api(log=lambda line: print(f"  {line}", flush=True)):
            print("flow 1: ingest + detect (annotate off)", flush=True)
            run_flow(folder, out, Config.model_validate({"profile": "offline", **base}))
            print(f"flow 2: annotate only ({args.workers} workers, model {model_dir.name})", flush=True)
            cfg = Config.model_validate({"profile": "offline", **base, "attributes": attributes})
            result, flow_seconds = run_flow(folder, out, cfg)
        if not annotate_stats(out):
            raise SystemExit("bench: the annotate stage ran on no shard (no face was detected?)")
        faces, span, busy, shards = annotate_span(out)
        # The faces annotate saw (min_attributes=0: it keeps every one), not the release: caption drops
        # faces without kept attributes, which with a random model may be all of them.
        crops = annotated_crops(out)
        if len(crops) != faces or not faces:
            raise SystemExit(f"bench: detect wrote {len(crops)} crops, annotate saw {faces} faces; "
                             f"funnel {json.dumps([row.to_dict() for row in result.funnel])}")
        print(f"bare loop: {cpus} torch threads, {len(crops)} faces", flush=True)
        bare_seconds, done = bare_loop(crops, cfg)

    bare_rate, flow_rate, e2e_rate = done / bare_seconds, faces / span, faces / flow_seconds
    figures = {
        "model": str(args.model) if args.model else f"random ViT ({args.arch})", "backend": args.backend,
        "images": args.images, "faces": faces, "workers": args.workers, "shards": shards,
        "release_records": result.records,
        "batch_size": args.batch_size, "cpu_count": cpus, "load_avg_1min_before": round(load_before, 2),
        "bare_faces_s": round(bare_rate, 2), "flow_annotate_faces_s": round(flow_rate, 2),
        "flow_e2e_faces_s": round(e2e_rate, 2), "annotate_busy_seconds": round(busy, 3),
        "annotate_span_seconds": round(span, 3), "flow_seconds": round(flow_seconds, 3),
        "ratio_annotate_vs_bare": round(flow_rate / bare_rate, 3), "ratio_e2e_vs_bare": round(e2e_rate / bare_rate, 3),
        "target_ratio": TARGET_RATIO,
    }
    print()
    print(f"{faces} faces from {args.images} images | model {figures['model']} | {args.workers} Dask workers, "
          f"{shards} annotate shards | batch {args.batch_size} | release {result.records} records")
    print(f"{'':<22} {'faces/s':>8} {'seconds':>8} {'vs bare':>8}")
    print(f"{'bare model loop':<22} {bare_rate:>8.1f} {bare_seconds:>8.2f} {1:>8.2f}")
    print(f"{'flow: annotate stage':<22} {flow_rate:>8.1f} {span:>8.2f} {flow_rate / bare_rate:>8.2f}")
    print(f"{'flow: end to end':<22} {e2e_rate:>8.1f} {flow_seconds:>8.2f} {e2e_rate / bare_rate:>8.2f}"
          "  (ingest/detect reused; cluster start, plan, release included)")
    if load_before > 0.5:
        print(f"warning: the 1-minute load average was {load_before:.2f} before the run: other work skews these figures")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":  # spawned Dask worker processes may import this module: they must run nothing
    sys.exit(main())
