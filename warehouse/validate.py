"""Validation of raw catalog records into canonical rows, with a reason code for everything rejected.

Duplicate ``product_id`` within one input: the **first** occurrence wins (streaming order, so a file larger than
memory needs only the set of ids seen); every later one goes to quarantine as ``duplicate_in_input`` naming the
position of the one kept.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warehouse import schema
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


# ``extra`` is this encoder's JSON (what ``json.dumps(ensure_ascii=False, sort_keys=True, default=str)`` builds per
# call): stored as text and part of the content hash, so its exact bytes are a contract.
_extra_json = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str).encode


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
            raise Invalid(
                Reason.FIELD_TOO_LONG, f"{position}: a {name} URI has {len(v)} characters (limit {uri_limit})"
            )
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
        "product_id": _text(
            "product_id", fields.get("product_id"), limits.product_id, required=True, position=position
        ),
        "title": _text("title", fields.get("title"), limits.title, required=True, position=position),
        "description": _text("description", fields.get("description"), limits.description, position=position),
        "category": _text("category", fields.get("category"), limits.category, position=position),
        "specs": normalize_specs(fields.get("specs"), limits, position),
        "images": _uri_list("images", fields.get("images"), limits.images, limits.uri, position),
        "videos": _uri_list("videos", fields.get("videos"), limits.videos, limits.uri, position),
        "labels": fields.get("labels") or [],
        "source": fields.get("source") or source,
        "updated_at": None if fields.get("updated_at") is None else str(fields["updated_at"]),
        "extra": _extra_json(extra) if extra else None,
    }
    if not isinstance(row["labels"], list):
        raise Invalid(Reason.WRONG_TYPE, f"{position}: labels must be a list, got {type(row['labels']).__name__}")
    return row


# ---------------------------------------------------------------------------------------------------------------
# Vectorized mapping: the rows ``to_canonical`` would return, a whole batch at a time
# ---------------------------------------------------------------------------------------------------------------

_FAST_TARGETS = ("product_id", "title", "description", "category", "specs", "images", "videos", "updated_at")
_SLOW_TARGETS = frozenset({"extra", "labels", "source"})  # rare and free-form: always ``to_canonical``
# A character str.strip() never strips (letter, number, punctuation, symbol): a text that starts and ends with one
# needs no strip, and a text containing one is not blank.
_VISIBLE = r"[\p{L}\p{N}\p{P}\p{S}]"
_UNSTRIPPED = r"(?s)^[\p{L}\p{N}\p{P}\p{S}](.*[\p{L}\p{N}\p{P}\p{S}])?$"


@dataclass
class _Plan:
    """How the records with one key sequence map: the key feeding each field, and the keys that go to ``extra``."""

    targets: tuple[str, ...]
    extra_keys: tuple[str, ...]
    get: itemgetter  # record -> (value per target..., value per extra key...)
    rows: list[int]
    values: list[tuple]


def _keys(value: Any) -> tuple | None:
    return tuple(value) if type(value) is dict else None


def _plan(keys: tuple, mapping: Mapping[str, str]) -> _Plan | None:
    taken: dict[str, Any] = {}
    extra: list[Any] = []
    for k in keys:  # exactly to_canonical's assignment: the first key mapping to a field wins, the rest are extra
        target = mapping.get(k)
        if target is None or target in taken:
            extra.append(k)
        else:
            taken[target] = k
    if "product_id" not in taken or "title" not in taken or not _SLOW_TARGETS.isdisjoint(taken):
        return None
    if not all(type(k) is str for k in extra):
        return None
    targets = tuple(t for t in _FAST_TARGETS if t in taken)
    extra_keys = tuple(sorted(extra))
    return _Plan(targets, extra_keys, itemgetter(*(taken[t] for t in targets), *extra_keys), [], [])


def canonical_batch(
    values: Sequence[Any], mapping: Mapping[str, str], *, source: str, limits: Limits = Limits()
) -> tuple[pa.Table, list[int]]:
    """Vectorized ``to_canonical`` over parsed records -> (rows, indices of the records left to ``to_canonical``).

    ``rows`` has the ``CANONICAL`` columns plus ``_i``, the record's index in ``values`` (grouped by the records' key
    sequence, not in input order: reordering would copy every column). A record is
    mapped here only where the row is certainly the one ``to_canonical`` returns (string fields, a spec mapping, URI
    lists, all within limits); everything else, including every record it would reject, is left to it, so rejects
    keep its exact reasons and messages.
    """
    plans: dict[tuple, _Plan | None] = {}
    slow: list[int] = []
    groups: dict[tuple, list[int]] = {}  # key sequence -> the records that have it
    for i, keys in enumerate(map(_keys, values)):
        if keys in groups:
            groups[keys].append(i)
        else:
            groups[keys] = [i]
    for keys, rows in groups.items():
        plan = _plan(keys, mapping) if keys is not None else None
        if plan is None:
            slow.extend(rows)
            continue
        plans[keys] = plan
        plan.rows = rows
        plan.values = list(map(plan.get, map(values.__getitem__, rows)))
    tables = []
    for plan in plans.values():
        if plan is None:
            continue
        try:
            table, bad = _plan_table(plan, source, limits)
        except (pa.ArrowException, UnicodeError, TypeError, ValueError, OverflowError):
            table, bad = _empty_fast_table(), plan.rows  # e.g. a lone surrogate: to_canonical says what it says
        tables.append(table)
        slow.extend(bad)
    table = pa.concat_tables(tables) if tables else _empty_fast_table()
    slow.sort()
    return table, slow


def _empty_fast_table() -> pa.Table:
    return schema.CANONICAL.append(pa.field("_i", pa.int64())).empty_table()


def _plan_table(plan: _Plan, source: str, limits: Limits) -> tuple[pa.Table, list[int]]:
    n = len(plan.rows)
    columns = list(zip(*plan.values, strict=True)) if n else [()] * (len(plan.targets) + len(plan.extra_keys))
    plan.values = []
    ok = np.ones(n, dtype=bool)
    out: dict[str, Any] = {}
    for target, col in zip(plan.targets, columns, strict=False):
        if target in ("product_id", "title"):
            out[target] = _text_column(col, getattr(limits, target), ok, required=True, strip=target == "product_id")
        elif target in ("description", "category"):
            out[target] = _text_column(col, getattr(limits, target), ok, required=False, strip=False)
        elif target == "specs":
            out[target] = _specs_column(col, limits, ok)
        elif target in ("images", "videos"):
            out[target] = _uri_column(col, getattr(limits, target), limits.uri, ok)
        else:  # updated_at
            out[target] = pa.array(
                col if _only(col, str) else [None if x is None else str(x) for x in col], pa.string()
            )
    empty_lists = np.zeros(n + 1, dtype=np.int32)
    for name, field in zip(schema.CANONICAL.names, schema.CANONICAL, strict=True):
        if name not in out:
            if pa.types.is_list(field.type):
                out[name] = pa.ListArray.from_arrays(empty_lists, pa.array([], field.type.value_type))
            else:
                out[name] = pa.nulls(n, field.type)
    out["source"] = pa.array([source], pa.string()).take(np.zeros(n, dtype=np.int64))
    out["extra"] = _extra_column(plan.extra_keys, columns[len(plan.targets) :], n)
    arrays = [out[name].cast(field.type) for name, field in zip(schema.CANONICAL.names, schema.CANONICAL, strict=True)]
    rows = np.asarray(plan.rows, dtype=np.int64)
    table = pa.Table.from_arrays([*arrays, pa.array(rows)], schema=schema.CANONICAL.append(pa.field("_i", pa.int64())))
    if ok.all():
        return table, []
    return table.filter(pa.array(ok)), rows[~ok].tolist()


def _only(col: Sequence[Any], *types: type) -> bool:
    return set(map(type, col)) <= set(types)


def _text_column(col: Sequence[Any], limit: int, ok: np.ndarray, *, required: bool, strip: bool) -> pa.Array:
    """A string field as ``_text`` maps it; ``ok`` is cleared where that is not certain."""
    if _only(col, str, type(None)):
        arr = pa.array(col, pa.string())
    else:
        ok &= np.fromiter((type(x) is str or x is None for x in col), dtype=bool, count=len(col))
        arr = pa.array([x if type(x) is str else None for x in col], pa.string())
    visible = pc.match_substring_regex(arr, _VISIBLE).fill_null(False).to_numpy(zero_copy_only=False)
    if required:
        ok &= visible  # None, blank, or only control characters: to_canonical decides
        if strip:
            ok &= pc.match_substring_regex(arr, _UNSTRIPPED).fill_null(False).to_numpy(zero_copy_only=False)
    else:
        empty = pc.equal(arr, "").fill_null(False)
        ok &= visible | ~arr.is_valid().to_numpy(zero_copy_only=False) | empty.to_numpy(zero_copy_only=False)
        if pc.any(empty).as_py():
            arr = pc.if_else(empty, pa.scalar(None, pa.string()), arr)
    ok &= ~pc.greater(pc.utf8_length(arr), limit).fill_null(False).to_numpy(zero_copy_only=False)
    return arr


def _flatten_lists(col: Sequence[Any], kind: type, ok: np.ndarray) -> tuple[list[Any], np.ndarray]:
    """Concatenated items of the ``kind`` (dict: values and keys; list: items) per row and their counts; None and
    "" are empty, anything else clears ``ok``."""
    items: list[Any] = []
    counts = np.zeros(len(col), dtype=np.int32)
    extend = items.extend
    for j, v in enumerate(col):
        if type(v) is kind:
            extend(v)
            counts[j] = len(v)
        elif v is not None and v != "":
            ok[j] = False
    return items, counts


def _specs_column(col: Sequence[Any], limits: Limits, ok: np.ndarray) -> pa.Array:
    """Spec mappings as ``normalize_specs`` maps them (``{k: v}`` -> ``[{key: str(k), value: _scalar(v)}]``)."""
    if _only(col, dict):  # the usual case: flattened at C speed
        keys = list(itertools.chain.from_iterable(col))
        values = list(itertools.chain.from_iterable(map(dict.values, col)))
        counts = np.fromiter(map(len, col), dtype=np.int32, count=len(col))
    else:
        keys, counts = _flatten_lists(col, dict, ok)
        values = [v for d in col if type(d) is dict for v in d.values()]
    if not _only(keys, str):
        keys = [str(k) for k in keys]
    if not _only(values, str):
        values = [v if type(v) is str else _scalar(v) for v in values]
    value_arr = pa.array(values, pa.string())
    ok &= counts <= limits.spec_entries
    too_long = pc.greater(pc.utf8_length(value_arr), limits.spec_value).to_numpy(zero_copy_only=False)
    if too_long.any():
        ok[np.repeat(np.arange(len(col)), counts)[too_long]] = False
    entries = pa.StructArray.from_arrays([pa.array(keys, pa.string()), value_arr], fields=list(schema.SPEC))
    return pa.ListArray.from_arrays(_offsets(counts), entries)


def _uri_column(col: Sequence[Any], limit: int, uri_limit: int, ok: np.ndarray) -> pa.Array:
    """URI lists as ``_uri_list`` maps them, where no item needs stripping; strings to split are left to it."""
    items, counts = _flatten_lists(col, list, ok)
    if not _only(items, str):
        is_str = np.fromiter((type(x) is str for x in items), dtype=bool, count=len(items))
        ok[np.repeat(np.arange(len(col)), counts)[~is_str]] = False
        items = [x if type(x) is str else "" for x in items]
    arr = pa.array(items, pa.string())
    ok &= counts <= limit
    if len(items):
        unstripped = pc.or_(pc.equal(arr, ""), pc.match_substring_regex(arr, _UNSTRIPPED))
        bad = pc.or_(pc.invert(unstripped), pc.greater(pc.utf8_length(arr), uri_limit)).to_numpy(zero_copy_only=False)
        if bad.any():
            ok[np.repeat(np.arange(len(col)), counts)[bad]] = False
    return pa.ListArray.from_arrays(_offsets(counts), arr)


def _offsets(counts: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.array(offsets)


def _extra_column(keys: tuple[str, ...], columns: Sequence[Sequence[Any]], n: int) -> pa.Array:
    """``_extra_json({k: v, ...})`` per row, built from per-key encoded values (sorted keys, ", " and ": ")."""
    if not keys:
        return pa.nulls(n, pa.string())
    parts: list[Any] = ["{"]
    for k, col in zip(keys, columns, strict=True):
        if _only(col, str):
            encoded = schema.json_strings(pa.array(col, pa.string()))
        elif _only(col, float) and np.isfinite(col).all():  # the encoder writes a finite float as its repr
            encoded = pa.array(list(map(float.__repr__, col)), pa.string())
        else:
            encoded = pa.array([_extra_json(x) for x in col], pa.string())
        parts += [", " if len(parts) > 1 else "", _extra_json(k) + ": ", encoded]
    return pc.binary_join_element_wise(*parts, "}", "")
