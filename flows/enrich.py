"""Prefect flows ``enrich`` (warehouse products × ``jave@champion`` -> attribute values) and ``evaluate-jave``.

Incremental: a product is predicted when it is new, its ``content_hash`` changed, or the model version changed
since its last prediction (``predicted_products`` keeps that state). Per commit group, one atomic commit per table:
accepted values (score ≥ the attribute's threshold chosen on validation) go to ``attribute_predictions``, the others
to ``review_queue`` — nothing is dropped. New rows are appended (a commit whose cost does not grow with the table);
the previous rows of re-predicted products are deleted once, when the stage ends (`Superseded`: one rewrite per table
per run, not per commit), so a finished run leaves each product exactly its current rows. One writer per warehouse at
a time (the nightly holds a lock).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import mlflow
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows import reports, tracking
from flows.defaults import BATCH_ROWS, COMMIT_ROWS, COMMIT_SECONDS, COMMIT_SHARE
from warehouse import schema
from warehouse.tables import Warehouse, ts_literal


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, by reference: what a task needs to load the model in whatever process runs it
    (a Dask worker loads it once and keeps it; the model itself never travels with the task)."""

    name: str
    version: str
    run_id: str
    tracking_uri: str
    # how to run it (prepare_enricher): cpu | cuda | auto; fp32 | bf16 | int8 | auto; torch | onnx | auto; where the
    # visual feature cache lives (a warehouse root; None: features are computed for every batch). Storage options
    # come from the environment.
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    visual_cache_root: str | None = None


_LOADED: dict[ModelRef, Any] = {}
_LOAD_LOCK = threading.Lock()


def load_enricher(ref: ModelRef) -> Any:
    """The ``JaveEnricher`` of ``ref``, loaded once per process (under a lock: tasks in threads would otherwise
    load it twice at once, and transformers' lazy imports are not thread-safe)."""
    with _LOAD_LOCK:
        if ref not in _LOADED:
            mlflow.set_tracking_uri(ref.tracking_uri)
            pyfunc = mlflow.pyfunc.load_model(f"models:/{ref.name}/{ref.version}")
            _LOADED[ref] = prepare_enricher(pyfunc.unwrap_python_model().enricher, ref)
        return _LOADED[ref]


def prepare_enricher(enricher: Any, ref: ModelRef) -> Any:
    """Put the enricher on ``ref.device`` with ``ref.precision`` / ``ref.backend`` and, for a model with images, the
    visual feature cache under ``ref.visual_cache_root`` (``warehouse.visual_features``: an unchanged image never
    runs again)."""
    store = None
    if ref.visual_cache_root is not None and enricher.use_image:
        from warehouse.visual_features import VisualFeatureStore

        wh = Warehouse(ref.visual_cache_root)
        store = VisualFeatureStore(wh.root, enricher.backbone_id, wh.storage_options)
    return enricher.configure(device=ref.device, precision=ref.precision, backend=ref.backend, visual_store=store)


def resolve_model(model_name: str = "jave", version: str | None = None) -> ModelRef:
    """``model_name@champion`` (or an explicit version) as a `ModelRef`; a clear error naming what to run if none."""
    client = mlflow.MlflowClient()
    mv = client.get_model_version(model_name, version) if version else tracking.champion(model_name, client)
    return ModelRef(model_name, str(mv.version), mv.run_id, mlflow.get_tracking_uri())


def load_champion(model_name: str = "jave", version: str | None = None):
    """(enricher, model version, run id) of ``model_name@champion`` (or an explicit version)."""
    ref = resolve_model(model_name, version)
    return load_enricher(ref), ref.version, ref.run_id


