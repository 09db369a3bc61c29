"""Prefect flow ``nightly``: ingest -> featurize -> predict attributes -> embed -> dedupe, for what changed.

What changed: products whose ``last_seen`` is after the watermark of the last successful nightly run (the ``runs``
Delta table keeps one row per run), checked again against each stage's own state by content hash and model version
(``predicted_products`` for attribute values, ``embeddings`` for vectors, the graph's hashes for dedupe). A new
``@champion`` therefore re-predicts everything, an unchanged catalog costs a few table scans.

Idempotent and resumable: every batch is committed with its state, each finished stage is recorded in ``runs``;
a run that was killed or failed is resumed by the next invocation (same run id, same watermark), which skips the
finished stages and batches. One nightly run at a time per warehouse: a file lock on local warehouses (released by
the kernel when a process dies) or a Prefect global concurrency limit (object-store warehouses, shared Prefect
server); the second run waits ``wait_s`` seconds, then stops with `NightlyBusy` before writing anything.

Each run is an MLflow run in experiment ``nightly-enrichment`` (counts, durations, model versions, the Delta versions
it read and wrote) and leaves a Prefect markdown artifact ``nightly-summary`` that links to it.

Scale-out: ``runner="dask"`` runs the featurize / predict / embed batches on a Dask cluster (``dask_address`` of an
existing scheduler, or a LocalCluster of ``dask_workers`` processes); the flow process stays the only writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import reports, tracking
from flows.dedupe import EmbedderRef
from flows.defaults import BATCH_ROWS, COMMIT_ROWS
from flows.enrich import ModelRef
from warehouse import schema
from warehouse.tables import Warehouse

EXPERIMENT = "nightly-enrichment"
STAGES = ("ingest", "featurize", "predict", "embed", "dedupe")
LOCK_NAME = "enrich-nightly"
API_GRACE_S = 10.0
RUNNERS = ("default", "dask")
WRITES = {
    "ingest": ("products", "media", "quarantine"),
    "featurize": ("visual_features",),
    "predict": ("attribute_predictions", "review_queue", "predicted_products"),
    "embed": ("embeddings",),
    "dedupe": ("knn_graph", "duplicates", "clusters", "pair_scores"),
}


class NightlyBusy(RuntimeError):
    """Another run (nightly, enrich or dedupe) holds the warehouse."""


# -- the run record ---------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One row of the ``runs`` table: what a nightly run covered, how far it got, and its lineage."""

    run_id: str
    started_at: datetime
    flow_run_id: str | None = None
    status: str = "running"
    finished_at: datetime | None = None
    watermark_from: datetime | None = None
    watermark_to: datetime | None = None
    stages_done: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    tables_read: dict[str, int] = field(default_factory=dict)
    tables_written: dict[str, list[int]] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    error: str | None = None

    _JSON = ("params", "stats", "models", "tables_read", "tables_written")

    def save(self, wh: Warehouse) -> None:
        row = {k: getattr(self, k) for k in schema.RUNS.names}
        row.update({k: json.dumps(getattr(self, k), default=str) for k in self._JSON})
        wh.merge("runs", pa.Table.from_pylist([row], schema=schema.RUNS))

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunRecord:
        values = dict(row)
        for k in cls._JSON:
            values[k] = json.loads(row[k]) if row.get(k) else {}
        values["stages_done"] = list(row.get("stages_done") or [])
        return cls(**values)


def last_runs(wh: Warehouse) -> tuple[RunRecord | None, RunRecord | None]:
    """(the last successful run, the latest run if it did not finish) from the ``runs`` table."""
    if not wh.exists("runs"):
        return None, None
    rows = sorted(wh.read("runs").to_pylist(), key=lambda r: r["started_at"])
    ok = [r for r in rows if r["status"] == "succeeded"]
    last_ok = RunRecord.from_row(ok[-1]) if ok else None
    unfinished = RunRecord.from_row(rows[-1]) if rows and rows[-1]["status"] != "succeeded" else None
    return last_ok, unfinished


