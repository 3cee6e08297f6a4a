"""Stages own their settings, columns, reasons, checks and report: registering one is all it takes."""

from __future__ import annotations

from facecap.chain import STAGES
from facecap.config import Config

# Every stage's settings hash on the default offline and full configs, as computed before the stages owned
# their settings sections: a changed hash would recompute every cached stage output of every user.
HASHES_OFFLINE = {"ingest": "bf22f69db5985296", "detect": "2d810cfad47ed73c", "dedup": "430562bcccede6a7",
                  "annotate": "2c95387e8091265d", "text": "35c3dc14243028c5", "caption": "7641201906b2f8f5"}
HASHES_FULL = {**HASHES_OFFLINE, "annotate": "869a41d359aaf921"}
SECTION_ORDER = ["profile", "ingest", "image", "detect", "execution", "models", "attributes", "caption", "llm",
                 "quality", "train", "download", "text", "dedup", "deploy"]


def test_stage_settings_hashes_are_unchanged():
    for profile, expected in (("offline", HASHES_OFFLINE), ("full", HASHES_FULL)):
        cfg = Config.model_validate({"profile": profile})
        assert {s.name: s.settings_hash(cfg) for s in STAGES} == expected, profile


def test_config_sections_keep_their_order():
    # config.yaml is written next to every release: the same sections in the same order as before.
    assert list(Config.model_fields) == SECTION_ORDER
    assert list(Config.model_validate({"profile": "offline"}).model_dump()) == SECTION_ORDER
