"""Warehouse schemas, defined once: the canonical catalog row and every Delta table's pyarrow schema.

The canonical row (see ARCHITECTURE.md) is the contract between sources/importers and everything
downstream. Readers and importers yield plain dicts with exactly the keys of ``CANONICAL_FIELDS``;
``to_products_batch`` turns them into Arrow with the ``PRODUCTS`` schema.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

SPEC = pa.struct([("key", pa.string()), ("value", pa.string())])
LABEL = pa.struct(
    [
        ("attribute", pa.string()),
        ("value", pa.string()),
        ("field", pa.string()),  # "title" | "description" | "specs" | None (implicit: value not in the text)
        ("begin", pa.int32()),  # character offsets into that field, end exclusive; None when not aligned
        ("end", pa.int32()),
    ]
)

# The canonical catalog row, in order. Every source reader and importer yields dicts with these keys.
CANONICAL_FIELDS: tuple[str, ...] = (
    "product_id",
    "title",
    "description",
    "category",
    "specs",
    "images",
    "videos",
    "labels",
    "source",
    "updated_at",
    "extra",
)
CANONICAL = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string()),
        pa.field("category", pa.string()),
        pa.field("specs", pa.list_(SPEC)),
        pa.field("images", pa.list_(pa.string())),
        pa.field("videos", pa.list_(pa.string())),
        pa.field("labels", pa.list_(LABEL)),
        pa.field("source", pa.string()),
        pa.field("updated_at", pa.string()),  # as the source gave it (ISO-8601 when known)
        pa.field("extra", pa.string()),  # JSON object of unmapped source columns, never dropped
    ]
)
# Fields the content hash covers: what, if changed, means the product must be re-enriched.
HASHED_FIELDS: tuple[str, ...] = ("title", "description", "category", "specs", "images", "videos", "labels", "extra")

TS = pa.timestamp("us", tz="UTC")

PRODUCTS = pa.schema(
    list(CANONICAL)
    + [
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("first_seen", TS, nullable=False),
        pa.field("last_seen", TS, nullable=False),  # ingest time that last wrote this content version
        pa.field("ingest_run_id", pa.string(), nullable=False),
    ]
)

MEDIA = pa.schema(
    [
        pa.field("media_id", pa.string(), nullable=False),  # "<product_id>|<uri>|<frame_ts with 3 decimals, empty for images>"
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # image | video_frame
        pa.field("frame_ts", pa.float64()),  # seconds into the video; null for images
        pa.field("sha256", pa.string()),  # of the source bytes (image) / of the stored frame blob (video frame)
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),  # source container/codec format, e.g. JPEG, PNG, h264
        pa.field("blob_uri", pa.string()),  # where the decoded (RGB, EXIF-rotated) image is stored
        pa.field("status", pa.string(), nullable=False),  # ok | error
        pa.field("ingest_run_id", pa.string(), nullable=False),
    ]
)
MEDIA_KEY = ("media_id",)

QUARANTINE = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # file path / URI / dataset name
        pa.field("position", pa.string(), nullable=False),  # "line:17", "row:4", "offset:1024", "media:<uri>"
        pa.field("product_id", pa.string()),  # when it could be read
        pa.field("payload", pa.string()),  # raw payload as text (invalid bytes escaped), truncated to a cap
        pa.field("reason", pa.string(), nullable=False),  # a ReasonCode value
        pa.field("message", pa.string(), nullable=False),  # human message: the bad value and the fix
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("quarantined_at", TS, nullable=False),
    ]
)
QUARANTINE_KEY = ("source", "position", "reason")

PAIRS = pa.schema(
    [
        pa.field("benchmark", pa.string(), nullable=False),  # e.g. ditto/Abt-Buy
        pa.field("split", pa.string(), nullable=False),  # train | valid | test
        pa.field("left_id", pa.string(), nullable=False),
        pa.field("right_id", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),  # 1 match, 0 non-match
    ]
)
PAIRS_KEY = ("benchmark", "split", "left_id", "right_id")

TABLES: dict[str, pa.Schema] = {"products": PRODUCTS, "media": MEDIA, "quarantine": QUARANTINE, "pairs": PAIRS}


def empty_row(**values: Any) -> dict[str, Any]:
    """A canonical row with every field present (lists empty, scalars None), overridden by ``values``."""
    row: dict[str, Any] = {f: None for f in CANONICAL_FIELDS}
    row.update(specs=[], images=[], videos=[], labels=[])
    unknown = set(values) - set(CANONICAL_FIELDS)
    if unknown:
        raise ValueError(f"Unknown canonical field(s) {sorted(unknown)}; expected a subset of {CANONICAL_FIELDS}")
    row.update(values)
    return row


def content_hash(row: Mapping[str, Any]) -> str:
    """Stable hash of the fields that define a product's content (``HASHED_FIELDS``): blake2b-128 of their compact
    JSON (UTF-8, no spaces), identical to ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))``."""
    payload = _dumps([row.get(f) for f in HASHED_FIELDS])
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


try:
    import orjson

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value)
except ImportError:  # pragma: no cover

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def to_canonical_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Canonical dict rows -> Arrow table with the ``CANONICAL`` schema."""
    return pa.Table.from_pylist([{f: r.get(f) for f in CANONICAL_FIELDS} for r in rows], schema=CANONICAL)