# -- one run at a time ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def nightly_lock(wh: Warehouse, mode: str = "auto", wait_s: float = 0.0, lease_s: float = 300.0) -> Iterator[str]:
    """Hold the warehouse's nightly lock for the duration of the block; raise `NightlyBusy` after ``wait_s`` seconds.

    ``file``: an exclusive ``flock`` on ``<warehouse>/_nightly.lock`` (local warehouses; the kernel drops it when the
    holder dies, so a killed run never blocks the next one). ``prefect``: the global concurrency limit
    ``enrich-nightly`` (limit 1) on the Prefect server, for object-store warehouses shared by several machines
    (production: the compose stack's server). ``auto`` picks ``file`` for local roots and ``prefect`` otherwise.
    """
    if mode == "auto":
        mode = "prefect" if "://" in wh.root else "file"
    if mode == "none":
        yield "none"
    elif mode == "file":
        import fcntl

        path = Path(wh.root) / "_nightly.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+") as fh:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        fh.seek(0)
                        holder = fh.read().strip() or "unknown"
                        raise NightlyBusy(
                            f"another run (nightly, enrich or dedupe) holds {path} ({holder}); waited {wait_s:.0f}s. "
                            f"Let it finish, or pass --wait-s N to wait longer"
                        ) from None
                    time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')}")
            fh.flush()
            try:
                yield f"file {path}"
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif mode == "prefect":
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.concurrency.sync import concurrency

        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(LOCK_NAME)
            except Exception:  # ObjectNotFound: first run against this server
                with contextlib.suppress(Exception):  # another run created it meanwhile
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=LOCK_NAME, limit=1))
        try:
            # + a grace for the API round trips: a free slot must not look busy because the server is slow
            ctx = concurrency(LOCK_NAME, occupy=1, timeout_seconds=wait_s + API_GRACE_S, strict=True,
                              lease_duration=lease_s)  # fmt: skip
            ctx.__enter__()
        except TimeoutError:
            raise NightlyBusy(
                f"another run (nightly, enrich or dedupe) holds the Prefect concurrency limit {LOCK_NAME!r}; waited "
                f"{wait_s:.0f}s. Let it finish, or pass --wait-s N to wait longer"
            ) from None
        try:
            yield f"prefect concurrency limit {LOCK_NAME}"
        finally:
            ctx.__exit__(None, None, None)
    else:
        raise ValueError(f"unknown lock mode {mode!r}; use auto, file, prefect or none")


# -- stages -----------------------------------------------------------------------------------------------------------


def _dask_runner(runner: str, address: str | None, workers: int, stack: contextlib.ExitStack):
    """The task runner of the featurize / predict / embed subflows (None: Prefect's default thread pool)."""
    if runner == "default":
        return None
    if runner != "dask":
        raise ValueError(f"unknown runner {runner!r}; use one of {RUNNERS}")
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    from distributed import LocalCluster

    # one cluster for every stage of the run; each worker loads a model once and keeps it
    cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None))  # fmt: skip
    return DaskTaskRunner(address=cluster.scheduler_address)


# Stage subflows take only small JSON-able parameters (they show in the Prefect UI) and read what they need.


@flow(name="nightly-featurize")
def featurize_stage(
    warehouse_root: str, ref: ModelRef, since: datetime | None, batch_size: int, window: int = 1
) -> dict[str, Any]:
    """Visual features of the changed products' images into the cache that prediction reads."""
    from flows.enrich import featurize_products, products_to_predict

    wh = Warehouse(warehouse_root)
    return featurize_products(wh, ref, products_to_predict(wh, ref.version, None, True, since=since),
                              batch_size=batch_size, window=window)  # fmt: skip


@flow(name="nightly-predict")
def predict_stage(
    warehouse_root: str,
    ref: ModelRef,
    since: datetime | None,
    batch_size: int,
    window: int = 1,
    commit_rows: int = COMMIT_ROWS,
) -> dict[str, Any]:
    """Attribute values of the changed products (and of all products when the model version changed)."""
    from flows.enrich import predict_products, products_to_predict

    wh = Warehouse(warehouse_root)
    return predict_products(wh, ref, products_to_predict(wh, ref.version, None, True, since=since),
                            batch_size=batch_size, window=window, commit_rows=commit_rows)  # fmt: skip