def products_to_predict(
    wh: Warehouse, model_version: str, source: str | None, only_changed: bool, since: datetime | None = None
) -> pa.Table:
    """Products with no prediction of ``model_version`` for their current content (all of them unless
    ``only_changed``); ``since`` narrows to products written after that time (the nightly watermark)."""
    where = []
    if source:
        where.append("p.source = '" + source.replace("'", "''") + "'")
    if since is not None:
        where.append(f"p.last_seen > TIMESTAMPTZ '{since.isoformat()}'")
    join, seen = "", "FALSE"
    if wh.exists("predicted_products"):  # predicted before: its rows are replaced; never predicted: appended
        join, seen = "LEFT JOIN predicted_products d ON d.product_id = p.product_id", "d.product_id IS NOT NULL"
        if only_changed:
            where.append(
                f"(d.product_id IS NULL OR d.content_hash != p.content_hash OR d.model_version != '{model_version}')"
            )
    media_col = ""
    if wh.exists("media"):  # each image's sha256 + decoded blob: the visual cache's key, and no refetch of the source
        media_col = ", m.image_media"
        join += (
            " LEFT JOIN (SELECT product_id, list({'uri': uri, 'sha256': sha256, 'blob_uri': blob_uri}) AS image_media"
            " FROM media WHERE kind = 'image' AND status = 'ok' GROUP BY product_id) m ON m.product_id = p.product_id"
        )
    sql = (
        f"SELECT p.product_id, p.title, p.description, p.category, p.specs, p.images, p.content_hash{media_col}, "
        f"{seen} AS predicted_before "
        f"FROM products p {join} {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY p.product_id"
    )
    return wh.sql(sql)


@task(name="predict-batch", cache_policy=NO_CACHE, persist_result=False)
def predict_batch(ref: ModelRef, batch: pa.Table) -> list[dict[str, Any]]:
    """Attribute values of one batch of products (runs wherever the task runner puts it: a thread, a Dask worker)."""
    rows = batch.to_pylist()
    for r in rows:
        r["labels"] = []
    return load_enricher(ref).predict_rows(rows)


def prediction_tables(rows: list[dict], preds: list[dict], meta: dict[str, str], now: datetime) -> PredictionGroup:
    """One batch's predictions as Arrow (``review_queue``, ``attribute_predictions``, ``predicted_products``), built
    as the batch arrives: a commit group holds columns, not a dict per value (a scratch measurement with 21 values
    per product, as in the 1M nightly: 8.7 KB a product as dicts, 4.5 KB as Arrow)."""
    hashes = {r["product_id"]: r["content_hash"] for r in rows}
    accepted, review = [], []
    counts: dict[str, list[int]] = {pid: [0, 0] for pid in hashes}
    for p in preds:
        pid_key = "|".join(str(p[k]) for k in ("product_id", "attribute", "kind", "field", "begin", "value"))
        out = {
            "prediction_id": pid_key, "product_id": p["product_id"], "attribute": p["attribute"], "value": p["value"],
            "field": p["field"], "begin": p["begin"], "end": p["end"], "score": p["score"],
            "threshold": p["threshold"], "kind": p["kind"], "content_hash": hashes[p["product_id"]],
            "model_name": meta["model_name"], "model_version": meta["model_version"],
            "mlflow_run_id": meta["run_id"], "predicted_at": now,
        }  # fmt: skip
        (accepted if p["accepted"] else review).append(out)
        counts[p["product_id"]][0 if p["accepted"] else 1] += 1
    state = [
        {"product_id": pid, "content_hash": hashes[pid], "model_name": meta["model_name"],
         "model_version": meta["model_version"], "mlflow_run_id": meta["run_id"], "accepted": a, "in_review": r,
         "predicted_at": now}
        for pid, (a, r) in counts.items()
    ]  # fmt: skip
    out = {"review_queue": review, "attribute_predictions": accepted, "predicted_products": state}
    tables = {t: pa.Table.from_pylist(rows_, schema=schema.TABLES[t]) for t, rows_ in out.items()}
    fresh = [r["product_id"] for r in rows if not r.get("predicted_before")]
    known = set(fresh)
    return PredictionGroup(tables, fresh, [pid for pid in hashes if pid not in known])


@dataclass
class PredictionGroup:
    """Predictions ready to commit: the three tables' rows, and which products were never predicted before (their
    rows are appended) or were (their rows are replaced)."""

    tables: dict[str, pa.Table]
    fresh: list[str]
    before: list[str]

    @staticmethod
    def concat(groups: list[PredictionGroup]) -> PredictionGroup:
        return PredictionGroup({t: pa.concat_tables([g.tables[t] for g in groups]) for t in groups[0].tables},
                               [p for g in groups for p in g.fresh], [p for g in groups for p in g.before])  # fmt: skip


PREDICTION_TABLES = ("review_queue", "attribute_predictions")


@task(name="write-predictions", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE,
      persist_result=False)  # fmt: skip
