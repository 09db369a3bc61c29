"""Delta Lake tables on Parquet (delta-rs): create, merge idempotently, read any version, query with DuckDB.

Every write is one Delta commit, so it is atomic: a writer killed mid-write leaves the previous version readable.
Merges are keyed (``schema.*_KEY``), so replaying the same input leaves identical table contents.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from deltalake import ColumnProperties, DeltaTable, WriterProperties, write_deltalake

from warehouse import schema
from warehouse.config import WarehouseSettings

KEYS: dict[str, tuple[str, ...]] = {
    "products": ("product_id",),
    "media": schema.MEDIA_KEY,
    "quarantine": schema.QUARANTINE_KEY,
    "pairs": schema.PAIRS_KEY,
    "attribute_predictions": schema.PREDICTION_KEY,
    "review_queue": schema.PREDICTION_KEY,
    "predicted_products": ("product_id",),
    "embeddings": ("product_id",),
    "knn_graph": ("product_id",),
    "duplicates": ("a", "b"),
    "pair_scores": ("a", "b"),
    "clusters": ("product_id",),
    "runs": ("run_id",),
}


def _is_uri(root: str) -> bool:
    return "://" in root


class Warehouse:
    """The warehouse root: a local folder or an object-store URI (``s3://bucket/prefix``).

    Args:
        root: where the tables live; default ``ENRICH_WAREHOUSE_ROOT`` or ``data/warehouse``.
        storage_options: delta-rs object-store options (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...).
    """

    def __init__(self, root: str | os.PathLike | None = None, storage_options: dict[str, str] | None = None):
        settings = WarehouseSettings()
        root = str(root if root is not None else settings.warehouse_root)
        self.root = root if _is_uri(root) else os.path.abspath(root)
        self.storage_options = dict(storage_options if storage_options is not None else settings.storage_options)
        if self.root.startswith("s3://"):
            # One writer per table at a time is guaranteed by the flows' concurrency limit, not by S3.
            self.storage_options.setdefault("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
        if not _is_uri(self.root):
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"Warehouse({self.root!r})"

    def uri(self, table: str) -> str:
        return f"{self.root.rstrip('/')}/{table}"

    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(table), storage_options=self.storage_options)

    def table(self, table: str, version: int | None = None) -> DeltaTable:
        if not self.exists(table):
            raise FileNotFoundError(f"table {table!r} does not exist under {self.root}; run `enrich ingest` first")
        return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options)

    def ensure(self, table: str, table_schema: pa.Schema | None = None) -> None:
        """Create ``table`` empty (version 0) if it does not exist yet."""
        if self.exists(table):
            return
        table_schema = table_schema or schema.TABLES[table]
        DeltaTable.create(
            self.uri(table), schema=table_schema, mode="ignore", storage_options=self.storage_options, name=table
        )

    def version(self, table: str) -> int:
        return self.table(table).version() if self.exists(table) else -1

    def read(self, table: str, version: int | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """The table (optionally at an older ``version``: time travel) as Arrow; empty if it does not exist."""
        if not self.exists(table):
            return schema.TABLES[table].empty_table() if table in schema.TABLES else pa.table({})
        dataset = self.table(table, version).to_pyarrow_dataset()
        return dataset.to_table(columns=list(columns) if columns else None)

    def history(self, table: str) -> list[dict[str, Any]]:
        return self.table(table).history()

    # -- writes -------------------------------------------------------------------------------------------------

    def append(self, table: str, data: pa.Table) -> None:
        """Append rows whose keys are known to be absent (one atomic commit)."""
        if data.num_rows == 0:
            return
        self.ensure(table)
        write_deltalake(
            self.uri(table),
            data.select(schema.TABLES[table].names).cast(schema.TABLES[table]),
            mode="append",
            storage_options=self.storage_options,
        )

    def merge(
        self,
        table: str,
        data: pa.Table,
        *,
        update_columns: Sequence[str] | None = None,
        update_when: str | None = None,
    ) -> dict[str, Any]:
        """Upsert ``data`` on the table's key: insert new keys; update matched rows only where ``update_when``
        (a SQL predicate over ``t`` target and ``s`` source) holds, and only ``update_columns`` (all but the key when
        None). ``update_columns=()`` makes the merge insert-only. One atomic commit; a no-op writes nothing.
        """
        if data.num_rows == 0:
            return {"num_target_rows_inserted": 0, "num_target_rows_updated": 0}
        self.ensure(table)
        target_schema = schema.TABLES[table]
        data = data.select(target_schema.names).cast(target_schema)
        key = KEYS[table]
        predicate = " AND ".join(f"t.{k} = s.{k}" for k in key)
        merger = self.table(table).merge(data, predicate=predicate, source_alias="s", target_alias="t")
        cols = [c for c in target_schema.names if c not in key] if update_columns is None else list(update_columns)
        if cols:
            merger = merger.when_matched_update(updates={c: f"s.{c}" for c in cols}, predicate=update_when)
        return merger.when_not_matched_insert_all().execute()

    def replace_where(self, table: str, data: pa.Table, column: str, values: Sequence[str]) -> None:
        """Atomically replace every row whose ``column`` is in ``values`` by ``data`` (one commit: Delta's
        replaceWhere). Used where a product's rows are recomputed as a whole, e.g. its attribute predictions."""
        if not values:
            return
        self.ensure(table)
        target_schema = schema.TABLES[table]
        _with_stack_for(
            len(values),
            write_deltalake,
            self.uri(table),
            data.select(target_schema.names).cast(target_schema),
            mode="overwrite",
            predicate=_in_list(column, values),
            storage_options=self.storage_options,
        )

    def delete_where(self, table: str, column: str, values: Sequence[str], also: str | None = None) -> int:
        """Delete every row whose ``column`` is in ``values`` (and, if given, that satisfies the SQL predicate
        ``also``, e.g. ``f"predicted_at < {ts_literal(t)}"``); returns how many rows went. One commit per
        ``DELETE_CHUNK`` values (each rewrites the files holding a deleted row); nothing to do writes nothing.

        A predicate, not a merge against a table of keys: delta-rs's merge held 9.9 GB to match 50k products
        against the 1M bench's 26M-row ``review_queue`` (10 files), this delete 0.9 GB (scratch, 2026-11-24)."""
        if not values or not self.exists(table):
            return 0
        deleted = 0
        for start in range(0, len(values), DELETE_CHUNK):
            chunk = values[start : start + DELETE_CHUNK]
            predicate = _in_list(column, chunk) + (f" AND ({also})" if also else "")
            metrics = _with_stack_for(len(chunk), self.table(table).delete, predicate)
            deleted += int((metrics or {}).get("num_deleted_rows", 0))
        return deleted

    def present(self, table: str, column: str, values: Sequence[str]) -> set[str]:
        """Which of ``values`` occur in ``column`` of ``table`` (one streaming scan of that column alone)."""
        if not values or not self.exists(table):
            return set()
        import pyarrow.compute as pc

        wanted = pa.array(list(values), pa.string())
        found: set[str] = set()
        for batch in self.table(table).to_pyarrow_dataset().to_batches(columns=[column]):
            col = batch.column(0)
            found.update(col.filter(pc.is_in(col, value_set=wanted.cast(col.type))).to_pylist())
        return found

    def overwrite(self, table: str, data: pa.Table) -> None:
        """Replace the whole table in one commit (for derived tables recomputed as a whole: duplicates, clusters)."""
        target_schema = schema.TABLES[table]
        self.ensure(table)
        write_deltalake(
            self.uri(table), data.select(target_schema.names).cast(target_schema), mode="overwrite",
            schema_mode="overwrite", storage_options=self.storage_options,
        )  # fmt: skip

    def maintain(
        self, tables: Sequence[str] | None = None, *, retention_hours: int = 168, compact: bool = True
    ) -> dict[str, dict[str, int]]:
        """Compact each table's small files, then delete the files no version younger than ``retention_hours``
        references (Delta's vacuum; 168 h is Delta's own default). Every merge or replaceWhere leaves the files it
        replaced behind, so without this a warehouse that reruns nightly grows without bound (at 1M products,
        ``review_queue`` held 3.8 GB on disk for ~1.2 GB of live rows after five reruns). The current data is
        untouched; time travel to versions older than the retention stops working."""
        if retention_hours < 0:
            raise ValueError(f"retention_hours must be >= 0 (got {retention_hours}); Delta's default is 168 (7 days)")
        unknown = sorted(set(tables or ()) - set(schema.TABLES))
        if unknown:
            raise ValueError(f"unknown tables {unknown}; the warehouse's tables are {sorted(schema.TABLES)}")
        out: dict[str, dict[str, int]] = {}
        for name in tables or sorted(schema.TABLES):
            if not self.exists(name):
                continue
            stats = {"files_compacted": 0, "files_written": 0}
            if compact:
                m = self.table(name).optimize.compact(writer_properties=_writer_properties(name))
                stats = {
                    "files_compacted": int(m.get("numFilesRemoved", 0)),
                    "files_written": int(m.get("numFilesAdded", 0)),
                }
            deleted = self.table(name).vacuum(
                retention_hours=int(retention_hours), dry_run=False, enforce_retention_duration=False
            )
            out[name] = {**stats, "files_deleted": len(deleted)}
        return out

    # -- query --------------------------------------------------------------------------------------------------

    def sql(self, query: str) -> pa.Table:
        """Run DuckDB SQL over every table under the root (each registered under its name) -> Arrow."""
        import duckdb

        con = duckdb.connect()
        for name in self.list_tables():
            dt = self.table(name)
            # DuckDB pushes string filters down as string_view literals, which pyarrow cannot compare with plain
            # string columns: read top-level strings as string_view so `WHERE split = 'test'` works.
            base = dt.to_pyarrow_dataset().schema
            view = pa.schema(
                [pa.field(f.name, pa.string_view(), f.nullable) if f.type == pa.string() else f for f in base]
            )
            con.register(name, dt.to_pyarrow_dataset(schema=view))
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.CatalogException as e:
            raise LookupError(f"{e}; tables under {self.root}: {', '.join(self.list_tables()) or 'none yet'}") from None

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write a small file (a fitted model's state) under the root, atomically; returns its URI."""
        import fsspec

        from warehouse.media import atomic_write

        uri = self.uri(relpath)
        fs, path = fsspec.core.url_to_fs(uri, **_fsspec_kwargs(self))
        atomic_write(fs, path, data, local=not _is_uri(self.root))
        return uri

    def read_bytes(self, relpath: str) -> bytes | None:
        """A file written by `write_bytes`, or None when there is none."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.uri(relpath), **_fsspec_kwargs(self))
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    def delete_file(self, relpath: str) -> None:
        """Delete a file written by `write_bytes` (nothing to do when there is none)."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.uri(relpath), **_fsspec_kwargs(self))
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    def delete_files(self, folder: str, keep: Sequence[str] = ()) -> list[str]:
        """Delete the files written by `write_bytes` directly under ``folder`` except the paths in ``keep``
        (relative to the root, as `write_bytes` takes them); returns the deleted paths."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.uri(folder), **_fsspec_kwargs(self))
        fs.invalidate_cache(path)
        try:
            names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []
        kept = set(keep)
        gone = [n for n in sorted(names) if f"{folder}/{n}" not in kept]
        for name in gone:
            fs.rm_file(f"{path.rstrip('/')}/{name}")
        return [f"{folder}/{n}" for n in gone]

    def list_tables(self) -> list[str]:
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.root, **_fsspec_kwargs(self))
        fs.invalidate_cache(path)  # object-store listings are cached per filesystem instance: tables appear later
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        # tables are folders; files at the root (the nightly lock) are not
        names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")
        return [n for n in names if self.exists(n)]


# Columns with (nearly) one value per row: a Parquet dictionary only costs time there (~20% of a products append).
_UNIQUE_COLUMNS: dict[str, tuple[str, ...]] = {
    "products": ("product_id", "title", "description", "extra", "content_hash"),
}


_STACK_LOCK = threading.Lock()


def _with_stack_for(n_values: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, on a thread whose stack fits a predicate listing ``n_values`` values.

    delta-rs parses a predicate recursively on the calling thread: an ``IN`` list of 30,000 ids overflowed the
    main thread's 8 MB stack (SIGSEGV; 20,000 passed), which a nightly commit group of 50k products reached. Above
    4,096 values the call runs on a thread with ~1 KB of stack per value (virtual memory: only the pages it touches
    are used), at least 64 MB; its exception, if any, is raised here."""
    if n_values <= 4096:
        return fn(*args, **kwargs)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    with _STACK_LOCK:  # the stack size is process-wide: set for this thread alone, then put back
        previous = threading.stack_size(max(64 << 20, n_values << 10))
        try:
            thread = threading.Thread(target=run, name="delta-deep-predicate")
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


DELETE_CHUNK = 131_072  # values per delete commit: a bigger IN list only costs parse time and stack


def ts_literal(when: datetime) -> str:
    """A UTC timestamp as a delta-rs (DataFusion) SQL literal comparable with the tables' ``timestamp[us, UTC]``
    columns (a plain string literal is parsed as a timestamp without time zone, and the comparison is refused)."""
    iso = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"arrow_cast('{iso}', 'Timestamp(Microsecond, Some(\"UTC\"))')"


def _in_list(column: str, values: Sequence[str]) -> str:
    """The SQL predicate ``column IN ('v1', ...)`` with each value quoted."""
    return f"{column} IN (" + ", ".join("'" + str(v).replace("'", "''") + "'" for v in values) + ")"


def _writer_properties(table: str) -> WriterProperties:
    unique = _UNIQUE_COLUMNS.get(table, ())
    return WriterProperties(
        compression="SNAPPY", column_properties={c: ColumnProperties(dictionary_enabled=False) for c in unique} or None
    )


def _fsspec_kwargs(wh: Warehouse) -> dict[str, Any]:
    from warehouse.config import fsspec_options

    return fsspec_options(wh.storage_options) if wh.root.startswith("s3://") else {}
