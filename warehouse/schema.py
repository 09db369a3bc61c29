"""Warehouse schemas, defined once: the canonical catalog row and every Delta table's pyarrow schema.

The canonical row (see ARCHITECTURE.md) is the contract between sources/importers and everything
downstream. Readers and importers yield plain dicts with exactly the keys of ``CANONICAL_FIELDS``;
``to_products_batch`` turns them into Arrow with the ``PRODUCTS`` schema.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
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
        # "<product_id>|<uri>|<frame_ts with 3 decimals, empty for images>"
        pa.field("media_id", pa.string(), nullable=False),
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
        pa.field("line", pa.int32(), nullable=False),  # 1-based line in the benchmark file: every line is kept
        pa.field("left_id", pa.string(), nullable=False),
        pa.field("right_id", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),  # 1 match, 0 non-match
    ]
)
# Keyed by file line, not by (left, right): the published files repeat a few pairs (some with both labels) and
# the published metrics count every line.
PAIRS_KEY = ("benchmark", "split", "line")

# Attribute values written back by the JAVE enrichment flow; one row per (product, attribute, value occurrence).
ATTRIBUTE_PREDICTIONS = pa.schema(
    [
        pa.field("prediction_id", pa.string(), nullable=False),  # product_id|attribute|kind|field|begin|value
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("attribute", pa.string(), nullable=False),
        pa.field("value", pa.string(), nullable=False),
        pa.field("field", pa.string()),  # title | description | specs; null for implicit values
        pa.field("begin", pa.int32()),
        pa.field("end", pa.int32()),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("threshold", pa.float32(), nullable=False),  # the per-attribute threshold chosen on validation
        pa.field("kind", pa.string(), nullable=False),  # extracted | implicit
        pa.field("content_hash", pa.string(), nullable=False),  # of the product version this was predicted from
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("mlflow_run_id", pa.string(), nullable=False),
        pa.field("predicted_at", TS, nullable=False),
    ]
)
PREDICTION_KEY = ("prediction_id",)

# Which product version each model version has predicted (the enrichment flow's incremental state).
PREDICTED_PRODUCTS = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("mlflow_run_id", pa.string(), nullable=False),
        pa.field("accepted", pa.int32(), nullable=False),
        pa.field("in_review", pa.int32(), nullable=False),
        pa.field("predicted_at", TS, nullable=False),
    ]
)

# Product embeddings (dedupe flow). The vector is a variable-length list so one table serves any model width; every
# row of one model version has that model's width.
EMBEDDINGS = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32()), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("mlflow_run_id", pa.string()),
        pa.field("embedded_at", TS, nullable=False),
    ]
)
# The directed top-k neighbour lists, kept so an incremental run re-queries only what changed.
KNN_GRAPH = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("neighbors", pa.list_(pa.string()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        # the content whose vector this list was searched with: a product whose embedding changed since (e.g. a
        # run killed between the embeddings write and the graph write) is searched again
        pa.field("content_hash", pa.string()),
        # an approximate graph's IVF partition (features.similarity.IvfCells): the product's cell, and the
        # warehouse path of the centroids (safetensors), so an update searches the cells the build searched;
        # null for an exact graph
        pa.field("ivf_cell", pa.int32()),
        pa.field("ivf_centroids", pa.string()),
    ]
)
DUPLICATES = pa.schema(
    [
        pa.field("a", pa.string(), nullable=False),  # a < b
        pa.field("b", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # e.g. cosine
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("detected_at", TS, nullable=False),
    ]
)
# The pair matcher's scores of the current top-k candidate pairs, with the content hashes they were scored on: an
# incremental dedupe scores again only the pairs whose products changed (or that are new candidates).
PAIR_SCORES = pa.schema(
    [
        pa.field("a", pa.string(), nullable=False),  # a < b
        pa.field("b", pa.string(), nullable=False),
        pa.field("a_hash", pa.string(), nullable=False),
        pa.field("b_hash", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("matcher_version", pa.string(), nullable=False),  # e.g. pair-matcher/3
        pa.field("scored_at", TS, nullable=False),
    ]
)
CLUSTERS = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string(), nullable=False),  # the smallest product_id in the cluster: stable
        pa.field("cluster_size", pa.int32(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

# One row per nightly run (flows/nightly.py): its state (for resume), the watermark it covered, and its lineage.
RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("flow_run_id", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # running | succeeded | failed
        pa.field("started_at", TS, nullable=False),
        pa.field("finished_at", TS),
        # products whose last_seen is in (watermark_from, watermark_to] are this run's changes
        pa.field("watermark_from", TS),
        pa.field("watermark_to", TS),
        pa.field("stages_done", pa.list_(pa.string()), nullable=False),
        pa.field("params", pa.string()),  # JSON
        pa.field("stats", pa.string()),  # JSON: per stage counts and seconds
        pa.field("models", pa.string()),  # JSON: {"jave": "3", "product-encoder": "1"}
        pa.field("tables_read", pa.string()),  # JSON: {table: delta version}
        pa.field("tables_written", pa.string()),  # JSON: {table: [version before, version after]}
        pa.field("mlflow_run_id", pa.string()),
        pa.field("error", pa.string()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "products": PRODUCTS,
    "media": MEDIA,
    "quarantine": QUARANTINE,
    "pairs": PAIRS,
    "attribute_predictions": ATTRIBUTE_PREDICTIONS,
    "review_queue": ATTRIBUTE_PREDICTIONS,  # same shape: predictions scored below their attribute's threshold
    "predicted_products": PREDICTED_PRODUCTS,
    "embeddings": EMBEDDINGS,
    "knn_graph": KNN_GRAPH,
    "duplicates": DUPLICATES,
    "pair_scores": PAIR_SCORES,
    "clusters": CLUSTERS,
    "runs": RUNS,
}


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
    JSON (UTF-8, no spaces), identical to ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))``.

    ``content_hashes`` computes the same bytes for a whole Arrow table; an unchanged product must never look
    changed because the other path hashed it, so the two are tested against each other.
    """
    payload = _dumps([row.get(f) for f in HASHED_FIELDS])
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