def write_predictions(wh: Warehouse, group: PredictionGroup) -> None:
    # Every product's new rows are appended (a commit whose cost does not grow with the table); the old rows of the
    # products predicted before stay until the stage ends (`Superseded`), then go in one rewrite per table. The
    # state last: a crash before it re-predicts the batch on the next run, whose start deletes the rows left behind.
    import pyarrow.compute as pc
    from prefect.runtime import task_run

    state = group.tables["predicted_products"]
    if task_run.run_count > 1 and state.num_rows:  # a retry: the failed attempt may have committed some appends
        since = ts_literal(pc.min(state.column("predicted_at")).as_py())  # the group's rows are this new or newer
        ids = state.column("product_id").to_pylist()
        for table in PREDICTION_TABLES:
            wh.delete_where(table, "product_id", ids, also=f"predicted_at >= {since}")
        wh.delete_where("predicted_products", "product_id", sorted(group.fresh))
    for table in PREDICTION_TABLES:
        wh.ensure(table)  # exists after the first run even when it holds no rows yet (readers query it)
        wh.append(table, group.tables[table])
    is_new = pc.is_in(state.column("product_id"), value_set=pa.array(group.fresh, pa.string()))
    wh.ensure("predicted_products")
    wh.append("predicted_products", state.filter(is_new))
    wh.merge("predicted_products", state.filter(pc.invert(is_new)))


class Superseded:
    """Rows replaced by appending: a stage appends the new rows of the products it recomputes and deletes their old
    rows once, when it ends, in one commit per table, instead of replacing them commit by commit.

    Why: a replace rewrites every file holding one of the products, i.e. the whole table once the changes are spread
    (~10 s for ``review_queue`` at 1M products, 26M rows), so a rerun that committed k times paid k rewrites. Now it
    pays one, whatever its size. Until the stage ends, a recomputed product has its old and new rows side by side;
    its current rows are those whose timestamp equals its state's (``predicted_products.predicted_at``, the
    newest ``embeddings.embedded_at``).

    A marker under ``_state/`` holds when the stage began writing, and goes when its old rows are gone: a run that
    finds one (the last died in between) first deletes what that run left behind (`since`)."""

    def __init__(self, wh: Warehouse, stage: str, tables: tuple[str, ...], column: str) -> None:
        self.wh, self.stage, self.tables, self.column = wh, stage, tables, column  # column: when a row was written
        self.path = f"_state/{stage}-superseded.json"

    def since(self) -> datetime | None:
        """When the unfinished stage began writing; None if the last one finished (or none ran)."""
        import json

        data = self.wh.read_bytes(self.path)
        return None if data is None else datetime.fromisoformat(json.loads(data)["since"])

    def begin(self) -> datetime:
        """Record that the stage starts writing now; returns that time (every row it writes is this new or newer)."""
        import json

        now = datetime.now(UTC)
        self.wh.write_bytes(self.path, json.dumps({"since": now.isoformat()}).encode())
        return now

    def drop(self, ids: list[str], before: datetime) -> int:
        """Delete the rows of products ``ids`` written before ``before`` from each table; returns how many went."""
        older = f"{self.column} < {ts_literal(before)}"
        return sum(self.wh.delete_where(t, "product_id", ids, also=older) for t in self.tables)

    def finish(self, ids: list[str], began: datetime) -> int:
        """The stage is done: delete the old rows of the products ``ids`` it rewrote (every row it wrote is newer
        than ``began``, the time `begin` returned), then remove the marker; returns how many rows went."""
        started = time.perf_counter()
        dropped = self.drop(ids, began)
        reports.run_logger().info("%s: deleted %d superseded rows in %.1f s", self.stage, dropped,
                                  time.perf_counter() - started)  # fmt: skip
        self.end()
        return dropped

    def end(self) -> None:
        self.wh.delete_file(self.path)


def recover_predictions(wh: Warehouse, pending: Superseded) -> int:
    """After a run that died mid-predict (its marker is there): delete the old rows of the products whose state it
    wrote, and the rows it appended for products whose state it did not write; returns how many rows went. No
    marker: no read at all."""
    since = pending.since()
    if since is None:
        return 0
    for table in (*PREDICTION_TABLES, "predicted_products"):
        wh.ensure(table)
    ts = f"TIMESTAMPTZ '{since.isoformat()}'"
    done = f"SELECT product_id FROM predicted_products WHERE predicted_at >= {ts}"
    finished = wh.sql(done).column(0).to_pylist()
    dropped = pending.drop(finished, since)
    for table in PREDICTION_TABLES:
        stateless = wh.sql(f"SELECT DISTINCT product_id FROM {table} WHERE predicted_at >= {ts} EXCEPT {done}")
        ids = stateless.column(0).to_pylist()
        dropped += wh.delete_where(table, "product_id", ids, also=f"predicted_at >= {ts_literal(since)}")
    pending.end()
    return dropped


