"""The nightly flow end to end on a generated catalog with a tiny text-only JAVE and the pretrained text embedder:
full run, 1% incremental run, fail-and-resume, one run at a time, the Dask runner, and no champion."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from warehouse.sample_catalog import FIELD_MAP

SOURCE = "catalog"
N_PRODUCTS = 200


def _run(wh_root: str, catalog: Path, **kw):
    from flows.nightly import nightly

    params = dict(catalog=str(catalog), source=SOURCE, mapping=dict(FIELD_MAP), media=False, warehouse_root=wh_root,
                  dedupe_method="text", threshold=0.9, batch_size=64, commit_rows=64)  # fmt: skip
    params.update(kw)
    return nightly(**params)


def _snapshot(wh_root: str) -> dict:
    """The tables' content without run ids and timestamps."""
    import numpy as np

    from warehouse.tables import Warehouse

    wh = Warehouse(wh_root)
    preds = sorted(
        (r["product_id"], r["attribute"], r["value"], r["kind"], r["begin"], round(r["score"], 4))
        for t in ("attribute_predictions", "review_queue")
        for r in wh.read(t).to_pylist()
    )
    vectors = {r["product_id"]: np.asarray(r["vector"]) for r in wh.read("embeddings").to_pylist()}
    return {
        "predictions": preds,
        "predicted": sorted((r["product_id"], r["content_hash"]) for r in wh.read("predicted_products").to_pylist()),
        "vectors": vectors,
        "duplicates": sorted((r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()),
        "clusters": sorted((r["product_id"], r["cluster_id"]) for r in wh.read("clusters").to_pylist()),
    }


def _assert_same(a: dict, b: dict) -> None:
    import numpy as np

    assert a["predictions"] == b["predictions"]
    assert a["predicted"] == b["predicted"]
    assert a["vectors"].keys() == b["vectors"].keys()
    assert all(np.allclose(a["vectors"][k], b["vectors"][k], atol=1e-5) for k in a["vectors"])
    assert a["duplicates"] == b["duplicates"] and a["clusters"] == b["clusters"]


def _edited_catalog(source: Path, out: Path, n: int) -> Path:
    """``source`` with the titles of its first ``n`` valid products edited."""
    lines = source.read_bytes().splitlines()  # the planted bad rows include invalid UTF-8
    changed = 0
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("name"), str) and row.get("sku") and changed < n:
            row["name"] += " (2027 edition)"
            lines[i] = json.dumps(row).encode()
            changed += 1
    out.write_bytes(b"\n".join(lines) + b"\n")
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, prefect_harness):
    """A catalog, a tiny champion JAVE trained on it, and one reference nightly run (default runner)."""
    from flows.ingest import ingest
    from flows.train_jave import train_jave
    from warehouse.sample_catalog import generate

    root = tmp_path_factory.mktemp("nightly")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlruns/mlflow.db")
    (root / "mlruns").mkdir()
    cat = generate(root / "demo", n_products=N_PRODUCTS, seed=2, n_videos=0)
    train_wh = str(root / "train-wh")
    ingest(str(cat.catalog_path), source=SOURCE, mapping=dict(FIELD_MAP), warehouse_root=train_wh, media=False)
    train_jave(dataset=SOURCE, preset="tiny", epochs=1, batch_size=16, max_length=48, warehouse_root=train_wh,
               checkpoint_root=str(root / "ckpt"), use_image=False)  # fmt: skip
    ref_wh = str(root / "ref-wh")
    summary = _run(ref_wh, cat.catalog_path)
    yield {"root": root, "catalog": cat.catalog_path, "ref_wh": ref_wh, "summary": summary,
           "snapshot": _snapshot(ref_wh)}  # fmt: skip
    mp.undo()


