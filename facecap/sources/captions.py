"""Caption and metadata text: sidecars decoded whatever their encoding, control characters removed, sizes bounded."""

from __future__ import annotations

import codecs
import json
import re
from urllib.parse import urlsplit

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


# Where a record's rights come from in its source metadata (a sidecar JSON, a WebDataset .json, the other
# columns of a Parquet row or URL list), matched case-insensitively: LAION's URL and LICENSE columns,
# img2dataset's `url` key and the `license` key it copies from its input's columns.
URL_KEYS = ("url", "image_url", "img_url")
LICENSE_KEYS = ("license", "licence")
MAX_LICENSE_CHARS = 1000


def _first_key(obj: dict, keys: tuple[str, ...]):
    lowered = {}
    for key, value in obj.items():
        if isinstance(key, str):
            lowered.setdefault(key.lower(), value)
    return next((lowered[k] for k in keys if lowered.get(k) is not None), None)


def _as_text(value) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    text, _ = clean_caption(text.strip())
    return text[:MAX_LICENSE_CHARS] or None


def domain_of(url: str | None) -> str | None:
    """The host of a URL, lower-case and without port or credentials (None: no URL, or one without a host)."""
    if not url:
        return None
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return host.rstrip(".") or None if host else None


def rights_from_meta(meta: str | None) -> tuple[str | None, str | None, str | None]:
    """(source_url, domain, license) from a record's source metadata JSON; None where the source says nothing.

    A licence is kept as the source wrote it ("?" in LAION means unknown and stays "?"); one that is not
    text (a number, an object) is kept as its JSON.
    """
    if not meta or isinstance(meta, TooLarge):
        return None, None, None
    try:
        obj = json.loads(meta)
    except ValueError:
        return None, None, None
    if not isinstance(obj, dict):
        return None, None, None
    url = _first_key(obj, URL_KEYS)
    url = url.strip() or None if isinstance(url, str) else None
    return url, domain_of(url), _as_text(_first_key(obj, LICENSE_KEYS))
