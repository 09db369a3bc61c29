"""JAVE as an MLflow pyfunc: ``mlflow.pyfunc.load_model("models:/jave@champion").predict(df)``.

Input: a DataFrame with ``product_id``, ``title`` and optionally ``description``, ``specs`` (list of {key, value}
or its JSON), ``images`` (list of paths/URIs or JSON). Output: one row per predicted value: ``product_id``,
``attribute``, ``value``, ``field``, ``begin``, ``end``, ``score``, ``threshold``, ``kind`` (extracted | implicit),
``accepted`` (score at or above the attribute's threshold chosen on validation).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from torch import Tensor

OUTPUT_COLUMNS = ["product_id", "attribute", "value", "field", "begin", "end", "score", "threshold", "kind", "accepted"]
THRESHOLDS = "thresholds.json"
DECODE_MAX_SIDE = 1024  # as ingestion stores images and training loads them (warehouse.media.MediaConfig)


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
    """A trained JAVE checkpoint folder + its thresholds -> prediction rows. Shared by the pyfunc and the flows.

    Per call: the rows are tokenized once; the visual features of their images are taken from ``visual_store``
    (keyed by image sha256 + `backbone_id`) or computed in batches through the image tower and stored; then text
    batches bucketed by token length run the text tower and the JAVE heads. ``configure`` picks the device,
    bf16 autocast, threads and the store; the defaults (CPU, fp32, no store) are what the pyfunc uses.
    """

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
        self.configure(device="cpu", precision="fp32")

    def configure(
        self,
        *,
        device: str = "auto",
        precision: str = "auto",
        backend: str = "auto",
        visual_store: Any = None,
        threads: int | None = None,
        batch_size: int | None = None,
        image_batch_size: int | None = None,
        decode_max_side: int = DECODE_MAX_SIDE,
        io_threads: int = 4,
    ) -> JaveEnricher:
        """Where and how to run.

        Args:
            device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` (cuda when present).
            precision: ``fp32`` | ``bf16`` | ``int8`` | ``auto`` (bf16 autocast where it measures faster than fp32).
                ``int8``: the text tower runs with int8 weights under ONNX Runtime (CPU; see bench/precision.py for
                its quality against fp32), everything else in fp32.
            backend: ``torch`` | ``onnx`` | ``auto`` for the frozen image tower on CPU, and for the text tower when it
                runs in fp32 there: ``auto`` takes ONNX Runtime when installed (outputs equal to eager PyTorch within
                1e-5; the image tower ~4x, the text tower ~2x faster on 2 cores).
            visual_store: a ``warehouse.visual_features.VisualFeatureStore`` for `backbone_id`, or None (features
                are computed for every call).
            threads: CPU intra-op threads (default: leave torch's setting, which is one per physical core).
            batch_size, image_batch_size: products per text forward and images per image-tower forward; default
                64 / 32 on CPU, sized to free GPU memory on CUDA.
            decode_max_side: images are decoded (JPEG DCT-scaled) to at most this side before the tower's own
                resize; part of `backbone_id`.
            io_threads: parallel image fetch + decode + preprocess.
        """
        from features.onnx_backend import onnx_text_tower, resolve_backend
        from features.runtime import (
            ImageEncoder,
            autocast_inference_copy,
            cuda_batch_size,
            resolve_device,
            resolve_precision,
            set_threads,
        )

        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.backend = resolve_backend("onnx" if precision == "int8" and backend == "auto" else backend, self.device)
        if precision == "int8" and self.backend != "onnx":
            raise ValueError(f"precision 'int8' runs the text tower under ONNX Runtime; backend {backend!r} cannot")
        if self.device.type == "cpu" and threads is not None:
            set_threads(threads)
        self.model.to(self.device).eval()
        self.precision = "int8" if precision == "int8" else ("bf16" if self.dtype is not None else "fp32")
        # what runs in the text tower's place while predicting (None: the tower itself)
        self.text_runtime: torch.nn.Module | None = None
        if precision == "int8":
            self.text_runtime = onnx_text_tower(self.model.text_tower, int8=True)
        elif self.backend == "onnx" and self.dtype is None:
            # fp32 on CPU: ONNX Runtime runs the text tower ~2x faster than eager PyTorch (MiniLM at 42 tokens,
            # batch 64, 2 cores of the 2026-11-23 EPYC: 337-356 vs 162-189 texts/s), same states to ~1e-5.
            # Where bf16 autocast measured faster (``auto``), PyTorch bf16 is faster still (521 texts/s on an
            # AVX512-BF16 EPYC) and keeps the tower.
            self.text_runtime = onnx_text_tower(self.model.text_tower, int8=False)
        elif self.dtype is not None:
            # bf16: weights stored in bf16 (the same outputs as autocast's per-call casts) and, on CPU, attention in
            # fp32 (faster there at these lengths): +3.8-5.3% products per CPU second in interleaved in-process runs on
            # the 2026-11-23 EPYC, inside the host's noise end to end
            self.text_runtime = autocast_inference_copy(self.model.text_tower, self.dtype, self.device)
        cuda = self.device.type == "cuda"
        self.batch_size = batch_size or (cuda_batch_size(8 * 2**20, cap=512) if cuda else 64)
        self.decode_max_side = decode_max_side
        self.io_threads = max(1, io_threads)
        self.visual_store = visual_store
        self.image_encoder = None
        if self.use_image:
            self.image_encoder = ImageEncoder(
                self.model.image_tower, self.device, self.dtype,
                batch_size=image_batch_size or (cuda_batch_size(24 * 2**20, cap=512) if cuda else 32),
                backend=self.backend,
            )  # fmt: skip
            if visual_store is not None and visual_store.backbone_id != self.backbone_id:
                raise ValueError(
                    f"visual_store holds features of {visual_store.backbone_id!r} but this model's image tower is "
                    f"{self.backbone_id!r}; open the store with enricher.backbone_id"
                )
        return self

    @property
    def backbone_id(self) -> str:
        """Names the visual features this model consumes: tower, weights fingerprint, preprocessing, decode size."""
        if not self.use_image:
            raise ValueError("this JAVE model has no image tower (use_image=False): it has no visual features")
        if getattr(self, "_backbone_key", None) != self.decode_max_side:
            from features.runtime import weights_fingerprint

            tower = self.model.image_tower
            name = tower.cfg.name if not tower.cfg.tiny else "tiny-cnn"
            extra = (sorted(tower.data_config.items()), f"decode_max_side={self.decode_max_side}", "fp16")
            self._backbone_id = f"{name}-{weights_fingerprint(tower, *extra)}"
            self._backbone_key = self.decode_max_side
        return self._backbone_id

    def predict_rows(self, rows: list[dict[str, Any]], batch_size: int | None = None) -> list[dict[str, Any]]:
        """Prediction rows (``OUTPUT_COLUMNS``) for canonical rows; a row may carry ``image_media`` (its media
        table entries: uri, sha256, blob_uri) so images are keyed and read without refetching the source."""
        from features.onnx_backend import swapped
        from features.runtime import autocast
        from jave.data import build_examples
        from jave.predict import predict

        if not rows:
            return []
        examples = build_examples(rows, self.spec, self.tokenizer)
        visual = self.visual_features(rows) if self.use_image else None
        with autocast(self.device, self.dtype), swapped(self.model, "text_tower", self.text_runtime):
            preds = predict(
                self.model, examples, self.spec, batch_size or self.batch_size, thresholds=self.thresholds,
                gate=False, visual_cache=visual,
            )  # fmt: skip
        return self.prediction_rows(preds)

    def prediction_rows(self, preds: list[Any]) -> list[dict[str, Any]]:
        """`jave.predict.ProductPrediction`s -> output rows (``OUTPUT_COLUMNS``), thresholds applied."""
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

    def visual_features(self, rows: list[dict[str, Any]], max_images: int = 4) -> dict[str, tuple[Tensor, Tensor]]:
        """uri -> (global (Dv,), regions (R, Dv)) float16 for the first ``max_images`` images of each row.

        Keyed by the image's sha256: from the row's ``image_media`` entry when it has one (pixels then come from
        the decoded blob), else by fetching the URI and hashing its bytes. Stored features are used as they are;
        missing ones are computed in batches and stored. Features are rounded to float16 either way, so a
        product's prediction does not depend on whether its features came from the store. An image that cannot
        be read is left out (its slot is masked, as in training).
        """
        from warehouse.media import MediaConfig, MediaError, fetch_bytes

        cfg = MediaConfig()
        sha_of: dict[str, str] = {}  # uri -> sha256
        source: dict[str, tuple[str, bytes | None]] = {}  # sha256 -> (where the pixels are, bytes if fetched)
        unkeyed: list[str] = []
        for row in rows:
            media = {m["uri"]: m for m in row.get("image_media") or () if m.get("sha256") and m.get("blob_uri")}
            for uri in list(row.get("images") or ())[:max_images]:
                if uri in sha_of:
                    continue
                m = media.get(uri)
                if m is not None:
                    sha_of[uri] = m["sha256"]
                    source.setdefault(m["sha256"], (m["blob_uri"], None))
                else:
                    unkeyed.append(uri)

        def fetch(uri: str) -> tuple[str, bytes | None]:
            try:
                return uri, fetch_bytes(uri, cfg)
            except (MediaError, OSError, ValueError):
                return uri, None

        for uri, data in self._map(fetch, list(dict.fromkeys(unkeyed))):
            if data is not None:
                sha = hashlib.sha256(data).hexdigest()
                sha_of[uri] = sha
                source.setdefault(sha, (uri, data))
        store = self.visual_store
        found = store.get_many(list(source)) if store is not None else {}
        missing = [sha for sha in source if sha not in found]
        if missing:
            found.update(self._compute(missing, source, cfg))
        # float16 as stored: the batch assembly (`jave.data.make_batch`) casts each batch to float32 as it copies it
        # (casting all of a 1,024-product call here took ~10% of a warm run: a second full copy, freshly allocated)
        return {
            uri: (torch.from_numpy(found[sha][0]), torch.from_numpy(found[sha][1]))
            for uri, sha in sha_of.items()
            if sha in found
        }

    def _compute(
        self, shas: list[str], source: dict[str, tuple[str, bytes | None]], cfg: Any
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from features.runtime import encode_images
        from warehouse.media import MediaError, decode_image, fetch_bytes

        tower = self.model.image_tower

        def load(sha: str) -> Tensor | None:
            where, data = source[sha]
            try:
                image, _ = decode_image(data if data is not None else fetch_bytes(where, cfg), cfg, uri=where,
                                        max_side=self.decode_max_side)  # fmt: skip
                return tower.preprocess([image])[0]
            except (MediaError, OSError, ValueError):
                return None

        out = encode_images(self.image_encoder, shas, load, io_threads=self.io_threads)
        if self.visual_store is not None:
            self.visual_store.put_many(out)
        return out

    def _map(self, fn: Any, items: list) -> list:
        if len(items) <= 1 or self.io_threads == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self.io_threads, len(items))) as pool:
            return list(pool.map(fn, items))


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
