"""Prefect flow ``dedupe``: product embeddings -> faiss top-k graph -> scored pairs -> duplicates and clusters.

Per run:

1. embed the products that are new or changed (content hash) or not yet embedded by this model version; the
   others keep their vectors (Delta table ``embeddings``);
2. the top-k neighbour graph (``knn_graph``): built once, then updated incrementally
   (``features.similarity.update_graph``). Lists are stored k + k/2 deep and served k deep. One exact product of
   the new/changed vectors against all vectors gives their lists and the new candidates of every old list; a list
   that lost neighbours to a change keeps its exact top-k from its spare entries, and only one that lost more than
   its spares is searched again. With exact search this equals a full recompute; the work is one (N, C) product,
   with no index built (screened in bf16 where the CPU runs bf16 at least 1.5x faster, then rescored in fp32: the
   result stays exact, ``features.similarity.cross_topk``; 1M x 10k: 53.8 -> 30.6 s in ``bench/dedupe.py``). A
   full build (the first run, ``--full``, or more than N/16 changed beyond ``exact_max``) uses exact inner product
   up to ``exact_max`` products (50k); beyond, IVF whose ``nprobe`` is raised until the self-join's recall@k against
   exact search, measured on a sample, reaches ``target_recall`` (0.99); the recall and nprobe are reported. An IVF
   graph keeps its cells (``knn_graph.ivf_cell``, the centroids as safetensors under ``_models/ivf-cells/``), and
   its updates search the changed vectors in those cells (``features.similarity.IvfCells``): the lists equal a
   search of the updated catalog in the same cells, at about C/N of the build's cost instead of an (N, C) product;
3. pairs scoring at least the threshold (chosen on labelled validation pairs when the warehouse has them for this
   source, else the given one) -> ``duplicates``; connected components with a cap against giant chained clusters
   -> ``clusters`` (both derived from the graph and rewritten in one commit each).

Embedding methods: ``encoder`` (``product-encoder@champion``), ``text`` (the pretrained all-MiniLM-L6-v2 text
tower, mean-pooled: no training needed, a strong baseline for titles) or ``chars`` (``features.charngram``: hashed
char n-gram TF-IDF sketches, no neural model, thousands of products per second on one core; its IDF is fitted on the
catalog the first time and stored under ``<warehouse>/_models/char-ngrams/``, then frozen, so incremental runs keep
their vectors; ``refit`` fits again, which re-embeds everything).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import reports
from flows.defaults import COMMIT_ROWS, COMMIT_SECONDS
from warehouse import schema
from warehouse.tables import Warehouse

if TYPE_CHECKING:
    from flows.enrich import Superseded

PRETRAINED_TEXT = "minilm-pretrained"
CHAR_NGRAMS = "char-ngrams"
METHODS = ("encoder", "text", "chars", "matcher")
MATCHER_TOWER = "pair-matcher-supcon"
EMBED_PRECISIONS = ("fp32", "int8")


class Embedder:
    """rows -> (N, D) float32 L2-normalised, with the name / version / run recorded on every row it produces."""

    def __init__(
        self,
        method: str,
        model_version: str | None = None,
        precision: str = "fp32",
        artifact: tuple[str, str] | None = None,
    ):
        if precision not in EMBED_PRECISIONS:
            raise ValueError(f"embedding precision {precision!r} is not one of {EMBED_PRECISIONS}")
        self.method = method
        self.text_onnx = None  # the text tower's ONNX Runtime export (fp32 or int8) runs in its place
        if method == "chars":
            from features.charngram import CharNgramEmbedder

            if artifact is None:
                raise ValueError("the chars embedder needs its fitted state: resolve it with resolve_embedder(wh=...)")
            data = Warehouse(artifact[0]).read_bytes(artifact[1])
            if data is None:
                raise LookupError(f"the fitted char n-gram state {artifact[1]} is missing under {artifact[0]}; "
                                  "run `enrich dedupe --method chars --refit`")  # fmt: skip
            self.chars = CharNgramEmbedder.from_bytes(data)
            self.name, self.version, self.run_id = CHAR_NGRAMS, self.chars.version, None
            return
        if method == "text":
            from features.towers import TextTower, TextTowerConfig

            self.tower = TextTower(TextTowerConfig(max_length=128)).eval()
            self.name, self.version, self.run_id = PRETRAINED_TEXT, "0", None
        elif method == "encoder":
            from flows.train_encoder import load_encoder

            self.model, self.version, self.run_id = load_encoder(model_version)
            self.name = "product-encoder"
        elif method == "matcher":  # the SupCon-tuned tower saved with the pair matcher
            from features.supcon import SupConTuner
            from flows.train_matcher import load_matcher

            matcher, self.version, self.run_id = load_matcher(model_version)
            self.supcon = matcher.features.supcon
            if not isinstance(getattr(self.supcon, "__self__", None), SupConTuner):
                raise LookupError(f"pair-matcher version {self.version} has no SupCon tower to embed with; train one "
                                  "with `enrich train matcher --supcon-epochs 4`, or use another --method")  # fmt: skip
            self.name = MATCHER_TOWER
            return
        else:
            raise ValueError(f"unknown embedding method {method!r}; use one of {METHODS}")
        from features.onnx_backend import onnx_available, onnx_text_tower

        # the text tower under ONNX Runtime: int8 by request; fp32 whenever it is installed (~2x eager PyTorch on 2
        # cores, the same vectors to ~1e-6, so the model version's label does not change)
        if precision == "int8" or onnx_available():
            tower = self.tower if method == "text" else self.model.text_tower
            self.text_onnx = onnx_text_tower(tower, int8=precision == "int8")

    def __call__(self, rows: list[dict[str, Any]], batch_size: int = 64) -> np.ndarray:
        import torch

        from features.matcher import serialize
        from features.onnx_backend import swapped

        if self.method == "chars":
            return self.chars([serialize(r) for r in rows])
        if self.method == "matcher":
            return self.supcon([serialize(r) for r in rows])
        with torch.no_grad():
            if self.method == "text":
                return self.tower.embed_many([serialize(r) for r in rows], batch_size, states=self.text_onnx)
            from features.encoder import encode_products

            with swapped(self.model, "text_tower", self.text_onnx):
                return encode_products(self.model, rows, batch_size=batch_size)


@dataclass(frozen=True)
class EmbedderRef:
    """Which embedder, by reference, so a task can load it in whatever process runs it (once per process)."""

    method: str
    name: str
    version: str  # as recorded in `embeddings` / `knn_graph`: the model version, "+int8" when run in int8
    run_id: str | None
    tracking_uri: str | None
    precision: str = "fp32"
    artifact: tuple[str, str] | None = None  # (warehouse root, path under it) of a fitted state (``chars``)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def model_version(self) -> str:
        return self.version.split("+")[0]


_EMBEDDERS: dict[EmbedderRef, Embedder] = {}


def resolve_embedder(
    method: str,
    model_version: str | None = None,
    precision: str = "fp32",
    *,
    wh: Warehouse | None = None,
    source: str | None = None,
    refit: bool = False,
    before_fit: Callable[[], Any] | None = None,
) -> EmbedderRef:
    """The embedder a run will use: ``text`` (pretrained MiniLM), ``encoder`` (``product-encoder@champion`` or an
    explicit version; a clear error naming what to run when there is none), ``matcher`` (the SupCon-tuned tower of
    ``pair-matcher@champion``, trained with ``--supcon-epochs``) or ``chars`` (the char n-gram sketch
    fitted on ``wh``'s products of ``source``: the stored fit, or a new one when there is none or ``refit``;
    ``before_fit()`` runs first, e.g. to ingest the catalog it is fitted on). ``precision`` (``fp32`` | ``int8``:
    the text tower int8 under ONNX Runtime; recorded as version ``<v>+int8``, so switching re-embeds everything)
    does not apply to ``chars``, which has no tower."""
    if precision not in EMBED_PRECISIONS:
        raise ValueError(f"embedding precision {precision!r} is not one of {EMBED_PRECISIONS}")
    suffix = "+int8" if precision == "int8" else ""
    if method == "text":
        return EmbedderRef("text", PRETRAINED_TEXT, "0" + suffix, None, None, precision)
    if method == "chars":
        if wh is None:
            raise ValueError("resolve_embedder('chars') needs the warehouse (wh=) its fit lives in")
        return _char_ngrams(wh, source, refit, before_fit)
    if method not in ("encoder", "matcher"):
        raise ValueError(f"unknown embedding method {method!r}; use one of {METHODS}")
    import mlflow

    from flows import tracking
    from flows.train_encoder import MODEL_NAME
    from flows.train_matcher import MODEL_NAME as MATCHER

    if method == "matcher" and precision != "fp32":
        raise ValueError("--method matcher embeds with the matcher's SupCon tower in fp32; drop --precision int8")
    model = MODEL_NAME if method == "encoder" else MATCHER
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    hint = "enrich train encoder" if method == "encoder" else "enrich train matcher --supcon-epochs 4"
    mv = client.get_model_version(model, str(model_version)) if model_version else tracking.champion(
        model, client, hint)  # fmt: skip
    name = MODEL_NAME if method == "encoder" else MATCHER_TOWER
    return EmbedderRef(method, name, f"{mv.version}{suffix}", mv.run_id, mlflow.get_tracking_uri(), precision)


def _char_ngrams(wh: Warehouse, source: str | None, refit: bool, before_fit: Callable[[], Any] | None) -> EmbedderRef:
    """The ``chars`` embedder of ``source`` (or of all products): its stored fit, else fitted now and stored."""
    import hashlib
    import json
    import re

    from features.charngram import CharNgramEmbedder
    from features.matcher import serialize

    scope = "_all" if source is None else f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', source)[-40:]}-" + hashlib.sha256(
        source.encode()).hexdigest()[:8]  # fmt: skip
    pointer = f"_models/{CHAR_NGRAMS}/{scope}.json"
    stored = None if refit else wh.read_bytes(pointer)
    if stored is None:
        if before_fit is not None:
            before_fit()
        if not wh.exists("products"):
            raise LookupError("no products to fit the char n-gram IDF on; ingest a catalog first")
        products = _products(wh, source)
        started = time.perf_counter()

        def texts():
            for start in range(0, products.num_rows, 8192):
                yield from (serialize(r) for r in products.slice(start, 8192).to_pylist())

        fitted = CharNgramEmbedder.fit(texts())
        path = f"_models/{CHAR_NGRAMS}/{fitted.version}.npz"
        wh.write_bytes(path, fitted.to_bytes())
        meta = {"version": fitted.version, "path": path, "fitted_on": fitted.fitted_on, "source": source,
                "fitted_at": datetime.now(UTC).isoformat(),
                "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
        wh.write_bytes(pointer, json.dumps(meta, indent=1).encode())  # last: a crash before it leaves no pointer
        stored = json.dumps(meta).encode()
    meta = json.loads(stored)
    return EmbedderRef("chars", CHAR_NGRAMS, meta["version"], None, None, "fp32", artifact=(wh.root, meta["path"]))


def load_embedder(ref: EmbedderRef) -> Embedder:
    if ref not in _EMBEDDERS:
        if ref.tracking_uri:
            import os

            os.environ["MLFLOW_TRACKING_URI"] = ref.tracking_uri
        version = ref.model_version if ref.method in ("encoder", "matcher") else None
        _EMBEDDERS[ref] = Embedder(ref.method, version, ref.precision, ref.artifact)
    return _EMBEDDERS[ref]


@task(name="embed-batch", cache_policy=NO_CACHE, persist_result=False)
def embed_batch(ref: EmbedderRef, batch: pa.Table) -> np.ndarray:
    rows = batch.to_pylist()
    for r in rows:
        r["images"], r["videos"], r["labels"] = [], [], []
    return load_embedder(ref)(rows)


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
    from features.similarity import pair_threshold

    found = pair_threshold(vectors[[pos[p["left_id"]] for p in pairs]], vectors[[pos[p["right_id"]] for p in pairs]],
                           np.array([p["label"] for p in pairs], dtype=bool))  # fmt: skip
    if found is None:
        return default, "given"
    thr, f1 = found
    return float(thr), f"F1-optimal on {len(pairs)} labelled validation pairs (valid F1 {f1:.3f})"


class StoredVectors(Mapping[str, np.ndarray]):
    """{product_id: vector} of one embedder version: the stored (N, D) matrix plus the vectors embedded in this run.
    ``stack(ids)`` gathers rows in one copy (a dict of 1M numpy views and ``np.stack`` over it took ~8 s at 1M), or
    none when ``ids`` are exactly this run's vectors in the order they were added (a full run)."""

    def __init__(
        self, ids: list[str], matrix: np.ndarray, rows: Sequence[int] | np.ndarray | None = None, capacity: int = 0
    ):
        """``ids[i]``'s vector is ``matrix[rows[i]]`` (default ``rows[i] = i``): a subset of a read matrix is
        referenced, not copied. ``capacity``: how many vectors this run will ``add`` (they go into one matrix of
        that size, so no list of batches is concatenated later: a second copy of them all)."""
        self._pos = dict(zip(ids, range(len(ids)) if rows is None else np.asarray(rows).tolist(), strict=True))
        self._matrix = matrix
        self._new: dict[str, int] = {}  # product_id -> row of the run's vectors
        self._capacity = capacity
        self._added = np.zeros((0, 0), np.float32)  # the run's vectors in rows [0, self._n)
        self._n = 0

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        v = np.asarray(vectors, np.float32)
        if self._n + len(v) > len(self._added):  # beyond the capacity: grow by doubling
            grown = np.empty((max(self._capacity, self._n + len(v), 2 * len(self._added)), v.shape[1]), np.float32)
            if self._n:
                grown[: self._n] = self._added[: self._n]
            self._added = grown
        self._added[self._n : self._n + len(v)] = v
        self._new.update({p: self._n + i for i, p in enumerate(ids)})
        self._n += len(v)

    @property
    def dim(self) -> int:
        return self._matrix.shape[1] if len(self._matrix) else (self._added.shape[1] if self._n else 0)

    def __getitem__(self, pid: str) -> np.ndarray:
        if pid in self._new:
            return self.stack([pid])[0]
        return self._matrix[self._pos[pid]]

    def __contains__(self, pid: object) -> bool:
        return pid in self._new or pid in self._pos

    def __iter__(self) -> Iterator[str]:
        yield from (p for p in self._pos if p not in self._new)
        yield from self._new

    def __len__(self) -> int:
        return len(self._new) + sum(1 for p in self._pos if p not in self._new)

    def release(self) -> None:
        """Drop every vector (the caller is done with them; a later lookup finds none)."""
        self._pos, self._new = {}, {}
        self._matrix, self._added, self._n = np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), 0

    def stored_rows(self, ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """(``stored_matrix``, rows) with ``stored_matrix[rows[i]]`` the vector of ``ids[i]`` read from the table;
        -1 for an id with no stored vector or one embedded again in this run (its stored vector is stale)."""
        rows = np.fromiter((-1 if p in self._new else self._pos.get(p, -1) for p in ids), np.int64)
        return self._matrix, rows

    def stack(self, ids: Iterable[str], *, missing: str = "raise") -> np.ndarray:
        """(len(ids), D) float32 in the order of ``ids``; an id with no vector raises, or is a zero row with
        ``missing="zeros"``."""
        ids = list(ids)
        new_rows = np.fromiter((self._new.get(p, -1) for p in ids), np.int64, len(ids))
        if self._n and len(ids) == self._n and (new_rows == np.arange(self._n)).all():
            return self._added[: self._n]  # this run's vectors, in order: no copy
        out = np.zeros((len(ids), self.dim), np.float32)
        old_rows = np.fromiter((self._pos.get(p, -1) for p in ids), np.int64, len(ids))
        old_rows[new_rows >= 0] = -1  # embedded again in this run: the new vector
        for rows, src in ((old_rows, self._matrix), (new_rows, self._added)):
            hit = rows >= 0
            if len(ids) and hit.all():
                np.take(src, rows, axis=0, out=out, mode="clip")  # one copy ("raise" would buffer ``out``)
            elif hit.any():
                out[hit] = src[rows[hit]]
        lost = (old_rows < 0) & (new_rows < 0)
        if missing != "zeros" and lost.any():
            first = [ids[i] for i in np.flatnonzero(lost)[:3]]
            raise KeyError(f"{int(lost.sum())} products have no vector (first: {first}); run the embed stage first")
        return out


def embed_products(
    wh: Warehouse,
    ref: EmbedderRef,
    products: pa.Table,
    *,
    full: bool = False,
    vectors: bool = True,
    batch_size: int = 512,
    window: int = 1,
    commit_rows: int = COMMIT_ROWS,
    commit_seconds: float = COMMIT_SECONDS,
) -> tuple[StoredVectors | None, int]:
    """Vectors of every product in ``products`` -> (their ``StoredVectors``, how many were embedded now); with
    ``vectors=False`` only the embedding is done and the first element is None (the stored vectors are not read).

    Products whose current content this model version already embedded keep their stored vector; the others are
    embedded batch by batch through the flow's task runner and appended to ``embeddings`` in groups of
    ``commit_rows`` products or ``commit_seconds`` of work (a run stopped halfway keeps every group it committed);
    their old rows are deleted once, at the end (`flows.enrich.Superseded`)."""
    from flows.enrich import CommitGroups, Superseded, submit_windowed

    logger = get_run_logger()
    pending = Superseded(wh, "embed", ("embeddings",), "embedded_at")
    left = recover_embeddings(wh, pending)
    if left:
        logger.warning("deleted %d embeddings left behind by a run that stopped mid-embed", left)
    hashes = dict(zip(products.column("product_id").to_pylist(), products.column("content_hash").to_pylist(),
                      strict=True))  # fmt: skip
    known_ids: list[str] = []
    matrix = np.zeros((0, 0), np.float32)
    known_rows: np.ndarray | None = None  # known_ids[i]'s vector is matrix[known_rows[i]]
    stored: pa.Array | None = pa.array([], pa.string())  # ids with a row of any model (None: any may have one)
    if wh.exists("embeddings"):
        if full:
            stored = None
        else:
            stored = wh.sql("SELECT product_id FROM embeddings").column(0).combine_chunks().cast(pa.string())
            old_ids, old_hashes, stored_matrix = _stored_embeddings(wh, ref, vectors)
            same = [hashes.get(pid) == h for pid, h in zip(old_ids, old_hashes, strict=True)]
            known_rows = np.flatnonzero(np.array(same, dtype=bool))
            known_ids = [old_ids[i] for i in known_rows.tolist()]
            if vectors:
                matrix = stored_matrix  # all rows read; the stale ones are not referenced
    have = set(known_ids)
    todo = [i for i, pid in enumerate(hashes) if pid not in have]
    known = StoredVectors(known_ids, matrix, known_rows, capacity=len(todo)) if vectors else None
    rows = products.take(pa.array(todo, pa.int64())) if todo else products.slice(0, 0)
    batches = ((ref, rows.slice(s, batch_size)) for s in range(0, rows.num_rows, batch_size))
    done = 0

    replaced: list[str] = []  # the products that had a row, once their new one is appended

    def write(groups: list[pa.Table]) -> None:
        # every new vector is appended (a commit whose cost does not grow with the table; one append is atomic, so a
        # rerun finds it stored); the old rows of products that had one go when the stage ends (`Superseded`)
        import pyarrow.compute as pc

        table = pa.concat_tables(groups)
        wh.append("embeddings", table)
        ids = table.column("product_id")
        replaced.extend((ids if stored is None else ids.filter(pc.is_in(ids, value_set=stored))).to_pylist())

    since = pending.begin() if rows.num_rows else None
    commits = CommitGroups(write, commit_rows, commit_seconds)
    for (_, sliced), vecs in submit_windowed(embed_batch, batches, window):
        batch = sliced.to_pylist()
        now = datetime.now(UTC)
        n = len(batch)
        ids = [r["product_id"] for r in batch]
        emb = pa.table({
            "product_id": ids, "vector": list(vecs),
            "content_hash": [r["content_hash"] for r in batch], "model_name": [ref.name] * n,
            "model_version": [ref.version] * n, "mlflow_run_id": [ref.run_id] * n, "embedded_at": [now] * n,
        })  # fmt: skip
        commits.add(emb.cast(schema.EMBEDDINGS), n)
        if known is not None:
            known.add(ids, np.asarray(vecs, np.float32))
        done += n
        logger.info("embedded %d / %d products", done, rows.num_rows)
    commits.flush()
    if since is not None:
        pending.finish(replaced, since)
    return known, done


def recover_embeddings(wh: Warehouse, pending: Superseded) -> int:
    """After a run that died mid-embed (a `flows.enrich.Superseded` marker): the products it gave a vector keep only
    that one; returns how many rows went. No marker: no read at all."""
    since = pending.since()
    if since is None:
        return 0
    dropped = 0
    if wh.exists("embeddings"):
        ts = f"TIMESTAMPTZ '{since.isoformat()}'"
        ids = wh.sql(f"SELECT DISTINCT product_id FROM embeddings WHERE embedded_at >= {ts}").column(0).to_pylist()
        dropped = pending.drop(ids, since)
    pending.end()
    return dropped


def _vector_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float32> column of equal-length vectors -> (N, D) float32, without a Python object per value, filled
    chunk by chunk (``combine_chunks`` first made a second full copy: +1.4 GB transient at 1M x 384)."""
    chunks = [c for c in column.chunks if len(c)]
    if not chunks:
        return np.zeros((0, 0), np.float32)
    nulls = sum(c.null_count for c in chunks)
    if nulls:
        raise ValueError(f"{nulls} stored vectors are null; rerun `enrich dedupe --full` to re-embed them")
    lengths = np.concatenate([c.value_lengths().to_numpy(zero_copy_only=False) for c in chunks])
    if (lengths != lengths[0]).any():
        raise ValueError(f"stored vectors have lengths {sorted(set(lengths.tolist()))}; rerun `enrich dedupe --full`")
    out = np.empty((len(lengths), int(lengths[0])), np.float32)
    row = 0
    for c in chunks:
        out[row : row + len(c)] = c.flatten().to_numpy(zero_copy_only=False).reshape(len(c), -1)
        row += len(c)
    return out


def _stored_embeddings(wh: Warehouse, ref: EmbedderRef, vectors: bool) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, content hashes, (N, D) float32 vectors) of the rows ``ref`` stored in ``embeddings``; vectors only
    when ``vectors``. Read by pyarrow with the filter pushed down, batch by batch into one matrix, then Arrow's pool
    returns its pages: one table of the 1M x 384 vectors read at once peaked +5.2 GB and kept 5.6 GB resident after
    (mimalloc holds freed pages), batches peak +4.4 GB and keep the matrix and the ids (scratch, 1M nightly
    warehouse). DuckDB's list<float> conversion held +2.2 GB more than pyarrow's."""
    import pyarrow.compute as pc

    this_model = (pc.field("model_name") == ref.name) & (pc.field("model_version") == ref.version)
    columns = ["product_id", "content_hash", *(["vector"] if vectors else [])]
    dataset = wh.table("embeddings").to_pyarrow_dataset()
    ids: list[str] = []
    hashes: list[str] = []
    matrix, row = np.zeros((0, 0), np.float32), 0
    n = dataset.count_rows(filter=this_model) if vectors else 0
    for batch in dataset.to_batches(columns=columns, filter=this_model):
        if batch.num_rows == 0:
            continue
        ids += batch.column("product_id").to_pylist()
        hashes += batch.column("content_hash").to_pylist()
        if vectors:
            part = _vector_matrix(pa.chunked_array([batch.column("vector")]))
            if row == 0:
                matrix = np.empty((n, part.shape[1]), np.float32)
            elif part.shape[1] != matrix.shape[1]:
                raise ValueError(f"stored vectors have lengths {sorted({matrix.shape[1], part.shape[1]})}; "
                                 "rerun `enrich dedupe --full`")  # fmt: skip
            matrix[row : row + len(part)] = part
            row += len(part)
    pa.default_memory_pool().release_unused()
    return ids, hashes, matrix[:row]


CELLS_DIR = "_models/ivf-cells"


def _save_cells(wh: Warehouse, cells, run_id: str) -> str:
    """An approximate graph's centroids and nprobe as safetensors under the warehouse -> their path."""
    from safetensors.numpy import save

    relpath = f"{CELLS_DIR}/{run_id}.safetensors"
    wh.write_bytes(relpath, save({"centroids": np.ascontiguousarray(cells.centroids, np.float32),
                                  "nprobe": np.array([cells.nprobe], np.int64)}))  # fmt: skip
    return relpath


def _stored_cells(wh: Warehouse, g: pa.Table):
    """(``IvfCells``, centroids path) of a stored graph's rows ``g``: the centroids from the file its rows name,
    each row's cell; (None, None) for an exact graph, a graph written before cells were kept, or a centroids file
    that is gone (the update is then the exact (N, C) product: right, only slower)."""
    from safetensors.numpy import load

    from features.similarity import IvfCells

    if "ivf_centroids" not in g.column_names or g.column("ivf_centroids").null_count:
        return None, None
    refs = g.column("ivf_centroids").unique().to_pylist()
    blob = wh.read_bytes(refs[0]) if len(refs) == 1 else None
    if blob is None:
        if len(refs) == 1:
            reports.run_logger().warning(
                "the graph's IVF centroids %s are missing: this update searches exactly", refs[0]
            )
        return None, None
    state = load(blob)
    cell = g.column("ivf_cell").to_numpy().astype(np.int32)
    if cell.min(initial=0) < 0 or cell.max(initial=0) >= len(state["centroids"]):
        return None, None
    return IvfCells(state["centroids"], cell, int(state["nprobe"][0])), refs[0]


def _stored_graph(wh: Warehouse, label: str):
    """(graph, {product_id: content hash it was searched with}, centroids path) of ``label``; (None, {}, None) when
    there is none. The graph carries its IVF cells when it was searched in them."""
    from features.similarity import NeighborGraph

    if not wh.exists("knn_graph"):
        return None, {}, None
    import pyarrow.compute as pc

    names = wh.table("knn_graph").to_pyarrow_dataset().schema.names
    extra = "".join(f", {c}" for c in ("ivf_cell", "ivf_centroids") if c in names)  # absent before cells were kept
    g = wh.sql(f"SELECT product_id, neighbors, scores, content_hash{extra} FROM knn_graph "
               f"WHERE model_version = '{label}'")  # fmt: skip
    if g.num_rows == 0:
        return None, {}, None
    old_ids = g.column("product_id").combine_chunks()
    nbrs = g.column("neighbors").combine_chunks()
    lengths = nbrs.value_lengths().to_numpy(zero_copy_only=False)
    kk = int(lengths.max())
    row = np.repeat(np.arange(g.num_rows), lengths)
    col = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = pc.index_in(nbrs.flatten(), value_set=old_ids).fill_null(-1).to_numpy(zero_copy_only=False)
    nb = np.full((g.num_rows, kk), -1, np.int64)
    sc = np.full((g.num_rows, kk), -np.inf, np.float32)
    nb[row, col] = pos
    sc[row, col] = g.column("scores").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    ids = old_ids.to_pylist()
    cells, ref = _stored_cells(wh, g)
    graph = NeighborGraph(ids=np.array(ids, dtype=object), neighbors=nb, scores=sc, cells=cells)
    return graph, dict(zip(ids, g.column("content_hash").to_pylist(), strict=True)), ref


def find_duplicates(
    wh: Warehouse,
    ref: EmbedderRef,
    products: pa.Table,
    known: StoredVectors,
    *,
    source: str | None = None,
    k: int = 10,
    threshold: float = 0.9,
    exact_max: int = 50_000,
    target_recall: float = 0.99,
    max_cluster_size: int = 50,
    min_linkage: float = 0.5,
    full: bool = False,
    spare: int | None = None,
    matcher: tuple[Any, str] | None = None,
) -> dict[str, Any]:
    """The top-k graph (updated incrementally when one of this model version exists), then pairs over the threshold
    -> ``duplicates`` and guarded connected components -> ``clusters``. With ``matcher`` (a fitted
    ``HybridMatcher`` and its label, e.g. ``pair-matcher/3``) every top-k pair is a candidate, scored by the
    matcher and kept at or above its threshold (``_matcher_scores``: only pairs touching a changed product are
    scored again).

    Lists are stored ``k + spare`` deep (spare: k // 2, at least 2) and served ``k`` deep, so a product whose
    neighbours change or leave keeps its exact top-k without being searched again (``update_graph``). An update
    takes ``known``'s read matrix over for the updated vectors, or releases it once the graph holds its own copy
    (``StoredVectors.release``): ``known`` holds no vectors after an update."""
    from features.similarity import (
        IvfCells,
        build_index,
        cluster,
        cluster_size_distribution,
        knn_graph,
        tune_nprobe,
        update_graph,
    )

    run_id = uuid.uuid4().hex
    now = datetime.now(UTC)
    ids = np.array(products.column("product_id").to_pylist(), dtype=object)
    hashes = dict(zip(ids.tolist(), products.column("content_hash").to_pylist(), strict=True))

    def index_for(x: np.ndarray):
        """None (exact search) up to ``exact_max`` rows; beyond, the cells of an IVF index with nprobe raised until
        the self-join's recall at the stored depth on a sample reaches ``target_recall`` (measured against exact
        search, reported in the summary; the spare entries must be right too, since an update may promote them into
        the top k). Only the cells are returned: the index's own copy of ``x`` is freed before the join."""
        if len(x) <= exact_max:
            return None
        index = build_index(x, kind="ivf")
        ann["nprobe"], ann["recall"] = tune_nprobe(index, x, depth, target_recall=target_recall)
        if ann["recall"] < target_recall:
            reports.run_logger().warning(
                "approximate search reaches recall@%d %.3f of the target %.2f at nprobe %d (the cap on its cost); "
                "raise --exact-max to %d for exact search, or use embeddings that separate products better",
                depth, ann["recall"], target_recall, ann["nprobe"], len(x))  # fmt: skip
        return IvfCells.from_index(index)

    depth = k + (max(2, k // 2) if spare is None else spare)
    ann: dict[str, Any] = {"nprobe": None, "recall": None}
    graph, mode = None, "full"
    old_graph, searched_with, cells_ref = (None, {}, None) if full else _stored_graph(wh, ref.label)
    if old_graph is not None and old_graph.neighbors.shape[1] < min(k, len(ids) - 1):
        old_graph = None  # a larger k than the stored lists hold: built again at the new depth
    if old_graph is not None:
        # re-search what is new or changed since the graph was built (by content hash, not by what this run
        # embedded: a run stopped between the embeddings and the graph write leaves changed vectors behind)
        old_ids = old_graph.ids.tolist()
        changed_ids = np.array([p for p in ids.tolist() if searched_with.get(p) != hashes[p]], dtype=object)
        # beyond C ≈ N/16 changed, a new build: one exact (N, C) product costs about as much as an approximate
        # self-join of all N (1M char sketches, scratch timings: 10k x 1M in 66-76 s in fp32; the IVF build + tune +
        # self-join 394 s; the bf16 screen roughly halves the product, bench/dedupe.py's update variant). A graph
        # kept with its IVF cells costs about C/N of its build to update, but its k-means cells were fitted on the
        # catalog of its build: past N/16 changed, they are fitted again
        if len(ids) <= exact_max or len(changed_ids) <= len(ids) / 16:
            removed = np.array(sorted(set(old_ids) - set(hashes)), dtype=object)
            # the graph's vectors are gathered once, inside update_graph, from the stored matrix by row (a stack in
            # the graph's order first made one more (N, D) copy: +1.5 GB at 1M x 384); a product gone from the
            # catalog or changed has no row (-1) and leaves the graph
            stored, rows = known.stored_rows(old_ids)
            leaving = set(changed_ids.tolist()) | set(removed.tolist())
            if any(old_ids[i] not in leaving for i in np.flatnonzero(rows < 0).tolist()):
                # an unchanged product embedded again in this run (a run stopped before its graph write): the
                # vectors in the graph's order, one copy
                stored, rows = known.stack(old_ids, missing="zeros"), None
            new_vec = known.stack(changed_ids.tolist())
            # the read matrix is given up to the update, which moves the kept rows up in it and appends the new
            # ones when it has the room (a new (N, D) matrix cost 1.5 GB and ~2 s of page faults at 1M x 384)
            out = stored if len(stored) >= len(ids) and stored.flags.writeable else None
            graph, vectors = update_graph(old_graph, stored, changed_ids, new_vec, removed_ids=removed,
                                          index=index_for, k=k, depth=depth, vector_rows=rows, out=out,
                                          exact_queries=exact_max**2 // max(len(ids), 1))  # fmt: skip
            # the updated graph holds the vectors (in the read matrix, or its own copy): the rest of the read
            # matrix and the old graph go before the pairs, clusters and table writes (-1.7 GB at 1M)
            del stored, out, old_graph
            known.release()
            assert set(graph.ids.tolist()) == set(ids.tolist())
            cells_how = "" if graph.cells is None else f" in {len(graph.cells.centroids)} IVF cells"
            mode = f"incremental ({len(changed_ids)} re-searched{cells_how})"
            ann["nprobe"] = None if graph.cells is None else graph.cells.nprobe
    if graph is None:
        vectors = known.stack(ids.tolist())
        graph = knn_graph(ids, vectors, depth, index=index_for(vectors))
        cells_ref = None if graph.cells is None else _save_cells(wh, graph.cells, run_id)
    gids = graph.ids
    ia, ib, score = graph.top(k).pair_positions()  # the spare entries beyond k only serve later updates
    version, method, scored = ref.label, "cosine", {}
    if matcher is not None:
        model, label = matcher
        score, scored = _matcher_scores(wh, model, label, products, gids, ia, ib, hashes)
        thr, thr_how = float(model.threshold), f"{label}'s, chosen on its labelled validation pairs"
        version, method = f"{ref.label}+{label}", "matcher"
    else:
        thr, thr_how = (threshold, "given")
        if source is not None or wh.exists("pairs"):
            thr, thr_how = _threshold(wh, source, gids, vectors, threshold)  # vectors in the graph's order
    keep = score >= thr
    ia, ib, score = ia[keep], ib[keep], score[keep]
    id_arr = pa.array(gids.tolist(), pa.string())  # ids go to Arrow by ``take`` (no Python string per graph entry)
    n_pairs = len(ia)
    dup = pa.table({"a": id_arr.take(pa.array(ia)), "b": id_arr.take(pa.array(ib)), "score": score,
                    "method": pa.repeat(method, n_pairs), "threshold": np.full(n_pairs, thr, np.float32),
                    "model_version": pa.repeat(version, n_pairs), "run_id": pa.repeat(run_id, n_pairs),
                    "detected_at": pa.repeat(pa.scalar(now, pa.timestamp("us", "UTC")), n_pairs)})  # fmt: skip
    cl = cluster(ia, ib, len(gids), scores=score, max_cluster_size=max_cluster_size, min_linkage=min_linkage)
    # a cluster's id is its smallest product id: stable across runs whatever the graph's row order
    by_id = np.argsort(gids, kind="stable")
    _, first = np.unique(cl[by_id], return_index=True)
    rep = np.empty(cl.max() + 1 if len(cl) else 0, np.int64)
    rep[cl[by_id[first]]] = by_id[first]
    sizes = np.bincount(cl)
    clusters = pa.table({"product_id": id_arr, "cluster_id": id_arr.take(pa.array(rep[cl])),
                         "cluster_size": sizes[cl].astype(np.int32), "model_version": pa.repeat(version, len(gids)),
                         "run_id": pa.repeat(run_id, len(gids))})  # fmt: skip
    cell_col = pa.nulls(len(gids), pa.int32()) if graph.cells is None else pa.array(graph.cells.cell, pa.int32())
    valid = graph.neighbors >= 0  # row-major: each row's neighbours stay in order, best first
    offsets = pa.array(np.r_[0, np.cumsum(valid.sum(1))].astype(np.int32))
    nbr_ids = pa.ListArray.from_arrays(offsets, id_arr.take(pa.array(graph.neighbors[valid])))
    nbr_sc = pa.ListArray.from_arrays(offsets, pa.array(graph.scores[valid], pa.float32()))
    graph_t = pa.table({"product_id": id_arr, "neighbors": nbr_ids, "scores": nbr_sc,
                        "model_version": pa.repeat(version, len(gids)),
                        "content_hash": pa.array([hashes[p] for p in gids.tolist()], pa.string()),
                        "ivf_cell": cell_col,
                        "ivf_centroids": pa.repeat(pa.scalar(cells_ref, pa.string()), len(gids))})  # fmt: skip
    # graph last: until it is written, the next run sees these products as changed and searches them again
    wh.overwrite("duplicates", dup)
    wh.overwrite("clusters", clusters)
    wh.overwrite("knn_graph", graph_t)
    wh.delete_files(CELLS_DIR, keep=[cells_ref] if cells_ref else [])  # earlier builds' centroids: nothing reads them
    dist = cluster_size_distribution(cl)
    return {
        "products": int(len(ids)), "graph": mode, "k": k, "depth": depth, "threshold": thr, "threshold_from": thr_how,
        "duplicate_pairs": int(n_pairs), "min_linkage": min_linkage, "clusters": dist["clusters"],
        "non_singleton_clusters": dist["clusters"] - dist["singletons"], "largest_cluster": dist["max"],
        "cluster_sizes": dist["histogram"], "ann_recall_at_k": ann["recall"], "ann_nprobe": ann["nprobe"],
        "model": version, "run_id": run_id, **scored,
    }  # fmt: skip


def _matcher_scores(
    wh: Warehouse,
    matcher,
    label: str,
    products: pa.Table,
    gids: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    hashes: Mapping[str, str],
) -> tuple[np.ndarray, dict[str, int]]:
    """The matcher's probabilities for the candidate pairs ``(gids[ia], gids[ib])``, and how many were scored.

    A pair whose two products have the content hashes they had when the same matcher version scored it is read
    back from ``pair_scores``; only the others (pairs touching a new or changed product, or new to the top-k lists)
    are scored. ``pair_scores`` is then replaced by this run's candidates, so it holds exactly the current ones."""
    import pyarrow.compute as pc

    a, b = gids[ia], gids[ib]
    ha = np.array([hashes[x] for x in a.tolist()], dtype=object)
    hb = np.array([hashes[x] for x in b.tolist()], dtype=object)
    score = np.full(len(a), np.nan, np.float32)
    if wh.exists("pair_scores"):
        old = wh.sql("SELECT a, b, a_hash, b_hash, score FROM pair_scores WHERE matcher_version = '"
                     + label.replace("'", "''") + "'")  # fmt: skip
        cached = dict(zip(zip(*(old.column(c).to_pylist() for c in ("a", "b", "a_hash", "b_hash")), strict=True),
                          old.column("score").to_numpy(), strict=True))  # fmt: skip
        for i, key in enumerate(zip(a.tolist(), b.tolist(), ha.tolist(), hb.tolist(), strict=True)):
            score[i] = cached.get(key, np.nan)
    todo = np.flatnonzero(np.isnan(score))
    if len(todo):
        need = pa.array(sorted({*a[todo].tolist(), *b[todo].tolist()}), pa.string())
        rows = {r["product_id"]: r for r in products.filter(pc.is_in(products["product_id"], need)).to_pylist()}
        score[todo] = matcher.predict_proba([(rows[a[i]], rows[b[i]]) for i in todo.tolist()])
    now = pa.scalar(datetime.now(UTC), pa.timestamp("us", "UTC"))
    wh.overwrite("pair_scores", pa.table({"a": a.tolist(), "b": b.tolist(), "a_hash": ha.tolist(),
                                          "b_hash": hb.tolist(), "score": score,
                                          "matcher_version": pa.repeat(label, len(a)),
                                          "scored_at": pa.repeat(now, len(a))}))  # fmt: skip
    return score, {"pairs_scored": int(len(todo)), "pairs_reused": int(len(a) - len(todo))}


def dedupe_summary_markdown(summary: dict[str, Any]) -> str:
    return (
        "# Dedupe\n\n" + reports.markdown_table([{k: v for k, v in summary.items() if k != "cluster_sizes"}])
        + "\n## Cluster sizes\n\n" + reports.markdown_table([{"size": s, "clusters": n}
                                                              for s, n in summary["cluster_sizes"].items()])
    )  # fmt: skip


@flow(name="dedupe")
def dedupe(
    warehouse_root: str | None = None,
    source: str | None = None,
    method: str = "encoder",
    model_version: str | None = None,
    k: int = 10,
    threshold: float = 0.9,
    exact_max: int = 50_000,
    max_cluster_size: int = 50,
    min_linkage: float = 0.5,
    full: bool = False,
    precision: str = "fp32",
    target_recall: float = 0.99,
    refit: bool = False,
    matcher: str | None = None,
) -> dict[str, Any]:
    """Find duplicate products and cluster them; incremental unless ``full``. ``precision``: ``fp32`` | ``int8``
    (the embedder's text tower int8 under ONNX Runtime: ~2x faster on CPU, vectors within ~0.01 cosine).
    ``method``: ``encoder`` | ``text`` | ``chars`` (module docstring); ``refit``: ``chars`` fits its IDF again.
    ``matcher``: ``champion`` or a version of the registered ``pair-matcher`` (``enrich train matcher``) to score
    the top-k candidate pairs with instead of the cosine threshold."""
    logger = get_run_logger()
    started = time.perf_counter()
    wh = Warehouse(warehouse_root)
    from flows.nightly import nightly_lock

    with nightly_lock(wh):  # one writer per warehouse: a nightly run, or this
        ref = resolve_embedder(method, model_version, precision, wh=wh, source=source, refit=refit)
        pair_matcher = None
        if matcher is not None:
            from flows.train_matcher import MODEL_NAME, load_matcher

            model, matcher_version, _ = load_matcher(matcher)
            pair_matcher = (model, f"{MODEL_NAME}/{matcher_version}")
        products = _products(wh, source)
        if products.num_rows < 2:
            raise LookupError(f"need at least 2 products to dedupe (found {products.num_rows}); ingest a catalog first")
        known, embedded = embed_products(wh, ref, products, full=full)
        summary = find_duplicates(wh, ref, products, known, source=source, k=k, threshold=threshold,
                                  exact_max=exact_max, target_recall=target_recall, max_cluster_size=max_cluster_size,
                                  min_linkage=min_linkage,
                                  full=full, matcher=pair_matcher)  # fmt: skip
    summary = {"embedded": embedded, **summary, "seconds": round(time.perf_counter() - started, 2)}
    logger.info("dedupe: %s", summary)
    create_markdown_artifact(key="dedupe-summary", markdown=dedupe_summary_markdown(summary),
                             description="duplicates and clusters")  # fmt: skip
    return summary


def similar(product_id: str, k: int = 10, warehouse_root: str | None = None, method: str | None = None) -> pa.Table:
    """Top-k most similar products to ``product_id`` (exact search), with titles, among the vectors of one model
    version: the one that embedded ``product_id`` last (of model ``method``, when given). Vectors of different
    models or versions live in different spaces and are never compared. The vectors are read as Arrow arrays
    (``_stored_embeddings``), not Python lists: 1M x 384 floats as lists took minutes and tens of GB."""
    from types import SimpleNamespace

    from warehouse.tables import _in_list

    wh = Warehouse(warehouse_root)
    found = pa.table({"model_name": pa.array([], pa.string())})
    if wh.exists("embeddings"):
        found = wh.sql(f"SELECT model_name, model_version FROM embeddings WHERE {_in_list('product_id', [product_id])}"
                       + (f" AND {_in_list('model_name', [method])}" if method else "")
                       + " ORDER BY embedded_at DESC LIMIT 1")  # fmt: skip
    if found.num_rows == 0:
        how = f" by model {method!r}" if method else ""
        raise LookupError(f"product {product_id!r} has no embedding{how}; run `enrich dedupe` first (or check the id)")
    ref = SimpleNamespace(name=found.column("model_name")[0].as_py(), version=found.column("model_version")[0].as_py())
    ids, _, vectors = _stored_embeddings(wh, ref, True)
    scores = vectors @ vectors[ids.index(product_id)]
    top = np.arange(len(scores)) if len(scores) <= k + 1 else np.argpartition(-scores, k)[: k + 1]
    order = [int(i) for i in top[np.argsort(-scores[top], kind="stable")] if ids[i] != product_id][:k]
    picked = [ids[i] for i in order]
    titles: dict[str, str] = {}
    if picked:
        rows = wh.sql(f"SELECT product_id, title FROM products WHERE {_in_list('product_id', picked)}")
        for pid, title in zip(rows.column("product_id").to_pylist(), rows.column("title").to_pylist(), strict=True):
            titles.setdefault(pid, title)
    return pa.table({"product_id": picked, "score": [round(float(scores[i]), 4) for i in order],
                     "title": [titles.get(p) for p in picked],
                     "model": [f"{ref.name}/{ref.version}"] * len(picked)})  # fmt: skip
