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


# A spread of shapes the vectorized mapping must get exactly right, or leave to to_canonical.
VARIED = [
    {
        "sku": "A1",
        "title": "Shirt",
        "description": 'Soft\ncotton "tee" \\ é 😀 \u2028',
        "category": "Tops",
        "specs": {"Colour": "Red", "Size": None, "N": 3, "F": 0.5, "B": True, "L": [1, "x"], "D": {"b": 1, "a": "é"}},
        "brand": "X",
        "rating": 4.5,
        "zz": None,
        "nested": {"b": [1, 2], "a": "é"},
        "big": 10**30,
        "f": 1e20,
    },
    {"id": "A2", "name": "Mug", "attributes": [{"key": "Capacity", "value": "300ml"}, ["Colour", "Blue"]]},
    {"product_id": " A3 ", "title": "padded id"},
    {"product_id": "A4", "title": "  "},
    {"product_id": "A5", "title": "x", "description": "", "category": "   "},
    {"product_id": "A6", "title": "x", "image_urls": ["a.jpg", " b.jpg", ""], "videos": "v1.mp4|v2.mp4"},
    {"product_id": "A7", "title": "x", "images": ["a.jpg", 'b "q".jpg'], "videos": []},
    {"product_id": 8, "title": "numeric id"},
    {"product_id": "A9", "title": "x", "specs": '{"a": "b"}'},
    {"product_id": "A10", "title": "x", "labels": [{"attribute": "Colour", "value": "Red"}]},
    {"product_id": "A11", "title": "x", "extra": {"k": 1}, "foo": "bar"},
    {"product_id": "A12", "title": "x\x01ctl\x1f", "description": "\x02\t", "updated_at": 20250101},
    {"sku": "A13", "id": "A13b", "name": "x", "title": "both", "brand": "\u2028ü\x00"},
    {"title": "no id"},
    {"product_id": "A14", "title": "x", "specs": {}, "images": None, "category": None, "description": None},
    {"product_id": "A15", "title": "x" * 1001},
    {"product_id": "A16", "title": "ok", "specs": {"k": "v" * 5001}},
    {"product_id": "A17", "title": "\u00a0ok\u00a0", "description": "\u3000"},
    {"product_id": "A18", "title": "ok", "source": "elsewhere"},
    {"product_id": "A19", "title": "ok", "specs": {"k": "v"}, "b": False, "n": -0.0, "u": "\ud7ff"},
    "not a dict",
]


def _varied(n: int = 300) -> list:
    import random

    rng = random.Random(1)
    out = list(VARIED)
    for i in range(n):
        r = {
            "sku": f"R{i}",
            "title": rng.choice(["T", "Ti\u00e9", "a\tb", " x", 'q"', "\\"]) + str(i),
            "description": rng.choice([None, "", "d", 'd"q"', "é\n", "  "]),
            "specs": rng.choice([None, {}, {"a": "b", "c": rng.choice(["d", None, 1, 2.5])}, [["k", "v"]]]),
            rng.choice(["brand", "vendor"]): rng.choice(["x", 1, None, 2.5, True, "\u00e9\n"]),
        }
        out.append(dict(reversed(list(r.items()))) if i % 7 == 0 else r)
    return out


def test_vectorized_mapping_and_hash_match_the_per_record_path():
    """canonical_batch + content_hashes must give exactly to_canonical's row and content_hash, or defer to it:
    a product hashed differently by the two paths would look changed on every other run."""
    from warehouse import schema
    from warehouse.validate import canonical_batch

    records = _varied()
    mapping = resolve_mapping(None, None)
    table, slow = canonical_batch(records, mapping, source="s")
    fast = table.column("_i").to_pylist()
    assert sorted(fast + slow) == list(range(len(records))), "every record is mapped exactly once"
    assert len(fast) > len(records) // 2, "the common shapes take the fast path"
    rows = table.drop_columns(["_i"]).to_pylist()
    hashes = schema.content_hashes(table).to_pylist()
    for i, row, h in zip(fast, rows, hashes, strict=True):
        expected = to_canonical(records[i], mapping, position="line:1", source="s")
        assert row == schema.to_canonical_table([expected]).to_pylist()[0], records[i]
        assert h == schema.content_hash(expected), records[i]


def test_content_hashes_of_stored_rows_match_content_hash():
    from warehouse import schema

    rows = [
        schema.empty_row(
            product_id="1",
            title='a "q" \\ \n\t\x01 é 😀',
            description=None,
            category="c",
            specs=[{"key": "K\x02", "value": ""}],
            images=["u1", 'u"2'],
            extra='{"a": 1}',
        ),
        schema.empty_row(
            product_id="2", title="t", labels=[{"attribute": "A", "value": "v", "field": "title", "begin": 0, "end": 1}]
        ),
        schema.empty_row(product_id="3", title="t3"),
    ]
    table = schema.to_canonical_table(rows)
    for t in (table, table.slice(1)):
        assert schema.content_hashes(t).to_pylist() == [schema.content_hash(r) for r in t.to_pylist()]
