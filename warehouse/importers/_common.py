"""What every public-dataset importer shares: the importer record, import stats, label alignment, file streaming.

Label alignment (one helper for every importer whose source gives values without spans): a value is looked up
exact first, then case-insensitively; within each pass a token-bounded occurrence (not inside a longer word) is
preferred over a bare substring, and fields are tried in the order given. Offsets are character offsets into
that field's text, end exclusive. For ``field == "specs"`` they index the linearized spec text of
``linearize_specs`` (``"key: value"`` entries joined by ``" | "``) and only ever cover a spec value.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Protocol

# one linearization for label offsets here and for the model text in jave/codec.py
from features.text import SPEC_KV_SEP, SPEC_SEP, linearize_specs  # noqa: F401

NA_VALUE = "n/a"  # the attribute applies to the product but has no value (ExtractGPT / WDC-PAVE convention)

TEXT_FIELDS: tuple[str, ...] = ("title", "description", "specs")

PathLike = str | Path


@dataclass
class ImportStats:
    """Counters an importer fills while it streams; pass one in to learn what a run produced."""

    rows: int = 0
    labels: int = 0
    aligned: int = 0  # labels with a span (given by the source or found by string match)
    unaligned: int = 0  # values not found in the text: kept as implicit labels (field/begin/end None)
    na_values: int = 0  # "n/a" labels: the attribute is known to have no value
    per_split: dict[str, int] = field(default_factory=dict)  # rows per split

    def add_row(self, row: Mapping[str, Any], split: str) -> None:
        self.rows += 1
        self.per_split[split] = self.per_split.get(split, 0) + 1
        for label in row["labels"]:
            self.labels += 1
            if label["field"] is not None:
                self.aligned += 1
            elif label["value"] == NA_VALUE:
                self.na_values += 1
            else:
                self.unaligned += 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RowIterator(Protocol):
    def __call__(
        self, path: PathLike, split: str | None = None, stats: ImportStats | None = None
    ) -> Iterator[dict]: ...


@dataclass(frozen=True)
class Importer:
    """One public dataset: its name (also each row's ``source``), its splits, and how to stream it."""

    name: str
    splits: tuple[str, ...]  # what ``split=None`` yields, in this order
    iter_rows: RowIterator
    description: str = ""
    extra_splits: tuple[str, ...] = ()  # views that may be asked for by name but are not part of ``split=None``
    iter_pairs: Callable[..., Iterator[dict]] | None = None  # labelled match pairs (``PAIRS`` rows), if any


def check_split(dataset: str, split: str | None, valid: Sequence[str]) -> tuple[str, ...]:
    """The splits to read: all of ``valid`` for None, else ``(split,)``; an unknown split is a ValueError."""
    if split is None:
        return tuple(valid)
    if split not in valid:
        raise ValueError(
            f"Unknown split {split!r} for dataset {dataset!r}; valid splits are {list(valid)} (or None for all)"
        )
    return (split,)


def require_dir(dataset: str, path: PathLike, *expected: str) -> Path:
    """``path`` as a resolved Path, checked to hold the files the importer reads."""
    root = Path(path).expanduser().resolve()
    missing = [e for e in expected if not (root / e).exists()]
    if not root.is_dir() or missing:
        raise FileNotFoundError(
            f"{root} is not a {dataset} dataset folder (missing: {missing or [str(root)]}); "
            f"pass the folder that holds {list(expected)}"
        )
    return root


def dumps_extra(extra: Mapping[str, Any]) -> str:
    """The ``extra`` column: a JSON object, key order kept, non-ASCII kept readable."""
    return json.dumps(extra, ensure_ascii=False, separators=(",", ":"), default=str)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(0-based line number, object) for each non-blank line, streamed."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh):
            if line.strip():
                yield lineno, json.loads(line)


def iter_csv(path: Path, delimiter: str = ",") -> Iterator[dict[str, str]]:
    """Rows of a delimited file with a header (pandas-style quoting), streamed."""
    with path.open(encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh, delimiter=delimiter)


def iter_tsv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a tab-separated file with a header, streamed."""
    return iter_csv(path, delimiter="\t")


class _TextExtractor(HTMLParser):
    """HTML -> text: block tags and <br> become line breaks, script/style dropped, entities decoded."""

    BLOCK = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6"})
    SKIP = frozenset({"script", "style"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str | None) -> str | None:
    """Readable text of an HTML fragment (stdlib ``html.parser``): one line per block, spaces collapsed."""
    if not html:
        return None
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    text = "\n".join(line for line in lines if line)
    return text or None


# --------------------------------------------------------------------------------------------------- labels


def make_label(
    attribute: str, value: str, field: str | None = None, begin: int | None = None, end: int | None = None
) -> dict[str, Any]:
    """A ``LABEL`` dict; without a field it is implicit (or "n/a" when ``value`` is ``NA_VALUE``)."""
    if field is not None and field not in TEXT_FIELDS:
        raise ValueError(f"Unknown label field {field!r}; expected one of {TEXT_FIELDS} or None")
    return {"attribute": attribute, "value": value, "field": field, "begin": begin, "end": end}


def _spec_value_regions(specs: Sequence[Mapping[str, str]]) -> Iterator[tuple[int, str]]:
    """(offset in the linearized text, value) of each spec value."""
    offset = 0
    for i, s in enumerate(specs):
        if i:
            offset += len(SPEC_SEP)
        offset += len(s["key"]) + len(SPEC_KV_SEP)
        yield offset, s["value"]
        offset += len(s["value"])


def _find(value: str, text: str, ignore_case: bool, bounded: bool) -> tuple[int, int] | None:
    if not ignore_case and not bounded:
        i = text.find(value)
        return (i, i + len(value)) if i >= 0 else None
    pattern = re.escape(value)
    if bounded:
        pattern = rf"(?<!\w){pattern}(?!\w)"
    m = re.search(pattern, text, re.IGNORECASE if ignore_case else 0)
    return m.span() if m else None


def align_value(
    value: str,
    title: str | None = None,
    description: str | None = None,
    specs: Sequence[Mapping[str, str]] | None = None,
    order: Sequence[str] = TEXT_FIELDS,
) -> tuple[str, int, int] | None:
    """Where ``value`` occurs: (field, begin, end), or None when it is not in the text (an implicit value).

    Args:
        value: the attribute value as the source gives it.
        title, description, specs: the product's text fields; None or empty ones are skipped.
        order: the fields to try, in order of preference (e.g. the field the source says the value came from).
    """
    if not value or not value.strip():
        return None
    regions: dict[str, list[tuple[int, str]]] = {}
    for name in order:
        if name == "title" and title:
            regions[name] = [(0, title)]
        elif name == "description" and description:
            regions[name] = [(0, description)]
        elif name == "specs" and specs:
            regions[name] = list(_spec_value_regions(specs))
    for ignore_case in (False, True):
        for bounded in (True, False):
            for name, parts in regions.items():
                for offset, text in parts:
                    span = _find(value, text, ignore_case, bounded)
                    if span is not None:
                        return name, offset + span[0], offset + span[1]
    return None


def aligned_label(
    attribute: str,
    value: str,
    title: str | None = None,
    description: str | None = None,
    specs: Sequence[Mapping[str, str]] | None = None,
    order: Sequence[str] = TEXT_FIELDS,
) -> dict[str, Any]:
    """A label for ``value`` with its span found by ``align_value``; implicit when not found; "n/a" kept as is."""
    if value == NA_VALUE:
        return make_label(attribute, value)
    where = align_value(value, title, description, specs, order)
    return make_label(attribute, value, *where) if where else make_label(attribute, value)


def field_text(row: Mapping[str, Any], field: str) -> str:
    """The text a label's offsets index for ``field`` (the linearized spec table for "specs")."""
    if field == "specs":
        return linearize_specs(row["specs"])
    return row[field] or ""
