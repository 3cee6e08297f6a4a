"""LLM denoise of alt-text (FLIP-80M): a system prompt + three examples, checked replies.

The deterministic pre-cleaner (facecap.text.clean) always runs first; this
asks an OpenAI-compatible endpoint (facecap.text.llm, the same client as the
caption rewrite) to remove what rules cannot (keyword lists, prices, slugs).
Denoise only removes text, so a reply is used only when every word in it
occurs in the text sent (case-insensitive); otherwise, and when the endpoint
fails, the pre-cleaned text is kept and the record says why. Replies are
requested at temperature 0 and cached by the client, so reruns are stable.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from facecap.data import data_file
from pathlib import Path

import yaml

from facecap.settings import ConfigError, LLMSettings

_WORD = re.compile(r"\w+", re.UNICODE)


def default_prompt_path() -> Path:
    return data_file("denoise_prompt.yaml")


@dataclass(frozen=True)
class DenoisePrompt:
    version: str
    system: str
    user_template: str
    examples: tuple[tuple[str, str], ...]

    def messages(self, text: str) -> list[dict]:
        out = [{"role": "system", "content": self.system.strip()}]
        for noisy, clean in self.examples:
            out.append({"role": "user", "content": self.user_template.format(text=noisy)})
            out.append({"role": "assistant", "content": clean})
        out.append({"role": "user", "content": self.user_template.format(text=text)})
        return out


def load_prompt(path: str | Path | None = None) -> DenoisePrompt:
    p = Path(path) if path else default_prompt_path()
    if not p.is_file():
        raise ConfigError(f"text.denoise_prompt: {p} does not exist")
    raw = p.read_bytes()
    try:
        data = yaml.safe_load(raw)
        examples = tuple((str(e["text"]), str(e["clean"])) for e in data["examples"])
        prompt = DenoisePrompt(f"{data['prompt_version']}-{hashlib.sha256(raw).hexdigest()[:8]}",
                               str(data["system"]), str(data["user_template"]), examples)
        prompt.user_template.format(text="x")
    except (yaml.YAMLError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise ConfigError(f"denoise prompt {p} is invalid ({type(exc).__name__}: {exc}): it needs prompt_version, "
                          "system, user_template with {text}, and examples of {text, clean}") from exc
    if len(examples) < 1:
        raise ConfigError(f"denoise prompt {p} has no examples")
    return prompt


def reply_problem(sent: str, reply: str | None) -> str | None:
    """Why a reply cannot be used as the denoised text (None: it can)."""
    if not reply or not reply.strip():
        return "empty_reply"
    allowed = {w.lower() for w in _WORD.findall(sent)}
    added = [w for w in _WORD.findall(reply) if w.lower() not in allowed]
    if added:
        return "added_words"
    if len(reply.strip()) > len(sent):
        return "longer_than_input"
    return None


def denoise_settings(llm: LLMSettings) -> LLMSettings:
    """The LLM settings for denoise: greedy decoding (a cleaning, not a creative rewrite)."""
    return llm.model_copy(update={"temperature": 0.0})


@dataclass(frozen=True)
class Denoised:
    text: str
    method: str  # "llm", or "rules" / "rules:<why the reply was not used>"


def denoise_many(texts: list[str], prompt: DenoisePrompt, client) -> list[Denoised]:
    """Ask the LLM to clean each (pre-cleaned) text; keep the pre-cleaned text where the reply is unusable."""
    todo = [i for i, t in enumerate(texts) if t]
    results = client.chat_many([prompt.messages(texts[i]) for i in todo]) if todo else []
    out = [Denoised(t, "rules") for t in texts]
    for i, result in zip(todo, results):
        if not result.ok:
            out[i] = Denoised(texts[i], "rules:llm_error")
            continue
        reply = " ".join(result.text.strip().strip('"').split())
        problem = reply_problem(texts[i], reply)
        out[i] = Denoised(texts[i], f"rules:{problem}") if problem else Denoised(reply, "llm")
    return out
