"""Evaluate a FLIP checkpoint on a release: retrieval and the attribute linear probe, with a baseline.

- Retrieval (FaceCaption-15M Table 2): text->image and image->text R@1/5/10 on
  the release's test split (its first ``train.retrieval_samples`` faces, 5,000
  by default), ranking by the cosine similarity of the projected [CLS]
  features (ITC). Each caption's ground truth is its own face.
- Attribute linear probe (Table 3's protocol): the encoders stay frozen; a
  linear 40-way head on the image encoder's [CLS] state is fitted on up to
  ``train.probe_train_samples`` train-split faces and scored by average
  precision per attribute on the test split; mean AP over the attributes that
  have both positives and negatives there. Needs the release's ``attributes``
  (or ``attribute_probs``) column; without it the probe is "not applicable".
- Baseline: the same evaluation of the untrained initial model (rebuilt from
  the checkpoint's config and init seed) in the same run, so every number has a
  reference.

Results go to a JSON file and, when the release has a ``report/`` folder, into
``report/flip_eval.json``, the report JSON (``report/report.json``) and HTML.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from facecap.attributes import ATTRIBUTES
from facecap.settings import ConfigError
from facecap.config import Config
from facecap.models.flip import FlipModel
from facecap.storage import write_json_atomic

from .flip_data import FlipBatches, ReleaseSplit, make_loader, release_fingerprint
from .flip_train import TRAINED_ON

RANKS = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, ks=RANKS) -> dict[str, float]:
    """Rows are queries, columns candidates; query i's match is candidate i. Percent of queries with it in the top k."""
    order = similarity.argsort(dim=1, descending=True, stable=True)
    target = torch.arange(similarity.shape[0]).unsqueeze(1)
    rank = (order == target).float().argmax(dim=1)  # 0-based position of the true match
    return {f"R@{k}": round(float((rank < k).float().mean()) * 100, 2) for k in ks}


@torch.no_grad()
def _encode(model: FlipModel, split: ReleaseSplit, cfg: Config, device, limit: int | None = None,
            with_attributes: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    c = model.config
    data = FlipBatches(split, cfg.train.eval_batch_size, c.image_size, c.max_text_tokens, c.tokenizer, cfg.image,
                       seed=cfg.train.seed, augment=False, shuffle=False, drop_last=False,
                       with_attributes=with_attributes)
    image_feat, text_feat, image_cls, labels = [], [], [], []
    seen = bad = 0
    for batch in make_loader(data, cfg.train.num_workers):
        bad += batch["bad_images"]
        if batch["pixel_values"].shape[0] == 0:
            continue
        pixels = batch["pixel_values"].to(device)
        tokens = model.encode_image(pixels)
        image_cls.append(tokens[:, 0].float().cpu())
        image_feat.append(torch.nn.functional.normalize(model.vision_proj(tokens[:, 0]), dim=-1).float().cpu())
        text_feat.append(model.text_features(batch["input_ids"].to(device),
                                             batch["attention_mask"].to(device)).float().cpu())
        if with_attributes:
            labels.append(batch["labels"])
        seen += pixels.shape[0]
        if len(image_feat) % 50 == 0:
            log(f"encoded {seen:,} {split.split} faces")
        if limit and seen >= limit:
            break
    def cat(parts, width):
        return torch.cat(parts)[:limit] if parts else torch.zeros(0, width)
    return {"image_feat": cat(image_feat, c.embed_dim), "text_feat": cat(text_feat, c.embed_dim),
            "image_cls": cat(image_cls, 1), "labels": cat(labels, len(ATTRIBUTES)) if with_attributes else None,
            "bad_images": bad}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 epochs: int, seed: int) -> dict[str, Any]:
    """Fit one linear layer (40 sigmoid outputs) on frozen features; AP per attribute on the test features."""
    from sklearn.metrics import average_precision_score

    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    known = ~torch.isnan(train_y)
    targets = torch.nan_to_num(train_y)
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], train_y.shape[1])
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(train_x), targets, reduction="none")
        (loss * known).sum().div(known.sum().clamp_min(1)).backward()
        opt.step()
    with torch.no_grad():
        scores = torch.sigmoid(head(test_x)).numpy()
    per_attribute: dict[str, float | None] = {}
    for j, name in enumerate(ATTRIBUTES):
        y = test_y[:, j].numpy()
        y_known = ~np.isnan(y)
        if y_known.sum() == 0 or y[y_known].min() == y[y_known].max():
            per_attribute[name] = None  # AP is undefined without both positives and negatives
            continue
        per_attribute[name] = round(float(average_precision_score(y[y_known], scores[y_known, j])) * 100, 2)
    scored = [v for v in per_attribute.values() if v is not None]
    return {"mean_AP": round(float(np.mean(scored)), 2) if scored else None, "attributes_scored": len(scored),
            "train_samples": int(train_x.shape[0]), "test_samples": int(test_x.shape[0]),
            "per_attribute_AP": per_attribute}


