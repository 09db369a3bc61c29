"""Batch ingestion logic: raw records -> validated canonical rows -> products / media / quarantine tables.

The Prefect flow (``flows/ingest.py``) only orchestrates these functions. Per batch:

1. ``prepare_batches`` / ``prepare_batch`` (worker processes, Arrow out): parse, map, validate and hash; parse errors
   and invalid rows -> quarantine rows; valid rows get their ``content_hash``.
2. ``finish_batch`` (flow process, in input order): ids an earlier batch already had -> quarantine (first occurrence
   wins); the rest -> new / changed / unchanged against the products table as it was when the run started.
3. ``ingest_media``: images/videos of new and changed products only, each decoded once.
4. ``write_batch``: media and quarantine first, then products, each an atomic Delta commit. Products last means a
   run killed between commits re-processes that batch on rerun (every write is a keyed merge, so nothing doubles),
   and a product is never marked ingested before its media are.

``validate_batch`` + ``classify`` do steps 1-2 one record at a time. The flow does not use them: they are the
reference the vectorized path is tested against (``tests/test_warehouse.py``).
"""

from __future__ import annotations

import gc
import itertools
import os
import pickle
import queue
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from warehouse import schema
from warehouse.quarantine import Reason, quarantine_row
from warehouse.sources import Lines, Record, _loads, parse_line
from warehouse.tables import Warehouse
from warehouse.validate import Invalid, Limits, canonical_batch, to_canonical


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


class _SortedIds:
    """``product_id -> value`` as a few polars runs sorted by id (LSM-style: a new run merges into the last while that
    is at most twice its size), so a lookup is a binary search per run, O(B log N), not a hash join over all N."""

    def __init__(self) -> None:
        self.runs: list[pl.DataFrame] = []  # columns product_id, value; each sorted by product_id

    def add(self, ids: pl.Series, values: pl.Series) -> None:
        if not len(ids):
            return
        run = pl.DataFrame({"product_id": ids, "value": values}).sort("product_id")
        while self.runs and self.runs[-1].height <= 2 * run.height:
            run = pl.concat([self.runs.pop(), run]).sort("product_id")
        self.runs.append(run)

    def lookup(self, ids: pl.Series) -> pl.Series:
        """The value per id, null where absent, aligned with ``ids``."""
        out = pl.repeat(None, len(ids), dtype=pl.Utf8, eager=True)
        for run in self.runs:
            keys = run.get_column("product_id")
            idx = keys.search_sorted(ids, side="left").clip(0, run.height - 1)
            hit = (keys.gather(idx) == ids).fill_null(False)
            out = run.get_column("value").gather(idx).zip_with(hit, out)
        return out

    @property
    def size(self) -> int:
        return sum(r.height for r in self.runs)


class RunState:
    """Per-run state: content hashes of the products table at run start, and ids seen so far in this input.

    Both are sorted Arrow/polars columns (~50 bytes per product), not Python dicts, so memory stays modest at
    millions of products and does not depend on the input's size in bytes.
    """

    def __init__(self, existing: pl.DataFrame):
        self.existing = existing  # product_id, content_hash
        self._existing = _SortedIds()
        self._existing.add(existing.get_column("product_id"), existing.get_column("content_hash"))
        self._seen = _SortedIds()  # product_id -> position of its first (kept) occurrence

    @classmethod
    def load(cls, wh: Warehouse) -> RunState:
        table = wh.read("products", columns=["product_id", "content_hash"])
        if not table.num_rows:
            return cls(pl.DataFrame(schema={"product_id": pl.Utf8, "content_hash": pl.Utf8}))
        return cls(pl.from_arrow(table))

    def first_positions(self, ids: pa.Array | pa.ChunkedArray) -> pl.Series:
        """Per id, the position where an earlier batch of this input had it (null: not seen before)."""
        return self._seen.lookup(_series(ids))

    def known_hashes(self, ids: pa.Array | pa.ChunkedArray) -> pl.Series:
        """Per id, its content hash in the products table at run start (null: a new product)."""
        return self._existing.lookup(_series(ids))

    def mark_seen(self, ids: list[str] | pa.Array | pa.ChunkedArray, positions: list[str] | pa.Array) -> None:
        self._seen.add(_series(ids), _series(positions))

    def seen(self, ids: list[str]) -> dict[str, str]:
        """Which of ``ids`` an earlier batch of this input already had -> that first position."""
        return _hits(ids, self.first_positions(ids))

    def hashes(self, ids: list[str]) -> dict[str, str]:
        return _hits(ids, self.known_hashes(ids))