def test_full_run_fills_every_table_and_is_tracked(base):
    import mlflow

    from warehouse.tables import Warehouse

    s = base["summary"]
    wh = Warehouse(base["ref_wh"])
    n = wh.read("products").num_rows
    assert n >= N_PRODUCTS * 0.9 and s["status"] == "succeeded"
    assert s["changed_since_watermark"] == n and s["watermark_from"] is None
    assert s["predicted_products"] == n == s["embedded"] and s["graph"] == "full"
    assert s["values_accepted"] + s["values_in_review"] == len(base["snapshot"]["predictions"]) > 0
    assert s["quarantined"] > 0 and s["quarantined_by_reason"], "the sample catalog plants bad rows"
    runs = wh.read("runs").to_pylist()
    assert len(runs) == 1 and runs[0]["status"] == "succeeded"
    assert runs[0]["stages_done"] == ["ingest", "featurize", "predict", "embed", "dedupe"]

    run = mlflow.get_run(s["mlflow_run_id"])
    assert mlflow.get_experiment(run.info.experiment_id).name == "nightly-enrichment"
    assert run.data.metrics["predict.products"] == n and run.data.metrics["embed.embedded"] == n
    # each stage's own peak memory, in the summary and as an MLflow metric
    assert all(s["peak_rss_mb"][st] > 50 for st in ("ingest", "featurize", "predict", "embed", "dedupe"))
    assert run.data.metrics["predict.peak_rss_mb"] == s["peak_rss_mb"]["predict"]
    assert run.data.tags["model.jave"] == s["models"]["jave"]
    assert run.data.tags["read.products"] == str(wh.version("products"))
    assert run.data.tags["wrote.attribute_predictions"] == f"-1->{wh.version('attribute_predictions')}"
    assert "api_key" not in json.dumps(run.data.params).lower()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(s["mlflow_run_id"])}
    assert {"lineage.json", "summary.md"} <= artifacts
    # the registered model is code + safetensors: loading it never unpickles anything
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/jave/{s['models']['jave']}"))
    files = {p.name for p in model_dir.rglob("*")}
    assert "python_model.pkl" not in files and "jave_model.py" in files and "best.safetensors" in files


def test_incremental_run_touches_only_changed_products(base, tmp_path):
    from warehouse.tables import Warehouse

    wh_root = str(tmp_path / "wh")
    shutil.copytree(base["ref_wh"], wh_root)
    catalog = _edited_catalog(base["catalog"], tmp_path / "catalog.jsonl", 2)  # 1% of the products (2 of 200)

    s = _run(wh_root, catalog)
    assert s["status"] == "succeeded" and s["watermark_from"] == base["summary"]["watermark_to"]
    assert s["changed_since_watermark"] == 2
    assert s["predicted_products"] == 2 and s["embedded"] == 2
    assert s["graph"].startswith("incremental (2 ")
    wh = Warehouse(wh_root)
    runs = sorted(wh.read("runs").to_pylist(), key=lambda r: r["started_at"])
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"]
    # unchanged products keep their predictions; nothing is duplicated
    preds = wh.read("attribute_predictions").to_pylist() + wh.read("review_queue").to_pylist()
    assert len({(p["prediction_id"]) for p in preds}) == len(preds)
    later = [r for r in wh.read("predicted_products").to_pylist() if r["predicted_at"] > runs[0]["finished_at"]]
    assert len(later) == 2

    again = _run(wh_root, catalog)  # nothing changed since
    assert again["changed_since_watermark"] == 0 and again["predicted_products"] == 0 and again["embedded"] == 0


def test_failed_run_resumes_without_redoing_or_duplicating(base, tmp_path, monkeypatch):
    import flows.enrich as enrich_mod
    from warehouse.tables import Warehouse

    wh_root = str(tmp_path / "wh")
    monkeypatch.setattr(enrich_mod, "COMMIT_SHARE", 1.0)  # commits every 64 products, however long one takes
    original = enrich_mod.write_predictions
    calls = {"n": 0}

    def dies_after_two_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("killed halfway through predict")
        return original(*args, **kwargs)

    monkeypatch.setattr(enrich_mod, "write_predictions", dies_after_two_batches)
    with pytest.raises(RuntimeError, match="killed halfway"):
        _run(wh_root, base["catalog"])
    wh = Warehouse(wh_root)
    (failed,) = wh.read("runs").to_pylist()
    assert failed["status"] == "failed" and failed["stages_done"] == ["ingest", "featurize"]
    assert wh.read("predicted_products").num_rows == 2 * 64

    monkeypatch.setattr(enrich_mod, "write_predictions", original)
    s = _run(wh_root, base["catalog"])
    (done,) = wh.read("runs").to_pylist()
    assert done["run_id"] == failed["run_id"] and done["status"] == "succeeded"
    n = wh.read("products").num_rows
    assert s["predicted_products"] == n - 2 * 64, "finished batches are not predicted again"
    _assert_same(_snapshot(wh_root), base["snapshot"])