class CommitGroups:
    """Batch results gathered into fewer, larger Delta commits: ``write(items)`` runs once ``rows`` rows or
    ``seconds`` seconds have piled up since the last commit, and on ``flush``.

    A commit into a Delta table costs about the same whatever it holds (a merge scans the target, which grows over
    the run), so one commit per 256-row batch made a 100k-product run spend more time committing than predicting.
    A commit that replaces rows rewrites every file holding one of them, i.e. the whole table once the products are
    spread (~9 s for `review_queue` at 1M products, when predictions were replaced per commit; now only the merge
    into `predicted_products` does): so each commit's own time also sets how much work the next one waits for,
    ``write_s * (1 - share) / share``, keeping commits at most ``share`` of the run's time (``share``, default
    ``flows.defaults.COMMIT_SHARE``; a 5% rerun at 1M that paid one such rewrite per 16k products took 70.1 s to
    predict 50k, 1.7x the full run's rate), up to ``max_rows`` pending rows (default ``8 * rows``, ~600 MB of
    predictions) whatever the time.

    Grouping keeps the restart guarantee in a weaker form: a run stopped halfway keeps every group it committed and
    redoes at most ``max(seconds, write_s * (1 - share) / share)`` of work (nothing is lost: the uncommitted products
    are still "to do" on the next run)."""

    def __init__(
        self,
        write: Callable[[list[Any]], None],
        rows: int = COMMIT_ROWS,
        seconds: float = COMMIT_SECONDS,
        *,
        share: float | None = None,
        max_rows: int | None = None,
    ) -> None:
        share = COMMIT_SHARE if share is None else share
        if rows < 1 or seconds < 0 or not 0 < share <= 1:
            raise ValueError(f"CommitGroups needs rows >= 1, seconds >= 0 and 0 < share <= 1 (got rows={rows}, "
                             f"seconds={seconds}, share={share})")  # fmt: skip
        self.write, self.rows, self.seconds, self.share = write, rows, seconds, share
        self.max_rows = max(rows, 8 * rows if max_rows is None else max_rows)
        self.pending: list[Any] = []
        self.pending_rows = 0
        self.commits = 0
        self.gap = 0.0  # the work the next commit waits for, from the last commit's own time
        self._since = time.perf_counter()

    def add(self, item: Any, n_rows: int) -> None:
        self.pending.append(item)
        self.pending_rows += n_rows
        elapsed = time.perf_counter() - self._since
        due = (self.pending_rows >= self.rows or elapsed >= self.seconds) and elapsed >= self.gap
        if due or self.pending_rows >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            started = time.perf_counter()
            self.write(self.pending)
            self.commits += 1
            self.gap = (time.perf_counter() - started) * (1 - self.share) / self.share
        self.pending, self.pending_rows, self._since = [], 0, time.perf_counter()


class PredictionWriter:
    """The enrichment's writes: prediction groups committed in `CommitGroups` by `write_predictions` (appends), and
    the old rows of the re-predicted products deleted when the writer closes (`Superseded`). Opening it first
    deletes what a run killed mid-predict left behind; ``writes=False`` (nothing to predict) writes nothing else.
    ``as_task=False`` runs `write_predictions` as a plain function (no Prefect task run per commit: benchmarks)."""

    def __init__(self, wh: Warehouse, writes: bool = True, rows: int = COMMIT_ROWS, seconds: float = COMMIT_SECONDS,
                 *, as_task: bool = True) -> None:  # fmt: skip
        self.wh, self.replaced, self.as_task = wh, [], as_task
        self.pending = Superseded(wh, "predict", PREDICTION_TABLES, "predicted_at")
        left = recover_predictions(wh, self.pending)
        if left:
            reports.run_logger().warning("deleted %d prediction rows left behind by a run killed mid-predict", left)
        self.since = self.pending.begin() if writes else None
        self.commits = CommitGroups(self._write, rows, seconds)

    def _write(self, groups: list[PredictionGroup]) -> None:
        group = PredictionGroup.concat(groups)
        if self.as_task:
            write_predictions(self.wh, quote(group))  # quote: Prefect would otherwise walk the group for futures
        else:
            write_predictions.fn(self.wh, group)
        self.replaced.extend(group.before)  # predicted before: their old rows go at the end

    def add(self, group: PredictionGroup, n_rows: int) -> None:
        if self.since is None:
            raise RuntimeError("this PredictionWriter was opened with writes=False")
        self.commits.add(group, n_rows)

    def close(self) -> int:
        """Commit what is pending, then delete the re-predicted products' old rows; returns how many went."""
        self.commits.flush()
        return 0 if self.since is None else self.pending.finish(self.replaced, self.since)


