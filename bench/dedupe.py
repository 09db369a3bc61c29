"""Dedupe speed and recall: top-10 self-join of 100k and 1M synthetic product vectors, exact faiss vs IVF; and the
incremental update of 1% of them.

Data (``synth``): 256-d float32, L2-normalised. N/1000 categories and N/10 products; each product appears as a
group of 1 + Poisson(9) near-duplicates (mean cosine to the nearest duplicate ≈ 0.97, to the 10th neighbour ≈ 0.87),
the rest of N as singletons. Directions follow a power-law spectrum (variance ∝ 1/i over dimension i), as learned
embeddings do, so the neighbours beyond a product's own duplicates are real near neighbours inside its category,
not ties among isotropic noise.

Variants, each in its own subprocess (own peak RSS, ``ru_maxrss``), faiss and BLAS on 2 threads:

- ``exact``: ``IndexFlatIP``; at 100k the full self-join; at 1M only ``--exact-queries`` sampled queries (the full
  exact join is 10^12 dot products of 256-d, hours on 2 cores), the time of the full join extrapolated linearly.
- ``ivf``: ``build_index(kind="ivf")`` (nlist = 4·√N, 4000 at 1M; ``--nprobe`` 16) + ``knn_graph``
  (features/similarity.py: one BLAS product per inverted list), recall@10 against the exact neighbours of the same
  queries, then threshold + ``cluster`` (NMI vs the true groups). "dedupe" = build + top-10 join + cluster.
- ``update``: the nightly's incremental step (``update_graph``) after 1% of the products changed: in the IVF build's
  cells (as the dedupe flow runs it; its lists against a join of the updated catalog in the same cells), and without
  them by the exact (N, C) product in fp32 and screened in bf16 (``cross_topk``; bf16 only where the CPU has native
  bf16 kernels): the times, and whether the fp32 and bf16 graphs are the same (they must be: the screen rescores in
  fp32 and certifies every list).

Run: ``.venv/bin/python bench/dedupe.py`` (``make bench``); writes bench/results/dedupe.json. Timings on a shared
machine are noisy: other processes compete for the same 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))
os.environ.setdefault("MKL_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "dedupe.json"
K = 10
DEPTH = 15  # the dedupe flow stores k + k // 2 entries per list, so an update can lose some and stay exact
DIM = 256
MATCH_THRESHOLD = 0.92  # between the duplicate (≈0.97) and neighbour (≈0.87) cosines of the synthetic data


def synth(n: int, d: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) normalised vectors and their near-duplicate group ids (see the module docstring)."""
    rng = np.random.default_rng(seed)
    spectrum = (np.arange(1, d + 1) ** -0.5).astype(np.float32)
    spectrum /= np.sqrt((spectrum**2).sum())
    categories = rng.standard_normal((max(10, n // 1000), d), dtype=np.float32) * spectrum
    sizes = 1 + rng.poisson(9, n // 10)
    sizes = sizes[np.cumsum(sizes) <= n]
    group = np.repeat(np.arange(len(sizes)), sizes)
    group = np.concatenate([group, np.arange(len(sizes), len(sizes) + n - len(group))])  # singletons
    n_groups = int(group.max()) + 1
    centers = categories[rng.integers(0, len(categories), n_groups)]
    centers += 0.7 * rng.standard_normal((n_groups, d), dtype=np.float32) * spectrum
    x = centers[group] + 0.25 * rng.standard_normal((n, d), dtype=np.float32) * spectrum
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, group


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, n: int, exact_queries: int, nprobe: int, workdir: Path) -> dict:
    """One measurement, in this (sub)process."""
    import faiss

    from features.similarity import build_index, cluster, knn_graph, nmi_purity, recall_at_k

    faiss.omp_set_num_threads(THREADS)
    x, group = synth(n)
    ids = np.arange(n)
    queries = np.sort(np.random.default_rng(1).choice(n, exact_queries, replace=False)) if exact_queries < n else ids
    truth = workdir / f"exact_{n}.npy"
    row: dict = {"n": n, "variant": variant, "k": K}
    rss_data = peak_rss_mb()
    if variant == "exact":
        t0 = time.perf_counter()
        index = build_index(x, kind="exact")
        t_build = time.perf_counter() - t0
        mask = np.zeros(n, dtype=bool)
        mask[queries] = True
        t0 = time.perf_counter()
        graph = knn_graph(ids, x, K, index=index, queries_mask=mask)
        t_join = time.perf_counter() - t0
        np.save(truth, graph.neighbors[queries])
        row.update(
            build_s=t_build,
            join_s=t_join,
            queries=len(queries),
            full_join_s=(t_build + t_join * n / len(queries)),
            full_join_extrapolated=len(queries) < n,
            recall_at_10=1.0,
        )
    elif variant == "update":
        row.update(run_update(x, ids, nprobe))
    else:
        t0 = time.perf_counter()
        index = build_index(x, kind="ivf", nprobe=nprobe)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        graph = knn_graph(ids, x, K, index=index)
        t_join = time.perf_counter() - t0
        t0 = time.perf_counter()
        a, b, s = graph.pairs()
        keep = s >= MATCH_THRESHOLD
        clusters = cluster(a[keep], b[keep], n, scores=s[keep], max_cluster_size=50)
        t_cluster = time.perf_counter() - t0
        nmi, purity = nmi_purity(clusters, group)
        recall = recall_at_k(graph.neighbors[queries], np.load(truth)) if truth.exists() else None
        row.update(
            build_s=t_build,
            join_s=t_join,
            cluster_s=t_cluster,
            full_join_s=t_build + t_join,
            dedupe_s=t_build + t_join + t_cluster,
            queries=len(queries),
            recall_at_10=recall,
            nlist=int(index.nlist),
            nprobe=int(index.nprobe),
            pairs=int(len(a)),
            matched_pairs=int(keep.sum()),
            cluster_nmi=nmi,
            cluster_purity=purity,
        )
    row.update(rss_after_data_mb=rss_data, peak_rss_mb=peak_rss_mb())
    return row


def run_update(x: np.ndarray, ids: np.ndarray, nprobe: int) -> dict:
    """The nightly's incremental graph update: 1% of the products edited (their vectors moved a little), the stored
    graph (IVF, ``DEPTH`` deep as the dedupe flow keeps it for k = 10) updated by ``update_graph``:

    - in the build's IVF cells (what the dedupe flow runs on a graph built with IVF): time, and whether the lists
      equal a search of the updated catalog in those cells (``knn_graph(index=cells)``, timed too: the cost of the
      full join in the same cells);
    - without the cells, by the exact (N, C) product in fp32 and screened in bf16 (both must give the same graph);
      the cells' lists are scored against these (recall@10, ties counted).
    """
    from features.runtime import cpu_bf16_speedup, cpu_bf16_supported
    from features.similarity import build_index, knn_graph, recall_at_k, update_graph

    rng = np.random.default_rng(2)
    changed = np.arange(0, len(x), 100)
    moved = x[changed] + 0.05 * rng.standard_normal((len(changed), x.shape[1]), dtype=np.float32)
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    t0 = time.perf_counter()
    graph = knn_graph(ids, x, DEPTH, index=build_index(x, kind="ivf", nprobe=nprobe))
    out: dict = {"changed": len(changed), "depth": DEPTH, "graph_build_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    in_cells, vectors = update_graph(graph, x, ids[changed], moved, k=K, depth=DEPTH)
    out["update_cells_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = knn_graph(in_cells.ids, vectors, DEPTH, index=in_cells.cells).top(K)
    out["join_in_cells_s"] = time.perf_counter() - t0
    got = in_cells.top(K)
    out["cells_same_as_join_in_cells"] = float((got.neighbors == want.neighbors).mean())
    del want, vectors
    screens = ["fp32"] + (["bf16"] if cpu_bf16_supported() else [])
    graphs = {}
    no_cells = dataclasses.replace(graph, cells=None)
    for screen in screens:
        t0 = time.perf_counter()
        graphs[screen], _ = update_graph(no_cells, x, ids[changed], moved, k=K, depth=DEPTH, screen=screen)
        out[f"update_{screen}_s"] = time.perf_counter() - t0
    exact = graphs["fp32"].top(K)
    out["cells_recall_vs_exact_update"] = recall_at_k(got.neighbors, exact.neighbors, got.scores, exact.scores)
    if "bf16" in graphs:
        a, b = graphs["fp32"], graphs["bf16"]
        both = np.isfinite(a.scores) & np.isfinite(b.scores)
        out.update(
            bf16_speedup_linear=cpu_bf16_speedup(),  # fp32 / bf16 time of a 384 -> 1536 layer
            same_neighbors=float((a.neighbors == b.neighbors).mean()),
            max_score_diff=float(np.abs(a.scores[both] - b.scores[both]).max()),
            same_padding=bool((np.isfinite(a.scores) == np.isfinite(b.scores)).all()),
        )
    return out


def machine() -> dict:
    import faiss

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus_visible": os.cpu_count(),
        "threads": THREADS,
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated N")
    parser.add_argument("--exact-queries-1m", type=int, default=5000, help="sampled exact queries when N > 200k")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--one", nargs=4, metavar=("VARIANT", "N", "QUERIES", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, n, q, workdir = args.one
        print(json.dumps(run_variant(variant, int(n), int(q), args.nprobe, Path(workdir))))
        return

    info = machine()
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dedupe-bench-") as workdir:
        for n in (int(s) for s in args.sizes.split(",")):
            queries = n if n <= 200_000 else min(n, args.exact_queries_1m)
            for variant in ("exact", "ivf", "update"):  # exact first: the IVF run reads its neighbours for recall
                cmd = [sys.executable, __file__, "--nprobe", str(args.nprobe), "--one", variant, str(n), str(queries)]
                out = subprocess.run([*cmd, workdir], check=True, capture_output=True, text=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                if variant == "update":
                    print(f"n={n:>9,} update of {row['changed']:,}: in IVF cells {row['update_cells_s']:.1f}s "
                          f"(same lists as a join in the cells: {row['cells_same_as_join_in_cells']:.4f}, "
                          f"{row['join_in_cells_s']:.1f}s; recall@10 vs exact update "
                          f"{row['cells_recall_vs_exact_update']:.4f}); exact: fp32 {row['update_fp32_s']:.1f}s, "
                          f"bf16 screen {row.get('update_bf16_s', float('nan')):.1f}s, same neighbours "
                          f"{row.get('same_neighbors')}", flush=True)  # fmt: skip
                    continue
                print(
                    f"n={n:>9,} {variant:5s} build {row['build_s']:6.1f}s join {row['join_s']:7.1f}s "
                    f"recall@10 {row['recall_at_10']} rss {row['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    total = time.perf_counter() - started
    print()
    print(
        f"{'N':>9} | {'variant':7} | {'build s':>7} | {'top-10 join s':>13} | {'cluster s':>9} | "
        f"{'full join s':>11} | {'recall@10':>9} | {'peak RSS MB':>11} | {'NMI':>5}"
    )
    for r in (r for r in rows if r["variant"] != "update"):
        sampled = r["variant"] == "exact" and r["queries"] < r["n"]
        join = f"{r['join_s']:.1f}" + (f" ({r['queries']} q)" if sampled else "")
        full = f"{r['full_join_s']:.0f}" + ("*" if r.get("full_join_extrapolated") else "")
        print(
            f"{r['n']:>9,} | {r['variant']:7} | {r['build_s']:>7.1f} | {join:>13} | {r.get('cluster_s', 0):>9.1f} | "
            f"{full:>11} | {r['recall_at_10'] or float('nan'):>9.4f} | {r['peak_rss_mb']:>11.0f} | "
            f"{r.get('cluster_nmi', float('nan')):>5.3f}"
        )
    print("* extrapolated from the sampled queries. recall@10: IVF top-10 vs exact top-10 of the same queries.")
    print()
    print(f"{'N':>9} | {'changed':>7} | {'in IVF cells s':>14} | {'= join in cells':>15} | {'recall@10':>9} | "
          f"{'exact fp32 s':>12} | {'exact bf16-screened s':>21} | {'fp32 = bf16':>11} | "
          f"{'max score diff':>14}")  # fmt: skip
    for r in (r for r in rows if r["variant"] == "update"):
        print(f"{r['n']:>9,} | {r['changed']:>7,} | {r.get('update_cells_s', float('nan')):>14.1f} | "
              f"{r.get('cells_same_as_join_in_cells', float('nan')):>15.4f} | "
              f"{r.get('cells_recall_vs_exact_update', float('nan')):>9.4f} | {r['update_fp32_s']:>12.1f} | "
              f"{r.get('update_bf16_s', float('nan')):>21.1f} | {r.get('same_neighbors', float('nan')):>11.6f} | "
              f"{r.get('max_score_diff', float('nan')):>14.2e}")  # fmt: skip
    print("recall@10: the lists updated in the cells against the exact update's (ties counted).")
    print(f"total bench time {total:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # a partial run (--sizes) replaces its own rows and keeps the others of the last run
    done = {(r["n"], r["variant"]) for r in rows}
    if RESULTS.exists():
        previous = json.loads(RESULTS.read_text()).get("rows", [])
        rows = sorted(
            [r for r in previous if (r["n"], r["variant"]) not in done] + rows, key=lambda r: (r["n"], r["variant"])
        )
    RESULTS.write_text(
        json.dumps(
            {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": info,
                "data": "synth(): 256-d, power-law spectrum, N/1000 categories, groups of 1+Poisson(9) duplicates",
                "k": K,
                "match_threshold": MATCH_THRESHOLD,
                "bench_total_s": total,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