@flow(name="nightly-embed")
def embed_stage(
    warehouse_root: str, ref: EmbedderRef, batch_size: int, window: int = 1, commit_rows: int = COMMIT_ROWS
) -> dict[str, Any]:
    """Vectors of new and changed products (the others keep theirs)."""
    from flows.dedupe import _products, embed_products

    wh = Warehouse(warehouse_root)
    products = _products(wh, None)
    _, n = embed_products(wh, ref, products, vectors=False, batch_size=batch_size, window=window,
                          commit_rows=commit_rows)  # fmt: skip
    return {"products": products.num_rows, "embedded": n}


def _versions(wh: Warehouse, tables: tuple[str, ...]) -> dict[str, int]:
    return {t: wh.version(t) for t in tables}


def _require_models(dedupe_method: str, train_if_missing: bool, source: str | None, train: dict[str, Any],
                    ingest_first: Any = None, embed_precision: str = "fp32", wh: Warehouse | None = None):  # fmt: skip
    """(jave ref, embedder ref): the @champion models, trained first when missing and ``train_if_missing`` (after
    ``ingest_first()`` has put the catalog in the warehouse: the models train on it)."""
    from flows.dedupe import resolve_embedder
    from flows.enrich import resolve_model

    logger = get_run_logger()
    try:
        jave = resolve_model("jave")
    except LookupError as e:
        if not train_if_missing:
            raise LookupError(
                f"nightly needs a `jave@champion` model: {e}. Train one (`enrich train jave --dataset <labelled "
                f"source>`), or run `enrich nightly --train-if-missing` to train a small one on this catalog"
            ) from None
        if source is None:
            raise LookupError(
                "--train-if-missing needs --source: the labelled catalog source to train JAVE on"
            ) from None
        from flows.train_jave import train_jave

        logger.info("no jave@champion: training one on %s", source)
        if ingest_first is not None:
            ingest_first()
        train_jave(dataset=source, **train.get("jave", {}))
        jave = resolve_model("jave")
    try:  # chars: fitted on the catalog (ingested first) when this warehouse has no fit yet
        emb = resolve_embedder(dedupe_method, precision=embed_precision, wh=wh, source=source, before_fit=ingest_first)
    except LookupError as e:
        if dedupe_method != "encoder":
            raise
        if not train_if_missing:
            raise LookupError(
                f"nightly --dedupe-method encoder needs a `product-encoder@champion`: {e}. Train one (`enrich train "
                f"encoder`), use --dedupe-method text, or pass --train-if-missing"
            ) from None
        from flows.train_encoder import train_encoder

        logger.info("no product-encoder@champion: training one on %s", source or "all products")
        if ingest_first is not None:
            ingest_first()
        train_encoder(source=source, **train.get("encoder", {}))
        emb = resolve_embedder(dedupe_method, precision=embed_precision)
    return jave, emb


def _changed(wh: Warehouse, since: datetime | None, until: datetime, source: str | None) -> int:
    where = [f"last_seen <= TIMESTAMPTZ '{until.isoformat()}'"]
    if since is not None:
        where.append(f"last_seen > TIMESTAMPTZ '{since.isoformat()}'")
    if source:
        where.append("source = '" + source.replace("'", "''") + "'")
    return int(wh.sql(f"SELECT count(*) AS n FROM products WHERE {' AND '.join(where)}").column("n")[0].as_py())


# -- the flow ---------------------------------------------------------------------------------------------------------


