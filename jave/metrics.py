"""Evaluation metrics for attribute value extraction: attribute-head F1, strict BIO span F1 (seqeval), the
ExtractGPT / WDC-PAVE product-attribute protocol, implicit-value accuracy, per-attribute tables and an attribute
confusion matrix. Pure Python/numpy; every function takes plain arrays, lists and dicts.

ExtractGPT: Brinkmann, Shraga, Bizer, "Product Attribute Value Extraction using Large Language Models" (2023).
WDC-PAVE: Brinkmann, Baumann, Bizer, "Using LLMs for the Extraction and Normalization of Product Attribute Values"
(ADBIS 2024). Both count every (product, attribute) pair the gold data names, "n/a" included.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

NA_VALUE = "n/a"
OUTCOMES: tuple[str, ...] = ("NN", "NV", "VN", "VC", "VW")


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den > 0 else 0.0


# ------------------------------------------------------------------------------------------------- attribute head


def attribute_f1(gold: Any, prob: Any, threshold: float | Sequence[float] = 0.5) -> dict[str, float]:
    """Multi-label F1 of the attribute head.

    Args:
        gold: (N, A) 0/1 targets.
        prob: (N, A) predicted probabilities.
        threshold: one threshold, or one per attribute (A,).

    Returns:
        ``attr_micro_f1`` (over all N x A decisions) and ``attr_macro_f1`` (mean over attributes with a gold
        positive or a predicted one; 0 when there is none).
    """
    gold = np.asarray(gold, dtype=bool)
    pred = np.asarray(prob, dtype=np.float64) >= np.asarray(threshold, dtype=np.float64)
    if gold.shape != pred.shape:
        raise ValueError(f"gold has shape {gold.shape} but prob has {pred.shape}; pass (N, A) arrays of one shape")
    tp = (gold & pred).sum(0)
    fp = (~gold & pred).sum(0)
    fn = (gold & ~pred).sum(0)
    micro = _f1(_ratio(tp.sum(), tp.sum() + fp.sum()), _ratio(tp.sum(), tp.sum() + fn.sum()))
    active = (tp + fp + fn) > 0
    per_attr = [_f1(_ratio(t, t + p), _ratio(t, t + n)) for t, p, n in zip(tp, fp, fn, strict=True)]
    macro = float(np.mean([f for f, keep in zip(per_attr, active, strict=True) if keep])) if active.any() else 0.0
    return {"attr_micro_f1": float(micro), "attr_macro_f1": macro}


# ---------------------------------------------------------------------------------------------- BIO span (seqeval)


def value_f1_seqeval(
    gold: Sequence[Sequence[int | str]],
    pred: Sequence[Sequence[int | str]],
    tag_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Strict span F1 over BIO tag sequences (seqeval, ``mode="strict"``, IOB2): a span counts only when its
    attribute, start and end all match, and an I- tag without its B- starts no span.

    Args:
        gold, pred: one tag sequence per product (tag ids with ``tag_names``, or tag strings), same lengths.
        tag_names: id -> tag string, e.g. ``AttributeVocab.tag_names``.

    Returns:
        ``value_f1_strict``, ``value_precision``, ``value_recall`` (micro over spans; 0 when there are none).
    """
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    def names(seqs: Sequence[Sequence[int | str]]) -> list[list[str]]:
        if tag_names is None:
            return [[str(t) for t in s] for s in seqs]
        return [[t if isinstance(t, str) else tag_names[int(t)] for t in s] for s in seqs]

    y_true, y_pred = names(gold), names(pred)
    if len(y_true) != len(y_pred) or any(len(a) != len(b) for a, b in zip(y_true, y_pred, strict=False)):
        raise ValueError("gold and pred must hold the same number of sequences, each of the same length")
    if not any(t != "O" for s in y_true + y_pred for t in s):
        return {"value_f1_strict": 0.0, "value_precision": 0.0, "value_recall": 0.0}
    kw = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    return {
        "value_f1_strict": float(f1_score(y_true, y_pred, **kw)),
        "value_precision": float(precision_score(y_true, y_pred, **kw)),
        "value_recall": float(recall_score(y_true, y_pred, **kw)),
    }


# ---------------------------------------------------------------------------------------- ExtractGPT / WDC-PAVE


