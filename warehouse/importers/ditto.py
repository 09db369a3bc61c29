"""Product-matching benchmarks in Ditto's serialized pair format (Li et al., VLDB 2021, "Deep Entity Matching
with Pre-Trained Language Models"): each line ``<left record> \\t <right record> \\t <0|1>``, a record being
``COL <attr> VAL <value> COL <attr> VAL <value> ...``.

Benchmarks are the folders holding ``*.txt*`` pair files (``Abt-Buy``, ``wdc/computers``, ...); a file's split is
its name with the extension folded in: ``train.txt`` -> "train", ``train.txt.small`` -> "train_small",
``train.txt.balance`` -> "train_balance".

Records become canonical rows: title = the ``title`` or ``name`` attribute (else the first non-empty value),
description = ``description``, every other non-empty attribute a spec; the serialized record is kept in
``extra``. A record's ``product_id`` is ``ditto:<benchmark>:<hash of the whitespace-stripped serialized
record>``, so a record seen in many pairs and files is one product; within one ``iter_rows`` call it is yielded
once, under the first split it appears in. ``iter_pairs`` yields every line as a ``PAIRS`` row (duplicate lines
included, so counts match the published files: Abt-Buy test has 5 repeated pairs, one with both labels, so a merge
on ``PAIRS_KEY`` keeps fewer rows than the file has).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from warehouse.schema import empty_row

from ._common import Importer, ImportStats, PathLike, check_split, dumps_extra, require_dir

DATASET = "ditto"
# every split name a file may carry, in the order split=None reads them
SPLITS: tuple[str, ...] = (
    "train",
    "train_small",
    "train_medium",
    "train_balance",
    "valid",
    "valid_small",
    "valid_medium",
    "test",
)
_TITLE_ATTRS = ("title", "name")
_COL = re.compile(r"COL (\S+) VAL ?")


def split_of(file: Path) -> str:
    """``train.txt.small`` -> "train_small"; ``test.txt`` -> "test"."""
    stem, _, variant = file.name.partition(".txt")
    return f"{stem}_{variant.lstrip('.')}" if variant else stem


def benchmarks(root: Path) -> list[str]:
    """Benchmark names (folders relative to ``root`` holding pair files), sorted."""
    folders = {
        p.parent for p in root.rglob("*.txt*") if p.is_file() and p.name.split(".txt")[0] in ("train", "valid", "test")
    }
    return sorted(p.relative_to(root).as_posix() for p in folders)


def _pair_files(root: Path, benchmark: str, splits: tuple[str, ...]) -> list[tuple[str, Path]]:
    files = {split_of(p): p for p in (root / benchmark).glob("*.txt*") if p.is_file()}
    return [(s, files[s]) for s in splits if s in files]


def parse_record(serialized: str) -> list[tuple[str, str]]:
    """``COL a VAL x COL b VAL y`` -> [("a", "x"), ("b", "y")], values stripped."""
    matches = list(_COL.finditer(serialized))
    out = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(serialized)
        out.append((m.group(1), serialized[m.end() : end].strip()))
    return out


def record_id(benchmark: str, serialized: str) -> str:
    """Stable product id of a serialized record within a benchmark."""
    digest = hashlib.blake2b(serialized.strip().encode("utf-8"), digest_size=10).hexdigest()
    return f"{DATASET}:{benchmark}:{digest}"


def record_to_row(benchmark: str, serialized: str, split: str) -> dict[str, Any]:
    """One serialized record -> a canonical row (no labels: the benchmark labels pairs, not attributes)."""
    attrs = parse_record(serialized)
    title = next((v for k, v in attrs if k.lower() in _TITLE_ATTRS and v), None)
    title = title or next((v for _, v in attrs if v), "")
    description = next((v for k, v in attrs if k.lower() == "description" and v), None)
    specs = [{"key": k, "value": v} for k, v in attrs if v and k.lower() not in (*_TITLE_ATTRS, "description")]
    extra = {"split": split, "dataset": DATASET, "benchmark": benchmark, "record": serialized.strip()}
    return empty_row(
        product_id=record_id(benchmark, serialized),
        title=title,
        description=description,
        specs=specs,
        source=DATASET,
        extra=dumps_extra(extra),
    )


def _iter_lines(file: Path) -> Iterator[tuple[int, list[str]]]:
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise ValueError(
                    f"{file}:{lineno + 1}: expected 3 tab-separated fields (left, right, label), got {len(parts)}"
                )
            yield lineno, parts


def _selected(root: Path, benchmark: str | None) -> list[str]:
    found = benchmarks(root)
    if benchmark is None:
        return found
    if benchmark not in found:
        raise ValueError(f"Unknown ditto benchmark {benchmark!r}; found {found} under {root}")
    return [benchmark]


def iter_rows(
    path: PathLike, split: str | None = None, stats: ImportStats | None = None, *, benchmark: str | None = None
) -> Iterator[dict]:
    """Distinct records of the Ditto folder as canonical rows, benchmark by benchmark.

    Args:
        path: the dataset folder, e.g. ``../shared/data/ditto``.
        split: one of ``SPLITS``; None for all files.
        stats: filled while streaming, when given (per_split counts a record under its first split).
        benchmark: e.g. "Abt-Buy" or "wdc/computers"; None for all.
    """
    splits = check_split(DATASET, split, SPLITS)
    root = require_dir(DATASET, path)
    for bench in _selected(root, benchmark):
        seen: set[str] = set()
        for s, file in _pair_files(root, bench, splits):
            for _, (left, right, _label) in _iter_lines(file):
                for serialized in (left, right):
                    pid = record_id(bench, serialized)
                    if pid in seen:
                        continue
                    seen.add(pid)
                    row = record_to_row(bench, serialized, s)
                    if stats is not None:
                        stats.add_row(row, s)
                    yield row


def iter_pairs(path: PathLike, split: str | None = None, *, benchmark: str | None = None) -> Iterator[dict]:
    """Labelled pairs as ``PAIRS`` rows: benchmark ("ditto/<benchmark>"), split, left_id, right_id, label.

    Args:
        path: the dataset folder, e.g. ``../shared/data/ditto``.
        split: one of ``SPLITS``; None for all files.
        benchmark: e.g. "Abt-Buy" or "wdc/computers"; None for all.
    """
    splits = check_split(DATASET, split, SPLITS)
    root = require_dir(DATASET, path)
    for bench in _selected(root, benchmark):
        for s, file in _pair_files(root, bench, splits):
            for lineno, (left, right, label) in _iter_lines(file):
                if label.strip() not in ("0", "1"):
                    raise ValueError(f"{file}:{lineno + 1}: pair label {label!r} is not 0 or 1")
                yield {
                    "benchmark": f"{DATASET}/{bench}",
                    "split": s,
                    "line": lineno + 1,
                    "left_id": record_id(bench, left),
                    "right_id": record_id(bench, right),
                    "label": int(label),
                }


IMPORTER = Importer(
    name=DATASET,
    splits=SPLITS,
    iter_rows=iter_rows,
    iter_pairs=iter_pairs,
    description="Ditto matching benchmarks (Abt-Buy, WDC LSPC): records as products, labelled pairs",
)
