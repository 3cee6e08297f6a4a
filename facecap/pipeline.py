"""The curate pipeline's stages as shard jobs: stage logic + keys + storage.

Each ``run_*`` function runs one stage on one shard and returns its stats
dict. They know nothing of Prefect or Dask (tasks/ wraps them), so a test or
a benchmark can call them directly.

After ingest, every shard goes through the face stages in FACE_STAGES order.
Before any work, the driver asks each stage in turn for its plan (`plan_run`): on or
off (and why), and the identity of its model. Stages that are off are left
out of the chain, and the release says they were off and why. A face stage's
job has one signature: ``run_x(previous_stats, out, cfg, plan) -> stats``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from facecap import storage
from facecap.config import Config, ConfigError, settings_hash
from facecap.schema import CAPTION_FIELDS, FACE_SCHEMA, IMAGE_SCHEMA, extend_schema
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
    device_section: str | None = None  # config section whose `device: cuda` asks Dask for a GPU=1 worker


INGEST = StageInfo("ingest", INGEST_VERSION, priority=0)
DETECT = StageInfo("detect", DETECT_VERSION, priority=1, needs_gpu=True, device_section="detect")


@dataclass(frozen=True)
class StagePlan:
    """What the driver decided for one stage before any work."""

    on: bool
    model: str | None = None  # identity (name + weights hash), part of the stage key and of every record
    why: str | None = None  # why the stage is off
    info: dict = field(default_factory=dict)  # settings worth showing in the release (thresholds, files)


@dataclass(frozen=True)
class RunPlan:
    stages: dict[str, StagePlan]  # every face stage, in FACE_STAGES order

    @property
    def chain(self) -> list[StageInfo]:
        """The face stages that run, in order."""
        return [s for s in FACE_STAGES if self.stages[s.name].on]

    def model(self, stage: str) -> str | None:
        return self.stages[stage].model

    def summary(self) -> dict[str, dict]:
        out: dict[str, dict] = {INGEST.name: {"status": "on"}}
        for name, p in self.stages.items():
            entry: dict = {"status": "on" if p.on else "off"}
            if p.model:
                entry["model"] = p.model
            if p.why:
                entry["why"] = p.why
            entry.update(p.info)
            out[name] = entry
        return out


def face_shard(stage: StageInfo, previous: dict, out: str, settings: str, plan: RunPlan | str):
    """Paths, stats metadata and planned model identity of `stage` on the shard `previous` produced."""
    model_id = plan if isinstance(plan, str) else plan.model(stage.name)
    key = stage_key(stage.name, stage.version, settings, model_id, previous["key"])
    meta = {"input": previous["input"], "input_key": previous["key"], "source": previous["source"],
            "stage_version": stage.version, "settings_hash": settings, "model": model_id}
    return ShardPaths(out, stage.name, key), meta, model_id


def check_loaded(what: str, loaded: str, planned: str) -> None:
    """A worker must run the model the driver planned (and keyed the outputs by)."""
    if loaded != planned:
        raise RuntimeError(f"worker loaded {what} {loaded}, the run planned {planned}: the files differ "
                           "between the driver and this worker")


def ingest_settings_hash(cfg: Config) -> str:
    return settings_hash({"ingest": cfg.ingest.model_dump(mode="json"), "image": cfg.image.model_dump(mode="json")})


def detect_settings_hash(cfg: Config) -> str:
    # Only what changes the records: device, threads and batch size do not.
    settings = cfg.detect.model_dump(mode="json", exclude={"device", "threads", "batch_size", "weights", "weights_sha256"})
    return settings_hash({"detect": settings, "image": cfg.image.model_dump(mode="json")})


def run_ingest(spec: ShardSpec, out: str, cfg: Config) -> dict:
    if spec.kind == "urls":  # downloads; retry generations for --retry-failed live in urllist
        from facecap.stages.urllist import run_url_shard

        return run_url_shard(spec, out, cfg, INGEST.name, INGEST.version)
    key = stage_key(INGEST.name, INGEST.version, ingest_settings_hash(cfg), "", settings_hash(spec.key_material()))
    meta = {"input": spec.label, "input_key": spec.fingerprint, "source": spec.source, "kind": spec.kind,
            "stage_version": INGEST.version, "settings_hash": ingest_settings_hash(cfg), "model": None}
    return run_shard(ShardPaths(out, INGEST.name, key), IMAGE_SCHEMA,
                     lambda counters: ingest_shard(spec, cfg.ingest, cfg.image, counters), meta)


def plan_detect(cfg: Config, planned: dict[str, StagePlan] | None = None) -> StagePlan:
    from facecap.models.registry import detector_identity

    # Resolving the weights here fails the run before any work if they are missing.
    return StagePlan(True, detector_identity(cfg), info={
        "weights": cfg.detector_weights, "min_score": cfg.detect.min_score,
        "min_face_px": cfg.detect.min_face_px, "crop_margin": cfg.detect.crop_margin})


def run_detect(ingested: dict, out: str, cfg: Config, plan: RunPlan | str) -> dict:
    from facecap.models.registry import load_detector

    paths, meta, detector_id = face_shard(DETECT, ingested, out, detect_settings_hash(cfg), plan)
    detector = None
    if not storage.exists(paths.stats):
        # Loaded (once per worker process) before the shard's clock starts, so
        # shard seconds measure detection, not start-up.
        detector = load_detector(cfg)
        check_loaded("detector", detector.identity, detector_id)

    def produce(counters):
        return detect_faces(iter_shard(ingested["output"]), detector, cfg.detect, cfg.image, counters)

    return run_shard(paths, FACE_SCHEMA, produce, meta)


# --- annotate: 40 CelebA attributes per face (issue 3) ----------------------
ANNOTATE = StageInfo("annotate", "1", priority=2, needs_gpu=True, device_section="attributes")


def annotate_settings_hash(cfg: Config) -> str:
    # Only what changes the records: the model is in the key through its identity;
    # device, threads, batch size and training settings do not change outputs.
    return settings_hash({"attributes": cfg.attributes.model_dump(
        mode="json", include={"backend", "keep_threshold", "absent_threshold", "min_attributes"}),
        "image": cfg.image.model_dump(mode="json")})


def plan_annotate(cfg: Config, planned: dict[str, StagePlan] | None = None) -> StagePlan:
    from facecap.models.attributes import attribute_identity, configured_model, is_local_model

    ref = configured_model(cfg)
    if cfg.profile == "offline" and not is_local_model(ref):
        # The one switch that runs without attributes: offline, with no local model given.
        return StagePlan(False, why=(
            "offline profile: no local attribute model configured (attributes.model); set it to a model "
            "directory (e.g. one written by `facecap train-attributes`) to annotate the 40 CelebA attributes"
            + (f"; {ref!r} is not a local directory" if ref else "")))
    # Resolving (and in the full profile fetching) the model here fails the run before any work.
    a = cfg.attributes
    return StagePlan(True, attribute_identity(cfg), info={
        "backend": a.backend, "model_ref": ref, "keep_threshold": a.keep_threshold,
        "absent_threshold": a.absent_threshold, "min_attributes": a.min_attributes})


def _attribute_threads(cfg: Config) -> int | None:
    if cfg.attributes.threads or cfg.execution.dask_address:
        return cfg.attributes.threads
    # Local workers share the machine's cores instead of each taking all of them.
    cores = os.cpu_count() or 1
    return max(1, cores // (cfg.execution.n_workers or cores))


def run_annotate(previous: dict, out: str, cfg: Config, plan: RunPlan | str) -> dict:
    from facecap.models.attributes import load_attribute_model
    from facecap.stages.annotate import ANNOTATED_SCHEMA, annotate_faces

    paths, meta, model_id = face_shard(ANNOTATE, previous, out, annotate_settings_hash(cfg), plan)
    model = None
    if not storage.exists(paths.stats):
        # Loaded once per worker process, before the shard's clock starts.
        model = load_attribute_model(cfg, _attribute_threads(cfg), expect=model_id)
        check_loaded("attribute model", model.identity, model_id)

    def produce(counters):
        return annotate_faces(iter_shard(previous["output"]), model, cfg.attributes, cfg.image, counters)

    return run_shard(paths, ANNOTATED_SCHEMA, produce, meta)


# --- caption: PCFG text, LLM rewrite, faithfulness check (issue 4) ----------
CAPTION = StageInfo("caption", "1", priority=3)


def caption_settings_hash(cfg: Config) -> str:
    # What changes the text. File contents are in the model identity (grammar,
    # lexicon and prompt versions), so their paths are not; batch size is not.
    caption = cfg.caption.model_dump(mode="json", exclude={"grammar", "lexicon", "prompt", "batch_size"})
    llm = cfg.llm.model_dump(mode="json", include={"model", "temperature", "top_p", "max_tokens"}) \
        if cfg.llm.endpoint else None
    return settings_hash({"caption": caption, "llm": llm})


def llm_cache_dir(cfg: Config, out: str) -> str:
    return cfg.llm.cache_dir or storage.join(out, "cache", "llm")


def plan_caption(cfg: Config, planned: dict[str, StagePlan] | None = None) -> StagePlan:
    from facecap.stages.caption import Captioner
    from facecap.text.llm import LLMClient

    if cfg.text.caption_path == "flip80m":
        return StagePlan(False, why="text.caption_path is flip80m: the filtered, denoised alt-text is the caption")
    if planned is not None and not planned[ANNOTATE.name].on:
        return StagePlan(False, why=f"needs the {ANNOTATE.name} stage, which is off (no attributes to caption); "
                                    "records keep source_caption")
    # Loading here fails the run before any work on a bad grammar, lexicon or prompt file.
    captioner = Captioner(cfg.caption, cfg.llm, load_similarity=False)  # MiniLM loads in the workers
    info = {"grammar": cfg.caption.grammar or "built-in", "grammar_version": captioner.grammar.version,
            "lexicon_version": captioner.lexicon.version, "max_attempts": cfg.caption.max_attempts,
            "rewrite": "off: no llm.endpoint; captions are the grammar's text (caption_model none)"}
    if captioner.client is not None:
        served = LLMClient(cfg.llm).served_models()
        if cfg.llm.model not in served:
            raise ConfigError(f"llm.model {cfg.llm.model!r} is not served by {cfg.llm.endpoint} "
                              f"(it serves: {', '.join(served) or 'nothing'}); set llm.model to one of those")
        info.update(rewrite="on", llm_endpoint=cfg.llm.endpoint, llm_model=cfg.llm.model,
                    prompt_version=captioner.prompt.version, min_similarity=cfg.caption.min_similarity)
    return StagePlan(True, captioner.identity, info=info)


def run_caption(previous: dict, out: str, cfg: Config, plan: RunPlan | str) -> dict:
    from facecap.stages.caption import Captioner, caption_faces

    paths, meta, model_id = face_shard(CAPTION, previous, out, caption_settings_hash(cfg), plan)
    captioner, schema = None, None
    if not storage.exists(paths.stats):
        captioner = Captioner(cfg.caption, cfg.llm, llm_cache_dir(cfg, out))
        check_loaded("caption grammar, lexicon and prompt", captioner.identity, model_id)
        # The input's own columns (whatever annotate wrote), then the caption columns.
        schema = extend_schema(read_shard_schema(previous["output"]), CAPTION_FIELDS)

    def produce(counters):
        return caption_faces(iter_shard(previous["output"], batch_rows=256), captioner, schema, counters,
                             cfg.caption.batch_size)

    return run_shard(paths, schema, produce, meta)


def read_shard_schema(url: str):
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as fh:
        return pq.read_schema(fh).remove_metadata()


# --- text: FLIP-80M alt-text path: keywords, classifier, denoise (issue 8) ---
TEXT = StageInfo("text", "1", priority=3)
_TEXT_TOOLS: dict = {}  # per worker process: model identity -> loaded TextTools


def text_settings_hash(cfg: Config) -> str:
    # File contents (keywords, classifier, prompt) are in the model identity; batch size changes nothing.
    text = cfg.text.model_dump(mode="json", include={"caption_path", "threshold", "denoise"})
    llm = cfg.llm.model_dump(mode="json", include={"model", "max_tokens"}) if cfg.text.denoise else None
    return settings_hash({"text": text, "llm": llm})


def plan_text(cfg: Config, planned: dict[str, StagePlan] | None = None) -> StagePlan:
    from facecap.text.clean import CLEANER_VERSION
    from facecap.text.denoise import load_prompt
    from facecap.text.keywords import KeywordMatcher
    from facecap.text.text_filter import describe, planned_identity

    t = cfg.text
    if t.caption_path == "facecaption":
        return StagePlan(False, why="text.caption_path is facecaption: captions come from attributes "
                                    "(set it to flip80m or both for the filtered, denoised alt-text)")
    matcher = KeywordMatcher.from_file(t.keywords_file)
    cleaner = CLEANER_VERSION
    info = {"caption_path": t.caption_path, "filter": describe(t), "threshold": t.threshold,
            "keywords": len(matcher.keywords), "denoise": "rules (pre-cleaner only)"}
    if t.denoise:
        if not cfg.llm.endpoint:
            raise ConfigError("text.denoise is on but llm.endpoint is not set: set llm.endpoint to an "
                              "OpenAI-compatible server, or turn text.denoise off (the pre-cleaner still runs)")
        prompt = load_prompt(t.denoise_prompt)
        cleaner = f"{CLEANER_VERSION}+llm:{cfg.llm.model}:denoise-{prompt.version}"
        info.update(denoise="llm", llm_model=cfg.llm.model, denoise_prompt_version=prompt.version)
    # Resolving the classifier's files here fails the run before any work if they are missing.
    return StagePlan(True, f"{planned_identity(t, matcher)}|{matcher.identity}|{cleaner}", info=info)


def _text_tools(cfg: Config, out: str, model_id: str):
    from facecap.stages.text import TextTools
    from facecap.text.keywords import KeywordMatcher
    from facecap.text.text_filter import load_text_filter

    if model_id not in _TEXT_TOOLS:
        matcher = KeywordMatcher.from_file(cfg.text.keywords_file)
        classifier = load_text_filter(cfg.text, matcher)
        cleaner = model_id.rsplit("|", 1)[1]
        check_loaded("text filter and keywords", f"{classifier.identity}|{matcher.identity}|{cleaner}", model_id)
        denoise = None
        if cfg.text.denoise:
            from facecap.text.denoise import denoise_many, denoise_settings, load_prompt
            from facecap.text.llm import LLMClient

            prompt = load_prompt(cfg.text.denoise_prompt)
            client = LLMClient(denoise_settings(cfg.llm), llm_cache_dir(cfg, out))

            def denoise(texts):
                return denoise_many(texts, prompt, client)
        _TEXT_TOOLS.clear()  # one configuration per worker at a time
        _TEXT_TOOLS[model_id] = TextTools(matcher, classifier, cleaner, denoise)
    return _TEXT_TOOLS[model_id]


def run_text(previous: dict, out: str, cfg: Config, plan: RunPlan | str) -> dict:
    from facecap.stages.text import filter_captions, text_schema

    paths, meta, model_id = face_shard(TEXT, previous, out, text_settings_hash(cfg), plan)
    tools, schema = None, None
    if not storage.exists(paths.stats):
        tools = _text_tools(cfg, out, model_id)  # loaded once per worker, before the shard's clock starts
        schema = text_schema(read_shard_schema(previous["output"]), cfg.text)

    def produce(counters):
        return filter_captions(iter_shard(previous["output"], batch_rows=256), tools, cfg.text, schema, counters)

    return run_shard(paths, schema, produce, meta)


# --- the chain ---------------------------------------------------------------
FACE_STAGES: tuple[StageInfo, ...] = (DETECT, ANNOTATE, TEXT, CAPTION)
# A planner gets the stages planned before it: a stage that works on another's output is off
# when that one is off (caption needs annotate's attributes).
PLANNERS: dict[str, Callable[[Config, dict[str, StagePlan]], StagePlan]] = {
    DETECT.name: plan_detect, ANNOTATE.name: plan_annotate, TEXT.name: plan_text, CAPTION.name: plan_caption,
}
JOBS: dict[str, Callable[[dict, str, Config, RunPlan], dict]] = {
    DETECT.name: run_detect, ANNOTATE.name: run_annotate, TEXT.name: run_text, CAPTION.name: run_caption,
}


def plan_run(cfg: Config) -> RunPlan:
    """Plan every face stage (fails here, before any work, if a model a stage needs is missing)."""
    plans: dict[str, StagePlan] = {}
    for stage in FACE_STAGES:
        plans[stage.name] = PLANNERS[stage.name](cfg, plans)
    return RunPlan(plans)