def outcome(gold_values: Iterable[str], predicted: str | None) -> str:
    """One (product, attribute) decision as ExtractGPT classifies it: NN, NV, VN, VC or VW.

    Gold is "n/a" when its values hold "n/a"; a prediction of None or "n/a" is no value. VC needs an exact match
    (after stripping whitespace, as the study's code does) with any gold value.
    """
    values = {v.strip() for v in gold_values if v != NA_VALUE}
    gold_na = not values
    pred_na = predicted is None or predicted == NA_VALUE
    if gold_na:
        return "NN" if pred_na else "NV"
    if pred_na:
        return "VN"
    return "VC" if predicted in values or predicted.strip() in values else "VW"


def counts_to_prf(counts: Mapping[str, int]) -> tuple[float, float, float]:
    """(precision, recall, F1) from NN/NV/VN/VC/VW counts: P = VC / (NV + VC + VW), R = VC / (VN + VC + VW)."""
    precision = _ratio(counts.get("VC", 0), counts.get("NV", 0) + counts.get("VC", 0) + counts.get("VW", 0))
    recall = _ratio(counts.get("VC", 0), counts.get("VN", 0) + counts.get("VC", 0) + counts.get("VW", 0))
    return precision, recall, _f1(precision, recall)


def extractgpt_counts(
    gold: Sequence[Mapping[str, Iterable[str]]], pred: Sequence[Mapping[str, str | None]]
) -> list[dict[str, str]]:
    """Every scored (product, attribute) decision: ``{"product": i, "attribute": a, "outcome": "VC"...}``."""
    if len(gold) != len(pred):
        raise ValueError(f"Got {len(gold)} gold products but {len(pred)} predictions; pass one of each per product")
    return [
        {"product": i, "attribute": a, "outcome": outcome(values, p.get(a))}
        for i, (g, p) in enumerate(zip(gold, pred, strict=True))
        for a, values in g.items()
    ]