def evaluate_model(model: FlipModel, release_dir: str, cfg: Config, device,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Retrieval and attribute probe of one model on RELEASE's splits."""
    model.eval()
    test = ReleaseSplit(release_dir, "test", cfg.quality.test_fraction)
    test.count()
    if test.stats.rows == 0:
        raise ConfigError(f"the test split of {release_dir} is empty ({test.stats.split_source}): nothing to evaluate")
    probe = test.has_attributes
    enc = _encode(model, test, cfg, device, limit=cfg.train.retrieval_samples, with_attributes=probe, log=log)
    sim = enc["text_feat"] @ enc["image_feat"].t()
    n = sim.shape[0]
    result: dict[str, Any] = {
        "retrieval": {"text_to_image": recall_at_k(sim), "image_to_text": recall_at_k(sim.t()),
                      "samples": n, "test_split_faces": test.stats.rows, "chance_R@1": round(100 / max(n, 1), 2), "bad_images": enc["bad_images"]},
    }
    if not probe:
        result["attribute_probe"] = "not applicable: the release has no attributes/attribute_probs column"
    else:
        train = ReleaseSplit(release_dir, "train", cfg.quality.test_fraction)
        train_enc = _encode(model, train, cfg, device, limit=cfg.train.probe_train_samples, with_attributes=True,
                            log=log)
        if train_enc["image_cls"].shape[0] < 2:
            result["attribute_probe"] = "not applicable: the train split has fewer than 2 faces"
        else:
            result["attribute_probe"] = linear_probe(train_enc["image_cls"], train_enc["labels"], enc["image_cls"],
                                                     enc["labels"], cfg.train.probe_epochs, cfg.train.seed)
    return result


def evaluate(checkpoint: str, release_dir: str, cfg: Config, out_json: str | None = None,
             log: Callable[[str], None] = print, baseline: bool = True) -> dict[str, Any]:
    """Evaluate CHECKPOINT and (baseline) its untrained initial model on RELEASE; write JSON and the report."""
    release_dir = os.path.abspath(release_dir)
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model = FlipModel.from_pretrained(checkpoint).to(device)
    trained_on_path = Path(checkpoint) / TRAINED_ON
    trained_on = json.loads(trained_on_path.read_text()) if trained_on_path.is_file() else None
    release_hash = release_fingerprint(release_dir)
    log(f"evaluating {checkpoint} on {release_dir}")
    results: dict[str, Any] = {
        "checkpoint": os.path.abspath(checkpoint),
        "release_dir": release_dir,
        "release_hash": release_hash,
        "trained_on": trained_on,
        "same_release_as_training": bool(trained_on and trained_on.get("release_hash") == release_hash),
        "model": evaluate_model(model, release_dir, cfg, device, log),
    }
    if baseline:
        log("evaluating the baseline: the untrained initial model (same config and init seed)")
        initial = FlipModel.from_config(model.config).to(device)
        results["baseline"] = {"description": "untrained initial model: same architecture, init weights and seed",
                               **evaluate_model(initial, release_dir, cfg, device, log)}
    if not (model.config.vision_init or model.config.text_init):
        results["note"] = ("encoders were initialised randomly (no pretrained ViT/BERT weights were configured); "
                           "compare with the baseline, not with the paper's numbers")
    out_json = out_json or str(Path(checkpoint) / "eval.json")
    write_json_atomic(out_json, results)
    results["json"] = out_json
    report = _append_to_report(release_dir, results)
    if report:
        results["report"] = report
    m = results["model"]["retrieval"]
    line = (f"text->image R@1/5/10 {m['text_to_image']['R@1']}/{m['text_to_image']['R@5']}/"
            f"{m['text_to_image']['R@10']}, image->text {m['image_to_text']['R@1']}/{m['image_to_text']['R@5']}/"
            f"{m['image_to_text']['R@10']} on {m['samples']} test faces (chance R@1 {m['chance_R@1']})")
    if baseline:
        b = results["baseline"]["retrieval"]
        line += f"; baseline text->image R@1 {b['text_to_image']['R@1']}"
    log(line)
    return results


def _append_to_report(release_dir: str, results: dict[str, Any]) -> list[str]:
    """Add the results to RELEASE/report (JSON and HTML) when the release has a report; return files written."""
    report_dir = Path(release_dir) / "report"
    if not report_dir.is_dir():
        return []
    written = [str(report_dir / "flip_eval.json")]
    write_json_atomic(written[0], results)
    report_json = report_dir / "report.json"
    if report_json.is_file():
        data = json.loads(report_json.read_text())
        data["flip_eval"] = results
        write_json_atomic(str(report_json), data)
        written.append(str(report_json))
    section = _html_section(results)
    for page in sorted(report_dir.glob("*.html")):
        text = page.read_text()
        text = re.sub(r"<!-- flip-eval -->.*<!-- /flip-eval -->", "", text, flags=re.S)
        text = text.replace("</body>", section + "</body>") if "</body>" in text else text + section
        tmp = page.with_name(f".tmp-{page.name}")
        tmp.write_text(text)
        os.replace(tmp, page)
        written.append(str(page))
    return written


def _html_section(results: dict[str, Any]) -> str:
    rows = []
    for who in ("model", "baseline"):
        if who not in results:
            continue
        r = results[who]["retrieval"]
        probe = results[who]["attribute_probe"]
        probe_text = probe if isinstance(probe, str) else f"{probe['mean_AP']} ({probe['attributes_scored']} attributes)"
        cells = [r["text_to_image"][f"R@{k}"] for k in RANKS] + [r["image_to_text"][f"R@{k}"] for k in RANKS]
        rows.append(f"<tr><td>{who}</td>" + "".join(f"<td>{c}</td>" for c in cells)
                    + f"<td>{html.escape(str(probe_text))}</td></tr>")
    note = f"<p>{html.escape(results['note'])}</p>" if results.get("note") else ""
    return ("<!-- flip-eval --><section id=\"flip-eval\"><h2>FLIP evaluation</h2>"
            f"<p>Checkpoint {html.escape(results['checkpoint'])}, {results['model']['retrieval']['samples']} test faces."
            "</p><table><tr><th></th><th>t&rarr;i R@1</th><th>R@5</th><th>R@10</th><th>i&rarr;t R@1</th><th>R@5</th>"
            "<th>R@10</th><th>attribute probe mean AP</th></tr>" + "".join(rows) + f"</table>{note}</section>"
            "<!-- /flip-eval -->")
