"""Prefect flows ``train-jave`` and ``compare-jave``: JAVE trained on warehouse products, tracked in MLflow.

One MLflow run per training: the full config as params; per epoch every loss term by name, attribute micro/macro
F1, strict value F1 (seqeval) and the dataset's published metric on validation; at the end the same on the test
split, per-attribute P/R/F1 (markdown + CSV), a per-attribute F1 bar chart, the attribute confusion matrix, sample
predictions next to gold, the per-attribute thresholds chosen on validation, and the model as a pyfunc with a
signature, registered as ``jave``. ``@champion`` moves only when the new version beats it on the same validation
set (the test split never decides anything).

Interrupted runs resume: the checkpoint folder and the MLflow run id are keyed by the run's config and data
version, so the same command continues from the last finished epoch in the same MLflow run.

Data-parallel under ``torchrun`` (``enrich train jave --nproc N``): rank 0 runs the flow (warehouse reads, MLflow
run, registry, ``@champion``) and hands every other rank, through ``features.distributed.send_job``, what it needs to
run ``train_worker``: the same training on its shard of the batches, with no Prefect, MLflow or warehouse access.
A run with N > 1 processes keeps its own checkpoint folder (``...-ddpN``) and MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from features import distributed
from flows import reports, tracking
from flows.datasets import PUBLISHED_METRIC, LabelledData, load_labelled
from warehouse.tables import Warehouse

MODEL_NAME = "jave"
EXPERIMENT = "jave"
# a frozen image tower's features are computed once per training run up to this size (fp16: ~125 KB per image
# for EfficientNet-Lite0 at 224², so ~34k images); beyond it, images are decoded per batch as before
VISUAL_PRECOMPUTE_MAX_BYTES = 4 * 2**30
log = logging.getLogger(__name__)
# The ablations `enrich compare` trains side by side (name -> JaveConfig switches).
VARIANTS: dict[str, dict[str, bool]] = {
    "jave": {},
    "no-global-gate": {"use_global_gate": False},
    "no-regional-gate": {"use_regional_gate": False},
    "no-kl": {"use_kl": False},
    "text-only": {"use_image": False},
}


@dataclasses.dataclass(frozen=True)
class JaveRunConfig:
    """What one `enrich train jave` run is: data, architecture preset and switches, and training settings."""

    dataset: str = "ae-110k"
    preset: str = "default"  # default (offline pretrained towers) | tiny (tests)
    max_length: int = 64
    use_image: bool = True
    use_global_gate: bool = True
    use_regional_gate: bool = True
    use_kl: bool = True
    kl_weight: float = 0.5
    max_train: int | None = None
    max_validation: int | None = None
    val_fraction: float = 0.1


def _arch(run: JaveRunConfig, spec) -> Any:
    from jave.config import JaveConfig

    preset = {"default": JaveConfig.default, "tiny": JaveConfig.tiny}.get(run.preset)
    if preset is None:
        raise ValueError(f"unknown preset {run.preset!r}; use 'default' or 'tiny'")
    return preset(
        len(spec.vocab),
        spec.implicit_value_sizes,
        use_image=run.use_image,
        use_global_gate=run.use_global_gate,
        use_regional_gate=run.use_regional_gate,
        use_kl=run.use_kl,
        kl_weight=run.kl_weight,
    )


def _run_key(run: JaveRunConfig, train_cfg: Any, data: LabelledData, variant: str, experiment: str) -> str:
    # the experiment is part of the key: the same settings in `enrich train jave` and `enrich compare` are two runs
    # (one in each experiment), not one run resumed across experiments
    blob = json.dumps(
        [dataclasses.asdict(run), dataclasses.asdict(train_cfg) | {"checkpoint_dir": None}, data.products_version,
         data.sizes(), variant, experiment],
        sort_keys=True, default=str,
    )  # fmt: skip
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def _eval_set_id(dataset: str, examples: list, split: str = "validation") -> str:
    ids = hashlib.blake2b("\n".join(sorted(e.product_id for e in examples)).encode(), digest_size=6).hexdigest()
    return f"{dataset}/{split}#{ids}"


def _image_kwargs(model: Any, use_image: bool, examples: dict[str, list], max_images: int) -> dict[str, Any]:
    """How the trainer gets visual features. A frozen image tower's features are computed once for every image of
    ``examples`` (ONNX Runtime on CPU, float16 as the nightly's visual store keeps them) instead of decoding and
    running each image again in every epoch and evaluation; a trainable tower, or more features than
    `VISUAL_PRECOMPUTE_MAX_BYTES`, gets the image loader per batch."""
    tower = getattr(model, "image_tower", None)
    if not use_image or tower is None:
        return {}
    from flows.jave_pyfunc import load_image

    per_batch = {"image_loader": load_image, "preprocess": tower.preprocess}
    if any(p.requires_grad for p in tower.parameters()):
        return per_batch
    from features.onnx_backend import resolve_backend
    from features.runtime import ImageEncoder, encode_images

    def load(uri: str) -> Any:
        try:
            image = load_image(uri)
        except Exception:  # noqa: BLE001  as jave.data._load_pixels: an unreadable image is a masked slot
            return None
        return None if image is None else tower.preprocess([image])[0]

    device = next(tower.parameters()).device
    uris = [u for split in examples.values() for e in split for u in e.images[:max_images]]
    encoder = ImageEncoder(tower, device, backend=resolve_backend("auto", device))
    started = time.perf_counter()
    feats = encode_images(encoder, uris, load, max_bytes=VISUAL_PRECOMPUTE_MAX_BYTES)
    if not feats and uris:
        log.info("visual features of %d images exceed %d bytes: images are decoded per batch", len(uris),
                 VISUAL_PRECOMPUTE_MAX_BYTES)  # fmt: skip
        return per_batch
    log.info("visual features of %d images computed once in %.1f s", len(feats), time.perf_counter() - started)
    return {"visual_cache": feats}


def _sample_predictions(examples: list, preds: list, k: int = 25) -> list[dict[str, Any]]:
    rows = []
    for e, p in list(zip(examples, preds, strict=True))[:k]:
        gold = {a: sorted(v) for a, v in e.gold_values.items()}
        pred = {a: x.value for a, x in p.best_values().items()}
        pred.update({a: v for a, (v, _) in p.implicit.items()})
        rows.append({"product_id": e.product_id, "text": e.text[:160], "gold": json.dumps(gold, ensure_ascii=False),
                     "predicted": json.dumps(pred, ensure_ascii=False)})  # fmt: skip
    return rows


def _log_test_reports(model, spec, examples, thresholds, image_kwargs, out: Path, title: str) -> None:
    from jave.codec import label_spans
    from jave.metrics import attribute_confusion, per_attribute_table
    from jave.predict import predict

    preds = predict(model, examples, spec, 64, thresholds=thresholds, **image_kwargs)
    gold = [e.gold_values for e in examples]
    pred_values = []
    for e, p in zip(examples, preds, strict=True):
        best = p.best_values()
        pred_values.append({a: (best[a].value if a in best else "n/a") for a in e.gold_values})
    table = per_attribute_table(gold, pred_values)
    (out / "per_attribute.md").write_text(reports.markdown_table(table))
    import csv

    with (out / "per_attribute.csv").open("w", newline="") as f:
        if table:
            w = csv.DictWriter(f, fieldnames=list(table[0].keys()))
            w.writeheader()
            w.writerows(table)
    if table:
        reports.f1_bar_chart(table, out / "per_attribute_f1.png", title)
    gold_spans = [[tuple(s)[:3] for s in label_spans(e.gold, e.fields)] for e in examples]
    pred_spans = [
        [(x.attribute, e.fields[x.field] + x.begin, e.fields[x.field] + x.end) for x in p.extractions]
        for e, p in zip(examples, preds, strict=True)
    ]
    labels, matrix = attribute_confusion(gold_spans, pred_spans, list(spec.vocab.attributes))
    (out / "attribute_confusion.json").write_text(json.dumps({"labels": labels, "counts": matrix.tolist()}))
    if len(labels) <= 60:
        reports.confusion_heatmap(matrix, labels, out / "attribute_confusion.png", f"{title}: attribute confusion")
    samples = _sample_predictions(examples, preds)
    (out / "sample_predictions.md").write_text(reports.markdown_table(samples))


@dataclasses.dataclass
class _Prepared:
    """What every rank builds alike from a job: the task, its examples, the checkpoint folder and the model."""

    spec: Any
    examples: dict[str, list]
    ckpt: Path
    train_cfg: Any
    model: Any
    images: dict[str, Any]


def _ddp_suffix() -> str:
    """Checkpoint-folder suffix of a data-parallel run: N processes train another trajectory than one."""
    world = distributed.current().world_size
    return f"-ddp{world}" if world > 1 else ""


def _prepare(
    run: JaveRunConfig, train_cfg: Any, data: LabelledData, variant: str, experiment: str, checkpoint_root: str
) -> _Prepared:
    from features.text import load_tokenizer
    from jave.data import TaskSpec, build_examples
    from jave.model import JaveModel
    from jave.trainer import seed_everything

    tokenizer = load_tokenizer()
    spec = TaskSpec.from_rows(data.train, max_length=run.max_length)
    examples = {name: build_examples(rows, spec, tokenizer) for name, rows in
                (("train", data.train), ("validation", data.validation), ("test", data.test))}  # fmt: skip
    key = _run_key(run, train_cfg, data, variant, experiment)
    ckpt = Path(checkpoint_root) / f"jave-{run.dataset}-{variant}-{key}{_ddp_suffix()}"
    if distributed.is_main():
        ckpt.mkdir(parents=True, exist_ok=True)
    train_cfg = dataclasses.replace(train_cfg, checkpoint_dir=str(ckpt))
    arch = _arch(run, spec)
    # the new heads' initial weights depend on the seed only, not on what ran before in this process (the variants
    # of `enrich compare` run one after another; `enrich train jave` with the same settings gives the same model)
    seed_everything(train_cfg.seed)
    model = JaveModel(arch)
    if distributed.current().enabled:
        model.to(distributed.current().device)  # cuda:LOCAL_RANK under nccl
    return _Prepared(
        spec, examples, ckpt, train_cfg, model, _image_kwargs(model, run.use_image, examples, train_cfg.max_images)
    )


def train_worker(
    run: JaveRunConfig, train_cfg: Any, data: LabelledData, variant: str, experiment: str, checkpoint_root: str
) -> None:
    """A rank > 0 under torchrun: rank 0's training of ``train_one`` on this rank's shard, without Prefect, MLflow
    or the warehouse (rank 0 sent the data); rank 0 evaluates, checkpoints, logs and registers."""
    from jave.trainer import train

    p = _prepare(run, train_cfg, data, variant, experiment, checkpoint_root)
    train(p.model, p.examples["train"], p.examples["validation"], p.spec, p.train_cfg, **p.images)


def train_one(
    run: JaveRunConfig,
    train_cfg: Any,
    *,
    wh: Warehouse,
    experiment: str = EXPERIMENT,
    run_name: str | None = None,
    register: bool = True,
    checkpoint_root: str = "data/checkpoints",
    variant: str = "jave",
    data: LabelledData | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train, evaluate, log and (optionally) register one JAVE model; returns the run's summary."""
    from jave.trainer import choose_thresholds, evaluate, train

    logger = get_run_logger()
    started = time.perf_counter()
    data = data or load_labelled(
        wh, run.dataset, val_fraction=run.val_fraction, max_train=run.max_train, max_validation=run.max_validation
    )
    job = {"run": run, "train_cfg": train_cfg, "data": data, "variant": variant, "experiment": experiment,
           "checkpoint_root": checkpoint_root}  # fmt: skip
    distributed.send_job(train_worker, **job)  # under torchrun: the other ranks train with us (no-op otherwise)
    p = _prepare(**job)
    spec, examples, ckpt, train_cfg, model, image_kwargs = p.spec, p.examples, p.ckpt, p.train_cfg, p.model, p.images
    arch = model.cfg

    tracking.setup(experiment)
    run_id_file = ckpt / "mlflow_run_id"
    resume_id = run_id_file.read_text().strip() if run_id_file.exists() else None
    published = PUBLISHED_METRIC.get(run.dataset, "value_f1_strict")
    with mlflow.start_run(run_id=resume_id, run_name=run_name or f"{variant}:{run.dataset}") as active:
        run_id_file.write_text(active.info.run_id)
        if resume_id is None:
            mlflow.log_params(tracking.flat_params(dataclasses.asdict(run), "run."))
            mlflow.log_params(tracking.flat_params(dataclasses.asdict(train_cfg) | {"checkpoint_dir": "<local>"},
                                                   "train."))  # fmt: skip
            mlflow.log_params(tracking.flat_params(dataclasses.asdict(arch), "model."))
            mlflow.log_params({"variant": variant, "data.products_version": data.products_version,
                               "spec.attributes": len(spec.vocab), "spec.implicit": len(spec.implicit),
                               **{f"data.{k}": v for k, v in data.sizes().items()}})  # fmt: skip
            mlflow.set_tags({"dataset": run.dataset, "variant": variant, "warehouse": wh.root})
            mlflow.log_dict(spec.to_json(), "spec.json")
            ddp = distributed.current()
            if ddp.enabled:
                mlflow.log_params({"dist.world_size": ddp.world_size, "dist.backend": ddp.backend})
        # what the numbers were measured on: runs with equal tags are comparable side by side in the MLflow UI
        mlflow.set_tags({"eval_set": _eval_set_id(run.dataset, examples["validation"]),
                         "test_set": _eval_set_id(run.dataset, examples["test"], "test"), **(tags or {})})  # fmt: skip

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            clean = {k.replace("/", "_"): float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            mlflow.log_metrics(clean, step=epoch)
            logger.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in clean.items()})

        result = train(model, examples["train"], examples["validation"], spec, train_cfg, on_epoch=on_epoch,
                       **image_kwargs)  # fmt: skip
        thresholds = choose_thresholds(model, examples["validation"], spec, **image_kwargs) if examples[
            "validation"] else {}  # fmt: skip
        (ckpt / "thresholds.json").write_text(json.dumps(thresholds, indent=1, sort_keys=True))
        val_metrics = evaluate(model, examples["validation"], spec, thresholds=thresholds, **image_kwargs) if (
            examples["validation"]) else {}  # fmt: skip
        test_metrics = evaluate(model, examples["test"], spec, thresholds=thresholds, **image_kwargs)
        mlflow.log_metrics({f"final_val_{k}": v for k, v in val_metrics.items()})
        mlflow.log_metrics({f"test_{k}": v for k, v in test_metrics.items()})
        mlflow.log_metrics({"train_seconds": time.perf_counter() - started, "best_epoch": result.best_epoch})
        mlflow.log_dict(thresholds, "thresholds.json")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            _log_test_reports(model, spec, examples["test"], thresholds, image_kwargs, out,
                              f"{variant} on {run.dataset} test")  # fmt: skip
            mlflow.log_artifacts(str(out), "reports")
        version = promotion = None
        if register:
            version, promotion = _log_model(ckpt, data, examples, published, val_metrics, register)
        summary = {
            "run_id": active.info.run_id, "variant": variant, "dataset": run.dataset, "checkpoint": str(ckpt),
            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
            "published_metric": published, "test": test_metrics, "validation": val_metrics,
            "model_version": version, "promotion": promotion, "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
    logger.info(
        "JAVE %s on %s: test %s=%.4f", variant, run.dataset, published, test_metrics.get(published, float("nan"))
    )
    return summary


def _log_model(ckpt: Path, data: LabelledData, examples: dict, published: str, val_metrics: dict, register: bool):
    import pandas as pd
    from mlflow.models import infer_signature

    from flows.jave_pyfunc import OUTPUT_COLUMNS, JaveEnricher

    sample = pd.DataFrame(
        [{"product_id": r["product_id"], "title": r["title"], "description": r.get("description") or "",
          "specs": json.dumps(r.get("specs") or [])} for r in (data.validation or data.train)[:3]]
    )  # fmt: skip
    output = pd.DataFrame(JaveEnricher(ckpt).predict_rows(
        [dict(r, specs=json.loads(r["specs"]), images=[], labels=[]) for r in sample.to_dict("records")]),
        columns=OUTPUT_COLUMNS)  # fmt: skip
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).parent / "models" / "jave_model.py"),  # code, not a pickle
        artifacts={"checkpoint": str(ckpt)},
        signature=infer_signature(sample, output),
        input_example=sample,
        registered_model_name=MODEL_NAME if register else None,
        pip_requirements=["torch==2.14.1", "transformers", "timm", "safetensors", "pandas"],
    )
    version = str(info.registered_model_version) if register else None
    promotion = None
    if version is not None and val_metrics:
        value = val_metrics.get(published, val_metrics.get("value_f1_strict", 0.0))
        p = tracking.promote_if_better(MODEL_NAME, version, metric=published, value=float(value),
                                       eval_set=_eval_set_id(data.dataset, examples["validation"]))  # fmt: skip
        promotion = p.reason
        mlflow.set_tag("champion_decision", p.reason)
    return version, promotion


