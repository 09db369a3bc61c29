"""Prefect flow ``train-encoder``: the SCALE-style product encoder (M5Product, Dong et al., CVPR 2022) pretrained on
warehouse products, tracked in MLflow.

One MLflow run per training: the full config as params; per epoch every ``encoder_loss`` term (``train_<term>``),
the learned modality-pair weights (``w_text-table`` …) and the held-out cross-modal retrieval metrics
(``val_recall_at_k``, ``val_map_at_10``) with step = epoch; the model as a pyfunc with a signature (product rows in,
``product_id`` + L2-normalised ``vector`` out), registered as ``product-encoder``. ``@champion`` moves only when the
new version beats the champion on the same yardstick: ``val_pair_f1`` (cosine pair F1 at the F1-optimal cut, what
dedupe does with the vectors) on the warehouse's labelled ``valid*`` pairs when it has some, else
``val_recall_at_10`` on the same held-out products. ``load_encoder`` hands the
champion (or a given version) to the dedupe flow.

Data-parallel under ``torchrun`` (``enrich train encoder --nproc N``): rank 0 runs the flow (warehouse, MLflow,
registry) and sends every other rank the rows to train on (``train_worker``, no Prefect / MLflow / warehouse there);
a run with N > 1 processes keeps its own checkpoint folder (``...-ddpN``).

Visual features are not read here (text and spec table only): the warehouse keeps no cached region/frame features
yet; ``features.encoder_train.train_encoder`` takes them when it does.

``supcon_epochs`` > 0 (``enrich train encoder --preset matching --supcon-epochs 3``) reads the warehouse's labelled
``train*`` pairs whose two products are both among the training rows (``enrich import ditto`` writes them), fine-tunes
the text tower on them with SupCon first (features/supcon.py) and then fine-tunes the product vector on them each
epoch (``pair_contrastive_loss``); the ``matching`` preset's text skip carries the SupCon similarity into the
product vector that ``enrich dedupe --method encoder`` uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from features import distributed
from flows import reports, tracking
from flows.datasets import _in_validation, _subsample
from warehouse.tables import Warehouse

if TYPE_CHECKING:
    from features.encoder import ProductEncoder

MODEL_NAME = "product-encoder"
EXPERIMENT = "product-encoder"
SELECT_METRIC = "val_recall_at_10"  # held-out cross-modal retrieval: the rule without labelled pairs
MATCH_METRIC = "val_pair_f1"  # pair F1 on labelled validation pairs: the rule when the catalog has them
COLUMNS = ["product_id", "title", "description", "specs"]


@dataclasses.dataclass(frozen=True)
class EncoderRunConfig:
    """What one `enrich train encoder` run is: which products, the architecture preset, and the holdout."""

    source: str | None = None  # None = every product in the warehouse
    preset: str = "default"  # default (offline pretrained text tower) | tiny (tests)
    max_train: int | None = None
    val_fraction: float = 0.1


@dataclasses.dataclass
class CatalogSplit:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    products_version: int  # the warehouse version these rows were read at (lineage)
    pairs: list[tuple[dict[str, Any], dict[str, Any], int]] = dataclasses.field(default_factory=list)  # labelled


def _arch(preset: str):
    from features import encoder

    presets = {"default": encoder.default, "tiny": encoder.tiny, "matching": encoder.matching}
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; use one of {sorted(presets)}")
    return presets[preset]()


@task(cache_policy=NO_CACHE)  # the rows are read fresh: the warehouse moves on
def load_catalog(wh: Warehouse, run: EncoderRunConfig) -> CatalogSplit:
    """Products (all, or ``run.source``'s) split by a seeded hash of product_id, as ``flows.datasets`` does."""
    version = wh.version("products")
    table = wh.read("products", version=version, columns=[*COLUMNS, "source"])
    if run.source is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["source"], run.source))
    rows = sorted(table.select(COLUMNS).to_pylist(), key=lambda r: r["product_id"])
    if len(rows) < 4:
        where = f"from {run.source!r} " if run.source else ""
        raise LookupError(
            f"{len(rows)} products {where}in {wh.root}; the encoder needs a catalog to train on: "
            f"ingest one first (`enrich ingest <catalog>` or `enrich import <dataset> <folder>`)"
        )
    train, val = [], []
    for r in rows:
        (val if _in_validation(r["product_id"], run.val_fraction) else train).append(r)
    return CatalogSplit(_subsample(train, run.max_train), val, version)


