"""Prefect flows ``enrich`` (warehouse products × ``jave@champion`` -> attribute values) and ``evaluate-jave``.

Incremental: a product is predicted when it is new, its ``content_hash`` changed, or the model version changed
since its last prediction (``predicted_products`` keeps that state). Per batch, one atomic replaceWhere per table:
accepted values (score ≥ the attribute's threshold chosen on validation) go to ``attribute_predictions``, the others
to ``review_queue`` — nothing is dropped — and the product's previous rows are replaced, never duplicated.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import mlflow
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import reports, tracking
from warehouse import schema
from warehouse.tables import Warehouse


def load_champion(model_name: str = "jave", version: str | None = None):
    """(enricher, model version, run id) of ``model_name@champion`` (or an explicit version)."""
    client = mlflow.MlflowClient()
    mv = client.get_model_version(model_name, version) if version else tracking.champion(model_name, client)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model_name}/{mv.version}")
    return pyfunc.unwrap_python_model().enricher, str(mv.version), mv.run_id


def products_to_predict(wh: Warehouse, model_version: str, source: str | None, only_changed: bool) -> pa.Table:
    where = []
    if source:
        where.append("p.source = '" + source.replace("'", "''") + "'")
    if only_changed and wh.exists("predicted_products"):
        where.append(
            f"(d.product_id IS NULL OR d.content_hash != p.content_hash OR d.model_version != '{model_version}')"
        )
        join = "LEFT JOIN predicted_products d ON d.product_id = p.product_id"
    else:
        join = ""
    sql = (
        "SELECT p.product_id, p.title, p.description, p.category, p.specs, p.images, p.content_hash "
        f"FROM products p {join} {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY p.product_id"
    )
    return wh.sql(sql)


@task(name="predict-batch", cache_policy=NO_CACHE, persist_result=False)
def predict_batch(enricher: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        r["labels"] = []
    return enricher.predict_rows(rows)


@task(name="write-predictions", retries=3, retry_delay_seconds=[1, 5, 15], cache_policy=NO_CACHE,
      persist_result=False)  # fmt: skip
def write_predictions(wh: Warehouse, rows: list[dict], preds: list[dict], meta: dict[str, str], now: datetime) -> None:
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
    ids = list(hashes)
    # review first, predictions second, state last: a crash in between re-predicts the batch on the next run
    wh.replace_where("review_queue", pa.Table.from_pylist(review, schema=schema.ATTRIBUTE_PREDICTIONS), "product_id",
                     ids)  # fmt: skip
    wh.replace_where("attribute_predictions", pa.Table.from_pylist(accepted, schema=schema.ATTRIBUTE_PREDICTIONS),
                     "product_id", ids)  # fmt: skip
    state = [
        {"product_id": pid, "content_hash": hashes[pid], "model_name": meta["model_name"],
         "model_version": meta["model_version"], "mlflow_run_id": meta["run_id"], "accepted": a, "in_review": r,
         "predicted_at": now}
        for pid, (a, r) in counts.items()
    ]  # fmt: skip
    wh.merge("predicted_products", pa.Table.from_pylist(state, schema=schema.PREDICTED_PRODUCTS))


@flow(name="enrich")
def enrich(
    warehouse_root: str | None = None,
    model_name: str = "jave",
    model_version: str | None = None,
    source: str | None = None,
    only_changed: bool = True,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Predict attribute values for new/changed products with ``model_name@champion`` (or ``model_version``)."""
    logger = get_run_logger()
    started = time.perf_counter()
    tracking.setup("jave")
    wh = Warehouse(warehouse_root)
    enricher, version, run_id = load_champion(model_name, model_version)
    todo = products_to_predict(wh, version, source, only_changed)
    meta = {"model_name": model_name, "model_version": version, "run_id": run_id}
    n_acc = n_rev = 0
    attrs: dict[str, int] = {}
    for start in range(0, todo.num_rows, batch_size):
        rows = todo.slice(start, batch_size).to_pylist()
        preds = predict_batch(enricher, rows)
        write_predictions(wh, rows, preds, meta, datetime.now(UTC))
        for p in preds:
            if p["accepted"]:
                n_acc += 1
                attrs[p["attribute"]] = attrs.get(p["attribute"], 0) + 1
            else:
                n_rev += 1
        logger.info("predicted %d / %d products", min(start + batch_size, todo.num_rows), todo.num_rows)
    seconds = time.perf_counter() - started
    summary = {
        "products": todo.num_rows, "values_accepted": n_acc, "values_in_review": n_rev,
        "model": f"{model_name}/{version}", "mlflow_run_id": run_id, "seconds": round(seconds, 2),
        "products_per_s": round(todo.num_rows / seconds, 1) if seconds else None,
        "table_versions": {t: wh.version(t) for t in ("attribute_predictions", "review_queue", "predicted_products")},
    }  # fmt: skip
    top = sorted(attrs.items(), key=lambda kv: -kv[1])[:15]
    create_markdown_artifact(
        key="enrich-summary",
        markdown=f"# Enrichment with `{model_name}` version {version}\n\n"
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
