"""The key a per-process model cache is looked up by (models/registry.py, models/attributes.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facecap.config import Config


class SelectedBy:
    """A config as a cache key: equal when `key` (what selects a model) is, whatever else differs."""

    def __init__(self, cfg: Config, key: tuple) -> None:
        self.cfg, self.key = cfg, key

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SelectedBy) and other.key == self.key