@flow(name="nightly")
def nightly(
    catalog: str | None = None,
    source: str | None = None,
    fmt: str | None = None,
    mapping: dict[str, str] | None = None,
    media: bool = True,
    warehouse_root: str | None = None,
    dedupe_method: str = "encoder",
    k: int = 10,
    threshold: float = 0.9,
    batch_size: int = BATCH_ROWS,
    commit_rows: int = COMMIT_ROWS,
    train_if_missing: bool = False,
    train: dict[str, Any] | None = None,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    embed_precision: str = "fp32",
    dedupe_matcher: str | None = None,
    min_linkage: float = 0.5,
    runner: str = "default",
    dask_address: str | None = None,
    dask_workers: int = 2,
    resume: bool = True,
    lock: str = "auto",
    wait_s: float = 0.0,
) -> dict[str, Any]:
    """Enrich what changed since the last successful nightly run.

    Args:
        catalog: a catalog file to ingest first (JSONL / CSV / Parquet, local or URI); None skips ingest and works
            on what is in the warehouse.
        source: the name its rows are recorded under (and the labelled source to train on with
            ``train_if_missing``); the path when None.
        dedupe_method: ``encoder`` (``product-encoder@champion``), ``text`` (pretrained MiniLM) or ``chars``
            (char n-gram TF-IDF sketches, fitted on the catalog at the first run; `flows.dedupe`).
        train: keyword arguments for the trainings ``train_if_missing`` runs: ``{"jave": {...}, "encoder": {...}}``.
        device, precision, backend: where JAVE runs (``cpu`` | ``cuda`` | ``auto``), how (``fp32`` | ``bf16`` |
            ``int8`` | ``auto``) and on what (``torch`` | ``onnx`` | ``auto``: ONNX Runtime for the towers on CPU).
        embed_precision: the dedupe embedder's ``fp32`` | ``int8`` (see `flows.dedupe.resolve_embedder`).
        dedupe_matcher: ``champion`` or a version of the registered ``pair-matcher`` to decide the top-k candidate
            pairs with (``enrich train matcher``); None keeps the cosine threshold.
        min_linkage: the clustering's merge rule (`features.similarity.cluster`): the share of the cross pairs of
            two clusters that must be duplicates for them to merge.
        batch_size: rows per model batch; ``commit_rows``: about how many products each Delta commit of predictions
            and embeddings holds (also committed every 30 s; a stopped run redoes at most one group). Rows are
            appended; re-predicted products' old rows are deleted once per stage (`flows.enrich.Superseded`); a
            group is held as Arrow columns (~4.5 KB a product with 21 values).
        runner: ``default`` (Prefect's thread pool) or ``dask`` (``dask_address``, or a LocalCluster).
        resume: continue the last run if it did not finish (killed or failed); False starts a new one.
        lock: ``auto`` | ``file`` | ``prefect`` | ``none`` (see `nightly_lock`); ``wait_s``: how long to wait for it.
    """
    logger = get_run_logger()
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; use one of {RUNNERS}")
    wh = Warehouse(warehouse_root)
    source = source or catalog
    params = {"catalog": catalog, "source": source, "dedupe_method": dedupe_method, "k": k, "threshold": threshold,
              "batch_size": batch_size, "commit_rows": commit_rows, "device": device, "precision": precision,
              "backend": backend, "embed_precision": embed_precision, "runner": runner,
              "dask_workers": dask_workers, "media": media, "dedupe_matcher": dedupe_matcher,
              "min_linkage": min_linkage}  # fmt: skip
    with nightly_lock(wh, lock, wait_s) as held:
        logger.info("nightly lock: %s", held)
        tracking.setup(EXPERIMENT)

        def ingest_first() -> None:  # idempotent: the ingest stage then finds these rows unchanged
            if catalog is not None:
                from flows.ingest import ingest as ingest_flow

                ingest_flow(catalog, fmt=fmt, source=source, warehouse_root=wh.root, mapping=mapping, media=media)

        jave_ref, emb_ref = _require_models(
            dedupe_method, train_if_missing, source, train or {}, ingest_first, embed_precision, wh
        )
        jave_ref = dataclasses.replace(
            jave_ref, device=device, precision=precision, backend=backend, visual_cache_root=wh.root
        )
        matcher = None
        if dedupe_matcher is not None:  # loaded before any stage runs: a missing matcher fails fast
            from flows.train_matcher import MODEL_NAME, load_matcher

            model, matcher_version, _ = load_matcher(dedupe_matcher)
            matcher = (model, f"{MODEL_NAME}/{matcher_version}")
        last_ok, unfinished = last_runs(wh)
        if unfinished is not None and resume:
            rec = unfinished
            logger.info("resuming run %s (stages done: %s)", rec.run_id, rec.stages_done or "none")
            rec.status, rec.error = "running", None
        else:
            rec = RunRecord(run_id=uuid.uuid4().hex, started_at=datetime.now(UTC), params=params,
                            watermark_from=last_ok.watermark_to if last_ok else None)  # fmt: skip
        rec.flow_run_id = _flow_run_id()
        rec.models = {"jave": jave_ref.version, emb_ref.name: emb_ref.version}
        if matcher is not None:
            rec.models["pair-matcher"] = matcher[1].rsplit("/", 1)[1]
        with contextlib.ExitStack() as stack:
            mlrun = stack.enter_context(
                mlflow.start_run(run_id=rec.mlflow_run_id)
                if rec.mlflow_run_id
                else mlflow.start_run(run_name=f"nightly {rec.started_at:%Y-%m-%d %H:%M}")  # fmt: skip
            )
            if rec.mlflow_run_id is None:
                mlflow.log_params(tracking.flat_params(params))
            rec.mlflow_run_id = mlrun.info.run_id
            mlflow.set_tags({"nightly.run_id": rec.run_id, "model.jave": jave_ref.version,
                             f"model.{emb_ref.name}": emb_ref.version, "warehouse": wh.root})  # fmt: skip
            rec.save(wh)
            try:
                _run_stages(wh, rec, catalog=catalog, fmt=fmt, mapping=mapping, media=media, source=source,
                            jave_ref=jave_ref, emb_ref=emb_ref, k=k, threshold=threshold, batch_size=batch_size,
                            commit_rows=commit_rows, last_ok=last_ok, matcher=matcher, min_linkage=min_linkage,
                            task_runner=_dask_runner(runner, dask_address, dask_workers, stack),
                            workers=dask_workers)  # fmt: skip
            except BaseException as e:
                rec.status, rec.error = "failed", f"{type(e).__name__}: {e}"[:2000]
                rec.save(wh)
                mlflow.set_tag("status", "failed")
                raise
            rec.status, rec.finished_at = "succeeded", datetime.now(UTC)
            rec.save(wh)
            summary = _summary(rec, wh)
            _log_mlflow(rec, summary)
        _artifact(rec, summary)
    return summary


