"""Prefect flow ``train-matcher``: the learned pair matcher that ``enrich dedupe --matcher champion`` scores the
top-k candidate pairs with, tracked in MLflow and registered as ``pair-matcher``.

The matcher is ``features.matcher.HybridMatcher``: gradient-boosted trees on cheap pair features (frozen-tower
cosines, TF-IDF word and character n-gram cosines, token and model-number overlaps, price ratio), fit on the
warehouse's labelled ``train*`` pairs, its threshold chosen F1-optimal on the ``valid*`` pairs (``enrich import
ditto`` writes both). The TF-IDF vocabularies are fit on every product of the source (text only, no label), so the
model numbers of the products dedupe will compare are in them. ``test*`` pairs, when there are some, are scored
once and logged (``test_pair_f1``); they decide nothing.

One MLflow run per training (experiment ``pair-matcher``): the config as params; the pair counts; valid pair F1,
precision, recall and the threshold; test pair F1 when a test split exists; the fit time. The model is a pyfunc
(pairs of records in, ``score`` and ``match`` out) whose artifact is the folder ``HybridMatcher.save`` writes
(JSON + safetensors: the trees as arrays, nothing pickled). ``@champion`` moves only when a new version beats the
champion's valid pair F1 on the same valid pairs (``flows.tracking.promote_if_better``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import reports, tracking
from flows.train_encoder import COLUMNS, labelled_pairs, pairs_set_id, rows_from_frame
from warehouse.tables import Warehouse

MODEL_NAME = "pair-matcher"
EXPERIMENT = "pair-matcher"
METRIC = "val_pair_f1"
TOWERS = ("pretrained", "tiny", "none")
SIDES = ("left", "right")


def _tower(kind: str):
    """The frozen text tower of the cosine features: pretrained MiniLM, a random tiny one (tests) or none."""
    from features.towers import TextTower, TextTowerConfig

    if kind not in TOWERS:
        raise ValueError(f"unknown tower {kind!r}; use one of {list(TOWERS)}")
    if kind == "none":
        return None
    return TextTower(TextTowerConfig(max_length=128, trainable=False, tiny=kind == "tiny")).eval()


def _fit_supcon(train: list[tuple[dict, dict, int]], valid: list[tuple[dict, dict, int]], epochs: int, seed: int,
                tiny: bool):  # fmt: skip
    """The text tower fine-tuned with SupCon on the train pairs' clusters (features/supcon.py, after R-SupCon), the
    epoch kept by the valid pairs' cosine pair F1; (tuner, per-epoch history)."""
    from features.matcher import serialize
    from features.similarity import threshold_for_f1
    from features.supcon import SupConConfig, SupConTuner, records_from_pairs
    from features.towers import TextTowerConfig

    records, labels, negatives = records_from_pairs(train)
    valid_y = np.array([y for *_, y in valid])

    def select(tuner) -> dict[str, float]:
        left = tuner.embed([serialize(a) for a, _, _ in valid])
        right = tuner.embed([serialize(b) for _, b, _ in valid])
        _, f1 = threshold_for_f1((left * right).sum(1), valid_y)
        return {"score": f1}

    text = TextTowerConfig(max_length=64, tiny=tiny)
    tuner = SupConTuner(SupConConfig(text=text, max_length=64, epochs=epochs, seed=seed, singleton_views=1))
    fit = tuner.fit([serialize(r) for r in records], labels, negatives=negatives, select=select, log=None)
    return tuner.eval(), fit.history


def _catalog_rows(wh: Warehouse, source: str | None) -> list[dict[str, Any]]:
    """Every product of ``source`` (all when None): the records the TF-IDF vocabularies are fit on."""
    where = " WHERE source = '" + source.replace("'", "''") + "'" if source else ""
    return wh.sql(f"SELECT {', '.join(COLUMNS)} FROM products{where} ORDER BY product_id").to_pylist()


def _scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    tp = float((pred & y).sum())
    p, r = tp / max(pred.sum(), 1), tp / max(y.sum(), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12)}


# ------------------------------------------------------------------------------------------------------- pyfunc