@task(cache_policy=NO_CACHE)
def load_train_pairs(wh: Warehouse, data: CatalogSplit) -> list[tuple[dict[str, Any], dict[str, Any], int]]:
    """The warehouse's labelled ``train*`` pairs whose two products are both training rows, as (row, row, label).

    Every training split counts (WDC's ``train_small`` … ``train_xlarge`` alike); validation and test splits never.
    """
    if not wh.exists("pairs"):
        raise LookupError(
            f"no labelled pairs in {wh.root}; SupCon fine-tuning needs some: import a dataset that has them "
            f"(`enrich import ditto <folder>`) or pass supcon_epochs=0"
        )
    rows = {r["product_id"]: r for r in data.train}
    found = wh.sql("SELECT left_id, right_id, label FROM pairs WHERE split LIKE 'train%' ORDER BY 1, 2").to_pylist()
    pairs = [(rows[p["left_id"]], rows[p["right_id"]], int(p["label"])) for p in found
             if p["left_id"] in rows and p["right_id"] in rows]  # fmt: skip
    if not any(y for *_, y in pairs):
        raise LookupError(
            f"none of the {len(found)} labelled train pairs in {wh.root} is a match between two training rows of "
            f"this source; SupCon needs matches: check --source or pass supcon_epochs=0"
        )
    return pairs


def labelled_pairs(
    wh: Warehouse, source: str | None, split: str, benchmark: str | None = None
) -> list[tuple[dict[str, Any], dict[str, Any], int]]:
    """The warehouse's labelled pairs of split ``split`` (exactly that name when there is one, else every split
    named ``split*``: ``valid`` covers WDC's ``valid_small`` and ``valid_medium``), of ``benchmark`` (e.g.
    ``ditto/Abt-Buy``; all when None), between products of ``source`` (all when None), as (row, row, label) in
    file order. Empty when there are none."""
    if not wh.exists("pairs"):
        return []
    import pyarrow.compute as pc

    def quoted(x: str) -> str:
        return "'" + x.replace("'", "''") + "'"

    where = f" WHERE benchmark = {quoted(benchmark)}" if benchmark else ""
    names = wh.sql(f"SELECT DISTINCT split FROM pairs{where}").column("split").to_pylist()
    names = [x for x in names if x == split] or [x for x in names if x.startswith(split)]
    if not names:
        return []
    where += (" AND" if where else " WHERE") + f" split IN ({', '.join(quoted(x) for x in sorted(names))})"
    found = wh.sql(f"SELECT left_id, right_id, label FROM pairs{where} ORDER BY benchmark, split, line").to_pylist()
    ids = sorted({p[side] for p in found for side in ("left_id", "right_id")})
    if not ids:
        return []
    table = wh.read("products", columns=[*COLUMNS, "source"])
    keep = pc.is_in(table["product_id"], value_set=pa.array(ids))
    if source is not None:
        keep = pc.and_(keep, pc.equal(table["source"], source))
    rows = {r["product_id"]: r for r in table.filter(keep).select(COLUMNS).to_pylist()}
    return [(rows[p["left_id"]], rows[p["right_id"]], int(p["label"])) for p in found
            if p["left_id"] in rows and p["right_id"] in rows]  # fmt: skip


@task(cache_policy=NO_CACHE)
def load_valid_pairs(wh: Warehouse, source: str | None) -> list[tuple[dict[str, Any], dict[str, Any], int]]:
    """The labelled ``valid*`` pairs of ``source``: the yardstick ``@champion`` is chosen on when a catalog has them."""
    return labelled_pairs(wh, source, "valid")


