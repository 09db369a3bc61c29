"""The dedupe flow on a generated catalog: known near-duplicates are found and clustered; an incremental run equals
a full recompute; `enrich similar` ranks the duplicate first."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner


def test_dedupe_finds_known_duplicates_incrementally(tmp_path, prefect_harness):
    from features.similarity import knn_graph
    from flows.cli import app
    from flows.dedupe import _stored_graph, dedupe
    from flows.ingest import ingest
    from warehouse.sample_catalog import FIELD_MAP, generate
    from warehouse.tables import Warehouse

    cat = generate(tmp_path / "demo", n_products=200, seed=3, n_videos=1)
    wh_root = str(tmp_path / "wh")
    ingest(str(cat.catalog_path), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False)
    wh = Warehouse(wh_root)
    truth = [tuple(sorted((r["sku_a"], r["sku_b"]))) for r in csv.DictReader(cat.duplicates_truth_path.open())]
    assert truth

    s = dedupe(warehouse_root=wh_root, method="text", threshold=0.9)
    graph = {r["product_id"]: set(r["neighbors"]) for r in wh.read("knn_graph").to_pylist()}
    assert all(b in graph[a] or a in graph[b] for a, b in truth), "blocking: every planted pair is a candidate"
    found = {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()}
    hits = [t for t in truth if t in found]
    assert len(hits) >= 0.75 * len(truth), f"only {len(hits)} of {len(truth)} planted pairs over the threshold"
    clusters = {r["product_id"]: r["cluster_id"] for r in wh.read("clusters").to_pylist()}
    assert all(clusters[a] == clusters[b] for a, b in hits)
    assert s["largest_cluster"] <= 50 and s["graph"] == "full"

    # change two products, add one: the incremental run re-embeds only those and ends where a full run ends
    rows = [json.loads(line) for line in cat.catalog_path.read_bytes().splitlines()[:5] if line.startswith(b"{")]
    rows = [r for r in rows if isinstance(r.get("sku"), str) and isinstance(r.get("name"), str)][:2]
    rows[0]["name"] += " (2026 edition)"
    rows[1]["description"] = "Completely rewritten description."
    rows.append(dict(rows[1], sku="NEW-1", name=rows[1]["name"].upper()))
    delta = tmp_path / "delta.jsonl"
    delta.write_text("\n".join(json.dumps(r) for r in rows))
    ingest(str(delta), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False)
    inc = dedupe(warehouse_root=wh_root, method="text", threshold=0.9)
    assert inc["embedded"] == 3 and inc["graph"].startswith("incremental")
    inc_pairs = {(r["a"], r["b"]): r["score"] for r in wh.read("duplicates").to_pylist()}
    inc_clusters = {r["product_id"]: r["cluster_id"] for r in wh.read("clusters").to_pylist()}
    full = dedupe(warehouse_root=wh_root, method="text", threshold=0.9, full=True)
    full_pairs = {(r["a"], r["b"]): r["score"] for r in wh.read("duplicates").to_pylist()}
    assert set(inc_pairs) == set(full_pairs) and full["embedded"] == full["products"]
    assert inc_clusters == {r["product_id"]: r["cluster_id"] for r in wh.read("clusters").to_pylist()}
    assert (rows[1]["sku"], "NEW-1") in full_pairs or ("NEW-1", rows[1]["sku"]) in full_pairs

    # int8 embedder: recorded as another version, so everything is re-embedded once, then incremental again
    q = dedupe(warehouse_root=wh_root, method="text", threshold=0.9, precision="int8")
    assert q["model"] == "minilm-pretrained/0+int8" and q["embedded"] == q["products"]
    found8 = {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()}
    assert len([t for t in truth if t in found8]) >= 0.75 * len(truth)
    assert dedupe(warehouse_root=wh_root, method="text", threshold=0.9, precision="int8")["embedded"] == 0

    # beyond exact_max: IVF with nprobe tuned to the target recall, for the full graph and for incremental updates
    exact = {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()}
    ivf = dedupe(warehouse_root=wh_root, method="text", threshold=0.9, precision="int8", exact_max=50, full=True)
    assert ivf["ann_nprobe"] >= 1 and ivf["ann_recall_at_k"] >= 0.99
    assert {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()} == exact
    ingest(str(delta), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False)  # same rows: nothing changes
    rows[0]["name"] += " (refurbished)"
    delta.write_text(json.dumps(rows[0]))
    ingest(str(delta), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False)
    # the IVF build's cells are kept with the graph (each product's cell, the centroids as safetensors): the update
    # searches the changed vector in those cells, with no index built and no (N, C) product
    stored = wh.read("knn_graph").to_pylist()
    assert {r["ivf_centroids"] for r in stored} == {f"_models/ivf-cells/{ivf['run_id']}.safetensors"}
    assert wh.read_bytes(stored[0]["ivf_centroids"]) and None not in {r["ivf_cell"] for r in stored}
    inc = dedupe(warehouse_root=wh_root, method="text", threshold=0.9, precision="int8", exact_max=50)
    assert inc["graph"].startswith("incremental (1 re-searched in ") and inc["ann_recall_at_k"] is None
    assert {r["ivf_centroids"] for r in wh.read("knn_graph").to_pylist()} == {stored[0]["ivf_centroids"]}
    inc_pairs = {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()}
    emb = [r for r in wh.read("embeddings").to_pylist() if r["model_version"].endswith("+int8")]
    emb_ids, emb_x = np.array([r["product_id"] for r in emb]), np.array([r["vector"] for r in emb], np.float32)
    graph, _, _ = _stored_graph(wh, inc["model"])
    row = {p: i for i, p in enumerate(emb_ids.tolist())}
    fa, fb, fs = knn_graph(graph.ids, emb_x[[row[p] for p in graph.ids]], 15, index=graph.cells).top(10).pairs()
    assert inc_pairs == {(x, y) for x, y, z in zip(fa, fb, fs, strict=True) if z >= 0.9}  # a search in the cells
    fa, fb, fs = knn_graph(emb_ids, emb_x, 10).pairs()  # ... which here finds what exact search finds
    assert inc_pairs == {(x, y) for x, y, z in zip(fa, fb, fs, strict=True) if z >= 0.9}

    # lists are stored k + k/2 deep (a list that lost a neighbour to the change may hold fewer, never under k):
    # a smaller k is served from them, a larger one builds the graph again
    depths = {len(r["neighbors"]) for r in wh.read("knn_graph").to_pylist()}
    assert 15 in depths and depths <= set(range(10, 16))
    k5 = dedupe(warehouse_root=wh_root, method="text", threshold=0.9, precision="int8", k=5)
    assert k5["graph"].startswith("incremental") and {
        len(r["neighbors"]) for r in wh.read("knn_graph").to_pylist()
    } == {7}
    fa, fb, fs = knn_graph(np.array([r["product_id"] for r in emb]), np.array([r["vector"] for r in emb]), 5).pairs()
    assert {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()} == {
        (x, y) for x, y, z in zip(fa, fb, fs, strict=True) if z >= 0.9
    }
    cells_dir = tmp_path / "wh" / "_models" / "ivf-cells"
    assert [f.name for f in cells_dir.iterdir()] == [f"{ivf['run_id']}.safetensors"]  # one build, one file
    k12 = dedupe(warehouse_root=wh_root, method="text", threshold=0.9, precision="int8", k=12)
    assert k12["graph"] == "full" and {len(r["neighbors"]) for r in wh.read("knn_graph").to_pylist()} == {18}
    assert not list(cells_dir.iterdir())  # an exact build: the last IVF build's centroids are deleted

    a, b = hits[0]
    out = CliRunner().invoke(app, ["similar", a, "-w", wh_root, "--k", "3"])
    assert out.exit_code == 0, out.output
    assert b in out.output


def test_dedupe_with_char_ngram_sketches_fits_once_and_stays_incremental(tmp_path, prefect_harness):
    from flows.dedupe import CHAR_NGRAMS, dedupe
    from flows.ingest import ingest
    from warehouse.sample_catalog import FIELD_MAP, generate
    from warehouse.tables import Warehouse

    cat = generate(tmp_path / "demo", n_products=200, seed=3)
    wh_root = str(tmp_path / "wh")
    ingest(str(cat.catalog_path), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False)
    wh = Warehouse(wh_root)
    truth = [tuple(sorted((r["sku_a"], r["sku_b"]))) for r in csv.DictReader(cat.duplicates_truth_path.open())]

    s = dedupe(warehouse_root=wh_root, method="chars", threshold=0.8)
    version = s["model"].split("/", 1)[1]
    n = wh.read("products").num_rows
    assert s["model"].startswith(f"{CHAR_NGRAMS}/wb3-5-") and s["embedded"] == s["products"] == n
    pointer = json.loads(wh.read_bytes(f"_models/{CHAR_NGRAMS}/_all.json"))
    assert pointer["version"] == version and pointer["fitted_on"] == n and wh.read_bytes(pointer["path"])
    graph = {r["product_id"]: set(r["neighbors"]) for r in wh.read("knn_graph").to_pylist()}
    assert all(b in graph[a] or a in graph[b] for a, b in truth), "blocking: every planted pair is a candidate"
    found = {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()}
    assert len([t for t in truth if t in found]) >= 0.5 * len(truth)

    # new and changed products: embedded with the stored IDF (same version), and only they are
    rows = [json.loads(line) for line in cat.catalog_path.read_bytes().splitlines()[:5] if line.startswith(b"{")]
    rows = [r for r in rows if isinstance(r.get("sku"), str) and isinstance(r.get("name"), str)][:2]
    rows[0]["name"] += " (2026 edition)"
    rows.append(dict(rows[1], sku="NEW-1", name=rows[1]["name"].upper()))
    delta = tmp_path / "delta.jsonl"
    delta.write_text("\n".join(json.dumps(r) for r in [rows[0], rows[2]]))
    ingest(str(delta), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False)
    inc = dedupe(warehouse_root=wh_root, method="chars", threshold=0.8)
    assert inc["model"] == s["model"] and inc["embedded"] == 2 and inc["graph"].startswith("incremental")
    inc_pairs = {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()}
    # an unchanged product whose stored vector went missing is embedded again; its graph list still holds, and the
    # update gathers the graph's vectors from both sources (StoredVectors.stack, not the stored rows alone)
    victim = next(p for p in sorted(graph) if p != rows[0]["sku"])
    wh.delete_where("embeddings", "product_id", [victim])
    again = dedupe(warehouse_root=wh_root, method="chars", threshold=0.8)
    assert again["embedded"] == 1 and again["graph"] == "incremental (0 re-searched)"
    assert {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()} == inc_pairs
    full = dedupe(warehouse_root=wh_root, method="chars", threshold=0.8, full=True)
    assert {(r["a"], r["b"]) for r in wh.read("duplicates").to_pylist()} == inc_pairs and full["model"] == s["model"]
    assert (rows[1]["sku"], "NEW-1") in inc_pairs or ("NEW-1", rows[1]["sku"]) in inc_pairs

    # refit on today's catalog (one more product): a new version, so every product is embedded again
    again = dedupe(warehouse_root=wh_root, method="chars", threshold=0.8, refit=True)
    assert again["model"] != s["model"] and again["embedded"] == again["products"] == n + 1
    assert json.loads(wh.read_bytes(f"_models/{CHAR_NGRAMS}/_all.json"))["fitted_on"] == n + 1


def test_stored_vectors_stack_in_order_and_prefer_this_runs_vectors():
    from flows.dedupe import StoredVectors

    base = np.arange(12, dtype=np.float32).reshape(4, 3)
    store = StoredVectors(["a", "b", "c", "d"], base)
    store.add(["e"], np.full((1, 3), 7, np.float32))
    store.add(["b", "f"], np.array([[-1, -1, -1], [9, 9, 9]], np.float32))  # b re-embedded in this run
    got = store.stack(["f", "a", "b", "e", "d"])
    assert got.dtype == np.float32 and got.shape == (5, 3)
    np.testing.assert_array_equal(got, [[9, 9, 9], [0, 1, 2], [-1, -1, -1], [7, 7, 7], [9, 10, 11]])
    np.testing.assert_array_equal(store["b"], [-1, -1, -1])
    assert len(store) == 6 and set(store) == set("abcdef") and "z" not in store
    np.testing.assert_array_equal(store.stack(["a", "z"], missing="zeros"), [[0, 1, 2], [0, 0, 0]])
    with pytest.raises(KeyError, match=r"1 products have no vector \(first: \['z'\]\)"):
        store.stack(["a", "z"])
    assert store.stack([]).shape == (0, 3)


def test_stored_vectors_of_a_full_run_fill_one_matrix_and_stack_without_a_copy():
    from flows.dedupe import StoredVectors

    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    ids = [f"p{i}" for i in range(10)]
    for capacity in (10, 0):  # the run's size known (the embed stage), or not: the matrix grows by doubling
        store = StoredVectors([], np.zeros((0, 0), np.float32), capacity=capacity)
        for lo in range(0, 10, 3):
            store.add(ids[lo : lo + 3], x[lo : lo + 3])
        got = store.stack(ids)  # every vector, in the order added: the matrix itself
        np.testing.assert_array_equal(got, x)
        assert np.shares_memory(got, store.stack(ids)) and store.dim == 3 and len(store) == 10
        other = store.stack(ids[::-1])  # any other order is a copy
        np.testing.assert_array_equal(other, x[::-1])
        assert not np.shares_memory(other, got)
        np.testing.assert_array_equal(store["p4"], x[4])
    store.release()  # the dedupe flow's update drops them once its graph holds its own copy
    assert len(store) == 0 and "p4" not in store and store.dim == 0


def test_stored_vectors_reference_rows_of_a_read_matrix():
    import pyarrow as pa

    from flows.dedupe import StoredVectors, _vector_matrix

    read = np.arange(15, dtype=np.float32).reshape(5, 3)  # rows 1 and 3 are stale: not referenced
    store = StoredVectors(["a", "c", "e"], read, rows=[0, 2, 4])
    store.add(["c"], np.full((1, 3), -1, np.float32))  # c embedded again in this run
    np.testing.assert_array_equal(store.stack(["e", "a", "c"]), [[12, 13, 14], [0, 1, 2], [-1, -1, -1]])
    matrix, rows = store.stored_rows(["e", "a", "c", "z"])
    assert matrix is read and rows.tolist() == [4, 0, -1, -1]  # c's stored vector is stale; z has none
    # the vector column is filled chunk by chunk: several chunks give one matrix in order
    column = pa.chunked_array([pa.array([[1.0, 2.0]], pa.list_(pa.float32())),
                               pa.array([[3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32()))])  # fmt: skip
    np.testing.assert_array_equal(_vector_matrix(column), [[1, 2], [3, 4], [5, 6]])
    with pytest.raises(ValueError, match=r"lengths \[1, 2\]"):
        _vector_matrix(pa.chunked_array([pa.array([[1.0], [2.0, 3.0]], pa.list_(pa.float32()))]))


def test_stored_graph_without_ivf_cells_or_with_its_centroids_gone_updates_exactly(tmp_path):
    import pyarrow as pa
    from deltalake import write_deltalake

    from features.similarity import IvfCells
    from flows.dedupe import _save_cells, _stored_graph
    from warehouse.tables import Warehouse

    wh = Warehouse(str(tmp_path / "wh"))
    old = pa.table({"product_id": ["a", "b"], "neighbors": [["b"], ["a"]], "scores": [[0.5], [0.5]],
                    "model_version": ["m/1", "m/1"], "content_hash": ["h1", "h2"]})  # fmt: skip
    write_deltalake(wh.uri("knn_graph"), old)  # a warehouse written before graphs kept their cells
    graph, hashes, ref = _stored_graph(wh, "m/1")
    assert graph.cells is None and ref is None and hashes == {"a": "h1", "b": "h2"}
    assert graph.neighbors.tolist() == [[1], [0]]

    cells = IvfCells(np.eye(2, 4, dtype=np.float32), np.array([0, 1], np.int32), 1)
    ref = _save_cells(wh, cells, "run1")
    wh.overwrite("knn_graph", old.append_column("ivf_cell", pa.array([0, 1], pa.int32())).append_column(
        "ivf_centroids", pa.array([ref, ref])))  # fmt: skip
    graph, _, got = _stored_graph(wh, "m/1")
    assert got == ref and graph.cells.nprobe == 1 and graph.cells.cell.tolist() == [0, 1]
    np.testing.assert_array_equal(graph.cells.centroids, cells.centroids)
    (tmp_path / "wh" / ref).unlink()  # the centroids file deleted: the graph is updated exactly
    graph, _, got = _stored_graph(wh, "m/1")
    assert graph.cells is None and got is None


def test_similar_ranks_within_one_model_version(tmp_path, prefect_harness):
    """``similar`` compares a product only with vectors of the model version that embedded it last (or of the model
    asked for); vectors of another model live in another space. A product without an embedding is a clear error."""
    from datetime import UTC, datetime, timedelta

    import pyarrow as pa

    from flows.dedupe import similar
    from flows.ingest import ingest
    from warehouse import schema
    from warehouse.sample_catalog import FIELD_MAP, generate
    from warehouse.tables import Warehouse

    cat = generate(tmp_path / "demo", n_products=30, seed=5)
    wh_root = str(tmp_path / "wh")
    ingest(str(cat.catalog_path), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False)
    wh = Warehouse(wh_root)
    pids = sorted(wh.read("products").column("product_id").to_pylist())[:4]
    p0, p1, p2, p3 = pids
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    # model "old": p1 is p0's twin; model "new" (embedded later): p2 is, and p1 points the other way
    vecs = {"old": {p0: [1, 0, 0], p1: [1, 0.01, 0], p2: [0, 1, 0], p3: [0, 0, 1]},
            "new": {p0: [1, 0, 0], p1: [-1, 0, 0], p2: [1, 0.01, 0], p3: [0, 1, 0]}}  # fmt: skip
    for i, (name, by_pid) in enumerate(vecs.items()):
        rows = [{"product_id": p, "vector": np.asarray(v, np.float32) / np.linalg.norm(v), "content_hash": "h",
                 "model_name": name, "model_version": "1", "mlflow_run_id": None,
                 "embedded_at": t0 + timedelta(days=i)} for p, v in by_pid.items()]  # fmt: skip
        wh.append("embeddings", pa.Table.from_pylist(rows, schema=schema.EMBEDDINGS))
    got = similar(p0, k=2, warehouse_root=wh_root)
    assert got.column("product_id").to_pylist() == [p2, p3] and set(got.column("model").to_pylist()) == {"new/1"}
    assert got.column("score").to_pylist()[0] > 0.99 and all(got.column("title").to_pylist())
    old = similar(p0, k=5, warehouse_root=wh_root, method="old")
    assert old.column("product_id").to_pylist()[0] == p1 and len(old) == 3, "only model old's 4 vectors, self out"
    with pytest.raises(LookupError, match="has no embedding by model 'other'"):
        similar(p0, warehouse_root=wh_root, method="other")
    with pytest.raises(LookupError, match="'nope' has no embedding"):
        similar("nope", warehouse_root=wh_root)
