"""Myntra fashion products (100 of them): ``styles.csv`` lists the ids, ``styles/<id>.json`` is the full product
API response and ``images/<id>.jpg`` the product photo.

Mapping: title = ``productDisplayName``; description = the HTML ``productDescriptors.description`` as text (the
other descriptors go to ``extra`` as text); category = ``masterCategory > subCategory > articleType``; specs =
``articleAttributes`` in source order, then brand, colours, gender, age group, season, year, usage, fashion type.
Labels are the spec-table attributes plus brand and colours, aligned into title/description when the value is
written there, implicit otherwise (the spec table is where they come from, so it is not searched). ``"NA"`` and
empty values are not labels. ``updated_at`` = ``catalogAddDate`` (epoch seconds) as ISO-8601 UTC.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from warehouse.schema import empty_row

from ._common import (
    Importer,
    ImportStats,
    PathLike,
    aligned_label,
    check_split,
    dumps_extra,
    html_to_text,
    iter_csv,
    require_dir,
)

DATASET = "myntra"
SPLITS: tuple[str, ...] = ("all",)  # no published split
_CATEGORY_KEYS = ("masterCategory", "subCategory", "articleType")
# product JSON key -> spec key, appended after articleAttributes; the first four are also labels
_SPEC_KEYS: dict[str, str] = {
    "brandName": "Brand",
    "baseColour": "Base Colour",
    "colour1": "Colour 1",
    "colour2": "Colour 2",
    "gender": "Gender",
    "ageGroup": "Age Group",
    "season": "Season",
    "year": "Year",
    "usage": "Usage",
    "fashionType": "Fashion Type",
}
_LABEL_KEYS = ("brandName", "baseColour", "colour1", "colour2")
_MAPPED = {"id", "productDisplayName", "articleAttributes", "catalogAddDate", "productDescriptors", *_SPEC_KEYS}


def _is_value(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "NA")


def _iso(epoch: Any) -> str | None:
    try:
        return datetime.fromtimestamp(int(epoch), tz=UTC).isoformat()
    except (TypeError, ValueError, OverflowError):
        return None


def _category(data: dict[str, Any]) -> str | None:
    names = [(data.get(k) or {}).get("typeName") for k in _CATEGORY_KEYS]
    names = [n for n in names if n]
    return " > ".join(names) or None


def product_to_row(data: dict[str, Any], root: Path, split: str = "all") -> dict[str, Any]:
    """One product API ``data`` object -> a canonical row (images looked up under ``root/images``)."""
    title = data.get("productDisplayName") or ""
    descriptors = data.get("productDescriptors") or {}
    description = html_to_text((descriptors.get("description") or {}).get("value"))
    specs = [{"key": str(k), "value": str(v)} for k, v in (data.get("articleAttributes") or {}).items()]
    specs += [{"key": name, "value": str(data[k])} for k, name in _SPEC_KEYS.items() if _is_value(data.get(k))]
    labeled = [(str(k), str(v)) for k, v in (data.get("articleAttributes") or {}).items() if _is_value(v)]
    labeled += [(_SPEC_KEYS[k], str(data[k])) for k in _LABEL_KEYS if _is_value(data.get(k))]
    labels = [
        aligned_label(a, v, title=title, description=description, order=("title", "description")) for a, v in labeled
    ]
    image = root / "images" / f"{data['id']}.jpg"
    extra: dict[str, Any] = {"split": split, "dataset": DATASET}
    extra.update({k: v for k, v in data.items() if k not in _MAPPED})
    other = {k: html_to_text((d or {}).get("value")) for k, d in descriptors.items() if k != "description"}
    if other:
        extra["productDescriptors"] = other
    return empty_row(
        product_id=f"{DATASET}:{data['id']}",
        title=title,
        description=description,
        category=_category(data),
        specs=specs,
        images=[str(image)] if image.is_file() else [],
        labels=labels,
        source=DATASET,
        updated_at=_iso(data.get("catalogAddDate")),
        extra=dumps_extra(extra),
    )


def iter_rows(path: PathLike, split: str | None = None, stats: ImportStats | None = None) -> Iterator[dict]:
    """Canonical rows of the Myntra folder, in ``styles.csv`` order.

    Args:
        path: the dataset folder, e.g. ``../shared/data/myntra-100``.
        split: "all" or None (the dataset has no split).
        stats: filled while streaming, when given.
    """
    (s,) = check_split(DATASET, split, SPLITS)
    root = require_dir(DATASET, path, "styles.csv", "styles")
    for rec in iter_csv(root / "styles.csv"):
        with (root / "styles" / f"{rec['id']}.json").open(encoding="utf-8") as fh:
            data = json.load(fh)["data"]
        row = product_to_row(data, root, s)
        if stats is not None:
            stats.add_row(row, s)
        yield row


IMPORTER = Importer(
    name=DATASET,
    splits=SPLITS,
    iter_rows=iter_rows,
    description="100 Myntra fashion products: title, HTML description, spec table, brand, colours, photo",
)
