"""The one typed configuration of a FaceCap run: the core sections plus one section per registered stage.

Settings come from (lowest to highest precedence): the defaults, the
profile's defaults, a YAML file (``--config``), and ``--set section.key=value``
overrides. The core sections live in facecap.settings; each stage declares its
own section in its module; `Config` is built from both for the stages of the
chain (facecap.chain). The resolved config is written next to every run and
release, and each stage reads only its own section, whose hash keys that
stage's outputs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from facecap import chain
from facecap.settings import ConfigBase, CoreSections, load_settings, model_for


def config_model() -> type[ConfigBase]:
    """The Config model of the stages registered now (a stage registered for a while adds its section)."""
    return model_for(chain.STAGES)


if TYPE_CHECKING:
    class Config(ConfigBase, CoreSections):  # for type checkers; stage sections are read as attributes
        def __getattr__(self, section: str) -> Any: ...
else:
    Config = config_model()  # the built-in chain's model


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                profile: str | None = None) -> Config:
    """Build the run's Config from a YAML file, ``--set`` overrides and a profile."""
    return load_settings(config_model(), path, overrides, profile)