def extractgpt_f1(
    gold: Sequence[Mapping[str, Iterable[str]]],
    pred: Sequence[Mapping[str, str | None]],
    categories: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """The evaluation protocol of ExtractGPT (Brinkmann et al. 2023, "Product Attribute Value Extraction using
    Large Language Models", Sec. 4; their ``calculate_recall_precision_f1_multiple_attributes``).

    For every product and every attribute its gold data names ("n/a" included), the decision is one of
    NN (gold n/a, predicted n/a: a true negative, uncounted), NV (gold n/a, a value predicted), VN (gold value,
    n/a predicted), VC (a predicted value equal to one of the gold values) or VW (a wrong value). Then
    precision = VC / (NV + VC + VW), recall = VC / (VN + VC + VW), F1 their harmonic mean: a wrong value costs
    both precision and recall. The paper's headline number is the micro F1 over all decisions (in percent there;
    fractions here). With ``categories`` the macro F1 is the mean over (attribute, category) pairs with any
    NV/VN/VC/VW decision, as the study computes it.

    Args:
        gold: per product, attribute -> set of gold values ({"n/a"} when the attribute has no value).
        pred: per product, attribute -> predicted value, or None / "n/a" for none; attributes missing are None.
        categories: per product, its category (for the macro F1).

    Returns:
        ``extractgpt_f1``, ``extractgpt_precision``, ``extractgpt_recall``, the five counts ``extractgpt_NN`` ...,
        and ``extractgpt_macro_f1`` when ``categories`` are given.
    """
    decisions = extractgpt_counts(gold, pred)
    counts = Counter(d["outcome"] for d in decisions)
    precision, recall, f1 = counts_to_prf(counts)
    out = {"extractgpt_f1": f1, "extractgpt_precision": precision, "extractgpt_recall": recall}
    out.update({f"extractgpt_{k}": float(counts.get(k, 0)) for k in OUTCOMES})
    if categories is not None:
        if len(categories) != len(gold):
            raise ValueError(f"Got {len(categories)} categories for {len(gold)} products; pass one per product")
        groups: dict[tuple[str, str | None], Counter[str]] = {}
        for d in decisions:
            groups.setdefault((d["attribute"], categories[d["product"]]), Counter())[d["outcome"]] += 1
        f1s = [counts_to_prf(c)[2] for c in groups.values() if sum(c[k] for k in ("NV", "VN", "VC", "VW"))]
        out["extractgpt_macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    return out


def wdc_pave_f1(
    gold: Sequence[Mapping[str, Iterable[str]]],
    pred: Sequence[Mapping[str, str | None]],
    categories: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """WDC-PAVE's extraction scores (Brinkmann et al., ADBIS 2024): the same NN/NV/VN/VC/VW counting as
    ``extractgpt_f1`` over every (offer, attribute) pair of the gold data; keys are prefixed ``wdc_pave_``."""
    return {k.replace("extractgpt_", "wdc_pave_"): v for k, v in extractgpt_f1(gold, pred, categories).items()}


def implicit_accuracy(gold: Sequence[Mapping[str, str]], pred: Sequence[Mapping[str, str | None]]) -> dict[str, float]:
    """Accuracy of implicit values: per product, attribute -> gold value vs attribute -> predicted value.

    Returns:
        ``implicit_accuracy`` (micro over all gold decisions), ``implicit_macro_accuracy`` (mean over attributes),
        and ``implicit_support``.
    """
    if len(gold) != len(pred):
        raise ValueError(f"Got {len(gold)} gold products but {len(pred)} predictions; pass one of each per product")
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for g, p in zip(gold, pred, strict=True):
        for a, value in g.items():
            total[a] += 1
            right[a] += p.get(a) == value
    n = sum(total.values())
    return {
        "implicit_accuracy": _ratio(sum(right.values()), n),
        "implicit_macro_accuracy": float(np.mean([right[a] / total[a] for a in total])) if total else 0.0,
        "implicit_support": float(n),
    }


# ---------------------------------------------------------------------------------------------- tables for artifacts


def per_attribute_table(
    gold: Sequence[Mapping[str, Iterable[str]]], pred: Sequence[Mapping[str, str | None]]
) -> list[dict[str, Any]]:
    """One row per attribute, ExtractGPT counting: ``{attribute, precision, recall, f1, support, NN..VW}``,
    support = gold products with a value (VN + VC + VW); sorted by support, then name."""
    by_attr: dict[str, Counter[str]] = {}
    for d in extractgpt_counts(gold, pred):
        by_attr.setdefault(d["attribute"], Counter())[d["outcome"]] += 1
    rows = []
    for a, c in by_attr.items():
        p, r, f = counts_to_prf(c)
        rows.append(
            {
                "attribute": a,
                "precision": p,
                "recall": r,
                "f1": f,
                "support": c["VN"] + c["VC"] + c["VW"],
                **{k: c[k] for k in OUTCOMES},
            }
        )
    return sorted(rows, key=lambda row: (-row["support"], row["attribute"]))


def attribute_confusion(
    gold_spans: Sequence[Iterable[tuple[str, int, int]]],
    pred_spans: Sequence[Iterable[tuple[str, int, int]]],
    attributes: Sequence[str],
) -> tuple[list[str], np.ndarray]:
    """Which attribute was predicted over each gold value span.

    A gold span (attribute, begin, end) is matched to the predicted span of the same product that overlaps it
    most (ties: the earliest); unmatched gold spans land in the "O" column, predicted spans overlapping no gold
    span in the "O" row.

    Returns:
        labels (``attributes`` + ["O"]) and counts (L, L) with gold along rows and prediction along columns.
    """
    labels = list(attributes) + ["O"]
    index = {a: i for i, a in enumerate(labels)}
    o = index["O"]
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for g_spans, p_spans in zip(gold_spans, pred_spans, strict=True):
        g_spans, p_spans = list(g_spans), list(p_spans)
        used = set()
        for ga, gb, ge in g_spans:
            overlaps = [(min(ge, pe) - max(gb, pb), -pb, k) for k, (_, pb, pe) in enumerate(p_spans)]
            best = max((x for x in overlaps if x[0] > 0), default=None)
            if best is None:
                matrix[index.get(ga, o), o] += 1
            else:
                used.add(best[2])
                matrix[index.get(ga, o), index.get(p_spans[best[2]][0], o)] += 1
        for k, (pa, _, _) in enumerate(p_spans):
            if k not in used:
                matrix[o, index.get(pa, o)] += 1
    return labels, matrix
