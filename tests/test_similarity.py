"""Dedupe core (features/similarity.py): exact/IVF/HNSW indexes, top-k pairs, incremental updates, clusters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from features.similarity import (
    IvfCells,
    build_index,
    candidate_pairs,
    cluster,
    cluster_size_distribution,
    cross_topk,
    default_nlist,
    exact_topk,
    knn_graph,
    nmi_purity,
    recall_at_k,
    search,
    threshold_for_f1,
    tune_nprobe,
    update_graph,
)


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    import faiss

    faiss.omp_set_num_threads(1)


def normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n_groups: int, size: int, d: int, noise: float, seed: int = 0, singletons: int = 0):
    """Groups of near-duplicates around random centres, then singletons -> (vectors, group ids)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, d))
    group = np.repeat(np.arange(n_groups), size)
    x = centres[group] + noise * rng.standard_normal((len(group), d))
    x = np.concatenate([x, rng.standard_normal((singletons, d))])
    group = np.concatenate([group, n_groups + np.arange(singletons)])
    return normalize(x), group


def categorised(n_cat: int, n_groups: int, size: int, d: int, seed: int = 0) -> np.ndarray:
    """Categories -> products -> near-duplicates: neighbours beyond a product's duplicates are real, not ties."""
    rng = np.random.default_rng(seed)
    cat = rng.standard_normal((n_cat, d))
    centres = cat[rng.integers(0, n_cat, n_groups)] + 0.6 * rng.standard_normal((n_groups, d))
    group = np.repeat(np.arange(n_groups), size)
    return normalize(centres[group] + 0.25 * rng.standard_normal((len(group), d)))


def pair_set(a, b) -> set:
    return set(zip(np.asarray(a).tolist(), np.asarray(b).tolist(), strict=True))


def test_known_duplicates_are_found_thresholded_and_clustered():
    x, group = clustered(n_groups=30, size=3, d=32, noise=0.1, singletons=60)
    ids = np.array([f"p{i:03d}" for i in range(len(x))])
    a, b, s = candidate_pairs(ids, x, k=4)
    assert (a < b).all() and len(pair_set(a, b)) == len(a)  # canonical, deduplicated, no self pairs
    pos = {i: n for n, i in enumerate(ids)}
    same = group[[pos[i] for i in a]] == group[[pos[i] for i in b]]
    assert same.sum() == 30 * 3  # every true duplicate pair (3 per group of 3) is a candidate
    cut, f1 = threshold_for_f1(s, same)
    assert f1 == 1.0
    keep = s >= cut
    clusters = cluster(a[keep], b[keep], ids, scores=s[keep])
    assert nmi_purity(clusters, group) == (1.0, 1.0)
    dist = cluster_size_distribution(clusters)
    assert dist["histogram"] == {1: 60, 3: 30} and dist["max"] == 3


def test_queries_mask_never_pairs_two_unmasked_products():
    x, _ = clustered(n_groups=20, size=4, d=16, noise=0.2)
    mask = np.zeros(len(x), dtype=bool)
    mask[::7] = True
    a, b, _ = candidate_pairs(np.arange(len(x)), x, k=5, queries_mask=mask)
    assert len(a) and (mask[a] | mask[b]).all()


def test_incremental_update_equals_full_recompute():
    x, _ = clustered(n_groups=60, size=5, d=24, noise=0.3, singletons=100, seed=1)
    rng = np.random.default_rng(2)
    ids = np.arange(len(x)) * 10
    old = rng.permutation(len(x))[:320]
    graph = knn_graph(ids[old], x[old], k=6)
    # 40 changed products (same id, moved vector), 80 new ones, 10 deleted
    changed = old[:40]
    moved = normalize(x[changed] + 0.5 * rng.standard_normal(x[changed].shape))
    new = np.setdiff1d(np.arange(len(x)), old)
    removed = ids[old[40:50]]
    new_ids = np.concatenate([ids[changed], ids[new]])
    new_x = np.concatenate([moved, x[new]])
    updated, vectors = update_graph(graph, x[old], new_ids, new_x, removed_ids=removed)

    kept = old[50:]
    full_ids = np.concatenate([ids[kept], new_ids])
    full_x = np.concatenate([x[kept], new_x])
    assert (updated.ids == full_ids).all() and np.array_equal(vectors, full_x)
    full = knn_graph(full_ids, full_x, k=6)
    ua, ub, us = updated.pairs()
    fa, fb, fs = full.pairs()
    assert pair_set(ua, ub) == pair_set(fa, fb)
    np.testing.assert_allclose(us, fs, atol=1e-5)


