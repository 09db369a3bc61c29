"""Delta tables: keyed merges are idempotent, unchanged rows are not rewritten, time travel, SQL."""

from __future__ import annotations

from datetime import UTC, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from warehouse import schema
from warehouse.ingest import RunState, classify, products_table, validate_batch, write_batch
from warehouse.quarantine import Reason
from warehouse.sources import Record
from warehouse.tables import Warehouse
from warehouse.validate import resolve_mapping

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _rows(n: int, title: str = "Blue Cotton Shirt") -> list[dict]:
    rows = []
    for i in range(n):
        row = schema.empty_row(product_id=f"p{i}", title=f"{title} {i}", specs=[{"key": "Colour", "value": "Blue"}])
        row["content_hash"] = schema.content_hash(row)
        rows.append(row)
    return rows


def _ingest(wh: Warehouse, records: list[Record], run_id: str = "r1") -> tuple[list, list, list, list]:
    state = RunState.load(wh)
    rows, quarantine = validate_batch(records, state, source="t", mapping=resolve_mapping(None, None), run_id=run_id)
    new, changed, unchanged = classify(rows, state)
    write_batch(wh, new=new, changed=changed, media=[], quarantine=quarantine, run_id=run_id, now=NOW)
    return new, changed, unchanged, quarantine


def test_content_hash_is_stable_and_sensitive():
    a = schema.empty_row(product_id="1", title="x", specs=[{"key": "k", "value": "v"}])
    b = dict(a, product_id="2", source="other")  # id and source are not content
    assert schema.content_hash(a) == schema.content_hash(b)
    assert schema.content_hash(a) != schema.content_hash(dict(a, title="y"))
    with pytest.raises(ValueError, match="Unknown canonical field"):
        schema.empty_row(colour="red")