def match_quality(model, pairs: list[tuple[dict[str, Any], dict[str, Any], int]]) -> tuple[float, float] | None:
    """(pair F1, threshold) of the product vectors' cosine on labelled pairs at the F1-optimal cut, the rule
    ``enrich dedupe`` applies; None with fewer than 20 pairs or no match among them (F1 undefined)."""
    from features.similarity import MIN_PAIRS, pair_threshold

    if len(pairs) < MIN_PAIRS or not any(y for *_, y in pairs):
        return None  # before encoding anything
    from features.encoder import encode_products

    rows = {r["product_id"]: r for a, b, _ in pairs for r in (a, b)}
    order = sorted(rows)
    pos = {pid: i for i, pid in enumerate(order)}
    vectors = encode_products(model, [rows[p] for p in order])
    threshold, f1 = pair_threshold(vectors[[pos[a["product_id"]] for a, _, _ in pairs]],
                                   vectors[[pos[b["product_id"]] for _, b, _ in pairs]],
                                   np.array([y for *_, y in pairs], dtype=bool))  # fmt: skip
    return f1, threshold


def pairs_set_id(source: str | None, pairs: list[tuple[dict[str, Any], dict[str, Any], int]]) -> str:
    blob = "\n".join(sorted(f"{a['product_id']}|{b['product_id']}|{y}" for a, b, y in pairs))
    return f"{source or 'all'}/pairs-valid#{hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()}"


def _eval_set_id(source: str | None, rows: list[dict[str, Any]]) -> str:
    ids = hashlib.blake2b("\n".join(sorted(r["product_id"] for r in rows)).encode(), digest_size=6).hexdigest()
    return f"{source or 'all'}/validation#{ids}"


def _run_key(run: EncoderRunConfig, train_cfg: Any, data: CatalogSplit) -> str:
    blob = json.dumps(
        [dataclasses.asdict(run), dataclasses.asdict(train_cfg) | {"checkpoint_dir": None, "num_threads": None},
         data.products_version, len(data.train), len(data.validation)],
        sort_keys=True, default=str,
    )  # fmt: skip
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


# ------------------------------------------------------------------------------------------------------- pyfunc


def rows_from_frame(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Pyfunc input (product_id, title, optional description, specs as a list of {key, value} or its JSON) -> rows."""
    missing = {"product_id", "title"} - set(df.columns)
    if missing:
        raise ValueError(f"product-encoder input is missing column(s) {sorted(missing)}; give product_id and title")
    rows = []
    for r in df.to_dict("records"):
        specs = r.get("specs")
        if isinstance(specs, str):
            specs = json.loads(specs) if specs.strip() else []
        elif specs is None or (isinstance(specs, float) and pd.isna(specs)):
            specs = []
        description = r.get("description")
        rows.append(
            {
                "product_id": str(r["product_id"]),
                "title": r["title"] if isinstance(r["title"], str) else "",
                "description": description if isinstance(description, str) else "",
                "specs": [dict(s) for s in specs],
            }
        )
    return rows


class EncoderPyfunc(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc.load_model("models:/product-encoder@champion").predict(df)`` -> product_id, vector."""

    def load_context(self, context) -> None:
        from features.encoder_train import load_encoder_checkpoint

        self.model = load_encoder_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from features.encoder import encode_products

        rows = rows_from_frame(model_input)
        vectors = encode_products(self.model, rows)
        return pd.DataFrame({"product_id": [r["product_id"] for r in rows], "vector": [v.tolist() for v in vectors]})


def _log_model(ckpt: Path, model, data: CatalogSplit, selection: tuple[str, float, str], register: bool):
    from mlflow.models import infer_signature

    from features.encoder import encode_products

    sample = pd.DataFrame(
        [{"product_id": r["product_id"], "title": r["title"], "description": r.get("description") or "",
          "specs": json.dumps(r.get("specs") or [])} for r in (data.validation or data.train)[:3]]
    )  # fmt: skip
    vectors = encode_products(model, rows_from_frame(sample))
    output = pd.DataFrame({"product_id": sample["product_id"], "vector": [v.tolist() for v in vectors]})
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).parent / "models" / "encoder_model.py"),  # code, not a pickle
        artifacts={"checkpoint": str(ckpt)},
        signature=infer_signature(sample, output),
        input_example=sample,
        registered_model_name=MODEL_NAME if register else None,
        pip_requirements=["torch==2.14.1", "transformers", "safetensors", "pandas"],
    )
    if not register:
        return None, None
    version = str(info.registered_model_version)
    metric, value, eval_set = selection
    p = tracking.promote_if_better(MODEL_NAME, version, metric=metric, value=value, eval_set=eval_set)
    mlflow.set_tag("champion_decision", p.reason)
    return version, p.reason


