"""The ingest flow end to end: the bad-input suite, rerun idempotency, and a kill mid-write."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from warehouse.tables import Warehouse

REPO = Path(__file__).resolve().parents[1]


def _jpeg(path: Path, colour=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def hanging_server():
    from tests.media_fixtures import hanging_server as serve

    with serve() as url:
        yield url


def _bad_catalog(tmp_path: Path, hang_url: str) -> tuple[Path, dict[str, str], set[str]]:
    """A JSONL catalog with one good row between every bad case; returns (path, expected reason per id, good ids)."""
    img = tmp_path / "img"
    img.mkdir()
    good = _jpeg(img / "good.jpg")
    (img / "corrupt.jpg").write_bytes(good[:200] + bytes(b ^ 0x5A for b in good[200:400]) + good[400:])
    (img / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (img / "text.jpg").write_text("this is not an image\n")
    (img / "fake.mp4").write_text("not a video either\n")
    bomb = io.BytesIO()
    Image.new("L", (12_000, 12_000), 0).save(bomb, "PNG")  # 144 Mpx, a few hundred KB on disk
    (img / "bomb.png").write_bytes(bomb.getvalue())

    lines: list[bytes] = []
    expected: dict[str, str] = {}
    good_ids: set[str] = set()

    def good_row(i: int) -> None:
        pid = f"good-{i}"
        good_ids.add(pid)
        lines.append(json.dumps({"sku": pid, "name": f"Red Cotton Tee {i}", "image_urls": ["img/good.jpg"]}).encode())

    media_cases = {
        "m-corrupt": (["img/corrupt.jpg"], [], "media_corrupt"),
        "m-truncated": (["img/truncated.jpg"], [], "media_corrupt"),
        "m-bomb": (["img/bomb.png"], [], "media_decompression_bomb"),
        "m-text": (["img/text.jpg"], [], "media_not_image"),
        "m-video": ([], ["img/fake.mp4"], "media_not_video"),
        "m-hang": ([f"{hang_url}/x.jpg"], [], "media_unreachable"),
        "m-missing": (["img/nope.jpg"], [], "media_unreachable"),
    }
    i = 0
    for pid, (images, videos, reason) in media_cases.items():
        good_row(i := i + 1)
        # the product is ingested with its good media; only the bad media item is quarantined
        lines.append(
            json.dumps(
                {"sku": pid, "name": f"Item {pid}", "image_urls": ["img/good.jpg", *images], "video_urls": videos}
            ).encode()
        )
        good_ids.add(pid)
        expected[pid] = reason
    row_cases = [
        (b'{"sku": "r-json", "name": "trunc', "malformed_json"),
        (json.dumps({"sku": "r-long", "name": "x" * 1_000_000}).encode(), "field_too_long"),
        (b'{"sku": "r-utf8", "name": "caf\xc3\x28 bad"}', "invalid_utf8"),
        (json.dumps({"name": "no sku"}).encode(), "missing_product_id"),
        (json.dumps({"sku": "r-type", "name": 12345}).encode(), "wrong_type"),
        (json.dumps({"sku": "r-specs", "name": "Mug", "attributes": "red, 300ml"}).encode(), "bad_specs"),
        (json.dumps({"sku": "good-1", "name": "dup of good-1"}).encode(), "duplicate_in_input"),
    ]
    for raw, reason in row_cases:
        good_row(i := i + 1)
        lines.append(raw)
        expected[f"line:{len(lines)}"] = reason
    good_row(i + 1)
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected, good_ids


def test_bad_input_suite(tmp_path, prefect_harness, hanging_server):
    from flows.ingest import ingest

    path, expected, good_ids = _bad_catalog(tmp_path, hanging_server)
    wh_root = str(tmp_path / "wh")
    started = time.monotonic()
    summary = ingest(str(path), warehouse_root=wh_root, batch_size=4, media_timeout_s=1.0, media_retries=1)
    assert time.monotonic() - started < 120, "a hanging media server must not stall the run"
    wh = Warehouse(wh_root)

    products = set(wh.read("products").column("product_id").to_pylist())
    assert products == good_ids
    q = wh.read("quarantine").to_pylist()
    by_pid = {r["product_id"]: r["reason"] for r in q if r["position"].startswith("media:")}
    by_pos = {r["position"]: r["reason"] for r in q if not r["position"].startswith("media:")}
    for key, reason in expected.items():
        got = by_pos.get(key) if key.startswith("line:") else by_pid.get(key)
        assert got == reason, f"{key}: expected {reason}, got {got}"
    assert len(q) == len(expected), "nothing but the bad cases is quarantined"
    for r in q:
        assert r["message"] and r["payload"] is not None and r["run_id"] == summary["run_id"]
    long_row = next(r for r in q if r["reason"] == "field_too_long")
    assert len(long_row["payload"]) < 100_000, "payloads are capped"

    media = wh.read("media").to_pylist()
    ok = [m for m in media if m["status"] == "ok"]
    assert {m["product_id"] for m in ok} == good_ids, "every product keeps its good image"
    assert summary["media_bad"] == sum(1 for k in expected if not k.startswith("line:"))
    assert summary["quarantined"] == len(expected)

    # rerun of the same input: identical tables, nothing duplicated
    before = {
        t: wh.read(t).sort_by(wh_key(t)).drop_columns(["quarantined_at"] if t == "quarantine" else [])
        for t in ("products", "media", "quarantine")
    }
    again = ingest(str(path), warehouse_root=wh_root, batch_size=4, media_timeout_s=1.0, media_retries=1)
    assert again["new"] == 0 and again["changed"] == 0
    for t, table in before.items():
        now = wh.read(t).sort_by(wh_key(t)).drop_columns(["quarantined_at"] if t == "quarantine" else [])
        assert now.equals(table), f"table {t} changed on an identical rerun"


def wh_key(table: str) -> list[tuple[str, str]]:
    from warehouse.tables import KEYS

    return [(k, "ascending") for k in KEYS[table]]


def test_kill_mid_ingest_then_rerun(tmp_path):
    """SIGKILL an `enrich ingest` subprocess between commits: the table stays readable at its last version, and a
    rerun ends with every row exactly once."""
    n = 60_000
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"sku": f"p{i:06d}", "name": f"Product {i}", "attributes": {"k": str(i % 7)}}) + "\n")
    wh_root = tmp_path / "wh"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), ENRICH_WAREHOUSE_ROOT=str(wh_root))
    cmd = [sys.executable, "-m", "flows.cli", "ingest", str(path), "--batch-size", "2000", "--no-media"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    log = wh_root / "products" / "_delta_log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(list(log.glob("*.json"))) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed; make the input larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)

    wh = Warehouse(wh_root)
    partial = wh.read("products")
    assert 0 < partial.num_rows < n
    assert partial.num_rows % 2000 == 0, "only whole batches are ever visible"

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = wh.read("products").column("product_id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n


def test_import_flow_reproduces_published_counts(tmp_path, prefect_harness):
    from flows.ingest import import_dataset
    from tests.conftest import shared_path

    ditto = shared_path("ditto")
    mepave = shared_path("mepave-sample")
    wh_root = str(tmp_path / "wh")
    s1 = import_dataset("mepave", str(mepave), warehouse_root=wh_root)
    assert (s1["read"], s1["accepted"], s1["quarantined"]) == (90, 90, 0)
    s2 = import_dataset("ditto", str(ditto), split="test", warehouse_root=wh_root)
    assert s2["quarantined"] == 0
    wh = Warehouse(wh_root)
    out = wh.sql("SELECT count(*) AS n, sum(label) AS m FROM pairs WHERE benchmark = 'ditto/Abt-Buy' AND split='test'")
    assert out.to_pylist() == [{"n": 1916, "m": 206}]  # ../shared/data/README.md: 1,916 pairs, 206 matches
    spans = wh.sql("SELECT title, unnest(labels) AS l FROM products WHERE source = 'mepave'").to_pylist()
    assert spans and all(r["title"][r["l"]["begin"] : r["l"]["end"]] == r["l"]["value"] for r in spans)
    again = import_dataset("ditto", str(ditto), split="test", warehouse_root=wh_root)
    assert again["new"] == 0 and wh.read("pairs").num_rows == s2["pairs"]


def test_ingest_on_s3(tmp_path, prefect_harness, moto_s3):
    """Catalog, images and warehouse all on S3 (a local moto server): same tables, same idempotency."""
    client, endpoint = moto_s3
    client.create_bucket(Bucket="shop")
    img = _jpeg(tmp_path / "a.jpg")
    client.put_object(Bucket="shop", Key="export/img/a.jpg", Body=img)
    rows = [
        {"sku": "s1", "name": "Red Mug", "image_urls": ["img/a.jpg"]},
        {"sku": "s2", "name": ""},
        {"sku": "s3", "name": "Blue Mug", "image_urls": ["img/missing.jpg"]},
    ]
    client.put_object(Bucket="shop", Key="export/catalog.jsonl", Body="\n".join(json.dumps(r) for r in rows))
    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    os.environ["ENRICH_STORAGE_OPTIONS"] = json.dumps(options)
    try:
        from flows.ingest import ingest

        summary = ingest("s3://shop/export/catalog.jsonl", warehouse_root="s3://shop/warehouse")
        again = ingest("s3://shop/export/catalog.jsonl", warehouse_root="s3://shop/warehouse")
    finally:
        del os.environ["ENRICH_STORAGE_OPTIONS"]
    assert (summary["new"], summary["quarantined"], summary["media_ok"], summary["media_bad"]) == (2, 2, 1, 1)
    assert again["new"] == 0 and again["unchanged"] == 2
    wh = Warehouse("s3://shop/warehouse", storage_options=options)
    assert sorted(wh.read("products").column("product_id").to_pylist()) == ["s1", "s3"]
    blob = wh.sql("SELECT blob_uri FROM media WHERE status = 'ok'").column("blob_uri")[0].as_py()
    assert blob.startswith("s3://shop/warehouse/media_blobs/")
    assert client.head_object(Bucket="shop", Key=blob.removeprefix("s3://shop/"))["ContentLength"] > 0
    assert wh.sql("SELECT count(*) AS n FROM quarantine").to_pylist() == [{"n": 2}]


def test_changed_rows_are_merged_once_per_run_not_once_per_batch(tmp_path, prefect_harness):
    from flows.ingest import ingest
    from warehouse.sample_catalog import FIELD_MAP, generate

    cat = generate(tmp_path / "demo", n_products=60, seed=5)
    wh_root = str(tmp_path / "wh")
    first = ingest(str(cat.catalog_path), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False, batch_size=10)
    wh = Warehouse(wh_root)
    stored, seen, edited, want = set(wh.read("products").column("product_id").to_pylist()), set(), [], {}
    for i, line in enumerate(cat.catalog_path.read_bytes().splitlines()):  # some lines are bad on purpose
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        sku = row.get("sku") if isinstance(row, dict) else None
        first_seen = sku in stored and sku not in seen
        seen.add(sku)
        if i % 10 == 3 and first_seen:
            row["name"] = f"{row.get('name')} (renamed {i})"
            want[row["sku"]] = row["name"]
            line = json.dumps(row).encode()
        edited.append(line)
    path = tmp_path / "edited.jsonl"
    path.write_bytes(b"\n".join(edited) + b"\n")
    assert len(want) >= 4 and first["accepted"] > 40
    before = wh.version("products")
    again = ingest(str(path), mapping=dict(FIELD_MAP), warehouse_root=wh_root, media=False, batch_size=10)
    assert again["changed"] == len(want) and again["new"] == 0
    # the changed rows of every batch land in one merge: one new table version, not one per batch
    assert wh.version("products") == before + 1
    titles = {r["product_id"]: r["title"] for r in wh.read("products").to_pylist()}
    assert all(titles[p] == t for p, t in want.items())
    assert len(titles) == first["new"]
