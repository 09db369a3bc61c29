"""Labelled datasets for training and evaluation, read from the warehouse (imported first when missing).

Splits: a dataset's own train / validation / test splits as its importer tags them (``extra.split``). Where a
dataset publishes no validation split, a seeded ``val_fraction`` of train (by a hash of product_id, so it is the
same on every run and machine) becomes validation. Nothing is ever tuned on the test split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from warehouse.tables import Warehouse

# dataset -> (train splits, validation splits, test split) as the importers name them
SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "ae-110k": (("train",), (), "test"),
    "oa-mine": (("train",), (), "test"),
    "wdc-pave": (("train",), (), "test"),
    "implicitave": (("train",), ("val",), "evaluation"),
    "mepave": (("train",), ("valid",), "test"),
    "myntra": (("all",), (), "all"),
}
# the metric each dataset is published with (what @champion is decided on)
PUBLISHED_METRIC: dict[str, str] = {
    "ae-110k": "extractgpt_f1",
    "oa-mine": "extractgpt_f1",
    "wdc-pave": "extractgpt_f1",
    "implicitave": "implicit_accuracy",
    "mepave": "value_f1_strict",
    "myntra": "value_f1_strict",
}


@dataclass
class LabelledData:
    dataset: str
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    products_version: int  # the warehouse version these rows were read at (lineage)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def _split_of(row: dict[str, Any]) -> tuple[str | None, bool]:
    extra = json.loads(row["extra"]) if row.get("extra") else {}
    return extra.get("split"), bool(extra.get("evaluation"))


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _in_validation(product_id: str, fraction: float) -> bool:
    return (_hash(product_id) % 10_000) < fraction * 10_000


def load_labelled(
    wh: Warehouse,
    dataset: str,
    *,
    val_fraction: float = 0.1,
    max_train: int | None = None,
    max_validation: int | None = None,
    version: int | None = None,
) -> LabelledData:
    """Rows of ``dataset`` from ``products``, split into train / validation / test."""
    # a catalog of our own (e.g. the demo's, source = its path) has no published split: all rows are hashed into
    # train / validation / test like myntra's
    train_s, val_s, test_s = SPLITS.get(dataset, ((None,), (), "all"))
    version = wh.version("products") if version is None else version
    table = wh.read("products", version=version)
    import pyarrow.compute as pc

    rows = table.filter(pc.equal(table["source"], dataset)).to_pylist()
    if not rows:
        raise LookupError(
            f"no products from {dataset!r} in {wh.root}; import them first: "
            f"`enrich import {dataset} ../shared/data/<folder>`"
        )
    train, val, test = [], [], []
    for r in sorted(rows, key=lambda r: r["product_id"]):
        split, is_eval = _split_of(r)
        if test_s != "all" and (split == test_s or (test_s == "evaluation" and is_eval)):
            test.append(r)
            continue
        if split in val_s:
            val.append(r)
        elif split in train_s:
            (val if not val_s and _in_validation(r["product_id"], val_fraction) else train).append(r)
    if test_s == "all":  # no published split (myntra): hold out by hash, disjoint from train/validation
        test = [r for r in rows if _in_validation("test:" + r["product_id"], 0.2)]
        held = {r["product_id"] for r in test}
        train = [r for r in train if r["product_id"] not in held]
        val = [r for r in val if r["product_id"] not in held]
    train = _subsample(train, max_train)
    val = _subsample(val, max_validation)
    return LabelledData(dataset, train, val, test, version)


def _subsample(rows: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """A seeded, order-free subsample (ids sort by domain/category, so a prefix would be one domain only)."""
    if n is None or len(rows) <= n:
        return rows
    keep = set(sorted((r["product_id"] for r in rows), key=lambda pid: _hash("sample:" + pid))[:n])
    return [r for r in rows if r["product_id"] in keep]
