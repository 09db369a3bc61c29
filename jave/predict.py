"""Inference with a trained JAVE model (Zhu et al., EMNLP 2020): attribute probabilities, extracted values as exact
substrings of the product's fields, and implicit values. Deterministic: eval mode, no gradients, fixed order.

Scores. An extraction's ``score`` is the codec's mean probability of the span's argmax tags, multiplied by the
attribute head's probability for its attribute (``attribute_weighted=True``, the default): a value is trusted
when both the tagger and the attribute head agree. With ``gate=True`` (the default) extractions of attributes
whose probability is below their threshold (``thresholds[attr]``, else 0.5) are dropped, as JAVE uses the
attribute prediction to decide which attributes a product has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from jave.codec import Extraction, decode
from jave.data import Example, ImageLoader, Preprocess, TaskSpec, VisualCache, batch_order, make_batch

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class RawOutput:
    """The model's probabilities for one example (unpadded)."""

    attr_probs: np.ndarray  # (A,)
    tag_probs: np.ndarray  # (T, K)
    implicit_probs: tuple[np.ndarray, ...]  # one (V_k,) per implicit attribute


@dataclass(frozen=True)
class ProductPrediction:
    """What the model says about one product.

    Attributes:
        product_id: the example's id.
        attributes: attribute -> probability that the product has a value for it (every vocabulary attribute).
        extractions: values found in the text, each an exact substring of its field with field-relative offsets
            and a score (module docstring), in text order.
        implicit: implicit attribute -> (most probable value, its probability).
    """

    product_id: str
    attributes: dict[str, float]
    extractions: list[Extraction] = field(default_factory=list)
    implicit: dict[str, tuple[str, float]] = field(default_factory=dict)

    def best_values(self) -> dict[str, Extraction]:
        """Attribute -> its highest-scoring extraction (ties: the earliest)."""
        out: dict[str, Extraction] = {}
        for x in self.extractions:
            if x.attribute not in out or (x.score or 0.0) > (out[x.attribute].score or 0.0):
                out[x.attribute] = x
        return out


@torch.no_grad()
def infer(
    model: nn.Module,
    examples: Sequence[Example],
    spec: TaskSpec,
    batch_size: int = 64,
    *,
    image_loader: ImageLoader | None = None,
    preprocess: Preprocess | None = None,
    visual_cache: VisualCache | None = None,
    max_images: int = 4,
) -> list[RawOutput]:
    """The model's probabilities for every example, in input order (batched by length, then put back)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[RawOutput | None] = [None] * len(examples)
    try:
        for index in batch_order(examples, batch_size, shuffle=False, bucket_by_length=True):
            chunk = [examples[i] for i in index]
            batch = make_batch(
                chunk,
                image_loader=image_loader,
                preprocess=preprocess,
                visual_cache=visual_cache,
                max_images=max_images,
                with_labels=False,
            ).to(device)
            res = model(batch)
            attr = torch.sigmoid(res.attr_logits.float()).cpu().numpy()  # (B, A)
            tags = res.tag_logits.float().softmax(-1).cpu().numpy()  # (B, T, K)
            implicit = [logits.float().softmax(-1).cpu().numpy() for logits in res.implicit_logits]
            for row, i in enumerate(index):
                n = examples[i].length
                out[i] = RawOutput(attr[row], tags[row, :n], tuple(p[row] for p in implicit))
    finally:
        model.train(was_training)
    if len(spec.vocab) and out and out[0] is not None and out[0].attr_probs.shape[0] != len(spec.vocab):
        raise ValueError(
            f"The model predicts {out[0].attr_probs.shape[0]} attributes but the spec has {len(spec.vocab)}; "
            "load the spec.json saved with these weights."
        )
    return out  # type: ignore[return-value]


def threshold_array(spec: TaskSpec, thresholds: Mapping[str, float] | float | None) -> np.ndarray:
    """(A,) per-attribute thresholds: one value for all, a dict (missing attributes: 0.5), or 0.5 everywhere."""
    if thresholds is None:
        return np.full(len(spec.vocab), DEFAULT_THRESHOLD)
    if isinstance(thresholds, int | float):
        return np.full(len(spec.vocab), float(thresholds))
    return np.array([float(thresholds.get(a, DEFAULT_THRESHOLD)) for a in spec.vocab.attributes])


def to_prediction(
    example: Example,
    raw: RawOutput,
    spec: TaskSpec,
    thresholds: np.ndarray,
    *,
    attribute_weighted: bool = True,
    gate: bool = True,
) -> ProductPrediction:
    """One example's raw probabilities -> its `ProductPrediction` (scoring and gating as the module says)."""
    attrs = spec.vocab.attributes
    extractions = []
    for x in decode(example.text, example.encoded.offsets, raw.tag_probs, spec.vocab, example.fields):
        a = spec.vocab.id(x.attribute)
        if gate and raw.attr_probs[a] < thresholds[a]:
            continue
        score = x.score * float(raw.attr_probs[a]) if attribute_weighted else x.score
        # built directly: dataclasses.replace() introspects the fields on every call (~15% of tiny-model inference)
        extractions.append(Extraction(x.attribute, x.value, x.field, x.begin, x.end, score))
    implicit = {}
    for (name, values), probs in zip(spec.implicit.items(), raw.implicit_probs, strict=True):
        k = int(np.argmax(probs))
        implicit[name] = (values[k], float(probs[k]))
    return ProductPrediction(
        product_id=example.product_id,
        attributes={a: float(p) for a, p in zip(attrs, raw.attr_probs, strict=True)},
        extractions=extractions,
        implicit=implicit,
    )


def predict(
    model: nn.Module,
    examples: Sequence[Example],
    spec: TaskSpec,
    batch_size: int = 64,
    thresholds: Mapping[str, float] | float | None = None,
    *,
    image_loader: ImageLoader | None = None,
    preprocess: Preprocess | None = None,
    visual_cache: VisualCache | None = None,
    max_images: int = 4,
    attribute_weighted: bool = True,
    gate: bool = True,
) -> list[ProductPrediction]:
    """Predictions for ``examples``, in their order.

    Args:
        model: a `JaveModel` built for ``spec`` (its weights are not changed; its train/eval mode is restored).
        examples: from ``build_examples`` (labels are not needed).
        spec: the task the model was trained on.
        batch_size: products per forward pass.
        thresholds: per-attribute thresholds (``choose_thresholds``), one for all, or None for 0.5.
        image_loader, preprocess, visual_cache, max_images: images, as in ``jave.data.batches``.
        attribute_weighted: multiply each extraction's tag score by its attribute's probability.
        gate: drop extractions of attributes below their threshold.
    """
    raw = infer(
        model,
        examples,
        spec,
        batch_size,
        image_loader=image_loader,
        preprocess=preprocess,
        visual_cache=visual_cache,
        max_images=max_images,
    )
    th = threshold_array(spec, thresholds)
    return [
        to_prediction(e, r, spec, th, attribute_weighted=attribute_weighted, gate=gate)
        for e, r in zip(examples, raw, strict=True)
    ]