def test_exact_below_exact_max_and_ivf_recall_on_20k_clustered():
    import faiss

    x = categorised(n_cat=50, n_groups=2000, size=10, d=32, seed=3)
    assert isinstance(build_index(x[:1000], exact_max=5000), faiss.IndexFlatIP)
    ivf = build_index(x, exact_max=5000, nprobe=8)
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.nlist == default_nlist(len(x)) == 512
    queries = np.random.default_rng(0).choice(len(x), 500, replace=False)
    exact = search(build_index(x, kind="exact"), x[queries], 11)[1][:, 1:]
    mask = np.zeros(len(x), dtype=bool)
    mask[queries] = True
    graph = knn_graph(np.arange(len(x)), x, 10, index=ivf, queries_mask=mask)  # the blocked IVF self-join
    assert recall_at_k(graph.neighbors[queries], exact) >= 0.95
    hnsw = build_index(x[:5000], kind="hnsw", m=16)
    approx = search(hnsw, x[queries[:200]], 10)[1]
    truth = search(build_index(x[:5000], kind="exact"), x[queries[:200]], 10)[1]
    assert recall_at_k(approx, truth) >= 0.95


def test_exact_topk_equals_faiss_flat_search():
    x = normalize(np.random.default_rng(4).standard_normal((700, 24)))
    q = x[:300]
    s, i = exact_topk(q, x, 8, block=128)  # several blocks
    fs, fi = search(build_index(x, kind="exact"), q, 8)
    np.testing.assert_allclose(s, fs, atol=1e-5)
    assert (i == fi).mean() > 0.999  # only exact score ties may swap
    assert (i[:, 0] == np.arange(300)).all()  # each query finds itself first
    s, i = exact_topk(q[:3], x[:5], 8)  # k beyond the database: padded
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all() and (i[:, :5] >= 0).all()


def test_tune_nprobe_raises_nprobe_until_the_target_recall():
    x = categorised(n_cat=50, n_groups=2000, size=10, d=32, seed=5)
    ivf = build_index(x, kind="ivf", nprobe=1)
    low = tune_nprobe(ivf, x, 10, target_recall=0.0)
    assert low[0] == 1
    nprobe, recall = tune_nprobe(ivf, x, 10, target_recall=0.99, sample=500)
    assert nprobe > 1 and recall >= 0.99 and ivf.nprobe == nprobe
    # an independent sample of queries agrees with the tuned recall
    queries = np.random.default_rng(9).choice(len(x), 500, replace=False)
    mask = np.zeros(len(x), dtype=bool)
    mask[queries] = True
    graph = knn_graph(np.arange(len(x)), x, 10, index=ivf, queries_mask=mask)
    truth = knn_graph(np.arange(len(x)), x, 10, queries_mask=mask)
    assert recall_at_k(graph.neighbors[queries], truth.neighbors[queries]) >= 0.98


