"""AE-110K and OA-Mine as curated for ExtractGPT (Brinkmann et al., "Product Attribute Value Extraction using
Large Language Models", 2023): one JSONL line per product title, ``target_scores{attribute: {value: 1}}``.

Values carry no spans, so each is string-matched into the title; ``{"n/a": 1}`` (the attribute applies but the
title has no value for it) is kept as a label with value "n/a" and no span, because the evaluation protocol
scores it. ``product_id`` is ``<dataset>:<split>:<0-based line number>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

from warehouse.schema import empty_row

from ._common import Importer, ImportStats, PathLike, aligned_label, check_split, dumps_extra, iter_jsonl, require_dir

SPLITS: tuple[str, ...] = ("train", "test")
_MAPPED = ("input", "category", "target_scores")


def labels_from_target_scores(title: str, target_scores: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One label per (attribute, value), in the source's order, spans found in the title."""
    return [
        aligned_label(attribute, value, title=title) for attribute, values in target_scores.items() for value in values
    ]


def iter_rows(
    path: PathLike, split: str | None = None, stats: ImportStats | None = None, *, dataset: str = "ae-110k"
) -> Iterator[dict]:
    """Canonical rows of an ExtractGPT-format dataset folder (``train.jsonl``, ``test.jsonl``).

    Args:
        path: the dataset folder, e.g. ``../shared/data/ae-110k``.
        split: "train" or "test"; None for both.
        stats: filled while streaming, when given.
        dataset: the dataset name, used as ``source`` and ``product_id`` prefix.
    """
    splits = check_split(dataset, split, SPLITS)
    root = require_dir(dataset, path, *(f"{s}.jsonl" for s in splits))
    for s in splits:
        for lineno, obj in iter_jsonl(root / f"{s}.jsonl"):
            title = obj["input"]
            extra = {"split": s, "dataset": dataset, "line": lineno}
            extra.update({k: v for k, v in obj.items() if k not in _MAPPED})
            row = empty_row(
                product_id=f"{dataset}:{s}:{lineno}",
                title=title,
                category=obj.get("category"),
                labels=labels_from_target_scores(title, obj.get("target_scores") or {}),
                source=dataset,
                extra=dumps_extra(extra),
            )
            if stats is not None:
                stats.add_row(row, s)
            yield row


AE110K = Importer(
    name="ae-110k",
    splits=SPLITS,
    iter_rows=partial(iter_rows, dataset="ae-110k"),
    description="AliExpress titles with attribute values (ExtractGPT's 10-category AE-110K subset)",
)
OAMINE = Importer(
    name="oa-mine",
    splits=SPLITS,
    iter_rows=partial(iter_rows, dataset="oa-mine"),
    description="Amazon titles with attribute values (ExtractGPT's OA-Mine subset)",
)