def submit_windowed(fn: Any, items: Iterable[Any], window: int) -> Iterator[tuple[Any, Any]]:
    """``(item, result)`` of ``fn.submit(*item)`` for every item, keeping at most ``window`` futures in flight (memory
    stays flat in catalog size whatever the task runner: threads, or Dask workers); results come in submit order.
    On one CPU box ``window=1`` (batches already use every core); on Dask, about one more than the workers."""
    pending: deque[tuple[Any, Any]] = deque()
    for item in items:
        pending.append((item, fn.submit(*item)))
        if len(pending) >= window:
            done, fut = pending.popleft()
            yield done, fut.result()
    while pending:
        done, fut = pending.popleft()
        yield done, fut.result()


def predict_products(
    wh: Warehouse,
    ref: ModelRef,
    todo: pa.Table,
    *,
    batch_size: int = BATCH_ROWS,
    window: int = 1,
    commit_rows: int = COMMIT_ROWS,
    commit_seconds: float = COMMIT_SECONDS,
) -> dict[str, Any]:
    """Predict ``todo`` batch by batch through the flow's task runner; the flow process writes the results (one
    writer per table: Delta commits from many workers would conflict), grouped into commits of ``commit_rows``
    products or ``commit_seconds`` of work (`CommitGroups`). Each group is committed with its state, so a run
    stopped halfway starts again where it stopped."""
    logger = get_run_logger()
    meta = {"model_name": ref.name, "model_version": ref.version, "run_id": ref.run_id}
    n_acc = n_rev = done = 0
    attrs: dict[str, int] = {}

    writer = PredictionWriter(wh, todo.num_rows > 0, commit_rows, commit_seconds)
    # batches travel as Arrow slices: cheap to ship to a Dask worker, and Prefect does not walk them row by row
    batches = ((ref, todo.slice(s, batch_size)) for s in range(0, todo.num_rows, batch_size))
    for (_, batch), preds in submit_windowed(predict_batch, batches, window):
        rows = batch.to_pylist()
        writer.add(prediction_tables(rows, preds, meta, datetime.now(UTC)), len(rows))
        for p in preds:
            if p["accepted"]:
                n_acc += 1
                attrs[p["attribute"]] = attrs.get(p["attribute"], 0) + 1
            else:
                n_rev += 1
        done += len(rows)
        logger.info("predicted %d / %d products", done, todo.num_rows)
    writer.close()
    return {"products": todo.num_rows, "commits": writer.commits.commits, "values_accepted": n_acc,
            "values_in_review": n_rev, "per_attribute": attrs}  # fmt: skip


@task(name="featurize-batch", cache_policy=NO_CACHE, persist_result=False)
def featurize_batch(ref: ModelRef, batch: pa.Table) -> dict[str, int]:
    enricher = load_enricher(ref)
    store = enricher.visual_store
    before = (store.hits, store.writes)
    enricher.visual_features(batch.to_pylist())
    return {"cached": store.hits - before[0], "computed": store.writes - before[1]}


def featurize_products(
    wh: Warehouse, ref: ModelRef, todo: pa.Table, *, batch_size: int = BATCH_ROWS, window: int = 1
) -> dict[str, Any]:
    """Visual features of ``todo``'s images into the warehouse's cache, batch by batch through the task runner;
    an image already there (same sha256, same backbone) is not recomputed. Nothing to do for a text-only model."""
    if todo.num_rows == 0:  # a run with nothing changed does not even load the model
        return {"products": 0, "computed": 0, "cached": 0}
    if not load_enricher(ref).use_image:
        return {"products": todo.num_rows, "computed": 0, "cached": 0, "note": "text-only model"}
    if ref.visual_cache_root is None:
        raise ValueError("featurize needs a visual feature cache: pass a ModelRef with visual_cache_root set")
    totals = {"products": todo.num_rows, "computed": 0, "cached": 0}
    batches = ((ref, todo.slice(s, batch_size)) for s in range(0, todo.num_rows, batch_size))
    for _, counts in submit_windowed(featurize_batch, batches, window):
        totals["computed"] += counts["computed"]
        totals["cached"] += counts["cached"]
    return totals


