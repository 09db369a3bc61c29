"""Catalog readers and validation: every bad record gets the right reason, good neighbours survive."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from warehouse.quarantine import Reason
from warehouse.sources import detect_format, read_batches
from warehouse.validate import Invalid, Limits, normalize_specs, resolve_mapping, to_canonical


def _records(path, **kw):
    return [r for batch in read_batches(path, **kw) for r in batch]


def test_jsonl_streams_in_batches_and_flags_bad_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [json.dumps({"id": f"p{i}", "name": f"T {i}"}).encode() for i in range(7)]
    lines.insert(3, b'{"id": "broken", "name": ')
    lines.insert(5, '{"id": "u", "name": "caf\u00e9"}'.encode().replace("é".encode(), b"\xff\xfe"))
    lines.insert(6, b"[1, 2]")
    p.write_bytes(b"\n".join(lines) + b"\n")
    batches = list(read_batches(p, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    recs = [r for b in batches for r in b]
    errors = {r.position: r.error[0] for r in recs if r.error}
    assert errors == {"line:4": Reason.MALFORMED_JSON, "line:6": Reason.INVALID_UTF8, "line:7": Reason.MALFORMED_JSON}
    assert sum(r.error is None for r in recs) == 7


def test_csv_wrong_field_count_and_invalid_utf8(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes(b'sku,name,attributes\nA,Shirt,"{""Colour"": ""Red""}"\nB,Only two\nC,Caf\xe9,{}\nD,Mug,\nE,a,b,c\n')
    recs = _records(p)
    assert [(r.position, r.error[0] if r.error else None) for r in recs] == [
        ("row:1", None),
        ("row:2", Reason.MISSING_COLUMNS),
        ("row:3", Reason.INVALID_UTF8),
        ("row:4", None),
        ("row:5", Reason.MALFORMED_CSV),
    ]
    row = to_canonical(recs[0].value, resolve_mapping(None, None), position="row:1", source="s")
    assert row["specs"] == [{"key": "Colour", "value": "Red"}]


def test_parquet_batches(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"product_id": [str(i) for i in range(25)], "title": ["t"] * 25}), p, row_group_size=10)
    recs = _records(p, batch_size=10)
    assert len(recs) == 25 and recs[-1].position == "row:25"


def test_format_detection_errors_name_the_fix(tmp_path):
    assert detect_format("x/catalog.jsonl.gz") == "jsonl"
    with pytest.raises(ValueError, match="--format"):
        detect_format("catalog.txt")
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        detect_format("a.csv", "xml")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"name": "no id"}, Reason.MISSING_PRODUCT_ID),
        ({"id": "  ", "name": "blank id"}, Reason.MISSING_PRODUCT_ID),
        ({"id": "1"}, Reason.MISSING_TITLE),
        ({"id": "1", "name": "   "}, Reason.MISSING_TITLE),
        ({"id": "1", "name": 42}, Reason.WRONG_TYPE),
        ({"id": "1", "name": ["a"]}, Reason.WRONG_TYPE),
        ({"id": {"x": 1}, "name": "t"}, Reason.WRONG_TYPE),
        ({"id": "1", "name": "x" * 1_000_001}, Reason.FIELD_TOO_LONG),
        ({"id": "1", "name": "t", "attributes": "just a string"}, Reason.BAD_SPECS),
        ({"id": "1", "name": "t", "attributes": 7}, Reason.BAD_SPECS),
        ({"id": "1", "name": "t", "attributes": [1, 2]}, Reason.BAD_SPECS),
        ({"id": "1", "name": "t", "image_urls": [1]}, Reason.WRONG_TYPE),
    ],
)
def test_invalid_records(record, reason):
    with pytest.raises(Invalid) as e:
        to_canonical(record, resolve_mapping(None, None), position="line:9", source="s")
    assert e.value.reason == reason
    assert "line:9" in e.value.message


def test_specs_forms_and_extra_columns():
    assert normalize_specs({"A": 1, "B": None}) == [{"key": "A", "value": "1"}, {"key": "B", "value": ""}]
    assert normalize_specs([{"name": "A", "value": "x"}, ["B", "y"]]) == [
        {"key": "A", "value": "x"},
        {"key": "B", "value": "y"},
    ]
    row = to_canonical(
        {"sku": 12, "name": "Mug", "bin": "A-3", "score": 0.5},
        resolve_mapping(None, None),
        position="line:1",
        source="s",
    )
    assert row["product_id"] == "12"
    assert json.loads(row["extra"]) == {"bin": "A-3", "score": 0.5}
    with pytest.raises(Invalid, match="limit"):
        normalize_specs({"k": "v" * 50}, Limits(spec_value=10))


def test_user_mapping_overrides_and_is_checked():
    m = resolve_mapping(None, {"headline": "title"})
    row = to_canonical({"id": "1", "headline": "H", "name": "N"}, m, position="line:1", source="s")
    assert row["title"] in ("H", "N") and json.loads(row["extra"])  # the other one is kept, not dropped
    with pytest.raises(ValueError, match="not canonical fields"):
        resolve_mapping(None, {"x": "colour"})
