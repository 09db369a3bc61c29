"""Batch ingestion logic: raw records -> validated canonical rows -> products / media / quarantine tables.

The Prefect flow (``flows/ingest.py``) only orchestrates these functions. Per batch:

1. ``validate_batch``: parse errors and invalid rows -> quarantine rows; duplicates of an id already seen in this
   input -> quarantine (first occurrence wins); valid rows get their ``content_hash``.
2. ``classify``: against the products table as it was when the run started: new, changed or unchanged.
3. ``ingest_media``: images/videos of new and changed products only, each decoded once.
4. ``write_batch``: media and quarantine first, then products, each an atomic Delta commit. Products last means a
   run killed between commits re-processes that batch on rerun (every write is a keyed merge, so nothing doubles),
   and a product is never marked ingested before its media are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl
import pyarrow as pa

from warehouse import schema
from warehouse.quarantine import Reason, quarantine_row
from warehouse.sources import Record
from warehouse.tables import Warehouse
from warehouse.validate import Invalid, Limits, to_canonical


@dataclass
class BatchResult:
    """What one batch did: counts by outcome and quarantine reason."""

    read: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    quarantined: Counter = field(default_factory=Counter)
    media_ok: int = 0
    media_bad: int = 0

    @property
    def accepted(self) -> int:
        return self.new + self.changed + self.unchanged

    def add(self, other: BatchResult) -> None:
        for name in ("read", "new", "changed", "unchanged", "media_ok", "media_bad"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.quarantined.update(other.quarantined)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "accepted": self.accepted,
            "new": self.new,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "quarantined": sum(self.quarantined.values()),
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "media_ok": self.media_ok,
            "media_bad": self.media_bad,
        }


class RunState:
    """Per-run state: content hashes of the products table at run start, and ids seen so far in this input.

    Both are Arrow/polars columns (~50 bytes per product), not Python dicts, so memory stays modest at millions
    of products and does not depend on the input's size in bytes.
    """

    def __init__(self, existing: pl.DataFrame):
        self.existing = existing  # product_id, content_hash
        self._seen: list[pl.DataFrame] = []
        self._seen_all = pl.DataFrame(schema={"product_id": pl.Utf8, "first_position": pl.Utf8})

    @classmethod
    def load(cls, wh: Warehouse) -> RunState:
        table = wh.read("products", columns=["product_id", "content_hash"])
        return cls(pl.from_arrow(table) if table.num_rows else pl.DataFrame(schema={"product_id": pl.Utf8, "content_hash": pl.Utf8}))

    def seen(self, ids: list[str]) -> dict[str, str]:
        """Which of ``ids`` an earlier batch of this input already had -> that first position."""
        if self._seen:
            self._seen_all = pl.concat([self._seen_all, *self._seen], rechunk=True)
            self._seen = []
        if self._seen_all.height == 0:
            return {}
        hit = pl.DataFrame({"product_id": ids}).join(self._seen_all, on="product_id", how="inner")
        return dict(zip(hit["product_id"].to_list(), hit["first_position"].to_list(), strict=True))

    def mark_seen(self, ids: list[str], positions: list[str]) -> None:
        if ids:
            self._seen.append(pl.DataFrame({"product_id": ids, "first_position": positions}))

    def hashes(self, ids: list[str]) -> dict[str, str]:
        if self.existing.height == 0:
            return {}
        hit = pl.DataFrame({"product_id": ids}).join(self.existing, on="product_id", how="inner")
        return dict(zip(hit["product_id"].to_list(), hit["content_hash"].to_list(), strict=True))


def validate_batch(
    records: Iterable[Record],
    state: RunState,
    *,
    source: str,
    mapping: Mapping[str, str],
    run_id: str,
    limits: Limits = Limits(),
    now: datetime | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records -> (valid canonical rows with ``content_hash``, quarantine rows). Nothing is dropped."""
    now = now or datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    positions: list[str] = []
    quarantine: list[dict[str, Any]] = []
    batch_first: dict[str, str] = {}

    def reject(rec: Record, reason: Reason, message: str, product_id: str | None = None) -> None:
        payload = rec.raw if rec.raw is not None else rec.value
        quarantine.append(
            quarantine_row(
                source=source, position=rec.position, payload=payload, reason=reason, message=message,
                run_id=run_id, product_id=product_id, at=now,
            )
        )

    for rec in records:
        if rec.error is not None:
            reject(rec, *rec.error)
            continue
        try:
            row = to_canonical(rec.value, mapping, position=rec.position, source=source, limits=limits)
        except Invalid as e:
            pid = rec.value.get("product_id") if isinstance(rec.value, dict) else None
            reject(rec, e.reason, e.message, pid if isinstance(pid, str) else None)
            continue
        pid = row["product_id"]
        if pid in batch_first:
            reject(
                rec, Reason.DUPLICATE_IN_INPUT,
                f"{rec.position}: product_id {pid!r} already appeared at {batch_first[pid]} in this input; the first "
                "occurrence is kept — merge the two rows upstream if this one should win",
                pid,
            )
            continue
        batch_first[pid] = rec.position
        row["content_hash"] = schema.content_hash(row)
        row["_record"] = rec
        rows.append(row)
        positions.append(rec.position)

    earlier = state.seen([r["product_id"] for r in rows])
    if earlier:
        kept = []
        for row in rows:
            first = earlier.get(row["product_id"])
            if first is None:
                kept.append(row)
            else:
                reject(
                    row["_record"], Reason.DUPLICATE_IN_INPUT,
                    f"{row['_record'].position}: product_id {row['product_id']!r} already appeared at {first} in this "
                    "input; the first occurrence is kept — merge the two rows upstream if this one should win",
                    row["product_id"],
                )
        rows = kept
    state.mark_seen([r["product_id"] for r in rows], [r["_record"].position for r in rows])
    for row in rows:
        del row["_record"]
    return rows, quarantine