def _peak_rss_mb(reset: bool = False) -> float | None:
    """This process's peak resident memory (Linux ``VmHWM``) in MB; ``reset`` then starts a new peak from the current
    RSS (``/proc/self/clear_refs``), so each stage reports its own. None where /proc does not have it. The reset also
    lowers what ``getrusage`` reports afterwards: callers that want the process's peak take the max over the stages."""
    try:
        with open("/proc/self/status") as f:
            peak = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), None)
        if reset and peak is not None:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    except OSError:
        return None
    return None if peak is None else round(peak, 1)


def _run_stages(wh: Warehouse, rec: RunRecord, *, catalog, fmt, mapping, media, source, jave_ref, emb_ref, k,
                threshold, batch_size, commit_rows, last_ok, task_runner, workers, matcher=None,
                min_linkage=0.5) -> None:  # fmt: skip
    from flows.dedupe import _products, embed_products, find_duplicates

    logger = get_run_logger()
    opts = {"task_runner": task_runner} if task_runner is not None else {}
    # batches in flight: one on a single machine (a batch already uses every core), one per Dask worker plus one
    window = 1 if task_runner is None else workers + 1

    def stage(name: str, fn) -> None:
        if name in rec.stages_done:
            logger.info("stage %s already done in this run: skipped", name)
            return
        started = time.perf_counter()
        before = _versions(wh, WRITES[name])
        _peak_rss_mb(reset=True)
        stats = fn() or {}
        # the flow process's own peak during the stage (Dask workers' memory is theirs, not counted here)
        peak = {"peak_rss_mb": p} if (p := _peak_rss_mb()) is not None else {}
        rec.stats[name] = {**stats, "seconds": round(time.perf_counter() - started, 3), **peak}
        after = _versions(wh, WRITES[name])
        rec.tables_written.update({t: [before[t], after[t]] for t in after if after[t] != before[t]})
        rec.stages_done.append(name)
        rec.save(wh)
        logger.info("stage %s: %s", name, rec.stats[name])

    def ingest() -> dict[str, Any]:
        if catalog is None:
            return {"skipped": "no catalog given"}
        from flows.ingest import ingest as ingest_flow

        s = ingest_flow(catalog, fmt=fmt, source=source, warehouse_root=wh.root, mapping=mapping, media=media)
        keys = ("read", "accepted", "new", "changed", "unchanged", "quarantined", "quarantined_by_reason",
                "media_ok", "media_bad")  # fmt: skip
        return {k2: s[k2] for k2 in keys if k2 in s}

    stage("ingest", ingest)
    if rec.watermark_to is None:  # fixed once per run, so a resumed run covers the same changes
        top = wh.sql("SELECT max(last_seen) AS t FROM products").column("t")[0].as_py()
        rec.watermark_to = top or datetime.now(UTC)
        rec.save(wh)
    rec.stats["changed_since_watermark"] = _changed(wh, rec.watermark_from, rec.watermark_to, None)
    rec.tables_read["products"] = wh.version("products")

    # the watermark narrows the scan only while the model is the one the last successful run used
    same_jave = last_ok is not None and last_ok.models.get("jave") == jave_ref.version
    since = rec.watermark_from if same_jave else None
    stage("featurize", lambda: featurize_stage.with_options(**opts)(wh.root, jave_ref, since, batch_size, window))
    stage(
        "predict", lambda: predict_stage.with_options(**opts)(wh.root, jave_ref, since, batch_size, window, commit_rows)
    )
    rec.tables_read["predicted_products"] = wh.version("predicted_products")
    stage("embed", lambda: embed_stage.with_options(**opts)(wh.root, emb_ref, batch_size, window, commit_rows))
    rec.tables_read["embeddings"] = wh.version("embeddings")

    def dedupe() -> dict[str, Any]:
        products = _products(wh, None)
        if products.num_rows < 2:
            return {"skipped": "fewer than 2 products"}
        known, _ = embed_products(wh, emb_ref, products)  # all stored by the embed stage: a read
        s = find_duplicates(
            wh, emb_ref, products, known, k=k, threshold=threshold, matcher=matcher, min_linkage=min_linkage
        )
        return {k2: v for k2, v in s.items() if k2 != "run_id"}

    stage("dedupe", dedupe)


