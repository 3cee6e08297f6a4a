"""Train the face-caption classifier the way FLIP-80M did: keyword-recalled positives vs random negatives.

Positives are captions that contain a face keyword (after the pre-cleaner);
negatives are drawn at random from the captions that contain none. Both are
embedded with the MiniLM sentence encoder and a logistic head is fitted
(scikit-learn); a held-out share measures it. The head is written as
safetensors + JSON (facecap.text.text_filter.save_head); nothing is pickled.
Plain functions: `facecap train-text-filter` is the command around them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from facecap.settings import ConfigError
from facecap.text.clean import clean_text
from facecap.text.keywords import KeywordMatcher
from facecap.text.text_filter import SentenceEncoder, save_head


@dataclass
class TrainingSet:
    texts: list[str]
    labels: np.ndarray  # 1 = keyword-recalled positive, 0 = random negative
    captions_seen: int
    keyword_hits: int


def read_captions(path: str | Path, column: str | None = None) -> Iterator[str]:
    """Captions from a Parquet/CSV/TSV/JSONL file (caption column auto-detected) or a .txt (one per line)."""
    import pyarrow.parquet as pq

    from facecap import storage
    from facecap.sources.captions import CAPTION_COLUMNS
    from facecap.sources.urllist import list_format, read_table

    path = str(path)
    if path.lower().endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    yield line.strip()
        return
    fs, p = storage.filesystem(storage.absolute(path))
    if not fs.exists(p):
        raise ConfigError(f"{path} does not exist")
    fmt = list_format(p)
    if fmt is None and not p.lower().endswith((".parquet", ".pq")):
        raise ConfigError(f"{path}: give Parquet, CSV, TSV, JSONL or .txt (one caption per line)")
    if fmt:
        names = read_table(fs, p, fmt).column_names
    else:
        with fs.open(p, "rb") as fh:
            names = pq.ParquetFile(fh).schema_arrow.names
    col = column if column in names else (None if column else next((c for c in CAPTION_COLUMNS if c in names), None))
    if col is None:
        raise ConfigError(f"{path}: no caption column ({column or list(CAPTION_COLUMNS)}); columns are {names}. "
                          "Use --text-column.")
    if fmt:
        yield from (t for t in read_table(fs, p, fmt).column(col).to_pylist() if t)
        return
    with fs.open(p, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(columns=[col], batch_size=4096):
            yield from (t for t in batch.column(0).to_pylist() if t)


def build_training_set(captions: Iterable[str], matcher: KeywordMatcher, *, max_positives: int = 50_000,
                       negatives_per_positive: float = 1.0, seed: int = 0) -> TrainingSet:
    """Keyword-recalled positives (reservoir-sampled to max_positives) and as many random keyword-free negatives."""
    rng = random.Random(seed)
    positives: list[str] = []
    negatives: list[str] = []
    max_negatives = max(1, int(max_positives * negatives_per_positive))
    seen = hits = negatives_seen = 0
    for raw in captions:
        text = clean_text(str(raw)).text
        if not text:
            continue
        seen += 1
        if matcher.find(text):
            hits += 1
            _reservoir(positives, text, hits, max_positives, rng)
        else:
            negatives_seen += 1
            _reservoir(negatives, text, negatives_seen, max_negatives, rng)
    if len(positives) < 2 or len(negatives) < 2:
        raise ConfigError(f"need at least 2 keyword-recalled positives and 2 negatives; found {len(positives)} "
                          f"and {len(negatives)} in {seen} captions")
    wanted = max(1, int(len(positives) * negatives_per_positive))
    negatives = rng.sample(negatives, min(wanted, len(negatives)))
    texts = positives + negatives
    labels = np.array([1] * len(positives) + [0] * len(negatives), np.int64)
    return TrainingSet(texts, labels, seen, hits)


def _reservoir(pool: list[str], item: str, count: int, size: int, rng: random.Random) -> None:
    if len(pool) < size:
        pool.append(item)
    else:
        j = rng.randrange(count)
        if j < size:
            pool[j] = item


def train_head(data: TrainingSet, encoder: SentenceEncoder, *, holdout: float = 0.2, seed: int = 0,
               progress=print) -> tuple[np.ndarray, float, dict]:
    """Embed, split, fit a logistic head; returns weight, bias and held-out metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

    progress(f"embedding {len(data.texts)} captions with {encoder.identity} ...")
    features = encoder.encode(data.texts)
    order = np.random.default_rng(seed).permutation(len(data.texts))
    n_test = int(round(len(order) * holdout)) if holdout > 0 else 0
    test, train = order[:n_test], order[n_test:]
    model = LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced")
    model.fit(features[train], data.labels[train])
    metrics: dict = {"train": int(len(train)), "holdout": int(n_test),
                     "positives": int(data.labels.sum()), "negatives": int((data.labels == 0).sum())}
    if n_test and len(set(data.labels[test].tolist())) == 2:
        probs = model.predict_proba(features[test])[:, 1]
        predicted = (probs > 0.5).astype(int)
        truth = data.labels[test]
        metrics.update({"accuracy": round(float(accuracy_score(truth, predicted)), 4),
                        "precision": round(float(precision_score(truth, predicted, zero_division=0)), 4),
                        "recall": round(float(recall_score(truth, predicted, zero_division=0)), 4),
                        "auc": round(float(roc_auc_score(truth, probs)), 4)})
    return model.coef_[0].astype(np.float32), float(model.intercept_[0]), metrics


def train_and_save(captions: Iterable[str], out: str | Path, matcher: KeywordMatcher, *, encoder_ref: str | None = None,
                   max_positives: int = 50_000, negatives_per_positive: float = 1.0, holdout: float = 0.2,
                   seed: int = 0, progress=print) -> dict:
    data = build_training_set(captions, matcher, max_positives=max_positives,
                              negatives_per_positive=negatives_per_positive, seed=seed)
    progress(f"{data.captions_seen} captions, {data.keyword_hits} contain a face keyword; training on "
             f"{int(data.labels.sum())} positives and {int((data.labels == 0).sum())} random negatives")
    encoder = SentenceEncoder(encoder_ref)
    weight, bias, metrics = train_head(data, encoder, holdout=holdout, seed=seed, progress=progress)
    info = {"encoder": encoder.identity, "encoder_ref": encoder_ref, "keywords": matcher.identity,
            "seed": seed, "metrics": metrics, "captions_seen": data.captions_seen,
            "keyword_hits": data.keyword_hits, "trained_at": datetime.now(timezone.utc).isoformat()}
    save_head(out, weight, bias, info)
    return info
