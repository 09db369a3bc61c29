"""Prefect flows ``ingest`` (catalog files) and ``import-dataset`` (public datasets) into the Delta warehouse.

Batch-level tasks; retries only on the warehouse write (I/O). Each run writes a markdown and a table artifact:
rows read / accepted / quarantined by reason, media ok / bad, duration.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.utilities.annotations import quote

from warehouse import ingest as core
from warehouse.sources import Record, detect_format, read_batches
from warehouse.tables import Warehouse
from warehouse.validate import Limits, resolve_mapping

ProgressFn = Callable[[int], None]
# Set by the CLI to drive its progress bar (a callable cannot be a flow parameter: parameters are stored as JSON).
progress_hook: ProgressFn | None = None


@task(name="classify-batch", cache_policy=NO_CACHE, persist_result=False)
def classify_batch(
    prepared: core.Prepared, state: core.RunState, batch: Any, *, source: str, run_id: str, now: datetime
) -> core.Classified:
    # duplicates across batches (first wins) and new / changed / unchanged against the table at run start
    return core.finish_batch(prepared, state, batch=batch, source=source, run_id=run_id, now=now)


@task(name="ingest-media", cache_policy=NO_CACHE, persist_result=False)
def ingest_media(
    rows: pa.Table, *, wh: Warehouse, run_id: str, source: str, cfg: Any, base_dir: str | None
) -> tuple[list, list]:
    # per-URI retries with backoff live in warehouse.media; a task-level retry would refetch the whole batch
    return core.ingest_media(rows, wh=wh, run_id=run_id, source=source, cfg=cfg, base_dir=base_dir)


@task(name="write-batch", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE, persist_result=False)
def write_batch(
    wh: Warehouse, *, new: pa.Table, changed: pa.Table, media: list, quarantine: list, run_id: str, now: datetime
) -> None:
    core.write_batch(wh, new=new, changed=changed, media=media, quarantine=quarantine, run_id=run_id, now=now)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # called outside a flow run (plain function call)
        return uuid.uuid4().hex


def run_batches(
    batches: Iterator[list[Record]],
    *,
    wh: Warehouse,
    source: str,
    mapping: dict[str, str],
    limits: Limits = Limits(),
    media_cfg: Any = None,
    base_dir: str | None = None,
    workers: int = 2,
    merge_rows: int = 250_000,
) -> dict[str, Any]:
    """The ingest loop shared by both flows: validate -> classify -> media -> write, batch by batch (changed rows
    merged once per ``merge_rows`` of them)."""
    logger = get_run_logger()
    run_id = _run_id()
    started = time.perf_counter()
    state = core.RunState.load(wh)
    total = core.BatchResult()
    # Parsing, mapping, validation and hashing run ahead in `workers` processes (pure, Arrow out); the flow
    # process only classifies against the run state and writes. Task inputs are wrapped in `quote` so Prefect does
    # not walk tens of thousands of rows looking for futures (that walk cost 30x the work itself).
    prepared_batches = core.prepare_batches(
        batches, source=source, mapping=mapping, run_id=run_id, limits=limits, workers=workers
    )
    pending: list[pa.Table] = []
    pending_rows = 0
    for i, (batch, prepared) in enumerate(prepared_batches):
        now = datetime.now(UTC)
        done = classify_batch(quote(prepared), quote(state), quote(batch), source=source, run_id=run_id, now=now)
        quarantine = done.quarantine
        media_rows: list[dict] = []
        media_q: list[dict] = []
        if media_cfg is not None:
            changed_or_new = pa.concat_tables([done.new, done.changed]) if done.changed.num_rows else done.new
            media_rows, media_q = ingest_media(quote(changed_or_new), wh=wh, run_id=run_id, source=source,
                                               cfg=media_cfg, base_dir=base_dir)  # fmt: skip
            quarantine = quarantine + media_q
        # changed rows are merged in groups of `merge_rows`, not per batch: a merge rewrites every file holding one
        # of its ids, and a few random changed ids per batch are in nearly every file (a 1% change to 1M products
        # rewrote the table 50 times). A crash before the merge loses nothing: the rerun finds them changed again.
        pending.append(done.changed)
        pending_rows += done.changed.num_rows
        flush = pending_rows >= merge_rows
        write_batch(wh, new=quote(done.new), changed=quote(_concat(pending) if flush else done.changed.slice(0, 0)),
                    media=quote(media_rows), quarantine=quote(quarantine), run_id=run_id, now=now)  # fmt: skip
        if flush:
            pending, pending_rows = [], 0
        result = done.result()
        result.quarantined.update(q["reason"] for q in media_q)
        result.media_ok = sum(m["status"] == "ok" for m in media_rows)
        result.media_bad = sum(m["status"] != "ok" for m in media_rows)
        total.add(result)
        logger.info("batch %d: %s", i, result.as_dict())
        if progress_hook is not None:
            progress_hook(prepared.read)
    if pending_rows:
        write_batch(wh, new=quote(pending[0].slice(0, 0)), changed=quote(_concat(pending)), media=[], quarantine=[],
                    run_id=run_id, now=datetime.now(UTC))  # fmt: skip
    summary = total.as_dict()
    summary.update(
        run_id=run_id,
        source=source,
        duration_s=round(time.perf_counter() - started, 3),
        warehouse=wh.root,
        table_versions={t: wh.version(t) for t in ("products", "media", "quarantine")},
    )
    _artifacts(summary)
    logger.info("ingest of %s done: %s", source, summary)
    return summary


def _artifacts(s: dict[str, Any]) -> None:
    rows = [
        {"metric": k, "value": s[k]}
        for k in (
            "read",
            "accepted",
            "new",
            "changed",
            "unchanged",
            "quarantined",
            "media_ok",
            "media_bad",
            "duration_s",
        )
    ]
    rows += [{"metric": f"quarantined: {r}", "value": n} for r, n in s["quarantined_by_reason"].items()]
    create_table_artifact(key="ingest-summary", table=rows, description=f"Ingest of {s['source']}")
    reasons = "\n".join(f"| {r} | {n} |" for r, n in s["quarantined_by_reason"].items()) or "| (none) | 0 |"
    rate = s["read"] / s["duration_s"] if s["duration_s"] else 0.0
    create_markdown_artifact(
        key="ingest-report",
        markdown=(
            f"# Ingest of `{s['source']}`\n\n"
            f"| read | accepted | new | changed | unchanged | quarantined | media ok | media bad | duration |\n"
            f"|---|---|---|---|---|---|---|---|---|\n"
            f"| {s['read']} | {s['accepted']} | {s['new']} | {s['changed']} | {s['unchanged']} | {s['quarantined']} "
            f"| {s['media_ok']} | {s['media_bad']} | {s['duration_s']} s ({rate:,.0f} rows/s) |\n\n"
            f"## Quarantine by reason\n\n| reason | rows |\n|---|---|\n{reasons}\n\n"
            f"Warehouse `{s['warehouse']}`, table versions {s['table_versions']}. Inspect with "
            f"`enrich sql \"SELECT reason, message FROM quarantine WHERE run_id = '{s['run_id']}'\"`.\n"
        ),
        description=f"Ingest of {s['source']}",
    )


@flow(name="ingest")
def ingest(
    path: str,
    fmt: str | None = None,
    source: str | None = None,
    warehouse_root: str | None = None,
    batch_size: int = 20_000,
    mapping: dict[str, str] | None = None,
    media: bool = True,
    video_frames: int = 4,
    media_timeout_s: float = 10.0,
    media_retries: int = 2,
) -> dict[str, Any]:
    """Ingest a JSONL / CSV / Parquet catalog file (local path or URI) into the warehouse.

    Args:
        path: the catalog file; image/video paths in it resolve relative to its folder.
        fmt: ``jsonl`` | ``csv`` | ``parquet``; from the extension when None.
        source: name recorded on rows and quarantine entries; the path when None.
        mapping: source column -> canonical field, on top of the built-in aliases (sku, name, body_html...).
        media: fetch and decode images / sample ``video_frames`` frames per video (per-URI timeout and retries).
    """
    import os

    from warehouse.config import fsspec_options
    from warehouse.media import MediaConfig

    wh = Warehouse(warehouse_root)
    fmt = detect_format(path, fmt)
    base_dir = os.path.dirname(os.path.abspath(path)) if "://" not in path else path.rsplit("/", 1)[0]
    read_options = fsspec_options(wh.storage_options) if path.startswith("s3://") else None
    media_cfg = MediaConfig(video_frames=video_frames, timeout_s=media_timeout_s, retries=media_retries)
    return run_batches(
        read_batches(path, fmt, batch_size, storage_options=read_options, parse=False),
        wh=wh,
        source=source or path,
        mapping=resolve_mapping(None, mapping),
        media_cfg=media_cfg if media else None,
        base_dir=base_dir,
    )


@flow(name="import-dataset")
def import_dataset(
    dataset: str,
    path: str,
    split: str | None = None,
    warehouse_root: str | None = None,
    batch_size: int = 5_000,
    media: bool = False,
    benchmark: str | None = None,
) -> dict[str, Any]:
    """Import a public dataset (``enrich import DATASET PATH``): canonical rows with labels, and Ditto's pairs.
    ``benchmark`` (Ditto only, e.g. ``Abt-Buy``): just that benchmark's records and pairs."""
    from warehouse.importers import get_importer

    wh = Warehouse(warehouse_root)
    importer = get_importer(dataset)
    only = {}
    if benchmark is not None:
        if getattr(importer, "iter_pairs", None) is None:
            raise ValueError(f"--benchmark picks one of Ditto's benchmarks; {dataset!r} has none (drop --benchmark)")
        only = {"benchmark": benchmark}
    stats_holder: dict[str, Any] = {}

    def batches() -> Iterator[list[Record]]:
        from warehouse.importers._common import ImportStats

        stats = ImportStats()
        stats_holder["stats"] = stats
        batch: list[Record] = []
        for i, row in enumerate(importer.iter_rows(path, split=split, stats=stats, **only), start=1):
            batch.append(Record(f"row:{i}", row))
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    from warehouse.media import MediaConfig

    summary = run_batches(
        batches(),
        wh=wh,
        source=dataset,
        mapping=resolve_mapping(None, None),
        media_cfg=MediaConfig() if media else None,
    )
    if getattr(importer, "iter_pairs", None) is not None:
        import pyarrow as pa

        from warehouse import schema

        pairs = pa.Table.from_pylist(list(importer.iter_pairs(path, split=split, **only)), schema=schema.PAIRS)
        wh.merge("pairs", pairs, update_when="t.label != s.label OR t.left_id != s.left_id OR t.right_id != s.right_id")
        summary["pairs"] = pairs.num_rows
    if "stats" in stats_holder:
        summary["import_stats"] = stats_holder["stats"].as_dict()
    return summary