def _series(values: list[str] | pa.Array | pa.ChunkedArray) -> pl.Series:
    if isinstance(values, pl.Series):
        return values
    if isinstance(values, list):
        return pl.Series(values=values, dtype=pl.Utf8)
    return pl.Series(values=values).cast(pl.Utf8)


def _hits(ids: list[str] | pa.Array, found: pl.Series) -> dict[str, str]:
    ids = _series(ids)
    mask = found.is_not_null()
    return dict(zip(ids.filter(mask).to_list(), found.filter(mask).to_list(), strict=True))


_DUPLICATE = (
    "{position}: product_id {pid!r} already appeared at {first} in this input; the first occurrence is kept — merge "
    "the two rows upstream if this one should win"
)


def reject_row(
    rec: Record, reason: Reason, message: str, *, source: str, run_id: str, now: datetime, product_id: str | None = None
) -> dict[str, Any]:
    """The quarantine row for a rejected record (its raw text when it has one, else the parsed value)."""
    payload = rec.raw if rec.raw is not None else rec.value
    return quarantine_row(
        source=source, position=rec.position, payload=payload, reason=reason, message=message, run_id=run_id,
        product_id=product_id, at=now,
    )  # fmt: skip


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
    quarantine: list[dict[str, Any]] = []
    batch_first: dict[str, str] = {}

    def reject(rec: Record, reason: Reason, message: str, product_id: str | None = None) -> None:
        quarantine.append(
            reject_row(rec, reason, message, source=source, run_id=run_id, now=now, product_id=product_id)
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
        row["content_hash"] = schema.content_hash(row)
        row["_record"] = rec
        rows.append(row)

    # A duplicate names the occurrence that is kept: in an earlier batch, else the first in this one.
    earlier = state.seen([r["product_id"] for r in rows])
    kept = []
    for row in rows:
        pid, rec = row["product_id"], row["_record"]
        first = earlier.get(pid) or batch_first.get(pid)
        if first is None:
            batch_first[pid] = rec.position
            kept.append(row)
        else:
            reject(rec, Reason.DUPLICATE_IN_INPUT, _DUPLICATE.format(position=rec.position, pid=pid, first=first), pid)
    rows = kept
    state.mark_seen([r["product_id"] for r in rows], [r["_record"].position for r in rows])
    for row in rows:
        del row["_record"]
    return rows, quarantine


# ---------------------------------------------------------------------------------------------------------------
# The fast path: Arrow batches end to end (``prepare_batch`` in worker processes, ``finish_batch`` in the flow)
# ---------------------------------------------------------------------------------------------------------------

_PREPARED = pa.schema(
    [
        *schema.CANONICAL,
        pa.field("content_hash", pa.string()),
        pa.field("_position", pa.string()),
        pa.field("_i", pa.int64()),
    ]
)


@dataclass
class Prepared:
    """One batch parsed, validated and hashed; what ``finish_batch`` takes (duplicate ids are still in).

    ``rows`` are the ``CANONICAL`` columns plus ``content_hash``, ``_position`` and ``_i`` (the record's index in the
    batch), not necessarily in input order. Arrow, so a worker process returns it cheaply.
    """

    rows: pa.Table
    quarantine: list[dict[str, Any]]
    read: int


@dataclass
class Classified:
    """One batch ready to write: new and changed rows (Arrow), how many were unchanged, and the quarantine rows."""

    new: pa.Table
    changed: pa.Table
    unchanged: int
    quarantine: list[dict[str, Any]]
    read: int

    def result(self) -> BatchResult:
        out = BatchResult(
            read=self.read, new=self.new.num_rows, changed=self.changed.num_rows, unchanged=self.unchanged
        )
        out.quarantined.update(q["reason"] for q in self.quarantine)
        return out


# Records parsed and mapped at a time inside a batch: caps a worker's Python objects (~2 KB a row) whatever the
# batch size, at no cost in speed (the vectorized steps are as fast on 10k rows as on 50k).
PREPARE_CHUNK = 10_000


def prepare_batch(
    batch: Lines | Sequence[Record],
    *,
    source: str,
    mapping: Mapping[str, str],
    run_id: str,
    limits: Limits = Limits(),
    now: datetime | None = None,
) -> Prepared:
    """``validate_batch`` without the run state, vectorized: raw lines or records -> ``Prepared``.

    Parses (``Lines``), maps what it can with ``canonical_batch`` and the rest one by one with ``to_canonical``, hashes
    (``schema.content_hashes``) and quarantines rejects: rows, reasons, messages and hashes are exactly
    ``validate_batch``'s. Duplicate ids are left to ``finish_batch``. Pure, so it runs in worker processes.
    """
    now = now or datetime.now(UTC)
    if isinstance(batch, Lines):
        items: Sequence[Any] = batch.split()
        first_line: int | None = batch.first_line
    else:
        items, first_line = batch, None
    kw = dict(first_line=first_line, source=source, mapping=mapping, run_id=run_id, limits=limits, now=now)
    parts = [
        _prepare_part(items, start, min(start + PREPARE_CHUNK, len(items)), **kw)
        for start in range(0, len(items), PREPARE_CHUNK)
    ]
    if not parts:
        return Prepared(_PREPARED.empty_table(), [], 0)
    rows = pa.concat_tables([p.rows for p in parts]) if len(parts) > 1 else parts[0].rows
    return Prepared(rows, [q for p in parts for q in p.quarantine], sum(p.read for p in parts))


def _prepare_part(
    items: Sequence[Any],
    start: int,
    stop: int,
    *,
    first_line: int | None,
    source: str,
    mapping: Mapping[str, str],
    run_id: str,
    limits: Limits,
    now: datetime,
) -> Prepared:
    """``prepare_batch`` of ``items[start:stop]``: raw lines (``first_line`` is the first's number) or records."""
    quarantine: list[dict[str, Any]] = []
    values: list[Any] = []
    index: list[int] = []  # values[k] is items[index[k]]
    read = 0

    def reject(rec: Record, reason: Reason, message: str, product_id: str | None = None) -> None:
        quarantine.append(
            reject_row(rec, reason, message, source=source, run_id=run_id, now=now, product_id=product_id)
        )

    def record(i: int, value: Any) -> Record:
        return items[i] if first_line is None else Record(f"line:{first_line + i}", value, items[i])

    with _gc_paused():
        if first_line is not None and (parsed := _parse_clean(items, start, stop)) is not None:
            values, index, read = parsed, list(range(start, stop)), stop - start
        elif first_line is not None:
            for i in range(start, stop):
                line = items[i]
                if line[-1:] == b"\r":
                    line = items[i] = line.rstrip(b"\r\n")
                if line[:1] != b"{" and not line.strip():
                    continue  # blank
                read += 1
                try:
                    value = _loads(line)
                except ValueError:
                    value = None
                if type(value) is not dict:
                    rec = parse_line(f"line:{first_line + i}", line)
                    if rec.error is not None:  # else a dict subclass after all: validate it
                        reject(rec, *rec.error)
                        continue
                    value = rec.value
                values.append(value)
                index.append(i)
        else:
            for i in range(start, stop):
                rec = items[i]
                read += 1
                if rec.error is not None:
                    reject(rec, *rec.error)
                    continue
                values.append(rec.value)
                index.append(i)

        fast, slow = canonical_batch(values, mapping, source=source, limits=limits)
        fast = fast.append_column("content_hash", schema.content_hashes(fast))
        fast = fast.select([*schema.CANONICAL.names, "content_hash", "_i"])  # _i: an index into values, for now
        slow_rows: list[dict[str, Any]] = []
        for k in slow:
            rec = record(index[k], values[k])
            try:
                row = to_canonical(values[k], mapping, position=rec.position, source=source, limits=limits)
            except Invalid as e:
                pid = values[k].get("product_id") if isinstance(values[k], dict) else None
                reject(rec, e.reason, e.message, pid if isinstance(pid, str) else None)
                continue
            row["content_hash"] = schema.content_hash(row)
            row["_i"] = k
            slow_rows.append(row)
        if slow_rows:
            fast = pa.concat_tables([fast, pa.Table.from_pylist(slow_rows, schema=fast.schema)])
        item = pa.array(np.asarray(index, dtype=np.int64)).take(fast.column("_i"))  # -> index into items
        if first_line is None:
            position = pa.array([r.position for r in items[start:stop]], pa.string()).take(pc.subtract(item, start))
        else:
            position = pc.binary_join_element_wise("line:", pc.cast(pc.add(item, first_line), pa.string()), "")
        rows = fast.set_column(fast.num_columns - 1, "_position", position).append_column("_i", item)
    quarantine.sort(key=lambda q: _position_order(q["position"]))
    return Prepared(rows.cast(_PREPARED), quarantine, read)


def _parse_clean(lines: Sequence[bytes], start: int, stop: int) -> list[dict] | None:
    """The lines parsed in one C-level pass, when every one is a JSON object (the usual case); else None, and the
    caller goes line by line (blank lines, CR, parse errors)."""
    try:
        values = list(map(_loads, lines[start:stop]))
    except ValueError:
        return None
    return values if set(map(type, values)) <= {dict} else None


def _position_order(position: str) -> int:
    return int(position.rsplit(":", 1)[1]) if position[-1:].isdigit() else 0


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Millions of short-lived dicts would trigger full collections that find nothing; pause the collector."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def finish_batch(
    prepared: Prepared,
    state: RunState,
    *,
    batch: Lines | Sequence[Record],
    source: str,
    run_id: str,
    now: datetime | None = None,
) -> Classified:
    """Ids an earlier batch of this input had -> quarantine (first wins); the rest -> new / changed / unchanged.

    Runs in input order in one process (it reads and updates ``state``); ``batch`` is the one ``prepared`` came from,
    for the payload of a duplicate.
    """
    now = now or datetime.now(UTC)
    rows = prepared.rows
    quarantine = list(prepared.quarantine)
    ids = pl.Series(values=rows.column("product_id"))
    earlier = state.first_positions(ids)
    dup = earlier.is_not_null()
    repeats = ids.n_unique() < len(ids)
    if repeats:  # rows are not in input order (see canonical_batch): the first is the lowest item index
        frame = pl.DataFrame(
            {
                "product_id": ids,
                "i": pl.Series(values=rows.column("_i")),
                "position": pl.Series(values=rows.column("_position")),
            }
        )
        firsts = frame.select(
            pl.col("i").min().over("product_id").alias("i"),
            pl.col("position").sort_by("i").first().over("product_id").alias("position"),
        )
        dup = dup | (frame.get_column("i") != firsts.get_column("i"))
    if dup.any():
        # the kept occurrence: in an earlier batch, else the first in this one
        kept = earlier.fill_null(firsts.get_column("position")) if repeats else earlier
        mask = pa.array(dup.to_numpy())
        hits = rows.filter(mask).select(["product_id", "_position", "_i"]).to_pylist()
        lines = batch.split() if isinstance(batch, Lines) else None
        for hit, first in zip(hits, kept.filter(dup).to_list(), strict=True):
            i = hit["_i"]
            payload = lines[i].rstrip(b"\r") if lines is not None else _record_payload(batch[i])
            quarantine.append(
                quarantine_row(
                    source=source,
                    position=hit["_position"],
                    payload=payload,
                    reason=Reason.DUPLICATE_IN_INPUT,
                    message=_DUPLICATE.format(position=hit["_position"], pid=hit["product_id"], first=first),
                    run_id=run_id,
                    product_id=hit["product_id"],
                    at=now,
                )
            )
        rows = rows.filter(pc.invert(mask))
    state.mark_seen(rows.column("product_id"), rows.column("_position"))
    rows = rows.drop_columns(["_position", "_i"])
    known = state.known_hashes(rows.column("product_id"))
    is_new = known.is_null()
    is_unchanged = (known == pl.Series(values=rows.column("content_hash"))).fill_null(False)
    is_changed = ~is_new & ~is_unchanged
    return Classified(
        new=_take(rows, is_new),
        changed=_take(rows, is_changed),
        unchanged=int(is_unchanged.sum()),
        quarantine=quarantine,
        read=prepared.read,
    )


