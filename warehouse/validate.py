"""Validation of raw catalog records into canonical rows, with a reason code for everything rejected.

Duplicate ``product_id`` within one input: the **first** occurrence wins (streaming order, so a file larger than
memory needs only the set of ids seen); every later one goes to quarantine as ``duplicate_in_input`` naming the
position of the one kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warehouse.quarantine import Reason
from warehouse.schema import CANONICAL_FIELDS

# Common retailer column names -> canonical fields; a user mapping (source -> canonical) overrides these.
DEFAULT_ALIASES: dict[str, str] = {
    "id": "product_id",
    "sku": "product_id",
    "item_id": "product_id",
    "name": "title",
    "product_name": "title",
    "body_html": "description",
    "product_type": "category",
    "attributes": "specs",
    "spec_table": "specs",
    "image_urls": "images",
    "image": "images",
    "image_url": "images",
    "video_urls": "videos",
    "video": "videos",
}


@dataclass(frozen=True)
class Limits:
    """Field limits (characters / items). Over-long fields quarantine the row rather than truncate it silently."""

    title: int = 1_000
    description: int = 100_000
    category: int = 500
    product_id: int = 256
    spec_entries: int = 500
    spec_value: int = 5_000
    images: int = 50
    videos: int = 10
    uri: int = 4_096


class Invalid(Exception):
    """A record that cannot become a canonical row: ``reason`` code and a message naming the value and the fix."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def resolve_mapping(columns: list[str] | None, mapping: Mapping[str, str] | None) -> dict[str, str]:
    """Source column -> canonical field for the given columns (aliases < identity < user mapping)."""
    mapping = dict(mapping or {})
    bad = {v for v in mapping.values() if v not in CANONICAL_FIELDS}
    if bad:
        raise ValueError(f"field mapping targets {sorted(bad)} are not canonical fields; use {CANONICAL_FIELDS}")
    out = dict(DEFAULT_ALIASES)
    out.update({f: f for f in CANONICAL_FIELDS})
    out.update(mapping)
    return out


def _text(name: str, value: Any, limit: int, *, required: bool = False, position: str = "") -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            reason = Reason.MISSING_PRODUCT_ID if name == "product_id" else Reason.MISSING_TITLE
            raise Invalid(reason, f"{position}: {name} is missing or empty; every row needs a non-empty {name}")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        shown = json.dumps(value, default=str)[:80]
        raise Invalid(Reason.WRONG_TYPE, f"{position}: {name} must be a string, got {type(value).__name__} {shown}")
    if name != "product_id" and not isinstance(value, str):
        # a numeric title/description is a mapping mistake more often than data; reject it loudly
        raise Invalid(Reason.WRONG_TYPE, f"{position}: {name} must be a string, got {type(value).__name__} {value!r}")
    text = str(value)
    if name == "product_id":
        text = text.strip()
    if len(text) > limit:
        raise Invalid(
            Reason.FIELD_TOO_LONG,
            f"{position}: {name} has {len(text):,} characters, over the limit of {limit:,}; "
            f"shorten it or raise Limits.{name}",
        )
    return text


def _uri_list(name: str, value: Any, limit: int, uri_limit: int, position: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = _maybe_json(value) if value.lstrip().startswith("[") else [v for v in value.split("|") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(Reason.WRONG_TYPE, f"{position}: {name} must be a list of URIs, got {json.dumps(value)[:80]}")
    if len(value) > limit:
        raise Invalid(Reason.FIELD_TOO_LONG, f"{position}: {len(value)} {name}, over the limit {limit}; raise Limits")
    for v in value:
        if len(v) > uri_limit:
            raise Invalid(Reason.FIELD_TOO_LONG, f"{position}: a {name} URI has {len(v)} characters (limit {uri_limit})")
    return [v.strip() for v in value]


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _scalar(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    return json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else str(v)


def normalize_specs(value: Any, limits: Limits = Limits(), position: str = "") -> list[dict[str, str]]:
    """A spec table as a mapping ``{key: value}`` or a list of ``{key|name, value}`` / ``[key, value]`` entries
    (or either as a JSON string) -> ordered ``[{key, value}]``."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        parsed = _maybe_json(value)
        if isinstance(parsed, str):
            raise Invalid(
                Reason.BAD_SPECS,
                f"{position}: spec table {value[:60]!r} is neither a mapping nor a key/value list; "
                'give {"Material": "Cotton"} or [{"key": "Material", "value": "Cotton"}]',
            )
        value = parsed
    entries: list[dict[str, str]] = []
    if isinstance(value, Mapping):
        entries = [{"key": str(k), "value": _scalar(v)} for k, v in value.items()]
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping) and ("key" in item or "name" in item) and "value" in item:
                entries.append({"key": str(item.get("key", item.get("name"))), "value": _scalar(item["value"])})
            elif isinstance(item, list | tuple) and len(item) == 2:
                entries.append({"key": str(item[0]), "value": _scalar(item[1])})
            else:
                raise Invalid(
                    Reason.BAD_SPECS,
                    f"{position}: spec entry {json.dumps(item, default=str)[:60]} is not a key/value pair; "
                    'use {"key": ..., "value": ...}',
                )
    else:
        raise Invalid(
            Reason.BAD_SPECS,
            f"{position}: spec table of type {type(value).__name__} is neither a mapping nor a key/value list",
        )
    if len(entries) > limits.spec_entries:
        raise Invalid(Reason.FIELD_TOO_LONG, f"{position}: {len(entries)} spec entries (limit {limits.spec_entries})")
    for e in entries:
        if len(e["value"]) > limits.spec_value:
            raise Invalid(
                Reason.FIELD_TOO_LONG,
                f"{position}: spec {e['key']!r} has {len(e['value']):,} characters (limit {limits.spec_value:,})",
            )
    return entries


def to_canonical(
    value: Mapping[str, Any], mapping: Mapping[str, str], *, position: str, source: str, limits: Limits = Limits()
) -> dict[str, Any]:
    """One parsed record -> canonical row, or raise ``Invalid``. Unmapped columns go to ``extra`` (JSON)."""
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in value.items():
        target = mapping.get(k)
        if target is None or target in fields:
            extra[k] = v
        else:
            fields[target] = v
    if isinstance(fields.get("extra"), str):
        fields["extra"] = _maybe_json(fields["extra"])
    if isinstance(fields.get("extra"), Mapping):
        extra = {**fields["extra"], **extra}
    elif fields.get("extra") not in (None, ""):
        extra = {"extra": fields["extra"], **extra}
    row = {
        "product_id": _text("product_id", fields.get("product_id"), limits.product_id, required=True, position=position),
        "title": _text("title", fields.get("title"), limits.title, required=True, position=position),
        "description": _text("description", fields.get("description"), limits.description, position=position),
        "category": _text("category", fields.get("category"), limits.category, position=position),
        "specs": normalize_specs(fields.get("specs"), limits, position),
        "images": _uri_list("images", fields.get("images"), limits.images, limits.uri, position),
        "videos": _uri_list("videos", fields.get("videos"), limits.videos, limits.uri, position),
        "labels": fields.get("labels") or [],
        "source": fields.get("source") or source,
        "updated_at": None if fields.get("updated_at") is None else str(fields["updated_at"]),
        "extra": json.dumps(extra, ensure_ascii=False, sort_keys=True, default=str) if extra else None,
    }
    if not isinstance(row["labels"], list):
        raise Invalid(Reason.WRONG_TYPE, f"{position}: labels must be a list, got {type(row['labels']).__name__}")
    return row