def test_crash_between_appended_rows_and_state_leaves_no_duplicates(base, tmp_path, monkeypatch):
    """Never-predicted products have their rows appended, then their state written. A write that fails in between
    is retried by its task, which first deletes what the failed attempt appended; a run killed in between leaves
    rows with no state, which the next run deletes before predicting those products again."""
    import flows.enrich as enrich_mod
    from warehouse.tables import Warehouse

    monkeypatch.setattr(enrich_mod, "COMMIT_SHARE", 1.0)  # commits every 64 products, however long one takes
    original = Warehouse.append
    calls = {"n": 0}

    def fails_at_third_state(self, table, data):
        if table == "predicted_products":
            calls["n"] += 1
            if calls["n"] == 3 or (calls["n"] > 3 and calls["always"]):
                raise RuntimeError("killed between the rows and the state")
        return original(self, table, data)

    monkeypatch.setattr(Warehouse, "append", fails_at_third_state)
    calls["always"] = False  # one failed attempt: the task's retry completes the run
    s = _run(str(tmp_path / "retried"), base["catalog"])
    assert calls["n"] > 3 and s["status"] == "succeeded"
    _assert_same(_snapshot(str(tmp_path / "retried")), base["snapshot"])

    calls.update(n=0, always=True)  # the process dies: no retry
    monkeypatch.setattr(enrich_mod, "write_predictions", enrich_mod.write_predictions.with_options(retries=0))
    wh_root = str(tmp_path / "wh")
    with pytest.raises(RuntimeError, match="between the rows and the state"):
        _run(wh_root, base["catalog"])
    wh = Warehouse(wh_root)
    assert wh.read("predicted_products").num_rows == 2 * 64
    rows = {r["product_id"] for t in ("review_queue", "attribute_predictions") for r in wh.read(t).to_pylist()}
    stateless = rows - {r["product_id"] for r in wh.read("predicted_products").to_pylist()}
    assert 0 < len(stateless) <= 64, "the third group's rows were committed without their state"

    monkeypatch.setattr(Warehouse, "append", original)
    s = _run(wh_root, base["catalog"])
    assert s["predicted_products"] == wh.read("products").num_rows - 2 * 64
    _assert_same(_snapshot(wh_root), base["snapshot"])