def _train_cfg(**kw: Any):
    from jave.trainer import TrainConfig

    return TrainConfig(**{k: v for k, v in kw.items() if v is not None})


@flow(name="train-jave")
def train_jave(
    dataset: str = "ae-110k",
    data_path: str | None = None,
    preset: str = "default",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    tower_lr: float = 5e-5,
    max_length: int = 64,
    patience: int = 3,
    seed: int = 0,
    use_image: bool = True,
    use_global_gate: bool = True,
    use_regional_gate: bool = True,
    use_kl: bool = True,
    max_train: int | None = None,
    max_validation: int | None = None,
    max_steps: int | None = None,
    kl_weight: float = 0.5,
    experiment: str = EXPERIMENT,
    register_model: bool = True,
    warehouse_root: str | None = None,
    checkpoint_root: str = "data/checkpoints",
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Train JAVE on ``dataset``'s products (imported from ``data_path`` first if the warehouse has none)."""
    wh = Warehouse(warehouse_root)
    _ensure_imported(wh, dataset, data_path)
    run = JaveRunConfig(dataset=dataset, preset=preset, max_length=max_length, use_image=use_image,
                        use_global_gate=use_global_gate, use_regional_gate=use_regional_gate, use_kl=use_kl,
                        kl_weight=kl_weight, max_train=max_train, max_validation=max_validation)  # fmt: skip
    cfg = _train_cfg(epochs=epochs, batch_size=batch_size, lr=lr, tower_lr=tower_lr, patience=patience, seed=seed,
                     max_steps=max_steps, num_threads=num_threads or distributed.threads_per_process())  # fmt: skip
    summary = train_one(
        run, cfg, wh=wh, experiment=experiment, register=register_model, checkpoint_root=checkpoint_root
    )
    create_markdown_artifact(key="train-jave", markdown=_summary_md([summary]), description=f"JAVE on {dataset}")
    return summary


@flow(name="compare-jave")
def compare_jave(
    dataset: str = "ae-110k",
    data_path: str | None = None,
    preset: str = "default",
    epochs: int = 10,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    max_train: int | None = None,
    max_validation: int | None = None,
    max_steps: int | None = None,
    variants: list[str] | None = None,
    experiment: str | None = None,
    warehouse_root: str | None = None,
    checkpoint_root: str = "data/checkpoints",
    num_threads: int | None = None,
) -> list[dict[str, Any]]:
    """JAVE and its ablations on the same data, into one MLflow experiment, plus a markdown comparison table."""
    wh = Warehouse(warehouse_root)
    _ensure_imported(wh, dataset, data_path)
    experiment = experiment or f"jave-compare-{dataset}"
    names = variants or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    data = load_labelled(wh, dataset, max_train=max_train, max_validation=max_validation)
    cfg = _train_cfg(epochs=epochs, batch_size=batch_size, seed=seed, max_steps=max_steps,
                     num_threads=num_threads or distributed.threads_per_process())  # fmt: skip
    base = JaveRunConfig(dataset=dataset, preset=preset, max_length=max_length, max_train=max_train,
                         max_validation=max_validation)  # fmt: skip
    # one id per comparison (same data and settings -> same id, also when resumed): filter the UI by tags.comparison
    group = {"comparison": f"{dataset}-{_run_key(base, cfg, data, 'compare', experiment)}"}
    summaries = []
    for name in names:
        run = dataclasses.replace(base, **VARIANTS[name])
        summaries.append(train_one(run, cfg, wh=wh, experiment=experiment, register=False, variant=name,
                                   checkpoint_root=checkpoint_root, data=data, tags=group))  # fmt: skip
    md = _summary_md(summaries)
    tracking.setup(experiment)
    with mlflow.start_run(run_name=f"comparison:{dataset}"):
        mlflow.log_text(md, "comparison.md")
        mlflow.set_tags({"dataset": dataset, "kind": "comparison", **group,
                         "variant_runs": ",".join(s["run_id"] for s in summaries)})  # fmt: skip
    create_markdown_artifact(key="compare-jave", markdown=md, description=f"JAVE ablations on {dataset}")
    return summaries


def _summary_md(summaries: list[dict[str, Any]]) -> str:
    rows = []
    for s in summaries:
        t = s["test"]
        metric = s["published_metric"]
        rows.append({"variant": s["variant"], "dataset": s["dataset"], metric: t.get(metric),
                     f"validation {metric}": s["validation"].get(metric), "value_f1_strict": t.get("value_f1_strict"),
                     "attr_micro_f1": t.get("attr_micro_f1"),
                     "epochs": s["epochs_run"], "seconds": s["seconds"], "run_id": s["run_id"]})  # fmt: skip
    return "# JAVE runs (test split)\n\n" + reports.markdown_table(rows)


def _ensure_imported(wh: Warehouse, dataset: str, data_path: str | None) -> None:
    if data_path is None:
        return
    import pyarrow.compute as pc

    products = wh.read("products", columns=["source"])
    if products.num_rows and pc.any(pc.equal(products["source"], dataset)).as_py():
        return
    from flows.ingest import import_dataset

    import_dataset(dataset, data_path, warehouse_root=wh.root)