def _take(rows: pa.Table, mask: pl.Series) -> pa.Table:
    """``rows`` where ``mask``, without copying when it is all or nothing (a first load, an unchanged rerun)."""
    hits = int(mask.sum())
    if hits == len(mask):
        return rows
    return rows.slice(0, 0) if hits == 0 else rows.filter(pa.array(mask.to_numpy()))


def _record_payload(rec: Record) -> Any:
    return rec.raw if rec.raw is not None else rec.value


def prepare_batches(
    batches: Iterable[Lines | Sequence[Record]],
    *,
    source: str,
    mapping: Mapping[str, str],
    run_id: str,
    limits: Limits = Limits(),
    workers: int = 2,
) -> Iterator[tuple[Lines | Sequence[Record], Prepared]]:
    """``(batch, prepare_batch(batch))`` in input order, computed by ``workers`` processes ahead of the caller.

    At most one batch per worker is in flight, so memory is bounded by the batch size, not the input. The first
    batch is prepared inline and the workers start only when there is a second (a small file pays no process
    start). ``workers=0``: everything inline.
    """
    kw = dict(source=source, mapping=dict(mapping), run_id=run_id, limits=limits)
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return
    yield first, prepare_batch(first, **kw)
    if workers <= 0:
        for batch in it:
            yield batch, prepare_batch(batch, **kw)
        return
    second = next(it, None)
    if second is None:
        return
    pool = [_Worker() for _ in range(workers)]
    try:
        pending: deque[tuple[Any, _Worker]] = deque()
        batches_left = itertools.chain([second], it)
        for worker in pool * 2:  # two per worker: one running, one queued, so no worker waits on the caller
            batch = next(batches_left, None)
            if batch is None:
                break
            worker.submit(batch, kw)
            pending.append((batch, worker))
        while pending:
            batch, worker = pending.popleft()
            prepared = worker.result()
            nxt = next(batches_left, None)
            if nxt is not None:
                worker.submit(nxt, kw)
                pending.append((nxt, worker))
            yield batch, prepared
    finally:
        for worker in pool:
            worker.close()


