"""Nearest-neighbour candidate pairs, thresholds and clusters for product dedupe (faiss; Johnson et al. 2019).

Vectors are L2-normalised, so inner product = cosine. ``build_index`` picks exact ``IndexFlatIP`` up to
``exact_max`` rows and an inverted file (``IndexIVFFlat``, nlist ≈ 4·√N, k-means trained on a sample) or HNSW
beyond; ``recall_at_k`` measures an approximate index against exact search.

Candidate pairs come from a directed top-k graph (``NeighborGraph``: row i holds the k nearest other products of
i); the pair set is its undirected union, each pair once with ``a < b``. The graph, not the pair list, is what an
incremental run keeps: an undirected pair does not say whose top-k it came from, so without the directed lists a
new product that displaces an old neighbour could not be accounted for. Lists may be kept deeper than they are
served (``NeighborGraph.top``): ``update_graph`` scores the new and changed vectors against all (one (N, C) product,
``cross_topk``, both directions at once), lets them enter the old lists they beat, and searches again only the lists
that lost more neighbours than their spare entries; with exact search its top-k pairs equal a full recompute on the
updated catalog. A graph built with IVF keeps its cells (``IvfCells``), and its update scores the changed vectors
only in those cells: the lists equal a search of the updated catalog in the same cells, at about C/N of its cost.

``cluster`` is connected components under a size cap: edges are merged strongest first (Kruskal order) and a merge
that would make a component larger than ``max_cluster_size`` is refused. Components under the cap are exactly the
connected components; a chain that would grow into a giant cluster is cut at its weakest links instead.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

IndexKind = Literal["auto", "exact", "ivf", "hnsw"]
EXACT_MAX = 200_000  # build_index(kind="auto") searches exactly up to this many rows
MIN_PAIRS = 20  # labelled pairs needed before a threshold is chosen on them


# ------------------------------------------------------------------------------------------------------------ index


def _as_matrix(vectors: np.ndarray, name: str = "vectors") -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} has shape {x.shape}; pass a 2-D (N, D) float32 array")
    return x


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: ≈ 4·√N (faiss's guideline), at least 1 and at most n // 39."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39 or 1)))


def build_index(
    vectors: np.ndarray,
    *,
    exact_max: int = EXACT_MAX,
    kind: IndexKind = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    m: int = 32,
    ef_search: int = 128,
    ef_construction: int = 80,
    train_size: int | None = None,
    niter: int = 6,
    seed: int = 0,
):
    """A faiss inner-product index holding ``vectors`` (row i has id i).

    Args:
        vectors: (N, D) L2-normalised float32.
        exact_max: with ``kind="auto"``, exact search up to this many rows, IVF beyond.
        kind: "exact" (IndexFlatIP), "ivf" (IndexIVFFlat), "hnsw" (IndexHNSWFlat) or "auto".
        nlist: IVF lists; default ≈ 4·√N.
        nprobe: IVF lists visited per query; default 16 (recall@10 ≥ 0.99 at 100k and 1M in bench/dedupe.py).
        m: HNSW links per node.
        ef_search: HNSW search beam.
        ef_construction: HNSW build beam.
        train_size: IVF k-means sample; default 16 points per list (coarse cells need no more; faiss warns).
        niter: IVF k-means iterations (6 is enough for coarse cells; faiss defaults to 25).
        seed: sample and k-means seed, so an index is reproducible.
    """
    import faiss

    x = _as_matrix(vectors)
    n, d = x.shape
    if kind == "auto":
        kind = "exact" if n <= exact_max else "ivf"
    if kind == "exact":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or default_nlist(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = niter
        index.cp.seed = seed
        index.cp.spherical = True  # centroids renormalised: cells of the unit sphere, as the vectors are
        sample = min(n, train_size or 16 * nlist)
        rows = np.random.default_rng(seed).choice(n, sample, replace=False) if sample < n else slice(None)
        index.train(x[rows])
        index.nprobe = nprobe or 16
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"Unknown index kind {kind!r}; use 'auto', 'exact', 'ivf' or 'hnsw'")
    index.add(x)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: scores (Q, k) float32 and row ids (Q, k) int64, -1 where fewer than k exist."""
    scores, ids = index.search(_as_matrix(queries, "queries"), k)
    return scores, ids


