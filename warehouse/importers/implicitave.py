"""ImplicitAVE (Zou et al., ACL Findings 2024, "ImplicitAVE: An Open-Source Dataset and Multimodal LLMs Benchmark
for Implicit Attribute Value Extraction"): Amazon titles whose attribute value is mostly not written in them.

``training/texts/<domain>/{train,val,test}.tsv`` (``train_and_val.tsv`` is their union and is not read) hold
54,881 / 13,723 / 1,610 products, one (attribute, value) each. The 1,610 test products are the published
evaluation set; ``evaluation/<domain>_annotated_final.tsv`` repeats 784 of them (same rows) with their JPEG in
``evaluation/images/``. So ``split=None`` yields train, val, test, the test rows carrying the image path when
the evaluation folder has it; ``split="evaluation"`` yields just those 784 rows, identical to their test rows
(same ``product_id``, same content, ``extra.split == "test"``).

The ``texts`` column is ``"[Title] <title>"``. A value found in the title is aligned; otherwise it is an
implicit label (field/begin/end None), the common case here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from warehouse.schema import empty_row

from ._common import Importer, ImportStats, PathLike, aligned_label, check_split, dumps_extra, iter_tsv, require_dir

DATASET = "implicitave"
SPLITS: tuple[str, ...] = ("train", "val", "test")
EVALUATION = "evaluation"
TITLE_PREFIX = "[Title] "
_MAPPED = ("id", "category", "texts", "attribute_names", "attribute_values")


def _domains(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "training" / "texts").iterdir() if p.is_dir())


def _evaluation_files(root: Path) -> list[tuple[str, Path]]:
    """(domain, tsv) of the evaluation folder, domain taken from ``<domain>_annotated_final.tsv``."""
    suffix = "_annotated_final.tsv"
    return [(p.name[: -len(suffix)], p) for p in sorted((root / EVALUATION).glob(f"*{suffix}"))]


def _image_path(root: Path, name: str) -> Path | None:
    image = root / EVALUATION / "images" / name
    return image if name and image.is_file() else None


def _row(root: Path, rec: dict[str, str], split: str, domain: str, evaluation: bool) -> dict[str, Any]:
    texts = rec["texts"]
    title = texts[len(TITLE_PREFIX) :] if texts.startswith(TITLE_PREFIX) else texts
    image = _image_path(root, rec.get("images") or "") if evaluation else None
    extra: dict[str, Any] = {"split": split, "dataset": DATASET, "domain": domain, "evaluation": evaluation}
    extra.update({k: v for k, v in rec.items() if k not in _MAPPED})  # "images": the file name, with or without a file
    return empty_row(
        product_id=f"{DATASET}:{rec['id']}",
        title=title,
        category=rec.get("category") or None,
        images=[str(image)] if image else [],
        labels=[aligned_label(rec["attribute_names"], rec["attribute_values"], title=title)],
        source=DATASET,
        extra=dumps_extra(extra),
    )


def iter_rows(path: PathLike, split: str | None = None, stats: ImportStats | None = None) -> Iterator[dict]:
    """Canonical rows of the ImplicitAVE folder, domain by domain (sorted).

    Args:
        path: the dataset folder, e.g. ``../shared/data/implicitave``.
        split: "train", "val", "test" or "evaluation" (the 784 test rows with an image); None for train+val+test.
        stats: filled while streaming, when given.
    """
    splits = check_split(DATASET, split, SPLITS + (EVALUATION,))
    root = require_dir(DATASET, path, "training/texts")
    if splits == (EVALUATION,):
        require_dir(DATASET, root, EVALUATION)
        for domain, file in _evaluation_files(root):
            for rec in iter_tsv(file):
                row = _row(root, rec, "test", domain, evaluation=True)
                if stats is not None:
                    stats.add_row(row, EVALUATION)
                yield row
        return
    evaluated: set[str] = set()
    if "test" in splits and (root / EVALUATION).is_dir():
        evaluated = {rec["id"] for _, file in _evaluation_files(root) for rec in iter_tsv(file)}
    for s in splits:
        for domain in _domains(root):
            file = root / "training" / "texts" / domain / f"{s}.tsv"
            if not file.exists():
                continue
            for rec in iter_tsv(file):
                row = _row(root, rec, s, domain, evaluation=rec["id"] in evaluated)
                if stats is not None:
                    stats.add_row(row, s)
                yield row


def value_options(path: PathLike) -> dict[str, dict[str, list[str]]]:
    """The closed value sets: ``{options file stem minus "options_": {attribute: [value, ...]}}``."""
    root = require_dir(DATASET, path, EVALUATION)
    out = {}
    for file in sorted((root / EVALUATION).glob("options_*.json")):
        with file.open(encoding="utf-8") as fh:
            out[file.stem[len("options_") :]] = json.load(fh)
    return out


IMPORTER = Importer(
    name=DATASET,
    splits=SPLITS,
    extra_splits=(EVALUATION,),
    iter_rows=iter_rows,
    description="ImplicitAVE Amazon titles with (mostly implicit) attribute values; 784 evaluation images",
)