class MatcherPyfunc(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc.load_model("models:/pair-matcher@champion").predict(df)``: one row per pair with
    ``left_title``, ``right_title`` (and optionally ``left_description``, ``left_specs``, … as the product rows have
    them) -> ``score`` (match probability) and ``match`` (score at or above the threshold chosen on validation)."""

    def load_context(self, context) -> None:
        from features.matcher import HybridMatcher

        self.matcher = HybridMatcher.load(context.artifacts["matcher"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        sides = []
        for side in SIDES:
            cols = {c: c.removeprefix(f"{side}_") for c in model_input.columns if c.startswith(f"{side}_")}
            frame = model_input[list(cols)].rename(columns=cols)
            sides.append(rows_from_frame(frame.assign(product_id=[f"{side}-{i}" for i in range(len(frame))])))
        score = self.matcher.predict_proba(list(zip(*sides, strict=True)))
        return pd.DataFrame({"score": score, "match": score >= self.matcher.threshold})


def _log_model(folder: Path, sample: list[tuple[dict, dict, int]], register: bool, eval_set: str, f1: float):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    frame = pd.DataFrame([{f"{side}_{k}": json.dumps(r.get(k) or []) if k == "specs" else r.get(k) or ""
                           for side, r in zip(SIDES, (a, b), strict=True) for k in COLUMNS[1:]}
                          for a, b, _ in sample[:3]])  # fmt: skip
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).parent / "models" / "matcher_model.py"),  # code, not a pickle
        artifacts={"matcher": str(folder)},
        signature=ModelSignature(  # titles required; descriptions and spec tables (JSON) optional
            inputs=Schema([ColSpec("string", c, required=c.endswith("_title")) for c in frame.columns]),
            outputs=Schema([ColSpec("float", "score"), ColSpec("boolean", "match")]),
        ),
        input_example=frame,
        registered_model_name=MODEL_NAME if register else None,
        pip_requirements=["torch==2.14.1", "transformers", "safetensors", "scikit-learn", "pandas"],
    )
    if not register:
        return None, None
    version = str(info.registered_model_version)
    p = tracking.promote_if_better(MODEL_NAME, version, metric=METRIC, value=f1, eval_set=eval_set)
    mlflow.set_tag("champion_decision", p.reason)
    return version, p.reason


# --------------------------------------------------------------------------------------------------------- flow


@flow(name="train-matcher")
def train_matcher(
    source: str | None = None,
    benchmark: str | None = None,
    train_split: str = "train",
    valid_split: str = "valid",
    test_split: str = "test",
    tower: str = "pretrained",
    max_iter: int = 300,
    learning_rate: float = 0.05,
    max_leaf_nodes: int = 15,
    seed: int = 0,
    supcon_epochs: int = 0,
    warehouse_root: str | None = None,
    experiment: str = EXPERIMENT,
    register_model: bool = True,
) -> dict[str, Any]:
    """Fit the pair matcher on the warehouse's labelled ``train_split`` pairs (of ``benchmark`` and ``source``, or
    all), choose its threshold on the ``valid_split`` pairs, score the ``test_split`` pairs once, log everything to
    MLflow and register ``pair-matcher``. A split name matches exactly, or as a prefix when no split has it.

    ``supcon_epochs`` > 0 also fine-tunes a copy of the text tower with SupCon on the train pairs (epoch chosen on
    the valid pairs) and fits the trees again with its cosine as one more feature (``supcon_cosine``); that matcher
    is kept only when its valid pair F1 is higher (the tuned tower saw the train pairs, so valid decides)."""
    from features.matcher import FEATURES, HybridConfig, HybridMatcher, PairFeatures

    logger = get_run_logger()
    started = time.perf_counter()
    wh = Warehouse(warehouse_root)
    names = {"train": train_split, "valid": valid_split, "test": test_split}
    pairs = {k: labelled_pairs(wh, source, name, benchmark) for k, name in names.items()}
    for split in ("train", "valid"):
        if not any(y for *_, y in pairs[split]):
            where = (f" of benchmark {benchmark!r}" if benchmark else "") + (f" of source {source!r}" if source else "")
            raise LookupError(
                f"{len(pairs[split])} labelled {names[split]!r} pairs{where} in {wh.root}, none of them a match; "
                f"the matcher learns from labelled train and valid pairs: import a dataset that has them (`enrich "
                f"import ditto <folder>`) or check --benchmark / --source and the split names"
            )
    cfg = HybridConfig(max_iter=max_iter, learning_rate=learning_rate, max_leaf_nodes=max_leaf_nodes, seed=seed,
                       features=tuple(f for f in FEATURES if f != "supcon_cosine"))  # fmt: skip
    features = PairFeatures(_tower(tower)).fit(_catalog_rows(wh, source))
    matcher = HybridMatcher(cfg, features=features).fit(pairs["train"], pairs["valid"])
    metrics, history = {"val_pair_f1_plain": matcher.valid_f1}, []
    if supcon_epochs:
        tuner, history = _fit_supcon(pairs["train"], pairs["valid"], supcon_epochs, seed, tiny=tower == "tiny")
        tuned = PairFeatures(features.tower, features.batch_size, supcon=tuner.embed)
        tuned.word_tfidf, tuned.char_tfidf, tuned._cache = features.word_tfidf, features.char_tfidf, features._cache
        with_sc = HybridMatcher(dataclasses.replace(cfg, features=(*cfg.features, "supcon_cosine")), features=tuned)
        with_sc.fit(pairs["train"], pairs["valid"])
        metrics["val_pair_f1_supcon"] = with_sc.valid_f1
        if with_sc.valid_f1 > matcher.valid_f1:
            matcher = with_sc
    supcon_used = "supcon_cosine" in [FEATURES[c] for c in matcher.columns]
    if supcon_epochs and not supcon_used:  # kept for blocking (`enrich dedupe --method matcher`), not a feature
        matcher.features.supcon = tuner.embed
    metrics |= {"fit_seconds": time.perf_counter() - started, "threshold": matcher.threshold}
    for split in ("valid", "test"):
        if pairs[split]:
            y = np.array([t[2] for t in pairs[split]], bool)
            found = _scores(y, matcher.predict([(a, b) for a, b, _ in pairs[split]]))
            metrics |= {f"{'val' if split == 'valid' else split}_pair_{k}": v for k, v in found.items()}
    eval_set = pairs_set_id(benchmark or source, pairs["valid"])

    tracking.setup(experiment)
    with mlflow.start_run(run_name=f"pair-matcher:{source or 'all'}") as active, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params(tracking.flat_params(dataclasses.asdict(cfg), "matcher."))
        mlflow.log_params({"source": source or "all", "benchmark": benchmark or "all", "tower": tower,
                           "splits": ",".join(names.values()), "features_used": ",".join(
            FEATURES[c] for c in matcher.columns)} | {f"data.{k}_pairs": len(v) for k, v in pairs.items()}
            | {f"data.{k}_matches": sum(y for *_, y in v) for k, v in pairs.items()})  # fmt: skip
        mlflow.set_tags({"source": source or "all", "warehouse": wh.root, "kind": "pair-matcher", "eval_set": eval_set})
        mlflow.log_metrics(metrics)
        for h in history:  # SupCon's epochs (-1: before fine-tuning)
            mlflow.log_metrics({"supcon_val_cosine_f1": h["score"], "supcon_loss": h["loss"]}, step=h["epoch"] + 1)
        mlflow.log_params({"supcon_epochs": supcon_epochs, "supcon_used": supcon_used})
        folder = matcher.save(Path(tmp) / "matcher")
        version, promotion = _log_model(folder, pairs["valid"], register_model, eval_set,
                                        metrics["val_pair_f1"])  # fmt: skip
        run_id = active.info.run_id
    summary = {"run_id": run_id, "source": source, "model_version": version, "promotion": promotion,
               "supcon_used": supcon_used,
               "pairs": {k: len(v) for k, v in pairs.items()}, "threshold": round(matcher.threshold, 4),
               **{k: round(v, 4) for k, v in metrics.items() if k.startswith(("val_", "test_"))},
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    logger.info("pair matcher on %s: %s", source or "all", summary)
    row = {k: summary[k] for k in ("model_version", "threshold") if summary[k] is not None}
    row |= {k: v for k, v in summary.items() if k.startswith(("val_", "test_"))}
    create_markdown_artifact(key="train-matcher", markdown="# Pair matcher\n\n" + reports.markdown_table([row])
                             + f"\n\n{promotion}\n", description=f"pair matcher on {source or 'all'}")  # fmt: skip
    return summary


def load_matcher(version: str | None = None):
    """``pair-matcher@champion`` (or ``version``) -> (HybridMatcher, model version, MLflow run id).

    Raises:
        LookupError: no @champion yet, or no such version (train one with `enrich train matcher`).
    """
    pyfunc, version, run_id = tracking.load_registered(
        MODEL_NAME, version, "enrich train matcher (it needs labelled pairs: enrich import ditto <folder>)"
    )
    return pyfunc.matcher, version, run_id
