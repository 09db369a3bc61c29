"""JAVE flows end to end on a generated catalog with a tiny model: train -> MLflow (params, metrics, artifacts,
pyfunc, registry, @champion) -> enrich into Delta (incremental) -> evaluate."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return tmp_path / "mlruns"


def test_train_predict_evaluate(tmp_path, prefect_harness, mlflow_store):
    import mlflow
    import pandas as pd

    from flows.enrich import enrich, evaluate_jave
    from flows.ingest import ingest
    from flows.train_jave import train_jave
    from warehouse.sample_catalog import FIELD_MAP, generate
    from warehouse.tables import Warehouse

    cat = generate(tmp_path / "demo", n_products=80, seed=1, n_videos=1)
    wh_root = str(tmp_path / "wh")
    ingest(str(cat.catalog_path), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False)
    source = str(cat.catalog_path)
    common = dict(
        dataset=source,
        preset="tiny",
        epochs=2,
        batch_size=16,
        max_length=48,
        warehouse_root=wh_root,
        checkpoint_root=str(tmp_path / "ckpt"),
        use_image=False,
    )
    first = train_jave(**common)
    assert first["model_version"] == "1" and "no champion yet" in first["promotion"]
    client = mlflow.MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.data.params["run.preset"] == "tiny" and "train.lr" in run.data.params
    history = client.get_metric_history(first["run_id"], "train_total")
    assert [m.step for m in history] == [1, 2]
    for name in ("train_attr_bce", "train_value_ce", "train_kl", "test_value_f1_strict", "test_extractgpt_f1"):
        assert name in run.data.metrics, name
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "reports")}
    assert {"reports/per_attribute.md", "reports/per_attribute_f1.png", "reports/sample_predictions.md"} <= artifacts
    assert str(client.get_model_version_by_alias("jave", "champion").version) == "1"

    model = mlflow.pyfunc.load_model("models:/jave@champion")
    out = model.predict(
        pd.DataFrame(
            [{"product_id": "x", "title": "Northwind Cotton T-Shirt - Navy Blue", "description": "", "specs": "[]"}]
        )
    )
    assert list(out.columns)[:4] == ["product_id", "attribute", "value", "field"]
    title = "Northwind Cotton T-Shirt - Navy Blue"
    extracted = out[out["kind"] == "extracted"]
    assert all(title[int(r.begin) : int(r.end)] == r.value for r in extracted.itertuples() if r.field == "title")

    # a second, identical run (new seed) only becomes champion if it is better on the same validation set
    second = train_jave(**common, seed=1)
    assert second["model_version"] == "2"
    assert ("beats" in second["promotion"]) or ("does not beat" in second["promotion"])

    s1 = enrich(warehouse_root=wh_root)
    wh = Warehouse(wh_root)
    assert s1["products"] == wh.read("products").num_rows
    n_values = wh.read("attribute_predictions").num_rows + wh.read("review_queue").num_rows
    assert n_values == s1["values_accepted"] + s1["values_in_review"] > 0
    assert enrich(warehouse_root=wh_root)["products"] == 0, "unchanged products are not re-predicted"
    preds = wh.read("attribute_predictions").to_pylist() + wh.read("review_queue").to_pylist()
    titles = {r["product_id"]: r for r in wh.read("products").to_pylist()}
    for p in preds:
        if p["kind"] == "extracted" and p["field"] == "title":
            assert titles[p["product_id"]]["title"][p["begin"] : p["end"]] == p["value"]

    metrics = evaluate_jave(source, split="test", warehouse_root=wh_root)
    assert 0.0 <= metrics["value_f1_strict"] <= 1.0
    assert json.loads(json.dumps(metrics))  # plain floats
