"""Quarantine: reason codes and row construction. Nothing the system rejects is dropped without a row here."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

PAYLOAD_CAP = 64 * 1024  # characters of raw payload kept per quarantine row


class Reason(StrEnum):
    # row-level
    MISSING_PRODUCT_ID = "missing_product_id"
    MISSING_TITLE = "missing_title"
    WRONG_TYPE = "wrong_type"
    FIELD_TOO_LONG = "field_too_long"
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    MALFORMED_CSV = "malformed_csv"
    MISSING_COLUMNS = "missing_columns"
    BAD_SPECS = "bad_specs"
    DUPLICATE_IN_INPUT = "duplicate_in_input"
    # media-level
    MEDIA_UNREACHABLE = "media_unreachable"
    MEDIA_TOO_LARGE = "media_too_large"
    MEDIA_NOT_IMAGE = "media_not_image"
    MEDIA_CORRUPT = "media_corrupt"
    MEDIA_BOMB = "media_decompression_bomb"
    MEDIA_NOT_VIDEO = "media_not_video"
    MEDIA_BAD_URI = "media_bad_uri"


def as_text(payload: Any) -> str:
    """Raw payload as text: bytes decoded with invalid sequences escaped, capped at ``PAYLOAD_CAP`` chars."""
    if isinstance(payload, bytes | bytearray):
        text = bytes(payload).decode("utf-8", errors="backslashreplace")
    elif isinstance(payload, str):
        text = payload
    else:
        import json

        text = json.dumps(payload, ensure_ascii=False, default=str)
    if len(text) > PAYLOAD_CAP:
        text = text[:PAYLOAD_CAP] + f"…[truncated {len(text) - PAYLOAD_CAP} chars]"
    return text


def quarantine_row(
    *,
    source: str,
    position: str,
    payload: Any,
    reason: Reason | str,
    message: str,
    run_id: str,
    product_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """One row of the ``quarantine`` table (schema ``warehouse.schema.QUARANTINE``)."""
    return {
        "source": source,
        "position": position,
        "product_id": product_id,
        "payload": as_text(payload),
        "reason": str(Reason(reason)),
        "message": message,
        "run_id": run_id,
        "quarantined_at": at or datetime.now(UTC),
    }
