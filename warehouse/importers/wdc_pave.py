"""WDC-PAVE (Brinkmann et al., "Using LLMs for the Extraction and Normalization of Product Attribute Values",
ADBIS 2024): 1,420 web offers with title + description, 1,066 train and 354 test.

Two files describe the same offers and each lacks something, so both are read:

- ``mave_format/{train,validation,test}/wdc/mave_{positives,negatives}.jsonl`` (MAVE's layout) gives the split
  and character spans, but one record per (offer, attribute), shuffled, one evidence per attribute, and one
  paragraph ``title + " \\n " + description``. Its "validation" holds attribute records of *train* offers (an
  attribute-level hold-out, not other offers), so those records are merged into train and listed in
  ``extra["mave_validation_attributes"]``. A few evidences have ``begin == -1`` (value not in the text).
- ``raw/final_target_scores.jsonl`` gives id, cluster id, separate title and description and every annotated
  value (``pid``: 0 title, 1 description), including "n/a" attributes.

Labels are the raw file's values; a value's span is MAVE's when it is exact (mapped into title or description),
else found by the shared string alignment, trying the fields ``pid`` names first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from warehouse.schema import empty_row

from ._common import (
    NA_VALUE,
    Importer,
    ImportStats,
    PathLike,
    aligned_label,
    check_split,
    dumps_extra,
    iter_jsonl,
    make_label,
    require_dir,
)

DATASET = "wdc-pave"
SPLITS: tuple[str, ...] = ("train", "test")
PARAGRAPH_SEP = " \n "  # how MAVE's single paragraph joins title and description
RAW = "raw/final_target_scores.jsonl"
# canonical split -> the MAVE folders whose records belong to it
_MAVE_DIRS: dict[str, tuple[str, ...]] = {"train": ("train", "validation"), "test": ("test",)}
_PID_FIELD = {0: "title", 1: "description"}
_MAPPED = ("input_title", "input_description", "category", "target_scores")


def _read_mave(root: Path, split: str) -> dict[str, dict[str, Any]]:
    """paragraph text -> {"spans": {(attribute, value): (begin, end)}, "validation": [attribute, ...]}."""
    offers: dict[str, dict[str, Any]] = {}
    for folder in _MAVE_DIRS[split]:
        for kind in ("positives", "negatives"):
            file = root / "mave_format" / folder / "wdc" / f"mave_{kind}.jsonl"
            if not file.exists():  # train/wdc has no negatives file
                continue
            for _, rec in iter_jsonl(file):
                text = "".join(p["text"] for p in rec["paragraphs"])
                offer = offers.setdefault(text, {"spans": {}, "validation": []})
                for attr in rec["attributes"]:
                    if folder == "validation":
                        offer["validation"].append(attr["key"])
                    for ev in attr["evidences"]:
                        offer["spans"].setdefault((attr["key"], ev["value"]), (ev["begin"], ev["end"]))
    return offers


def _mave_label(
    attribute: str, value: str, span: tuple[int, int] | None, title: str, description: str
) -> dict[str, Any] | None:
    """The MAVE span mapped into title or description, when it is exact; None otherwise."""
    if span is None:
        return None
    begin, end = span
    text = title + PARAGRAPH_SEP + description
    if begin < 0 or text[begin:end] != value:
        return None
    if end <= len(title):
        return make_label(attribute, value, "title", begin, end)
    shift = len(title) + len(PARAGRAPH_SEP)
    if begin >= shift:
        return make_label(attribute, value, "description", begin - shift, end - shift)
    return None  # crosses the separator


def _labels(obj: dict[str, Any], spans: dict[tuple[str, str], tuple[int, int]]) -> list[dict[str, Any]]:
    title, description = obj["input_title"], obj["input_description"]
    labels = []
    for attribute, values in (obj.get("target_scores") or {}).items():
        for value, info in values.items():
            if value == NA_VALUE:
                labels.append(make_label(attribute, NA_VALUE))
                continue
            label = _mave_label(attribute, value, spans.get((attribute, value)), title, description)
            if label is None:
                pids = info.get("pid", []) if isinstance(info, dict) else []
                order = [_PID_FIELD[p] for p in pids if p in _PID_FIELD]
                order += [f for f in ("title", "description") if f not in order]
                label = aligned_label(attribute, value, title=title, description=description, order=order)
            labels.append(label)
    return labels


def iter_rows(path: PathLike, split: str | None = None, stats: ImportStats | None = None) -> Iterator[dict]:
    """Canonical rows of the WDC-PAVE folder: 1,066 train offers, then 354 test offers.

    Args:
        path: the dataset folder, e.g. ``../shared/data/wdc-pave``.
        split: "train" or "test"; None for both.
        stats: filled while streaming, when given.
    """
    splits = check_split(DATASET, split, SPLITS)
    root = require_dir(DATASET, path, RAW, "mave_format")
    for s in splits:
        offers = _read_mave(root, s)
        for _, obj in iter_jsonl(root / RAW):
            offer = offers.get(obj["input_title"] + PARAGRAPH_SEP + obj["input_description"])
            if offer is None:
                continue
            extra: dict[str, Any] = {"split": s, "dataset": DATASET}
            extra.update({k: v for k, v in obj.items() if k not in _MAPPED})
            if offer["validation"]:
                extra["mave_validation_attributes"] = offer["validation"]
            row = empty_row(
                product_id=f"{DATASET}:{obj['id']}",
                title=obj["input_title"],
                description=obj["input_description"] or None,
                category=obj.get("category"),
                labels=_labels(obj, offer["spans"]),
                source=DATASET,
                extra=dumps_extra(extra),
            )
            if stats is not None:
                stats.add_row(row, s)
            yield row


IMPORTER = Importer(
    name=DATASET,
    splits=SPLITS,
    iter_rows=iter_rows,
    description="WDC-PAVE web offers (title + description) with attribute value spans",
)
