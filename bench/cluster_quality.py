"""Cluster quality of product embeddings against catalog categories (the M5Product protocol, Dong et al., CVPR 2022:
NMI and purity of embedding clusters vs category; SCALE reports NMI 92.0 on their own data).

Datasets (read through the importers from ``$ENRICH_SHARED_DATA``, default ../shared/data; skipped when absent):
ImplicitAVE (train split, a seeded random subsample of ``--n`` products, category = the product's category, and its
5 domains as a coarser reference) and Myntra-100 (all 100 products, category = master > sub > article type).

Embeddings: ``text`` = the pretrained all-MiniLM-L6-v2 text tower, mean-pooled, over the serialized product (what
``enrich dedupe --method text`` embeds); ``encoder`` = product-encoder@champion from ``$MLFLOW_TRACKING_URI`` when
``--encoder`` is given and one is registered. Clusterings: k-means (faiss, spherical, k = number of categories in
the sample) and the dedupe clusters (top-10 graph, pairs at cosine >= ``--threshold``, connected components capped
at 50, as ``enrich dedupe`` builds them).

Run: ``.venv/bin/python bench/cluster_quality.py [--n 3000] [--encoder]``; writes bench/results/cluster_quality.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("ENRICH_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results" / "cluster_quality.json"


def load(name: str, n: int, seed: int) -> tuple[list[dict], dict[str, np.ndarray]] | None:
    """(rows, {reference name: labels}) or None when the dataset is absent."""
    if name == "implicitave":
        from warehouse.importers import implicitave

        path = DATA / "implicitave"
        if not path.is_dir():
            return None
        rows = [r for r in implicitave.iter_rows(path, "train") if r["category"]]
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False))
        rows = [rows[i] for i in keep]
        domains = np.array([json.loads(r["extra"])["domain"] for r in rows])
        return rows, {"category": np.array([r["category"] for r in rows]), "domain": domains}
    from warehouse.importers import myntra

    path = DATA / "myntra-100"
    if not path.is_dir():
        return None
    rows = [r for r in myntra.iter_rows(path) if r["category"]]
    return rows, {"category": np.array([r["category"] for r in rows])}


def embed(method: str, rows: list[dict]) -> np.ndarray:
    if method == "text":
        from features.matcher import serialize
        from features.towers import TextTower, TextTowerConfig

        tower = TextTower(TextTowerConfig(max_length=128)).eval()
        with torch.no_grad():  # the tower is trainable by default: without this its outputs carry gradients
            return tower.embed_many([serialize(r) for r in rows], 64)
    from features.encoder import encode_products
    from flows.train_encoder import load_encoder

    model, _, _ = load_encoder()
    return encode_products(model, rows)


def kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, nredo=3)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1].ravel()


def dedupe_clusters(x: np.ndarray, threshold: float) -> np.ndarray:
    from features.similarity import cluster, knn_graph

    ids = np.arange(len(x))
    a, b, s = knn_graph(ids, x, 10).pairs()
    keep = s >= threshold
    return cluster(a[keep], b[keep], len(x), scores=s[keep], max_cluster_size=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="ImplicitAVE products sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.9, help="dedupe cosine cut (enrich dedupe's default)")
    parser.add_argument("--encoder", action="store_true", help="also product-encoder@champion ($MLFLOW_TRACKING_URI)")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch (and faiss) threads; default: every core this process may use",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import faiss

    from features.similarity import cluster_size_distribution, nmi_purity

    faiss.omp_set_num_threads(args.threads)
    methods = ["text"] + (["encoder"] if args.encoder else [])
    out: dict = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "datasets": {}}
    for name in ("implicitave", "myntra"):
        loaded = load(name, args.n, args.seed)
        if loaded is None:
            print(f"skipped {name}: not found under {DATA}")
            continue
        rows, refs = loaded
        entry: dict = {"products": len(rows), "categories": {k: len(set(v)) for k, v in refs.items()}}
        for method in methods:
            t0 = time.perf_counter()
            try:
                x = embed(method, rows)
            except LookupError as err:
                print(f"skipped {name} / {method}: {err}")
                continue
            res: dict = {"embed_seconds": time.perf_counter() - t0}
            dd = dedupe_clusters(x, args.threshold)
            res["dedupe_clusters"] = cluster_size_distribution(dd) | {"threshold": args.threshold}
            res["dedupe_clusters"].pop("histogram")
            for ref, labels in refs.items():
                k = len(set(labels))
                nmi, purity = nmi_purity(kmeans(x, k, args.seed), labels)
                res[f"kmeans_{ref}"] = {"k": k, "nmi": nmi, "purity": purity}
                nmi, purity = nmi_purity(dd, labels)
                res[f"dedupe_{ref}"] = {"clusters": int(dd.max() + 1), "nmi": nmi, "purity": purity}
                print(f"{name:12} {method:8} vs {ref:9}: k-means (k={k}) NMI {res[f'kmeans_{ref}']['nmi']:.3f} purity "
                      f"{res[f'kmeans_{ref}']['purity']:.3f} | dedupe clusters ({dd.max() + 1}) NMI {nmi:.3f} purity "
                      f"{purity:.3f}")  # fmt: skip
            entry[method] = res
        out["datasets"][name] = entry
    out["load_average"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
