"""Catalog file readers: JSONL, CSV and Parquet, streamed in batches of raw records.

A reader never loads a whole file: it yields ``list[Record]`` of at most ``batch_size`` records (or, for JSONL with
``parse=False``, ``Lines``: raw lines that validation parses itself, possibly in another process). A record that
cannot even be parsed (malformed JSON line, CSV row with the wrong number of fields, invalid UTF-8) is still
yielded, with ``error`` set, so validation turns it into a quarantine row instead of losing it.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import fsspec

from warehouse.quarantine import Reason

try:  # orjson is ~5x faster than json on small objects and ships with prefect
    import orjson

    _loads = orjson.loads
    _JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover
    import json

    _loads = json.loads
    _JSONError = (ValueError,)

FORMATS = ("jsonl", "csv", "parquet")
_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(slots=True)
class Record:
    """One raw input record: where it is (``line:17`` / ``row:4``), what was parsed, the raw text, or an error."""

    position: str
    value: Any
    raw: bytes | str | None = None
    error: tuple[Reason, str] | None = None


@dataclass(slots=True)
class Lines:
    """A batch of raw JSONL lines, unparsed: parsing is part of validation (``warehouse.ingest.prepare_batch``), so it
    can run in a worker process. Blank lines count towards the batch size here, and are skipped when parsed."""

    data: bytes  # whole lines, each ending in b"\n" but perhaps the last
    first_line: int  # 1-based number of the first line in the file

    def split(self) -> list[bytes]:
        """The lines, newlines stripped (a trailing "\r" is kept; the parser strips it)."""
        lines = self.data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        return lines

    def __len__(self) -> int:
        return self.data.count(b"\n") + (not self.data.endswith(b"\n"))


def detect_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    suffixes = Path(str(path)).suffixes
    for suffix in reversed(suffixes):
        if suffix.lower() in _EXT:
            return _EXT[suffix.lower()]
    raise ValueError(f"cannot tell the format of {str(path)!r} from its extension; pass --format {'|'.join(FORMATS)}")


def read_batches(
    path: str | os.PathLike,
    fmt: str | None = None,
    batch_size: int = 10_000,
    storage_options: dict[str, Any] | None = None,
    parse: bool = True,
) -> Iterator[list[Record]] | Iterator[Lines]:
    """Stream ``path`` (local or any fsspec URI) as batches of records.

    Args:
        parse: when False, JSONL comes as ``Lines`` of at most ``batch_size`` lines, parsed later by
            ``warehouse.ingest.prepare_batch`` (the fast path); other formats always come as records.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fmt = detect_format(path, fmt)
    reader = {"jsonl": _jsonl if parse else _jsonl_lines, "csv": _csv, "parquet": _parquet}[fmt]
    with fsspec.open(str(path), "rb", **(storage_options or {})) as f:
        yield from reader(f, batch_size)


def _jsonl(f: io.BufferedIOBase, batch_size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for lineno, line in enumerate(f, start=1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        batch.append(parse_line(f"line:{lineno}", line))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def parse_line(position: str, line: bytes) -> Record:
    """One JSONL line (newline stripped) -> its record; ``error`` set when it is not one valid JSON object."""
    try:
        value = _loads(line)
    except _JSONError as e:
        return Record(position, None, line, line_error(position, line, e))
    if isinstance(value, dict):
        return Record(position, value, line)
    msg = f"{position}: expected a JSON object per line, got {type(value).__name__}; wrap it in {{...}}"
    return Record(position, None, line, (Reason.MALFORMED_JSON, msg))


def line_error(position: str, line: bytes, e: Exception) -> tuple[Reason, str]:
    """Why a JSONL line did not parse: invalid UTF-8, or malformed JSON (``e``, the parser's error)."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as ue:
        return Reason.INVALID_UTF8, f"{position}: invalid UTF-8 at byte {ue.start}; re-export the file as UTF-8"
    return Reason.MALFORMED_JSON, f"{position}: not a JSON object ({e}); fix or remove the line"


def _jsonl_lines(f: io.BufferedIOBase, batch_size: int) -> Iterator[Lines]:
    first = 1
    while chunk := list(islice(f, batch_size)):
        yield Lines(b"".join(chunk), first)
        first += len(chunk)


def _csv(f: io.BufferedIOBase, batch_size: int) -> Iterator[list[Record]]:
    # surrogateescape keeps invalid bytes as lone surrogates so one bad row does not stop the stream.
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip().lstrip("\ufeff") for h in header]
    batch: list[Record] = []
    for rowno, fields in enumerate(reader, start=1):
        if not fields:
            continue
        position = f"row:{rowno}"
        raw = ",".join(fields)
        if len(fields) < len(header):
            missing = ", ".join(header[len(fields) :])
            msg = f"{position}: {len(fields)} of {len(header)} columns, missing {missing}; fill them (empty is fine)"
            batch.append(Record(position, None, raw, (Reason.MISSING_COLUMNS, msg)))
        elif len(fields) > len(header):
            msg = (
                f"{position}: {len(fields)} fields but the header has {len(header)} ({', '.join(header)}); "
                "quote fields that contain commas"
            )
            batch.append(Record(position, None, raw, (Reason.MALFORMED_CSV, msg)))
        elif any(_has_surrogate(v) for v in fields):
            raw_bytes = raw.encode("utf-8", errors="surrogateescape")
            msg = f"{position}: invalid UTF-8 bytes; re-export the file as UTF-8"
            batch.append(Record(position, None, raw_bytes, (Reason.INVALID_UTF8, msg)))
        else:
            batch.append(Record(position, dict(zip(header, fields, strict=True)), raw))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet(f: io.BufferedIOBase, batch_size: int) -> Iterator[list[Record]]:
    import pyarrow.parquet as pq

    offset = 0
    for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
        rows = rb.to_pylist()
        yield [Record(f"row:{offset + i + 1}", r) for i, r in enumerate(rows)]
        offset += len(rows)