# --------------------------------------------------------------------------------------------------------- flow


def _prepare(run: EncoderRunConfig, train_cfg: Any, data: CatalogSplit, checkpoint_root: str) -> tuple[Path, Any, Any]:
    """What every rank builds alike: the checkpoint folder, the run's settings pointing at it, the fresh model."""
    from features.encoder import ProductEncoder

    key = _run_key(run, train_cfg, data)
    slug = "all" if run.source is None else hashlib.blake2b(run.source.encode(), digest_size=4).hexdigest()
    world = distributed.current().world_size
    ckpt = Path(checkpoint_root) / f"encoder-{slug}-{key}{f'-ddp{world}' if world > 1 else ''}"
    model = ProductEncoder(_arch(run.preset))
    if world > 1:
        model.to(distributed.current().device)  # cuda:LOCAL_RANK under nccl
    return ckpt, dataclasses.replace(train_cfg, checkpoint_dir=str(ckpt)), model


def train_worker(run: EncoderRunConfig, train_cfg: Any, data: CatalogSplit, checkpoint_root: str) -> None:
    """A rank > 0 under torchrun: rank 0's training of ``train_one`` on this rank's shard, without Prefect, MLflow
    or the warehouse (rank 0 sent the rows); rank 0 evaluates, checkpoints, logs and registers."""
    from features.encoder_train import train_encoder as fit

    _, cfg, model = _prepare(run, train_cfg, data, checkpoint_root)
    fit(model, data.train, data.validation, cfg, pairs=data.pairs or None)