def test_incremental_update_through_an_ivf_index_stays_close_to_exact():
    x = categorised(n_cat=40, n_groups=1500, size=8, d=32, seed=6)
    ids = np.arange(len(x))
    rng = np.random.default_rng(7)
    old = np.sort(rng.permutation(len(x))[: len(x) - 200])
    new = np.setdiff1d(ids, old)
    built = []

    def ivf(vectors):
        index = build_index(vectors, kind="ivf", nprobe=1)
        tune_nprobe(index, vectors, 10, target_recall=0.99, sample=300)
        built.append(len(vectors))
        return index

    graph = knn_graph(ids[old], x[old], 10, index=ivf(x[old]))
    assert graph.cells is not None and len(graph.cells.cell) == len(old)
    graph = dataclasses.replace(graph, cells=None)  # as without its cells: the exact product, then a new index
    # 200 new products: their lists and the old lists' new candidates come from one exact product, no index
    updated, vectors = update_graph(graph, x[old], ids[new], x[new], index=ivf)
    assert built == [len(old)] and len(updated.ids) == len(x)
    full = knn_graph(updated.ids, vectors, 10)
    got, want = pair_set(*updated.pairs()[:2]), pair_set(*full.pairs()[:2])
    assert len(got & want) >= 0.97 * len(want)
    # a quarter of the catalog deleted: the lists that lost neighbours are too many to search exactly
    removed = rng.choice(ids, len(ids) // 4, replace=False)
    shrunk, vectors = update_graph(updated, vectors, ids[:0], x[:0], removed_ids=removed, index=ivf)
    assert built == [len(old), len(x) - len(removed)]
    full = knn_graph(shrunk.ids, vectors, 10)
    got, want = pair_set(*shrunk.pairs()[:2]), pair_set(*full.pairs()[:2])
    assert len(got & want) >= 0.97 * len(want)


def test_update_in_ivf_cells_equals_a_search_of_the_updated_catalog_in_those_cells(monkeypatch):
    import features.similarity as sim

    x = categorised(n_cat=40, n_groups=1500, size=8, d=32, seed=6)
    rng = np.random.default_rng(7)
    old = np.sort(rng.permutation(len(x))[: len(x) - 300])
    new = np.setdiff1d(np.arange(len(x)), old)
    current = {int(i) * 10: x[i] for i in old}  # product id -> its vector now
    graph = knn_graph(old * 10, x[old], 15, index=build_index(x[old], kind="ivf", nprobe=2))
    cells = graph.cells
    assert isinstance(cells, IvfCells) and cells.nprobe == 2 and len(cells.cell) == len(old)
    # the graph is the cell-by-cell search: knn_graph over its own cells gives the same lists
    assert (knn_graph(old * 10, x[old], 15, index=cells).neighbors == graph.neighbors).all()
    monkeypatch.setattr(sim, "cross_topk", None)  # an update in cells never runs the exact (N, C) product
    for rnd in range(3):  # nightly runs: 2% moved, 1% deleted, 100 new; the last run deletes a quarter
        vectors = np.stack([current[p] for p in graph.ids.tolist()])
        changed = rng.choice(graph.ids, len(graph.ids) // 50, replace=False)
        others = np.setdiff1d(graph.ids, changed)
        removed = rng.choice(others, len(others) // (4 if rnd == 2 else 100), replace=False)
        moved = normalize(
            np.stack([current[p] for p in changed.tolist()]) + 0.1 * rng.standard_normal((len(changed), 32))
        )
        fresh = new[rnd * 100 : (rnd + 1) * 100]
        graph, vectors = update_graph(graph, vectors, np.r_[changed, fresh * 10], np.r_[moved, x[fresh]],
                                      removed_ids=removed, k=10, depth=15)  # fmt: skip
        current.update(zip(np.r_[changed, fresh * 10].tolist(), np.r_[moved, x[fresh]], strict=True))
        for p in removed.tolist():
            del current[p]
        assert sorted(graph.ids.tolist()) == sorted(current)
        assert len(graph.cells.cell) == len(graph.ids) == len(vectors)
        assert (graph.cells.cell[-len(fresh) :] == graph.cells.assign(x[fresh])).all()  # new rows: nearest centroid
        want = knn_graph(graph.ids, vectors, 15, index=graph.cells).top(10)
        got = graph.top(10)
        assert pair_set(*got.pairs()[:2]) == pair_set(*want.pairs()[:2])
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    # the cells are an approximation (2 of 300 probed): recall against exact search is well below 1
    exact = knn_graph(graph.ids, vectors, 10)
    assert 0.75 < recall_at_k(got.neighbors, exact.neighbors, got.scores, exact.scores) < 0.95


def test_spare_entries_keep_lists_exact_and_the_work_proportional_to_the_change(monkeypatch):
    import features.similarity as sim

    x, _ = clustered(n_groups=300, size=4, d=24, noise=0.3, singletons=800, seed=11)
    rng = np.random.default_rng(12)
    ids = np.arange(len(x)) * 10
    searched, spying = [], [False]
    real = sim._topk_excluding_self

    def spy(index, xx, rows, k):
        searched.extend([len(rows)] * spying[0])
        return real(index, xx, rows, k)

    graph = knn_graph(ids, x, 9)  # served 6 deep, 3 spares
    monkeypatch.setattr(sim, "_topk_excluding_self", spy)
    vectors = x
    for _ in range(4):  # nightly runs: 2% of the products change, 1% are deleted, 1% are new
        changed = rng.choice(graph.ids, len(graph.ids) // 50, replace=False)
        removed = rng.choice(np.setdiff1d(graph.ids, changed), len(graph.ids) // 100, replace=False)
        pos = {p: i for i, p in enumerate(graph.ids.tolist())}
        moved = normalize(vectors[[pos[p] for p in changed]] + 0.4 * rng.standard_normal((len(changed), 24)))
        fresh = normalize(rng.standard_normal((len(graph.ids) // 100, 24)))
        fresh_ids = ids.max() + 10 * (1 + np.arange(len(fresh)))
        ids = np.concatenate([ids, fresh_ids])
        spying[0] = True
        graph, vectors = update_graph(graph, vectors, np.concatenate([changed, fresh_ids]),
                                      np.concatenate([moved, fresh]), removed_ids=removed, k=6, depth=9)  # fmt: skip
        spying[0] = False
        full = knn_graph(graph.ids, vectors, 6)
        ua, ub, us = graph.top(6).pairs()
        fa, fb, fs = full.pairs()
        assert pair_set(ua, ub) == pair_set(fa, fb)
        np.testing.assert_allclose(us, fs, atol=1e-5)
        assert ((graph.neighbors >= 0).sum(1) >= 6).all() and graph.neighbors.shape[1] == 9
    # lists searched again: those that lost more than their spares, a small share of the 4 x 2,000 lists
    assert sum(searched) < 0.02 * 4 * len(graph.ids)


def test_giant_cluster_guard_cuts_a_chain_at_its_weakest_links():
    # two tight groups of 4 (score 0.95), chained by one weak edge (0.6), then a long uniform chain
    a = np.array([0, 1, 2, 4, 5, 6, 3, *range(8, 29)])
    b = np.array([1, 2, 3, 5, 6, 7, 4, *range(9, 30)])
    s = np.array([0.95] * 6 + [0.6] + [0.9] * 21)
    plain = cluster(a, b, 30, scores=s, max_cluster_size=0)
    assert cluster_size_distribution(plain)["max"] == 22  # connected components chain 8..29
    guarded = cluster(a, b, 30, scores=s, max_cluster_size=5)
    assert len(set(guarded[:4])) == 1 and len(set(guarded[4:8])) == 1 and guarded[0] != guarded[4]
    assert cluster_size_distribution(guarded)["max"] <= 5


def test_min_linkage_stops_one_match_from_chaining_clusters():
    # a chain 0-1-2-3 (scores falling), and a clique 4-5-6-7 (every pair matched)
    chain_a, chain_b, chain_s = [0, 1, 2], [1, 2, 3], [0.9, 0.8, 0.7]
    clique = [(i, j) for i in range(4, 8) for j in range(i + 1, 8)]
    a = np.array(chain_a + [i for i, _ in clique])
    b = np.array(chain_b + [j for _, j in clique])
    s = np.array(chain_s + [0.95] * len(clique))
    plain = cluster(a, b, 8, scores=s, max_cluster_size=0)
    assert len(set(plain[:4])) == 1 and len(set(plain[4:])) == 1
    half = cluster(a, b, 8, scores=s, max_cluster_size=0, min_linkage=0.5)
    # 0-1 merge, then 2 joins {0, 1} (1 of its 2 cross pairs matches), 3 does not (1 of 3)
    assert half[0] == half[1] == half[2] != half[3] and len(set(half[4:])) == 1
    full = cluster(a, b, 8, scores=s, max_cluster_size=0, min_linkage=1.0)
    assert full[0] == full[1] != full[2] == full[3] and len(set(full[4:])) == 1  # the clique survives whole
    with pytest.raises(ValueError, match="min_linkage"):
        cluster(a, b, 8, min_linkage=1.5)


def test_nmi_purity_and_threshold_toy():
    nmi, purity = nmi_purity(np.array([0, 0, 1, 1, 2, 2]), np.array(["a", "a", "b", "b", "b", "b"]))
    assert purity == 1.0 and 0.5 < nmi < 1.0
    assert nmi_purity(np.zeros(4, int), np.array([0, 0, 1, 1]))[1] == 0.5
    cut, f1 = threshold_for_f1(np.array([0.9, 0.8, 0.7, 0.2]), np.array([1, 1, 0, 0]))
    assert (cut, f1) == (0.8, 1.0)
    with pytest.raises(ValueError, match="no positive labels"):
        threshold_for_f1(np.array([0.1]), np.array([0]))


def test_recall_counts_ties_and_tuning_stops_at_its_cost_cap():
    # three products tie at 0.9 for the second place: exact lists b, approximate lists c; both are right
    exact, approx = np.array([[1, 2]]), np.array([[1, 3]])
    assert recall_at_k(approx, exact) == 0.5
    assert recall_at_k(approx, exact, np.array([[0.95, 0.9]]), np.array([[0.95, 0.9]])) == 1.0
    assert recall_at_k(approx, exact, np.array([[0.95, 0.8]]), np.array([[0.95, 0.9]])) == 0.5

    # templated catalog: groups of identical vectors, so the top-k is mostly ties
    rng = np.random.default_rng(11)
    base = rng.normal(size=(400, 32)).astype(np.float32)
    x = np.repeat(base, 25, axis=0) + rng.normal(scale=1e-7, size=(10_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ivf = build_index(x, kind="ivf", nlist=100, nprobe=1)
    nprobe, recall = tune_nprobe(ivf, x, 10, target_recall=0.99, sample=300)
    assert recall >= 0.99 and nprobe < 100, "ties do not force exhaustive probing"

    spread = rng.normal(size=(20_000, 32)).astype(np.float32)  # no structure: IVF needs many lists for recall
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    ivf = build_index(spread, kind="ivf", nlist=200, nprobe=1)
    nprobe, recall = tune_nprobe(ivf, spread, 10, target_recall=1.0, sample=300, max_candidates=800)
    assert nprobe == 8 == ivf.nprobe, "stops where a query scans max_candidates vectors (800 * 200 / 20,000)"
    assert recall < 0.9


def test_cross_topk_equals_brute_force_in_both_directions_across_blocks():
    x = normalize(np.random.default_rng(13).standard_normal((500, 16)))
    off, c = 300, 120  # queries are rows 300..419 of x: their own pairs are left out
    s = x @ x[off : off + c].T
    s[off + np.arange(c), np.arange(c)] = -np.inf
    floor = np.quantile(s.max(1), 0.7) * np.ones(len(x), np.float32)  # most rows have no query over their floor
    row_s, row_i, col_s, col_i = cross_topk(x, x[off : off + c], 4, 6, self_offset=off, row_floor=floor,
                                            block_bytes=4 * c * 37)  # 37 rows per block: 14 blocks  # fmt: skip
    want_col = np.argsort(-s, axis=0, kind="stable")[:6].T
    np.testing.assert_allclose(col_s, np.take_along_axis(s.T, want_col, 1), atol=1e-5)
    assert (col_i == want_col).mean() > 0.99 and not (col_i == off + np.arange(c)[:, None]).any()
    want_row = np.argsort(-s, axis=1, kind="stable")[:, :4]
    want_s = np.take_along_axis(s, want_row, 1)
    want_s = np.where(want_s >= floor[:, None], want_s, -np.inf)
    np.testing.assert_allclose(row_s, want_s, atol=1e-5)
    assert ((row_i >= 0) == np.isfinite(want_s)).all() and (row_i[row_i >= 0] == want_row[row_i >= 0]).mean() > 0.99
    assert 0 < np.isfinite(row_s[:, 0]).sum() < len(x)  # the floor left some rows without candidates


def _near_ties(n: int, d: int, seed: int, pull: float = 3.0) -> np.ndarray:
    """Vectors around one direction (``pull``: its weight; 0 is isotropic): with a strong pull every cosine sits in
    a narrow band, so many scores are within bf16's error of each other and a list's k-th and (k + extra)-th
    candidates cannot be told apart in bf16."""
    rng = np.random.default_rng(seed)
    return normalize(rng.standard_normal((n, d)) + pull * rng.standard_normal((1, d)))


@pytest.mark.parametrize(
    ("extra", "pull", "passes"),
    [(0, 3.0, 4), (4, 3.0, 4), (32, 0.0, 2)],  # passes: fp32 reference, bf16, then fp32 redo of rows and of queries
)
def test_cross_topk_bf16_screen_returns_the_exact_fp32_result(monkeypatch, extra, pull, passes):
    import features.similarity as sim

    x = _near_ties(3000, 32, seed=extra, pull=pull)
    off, c = 2000, 400
    s = x @ x[off : off + c].T
    s[off + np.arange(c), np.arange(c)] = -np.inf
    floor = (np.quantile(s.max(1), 0.5) * np.ones(len(x))).astype(np.float32)
    scans = []
    real_scan = sim._cross_scan
    monkeypatch.setattr(sim, "_cross_scan", lambda *a: scans.append(str(a[7])) or real_scan(*a))
    kw = dict(self_offset=off, row_floor=floor, block_bytes=4 * c * 97)  # 31 blocks
    want = cross_topk(x, x[off : off + c], 5, 7, screen="fp32", **kw)
    got = cross_topk(x, x[off : off + c], 5, 7, screen="bf16", extra=extra, **kw)
    for w, g in zip(want[::2], got[::2], strict=True):  # scores: exact fp32, -inf in the same places
        assert (np.isneginf(w) == np.isneginf(g)).all()
        np.testing.assert_allclose(g[np.isfinite(g)], w[np.isfinite(w)], atol=1e-6)
    for w, g in zip(want[1::2], got[1::2], strict=True):
        assert (w == g).mean() > 0.999  # ids: the same up to fp32 score ties
    assert 0 < np.isfinite(got[0][:, 0]).sum() < len(x)  # the floors left some rows with candidates, not all
    # near ties: lists the bf16 pass could not certify were searched again in fp32; spread scores: none were
    assert scans == ["torch.float32", "torch.bfloat16"] + ["torch.float32"] * (passes - 2)


def test_update_graph_with_bf16_screen_equals_full_recompute():
    x = _near_ties(1500, 24, seed=5)
    ids = np.arange(len(x))
    old, new = np.arange(1200), np.arange(1200, 1500)
    graph = knn_graph(ids[old], x[old], k=9)
    updated, vectors = update_graph(graph, x[old], ids[new], x[new], k=6, depth=9, screen="bf16")
    full = knn_graph(ids, x, k=9).top(6)
    ua, ub, us = updated.top(6).pairs()
    fa, fb, fs = full.pairs()
    assert pair_set(ua, ub) == pair_set(fa, fb)
    np.testing.assert_allclose(us, fs, atol=1e-6)


def test_cross_topk_rejects_an_unknown_screen():
    x = normalize(np.random.default_rng(0).standard_normal((10, 4)))
    with pytest.raises(ValueError, match="screen 'fp16'"):
        cross_topk(x, x[:2], 2, 2, screen="fp16")


def test_cross_topk_bf16_screen_with_one_direction_only():
    x = _near_ties(600, 16, seed=9, pull=0.0)
    floor = np.full(len(x), 0.3, np.float32)
    for kr, kc in ((0, 5), (4, 0)):
        want = cross_topk(x, x[:50], kr, kc, row_floor=floor, screen="fp32")
        got = cross_topk(x, x[:50], kr, kc, row_floor=floor, screen="bf16")
        for w, g in zip(want, got, strict=True):
            assert w.shape == g.shape
            np.testing.assert_allclose(np.where(np.isfinite(g), g, 9), np.where(np.isfinite(w), w, 9), atol=1e-6)


def test_update_graph_gathers_vectors_by_row_as_a_stacked_copy_does():
    """``vector_rows``: the old vectors in another order (and with rows for products that leave) give the same
    graph and vectors as the matrix stacked in the graph's order; a kept product without a row is refused."""
    x = _near_ties(900, 16, seed=3)
    ids = np.array([f"p{i:04d}" for i in range(len(x))], dtype=object)
    graph = knn_graph(ids[:800], x[:800], k=8)
    changed = ids[[5, 17]]
    new_ids, new_x = np.r_[changed, ids[800:]], np.r_[x[[5, 17]] * 0.5 + 0.1, x[800:]]
    want, want_x = update_graph(graph, x[:800], new_ids, new_x, removed_ids=ids[[9]], k=5, depth=8)
    perm = np.random.default_rng(0).permutation(800)  # a stored matrix in its own row order
    stored = x[:800][perm]
    rows = np.argsort(perm)  # graph id i -> its row in ``stored``
    rows[[5, 9]] = -1  # a changed and a removed product: no usable row
    got, got_x = update_graph(graph, stored, new_ids, new_x, removed_ids=ids[[9]], k=5, depth=8, vector_rows=rows)
    assert got.ids.tolist() == want.ids.tolist()
    np.testing.assert_array_equal(got.neighbors, want.neighbors)
    np.testing.assert_array_equal(got_x, want_x)
    rows[3] = -1  # an unchanged product kept in the graph must have a row
    with pytest.raises(ValueError, match=r"no vector row \(first: \['p0003'\]\)"):
        update_graph(graph, stored, new_ids, new_x, removed_ids=ids[[9]], k=5, depth=8, vector_rows=rows)
    with pytest.raises(ValueError, match="pass vector_rows"):
        update_graph(graph, stored[:700], new_ids, new_x, k=5, depth=8)


def _lists_by_id(graph) -> dict:
    """{product id: [(neighbour id, score), ...]} of a graph, whatever its row order."""
    return {p: [(graph.ids[j], round(float(s), 5)) for j, s in zip(nb, sc, strict=True) if j >= 0]
            for p, nb, sc in zip(graph.ids.tolist(), graph.neighbors, graph.scores, strict=True)}  # fmt: skip


@pytest.mark.parametrize("in_cells", [False, True])
def test_update_graph_in_the_read_matrix_equals_an_update_into_a_new_one(in_cells):
    """``out=vectors``: the kept rows move up in the caller's matrix (stored in its own row order, with rows for
    products that leave) and the new ones follow, with no new matrix; the graph is the one an update into a new
    matrix gives (same lists per product, rows in the stored order). A buffer too small, or overlapping the
    vectors at an offset, is refused."""
    x = categorised(n_cat=20, n_groups=300, size=4, d=16, seed=9)
    ids = np.array([f"p{i:04d}" for i in range(len(x))], dtype=object)
    index = build_index(x[:1100], kind="ivf", nprobe=3) if in_cells else None
    graph = knn_graph(ids[:1100], x[:1100], k=8, index=index)
    assert (graph.cells is not None) == in_cells
    rng = np.random.default_rng(1)
    changed = ids[[5, 17, 400]]
    new_ids = np.r_[changed, ids[1100:1150]]
    new_x = np.r_[normalize(x[[5, 17, 400]] + 0.2 * rng.standard_normal((3, 16))), x[1100:1150]]
    perm = rng.permutation(1100)
    stored = np.r_[x[:1100][perm], np.zeros((60, 16), np.float32)]  # rows to spare for the new products
    rows = np.argsort(perm)
    rows[[5, 9]] = -1  # a changed and a removed product: no usable row
    kw = dict(removed_ids=ids[[9, 30]], k=5, depth=8, vector_rows=rows)
    want, want_x = update_graph(graph, stored.copy(), new_ids, new_x, **kw)
    got, got_x = update_graph(graph, stored, new_ids, new_x, out=stored, **kw)
    assert np.shares_memory(got_x, stored)  # no new matrix
    assert sorted(got.ids.tolist()) == sorted(want.ids.tolist())
    assert _lists_by_id(got) == _lists_by_id(want)
    pos = {p: i for i, p in enumerate(want.ids.tolist())}
    at = np.array([pos[p] for p in got.ids.tolist()])
    np.testing.assert_array_equal(got_x, want_x[at])
    if in_cells:
        np.testing.assert_array_equal(got.cells.cell, want.cells.cell[at])
    # the old rows follow their order in the stored matrix
    old_rows = np.argsort(perm)[[int(p[1:]) for p in got.ids[: len(got.ids) - len(new_ids)].tolist()]]
    assert (np.diff(old_rows) > 0).all()
    with pytest.raises(ValueError, match="at least"):
        update_graph(graph, stored, new_ids, new_x, out=stored[:1000], **kw)
    with pytest.raises(ValueError, match="overlaps"):
        update_graph(graph, stored[10:], new_ids, new_x, out=stored, **kw)
