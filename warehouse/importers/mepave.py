"""MEPAVE, the public sample published with JAVE (Zhu et al., EMNLP 2020, "Multimodal Joint Attribute Prediction
and Value Extraction for E-commerce Product"): Chinese JD fashion sentences, character level.

``data/jdai.jave.fashion.{train,valid,test}.sample``: ``cid \\t sid \\t sentence \\t tagged sentence``, values
marked ``<attr>value</attr>`` in the tagged one. Each sentence is a row (``product_id`` = ``mepave:<sid>``,
title = the sentence; ``cid``, the document whose image the sentence shares, goes to ``extra``). Tags become
character spans into the clean sentence; ``tag_sentence`` inverts that exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from warehouse.schema import empty_row

from ._common import Importer, ImportStats, PathLike, check_split, dumps_extra, make_label, require_dir

DATASET = "mepave"
SPLITS: tuple[str, ...] = ("train", "valid", "test")
_TAG = re.compile(r"<([^<>/]+)>(.*?)</\1>", re.DOTALL)


def _file(split: str) -> str:
    return f"data/jdai.jave.fashion.{split}.sample"


def parse_tagged(tagged: str) -> tuple[str, list[dict[str, Any]]]:
    """``"a<颜色>红色</颜色>b"`` -> ("a红色b", [label(颜色, 红色, "title", 1, 3)])."""
    clean: list[str] = []
    labels = []
    pos = 0  # in ``tagged``
    length = 0  # of the clean text so far
    for m in _TAG.finditer(tagged):
        before = tagged[pos : m.start()]
        clean.append(before)
        length += len(before)
        attribute, value = m.group(1), m.group(2)
        labels.append(make_label(attribute, value, "title", length, length + len(value)))
        clean.append(value)
        length += len(value)
        pos = m.end()
    clean.append(tagged[pos:])
    return "".join(clean), labels


def tag_sentence(text: str, labels: Sequence[dict[str, Any]]) -> str:
    """Inverse of ``parse_tagged``: wrap each labelled span of ``text`` in ``<attr>...</attr>``."""
    out = []
    pos = 0
    for label in sorted((lb for lb in labels if lb["field"] == "title"), key=lambda lb: lb["begin"]):
        out.append(text[pos : label["begin"]])
        out.append(f"<{label['attribute']}>{text[label['begin'] : label['end']]}</{label['attribute']}>")
        pos = label["end"]
    out.append(text[pos:])
    return "".join(out)


def iter_rows(path: PathLike, split: str | None = None, stats: ImportStats | None = None) -> Iterator[dict]:
    """Canonical rows of the MEPAVE sample folder (50 / 20 / 20 sentences).

    Args:
        path: the dataset folder, e.g. ``../shared/data/mepave-sample``.
        split: "train", "valid" or "test"; None for all three.
        stats: filled while streaming, when given.
    """
    splits = check_split(DATASET, split, SPLITS)
    root = require_dir(DATASET, path, *(_file(s) for s in splits))
    for s in splits:
        file = root / _file(s)
        with file.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 4:
                    raise ValueError(
                        f"{file}:{lineno + 1}: expected cid, sid, sentence, tagged sentence; got {len(parts)} fields"
                    )
                cid, sid, sentence, tagged = parts[:4]
                clean, labels = parse_tagged(tagged)
                extra: dict[str, Any] = {"split": s, "dataset": DATASET, "cid": cid, "sid": sid}
                if clean != sentence:  # never in the published sample: title follows the tags, so spans stay exact
                    extra["sentence"] = sentence
                if len(parts) > 4:
                    extra["more_columns"] = parts[4:]
                row = empty_row(
                    product_id=f"{DATASET}:{sid}",
                    title=clean,
                    labels=labels,
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
    description="MEPAVE public sample (JAVE): Chinese fashion sentences with tagged attribute values",
)