def _flow_run_id() -> str | None:
    try:
        from prefect.context import get_run_context

        return str(get_run_context().flow_run.id)
    except Exception:
        return None


def _summary(rec: RunRecord, wh: Warehouse) -> dict[str, Any]:
    s = rec.stats
    attrs = s.get("predict", {}).get("per_attribute", {})
    return {
        "run_id": rec.run_id, "status": rec.status, "watermark_from": rec.watermark_from,
        "watermark_to": rec.watermark_to, "changed_since_watermark": s.get("changed_since_watermark"),
        "ingested": s.get("ingest", {}).get("accepted"), "quarantined": s.get("ingest", {}).get("quarantined"),
        "quarantined_by_reason": s.get("ingest", {}).get("quarantined_by_reason", {}),
        "featurized_images": s.get("featurize", {}).get("computed"),
        "predicted_products": s.get("predict", {}).get("products"),
        "values_accepted": s.get("predict", {}).get("values_accepted"),
        "values_in_review": s.get("predict", {}).get("values_in_review"), "attributes_filled": attrs,
        "embedded": s.get("embed", {}).get("embedded"), "duplicate_pairs": s.get("dedupe", {}).get("duplicate_pairs"),
        "clusters": s.get("dedupe", {}).get("non_singleton_clusters"), "graph": s.get("dedupe", {}).get("graph"),
        "ann_recall_at_k": s.get("dedupe", {}).get("ann_recall_at_k"),
        "ann_nprobe": s.get("dedupe", {}).get("ann_nprobe"),
        "seconds": {st: s.get(st, {}).get("seconds") for st in STAGES},
        "peak_rss_mb": {st: s.get(st, {}).get("peak_rss_mb") for st in STAGES},
        "total_seconds": round((rec.finished_at - rec.started_at).total_seconds(), 2) if rec.finished_at else None,
        "models": rec.models, "tables_read": rec.tables_read, "tables_written": rec.tables_written,
        "mlflow_run_id": rec.mlflow_run_id, "mlflow_url": _mlflow_url(rec.mlflow_run_id), "warehouse": wh.root,
    }  # fmt: skip


def _mlflow_url(run_id: str | None) -> str | None:
    if run_id is None:
        return None
    exp = mlflow.get_run(run_id).info.experiment_id
    base = os.environ.get("ENRICH_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")
    return f"{base}/#/experiments/{exp}/runs/{run_id}"