def exact_topk(
    queries: np.ndarray, database: np.ndarray, k: int, block: int = 2048, block_bytes: int = 256 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of ``queries`` among ``database`` rows: scores (Q, k), ids (Q, k), best first.

    Blocks of queries go through one BLAS product each and ``torch.topk``: about 2x faster than faiss's
    ``IndexFlatIP.search`` on 2 cores (100k x 100k at d=384: ~60 vs 129 s), whose per-query heap dominates once the
    product is done. A block's score matrix is kept under ``block_bytes`` (memory stays flat in the database size).
    ``k`` larger than the database is padded with id -1 and score -inf.
    """
    import torch

    block = max(1, min(block, block_bytes // (4 * max(len(database), 1))))

    q = torch.from_numpy(_as_matrix(queries, "queries"))
    db = torch.from_numpy(_as_matrix(database, "database"))
    kk = min(k, db.shape[0])
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    if kk == 0:
        return scores, ids
    with torch.no_grad():
        for lo in range(0, len(q), block):
            top = torch.topk(q[lo : lo + block] @ db.T, kk, dim=1)
            scores[lo : lo + block, :kk] = top.values.numpy()
            ids[lo : lo + block, :kk] = top.indices.numpy()
    return scores, ids


def tune_nprobe(
    index,
    vectors: np.ndarray,
    k: int,
    *,
    target_recall: float = 0.99,
    sample: int = 1000,
    seed: int = 0,
    max_candidates: int = 32_768,
) -> tuple[int, float]:
    """The smallest power-of-two ``nprobe`` (from the index's current one) whose top-k self-join reaches
    ``target_recall`` against exact search on a sample of rows -> (nprobe, recall); the index is left set to it.

    Recall on real embeddings depends on the data (synthetic clustered vectors reach 0.998 at nprobe 16; MiniLM
    title vectors of 100k products only 0.926), so the nightly measures it instead of trusting a constant. Recall
    counts ties (`recall_at_k` with scores): a catalog of templated titles has many products at the same score, and
    which of them exact search lists first is arbitrary. The join's cost grows with nprobe, so nprobe stops where a
    query would scan ``max_candidates`` vectors on average (at 1M products and 4,000 lists: nprobe 131) or at all
    lists; the recall reached there is returned (and logged by the caller), not raised to the target."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    x = _as_matrix(vectors)
    k = min(k, len(x) - 1)
    cap = min(ivf.nlist, max(1, ivf.nprobe, int(max_candidates * ivf.nlist / max(len(x), 1))))
    rows = np.sort(np.random.default_rng(seed).choice(len(x), min(sample, len(x)), replace=False))
    truth, truth_scores = _topk_excluding_self(None, x, rows, k)
    while True:
        got, got_scores = _topk_excluding_self(index, x, rows, k)
        recall = recall_at_k(got, truth, got_scores, truth_scores)
        if recall >= target_recall or ivf.nprobe >= cap:
            return int(ivf.nprobe), recall
        ivf.nprobe = min(ivf.nprobe * 2, cap)


def recall_at_k(
    approx_ids: np.ndarray,
    exact_ids: np.ndarray,
    approx_scores: np.ndarray | None = None,
    exact_scores: np.ndarray | None = None,
    tol: float = 1e-5,
) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (exact's -1 padding ignored).

    With scores, ties count: an approximate neighbour scoring at least the exact k-th score (within ``tol``) is a
    true top-k neighbour even when exact search listed another product of the same score."""
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"approx_ids has {approx_ids.shape[0]} queries but exact_ids has {exact_ids.shape[0]}")
    hits = total = 0
    for q, (a, e) in enumerate(zip(approx_ids, exact_ids, strict=True)):
        real = e >= 0
        n = int(real.sum())
        if approx_scores is not None and exact_scores is not None and n:
            kth = exact_scores[q][real].min()
            hits += min(n, int(((approx_scores[q] >= kth - tol) & (a >= 0)).sum()))
        else:
            hits += np.isin(e[real], a).sum()
        total += n
    return float(hits / max(total, 1))


# -------------------------------------------------------------------------------------------------- neighbour graph


@dataclass(frozen=True)
class NeighborGraph:
    """Directed top-k lists: row i holds the k nearest other products of product ``ids[i]``.

    Attributes:
        ids: product ids (N,).
        neighbors: row positions of the neighbours (N, k) int64, best first; -1 where the row was not queried.
        scores: their inner products (N, k) float32, -inf where -1.
        cells: the IVF partition the lists were searched in (``IvfCells``, row i in ``cells.cell[i]``), or None
            for exact lists; ``update_graph`` searches the same cells, so an update costs its share of the build.
    """

    ids: np.ndarray
    neighbors: np.ndarray
    scores: np.ndarray
    cells: IvfCells | None = None

    def top(self, k: int) -> NeighborGraph:
        """The graph served ``k`` deep: each list's first ``k`` entries (the rest are spares kept for updates)."""
        return NeighborGraph(ids=self.ids, neighbors=self.neighbors[:, :k], scores=self.scores[:, :k],
                             cells=self.cells)  # fmt: skip

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The undirected pair set (a, b, score), ``a < b`` in id order, each pair once, sorted by (a, b)."""
        ia, ib, score = self.pair_positions()
        return self.ids[ia], self.ids[ib], score

    def pair_positions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``pairs`` as row positions into ``ids`` (the same pairs in the same order)."""
        n, k = self.neighbors.shape
        src = np.repeat(np.arange(n), k)
        dst = self.neighbors.ravel()
        keep = dst >= 0
        return _canonical_pairs(np.asarray(self.ids), src[keep], dst[keep], self.scores.ravel()[keep])


def _canonical_pairs(
    ids: np.ndarray, src: np.ndarray, dst: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, score) edges -> each undirected pair once as positions (a, b), ``ids[a] < ids[b]``, sorted by
    (ids[a], ids[b]), with the larger of its two scores (the directions may differ in the last bit: different BLAS
    blocking). The work runs on integer keys of each id's rank, not on the ids: a lexsort of the 10M string pairs of
    a 1M-product graph took 24 s, one argsort of the 1M ids takes ~1 s."""
    if len(src) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    by_id = np.argsort(ids, kind="stable")
    rank = np.empty(len(ids), np.int64)
    rank[by_id] = np.arange(len(ids))
    ra, rb = rank[src], rank[dst]
    key = np.minimum(ra, rb) * len(ids) + np.maximum(ra, rb)
    order = np.argsort(key, kind="stable")
    key, score = key[order], np.asarray(score, np.float32)[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    key, best = key[starts], np.maximum.reduceat(score, starts)
    return by_id[key // len(ids)], by_id[key % len(ids)], best


def isin_ids(ids: np.ndarray, values: Iterable[Any]) -> np.ndarray:
    """``np.isin`` for product ids, by hash lookup: on object (string) arrays ``np.isin`` sorts, 153 s for 1M ids
    against 10k (a profile of the 1M nightly's 1% rerun); this takes ~0.1 s."""
    wanted = set(np.asarray(values).tolist())
    return np.fromiter((i in wanted for i in np.asarray(ids).tolist()), dtype=bool, count=len(ids))


@dataclass(frozen=True)
class IvfCells:
    """An inverted-file partition of a graph's rows, searched cell by cell.

    ``centroids`` (L, D) unit vectors; ``cell`` (N,) the cell of each row; ``nprobe``: the rows of a cell are
    searched against the rows of the ``nprobe`` cells whose centroids are nearest their own centroid (``probe``),
    one (|cell|, |candidates|) matrix product per cell. Probing the cell's neighbours rather than each query's own
    nearest cells is the approximation (measured by recall against exact search). A graph keeps its cells
    (``NeighborGraph.cells``), so ``update_graph`` scores a new vector against the same candidates a full search
    over these cells would: the cost of an update is its share of the build, not an (N, C) product.
    """

    centroids: np.ndarray
    cell: np.ndarray
    nprobe: int

    @staticmethod
    def from_index(index) -> IvfCells:
        """The cells of a faiss IVF index (its quantizer's centroids, each stored row's list, its nprobe)."""
        import faiss

        ivf = faiss.extract_index_ivf(index)
        inv = ivf.invlists
        cell = np.full(index.ntotal, -1, dtype=np.int32)
        for lst in range(ivf.nlist):
            size = inv.list_size(lst)
            if size:
                cell[faiss.rev_swig_ptr(inv.get_ids(lst), size)] = lst
        return IvfCells(ivf.quantizer.reconstruct_n(0, ivf.nlist), cell, int(ivf.nprobe))

    def assign(self, x: np.ndarray) -> np.ndarray:
        """The cell of each row of ``x``: its nearest centroid by inner product (as faiss assigns)."""
        if len(x) == 0:
            return np.zeros(0, np.int32)
        return exact_topk(x, self.centroids, 1)[1][:, 0].astype(np.int32)

    def extended(self, keep: np.ndarray, new_vectors: np.ndarray) -> IvfCells:
        """The cells of rows ``keep`` of this partition followed by ``new_vectors`` (assigned to their cells)."""
        return IvfCells(self.centroids, np.r_[self.cell[keep], self.assign(new_vectors)].astype(np.int32),
                        self.nprobe)  # fmt: skip

    def probe(self) -> np.ndarray:
        """(L, nprobe): each cell's nearest cells by centroid (itself among them), -1 padded."""
        return exact_topk(self.centroids, self.centroids, min(self.nprobe, len(self.centroids)))[1]

    def members(self) -> list[np.ndarray]:
        """The rows of each cell, in row order."""
        order = np.argsort(self.cell, kind="stable")
        bounds = np.searchsorted(self.cell[order], np.arange(len(self.centroids) + 1))
        return [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def self_search(self, x: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, row ids) of ``x[rows]`` among the rows of their probed cells, self included (the caller
        drops it); rows grouped by cell, one BLAS product and ``torch.topk`` per cell (≈3x faster than faiss's
        ``index.search`` at 1M, nprobe 16, 2 busy cores; numpy's argpartition over the block took most of the time
        once nprobe had to grow)."""
        if len(self.cell) != len(x):
            raise ValueError(f"the cells cover {len(self.cell)} rows but x has {len(x)}")
        members, probe = self.members(), self.probe()
        out_ids = np.full((len(rows), k), -1, dtype=np.int64)
        out_scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
        slot = np.full(len(x), -1, dtype=np.int64)
        slot[rows] = np.arange(len(rows))
        order = np.argsort(self.cell[rows], kind="stable")
        bounds = np.flatnonzero(np.r_[True, np.diff(self.cell[rows][order]) != 0, True])
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            q = rows[order[lo:hi]]
            cand = np.concatenate([members[p] for p in probe[self.cell[q[0]]] if p >= 0])
            kk = min(k, len(cand))
            top_s, top = exact_topk(x[q], x[cand], kk)
            out_ids[slot[q], :kk] = cand[top]
            out_scores[slot[q], :kk] = top_s
        return out_scores, out_ids

    def cross(
        self, x: np.ndarray, n_old: int, depth: int, row_floor: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``cross_topk`` of the new rows ``x[n_old:]`` restricted to these cells (``self.cell`` covers all of
        ``x``) -> ``(row_scores, row_ids)`` (n_old, depth): each old row's best new rows scoring at least its floor
        (ids: query index j, row ``n_old + j``), and ``(col_scores, col_ids)`` (C, depth): each new row's list over
        the rows of ``x`` (itself left out).

        A new row in cell b is scored against the rows of ``probe[b]`` (its own list, as ``self_search`` would) and
        against the old rows of each cell a with b in ``probe[a]`` (the lists a full search over these cells would
        have scored it in). Work: one product per cell with any such new row, against that cell's rows alone."""
        import torch

        n, c = len(x), len(x) - n_old
        if len(self.cell) != n:
            raise ValueError(f"the cells cover {len(self.cell)} rows but x has {n}")
        row_s = np.full((n_old, depth), -np.inf, np.float32)
        row_i = np.full((n_old, depth), -1, np.int64)
        col_s = np.full((c, depth), -np.inf, np.float32)
        col_i = np.full((c, depth), -1, np.int64)
        if c == 0 or depth == 0:
            return row_s, row_i, col_s, col_i
        probe, members = self.probe(), self.members()
        new_cell = self.cell[n_old:].astype(np.int64)
        # (query, cell) incidences: forward, cell a in probe[b]; reverse, b in probe[a] (cells sorted by b)
        fwd = probe[new_cell]
        fwd_q, fwd_a = np.repeat(np.arange(c), fwd.shape[1]), fwd.ravel()
        src, dst = np.repeat(np.arange(len(probe)), probe.shape[1]), probe.ravel()
        by_dst = np.argsort(dst, kind="stable")
        start = np.searchsorted(dst[by_dst], new_cell, "left")
        count = np.searchsorted(dst[by_dst], new_cell, "right") - start
        pos = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count) + np.repeat(start, count)
        rev_q, rev_a = np.repeat(np.arange(c), count), src[by_dst[pos]]
        keep = fwd_a >= 0
        q_all = np.r_[fwd_q[keep], rev_q]
        a_all = np.r_[fwd_a[keep], rev_a]
        is_fwd = np.r_[np.ones(int(keep.sum()), bool), np.zeros(len(rev_q), bool)]
        order = np.lexsort((q_all, a_all))
        q_all, a_all, is_fwd = q_all[order], a_all[order], is_fwd[order]
        bounds = np.flatnonzero(np.r_[True, a_all[1:] != a_all[:-1], True])
        xt = torch.from_numpy(x)
        floor = np.asarray(row_floor, np.float32)
        with torch.no_grad():
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                rows = members[a_all[lo]]
                if len(rows) == 0:
                    continue
                qs = np.unique(q_all[lo:hi])
                fwd_here = np.zeros(len(qs), bool)
                fwd_here[np.searchsorted(qs, q_all[lo:hi][is_fwd[lo:hi]])] = True
                rev_here = np.zeros(len(qs), bool)
                rev_here[np.searchsorted(qs, q_all[lo:hi][~is_fwd[lo:hi]])] = True
                s = xt[n_old + qs] @ xt[rows].T  # (|qs|, |rows|)
                mine = np.flatnonzero(rows >= n_old)  # new rows of this cell: a query's own row is left out
                if len(mine):
                    qq = np.searchsorted(qs, rows[mine] - n_old)
                    hit = (qq < len(qs)) & (qs[np.minimum(qq, len(qs) - 1)] == rows[mine] - n_old)
                    s[qq[hit], mine[hit]] = -np.inf
                f = np.flatnonzero(fwd_here)
                if len(f):  # merged into the running lists of the new rows this block improves (a max is cheaper)
                    sf = s if len(f) == len(qs) else s[f]
                    better = np.flatnonzero(sf.amax(1).numpy() > col_s[qs[f], -1])
                    if len(better):
                        top = torch.topk(sf[better], min(depth, len(rows)), dim=1)
                        qf = qs[f[better]]
                        ms = np.concatenate([col_s[qf], top.values.numpy()], 1)
                        mi = np.concatenate([col_i[qf], rows[top.indices.numpy()]], 1)
                        col_s[qf], col_i[qf] = _best(ms, mi, depth)
                r = np.flatnonzero(rev_here)
                if len(r) and n_old:  # each old row is in one cell: its candidates come from this block alone
                    sr = s if len(r) == len(qs) else s[r]
                    # only the old rows some new vector reaches the floor of (few: a floor is its list's lowest
                    # score); the column maximum first, so the (|r|, |rows|) block is never copied
                    hit = np.flatnonzero((sr.amax(0).numpy() >= floor[np.minimum(rows, n_old - 1)]) & (rows < n_old))
                    if len(hit):
                        top = torch.topk(sr[:, hit].T, min(depth, len(r)), dim=1)
                        vals, idx, dst = top.values.numpy(), qs[r][top.indices.numpy()], rows[hit]
                        ok = vals >= floor[dst, None]
                        row_s[dst, : vals.shape[1]] = np.where(ok, vals, -np.inf)
                        row_i[dst, : vals.shape[1]] = np.where(ok, idx, -1)
        col_i[np.isneginf(col_s)] = -1
        return row_s, row_i, col_s, col_i


def _topk_excluding_self(index, x: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours (len(rows), k) of ``x[rows]`` among the index (exact over ``x`` when None or a flat index: the
    index holds ``x``; an IVF index or ``IvfCells`` over ``x``: searched cell by cell), the query's own row
    dropped."""
    import faiss

    if isinstance(index, IvfCells):
        scores, nbrs = index.self_search(x, rows, k + 1)
    elif index is None or isinstance(index, faiss.IndexFlat):
        scores, nbrs = exact_topk(x[rows], x, k + 1)
    elif faiss.try_extract_index_ivf(index) is not None:
        scores, nbrs = IvfCells.from_index(index).self_search(x, rows, k + 1)
    else:
        scores, nbrs = search(index, x[rows], k + 1)
    is_self = nbrs == rows[:, None]
    # a query whose own row is not returned (exact duplicates tie with it) drops its last hit instead
    no_self = ~is_self.any(1)
    is_self[no_self, -1] = True
    keep = ~is_self
    nbrs = nbrs[keep].reshape(len(rows), k)
    scores = scores[keep].reshape(len(rows), k)
    scores = np.where(nbrs >= 0, scores, -np.inf).astype(np.float32)
    return nbrs.astype(np.int64), scores


def knn_graph(
    ids: np.ndarray, vectors: np.ndarray, k: int, index=None, queries_mask: np.ndarray | None = None
) -> NeighborGraph:
    """The top-k graph of ``vectors`` (self excluded); only rows in ``queries_mask`` are queried, when given.

    Args:
        ids: product ids (N,), row i of ``vectors`` is product ``ids[i]``.
        vectors: (N, D) L2-normalised float32.
        k: neighbours per product.
        index: a faiss index holding exactly ``vectors`` in order, or ``IvfCells`` over them; when None, exact
            search (``exact_topk``) up to ``EXACT_MAX`` rows, else the index ``build_index`` picks. An IVF index's
            cells go with the graph (``NeighborGraph.cells``) for ``update_graph``.
        queries_mask: (N,) bool, True for the rows to query (new and changed products); None queries all.
    """
    import faiss

    x = _as_matrix(vectors)
    ids = np.asarray(ids)
    if len(ids) != len(x):
        raise ValueError(f"ids has {len(ids)} entries but vectors has {len(x)} rows; pass one id per row")
    if index is None and len(x) > EXACT_MAX:
        index = build_index(x)
    if not isinstance(index, IvfCells) and index is not None and faiss.try_extract_index_ivf(index) is not None:
        index = IvfCells.from_index(index)  # once, not per search
    ntotal = len(index.cell) if isinstance(index, IvfCells) else None if index is None else index.ntotal
    if ntotal is not None and ntotal != len(x):
        raise ValueError(f"index holds {ntotal} vectors but vectors has {len(x)}; build it from vectors")
    k = min(k, len(x) - 1)
    neighbors = np.full((len(x), k), -1, dtype=np.int64)
    scores = np.full((len(x), k), -np.inf, dtype=np.float32)
    rows = np.arange(len(x)) if queries_mask is None else np.flatnonzero(queries_mask)
    if len(rows) and k > 0:
        neighbors[rows], scores[rows] = _topk_excluding_self(index, x, rows, k)
    cells = index if isinstance(index, IvfCells) else None
    return NeighborGraph(ids=ids, neighbors=neighbors, scores=scores, cells=cells)


def candidate_pairs(
    ids: np.ndarray, vectors: np.ndarray, k: int, index=None, queries_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k self-join as pairs (a, b, score), ``a < b``, deduplicated, self excluded.

    With ``queries_mask`` (new/changed products) only those rows are searched, against the full index, so a pair
    between two unmasked products is never produced.
    """
    return knn_graph(ids, vectors, k, index=index, queries_mask=queries_mask).pairs()


BF16_SLACK = 2.0**-6  # |bf16 score - fp32 score| <= (2u + u^2 + u) |x| |q| with u = 2^-8 (inputs and output rounded)


def cross_topk(
    x: np.ndarray,
    queries: np.ndarray,
    k_rows: int,
    k_cols: int,
    *,
    self_offset: int | None = None,
    row_floor: np.ndarray | None = None,
    block_bytes: int = 256 << 20,
    screen: Literal["auto", "bf16", "fp32"] = "auto",
    extra: int = 32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both directions of one exact (N, C) inner product, in one pass over ``x``.

    Returns ``(row_scores, row_ids)`` (N, k_rows): each row of ``x``'s best queries, and ``(col_scores, col_ids)``
    (C, k_cols): each query's best rows of ``x``; best first, padded with -inf / -1. With ``self_offset``, query j
    is row ``self_offset + j`` of ``x`` and that pair is left out of both. With ``row_floor`` (N,), a row keeps only
    queries scoring at least its floor (an update needs only the new vectors that enter a list, and few rows have
    any). Blocks of ``x`` rows keep the (C, b) score matrix under ``block_bytes``. Per block, one maximum per
    query and one per row pick the queries whose running top-k the block improves and the rows that reach their
    floor, and ``torch.topk`` runs on those alone: after the first blocks few qualify, and the pass costs little
    more than its matrix products.

    ``screen="bf16"`` runs that pass in bf16 (~4x the fp32 matmul rate on CPUs with AMX or AVX512-BF16) and still
    returns exact fp32 scores and lists. A bf16 score is within ``slack = BF16_SLACK * max|x| * max|q|`` of the
    fp32 one, so the pass keeps ``extra`` more candidates per list, with the row floors lowered by the slack; the
    candidates are rescored in fp32, and a list is certified when nothing outside its candidates can reach its top
    k: its weakest candidate's bf16 score plus the slack is at most its k-th exact score, or below its floor, or
    the list held every eligible candidate. The lists that fail are searched again in fp32 alone. ``auto``: bf16
    where ``features.runtime.cpu_bf16_speedup`` measures it at least 1.5x faster and the product is large
    (N x C >= 2^26); fp32 otherwise, and always when rows have no floor (every row would be a list to rescore).
    """
    import torch

    x, q = _as_matrix(x), _as_matrix(queries, "queries")
    n, c = len(x), len(q)
    if screen not in ("auto", "bf16", "fp32"):
        raise ValueError(f"screen {screen!r} is not one of 'auto', 'bf16', 'fp32'")
    own = None if self_offset is None else self_offset + np.arange(c)
    if screen == "auto":
        from features.runtime import cpu_bf16_speedup

        big = n * c >= 1 << 26 and row_floor is not None
        screen = "bf16" if big and cpu_bf16_speedup() >= 1.5 else "fp32"
    if screen == "fp32" or not (n and c) or (k_rows and row_floor is None):
        return _cross_scan(x, q, k_rows, k_cols, own, row_floor, block_bytes, torch.float32, 0.0)
    slack = BF16_SLACK * _max_norm(x) * _max_norm(q)
    floor = np.asarray(row_floor, np.float32)
    kr, kc = min(k_rows, c), min(k_cols, n)
    row_s, row_i, col_s, col_i = _cross_scan(
        x, q, min(kr + extra, c), min(kc + extra, n), own, floor, block_bytes, torch.bfloat16, slack
    )
    rows = np.flatnonzero(row_i[:, 0] >= 0)  # the rows with any query over their lowered floor
    exact = _pair_scores(x, rows, q, row_i[rows])
    exact[exact < floor[rows, None]] = -np.inf
    certified = row_s[rows, -1] + slack < floor[rows]
    if kr:
        certified |= -np.sort(-exact, axis=1)[:, kr - 1] >= row_s[rows, -1] + slack
    exact_c = _pair_scores(q, np.arange(c), x, col_i)
    certified_c = np.ones(c, bool)
    if kc:
        certified_c = -np.sort(-exact_c, axis=1)[:, kc - 1] >= col_s[:, -1] + slack
    rs, ri = np.full((n, k_rows), -np.inf, np.float32), np.full((n, k_rows), -1, np.int64)
    rs[rows], ri[rows] = _best(exact, row_i[rows], k_rows)
    cs, ci = _best(exact_c, col_i, k_cols)
    redo = rows[~certified]
    if len(redo):  # those rows alone in fp32, against every query (their own query, if any, left out)
        pos = np.full(n, -1, np.int64)
        pos[redo] = np.arange(len(redo))
        sub_own = None if own is None else np.where((own >= 0) & (own < n), pos[np.clip(own, 0, n - 1)], -1)
        rs[redo], ri[redo], _, _ = _cross_scan(x[redo], q, k_rows, 0, sub_own, floor[redo], block_bytes,
                                               torch.float32, 0.0)  # fmt: skip
    redo_c = np.flatnonzero(~certified_c)
    if len(redo_c):  # those queries alone in fp32, over every row
        _, _, cs[redo_c], ci[redo_c] = _cross_scan(x, q[redo_c], 0, k_cols, None if own is None else own[redo_c],
                                                   None, block_bytes, torch.float32, 0.0)  # fmt: skip
    for s_, i_ in ((rs, ri), (cs, ci)):
        i_[np.isneginf(s_)] = -1
    return rs, ri, cs, ci


def _cross_scan(x, q, k_rows, k_cols, own, row_floor, block_bytes, dtype, slack):
    """`cross_topk`'s blocked pass with scores computed in ``dtype`` (returned as float32), floors lowered by
    ``slack``; ``own`` (C,): the row of ``x`` each query is (its pair left out), -1 or beyond N for none."""
    import torch

    n, c = len(x), len(q)
    kr, kc = min(k_rows, c), min(k_cols, n)
    row_s = np.full((n, k_rows), -np.inf, np.float32)
    row_i = np.full((n, k_rows), -1, np.int64)
    col_s = torch.full((c, kc), -np.inf)
    col_i = torch.full((c, kc), -1, dtype=torch.int64)
    block = max(1, block_bytes // (torch.finfo(dtype).bits // 8 * max(c, 1)))
    qq = torch.from_numpy(q).to(dtype)
    floor = None if row_floor is None else torch.from_numpy(np.asarray(row_floor, np.float32) - np.float32(slack))
    with torch.no_grad():
        for lo in range(0, n if c else 0, block):
            s = qq @ torch.from_numpy(x[lo : lo + block]).to(dtype).T  # (C, b): a query's scores are contiguous
            b = s.shape[1]
            if own is not None:  # the queries whose own row is in this block
                j = np.flatnonzero((own >= lo) & (own < lo + b))
                s[j, own[j] - lo] = -np.inf
            if kc:  # the queries whose running top-k this block improves
                cols = torch.nonzero(s.amax(1) > col_s[:, -1].to(dtype)).flatten()
                if len(cols):
                    top = torch.topk(s[cols], min(kc, b), dim=1)
                    merged_s = torch.cat([col_s[cols], top.values.float()], 1)
                    merged_i = torch.cat([col_i[cols], top.indices + lo], 1)
                    best = torch.topk(merged_s, kc, dim=1)
                    col_s[cols], col_i[cols] = best.values, torch.gather(merged_i, 1, best.indices)
            if kr:
                rows = torch.arange(b)
                if floor is not None:
                    rows = torch.nonzero(s.amax(0).float() >= floor[lo : lo + b]).flatten()
                top = torch.topk(s[:, rows], kr, dim=0)
                vals = top.values.float()
                if floor is not None:
                    vals = torch.where(vals >= floor[lo + rows], vals, -np.inf)
                row_s[lo + rows.numpy(), :kr] = vals.T.numpy()
                row_i[lo + rows.numpy(), :kr] = top.indices.T.numpy()
    col_scores = np.full((c, k_cols), -np.inf, np.float32)
    col_ids = np.full((c, k_cols), -1, np.int64)
    col_scores[:, :kc], col_ids[:, :kc] = col_s.numpy(), col_i.numpy()
    for s_, i_ in ((row_s, row_i), (col_scores, col_ids)):
        i_[np.isneginf(s_)] = -1  # a masked self pair, below the floor, or padding
    return row_s, row_i, col_scores, col_ids


def _same_start(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` begin at the same address (``b`` a leading view of ``a``, or ``a`` itself)."""
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and (a.size > 0 or b.size > 0)


def _max_norm(a: np.ndarray) -> float:
    """The largest row norm of ``a``."""
    import torch

    return float(torch.linalg.vector_norm(torch.from_numpy(a), dim=1).max()) if len(a) else 0.0


def _pair_scores(a: np.ndarray, rows: np.ndarray, b: np.ndarray, idx: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(len(rows), k) fp32 inner products of ``a[rows[i]]`` with ``b[idx[i, t]]``; -inf where ``idx`` is -1."""
    out = np.full(idx.shape, -np.inf, np.float32)
    for lo in range(0, len(rows), chunk):
        i = idx[lo : lo + chunk]
        s = np.einsum("nd,nkd->nk", a[rows[lo : lo + chunk]], b[np.maximum(i, 0)])
        out[lo : lo + chunk] = np.where(i >= 0, s, -np.inf)
    return out


def _best(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best (score, id), best first, padded with -inf / -1."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    s, i = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    pad = ((0, 0), (0, k - s.shape[1]))
    return np.pad(s, pad, constant_values=-np.inf), np.pad(i, pad, constant_values=-1)


def update_graph(
    graph: NeighborGraph,
    vectors: np.ndarray,
    new_ids: np.ndarray,
    new_vectors: np.ndarray,
    *,
    removed_ids: np.ndarray | None = None,
    index=None,
    k: int | None = None,
    depth: int | None = None,
    exact_queries: int = 0,
    screen: Literal["auto", "bf16", "fp32"] = "auto",
    vector_rows: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> tuple[NeighborGraph, np.ndarray]:
    """The graph after adding new products and replacing changed ones, with work proportional to the change.

    Lists are kept ``depth`` deep and served ``k`` deep: the ``depth - k`` spare entries let a list lose neighbours
    (changed or deleted products) and still hold its exact top-k. One exact (N, C) product against the C new
    vectors (``cross_topk``) gives both directions at once: every new product's list, and every old list's best new
    candidates. An old list keeps its surviving entries plus the new candidates scoring at least its lowest survivor
    (an unchanged product below that score was never in the list, so nothing between is missing). Only a list left
    with fewer than ``k`` entries is searched again: exactly when there are at most ``max(C, exact_queries)`` of
    them, else through ``index``. With exact search the top-k lists equal ``knn_graph`` on the updated catalog (up
    to score ties); the cost is one (N, C) product, not a new index over N.

    A graph searched in IVF cells (``graph.cells``, an approximate build) is updated in the same cells: new vectors
    are assigned to their nearest centroid, the (N, C) product is restricted to the cells a full search over those
    cells would have scored each pair in (``IvfCells.cross``), and stale lists are searched in them again. The lists
    then equal ``knn_graph(index=cells)`` on the updated catalog (up to ties; a list whose probed cells hold fewer
    rows than ``depth`` aside), and the cost is about C/N of the build's, not C/N of an exact self-join.

    Args:
        graph: the current graph, over ``vectors`` (with its ``cells`` when it was searched in IVF cells).
        vectors: (N, D) the vectors ``graph`` was built from.
        new_ids: ids of new or changed products (C,).
        new_vectors: (C, D) their vectors.
        removed_ids: ids deleted from the catalog, if any.
        index: for lists searched again (a graph without cells): a faiss index over the returned vectors (old kept
            rows, then new), or a function building one from them; exact search when None.
        k: entries a list must hold to be served (default: the graph's width, i.e. no spare).
        depth: entries kept per list (default: the graph's width); a list searched again gets this many.
        exact_queries: lists searched again exactly, not through ``index``, up to this many (or C, if more).
        screen: the exact (N, C) product's arithmetic (``cross_topk``): its result is exact either way.
        vector_rows: when given, ``graph.ids[i]``'s vector is ``vectors[vector_rows[i]]`` (-1: none, allowed only for
            an id that is replaced or removed), so a caller holding a matrix in another order needs no copy of it.
        out: a (>= N', D) float32 buffer the updated vectors are written into (returned as ``out[:N']``) instead
            of a new matrix. It may be the buffer ``vectors`` is a leading view of (the caller gives the matrix
            up): the kept rows then move up in place, and the returned graph's old rows follow the order of
            their rows in ``vectors``. At 1M x 384 this saves a 1.5 GB matrix and its page faults (~2 s here).

    Returns:
        The updated graph and its (N', D) vectors.
    """
    old_x, new_x = _as_matrix(vectors), _as_matrix(new_vectors, "new_vectors")
    new_ids = np.asarray(new_ids)
    if len(new_ids) != len(new_x):
        raise ValueError(f"new_ids has {len(new_ids)} entries but new_vectors has {len(new_x)} rows")
    width = graph.neighbors.shape[1]
    depth = width if depth is None else depth
    k = depth if k is None else min(k, depth)
    gone = isin_ids(graph.ids, new_ids if removed_ids is None else np.r_[new_ids, np.asarray(removed_ids)])
    kept = np.flatnonzero(~gone)
    source = kept
    if vector_rows is not None:
        vector_rows = np.asarray(vector_rows, np.int64)
        if len(vector_rows) != len(graph.ids):
            raise ValueError(f"vector_rows has {len(vector_rows)} entries but the graph has {len(graph.ids)} ids")
        source = vector_rows[kept]
        if (source < 0).any() or (source >= len(old_x)).any():
            bad = graph.ids[kept[(source < 0) | (source >= len(old_x))][:3]].tolist()
            raise ValueError(f"products kept in the graph have no vector row (first: {bad}); pass them as new_ids")
    elif len(old_x) != len(graph.ids):
        raise ValueError(f"vectors has {len(old_x)} rows but the graph has {len(graph.ids)} ids; pass vector_rows")
    n_old, n = len(kept), len(kept) + len(new_ids)
    in_place = out is not None and _same_start(out, old_x)
    if out is not None:
        if out.dtype != np.float32 or out.ndim != 2 or out.shape[1:] != old_x.shape[1:] or len(out) < n:
            raise ValueError(f"out is {out.dtype} {out.shape}; pass a float32 buffer of at least ({n}, "
                             f"{old_x.shape[1]})")  # fmt: skip
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous array")
        if not in_place and np.shares_memory(out, old_x):
            raise ValueError("out overlaps vectors without starting at its first row; pass vectors' own buffer")
        if in_place:  # old rows in the order of their vector rows: each moves up (or stays), never down
            order = np.argsort(source, kind="stable")
            kept, source = kept[order], source[order]
            if np.shares_memory(new_x, out):
                new_x = new_x.copy()
            if (np.diff(source) == 0).any():  # two products on one row: a row could be read after it is moved
                in_place, out = False, None
    remap = np.full(len(graph.ids) + 1, -1, dtype=np.int64)  # slot -1 maps the padding to itself
    remap[kept] = np.arange(n_old)
    ids = np.concatenate([graph.ids[kept], new_ids])
    x = np.empty((n, old_x.shape[1]), np.float32) if out is None else out[:n]
    if in_place:
        step = 1 << 14  # a block is read (a copy) before it is written, and later blocks read rows past it
        for lo in range(0, n_old, step):
            hi = min(lo + step, n_old)
            x[lo:hi] = old_x[source[lo:hi]]
    else:  # one copy (old_x[kept] and a concatenate made two: 8.7 s at 1M)
        np.take(old_x, source, axis=0, out=x[:n_old], mode="clip")  # "raise" buffers out
    x[n_old:] = new_x
    depth, k = min(depth, n - 1), min(k, n - 1)

    old_nbrs = graph.neighbors[kept, : min(width, depth)]
    nbrs = remap[old_nbrs]
    scores = np.where(nbrs >= 0, graph.scores[kept, : nbrs.shape[1]], -np.inf).astype(np.float32)
    # a list that held every other product has no cutoff; any other list is exact down to its lowest survivor
    complete = (old_nbrs >= 0).sum(1) >= len(graph.ids) - 1
    cutoff = np.where(complete, -np.inf, np.where(nbrs >= 0, scores, np.inf).min(1, initial=np.inf))

    neighbors = np.full((n, depth), -1, dtype=np.int64)
    all_scores = np.full((n, depth), -np.inf, dtype=np.float32)
    cells = None if graph.cells is None else graph.cells.extended(kept, new_x)
    if len(new_x) and depth > 0:
        floor = np.r_[cutoff, np.full(len(new_x), np.inf)]  # new rows' own lists come from the columns
        if cells is None:
            row_s, row_j, col_s, col_j = cross_topk(x, new_x, depth, depth, self_offset=n_old, row_floor=floor,
                                                    screen=screen)  # fmt: skip
        else:  # the same product restricted to the cells the graph was searched in
            row_s, row_j, col_s, col_j = cells.cross(x, n_old, depth, cutoff)
        neighbors[n_old:], all_scores[n_old:] = col_j, col_s
        enter = (row_j[:n_old] >= 0) & (row_s[:n_old] >= cutoff[:, None])
    else:
        enter = np.zeros((n_old, 0), bool)
    # a list nothing entered and nothing left is kept as it was (sorted, padding last); the others are merged and
    # sorted again: a few rows per changed product, not all N (-1 GB of temporaries and -2 s at 1M)
    w0 = nbrs.shape[1]
    neighbors[:n_old, :w0], all_scores[:n_old, :w0] = nbrs, scores
    redo = np.flatnonzero(enter.any(1) | ((old_nbrs >= 0) & (nbrs < 0)).any(1))
    if len(redo):
        cand_n, cand_s = nbrs[redo], scores[redo]
        if enter.shape[1]:
            e = enter[redo]
            cand_n = np.concatenate([cand_n, np.where(e, row_j[redo] + n_old, -1)], axis=1)
            cand_s = np.concatenate([cand_s, np.where(e, row_s[redo], -np.inf)], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :depth]
        w = order.shape[1]
        neighbors[redo, :w] = np.take_along_axis(cand_n, order, 1)
        all_scores[redo, :w] = np.take_along_axis(cand_s, order, 1)

    stale = np.flatnonzero((neighbors[:n_old] >= 0).sum(1) < k)
    if len(stale) and depth > 0:
        if cells is not None:
            index = cells
        elif len(stale) <= max(len(new_x), exact_queries):
            index = None
        elif callable(index):  # a factory: the index can only be built once the updated vectors are known
            index = index(x)
        neighbors[stale], all_scores[stale] = _topk_excluding_self(index, x, stale, depth)
    return NeighborGraph(ids=ids, neighbors=neighbors, scores=all_scores, cells=cells), x


# ------------------------------------------------------------------------------------------------------- threshold


def threshold_for_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The score cut (predict a match when score >= threshold) that maximises F1 on labelled pairs -> (cut, F1)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if len(scores) != len(labels) or len(scores) == 0:
        raise ValueError(f"threshold_for_f1 needs equal, non-empty scores ({len(scores)}) and labels ({len(labels)})")
    if not labels.any():
        raise ValueError("threshold_for_f1 got no positive labels; F1 is undefined, pass a split with matches")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    predicted = np.arange(1, len(s) + 1)
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # a cut can only fall between distinct scores
    f1 = np.where(last_of_tie, 2 * tp / (predicted + labels.sum()), -1.0)
    best = int(np.argmax(f1))
    return float(s[best]), float(f1[best])


def pair_threshold(
    left: np.ndarray, right: np.ndarray, labels: np.ndarray, min_pairs: int = MIN_PAIRS
) -> tuple[float, float] | None:
    """(cut, F1) of the cosine of labelled pairs (rows of ``left`` and ``right`` are L2-normalised vectors of each
    pair's two products) at the F1-optimal cut; None with fewer than ``min_pairs`` pairs or no match among them."""
    labels = np.asarray(labels)
    if len(labels) < min_pairs or not labels.any():
        return None
    return threshold_for_f1((np.asarray(left) * np.asarray(right)).sum(1), labels)


# ---------------------------------------------------------------------------------------------------------- cluster


def cluster(
    a: np.ndarray,
    b: np.ndarray,
    n_or_ids: int | np.ndarray,
    *,
    scores: np.ndarray | None = None,
    max_cluster_size: int = 50,
    min_linkage: float = 0.0,
) -> np.ndarray:
    """Cluster ids (N,) int64 from match pairs: connected components, no component above ``max_cluster_size``.

    Edges are merged strongest first (by ``scores``; in the given order without them) and a merge that would make a
    component larger than ``max_cluster_size`` is refused, so a long chain of matches is cut at its weakest links
    rather than growing into one giant cluster. With ``min_linkage`` > 0 a merge of clusters A and B also needs at
    least ``min_linkage * |A| * |B|`` matched pairs between them (a binary average linkage): 0.5 lets a cluster
    grow only where most of its members match the newcomers, 1.0 keeps only cliques. Matches are transitive, match
    decisions are not: without it one variant matching two products chains them together (Abt-Buy, pair-matcher
    decisions: cluster-pair F1 0.58 with none, 0.80 at 0.5, 0.88 at 1.0 on valid). Cluster ids are 0..C-1 in order
    of each cluster's first member.

    Args:
        a, b: the matched pairs, as row positions when ``n_or_ids`` is a count, else as ids from ``n_or_ids``.
        n_or_ids: the number of products, or their ids (N,).
        scores: pair scores (E,); higher merges first.
        max_cluster_size: the cap; 0 or None for plain connected components.
        min_linkage: the share of the cross pairs that must be matches for two clusters to merge (0: any one).
    """
    if not 0.0 <= min_linkage <= 1.0:
        raise ValueError(f"min_linkage must be in [0, 1] (got {min_linkage}); 0.5 = most cross pairs must match")
    if isinstance(n_or_ids, (int, np.integer)):
        n = int(n_or_ids)
        ia, ib = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    else:
        ids = np.asarray(n_or_ids)
        n = len(ids)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        ia = order[np.searchsorted(sorted_ids, a)] if len(a) else np.zeros(0, dtype=np.int64)
        ib = order[np.searchsorted(sorted_ids, b)] if len(b) else np.zeros(0, dtype=np.int64)
        if len(a) and (
            (sorted_ids[np.searchsorted(sorted_ids, a).clip(0, n - 1)] != a).any()
            or (sorted_ids[np.searchsorted(sorted_ids, b).clip(0, n - 1)] != b).any()
        ):
            raise ValueError("cluster got pair ids that are not in n_or_ids; pass the ids the pairs were made from")
    if len(ia) != len(ib):
        raise ValueError(f"cluster got {len(ia)} left and {len(ib)} right pair ends; pass equal-length arrays")
    if scores is not None:
        edge_order = np.argsort(-np.asarray(scores), kind="stable")
        ia, ib = ia[edge_order], ib[edge_order]
    cap = max_cluster_size or n

    # union-find on Python lists: the loop reads one element at a time, and numpy scalars cost more (the 1M
    # nightly's 761k pairs: 4.72 -> 4.15 s)
    parent = list(range(n))
    size = [1] * n
    members: dict[int, list[int]] = {}  # root -> its members, kept only for clusters of 2+ (min_linkage)
    if min_linkage > 0:  # each product's matches as CSR arrays (a dict of sets held 1.4 GB for 4.7M pairs at 1M)
        src = np.concatenate([ia, ib])
        by_src = np.argsort(src, kind="stable")
        adjacent = np.concatenate([ib, ia])[by_src].astype(np.int32 if n < 2**31 else np.int64)
        start = np.searchsorted(src[by_src], np.arange(n + 1))
        del src, by_src

    def linked(ri: int, rj: int) -> bool:
        """Enough matched pairs between the clusters of roots ``ri`` and ``rj`` (the edge at hand is one)."""
        need = min_linkage * size[ri] * size[rj]
        if need <= 1:
            return True
        small, big = (ri, rj) if size[ri] <= size[rj] else (rj, ri)
        big_set = set(members.get(big, [big]))
        return sum(len(big_set.intersection(adjacent[start[m] : start[m + 1]].tolist()))
                   for m in members.get(small, [small])) >= need  # fmt: skip

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for i, j in zip(ia.tolist(), ib.tolist(), strict=True):
        ri, rj = find(i), find(j)
        if ri == rj or size[ri] + size[rj] > cap or (min_linkage > 0 and not linked(ri, rj)):
            continue
        if size[ri] < size[rj]:
            ri, rj = rj, ri
        parent[rj] = ri
        size[ri] += size[rj]
        if min_linkage > 0:
            grown = members.pop(ri, [ri])  # the larger cluster's list, extended in place
            grown.extend(members.pop(rj, [rj]))
            members[ri] = grown
    roots = np.fromiter((find(i) for i in range(n)), np.int64, n)
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]


def cluster_size_distribution(cluster_ids: np.ndarray) -> dict[str, object]:
    """Sizes of the clusters: {"clusters", "singletons", "max", "mean", "histogram": {size: count}}."""
    sizes = np.bincount(np.asarray(cluster_ids))
    sizes = sizes[sizes > 0]
    hist = Counter(sizes.tolist())
    return {
        "clusters": int(len(sizes)),
        "singletons": int(hist.get(1, 0)),
        "max": int(sizes.max()) if len(sizes) else 0,
        "mean": float(sizes.mean()) if len(sizes) else 0.0,
        "histogram": {int(s): int(c) for s, c in sorted(hist.items())},
    }


def nmi_purity(cluster_ids: np.ndarray, categories: np.ndarray) -> tuple[float, float]:
    """Normalised mutual information and purity of clusters against reference categories -> (NMI, purity)."""
    from sklearn.metrics import normalized_mutual_info_score

    cluster_ids, categories = np.asarray(cluster_ids), np.asarray(categories)
    if len(cluster_ids) != len(categories) or len(cluster_ids) == 0:
        raise ValueError(f"nmi_purity needs equal, non-empty arrays: got {len(cluster_ids)} and {len(categories)}")
    nmi = float(normalized_mutual_info_score(categories, cluster_ids))
    _, cat_codes = np.unique(categories, return_inverse=True)
    _, cl_codes = np.unique(cluster_ids, return_inverse=True)
    # sparse contingency: counts of each (cluster, category) pair present, then the best category per cluster
    cells, counts = np.unique(cl_codes * (cat_codes.max() + 1) + cat_codes, return_counts=True)
    best = np.zeros(cl_codes.max() + 1, dtype=np.int64)
    np.maximum.at(best, cells // (cat_codes.max() + 1), counts)
    purity = float(best.sum() / len(cluster_ids))
    return nmi, purity
