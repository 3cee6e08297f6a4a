"""Record layouts: what each stage adds to a shard, and how rejects look.

A stage's output is a Parquet file of the columns it adds, keyed by
``sample_id`` (ingest: ``image_id``); a face record is the join of its
chain's outputs (facecap.records). A new stage adds its schema block here.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

# One row per source image, written by ingest.
IMAGE_FIELDS: list[pa.Field] = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # container URI: folder, tar or Parquet file
    pa.field("source_offset", pa.string(), nullable=False),  # relative path, tar key or row number
    pa.field("source_caption", pa.string()),  # without control characters (tab, newline, CR kept)
    # The encoding a non-UTF-8 caption was decoded from (cp1252, latin-1; utf-8-sig, utf-16, utf-32 from a
    # byte-order mark); null for UTF-8. No character is replaced, so encoding the caption with it gives its bytes.
    pa.field("source_caption_encoding", pa.string()),
    pa.field("source_caption_chars_removed", pa.int32()),  # control characters removed; null with no caption
    pa.field("source_meta", pa.string()),  # JSON from a sidecar or WebDataset .json, verbatim
    pa.field("source_width", pa.int32(), nullable=False),  # after EXIF orientation
    pa.field("source_height", pa.int32(), nullable=False),
    pa.field("source_format", pa.string(), nullable=False),
    pa.field("source_size", pa.int64(), nullable=False),  # encoded bytes
    pa.field("source_fingerprint", pa.string(), nullable=False),  # blake2b-128 of the encoded bytes
    # The encoded bytes, for downloaded images only (the only copy). Local sources are referenced
    # (source, source_offset, source_size, source_fingerprint) and read again where needed.
    pa.field("source_image", pa.binary()),
]
IMAGE_SCHEMA = pa.schema(IMAGE_FIELDS)

# Columns the detect stage adds; one row per kept face, joined to its image by image_id.
FACE_FIELDS: list[pa.Field] = [
    pa.field("sample_id", pa.string(), nullable=False),  # image_id + face index: unique per face
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("face_index", pa.int16(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # aligned crop, JPEG
    pa.field("width", pa.int32(), nullable=False),  # of `image`
    pa.field("height", pa.int32(), nullable=False),
    pa.field("det_score", pa.float32(), nullable=False),
    pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),  # x1, y1, x2, y2 in source pixels
    # left eye, right eye, nose, left mouth corner, right mouth corner: x, y pairs in source pixels
    pa.field("landmarks", pa.list_(pa.float32(), 10), nullable=False),
    pa.field("crop_box", pa.list_(pa.float32(), 4), nullable=False),  # square region before rotation, source px
    pa.field("align_angle", pa.float32(), nullable=False),  # degrees the crop was rotated to level the eyes
    pa.field("pad_fraction", pa.float32(), nullable=False),  # share of the crop outside the source image (black)
    pa.field("detector", pa.string(), nullable=False),  # model identity incl. weights hash
    pa.field("det_min_score", pa.float32(), nullable=False),
    pa.field("min_face_px", pa.int32(), nullable=False),
    pa.field("crop_margin", pa.float32(), nullable=False),
]
FACE_SCHEMA = pa.schema(FACE_FIELDS)

# Columns the annotate stage adds (issue 3). Probabilities are in CelebA order
# (facecap.attributes.ATTRIBUTES); the name lists follow that order too.
ATTRIBUTE_FIELDS: list[pa.Field] = [
    pa.field("attribute_probs", pa.list_(pa.float32(), 40), nullable=False),
    pa.field("attributes", pa.list_(pa.string()), nullable=False),  # kept: prob > keep threshold, after rules
    pa.field("absent_attributes", pa.list_(pa.string()), nullable=False),  # prob < absent threshold
    pa.field("attribute_rules", pa.list_(pa.string()), nullable=False),  # contradiction rules that fired
    pa.field("attribute_model", pa.string(), nullable=False),  # backend:identity incl. weights hash
    pa.field("attr_keep_threshold", pa.float32(), nullable=False),
    pa.field("attr_absent_threshold", pa.float32(), nullable=False),
]

# Columns the caption stage adds (issue 4).
CAPTION_FIELDS: list[pa.Field] = [
    pa.field("caption", pa.string(), nullable=False),  # the caption people train on
    pa.field("raw_caption", pa.string(), nullable=False),  # the grammar's text
    pa.field("grammar_version", pa.string(), nullable=False),
    pa.field("caption_seed", pa.int64(), nullable=False),
    pa.field("caption_model", pa.string(), nullable=False),  # "none" when not rewritten
    pa.field("prompt_version", pa.string()),
    pa.field("caption_check", pa.string(), nullable=False),  # "passed", "not_rewritten" or the fallback reason
]

# Columns the text stage adds on the flip80m and both paths. With
# text.caption_path = flip80m it also sets `caption` (TEXT_CAPTION_FIELD).
TEXT_FIELDS: list[pa.Field] = [
    pa.field("keywords", pa.list_(pa.string()), nullable=False),  # face keywords found in the alt-text
    pa.field("text_caption", pa.string(), nullable=False),  # the alt-text, pre-cleaned (and LLM-denoised if on)
    pa.field("text_score", pa.float32(), nullable=False),  # face-caption classifier probability
    pa.field("text_filter", pa.string(), nullable=False),  # classifier identity incl. weights hash
    pa.field("text_threshold", pa.float32(), nullable=False),
    pa.field("text_denoise", pa.string(), nullable=False),  # "llm", "rules" or "rules:<why the LLM reply was not used>"
    pa.field("text_cleaner", pa.string(), nullable=False),  # pre-cleaner version (+ LLM model and prompt version)
    pa.field("alt_text_chars", pa.int32(), nullable=False),  # characters of source_caption
    pa.field("text_chars_removed", pa.int32(), nullable=False),  # characters cleaning removed
    pa.field("url", pa.string()),  # the image URL of a URL-list source (from source_meta), else null
    pa.field("nsfw", pa.string()),  # the source's NSFW tag (LAION's NSFW column), if it has one
    pa.field("text_verdict", pa.string(), nullable=False),  # face_caption, or why not: not_face_caption, no_caption
]
TEXT_CAPTION_FIELD = pa.field("caption", pa.string(), nullable=False)
# On the both path a face whose alt-text is not about a face is kept, without text: these are null for it.
TEXT_FIELDS_NULL_WHEN_NOT_FACE = frozenset({"keywords", "text_caption", "text_score", "text_denoise",
                                            "text_chars_removed"})


SAMPLE_ID_FIELD = FACE_FIELDS[0]


def extend_schema(schema: pa.Schema, fields: list[pa.Field]) -> pa.Schema:
    """`schema`'s columns, then `fields` (replacing same-named ones): a joined record's layout."""
    names = {f.name for f in fields}
    return pa.schema([f for f in schema if f.name not in names] + fields)


def keyed_schema(fields: list[pa.Field]) -> pa.Schema:
    """A face stage's output schema: sample_id, then the columns it adds."""
    return pa.schema([SAMPLE_ID_FIELD] + fields)