def classify(rows: list[dict[str, Any]], state: RunState) -> tuple[list[dict], list[dict], list[dict]]:
    """Split valid rows into (new, changed, unchanged) against the products table at run start."""
    known = state.hashes([r["product_id"] for r in rows])
    new, changed, unchanged = [], [], []
    for r in rows:
        h = known.get(r["product_id"])
        (new if h is None else unchanged if h == r["content_hash"] else changed).append(r)
    return new, changed, unchanged


def ingest_media(
    rows: list[dict[str, Any]],
    *,
    wh: Warehouse,
    run_id: str,
    source: str,
    cfg: Any = None,
    base_dir: str | None = None,
    workers: int = 4,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fetch + decode every image/video of ``rows`` (threads: decoding releases the GIL) -> (media, quarantine)."""
    from warehouse.config import fsspec_options
    from warehouse.media import BlobStore, MediaConfig, process_product_media

    todo = [r for r in rows if r["images"] or r["videos"]]
    if not todo:
        return [], []
    cfg = cfg or MediaConfig()
    fs_opts = fsspec_options(wh.storage_options) if wh.root.startswith("s3://") else None
    store = BlobStore(wh.uri("media_blobs"), fs_opts)

    def one(r: dict[str, Any]) -> tuple[list[dict], list[dict]]:
        return process_product_media(
            r["product_id"], r["images"], r["videos"], cfg=cfg, store=store, run_id=run_id, source=source,
            storage_options=None, base_dir=base_dir,
        )

    media: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        for m, q in pool.map(one, todo):
            media.extend(m)
            quarantine.extend(q)
    for m in media:
        ts = m.get("frame_ts")
        m["media_id"] = f"{m['product_id']}|{m['uri']}|{'' if ts is None else f'{ts:.3f}'}"
    return media, quarantine


def products_table(rows: list[dict[str, Any]], run_id: str, now: datetime) -> pa.Table:
    for r in rows:
        r["first_seen"] = now
        r["last_seen"] = now
        r["ingest_run_id"] = run_id
    return pa.Table.from_pylist(rows, schema=schema.PRODUCTS)


def write_batch(
    wh: Warehouse,
    *,
    new: list[dict[str, Any]],
    changed: list[dict[str, Any]],
    media: list[dict[str, Any]],
    quarantine: list[dict[str, Any]],
    run_id: str,
    now: datetime,
) -> None:
    """Media and quarantine first, products last; each is one atomic, keyed (idempotent) Delta commit."""
    if media:
        wh.merge(
            "media", pa.Table.from_pylist(media, schema=schema.MEDIA),
            update_when="coalesce(t.sha256, '') != coalesce(s.sha256, '') OR t.status != s.status",
        )
    if quarantine:
        wh.merge("quarantine", pa.Table.from_pylist(quarantine, schema=schema.QUARANTINE), update_columns=())
    if changed:
        cols = [c for c in schema.PRODUCTS.names if c not in ("product_id", "first_seen")]
        wh.merge(
            "products", products_table(changed, run_id, now), update_columns=cols,
            update_when="t.content_hash != s.content_hash",
        )
    if new:
        # New at run start and first in this input: a plain append is safe (one writer per table per run) and
        # far cheaper than a merge. A rerun after a crash sees them as existing, so they are never appended twice.
        wh.append("products", products_table(new, run_id, now))
