"""A curate of web copies of real photos, with every setting at its default: what a release holds and why.

It writes N web copies (`facecap.webcopies`: crops that keep a face, crops that
put it against the image edge, rotations up to 10 degrees, mirrors, rescales
0.5-2x, colour jitter, JPEG re-encodes) of six photos that ship in packages
(the astronaut, Kafka's portrait, insightface's six-person group photo, three
photos without a human face: 8 distinct people in all) into a folder, curates
it with the real flow (offline profile, local Dask workers, a Prefect server
of its own), and checks the release against the copies' ground truth:

* published: the release passes its quality suites with no setting relaxed;
* padding: no kept face pads more than `detect.max_pad_fraction`, and the
  `too_padded` rejects (their count and largest fraction);
* near-duplicates: kept faces, the distinct people among them (each kept face
  is matched to the person whose carried box it overlaps in its copy), faces
  kept beyond one per person (leaks), and kept faces that are nobody in the
  ground truth (a detection on a non-face photo, or a box no label matched);
* split: the achieved test share of released faces beside `quality.test_fraction`,
  and the components held back as too large, from release.json.

    python bench/bench_web_corpus.py                 # 600 copies, 2 workers
    python bench/bench_web_corpus.py --copies 1200 --seed 3
    python bench/bench_web_corpus.py --smoke         # CI size: 60 copies

It prints the figures, then them as JSON on the last line. It exits 1 when the
run fails or the release is blocked, or when a kept face pads beyond the rule
(that can only be a bug); never because leaks or the split share miss a goal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

import pyarrow.parquet as pq  # noqa: E402

from facecap.config import Config  # noqa: E402
from facecap.webcopies import PERSONS, label_faces, web_copies  # noqa: E402

SMOKE = {"copies": 60, "workers": 2}


def write_copies(folder: Path, n: int, seed: int) -> dict[str, list]:
    """The copies as JPEG files; returns file name -> [(person, box in the copy), ...]."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name, data, boxes in web_copies(n, seed):
        (folder / f"{name}.jpg").write_bytes(data)
        truth[f"{name}.jpg"] = boxes
    return truth


def curate(folder: Path, out: Path, workers: int):
    from facecap.flows.curate import curate as curate_flow, task_runner_for
    from facecap.prefect_api import prefect_api

    cfg = Config(profile="offline")
    cfg.execution.n_workers = workers
    with prefect_api(log=lambda line: print(f"  {line}", flush=True)):
        started = time.perf_counter()
        result = curate_flow.with_options(task_runner=task_runner_for(cfg))(
            sources=[str(folder)], out=str(out), config=cfg.model_dump(mode="json"))
        return cfg, result, time.perf_counter() - started


def read(out: Path, name: str, columns: list[str]):
    files = sorted((out / "release" / name).glob("*.parquet"))
    return [(f, pq.read_table(f, columns=columns)) for f in files]


def figures(cfg: Config, result, out: Path, truth: dict[str, list], seconds: float) -> dict:
    kept, split_of = [], Counter()
    for path, table in read(out, "data", ["source_offset", "bbox", "pad_fraction"]):
        split = path.name.split("-")[0]
        for row in table.to_pylist():
            kept.append(row)
            split_of[split] += 1
    persons = []
    for row in kept:
        label = label_faces([row["bbox"]], truth.get(Path(row["source_offset"]).name, []))[0]
        persons.append(label)
    by_person = Counter(p for p in persons if p is not None)
    rejects = [r for _, t in read(out, "rejects", ["reason", "detail"]) for r in t.to_pylist()]
    reasons = Counter(r["reason"] for r in rejects)
    padded = [r["detail"] for r in rejects if r["reason"] == "too_padded"]
    info = json.loads((out / "release" / "release.json").read_text())
    split = ((info.get("release_passes") or {}).get("dedup") or {}).get("split") or {}
    rule = cfg.detect.max_pad_fraction
    max_pad = max((r["pad_fraction"] for r in kept), default=0.0)
    return {
        "copies": len(truth), "people_in_corpus": len(PERSONS), "seconds": round(seconds, 1),
        "kept_faces": len(kept), "people_kept": len(by_person),
        "leaked_duplicates": sum(n - 1 for n in by_person.values()),
        "kept_unlabelled": persons.count(None),
        "max_pad_fraction_rule": rule, "max_kept_pad_fraction": round(max_pad, 4),
        "kept_beyond_pad_rule": sum(r["pad_fraction"] > rule for r in kept),
        "rejects_by_reason": dict(reasons.most_common()), "too_padded_examples": padded[:3],
        "test_fraction": cfg.quality.test_fraction, "achieved_test_share": split.get("achieved"),
        "faces_by_split": dict(split_of), "oversized_components": split.get("oversized", []),
        "checks_passed": result.validation.counts if result.validation else None,
        "checks_failed": result.validation.failed if result.validation else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Curate web copies of real photos with default settings and check the "
                                            "release against their ground truth (padding, near-duplicates, split).")
    p.add_argument("--copies", type=int, default=600, metavar="N", help="web copies to make (default 600)")
    p.add_argument("--workers", type=int, default=2, metavar="W", help="local Dask workers (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the copies (default 0)")
    p.add_argument("--out", metavar="DIR", help="keep the run's output here (must be new; default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help=f"CI size: {SMOKE['copies']} copies")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.copies < 1 or args.workers < 1:
        p.error("--copies and --workers must be at least 1")
    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        p.error(f"--out {args.out} is not empty")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    with tempfile.TemporaryDirectory(prefix="facecap-web-corpus-") as tmp:
        folder = Path(tmp) / "copies"
        out = Path(args.out).resolve() if args.out else Path(tmp) / "out"
        print(f"writing {args.copies} web copies (seed {args.seed}) to {folder}", flush=True)
        truth = write_copies(folder, args.copies, args.seed)
        print(f"curating with default settings, {args.workers} workers -> {out}", flush=True)
        try:
            cfg, result, seconds = curate(folder, out, args.workers)
        except Exception as exc:  # a blocked release or a failed run: the bench's one failure
            print(f"bench: the curate did not publish: {type(exc).__name__}: {exc}", flush=True)
            return 1
        f = figures(cfg, result, out, truth, seconds)

    print()
    print(f"{f['copies']} web copies of 6 photos ({f['people_in_corpus']} people) curated in {f['seconds']} s, "
          f"published with every setting at its default; checks {f['checks_passed']}")
    print(f"kept faces {f['kept_faces']}: {f['people_kept']} distinct people, {f['leaked_duplicates']} kept beyond "
          f"one per person, {f['kept_unlabelled']} matching no person's box")
    print(f"padding: rule {f['max_pad_fraction_rule']}, largest kept {f['max_kept_pad_fraction']}, "
          f"kept beyond the rule {f['kept_beyond_pad_rule']}, too_padded rejects "
          f"{f['rejects_by_reason'].get('too_padded', 0)}")
    print(f"split: test share {f['achieved_test_share']} (target {f['test_fraction']}), faces by split "
          f"{f['faces_by_split']}; held back as too large: {f['oversized_components'] or 'none'}")
    print(f"rejects by reason: {f['rejects_by_reason']}")
    print(json.dumps(f), flush=True)
    return 1 if f["kept_beyond_pad_rule"] else 0


if __name__ == "__main__":  # spawned Dask worker processes may import this module: they must run nothing
    sys.exit(main())