REJECT_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("image_id", pa.string()),  # null when a whole source could not be read
        pa.field("sample_id", pa.string()),  # set for rejected faces
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_offset", pa.string()),
        pa.field("det_score", pa.float32()),
        pa.field("bbox", pa.list_(pa.float32(), 4)),
    ]
)


class Reason:
    """Rejection reasons. Stable strings: reports and quality suites count them."""

    # ingest
    UNREADABLE_SOURCE = "unreadable_source"  # a whole file could not be opened or parsed
    MISSING_COLUMNS = "missing_columns"
    UNREADABLE_MEMBER = "unreadable_member"  # a tar member or row that could not be read
    UNSAFE_MEMBER = "unsafe_member"  # a tar link, device or FIFO, or a name that is absolute, has '..', is too long
    DUPLICATE_MEMBER = "duplicate_member"  # a second image (or sidecar) for a tar key already read
    WRONG_COLUMN_TYPE = "wrong_column_type"  # a Parquet image or caption column of a type that cannot hold one
    MISSING_FILE = "missing_file"
    URL_NOT_DOWNLOADED = "url_not_downloaded"
    EMPTY_FILE = "empty_file"
    TOO_LARGE = "too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    DECODE_ERROR = "decode_error"
    SOURCE_CHANGED = "source_changed"  # a referenced source image is gone or differs from what ingest read
    # download (URL-list sources, issue 8); HTTP errors are "http_<status>", e.g. http_404
    TIMEOUT = "timeout"
    DNS = "dns"
    CONNECT_ERROR = "connect_error"
    INVALID_URL = "invalid_url"  # not http(s), no host, bad port
    BLOCKED_ADDRESS = "blocked_address"  # resolves to loopback/private/link-local/metadata, not allow-listed
    TOO_MANY_REDIRECTS = "too_many_redirects"
    REDIRECT_LOOP = "redirect_loop"
    NOT_IMAGE = "not_image"  # Content-Type says it is not an image (text/html error pages...)
    ROBOTS_NOAI = "robots_noai"  # X-Robots-Tag: noai / noimageai
    # detect
    NO_FACE = "no_face"
    LOW_SCORE = "low_score"
    TOO_SMALL = "too_small"
    # annotate
    FEW_ATTRIBUTES = "few_attributes"
    # caption (issue 4)
    NO_ATTRIBUTES = "no_attributes"  # nothing to caption: the face kept no attribute
    UNKNOWN_ATTRIBUTE = "unknown_attribute"  # a name that is not one of the 40 CelebA attributes
    # text (FLIP-80M path, issue 8)
    NO_CAPTION = "no_caption"  # empty alt-text after cleaning
    NOT_FACE_CAPTION = "not_face_caption"  # text classifier score not above text.threshold
    # dedup (release-wide)
    NEAR_DUPLICATE = "near_duplicate"  # within dedup.max_distance of a better face kept for its cluster


def is_transient(reason: str) -> bool:
    """Download failures worth retrying later (`--retry-failed`): the server or network may recover."""
    return reason in (Reason.TIMEOUT, Reason.DNS, Reason.CONNECT_ERROR, "http_429") or (
        reason.startswith("http_5") and len(reason) == 8)


def image_id_for(source: str, offset: str) -> str:
    """Stable id of a source image: its container URI plus its place in it."""
    return hashlib.blake2b(f"{source}\x00{offset}".encode(), digest_size=10).hexdigest()


def sample_id_for(image_id: str, face_index: int) -> str:
    return f"{image_id}-{face_index:02d}"


def empty_rejects() -> pa.Table:
    return REJECT_SCHEMA.empty_table()


def reject_rows(rows: list[dict]) -> pa.Table:
    """Build a rejects table from dicts; missing optional fields become null."""
    if not rows:
        return empty_rejects()
    columns = {f.name: [r.get(f.name) for r in rows] for f in REJECT_SCHEMA}
    return pa.table(columns, schema=REJECT_SCHEMA)


def image_bytes(value: bytes | dict | None) -> bytes | None:
    """A release image's encoded bytes: the image column holds {bytes, path} structs (as datasets stores an
    Image) since the release loads as Image() features; releases written before hold the bytes."""
    return value.get("bytes") if isinstance(value, dict) else value