def train_one(
    run: EncoderRunConfig,
    train_cfg: Any,
    *,
    wh: Warehouse,
    experiment: str = EXPERIMENT,
    register: bool = True,
    checkpoint_root: str = "data/checkpoints",
) -> dict[str, Any]:
    """Train, evaluate, log and (optionally) register one product encoder; returns the run's summary."""
    from features.encoder_train import train_encoder as fit

    logger = get_run_logger()
    started = time.perf_counter()
    data = load_catalog(wh, run)
    if train_cfg.supcon_epochs:
        data.pairs = load_train_pairs(wh, data)
    job = {"run": run, "train_cfg": train_cfg, "data": data, "checkpoint_root": checkpoint_root}
    distributed.send_job(train_worker, **job)  # under torchrun: the other ranks train with us (no-op otherwise)
    ckpt, train_cfg, model = _prepare(**job)
    arch = model.cfg

    tracking.setup(experiment)
    with mlflow.start_run(run_name=f"encoder:{run.source or 'all'}") as active:
        mlflow.log_params(tracking.flat_params(dataclasses.asdict(run), "run."))
        mlflow.log_params(tracking.flat_params(dataclasses.asdict(train_cfg) | {"checkpoint_dir": "<local>"},
                                               "train."))  # fmt: skip
        mlflow.log_params(tracking.flat_params(dataclasses.asdict(arch), "model."))
        mlflow.log_params({"data.products_version": data.products_version, "data.train": len(data.train),
                           "data.validation": len(data.validation), "data.pairs": len(data.pairs)})  # fmt: skip
        mlflow.set_tags({"source": run.source or "all", "warehouse": wh.root, "kind": "product-encoder"})
        ddp = distributed.current()
        if ddp.enabled:
            mlflow.log_params({"dist.world_size": ddp.world_size, "dist.backend": ddp.backend})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            clean = {k.replace("/", "_"): float(v) for k, v in metrics.items()}
            mlflow.log_metrics(clean, step=epoch)
            logger.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in clean.items() if "-" not in k[4:]})

        result = fit(model, data.train, data.validation, train_cfg, pairs=data.pairs or None, on_epoch=on_epoch)
        best = result.best_metrics
        mlflow.log_metrics({f"best_{k}": v for k, v in best.items() if k.startswith("val_")})
        mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "steps": result.steps,
                            "train_seconds": time.perf_counter() - started})  # fmt: skip
        # @champion is chosen on match quality when the catalog has labelled validation pairs (what dedupe uses
        # the vectors for), else on held-out cross-modal retrieval
        selection = (SELECT_METRIC, float(best.get(SELECT_METRIC, 0.0)), _eval_set_id(run.source, data.validation))
        valid_pairs = load_valid_pairs(wh, run.source)
        quality = match_quality(model, valid_pairs)
        if quality is not None:
            mlflow.log_metrics({MATCH_METRIC: quality[0], "val_pair_threshold": quality[1]})
            best = {**best, MATCH_METRIC: quality[0]}
            selection = (MATCH_METRIC, quality[0], pairs_set_id(run.source, valid_pairs))
        metric, value, _ = selection
        version, promotion = _log_model(ckpt, model, data, selection, register)
        summary = {
            "run_id": active.info.run_id, "source": run.source, "checkpoint": str(ckpt),
            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
            "validation": {k: v for k, v in best.items() if k.startswith("val_")}, "model_version": version,
            "promotion": promotion, "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
    logger.info("product encoder on %s: %s=%.4f (%s)", run.source or "all", metric, value, promotion)
    return summary


@flow(name="train-encoder")
def train_encoder(
    source: str | None = None,
    preset: str = "default",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    tower_lr: float = 5e-5,
    patience: int = 3,
    seed: int = 0,
    max_train: int | None = None,
    max_steps: int | None = None,
    warehouse_root: str | None = None,
    experiment: str = EXPERIMENT,
    register_model: bool = True,
    checkpoint_root: str = "data/checkpoints",
    supcon_epochs: int = 0,
) -> dict[str, Any]:
    """Pretrain the product encoder on the warehouse's products (all, or those of dataset ``source``); with
    ``supcon_epochs`` > 0 also fine-tune it on the warehouse's labelled train pairs (SupCon, then pair loss)."""
    from features.encoder_train import EncoderTrainConfig

    wh = Warehouse(warehouse_root)
    run = EncoderRunConfig(source=source, preset=preset, max_train=max_train)
    cfg = EncoderTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, tower_lr=tower_lr, patience=patience,
                             seed=seed, max_steps=max_steps, num_threads=distributed.threads_per_process(),
                             supcon_epochs=supcon_epochs)  # fmt: skip
    summary = train_one(run, cfg, wh=wh, experiment=experiment, register=register_model,
                        checkpoint_root=checkpoint_root)  # fmt: skip
    row = {"source": source or "all", **summary["validation"], "epochs": summary["epochs_run"],
           "version": summary["model_version"], "run_id": summary["run_id"]}  # fmt: skip
    md = "# Product encoder (validation)\n\n" + reports.markdown_table([row]) + f"\n\n{summary['promotion']}\n"
    create_markdown_artifact(key="train-encoder", markdown=md, description=f"product encoder on {source or 'all'}")
    return summary


def load_encoder(version: str | None = None) -> tuple[ProductEncoder, str, str]:
    """``product-encoder@champion`` (or ``version``) -> (ProductEncoder in eval mode, model version, MLflow run id).

    Raises:
        LookupError: no @champion yet, or no such version (train one with `enrich train encoder`).
    """
    pyfunc, version, run_id = tracking.load_registered(MODEL_NAME, version, "enrich train encoder")
    return pyfunc.model.eval(), version, run_id
