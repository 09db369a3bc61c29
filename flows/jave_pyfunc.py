"""JAVE as an MLflow pyfunc: ``mlflow.pyfunc.load_model("models:/jave@champion").predict(df)``.

Input: a DataFrame with ``product_id``, ``title`` and optionally ``description``, ``specs`` (list of {key, value}
or its JSON), ``images`` (list of paths/URIs or JSON). Output: one row per predicted value: ``product_id``,
``attribute``, ``value``, ``field``, ``begin``, ``end``, ``score``, ``threshold``, ``kind`` (extracted | implicit),
``accepted`` (score at or above the attribute's threshold chosen on validation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

OUTPUT_COLUMNS = ["product_id", "attribute", "value", "field", "begin", "end", "score", "threshold", "kind", "accepted"]
THRESHOLDS = "thresholds.json"


def _listish(v: Any) -> list:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return []
    if isinstance(v, str):
        return json.loads(v) if v.strip().startswith("[") else [v]
    return list(v)


def rows_from_frame(df: pd.DataFrame) -> list[dict[str, Any]]:
    missing = {"product_id", "title"} - set(df.columns)
    if missing:
        raise ValueError(f"JAVE input is missing column(s) {sorted(missing)}; give at least product_id and title")
    rows = []
    for r in df.to_dict("records"):
        rows.append(
            {
                "product_id": str(r["product_id"]),
                "title": r["title"],
                "description": r.get("description") if isinstance(r.get("description"), str) else None,
                "category": r.get("category") if isinstance(r.get("category"), str) else None,
                "specs": [dict(s) for s in _listish(r.get("specs"))],
                "images": [str(u) for u in _listish(r.get("images"))],
                "labels": [],
            }
        )
    return rows


class JaveEnricher:
    """A trained JAVE checkpoint folder + its thresholds -> prediction rows. Shared by the pyfunc and the flows."""

    def __init__(self, checkpoint_dir: str | Path):
        from features.text import load_tokenizer
        from jave.trainer import load_trained

        self.checkpoint_dir = Path(checkpoint_dir)
        self.model, self.spec = load_trained(self.checkpoint_dir)
        cfg = json.loads((self.checkpoint_dir / "config.json").read_text())["model"]
        name = cfg.get("text", {}).get("name")
        self.tokenizer = load_tokenizer(None if cfg.get("text", {}).get("tiny") else name)
        path = self.checkpoint_dir / THRESHOLDS
        self.thresholds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        self.use_image = bool(cfg.get("use_image")) and getattr(self.model, "image_tower", None) is not None

    def predict_rows(self, rows: list[dict[str, Any]], batch_size: int = 64) -> list[dict[str, Any]]:
        from jave.data import build_examples
        from jave.predict import predict

        if not rows:
            return []
        examples = build_examples(rows, self.spec, self.tokenizer)
        image_kwargs = {}
        if self.use_image:
            image_kwargs = {"image_loader": load_image, "preprocess": self.model.image_tower.preprocess}
        preds = predict(
            self.model, examples, self.spec, batch_size, thresholds=self.thresholds, gate=False, **image_kwargs
        )
        out: list[dict[str, Any]] = []
        for p in preds:
            for x in p.extractions:
                t = float(self.thresholds.get(x.attribute, 0.5))
                score = float(x.score or 0.0)
                out.append(
                    {"product_id": p.product_id, "attribute": x.attribute, "value": x.value, "field": x.field,
                     "begin": int(x.begin), "end": int(x.end), "score": score, "threshold": t,
                     "kind": "extracted", "accepted": score >= t}
                )  # fmt: skip
            for attr, (value, prob) in p.implicit.items():
                t = float(self.thresholds.get(attr, 0.5))
                out.append(
                    {"product_id": p.product_id, "attribute": attr, "value": value, "field": None, "begin": None,
                     "end": None, "score": float(prob), "threshold": t, "kind": "implicit",
                     "accepted": float(prob) >= t}
                )  # fmt: skip
        return out


def load_image(uri: str):
    """uri -> RGB PIL image through the warehouse's media layer (same guards as ingestion)."""
    from warehouse.media import MediaConfig, decode_image, fetch_bytes

    cfg = MediaConfig()
    image, _ = decode_image(fetch_bytes(uri, cfg), cfg, uri=uri)
    return image


class JavePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.enricher = JaveEnricher(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        rows = rows_from_frame(model_input)
        return pd.DataFrame(self.enricher.predict_rows(rows), columns=OUTPUT_COLUMNS)
