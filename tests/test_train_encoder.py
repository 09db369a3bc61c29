"""Product encoder training: the pure loop (features/encoder_train.py) and the `train-encoder` flow end to end on a
generated catalog with the tiny preset: MLflow params, per-epoch loss terms and pair weights, pyfunc, registry,
@champion, ``load_encoder``."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return tmp_path / "mlruns"


COLOURS = ["red", "blue", "green", "black", "white", "pink"]
KINDS = ["shirt", "shoe", "watch", "laptop", "mug"]


def rows(n: int) -> list[dict]:
    return [
        {
            "product_id": f"p{i}",
            "title": f"{COLOURS[i % 6]} {KINDS[i % 5]} model {i}",
            "description": f"a {COLOURS[i % 6]} {KINDS[i % 5]}",
            "specs": [{"key": "colour", "value": COLOURS[i % 6]}, {"key": "kind", "value": KINDS[i % 5]}],
        }
        for i in range(n)
    ]


def test_train_loop_checkpoint_and_metrics(tmp_path):
    from features.encoder import ProductEncoder, encode_products, tiny
    from features.encoder_train import EncoderTrainConfig, load_encoder_checkpoint, train_encoder

    data = rows(30)
    train, val = data[:22], data[22:]
    seen: list[tuple[int, dict]] = []
    model = ProductEncoder(tiny())
    cfg = EncoderTrainConfig(epochs=2, batch_size=8, seed=0, checkpoint_dir=str(tmp_path / "ckpt"))
    result = train_encoder(
        model,
        train,
        val,
        cfg,
        pairs=[(data[0], data[6], 1), (data[1], data[2], 0)],
        val_pairs=[("p22", "p28")],
        on_epoch=lambda e, m: seen.append((e, m)),
    )
    assert [e for e, _ in seen] == [1, 2] and result.epochs_run == 2
    metrics = seen[-1][1]
    for name in ("train_mlm", "train_mep", "train_itc", "train_total", "train_pair", "w_text-table",
                 "val_recall_at_1", "val_recall_at_10", "val_map_at_10", "val_text-table_recall_at_5",
                 "val_dup_recall_at_1"):  # fmt: skip
        assert name in metrics and np.isfinite(metrics[name]), name
    assert metrics["w_text-table"] == pytest.approx(1.0)  # the only pair the text+table catalog supports
    assert 0.0 <= metrics["val_recall_at_1"] <= metrics["val_recall_at_5"] <= metrics["val_recall_at_10"] <= 1.0
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"best.safetensors", "config.json"}

    loaded = load_encoder_checkpoint(tmp_path / "ckpt")
    np.testing.assert_allclose(encode_products(loaded, val), encode_products(model, val), atol=1e-5)


def test_retrieval_metrics_perfect_when_modalities_agree():
    from features.encoder_train import _rank_of_target, _retrieval

    scores = np.eye(4) + 0.01
    ranks = _rank_of_target(scores, np.arange(4))
    assert ranks.tolist() == [1, 1, 1, 1]
    assert _retrieval(np.array([1, 2, 11]), "")["map_at_10"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_train_encoder_flow(tmp_path, prefect_harness, mlflow_store):
    import mlflow
    import pandas as pd

    from flows.ingest import ingest
    from flows.train_encoder import MODEL_NAME, load_encoder, train_encoder
    from warehouse.sample_catalog import FIELD_MAP, generate

    with pytest.raises(LookupError, match="enrich train encoder"):
        load_encoder()

    cat = generate(tmp_path / "demo", n_products=60, seed=1, n_videos=1)
    wh_root = str(tmp_path / "wh")
    ingest(str(cat.catalog_path), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False)
    summary = train_encoder(
        preset="tiny",
        epochs=3,
        batch_size=16,
        patience=0,
        warehouse_root=wh_root,
        checkpoint_root=str(tmp_path / "ckpt"),
    )
    assert summary["model_version"] == "1" and "no champion yet" in summary["promotion"]

    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.data.params["run.preset"] == "tiny" and run.data.params["model.dim"] == "32"
    assert "train.lr" in run.data.params and "model.text.tiny" in run.data.params
    for name in ("train_total", "train_mlm", "train_mep", "train_itc", "w_text-table", "val_recall_at_10"):
        assert [m.step for m in client.get_metric_history(summary["run_id"], name)] == [1, 2, 3], name
    total = [m.value for m in client.get_metric_history(summary["run_id"], "train_total")]
    assert total[-1] < total[0], f"the pretraining loss does not fall: {total}"
    assert "best_val_recall_at_10" in run.data.metrics

    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == "1" and champion.tags["eval_metric"] == "val_recall_at_10"
    assert champion.tags["eval_set"].startswith("all/validation#")

    model, version, run_id = load_encoder()
    assert (version, run_id) == ("1", summary["run_id"]) and not model.training

    with pytest.raises(LookupError, match="no version '7'"):
        load_encoder("7")
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    assert pyfunc.metadata.get_output_schema().input_names() == ["product_id", "vector"]
    assert pyfunc.metadata.get_input_schema().input_names() == ["product_id", "title", "description", "specs"]
    specs = json.dumps([{"key": "colour", "value": "navy"}])
    frame = pd.DataFrame(
        [
            {"product_id": "x", "title": "Northwind Cotton T-Shirt - Navy", "description": "soft", "specs": specs},
            {"product_id": "y", "title": "Steel watch", "description": "", "specs": "[]"},
        ]
    )
    out = pyfunc.predict(frame)
    assert list(out.columns) == ["product_id", "vector"] and out["product_id"].tolist() == ["x", "y"]
    vectors = np.array(out["vector"].tolist(), dtype=np.float32)
    assert vectors.shape == (2, model.cfg.out_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    # labelled validation pairs in the warehouse: the next version is scored on match quality (pair F1), which
    # the recall-scored champion cannot be compared with, so the alias stays until someone decides
    import csv

    import pyarrow as pa

    from flows.train_encoder import MATCH_METRIC, load_valid_pairs
    from warehouse.tables import Warehouse

    truth = [(r["sku_a"], r["sku_b"]) for r in csv.DictReader(cat.duplicates_truth_path.open())]
    ids = sorted(Warehouse(wh_root).read("products", columns=["product_id"]).column("product_id").to_pylist())
    rng = np.random.default_rng(0)
    negatives = [tuple(str(i) for i in rng.choice(ids, 2, replace=False)) for _ in range(24)]
    labelled = [(a, b, 1) for a, b in truth] + [(a, b, 0) for a, b in negatives if (a, b) not in truth]
    Warehouse(wh_root).append("pairs", pa.Table.from_pylist([
        {"benchmark": "toy", "split": "valid", "line": i, "left_id": a, "right_id": b, "label": y}
        for i, (a, b, y) in enumerate(labelled)
    ]))  # fmt: skip
    assert len(load_valid_pairs.fn(Warehouse(wh_root), None)) == len(labelled) >= 20
    second = train_encoder(preset="tiny", epochs=1, batch_size=16, patience=0, warehouse_root=wh_root,
                           checkpoint_root=str(tmp_path / "ckpt2"))  # fmt: skip
    assert 0.0 < second["validation"][MATCH_METRIC] <= 1.0 and "not comparable" in second["promotion"]
    v2 = client.get_model_version(MODEL_NAME, second["model_version"])
    assert v2.tags["eval_metric"] == MATCH_METRIC and v2.tags["eval_set"].startswith("all/pairs-valid#")
    assert "val_pair_threshold" in client.get_run(second["run_id"]).data.metrics
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
