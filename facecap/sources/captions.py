"""Caption and metadata text: sidecars decoded whatever their encoding, control characters removed, sizes bounded."""

from __future__ import annotations

import codecs
import json
import re

from facecap.sources.raw import TooLarge

CAPTION_COLUMNS = ("caption", "text", "TEXT", "alt_text", "txt", "sentence", "prompt")
CAPTION_KEYS = ("caption", "text", "TEXT", "alt_text")
# A caption or metadata sidecar beyond this is not text anyone wrote by hand: it is rejected unread
# (a WebDataset .json is about 1 KB, LAION alt-text rarely tops 1 KB).
MAX_TEXT_BYTES = 1 << 20

# Control characters other than tab, newline and carriage return: removed from captions (and counted).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Byte-order marks say the encoding outright; longer marks first (UTF-32-LE starts like UTF-16-LE's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Tried in order when text is not UTF-8. cp1252 is what most non-UTF-8 web text is; latin-1 decodes any
# bytes. Neither replaces a character, so encoding the text again with the recorded codec gives the bytes back.
FALLBACK_ENCODINGS = ("cp1252", "latin-1")


def decode_text(data: bytes) -> tuple[str, str | None]:
    """Text from a sidecar's bytes, and the encoding used when it was not plain UTF-8 (None when it was).

    A byte-order mark decides; else UTF-8 if the bytes are valid UTF-8; else the first of
    FALLBACK_ENCODINGS that decodes them (latin-1 always does). Nothing is replaced, so the
    original bytes are `text.encode(encoding)` (with the mark for utf-8-sig, utf-16 and utf-32).
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError:
                break
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    for encoding in FALLBACK_ENCODINGS:
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def sidecar_text(data: bytes | TooLarge | None) -> tuple[str | TooLarge | None, str | None]:
    """A sidecar's text (or its TooLarge marker) and the encoding it was decoded from (None: UTF-8)."""
    if data is None or isinstance(data, TooLarge):
        return data, None
    text, encoding = decode_text(data)
    return text.strip(), encoding


def clean_caption(caption: str | None) -> tuple[str | None, int]:
    """The caption without control characters (tab, newline and CR stay), and how many were removed.

    Control characters are never meant as caption text, and they break what reads captions
    later (terminals, CSV, key.txt exports, tokenizers); a caption is kept without them and the
    count is recorded (source_caption_chars_removed), instead of losing the image over them.
    """
    if caption is None:
        return None, 0
    cleaned, removed = _CONTROL.subn("", caption)
    return (cleaned.strip() if removed else cleaned), removed


def _utf8_size(text: str, limit: int) -> int:
    if len(text) > limit:  # at least one byte per character: no need to encode a huge string
        return len(text)
    return len(text.encode("utf-8", errors="surrogatepass"))


def text_too_large(what: str, text: str | TooLarge | None) -> str | None:
    """Why a caption or metadata text is over MAX_TEXT_BYTES (None when it is not)."""
    if isinstance(text, TooLarge):
        return f"{text.what}: {text.size} bytes > {text.limit or MAX_TEXT_BYTES} (text limit; not read)"
    if isinstance(text, str) and _utf8_size(text, MAX_TEXT_BYTES) > MAX_TEXT_BYTES:
        return f"{what}: {_utf8_size(text, MAX_TEXT_BYTES)} bytes > {MAX_TEXT_BYTES} (text limit)"
    return None


def caption_from_meta(meta: str | TooLarge | None) -> str | None:
    if not meta or isinstance(meta, TooLarge):
        return None
    try:
        obj = json.loads(meta)
    except ValueError:
        return None
    if isinstance(obj, dict):
        for key in CAPTION_KEYS:
            if isinstance(obj.get(key), str):
                return obj[key].strip()
    return None


def pick_column(names: list[str], configured: str | None, candidates: tuple[str, ...]) -> str | None:
    if configured:
        return configured if configured in names else None
    return next((c for c in candidates if c in names), None)
