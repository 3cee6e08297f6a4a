"""Record layouts shared by every stage: image records, the sample_id key, and how rejects look.

A stage's output is a Parquet file of the columns it adds, keyed by
``sample_id`` (ingest: ``image_id``); a face record is the join of its
chain's outputs (facecap.records). A stage declares the columns it adds
(Stage.output_fields) in its own module; `facecap.chain.record_fields` gathers them.
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
    # Rights of the sample, from its source metadata (facecap.sources.captions.rights_from_meta): the URL the
    # source lists for it, that URL's host (null: no URL, a local file), and the licence the source states.
    pa.field("source_url", pa.string()),
    pa.field("domain", pa.string()),
    pa.field("license", pa.string()),
]
IMAGE_SCHEMA = pa.schema(IMAGE_FIELDS)

# Every face record is keyed by it: image_id + face index.
SAMPLE_ID_FIELD = pa.field("sample_id", pa.string(), nullable=False)


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
    """Rejection reasons shared by the sources layer (ingest, download, image checks); each stage declares
    its own in a subclass (Stage.reasons). Stable strings: reports and quality suites count them."""

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
    # download (URL-list sources); HTTP errors are "http_<status>", e.g. http_404
    TIMEOUT = "timeout"
    DNS = "dns"
    CONNECT_ERROR = "connect_error"
    INVALID_URL = "invalid_url"  # not http(s), no host, bad port
    BLOCKED_ADDRESS = "blocked_address"  # resolves to loopback/private/link-local/metadata, not allow-listed
    TOO_MANY_REDIRECTS = "too_many_redirects"
    REDIRECT_LOOP = "redirect_loop"
    NOT_IMAGE = "not_image"  # Content-Type says it is not an image (text/html error pages...)
    # the site opted the image out: X-Robots-Tag directives, tdm-reservation: 1, a robots.txt disallow
    OPTED_OUT = "opted_out"


def is_transient(reason: str) -> bool:
    """Download failures worth retrying later (`--retry-failed`): the server or network may recover."""
    return reason in (Reason.TIMEOUT, Reason.DNS, Reason.CONNECT_ERROR, "http_429") or (
        reason.startswith("http_5") and len(reason) == 8)


def image_id_for(source: str, offset: str) -> str:
    """Stable id of a source image: its container URI plus its place in it."""
    return hashlib.blake2b(f"{source}\x00{offset}".encode(), digest_size=10).hexdigest()


def sample_id_for(image_id: str, face_index: int) -> str:
    return f"{image_id}-{face_index:02d}"


def is_test(image_ids: list[str], test_fraction: float) -> list[bool]:
    """Deterministic split by source image: the same image_id always lands in the same split."""
    cutoff = int(test_fraction * 2**64)
    return [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") < cutoff for i in image_ids]


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