try:
    import orjson

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value)
except ImportError:  # pragma: no cover

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# JSON string escaping as orjson and ``json.dumps(ensure_ascii=False)`` both do it: ", \\ and the C0 controls,
# five of them with short escapes, the rest as \\u00XX; everything else (non-ASCII, DEL, U+2028) verbatim.
_SHORT_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', 10: "\\n", 13: "\\r", 9: "\\t", 8: "\\b", 12: "\\f"}


def escaped_strings(values: pa.Array | pa.ChunkedArray) -> pa.StringArray:
    """Each string JSON-escaped, without the quotes (nulls stay null): what ``_dumps`` writes between them."""
    import numpy as np
    import pyarrow.compute as pc

    values = _one_chunk(values).cast(pa.string())
    n = len(values)
    if n == 0 or values.null_count == n:
        return values
    # one numpy pass over the data buffer finds the bytes to escape: several times faster than a regex per string
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + n + 1]
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    hits = np.flatnonzero((data < 0x20) | (data == 0x22) | (data == 0x5C))
    if hits.size == 0:
        return values
    mask = np.zeros(n, dtype=bool)
    mask[np.searchsorted(offsets, hits + offsets[0], side="right") - 1] = True
    needs = pa.array(mask)
    sub = values.filter(needs)
    present = set(np.unique(data[hits]).tolist())
    if present - _SHORT_ESCAPES.keys():  # a control character escaped as \\u00XX (rare): the encoder does these rows
        escaped = pa.array([_dumps(v).decode("utf-8")[1:-1] for v in sub.to_pylist()], pa.string())
    else:
        escaped = sub
        for byte in (0x5C, *(b for b in _SHORT_ESCAPES if b != 0x5C)):  # backslash first
            if byte in present:
                escaped = pc.replace_substring(escaped, chr(byte), _SHORT_ESCAPES[byte])
    return pc.replace_with_mask(values, needs, escaped)


def json_strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each string as a JSON string literal (null -> ``null``), byte-identical to ``_dumps`` of the Python str."""
    import pyarrow.compute as pc

    quoted = pc.binary_join_element_wise('"', escaped_strings(values), '"', "")
    return pc.fill_null(quoted, "null") if quoted.null_count else quoted


def _json_items(values: pa.Array) -> list[Any]:
    """``values`` (a list array) as join pieces: ``[`` items ``]`` per list, null lists as ``null``."""
    import pyarrow.compute as pc

    offsets = values.offsets
    if len(offsets) and offsets[0].as_py():
        offsets = pc.subtract(offsets, offsets[0])
    flat = values.flatten()
    if pa.types.is_struct(flat.type):  # spec entries {"key":..,"value":..}
        keys, vals = flat.field("key"), flat.field("value")
        if keys.null_count or vals.null_count:
            items = pc.binary_join_element_wise('{"key":', json_strings(keys), ',"value":', json_strings(vals), "}", "")
        else:
            items = pc.binary_join_element_wise(
                '{"key":"', escaped_strings(keys), '","value":"', escaped_strings(vals), '"}', ""
            )
    else:
        items = json_strings(flat)
    joined = pc.binary_join(pa.ListArray.from_arrays(offsets, items), ",")
    if values.null_count:
        return [
            pc.fill_null(pc.if_else(values.is_valid(), pc.binary_join_element_wise("[", joined, "]", ""), None), "null")
        ]
    return ["[", joined, "]"]


def content_hashes(table: pa.Table) -> pa.Array:
    """``content_hash`` of every row of a table with the ``HASHED_FIELDS`` columns, vectorized (same bytes)."""
    import pyarrow.compute as pc

    n = table.num_rows
    if n == 0:
        return pa.array([], pa.string())
    parts: list[Any] = ["["]
    for name in HASHED_FIELDS:
        col = _one_chunk(table.column(name))
        if name == "labels":  # rows with labels (rare: imported datasets) are hashed one by one below
            labelled = pc.not_equal(pc.list_value_length(col).fill_null(-1), 0)
            parts.append("[]")
        elif pa.types.is_list(col.type):
            parts += _json_items(col)
        elif col.null_count:
            parts.append(json_strings(col))
        else:
            parts += ['"', escaped_strings(col), '"']
        parts.append(",")
    parts[-1] = "]"
    payload = pc.binary_join_element_wise(*parts, "")
    hashes = pa.array(_blake2b_hex(payload), pa.string())
    if pc.any(labelled).as_py():
        rows = table.filter(labelled).select(list(HASHED_FIELDS)).to_pylist()
        hashes = pc.replace_with_mask(hashes, labelled, pa.array([content_hash(r) for r in rows], pa.string()))
    return hashes


_blake2b_128 = functools.partial(hashlib.blake2b, digest_size=16)
_hexdigest = operator.methodcaller("hexdigest")


def _blake2b_hex(payload: pa.StringArray) -> list[str]:
    return list(map(_hexdigest, map(_blake2b_128, payload.cast(pa.binary()).to_pylist())))  # C-level loops


def _one_chunk(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    return values


def to_canonical_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Canonical dict rows -> Arrow table with the ``CANONICAL`` schema."""
    return pa.Table.from_pylist([{f: r.get(f) for f in CANONICAL_FIELDS} for r in rows], schema=CANONICAL)