@flow(name="enrich")
def enrich(
    warehouse_root: str | None = None,
    model_name: str = "jave",
    model_version: str | None = None,
    source: str | None = None,
    only_changed: bool = True,
    batch_size: int = BATCH_ROWS,
    device: str = "auto",
    precision: str = "auto",
    visual_cache: bool = True,
    backend: str = "auto",
) -> dict[str, Any]:
    """Predict attribute values for new/changed products with ``model_name@champion`` (or ``model_version``).

    ``device`` cpu | cuda | auto; ``precision`` fp32 | bf16 | int8 | auto (bf16 autocast where it measures faster;
    int8: the text tower quantized under ONNX Runtime, CPU); ``backend`` torch | onnx | auto for the image tower;
    ``visual_cache`` keeps image-tower features in the warehouse, keyed by image sha256 + backbone.
    """
    started = time.perf_counter()
    tracking.setup("jave")
    wh = Warehouse(warehouse_root)
    ref = replace(resolve_model(model_name, model_version), device=device, precision=precision, backend=backend,
                  visual_cache_root=wh.root if visual_cache else None)  # fmt: skip
    from flows.nightly import nightly_lock

    with nightly_lock(wh):  # one writer per warehouse: a nightly run, or this
        todo = products_to_predict(wh, ref.version, source, only_changed)
        out = predict_products(wh, ref, todo, batch_size=batch_size)
    seconds = time.perf_counter() - started
    summary = {
        "products": todo.num_rows, "values_accepted": out["values_accepted"],
        "values_in_review": out["values_in_review"], "model": f"{model_name}/{ref.version}",
        "mlflow_run_id": ref.run_id, "seconds": round(seconds, 2),
        "products_per_s": round(todo.num_rows / seconds, 1) if seconds else None,
        "table_versions": {t: wh.version(t) for t in ("attribute_predictions", "review_queue", "predicted_products")},
    }  # fmt: skip
    top = sorted(out["per_attribute"].items(), key=lambda kv: -kv[1])[:15]
    create_markdown_artifact(
        key="enrich-summary",
        markdown=f"# Enrichment with `{model_name}` version {ref.version}\n\n"
        + reports.markdown_table([{k: v for k, v in summary.items() if k != "table_versions"}])
        + "\n## Values filled per attribute (top 15)\n\n"
        + reports.markdown_table([{"attribute": a, "values": n} for a, n in top]),
        description="JAVE enrichment",
    )
    return summary


@flow(name="evaluate-jave")
def evaluate_jave(
    dataset: str,
    split: str = "test",
    model_name: str = "jave",
    model_version: str | None = None,
    warehouse_root: str | None = None,
    data_path: str | None = None,
) -> dict[str, float]:
    """Score a registered JAVE version on a dataset split; logged as its own run in experiment ``jave-evaluation``."""
    from flows.datasets import load_labelled
    from flows.train_jave import _ensure_imported
    from jave.data import build_examples
    from jave.trainer import evaluate

    wh = Warehouse(warehouse_root)
    _ensure_imported(wh, dataset, data_path)
    tracking.setup("jave")
    enricher, version, run_id = load_champion(model_name, model_version)
    data = load_labelled(wh, dataset)
    rows = {"test": data.test, "validation": data.validation, "train": data.train}.get(split)
    if rows is None:
        raise ValueError(f"unknown split {split!r}; use test, validation or train")
    examples = build_examples(rows, enricher.spec, enricher.tokenizer)
    image_kwargs = {}
    if enricher.use_image:
        from flows.jave_pyfunc import load_image

        image_kwargs = {"image_loader": load_image, "preprocess": enricher.model.image_tower.preprocess}
    metrics = evaluate(enricher.model, examples, enricher.spec, thresholds=enricher.thresholds, **image_kwargs)
    tracking.setup("jave-evaluation")
    with mlflow.start_run(run_name=f"{model_name}/{version} on {dataset}/{split}"):
        mlflow.set_tags({"model_name": model_name, "model_version": version, "model_run_id": run_id,
                         "dataset": dataset, "split": split})  # fmt: skip
        mlflow.log_params({"data.products_version": data.products_version, "data.rows": len(rows)})
        mlflow.log_metrics(metrics)
    return metrics