@pytest.mark.parametrize("stage", ["predict", "embed"])
def test_rerun_killed_mid_stage_leaves_each_product_its_current_rows(stage, base, tmp_path, monkeypatch):
    """A rerun appends the new rows of re-predicted / re-embedded products and deletes their old rows when the stage
    ends. Killed after some commits, it leaves both side by side; the next run deletes the old ones first, and ends
    with the tables a rerun that was never killed writes. A write that fails once is retried by its task, which first
    deletes what the failed attempt appended (the old rows stay: they are deleted at the end)."""
    import flows.enrich as enrich_mod
    from warehouse.tables import Warehouse

    monkeypatch.setattr(enrich_mod, "COMMIT_SHARE", 1.0)  # commits every 64 products, however long one takes
    catalog = _edited_catalog(base["catalog"], tmp_path / "catalog.jsonl", 150)
    clean = str(tmp_path / "clean")
    shutil.copytree(base["ref_wh"], clean)
    s = _run(clean, catalog)
    assert s["predicted_products"] == s["embedded"] > 2 * 64, "three commit groups (some edited rows are invalid)"
    expected = _snapshot(clean)
    assert expected["predictions"] != base["snapshot"]["predictions"], "the edits change the predictions"

    wh_root = str(tmp_path / "wh")
    shutil.copytree(base["ref_wh"], wh_root)
    table = {"predict": "attribute_predictions", "embed": "embeddings"}[stage]
    original, calls = Warehouse.append, {"n": 0}

    def dies_at_third_commit(self, name, data):
        if name == table:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError(f"killed mid-{stage}")
        return original(self, name, data)

    monkeypatch.setattr(Warehouse, "append", dies_at_third_commit)
    if stage == "predict":  # first, one failed attempt that the task's retry completes
        retried = str(tmp_path / "retried")
        shutil.copytree(base["ref_wh"], retried)
        s = _run(retried, catalog)
        assert calls["n"] > 3 and s["status"] == "succeeded"
        _assert_same(_snapshot(retried), expected)
        calls["n"] = 0
    monkeypatch.setattr(enrich_mod, "write_predictions", enrich_mod.write_predictions.with_options(retries=0))
    with pytest.raises(RuntimeError, match=f"killed mid-{stage}"):
        _run(wh_root, catalog)
    wh = Warehouse(wh_root)
    assert wh.read_bytes(f"_state/{stage}-superseded.json") is not None
    if stage == "predict":
        preds = wh.read("attribute_predictions").to_pylist() + wh.read("review_queue").to_pylist()
        assert len({p["prediction_id"] for p in preds}) < len(preds), "old and new rows side by side"
    else:
        ids = wh.read("embeddings", columns=["product_id"]).column(0).to_pylist()
        assert 0 < len(ids) - len(set(ids)) < s["embedded"], "the committed groups' old vectors are still there"

    monkeypatch.setattr(Warehouse, "append", original)
    s = _run(wh_root, catalog)
    assert s["status"] == "succeeded"
    assert wh.read_bytes(f"_state/{stage}-superseded.json") is None
    _assert_same(_snapshot(wh_root), expected)
    preds = wh.read("attribute_predictions").to_pylist() + wh.read("review_queue").to_pylist()
    assert len({p["prediction_id"] for p in preds}) == len(preds)
    ids = wh.read("embeddings", columns=["product_id"]).column(0).to_pylist()
    assert len(set(ids)) == len(ids)


def test_one_nightly_at_a_time(base, tmp_path):
    from flows.nightly import NightlyBusy, nightly_lock
    from warehouse.tables import Warehouse

    wh_root = str(tmp_path / "wh")
    wh = Warehouse(wh_root)
    held, release = threading.Event(), threading.Event()

    def other_run():
        with nightly_lock(wh, "file"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=other_run)
    t.start()
    assert held.wait(10)
    with pytest.raises(NightlyBusy, match=r"another run \(nightly, enrich or dedupe\) holds"):
        _run(wh_root, base["catalog"], wait_s=0.5)
    assert not wh.exists("runs") and not wh.exists("products"), "a run that could not start writes nothing"

    threading.Timer(2.0, release.set).start()
    started = time.perf_counter()
    s = _run(wh_root, base["catalog"], wait_s=60)  # waits for the other run, then does the work
    t.join()
    assert time.perf_counter() - started >= 1.5 and s["status"] == "succeeded"


def test_prefect_concurrency_lock(base, tmp_path):
    from flows.nightly import NightlyBusy, nightly_lock
    from warehouse.tables import Warehouse

    wh = Warehouse(str(tmp_path / "wh"))
    with nightly_lock(wh, "prefect", lease_s=60):
        busy = pytest.raises(NightlyBusy, match="concurrency limit")
        with busy, nightly_lock(wh, "prefect", wait_s=1):
            pass
    with nightly_lock(wh, "prefect", wait_s=5) as held:  # released: the next run gets it
        assert "enrich-nightly" in held


def test_dask_runner_gives_the_same_tables(base, tmp_path):
    wh_root = str(tmp_path / "wh")
    s = _run(wh_root, base["catalog"], runner="dask", dask_workers=2)
    assert s["status"] == "succeeded" and s["predicted_products"] == base["summary"]["predicted_products"]
    _assert_same(_snapshot(wh_root), base["snapshot"])


def test_no_champion_fails_fast(base, tmp_path, monkeypatch):
    from warehouse.tables import Warehouse

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/empty.db")
    wh_root = str(tmp_path / "wh")
    with pytest.raises(LookupError, match=r"enrich train jave.*--train-if-missing"):
        _run(wh_root, base["catalog"])
    assert not Warehouse(wh_root).exists("runs") and not Warehouse(wh_root).exists("products")


