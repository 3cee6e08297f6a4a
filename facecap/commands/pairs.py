"""`facecap pairs OUT`: write a few face crops of a release as JPEG files and print each with its caption."""

from __future__ import annotations

import argparse
import os
import textwrap

from facecap.settings import ConfigError

PAIR_COLUMNS = ("sample_id", "image_id", "dedup_cluster", "source", "source_offset")


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "pairs", help="write N face crops of a release as JPEG files and print each with its caption",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Show what a release holds: N face-caption pairs from distinct faces (one per
            near-duplicate cluster, spread over as many source images as there are),
            each crop written to DIR/<sample_id>.jpg and printed with its caption and
            where the caption came from:

              grammar: ...   the attribute path (PCFG text, rewritten by an LLM or not)
              alt-text ...   the FLIP-80M path (the source's alt-text, judged about a face
                             by the text filter and cleaned)

              facecap pairs runs/demo --n 6 --to runs/demo/pairs

            OUT is a curate output folder (its release/ is read) or a release folder.
            A release without a caption column (no caption stage ran: the offline
            profile without an attribute model and with text.caption_path=facecaption)
            has no pairs to show: the command says so and exits 1."""))
    p.add_argument("out", metavar="OUT", help="a curate output folder (OUT/release) or a release folder")
    p.add_argument("--n", type=int, default=6, metavar="N", help="pairs to show (default 6)")
    p.add_argument("--to", metavar="DIR", help="where the crops are written (default OUT/pairs)")
    p.set_defaults(handler=run)


def release_dir(out: str) -> str:
    for candidate in (os.path.join(out, "release"), out):
        if os.path.isfile(os.path.join(candidate, "release.json")):
            return candidate
    raise ConfigError(f"{out}: no release.json in it or in {os.path.join(out, 'release')}; give a curate output "
                      "folder or a release folder")


def choose_pairs(rows: list[dict], n: int) -> list[dict]:
    """n captioned rows from distinct faces (one per near-duplicate cluster), round-robin over source images
    so that the first pairs show as many photos as there are; deterministic (rows in sample_id order)."""
    by_image: dict[str, list[dict]] = {}
    seen_clusters: set[str] = set()
    for row in sorted(rows, key=lambda r: r["sample_id"]):
        cluster = row.get("dedup_cluster") or row["sample_id"]
        if not row.get("caption") or cluster in seen_clusters:
            continue
        seen_clusters.add(cluster)
        by_image.setdefault(row.get("image_id") or row["sample_id"], []).append(row)
    chosen: list[dict] = []
    queues = [by_image[k] for k in sorted(by_image)]
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def write_pairs(release: str, n: int, to: str) -> list[dict]:
    """Choose n pairs, write their crops as DIR/<sample_id>.jpg; each pair: path, caption, caption_source,
    sample_id, source, source_offset."""
    import io

    import pyarrow.dataset as ds
    from PIL import Image

    from facecap.quality.report import CAPTION_SOURCE_COLUMNS, caption_source
    from facecap.schema import image_bytes

    data = os.path.join(release, "data")
    if not os.path.isdir(data):
        raise ConfigError(f"{release}: no data/ folder (an empty release)")
    dataset = ds.dataset(data, format="parquet")
    names = set(dataset.schema.names)
    if "caption" not in names:
        import json

        with open(os.path.join(release, "release.json")) as fh:
            stages = json.load(fh).get("stages") or {}
        why = "; ".join(f"{name}: {s.get('why') or 'off'}" for name, s in stages.items()
                        if name in ("text", "caption") and s.get("status") == "off")
        raise ConfigError(f"{release} has no caption column: no caption stage ran ({why or 'caption and text off'}). "
                          "Its faces carry only their unfiltered source alt-text. Curate with "
                          "--set text.caption_path=flip80m for captions from face-related alt-text (runs offline), "
                          "or give an attribute model (attributes.model).")
    columns = [c for c in dict.fromkeys(PAIR_COLUMNS + CAPTION_SOURCE_COLUMNS) if c in names]
    rows: list[dict] = []
    images: set = set()
    # A large release is not read whole: once n source images have a captioned face, one face each will do.
    for batch in dataset.to_batches(columns=columns):
        part = batch.to_pylist()
        rows += part
        images.update(r.get("image_id") or r["sample_id"] for r in part if r.get("caption"))
        if len(images) >= n:
            break
    chosen = choose_pairs(rows, n)
    if not chosen:
        return []
    wanted = [r["sample_id"] for r in chosen]
    crops = dict(zip(*dataset.to_table(columns=["sample_id", "image"],
                                       filter=ds.field("sample_id").isin(wanted)).to_pydict().values()))
    os.makedirs(to, exist_ok=True)
    pairs = []
    for row in chosen:
        data_bytes = image_bytes(crops[row["sample_id"]]) or b""
        path = os.path.join(to, f"{row['sample_id']}.jpg")
        if not data_bytes.startswith(b"\xff\xd8"):  # crops are JPEG; anything else is re-encoded to match the name
            buf = io.BytesIO()
            Image.open(io.BytesIO(data_bytes)).convert("RGB").save(buf, format="JPEG", quality=92)
            data_bytes = buf.getvalue()
        with open(path, "wb") as fh:
            fh.write(data_bytes)
        pairs.append({"path": path, "caption": row["caption"],
                      "caption_source": caption_source({c: row.get(c) for c in CAPTION_SOURCE_COLUMNS}),
                      "sample_id": row["sample_id"], "source": row.get("source"),
                      "source_offset": row.get("source_offset")})
    return pairs


def run(args: argparse.Namespace) -> int:
    import sys

    if args.n < 1:
        raise ConfigError("--n must be at least 1")
    release = release_dir(args.out)
    to = args.to or os.path.join(os.path.dirname(os.path.abspath(release)), "pairs")
    try:
        pairs = write_pairs(release, args.n, to)
    except ConfigError as exc:
        print(f"facecap pairs: {exc}", file=sys.stderr)
        return 1
    if not pairs:
        print(f"facecap pairs: {release} holds no captioned face", file=sys.stderr)
        return 1
    images = len({(p["source"], p["source_offset"]) for p in pairs})
    print(f"{len(pairs)} face-caption pairs from {images} source images of {release} (crops in {to}):")
    for p in pairs:
        print(f"\n{p['path']}\n    caption: {p['caption']}\n    from:    {p['caption_source']}")
    return 0
