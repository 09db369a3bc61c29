"""Prefect flow ``dedupe``: product embeddings -> faiss top-k graph -> scored pairs -> duplicates and clusters.

Per run:

1. embed the products that are new or changed (content hash) or not yet embedded by this model version; the
   others keep their vectors (Delta table ``embeddings``);
2. the top-k neighbour graph (``knn_graph``): built once, then updated incrementally — only new/changed products
   (and old ones whose list held a changed product) are searched against the index; every other list only checks
   whether a new vector enters it (``features.similarity.update_graph``, equal to a full recompute with an exact
   index). Exact inner product up to ``exact_max`` products, IVF beyond, with its recall against exact measured on
   a sample and reported;
3. pairs scoring at least the threshold (chosen on labelled validation pairs when the warehouse has them for this
   source, else the given one) -> ``duplicates``; connected components with a cap against giant chained clusters
   -> ``clusters`` (both derived from the graph and rewritten in one commit each).

Embedding methods: ``encoder`` (``product-encoder@champion``) or ``text`` (the pretrained all-MiniLM-L6-v2 text
tower, mean-pooled: no training needed, a strong baseline for titles).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import reports
from warehouse import schema
from warehouse.tables import Warehouse

PRETRAINED_TEXT = "minilm-pretrained"


class Embedder:
    """rows -> (N, D) float32 L2-normalised, with the name / version / run recorded on every row it produces."""

    def __init__(self, method: str, model_version: str | None = None):
        if method == "text":
            from features.towers import TextTower, TextTowerConfig

            self.tower = TextTower(TextTowerConfig(max_length=128)).eval()
            self.name, self.version, self.run_id = PRETRAINED_TEXT, "0", None
        elif method == "encoder":
            from flows.train_encoder import load_encoder

            self.model, self.version, self.run_id = load_encoder(model_version)
            self.name = "product-encoder"
        else:
            raise ValueError(f"unknown embedding method {method!r}; use 'encoder' or 'text'")
        self.method = method

    def __call__(self, rows: list[dict[str, Any]], batch_size: int = 64) -> np.ndarray:
        import torch

        with torch.no_grad():
            if self.method == "text":
                from features.matcher import serialize

                chunks = [self.tower.embed([serialize(r) for r in rows[i : i + batch_size]]).numpy()
                          for i in range(0, len(rows), batch_size)]  # fmt: skip
                return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 384), np.float32)
            from features.encoder import encode_products

            return encode_products(self.model, rows, batch_size=batch_size)


def _products(wh: Warehouse, source: str | None) -> pa.Table:
    where = "WHERE source = '" + source.replace("'", "''") + "'" if source else ""
    return wh.sql(
        f"SELECT product_id, title, description, category, specs, content_hash FROM products {where} ORDER BY 1"
    )


def _threshold(wh: Warehouse, source: str | None, ids: np.ndarray, vectors: np.ndarray, default: float):
    """(threshold, how it was chosen): F1-optimal on labelled validation pairs of this source when there are some."""
    if not wh.exists("pairs"):
        return default, "given"
    pairs = wh.sql("SELECT left_id, right_id, label FROM pairs WHERE split LIKE 'valid%'").to_pylist()
    pos = {pid: i for i, pid in enumerate(ids.tolist())}
    pairs = [p for p in pairs if p["left_id"] in pos and p["right_id"] in pos]
    if len(pairs) < 20 or not any(p["label"] for p in pairs):
        return default, "given"
    from features.similarity import threshold_for_f1

    a = vectors[[pos[p["left_id"]] for p in pairs]]
    b = vectors[[pos[p["right_id"]] for p in pairs]]
    thr, f1 = threshold_for_f1((a * b).sum(1), np.array([p["label"] for p in pairs]))
    return float(thr), f"F1-optimal on {len(pairs)} labelled validation pairs (valid F1 {f1:.3f})"


@flow(name="dedupe")
def dedupe(
    warehouse_root: str | None = None,
    source: str | None = None,
    method: str = "encoder",
    model_version: str | None = None,
    k: int = 10,
    threshold: float = 0.9,
    exact_max: int = 200_000,
    max_cluster_size: int = 50,
    full: bool = False,
) -> dict[str, Any]:
    """Find duplicate products and cluster them; incremental unless ``full``."""
    from features.similarity import (
        NeighborGraph,
        build_index,
        cluster,
        cluster_size_distribution,
        knn_graph,
        recall_at_k,
        search,
        update_graph,
    )

    logger = get_run_logger()
    started = time.perf_counter()
    run_id = uuid.uuid4().hex
    now = datetime.now(UTC)
    wh = Warehouse(warehouse_root)
    embed = Embedder(method, model_version)
    products = _products(wh, source)
    if products.num_rows < 2:
        raise LookupError(f"need at least 2 products to dedupe (found {products.num_rows}); ingest a catalog first")
    ids = np.array(products.column("product_id").to_pylist(), dtype=object)
    hashes = dict(zip(ids.tolist(), products.column("content_hash").to_pylist(), strict=True))

    # 1. embeddings: reuse what this model version already embedded for the same content
    known: dict[str, np.ndarray] = {}
    if wh.exists("embeddings") and not full:
        old = wh.sql(
            "SELECT product_id, vector, content_hash FROM embeddings WHERE model_name = "
            f"'{embed.name}' AND model_version = '{embed.version}'"
        ).to_pylist()
        known = {r["product_id"]: np.asarray(r["vector"], np.float32) for r in old if hashes.get(r["product_id"]) ==
                 r["content_hash"]}  # fmt: skip
    todo = [i for i, pid in enumerate(ids.tolist()) if pid not in known]
    rows = products.take(pa.array(todo, pa.int64())).to_pylist() if todo else []
    for r in rows:
        r["images"], r["videos"], r["labels"] = [], [], []
    fresh = embed(rows) if rows else np.zeros((0, 1), np.float32)
    if rows:
        emb = pa.table({
            "product_id": [r["product_id"] for r in rows], "vector": list(fresh), "content_hash": [r["content_hash"]
            for r in rows], "model_name": [embed.name] * len(rows), "model_version": [embed.version] * len(rows),
            "mlflow_run_id": [embed.run_id] * len(rows), "embedded_at": [now] * len(rows)})  # fmt: skip
        wh.merge("embeddings", emb.cast(schema.EMBEDDINGS))
    for r, v in zip(rows, fresh, strict=True):
        known[r["product_id"]] = v
    vectors = np.stack([known[pid] for pid in ids.tolist()]).astype(np.float32)

    # 2. the top-k graph, incrementally when a graph of this model version exists
    changed_ids = np.array([r["product_id"] for r in rows], dtype=object)
    graph = None
    if wh.exists("knn_graph") and not full and len(ids) <= exact_max:
        g = wh.sql(f"SELECT * FROM knn_graph WHERE model_version = '{embed.name}/{embed.version}'").to_pylist()
        old_ids = [r["product_id"] for r in g]
        if g and set(old_ids) <= set(ids.tolist()) | set(changed_ids.tolist()):
            pos = {pid: i for i, pid in enumerate(old_ids)}
            kk = max(len(r["neighbors"]) for r in g)
            nb = np.full((len(g), kk), -1, np.int64)
            sc = np.full((len(g), kk), -np.inf, np.float32)
            for i, r in enumerate(g):
                nb[i, : len(r["neighbors"])] = [pos.get(n, -1) for n in r["neighbors"]]
                sc[i, : len(r["scores"])] = r["scores"]
            old_graph = NeighborGraph(ids=np.array(old_ids, dtype=object), neighbors=nb, scores=sc)
            old_vec = np.stack([known[pid] for pid in old_ids])
            removed = np.array(sorted(set(old_ids) - set(ids.tolist())), dtype=object)
            graph, gx = update_graph(old_graph, old_vec, changed_ids, np.stack([known[p] for p in changed_ids])
                                     if len(changed_ids) else np.zeros((0, vectors.shape[1]), np.float32),
                                     removed_ids=removed)  # fmt: skip
            order = {pid: i for i, pid in enumerate(graph.ids.tolist())}
            assert set(order) == set(ids.tolist())
            mode = f"incremental ({len(changed_ids)} re-embedded)"
    recall = None
    if graph is None:
        index = build_index(vectors, exact_max=exact_max)
        graph = knn_graph(ids, vectors, k, index=index)
        mode = "full"
        if len(ids) > exact_max:  # measure the approximate index against exact on a sample of queries
            import faiss

            sample = np.random.default_rng(0).choice(len(ids), size=min(2000, len(ids)), replace=False)
            exact = faiss.IndexFlatIP(vectors.shape[1])
            exact.add(vectors)
            _, e = exact.search(vectors[sample], k + 1)
            _, a = search(index, vectors[sample], k + 1)
            recall = recall_at_k(a, e)

    # 3. pairs over the threshold -> duplicates; guarded connected components -> clusters
    thr, thr_how = (threshold, "given")
    if source is not None or wh.exists("pairs"):
        thr, thr_how = _threshold(wh, source, ids, vectors, threshold)
    a, b, score = graph.pairs()
    keep = score >= thr
    a, b, score = a[keep], b[keep], score[keep]
    version = f"{embed.name}/{embed.version}"
    dup = pa.table({"a": a.tolist(), "b": b.tolist(), "score": score, "method": ["cosine"] * len(a),
                    "threshold": np.full(len(a), thr, np.float32), "model_version": [version] * len(a),
                    "run_id": [run_id] * len(a), "detected_at": [now] * len(a)})  # fmt: skip
    gids = graph.ids
    cl = cluster(a, b, gids, scores=score, max_cluster_size=max_cluster_size)
    first: dict[int, str] = {}
    for pid, c in sorted(zip(gids.tolist(), cl.tolist(), strict=True)):
        first.setdefault(c, pid)
    sizes = np.bincount(cl)
    clusters = pa.table({"product_id": gids.tolist(), "cluster_id": [first[c] for c in cl.tolist()],
                         "cluster_size": sizes[cl].astype(np.int32), "model_version": [version] * len(gids),
                         "run_id": [run_id] * len(gids)})  # fmt: skip
    nbr_ids = [[gids[j] for j in row if j >= 0] for row in graph.neighbors]
    nbr_sc = [[float(s) for s, j in zip(srow, row, strict=True) if j >= 0] for srow, row in
              zip(graph.scores, graph.neighbors, strict=True)]  # fmt: skip
    graph_t = pa.table({"product_id": gids.tolist(), "neighbors": nbr_ids, "scores": nbr_sc,
                        "model_version": [version] * len(gids)})  # fmt: skip
    wh.overwrite("knn_graph", graph_t)
    wh.overwrite("duplicates", dup)
    wh.overwrite("clusters", clusters)
    dist = cluster_size_distribution(cl)
    summary = {
        "products": int(len(ids)), "embedded": len(rows), "graph": mode, "k": k, "threshold": thr,
        "threshold_from": thr_how, "duplicate_pairs": int(len(a)), "clusters": dist["clusters"],
        "non_singleton_clusters": dist["clusters"] - dist["singletons"], "largest_cluster": dist["max"],
        "cluster_sizes": dist["histogram"], "ann_recall_at_k": recall, "model": version, "run_id": run_id,
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    logger.info("dedupe: %s", summary)
    create_markdown_artifact(
        key="dedupe-summary",
        markdown="# Dedupe\n\n" + reports.markdown_table([{k: v for k, v in summary.items() if k != "cluster_sizes"}])
        + "\n## Cluster sizes\n\n" + reports.markdown_table([{"size": s, "clusters": n}
                                                             for s, n in dist["histogram"].items()]),
        description="duplicates and clusters",
    )  # fmt: skip
    return summary


def similar(product_id: str, k: int = 10, warehouse_root: str | None = None, method: str | None = None) -> pa.Table:
    """Top-k most similar products to ``product_id`` by stored embeddings (exact search), with titles."""
    wh = Warehouse(warehouse_root)
    emb = wh.sql(
        "SELECT e.product_id, e.vector, p.title, e.model_name, e.model_version FROM embeddings e "
        "JOIN products p USING (product_id)" + (f" WHERE e.model_name = '{method}'" if method else "")
    )
    ids = emb.column("product_id").to_pylist()
    if product_id not in ids:
        raise LookupError(f"product {product_id!r} has no embedding; run `enrich dedupe` first (or check the id)")
    vectors = np.stack([np.asarray(v, np.float32) for v in emb.column("vector").to_pylist()])
    q = vectors[ids.index(product_id)]
    scores = vectors @ q
    order = [i for i in np.argsort(-scores) if ids[i] != product_id][:k]
    titles = emb.column("title").to_pylist()
    return pa.table({"product_id": [ids[i] for i in order], "score": [round(float(scores[i]), 4) for i in order],
                     "title": [titles[i] for i in order]})  # fmt: skip
