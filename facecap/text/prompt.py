"""The caption rewrite prompt: system prompt + few-shot examples + the raw text, versioned.

Lives in facecap/data/rewrite_prompt.yaml (or `caption.prompt`). Its version
(the declared ``prompt_version`` plus a hash of the file) is stored per record
and is part of the caption stage's model identity.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from facecap.data import data_file
from pathlib import Path

import yaml

from facecap.settings import ConfigError


def default_prompt_path() -> Path:
    return data_file("rewrite_prompt.yaml")


@dataclass(frozen=True)
class Example:
    raw: str
    rewrite: str
    attributes: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class RewritePrompt:
    version: str
    system: str
    user_template: str
    examples: tuple[Example, ...]
    source: str = "<text>"

    def messages(self, raw: str) -> list[dict]:
        """The chat messages asking for one rewrite of `raw`."""
        out = [{"role": "system", "content": self.system.strip()}]
        for ex in self.examples:
            out.append({"role": "user", "content": self.user_template.format(raw=ex.raw)})
            out.append({"role": "assistant", "content": ex.rewrite})
        out.append({"role": "user", "content": self.user_template.format(raw=raw)})
        return out


def parse_prompt(text: str, source: str = "<text>") -> RewritePrompt:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"rewrite prompt {source} is invalid: {why}")

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise bad(f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise bad("expected a mapping with prompt_version, system, user_template, examples")
    for key in ("prompt_version", "system"):
        if not data.get(key):
            raise bad(f"'{key}' is missing")
    template = data.get("user_template", "{raw}")
    if "{raw}" not in template:
        raise bad("user_template must contain {raw}")
    try:
        template.format(raw="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise bad(f"user_template: {exc} (only {{raw}} may be used; double other braces)") from exc
    examples = []
    for i, ex in enumerate(data.get("examples") or []):
        if not isinstance(ex, dict) or not ex.get("raw") or not ex.get("rewrite"):
            raise bad(f"example {i + 1} needs 'raw' and 'rewrite'")
        examples.append(Example(str(ex["raw"]), str(ex["rewrite"]), tuple(ex.get("attributes") or ()),
                                tuple(ex.get("absent") or ())))
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return RewritePrompt(f"{data['prompt_version']}+{digest}", str(data["system"]), template, tuple(examples), source)


def load_prompt(path: str | os.PathLike[str] | None = None) -> RewritePrompt:
    p = Path(path) if path else default_prompt_path()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"rewrite prompt {p} cannot be read: {exc}. Set caption.prompt to an existing YAML "
                          "file, or unset it for the built-in prompt.") from exc
    return parse_prompt(text, str(p))