def test_nightly_on_s3_gives_the_same_tables(base, moto_s3, monkeypatch):
    """The warehouse on S3 (a local moto server): same tables as on local disk; the lock is Prefect's there."""
    client, endpoint = moto_s3
    client.create_bucket(Bucket="lake")
    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    monkeypatch.setenv("ENRICH_STORAGE_OPTIONS", json.dumps(options))
    s = _run("s3://lake/wh", base["catalog"])
    assert s["status"] == "succeeded" and s["warehouse"] == "s3://lake/wh"
    _assert_same(_snapshot("s3://lake/wh"), base["snapshot"])
    keys = {o["Key"].split("/")[1] for o in client.list_objects_v2(Bucket="lake")["Contents"]}
    assert {"products", "runs", "attribute_predictions", "embeddings", "duplicates"} <= keys
    markers = [o["Key"] for o in client.list_objects_v2(Bucket="lake", Prefix="wh/_state/").get("Contents", [])]
    assert markers == [], "each stage removes its marker once its old rows are deleted"


KILLED_RUN = """
import sys, time
import flows.enrich as enrich_mod
enrich_mod.COMMIT_SHARE = 1.0  # commits every 64 products, however long one takes
original, calls = enrich_mod.write_predictions, []
def hangs_after_two_batches(*args, **kwargs):
    calls.append(1)
    if len(calls) > 2:
        time.sleep(600)  # the parent SIGKILLs us here, lock held, halfway through predict
    return original(*args, **kwargs)
enrich_mod.write_predictions = hangs_after_two_batches
from flows.nightly import nightly
from warehouse.sample_catalog import FIELD_MAP
nightly(catalog=sys.argv[1], source="catalog", mapping=dict(FIELD_MAP), media=False, warehouse_root=sys.argv[2],
        dedupe_method="text", threshold=0.9, batch_size=64, commit_rows=64)
"""


def test_sigkilled_run_resumes(base, tmp_path):
    """A real kill -9 in the middle of predict: the kernel drops the lock, the next run resumes the same run."""
    import os
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from warehouse.tables import Warehouse

    wh_root = str(tmp_path / "wh")
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())  # the test's Prefect API, no second server
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(base["catalog"]), wh_root], env=env,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    wh = Warehouse(wh_root)
    deadline = time.monotonic() + 300
    while not (wh.exists("predicted_products") and wh.read("predicted_products").num_rows >= 2 * 64):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    (killed,) = wh.read("runs").to_pylist()
    assert killed["status"] == "running" and killed["stages_done"] == ["ingest", "featurize"]

    s = _run(wh_root, base["catalog"])  # no wait: the dead run's lock is gone
    (done,) = wh.read("runs").to_pylist()
    assert done["run_id"] == killed["run_id"] and done["status"] == "succeeded"
    assert s["predicted_products"] == wh.read("products").num_rows - 2 * 64
    _assert_same(_snapshot(wh_root), base["snapshot"])


def test_train_if_missing_trains_then_runs(base, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/fresh.db")
    train = {"jave": {"preset": "tiny", "epochs": 1, "batch_size": 16, "max_length": 48, "use_image": False,
                      "warehouse_root": str(tmp_path / "wh"), "checkpoint_root": str(tmp_path / "ckpt")}}  # fmt: skip
    s = _run(str(tmp_path / "wh"), base["catalog"], train_if_missing=True, train=train)
    assert s["status"] == "succeeded" and s["models"]["jave"] == "1"
    assert str(mlflow.MlflowClient().get_model_version_by_alias("jave", "champion").version) == "1"
    from warehouse.tables import Warehouse

    (run,) = Warehouse(str(tmp_path / "wh")).read("runs").to_pylist()
    ingest = json.loads(run["stats"])["ingest"]
    assert ingest["new"] == ingest["changed"] == 0 < ingest["unchanged"], "ingested for training, then unchanged"


def test_mlflow_ui_serves_the_nightly_runs(base):
    """The nightly experiment as an ML engineer sees it: `mlflow server` on loopback, over HTTP, no browser."""
    import os

    from conftest import http_json, mlflow_server

    with mlflow_server(os.environ["MLFLOW_TRACKING_URI"]) as url:
        exp = http_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=nightly-enrichment")
        runs = http_json(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]]})
        ids = {r["info"]["run_id"] for r in runs["runs"]}
        assert base["summary"]["mlflow_run_id"] in ids
        jave = http_json(f"{url}/api/2.0/mlflow/registered-models/get?name=jave")["registered_model"]
        assert any(a["alias"] == "champion" for a in jave.get("aliases", []))


