"""The pair matcher end to end: `enrich train matcher` on labelled pairs in the warehouse (MLflow run, registered
`pair-matcher`, @champion rule), then `enrich dedupe --matcher champion` scoring the top-k candidates, with only the
pairs touching a changed product scored again."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")


def catalog(n: int, seed: int = 0) -> tuple[list[dict], list[tuple[str, str, int]]]:
    """``n`` listings and, for each, a re-listing of the same brand by another seller: the same model number written
    differently (a match) for half of them, another model number in the same words (a non-match) for the rest."""
    rng = np.random.default_rng(seed)
    rows, pairs = [], []
    for i in range(n):
        kind = ["kettle", "toaster", "blender", "mixer"][i % 4]
        brand = "".join(rng.choice(list("bcdfghklmnprstvz"), 3)) + "".join(rng.choice(list("aeiou"), 2))
        code = int(rng.integers(1000, 9999))
        match = i % 2 == 0
        other = code if match else int(rng.integers(1000, 9999))
        rows.append({"product_id": f"A{i:03d}", "title": f"{brand} {kind} AB{code}X", "description": f"A {kind}."})
        words = [f"AB-{other}X {brand} {kind} steel", f"{brand} appliance {kind} AB-{other}-X"][i % 3 % 2]
        rows.append({"product_id": f"B{i:03d}", "title": words, "specs": {"colour": ["black", "white"][i % 2]}})
        pairs.append((f"A{i:03d}", f"B{i:03d}", int(match)))
    return rows, pairs


def test_train_matcher_then_dedupe_scores_only_changed_pairs(tmp_path, prefect_harness, mlflow_store):
    from flows.cli import app
    from flows.dedupe import dedupe
    from flows.ingest import ingest
    from flows.train_matcher import MODEL_NAME, load_matcher, train_matcher
    from warehouse.tables import Warehouse

    rows, pairs = catalog(80)
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    wh_root = str(tmp_path / "wh")
    ingest(str(path), warehouse_root=wh_root, media=False)
    wh = Warehouse(wh_root)
    split = ["train"] * 40 + ["valid"] * 20 + ["test"] * 20
    wh.append("pairs", pa.Table.from_pylist([
        {"benchmark": "toy", "split": s, "line": i + 1, "left_id": a, "right_id": b, "label": y}
        for i, ((a, b, y), s) in enumerate(zip(pairs, split, strict=True))
    ]))  # fmt: skip

    with pytest.raises(LookupError, match="import ditto"):
        train_matcher(benchmark="no-such-benchmark", tower="none", warehouse_root=wh_root)
    s = train_matcher(benchmark="toy", tower="tiny", max_iter=40, warehouse_root=wh_root)
    assert s["pairs"] == {"train": 40, "valid": 20, "test": 20} and s["model_version"] == "1"
    assert "becomes @champion" in s["promotion"] and s["val_pair_f1"] >= 0.9 and s["test_pair_f1"] >= 0.9

    import mlflow

    run = mlflow.MlflowClient().get_run(s["run_id"])
    assert {"val_pair_f1", "val_pair_precision", "val_pair_recall", "test_pair_f1", "threshold"} <= set(
        run.data.metrics
    )
    assert run.data.params["tower"] == "tiny" and run.data.params["data.train_matches"] == "20"
    matcher, version, _ = load_matcher()  # from the registry: JSON + safetensors, the tiny tower's weights too
    assert version == "1" and matcher.threshold == pytest.approx(s["threshold"], abs=1e-4)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    stored = {r["product_id"]: r for r in wh.read("products", columns=["product_id", "title", "description",
                                                                        "specs"]).to_pylist()}  # fmt: skip
    valid = [(stored[a], stored[b]) for (a, b, _), sp in zip(pairs, split, strict=True) if sp == "valid"]
    frame = pd.DataFrame([{f"{side}_{k}": json.dumps(r[k]) if k == "specs" else r[k] or ""
                           for side, r in (("left", a), ("right", b)) for k in ("title", "description", "specs")}
                          for a, b in valid])  # fmt: skip
    out = pyfunc.predict(frame)
    assert list(out.columns) == ["score", "match"]
    np.testing.assert_allclose(out["score"].to_numpy(), matcher.predict_proba(valid), atol=1e-6)
    assert (out["match"].to_numpy() == matcher.predict(valid)).all()

    # a second version through the CLI, scored on the same valid pairs: the alias moves only if it is better
    # (with a SupCon-tuned tower: its cosine becomes a feature when that scores better on valid)
    res = CliRunner().invoke(app, ["train", "matcher", "--benchmark", "toy", "--tower", "tiny", "--max-iter", "5",
                                   "--supcon-epochs", "1", "-w", wh_root])  # fmt: skip
    assert res.exit_code == 0, res.output
    second, _ = json.JSONDecoder().raw_decode(res.output[res.output.index("{") :])
    assert second["model_version"] == "2" and second["promotion"] and "@champion" in second["promotion"]
    metrics = mlflow.MlflowClient().get_run(second["run_id"]).data.metrics
    assert {"val_pair_f1_plain", "val_pair_f1_supcon", "supcon_val_cosine_f1"} <= set(metrics)
    assert second["val_pair_f1"] == pytest.approx(max(metrics["val_pair_f1_plain"], metrics["val_pair_f1_supcon"]))
    assert load_matcher("2")[0].features.supcon is not None  # a feature, or kept for blocking only

    # dedupe with the matcher: every top-k pair is a candidate, the matcher decides
    d = dedupe(warehouse_root=wh_root, method="chars", k=10, matcher="1")
    assert d["model"].endswith("+pair-matcher/1") and d["pairs_reused"] == 0
    found = {(r["a"], r["b"]): r for r in wh.read("duplicates").to_pylist()}
    assert all(r["method"] == "matcher" for r in found.values())
    matches = [(a, b) for a, b, y in pairs if y]
    assert sum((a, b) in found for a, b in matches) >= 0.9 * len(matches)
    assert sum((a, b) in found for a, b, y in pairs if not y) <= 2
    scored = {(r["a"], r["b"]): r["score"] for r in wh.read("pair_scores").to_pylist()}
    assert len(scored) == d["pairs_scored"] and set(found) <= set(scored)

    # unchanged catalog: nothing is scored again; one changed product: only its pairs are
    again = dedupe(warehouse_root=wh_root, method="chars", k=10, matcher="1")
    assert again["pairs_scored"] == 0 and again["pairs_reused"] == len(scored)
    assert {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()} == set(found)
    edit = tmp_path / "edit.jsonl"
    edit.write_text(json.dumps(dict(rows[1], title=rows[0]["title"].split()[0] + " kettle AB-0000-X refurbished")))
    ingest(str(edit), warehouse_root=wh_root, media=False)
    changed = dedupe(warehouse_root=wh_root, method="chars", k=10, matcher="1")
    now = {(r["a"], r["b"]): r["score"] for r in wh.read("pair_scores").to_pylist()}
    touching = [p for p in now if "B000" in p]
    assert 0 < changed["pairs_scored"] <= len(touching) + 2 * 15  # its pairs, and lists it entered or left
    assert all(now[p] == scored[p] for p in now if "B000" not in p and p in scored)
    assert ("A000", "B000") not in {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()}
    fresh = matcher.predict_proba([tuple(wh.sql(f"SELECT * FROM products WHERE product_id = '{x}'").to_pylist()[0]
                                         for x in p) for p in touching])  # fmt: skip
    np.testing.assert_allclose([now[p] for p in touching], fresh, atol=1e-6)

    # the matcher's SupCon tower as the blocking embedder; version 1 has none
    with pytest.raises(LookupError, match="no SupCon tower"):
        dedupe(warehouse_root=wh_root, method="matcher", model_version="1", k=10)
    m = dedupe(warehouse_root=wh_root, method="matcher", model_version="2", k=10, matcher="2", min_linkage=1.0)
    assert m["model"] == "pair-matcher-supcon/2+pair-matcher/2" and m["embedded"] == m["products"] == 160
    sizes = {int(s) for s in m["cluster_sizes"]}
    assert m["min_linkage"] == 1.0 and m["largest_cluster"] == max(sizes)