class _Worker:
    """A ``python -c`` child running ``prepare_batch`` on pickled batches, fed by a thread of the caller.

    A plain subprocess rather than ``multiprocessing``: spawn re-imports the caller's ``__main__`` (a CLI, a Prefect
    worker), and fork is unsafe beside Prefect's and polars' threads. The thread keeps the child busy while the
    caller writes, and sends and receives in turn, so a full pipe never blocks both sides.
    """

    def __init__(self) -> None:
        import subprocess
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from warehouse.ingest import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name="ingest-worker-io", daemon=True)
        self.thread.start()

    def submit(self, batch: Any, kw: dict[str, Any]) -> None:
        self.todo.put((batch, kw))

    def result(self) -> Prepared:
        ok, value = self.done.get()
        if not ok:
            raise value
        return value

    def _serve(self) -> None:
        while (job := self.todo.get()) is not None:
            try:
                pickle.dump(job, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.proc.stdin.flush()
                self.done.put(pickle.load(self.proc.stdout))
            except (EOFError, OSError):
                code = self.proc.poll()
                self.done.put(
                    (False, RuntimeError(f"an ingest worker process died (exit code {code}); see its stderr"))
                )
                return

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join(timeout=60)
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def _worker_main() -> None:
    """The worker loop: (batch, kwargs) pickles in on stdin, (ok, Prepared | exception) pickles out, until EOF."""
    import sys

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print() must not corrupt the result stream
    stdin = sys.stdin.buffer
    while True:
        try:
            batch, kw = pickle.load(stdin)
        except EOFError:
            return
        try:
            result: tuple[bool, Any] = (True, prepare_batch(batch, **kw))
        except Exception as e:  # sent back and raised in the caller
            result = (False, e)
        pickle.dump(result, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


def classify(rows: list[dict[str, Any]], state: RunState) -> tuple[list[dict], list[dict], list[dict]]:
    """Split valid rows into (new, changed, unchanged) against the products table at run start."""
    known = state.hashes([r["product_id"] for r in rows])
    new, changed, unchanged = [], [], []
    for r in rows:
        h = known.get(r["product_id"])
        (new if h is None else unchanged if h == r["content_hash"] else changed).append(r)
    return new, changed, unchanged


def ingest_media(
    rows: list[dict[str, Any]] | pa.Table,
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

    if isinstance(rows, pa.Table):  # only the rows with media become dicts
        has_media = pc.or_(
            pc.greater(pc.list_value_length(rows.column("images")).fill_null(0), 0),
            pc.greater(pc.list_value_length(rows.column("videos")).fill_null(0), 0),
        )
        rows = rows.filter(has_media).select(["product_id", "images", "videos"]).to_pylist()
    todo = [r for r in rows if r["images"] or r["videos"]]
    if not todo:
        return [], []
    cfg = cfg or MediaConfig()
    fs_opts = fsspec_options(wh.storage_options) if wh.root.startswith("s3://") else None
    store = BlobStore(wh.uri("media_blobs"), fs_opts)

    def one(r: dict[str, Any]) -> tuple[list[dict], list[dict]]:
        return process_product_media(
            r["product_id"],
            r["images"],
            r["videos"],
            cfg=cfg,
            store=store,
            run_id=run_id,
            source=source,
            storage_options=fs_opts,
            base_dir=base_dir,
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


def products_table(rows: list[dict[str, Any]] | pa.Table, run_id: str, now: datetime) -> pa.Table:
    """Canonical rows with ``content_hash`` (dicts or Arrow) -> the ``PRODUCTS`` table, stamped with this write."""
    if isinstance(rows, pa.Table):
        n = rows.num_rows
        stamped = rows.select(list(schema.CANONICAL.names) + ["content_hash"])
        stamped = stamped.append_column("first_seen", pa.repeat(pa.scalar(now, schema.TS), n))
        stamped = stamped.append_column("last_seen", pa.repeat(pa.scalar(now, schema.TS), n))
        stamped = stamped.append_column("ingest_run_id", pa.repeat(pa.scalar(run_id, pa.string()), n))
        return stamped.cast(schema.PRODUCTS)
    for r in rows:
        r["first_seen"] = now
        r["last_seen"] = now
        r["ingest_run_id"] = run_id
    return pa.Table.from_pylist(rows, schema=schema.PRODUCTS)


def _size(rows: list | pa.Table) -> int:
    return rows.num_rows if isinstance(rows, pa.Table) else len(rows)


def write_batch(
    wh: Warehouse,
    *,
    new: list[dict[str, Any]] | pa.Table,
    changed: list[dict[str, Any]] | pa.Table,
    media: list[dict[str, Any]],
    quarantine: list[dict[str, Any]],
    run_id: str,
    now: datetime,
) -> None:
    """Media and quarantine first, products last; each is one atomic, keyed (idempotent) Delta commit."""
    if media:
        wh.merge(
            "media",
            pa.Table.from_pylist(media, schema=schema.MEDIA),
            update_when="coalesce(t.sha256, '') != coalesce(s.sha256, '') OR t.status != s.status",
        )
    if quarantine:
        wh.merge("quarantine", pa.Table.from_pylist(quarantine, schema=schema.QUARANTINE), update_columns=())
    if _size(changed):
        cols = [c for c in schema.PRODUCTS.names if c not in ("product_id", "first_seen")]
        wh.merge(
            "products",
            products_table(changed, run_id, now),
            update_columns=cols,
            update_when="t.content_hash != s.content_hash",
        )
    if _size(new):
        # New at run start and first in this input: a plain append is safe (one writer per table per run) and
        # far cheaper than a merge. A rerun after a crash sees them as existing, so they are never appended twice.
        wh.append("products", products_table(new, run_id, now))