def test_merge_idempotent_and_unchanged_not_rewritten(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    records = [Record(f"line:{i}", {"id": f"p{i}", "name": f"Shirt {i}"}) for i in range(5)]
    new, changed, unchanged, _ = _ingest(wh, records)
    assert (len(new), len(changed), len(unchanged)) == (5, 0, 0)
    v1 = wh.version("products")
    first = wh.read("products").sort_by("product_id")

    new, changed, unchanged, _ = _ingest(wh, records, run_id="r2")
    assert (len(new), len(changed), len(unchanged)) == (0, 0, 5)
    assert wh.version("products") == v1, "an unchanged re-ingest must not commit to products"
    assert wh.read("products").sort_by("product_id").equals(first)

    records[2] = Record("line:2", {"id": "p2", "name": "Shirt 2 (new colour)"})
    new, changed, unchanged, _ = _ingest(wh, records, run_id="r3")
    assert (len(new), len(changed), len(unchanged)) == (0, 1, 4)
    after = {r["product_id"]: r for r in wh.read("products").to_pylist()}
    assert len(after) == 5
    assert after["p2"]["title"] == "Shirt 2 (new colour)" and after["p2"]["ingest_run_id"] == "r3"
    assert after["p1"]["ingest_run_id"] == "r1", "unchanged rows keep their original write"
    # time travel: the version before the change still has the old title
    old = {r["product_id"]: r for r in wh.read("products", version=v1).to_pylist()}
    assert old["p2"]["title"] == "Shirt 2"


def test_quarantine_rerun_is_idempotent(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    records = [
        Record("line:1", {"id": "a", "name": "ok"}),
        Record("line:2", {"id": "b", "name": ""}),
        Record("line:3", None, b"{oops", (Reason.MALFORMED_JSON, "line:3: bad")),
    ]
    _ingest(wh, records)
    _ingest(wh, records, run_id="r2")
    q = wh.read("quarantine")
    assert sorted(q.column("reason").to_pylist()) == ["malformed_json", "missing_title"]
    assert wh.read("products").num_rows == 1


def test_duplicate_in_input_first_wins_across_batches(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    state = RunState.load(wh)
    mapping = resolve_mapping(None, None)
    rows1, q1 = validate_batch(
        [Record("line:1", {"id": "x", "name": "first"}), Record("line:2", {"id": "x", "name": "second"})],
        state,
        source="t",
        mapping=mapping,
        run_id="r",
    )
    rows2, q2 = validate_batch(
        [Record("line:3", {"id": "x", "name": "third"})], state, source="t", mapping=mapping, run_id="r"
    )
    assert [r["title"] for r in rows1] == ["first"] and rows2 == []
    assert [q["reason"] for q in q1 + q2] == ["duplicate_in_input"] * 2
    assert "line:1" in q2[0]["message"] and "third" in q2[0]["payload"]


def test_sql_over_tables(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    wh.append("products", products_table(_rows(3), "r", NOW))
    out = wh.sql("SELECT count(*) AS n, min(title) AS t FROM products")
    assert out.to_pylist() == [{"n": 3, "t": "Blue Cotton Shirt 0"}]
    assert wh.list_tables() == ["products"]


def test_read_missing_table_is_empty_with_schema(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    t = wh.read("products")
    assert t.num_rows == 0 and t.schema.names == schema.PRODUCTS.names
    with pytest.raises(FileNotFoundError, match="enrich ingest"):
        wh.table("products")


def test_products_schema_roundtrip(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    rows = _rows(2)
    rows[0]["labels"] = [{"attribute": "Colour", "value": "Blue", "field": "title", "begin": 0, "end": 4}]
    wh.append("products", products_table(rows, "r", NOW))
    back = wh.read("products").sort_by("product_id").to_pylist()
    assert back[0]["labels"][0]["value"] == "Blue" and back[0]["specs"] == [{"key": "Colour", "value": "Blue"}]
    assert pa.types.is_timestamp(wh.read("products").schema.field("first_seen").type)


def test_replace_where_is_one_atomic_replacement(tmp_path):
    from warehouse.schema import ATTRIBUTE_PREDICTIONS

    wh = Warehouse(tmp_path / "wh")

    def preds(pid: str, values: list[str]) -> pa.Table:
        rows = [
            {
                "prediction_id": f"{pid}|Colour|{v}",
                "product_id": pid,
                "attribute": "Colour",
                "value": v,
                "field": "title",
                "begin": 0,
                "end": len(v),
                "score": 0.9,
                "threshold": 0.5,
                "kind": "extracted",
                "content_hash": "h",
                "model_name": "jave",
                "model_version": "1",
                "mlflow_run_id": "r",
                "predicted_at": NOW,
            }
            for v in values
        ]
        return pa.Table.from_pylist(rows, schema=ATTRIBUTE_PREDICTIONS)

    wh.replace_where(
        "attribute_predictions",
        pa.concat_tables([preds("a", ["Red", "Blue"]), preds("b", ["Green"])]),
        "product_id",
        ["a", "b"],
    )
    v = wh.version("attribute_predictions")
    wh.replace_where("attribute_predictions", preds("a", ["Navy"]), "product_id", ["a"])
    assert wh.version("attribute_predictions") == v + 1
    got = sorted((r["product_id"], r["value"]) for r in wh.read("attribute_predictions").to_pylist())
    assert got == [("a", "Navy"), ("b", "Green")], "stale predictions of a re-predicted product are gone"

    assert wh.present("attribute_predictions", "product_id", ["a", "c", "b'"]) == {"a"}
    assert wh.present("review_queue", "product_id", ["a"]) == set(), "a table not written yet holds nothing"
    v = wh.version("attribute_predictions")
    wh.delete_where("attribute_predictions", "product_id", ["a", "zz"])
    assert wh.version("attribute_predictions") == v + 1
    assert [r["product_id"] for r in wh.read("attribute_predictions").to_pylist()] == ["b"]


def _messy_jsonl(path) -> None:
    import json
    import random

    rng = random.Random(3)
    lines = []
    for _ in range(300):
        r = {
            "sku": f"R{rng.randint(0, 180)}",
            "title": rng.choice(["T", "Ti\u00e9", "a\tb", " x", "", None]),
            "description": rng.choice([None, "", "d", 'd"q"', "é\n", "  "]),
            "specs": rng.choice([None, {}, {"a": "b", "c": rng.choice(["d", None, 1])}, [["k", "v"]], "bad"]),
            rng.choice(["brand", "vendor"]): rng.choice(["x", 1, None, 2.5]),
        }
        lines.append(json.dumps(r, ensure_ascii=False).encode())
    lines[5], lines[9], lines[11], lines[15] = b'{"sku": "broken', b"", b"[1,2]", b"   "
    lines[13] = b'{"sku": "u", "title": "caf\xff"}'
    lines[17] += b"\r"
    path.write_bytes(b"\n".join(lines) + b"\n")


def _quarantine_key(q: dict) -> tuple:
    return q["position"], q["reason"], q["message"], q["payload"], q["product_id"]


@pytest.mark.parametrize(("batch_size", "chunk"), [(1000, 10_000), (1000, 13), (64, 10_000), (7, 10_000)])
def test_fast_path_matches_validate_batch(tmp_path, monkeypatch, batch_size, chunk):
    """read_batches(parse=False) -> prepare_batches -> finish_batch gives validate_batch's rows and quarantine
    (reasons, messages, payloads), duplicates first-wins across batches whatever the batch boundaries."""
    from warehouse.ingest import finish_batch, prepare_batches
    from warehouse.sources import read_batches

    monkeypatch.setattr("warehouse.ingest.PREPARE_CHUNK", chunk)  # batches are mapped in chunks of this many
    path = tmp_path / "c.jsonl"
    _messy_jsonl(path)
    mapping = resolve_mapping(None, None)
    wh = Warehouse(tmp_path / "wh")
    state = RunState.load(wh)
    slow_rows, slow_q = [], []
    for batch in read_batches(path, batch_size=batch_size):
        rows, q = validate_batch(batch, state, source="t", mapping=mapping, run_id="r", now=NOW)
        slow_rows += rows
        slow_q += q
    state = RunState.load(wh)
    fast_rows, fast_q, read = [], [], 0
    batches = read_batches(path, batch_size=batch_size, parse=False)
    for batch, prepared in prepare_batches(batches, source="t", mapping=mapping, run_id="r", workers=0):
        done = finish_batch(prepared, state, batch=batch, source="t", run_id="r", now=NOW)
        assert done.changed.num_rows == 0 and done.unchanged == 0
        fast_rows += done.new.to_pylist()
        fast_q += done.quarantine
        read += done.read
    expected = schema.to_canonical_table(slow_rows).append_column(
        "content_hash", pa.array([r["content_hash"] for r in slow_rows])
    )
    assert sorted(fast_rows, key=lambda r: r["product_id"]) == sorted(
        expected.to_pylist(), key=lambda r: r["product_id"]
    )
    assert sorted(map(_quarantine_key, fast_q)) == sorted(map(_quarantine_key, slow_q))
    assert {q["reason"] for q in fast_q} >= {"duplicate_in_input", "malformed_json", "invalid_utf8", "missing_title"}
    assert read == len(slow_rows) + len(slow_q) == 298  # two blank lines


def test_fast_path_worker_processes_and_cross_path_rerun(tmp_path):
    """Rows written by the per-record path are unchanged for the fast path (same hashes), through worker
    processes; a changed row is changed; an unchanged rerun commits nothing."""
    from warehouse.ingest import finish_batch, prepare_batches
    from warehouse.sources import read_batches

    path = tmp_path / "c.jsonl"
    _messy_jsonl(path)
    mapping = resolve_mapping(None, None)
    wh = Warehouse(tmp_path / "wh")
    state = RunState.load(wh)
    for batch in read_batches(path, batch_size=50):
        rows, quarantine = validate_batch(batch, state, source="t", mapping=mapping, run_id="r1")
        new, changed, _ = classify(rows, state)
        write_batch(wh, new=new, changed=changed, media=[], quarantine=quarantine, run_id="r1", now=NOW)
    version = wh.version("products")
    stored = wh.read("products").num_rows

    def fast_run(run_id: str, workers: int) -> tuple[int, int, int]:
        state, counts = RunState.load(wh), [0, 0, 0]
        batches = read_batches(path, batch_size=50, parse=False)
        for batch, prepared in prepare_batches(batches, source="t", mapping=mapping, run_id=run_id, workers=workers):
            done = finish_batch(prepared, state, batch=batch, source="t", run_id=run_id, now=NOW)
            write_batch(
                wh, new=done.new, changed=done.changed, media=[], quarantine=done.quarantine, run_id=run_id, now=NOW
            )
            counts = [counts[0] + done.new.num_rows, counts[1] + done.changed.num_rows, counts[2] + done.unchanged]
        return tuple(counts)

    assert fast_run("r2", workers=1) == (0, 0, stored)
    assert wh.version("products") == version
    lines = path.read_bytes().split(b"\n")
    once = [line for line in lines if b'"title": "T"' in line and path.read_bytes().count(line[:14]) == 1]
    lines[lines.index(once[0])] = once[0].replace(b'"title": "T"', b'"title": "T v2"')
    path.write_bytes(b"\n".join(lines))
    assert fast_run("r3", workers=0) == (0, 1, stored - 1)


def test_maintain_compacts_and_deletes_replaced_files_but_keeps_the_data(tmp_path):
    from pathlib import Path

    wh = Warehouse(tmp_path / "wh")
    for i in range(3):  # three small appends, then a merge that rewrites one of their files
        wh.append("products", products_table([_rows(3)[i]], run_id=f"r{i}", now=NOW))
    wh.merge("products", products_table([_rows(3, title="Shirt v2")[1]], run_id="m", now=NOW))
    before = wh.read("products").sort_by("product_id").to_pylist()
    files = lambda: sorted(p.name for p in Path(wh.uri("products")).glob("*.parquet"))  # noqa: E731
    assert len(files()) == 4 and len(wh.table("products").file_uris()) == 3

    kept = wh.maintain(["products"])  # default retention (7 days): the replaced files are all younger, so kept
    assert kept["products"] == {"files_compacted": 3, "files_written": 1, "files_deleted": 0}
    assert len(wh.table("products").file_uris()) == 1 and len(files()) == 5

    n_before = len(files())
    done = wh.maintain(retention_hours=0)  # every table; the files no current version references go
    assert files() == sorted(Path(u).name for u in wh.table("products").file_uris()) and len(files()) == 1
    assert done["products"]["files_deleted"] == n_before - 1 == 4
    assert wh.read("products").sort_by("product_id").to_pylist() == before
    assert set(done) == {"products"}, "tables that do not exist are skipped"

    with pytest.raises(ValueError, match=r"retention_hours must be >= 0 \(got -1\)"):
        wh.maintain(retention_hours=-1)
    with pytest.raises(ValueError, match=r"unknown tables \['product'\]"):
        wh.maintain(["product"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_small_files_are_written_read_and_deleted_but_the_kept_ones(where, tmp_path, request):
    from warehouse.tables import Warehouse

    if where == "s3":
        client, endpoint = request.getfixturevalue("moto_s3")
        client.create_bucket(Bucket="enrich-wh")
        opts = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
        wh = Warehouse("s3://enrich-wh/warehouse", opts)
    else:
        wh = Warehouse(str(tmp_path / "wh"))
    assert wh.delete_files("_models/cells") == []  # no folder yet
    for name in ("a", "b", "c"):
        wh.write_bytes(f"_models/cells/{name}.bin", name.encode())
    assert wh.delete_files("_models/cells", keep=["_models/cells/b.bin"]) == [
        "_models/cells/a.bin",
        "_models/cells/c.bin",
    ]
    assert wh.read_bytes("_models/cells/b.bin") == b"b"
    assert wh.read_bytes("_models/cells/a.bin") is None and wh.read_bytes("_models/cells/c.bin") is None
    wh.delete_file("_models/cells/b.bin")
    assert wh.read_bytes("_models/cells/b.bin") is None
    wh.delete_file("_models/cells/b.bin")  # already gone: nothing to do


DEEP_PREDICATE = """
import sys
from datetime import UTC, datetime
import pyarrow as pa
from warehouse.tables import Warehouse
from warehouse.schema import ATTRIBUTE_PREDICTIONS
wh = Warehouse(sys.argv[1])
row = dict(prediction_id="p1|Colour|Red", product_id="p1", attribute="Colour", value="Red", field="title", begin=0,
           end=3, score=0.9, threshold=0.5, kind="extracted", content_hash="h", model_name="jave", model_version="1",
           mlflow_run_id="r", predicted_at=datetime.now(UTC))
table = pa.Table.from_pylist([row, dict(row, prediction_id="p2|Colour|Red", product_id="p2")], ATTRIBUTE_PREDICTIONS)
wh.append("attribute_predictions", table)
ids = ["p1"] + [f"id-{i:07d}" for i in range(60_000)]
navy = table.slice(0, 1).set_column(table.column_names.index("value"), "value", pa.array(["Navy"]))
wh.replace_where("attribute_predictions", navy, "product_id", ids)
wh.delete_where("attribute_predictions", "product_id", ids[1:] + ["p2"])
print(sorted((r["product_id"], r["value"]) for r in wh.read("attribute_predictions").to_pylist()), flush=True)
import os
os._exit(0)  # delta-rs's runtime can abort at interpreter teardown ("terminate called..."): not what is tested
"""


def test_replace_and_delete_with_a_predicate_of_60k_ids(tmp_path):
    """A commit group of 60,000 products: delta-rs parses the IN list recursively, and 30,000 ids overflowed the
    main thread's 8 MB stack (SIGSEGV, the whole run gone); it now runs on a thread with the stack it needs. In a
    subprocess, so a crash is this test's failure, not the session's."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", DEEP_PREDICATE, str(tmp_path / "wh")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip().splitlines()[-1] == "[('p1', 'Navy')]"


def test_delete_where_with_a_time_predicate_deletes_only_the_older_rows(tmp_path, monkeypatch):
    from datetime import timedelta

    import warehouse.tables as tables
    from warehouse.schema import ATTRIBUTE_PREDICTIONS
    from warehouse.tables import ts_literal

    wh = Warehouse(tmp_path / "wh")
    old, new = NOW, NOW + timedelta(microseconds=1)

    def row(pid: str, value: str, at: datetime) -> dict:
        return dict(prediction_id=f"{pid}|Colour|{value}", product_id=pid, attribute="Colour", value=value,
                    field="title", begin=0, end=3, score=0.9, threshold=0.5, kind="extracted", content_hash="h",
                    model_name="jave", model_version="1", mlflow_run_id="r", predicted_at=at)  # fmt: skip

    rows = [row("p1", "Red", old), row("p1", "Navy", new), row("p2", "Red", old), row("p3", "Red", old)]
    wh.append("attribute_predictions", pa.Table.from_pylist(rows, ATTRIBUTE_PREDICTIONS))
    monkeypatch.setattr(tables, "DELETE_CHUNK", 1)  # one commit per value
    version = wh.version("attribute_predictions")
    older = f"predicted_at < {ts_literal(new)}"
    assert wh.delete_where("attribute_predictions", "product_id", ["p1", "p2"], also=older) == 2
    assert wh.version("attribute_predictions") == version + 2, "two chunks of one value: two commits"
    left = sorted((r["product_id"], r["value"]) for r in wh.read("attribute_predictions").to_pylist())
    assert left == [("p1", "Navy"), ("p3", "Red")], "one microsecond newer is kept; p3 is not listed"

    version = wh.version("attribute_predictions")
    assert wh.delete_where("attribute_predictions", "product_id", ["p1", "p2"], also=older) == 0
    assert wh.version("attribute_predictions") == version, "nothing to delete commits nothing"
    newer = f"predicted_at >= {ts_literal(new.astimezone(timezone(timedelta(hours=5))))}"  # any zone: same instant
    assert wh.delete_where("attribute_predictions", "product_id", ["p1", "p3"], also=newer) == 1
    assert [r["value"] for r in wh.read("attribute_predictions").to_pylist()] == ["Red"]
    assert wh.delete_where("review_queue", "product_id", ["p1"]) == 0, "no table: nothing to delete"