def test_nightly_with_the_pair_matcher_decides_and_rescores_nothing_unchanged(base, tmp_path):
    """``dedupe_matcher``: the nightly's top-k pairs are decided by ``pair-matcher`` (method ``matcher``, its version
    in the run's models), scores are kept in ``pair_scores``, and a rerun over an unchanged catalog scores none."""
    import pyarrow as pa

    from flows.train_matcher import train_matcher
    from warehouse.tables import Warehouse

    wh_root = str(tmp_path / "wh")
    shutil.copytree(base["ref_wh"], wh_root)
    wh = Warehouse(wh_root)
    # labelled pairs from the reference run: its duplicates as matches, products of other clusters as non-matches
    dups = [(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()]
    assert len(dups) >= 6, "the generated catalog should have duplicates for this test"
    ids = sorted(r["product_id"] for r in wh.read("products", columns=["product_id"]).to_pylist())
    linked = {x for p in dups for x in p}
    loners = [i for i in ids if i not in linked]
    labelled = [(a, b, 1) for a, b in dups] + [(a, loners[i], 0) for i, (a, _) in enumerate(dups)]
    labelled += [(loners[2 * i + 1], loners[2 * i + 2], 0) for i in range(len(dups))]
    splits = ["train", "valid", "test"]
    wh.append("pairs", pa.Table.from_pylist([
        {"benchmark": "nightly-toy", "split": splits[i % 3], "line": i + 1, "left_id": a, "right_id": b, "label": y}
        for i, (a, b, y) in enumerate(labelled)
    ]))  # fmt: skip
    trained = train_matcher(benchmark="nightly-toy", tower="none", max_iter=20, warehouse_root=wh_root)
    assert trained["model_version"] == "1"

    wh = Warehouse(str(tmp_path / "nightly-wh"))  # a fresh warehouse: its first nightly dedupes everything
    s = _run(str(wh.root), base["catalog"], dedupe_matcher="champion")
    assert s["status"] == "succeeded"
    run = sorted(wh.read("runs").to_pylist(), key=lambda r: r["started_at"])[-1]
    assert json.loads(run["models"])["pair-matcher"] == "1"
    found = wh.read("duplicates").to_pylist()
    assert found and {r["method"] for r in found} == {"matcher"}
    assert {r["model_version"].rsplit("+", 1)[1] for r in found} == {"pair-matcher/1"}
    scored = wh.read("pair_scores").num_rows
    assert scored >= len(found)

    again = _run(str(wh.root), base["catalog"], dedupe_matcher="champion")  # nothing changed: none is scored again
    assert again["status"] == "succeeded"
    assert wh.read("pair_scores").num_rows == scored
    pairs = sorted((r["a"], r["b"]) for r in wh.read("duplicates").to_pylist())
    assert pairs == sorted((r["a"], r["b"]) for r in found)


def test_stage_peak_memory_is_the_stages_own():
    """The high-water mark resets per stage: a stage after a large allocation reports its own, smaller peak."""
    import numpy as np

    from flows.nightly import _peak_rss_mb

    big = np.ones(400 * 2**20 // 8)  # 400 MB, touched
    first = _peak_rss_mb(reset=True)
    del big
    _peak_rss_mb(reset=True)
    quiet = _peak_rss_mb()
    again = np.ones(200 * 2**20 // 8)
    loud = _peak_rss_mb()
    del again
    assert first - quiet > 300, (first, quiet)
    assert 150 < loud - quiet < 260, (quiet, loud)