def _log_mlflow(rec: RunRecord, summary: dict[str, Any]) -> None:
    metrics: dict[str, float] = {}
    for st, values in rec.stats.items():
        if isinstance(values, dict):
            metrics.update({f"{st}.{k}": float(v) for k, v in values.items() if isinstance(v, int | float)})
        elif isinstance(values, int | float):
            metrics[st] = float(values)
    mlflow.log_metrics(metrics)
    # lineage both ways: the Delta versions this run read, and what it moved each written table from -> to
    mlflow.set_tags({f"read.{t}": str(v) for t, v in rec.tables_read.items()})
    mlflow.set_tags({f"wrote.{t}": f"{a}->{b}" for t, (a, b) in rec.tables_written.items()})
    mlflow.set_tag("status", rec.status)
    mlflow.log_dict({"tables_read": rec.tables_read, "tables_written": rec.tables_written, "models": rec.models,
                     "watermark_from": str(rec.watermark_from), "watermark_to": str(rec.watermark_to)},
                    "lineage.json")  # fmt: skip
    mlflow.log_text(summary_markdown(summary), "summary.md")


def summary_markdown(s: dict[str, Any]) -> str:
    peaks = s.get("peak_rss_mb") or {}
    stage_rows = [{"stage": st, "seconds": s["seconds"].get(st), "peak RSS MB": peaks.get(st)} for st in STAGES]
    counts = [
        {"metric": k, "value": s[k]}
        for k in (
            "changed_since_watermark",
            "ingested",
            "quarantined",
            "featurized_images",
            "predicted_products",
            "values_accepted",
            "values_in_review",
            "embedded",
            "duplicate_pairs",
            "clusters",
            "graph",
            "total_seconds",
        )  # fmt: skip
    ]
    reasons = [{"reason": r, "rows": n} for r, n in (s["quarantined_by_reason"] or {}).items()]
    attrs = sorted((s["attributes_filled"] or {}).items(), key=lambda kv: -kv[1])[:20]
    return (
        f"# Nightly run `{s['run_id']}`: {s['status']}\n\n"
        f"Changes since {s['watermark_from'] or 'the beginning'} up to {s['watermark_to']}. Models: {s['models']}. "
        f"MLflow run: [{s['mlflow_run_id']}]({s['mlflow_url']}).\n\n"
        + reports.markdown_table(counts) + "\n## Durations and peak memory (this process)\n\n"
        + reports.markdown_table(stage_rows)
        + "\n## Quarantine by reason\n\n" + (reports.markdown_table(reasons) if reasons else "none\n")
        + "\n## Attribute values filled (top 20)\n\n"
        + (reports.markdown_table([{"attribute": a, "values": n} for a, n in attrs]) if attrs else "none\n")
        + f"\n## Lineage\n\nread {s['tables_read']}; wrote (version before -> after) {s['tables_written']}\n"
    )  # fmt: skip


def _artifact(rec: RunRecord, summary: dict[str, Any]) -> None:
    create_markdown_artifact(key="nightly-summary", markdown=summary_markdown(summary),
                             description=f"nightly run {rec.run_id}")  # fmt: skip


@flow(name="maintain")
def maintain(
    warehouse_root: str | None = None,
    tables: list[str] | None = None,
    retention_hours: int = 168,
    compact: bool = True,
    lock: str = "auto",
    wait_s: float = 0.0,
) -> dict[str, dict[str, int]]:
    """Compact the warehouse's tables and vacuum the files replaced more than ``retention_hours`` ago
    (`Warehouse.maintain`), under the nightly's lock (``lock`` / ``wait_s`` as for `nightly`). The weekly
    deployment in prefect.yaml runs it; `enrich maintain` runs it ad hoc."""
    wh = Warehouse(warehouse_root)
    with nightly_lock(wh, lock, wait_s) as held:
        get_run_logger().info("nightly lock: %s", held)
        out = wh.maintain(tables or None, retention_hours=retention_hours, compact=compact)
    create_markdown_artifact(key="maintain-summary", description=f"warehouse maintenance of {wh.root}",
                             markdown="# Warehouse maintenance\n\n" + reports.markdown_table(
                                 [{"table": t, **v} for t, v in out.items()]))  # fmt: skip
    return out
