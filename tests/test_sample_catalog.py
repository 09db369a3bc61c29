"""The demo's sample catalog generator: bookkeeping, media, determinism (warehouse.sample_catalog)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from warehouse.quarantine import Reason
from warehouse.sample_catalog import CSV_COLUMNS, FIELD_MAP, SampleCatalog, generate
from warehouse.schema import CANONICAL_FIELDS

N = 60


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> SampleCatalog:
    return generate(tmp_path_factory.mktemp("sample") / "a", n_products=N, seed=7, n_videos=2)


def _lines(cat: SampleCatalog) -> list[bytes]:
    return cat.catalog_path.read_bytes().split(b"\n")[:-1]


def _bad(cat: SampleCatalog) -> dict[int, dict]:
    return {b["line"]: b for b in json.loads(cat.bad_rows_path.read_text())}


def _good_rows(cat: SampleCatalog) -> list[dict]:
    bad = _bad(cat)
    return [json.loads(line) for k, line in enumerate(_lines(cat), start=1) if k not in bad]


def test_field_map_targets_canonical_fields():
    assert set(FIELD_MAP.values()) <= set(CANONICAL_FIELDS)
    assert FIELD_MAP["sku"] == "product_id" and FIELD_MAP["name"] == "title"


def test_line_counts_and_bad_row_bookkeeping(catalog: SampleCatalog):
    lines = _lines(catalog)
    bad = _bad(catalog)
    assert len(lines) == catalog.n_rows == catalog.n_good_rows + catalog.n_bad_rows
    assert catalog.n_good_rows == N and len(bad) == catalog.n_bad_rows
    reasons = {b["expected_reason"] for b in bad.values()}
    assert reasons <= {r.value for r in Reason}
    expected = {
        "missing_product_id", "missing_title", "wrong_type", "field_too_long", "invalid_utf8", "malformed_json",
        "bad_specs", "duplicate_in_input", "media_not_image", "media_unreachable", "media_not_video", "media_corrupt",
    }  # fmt: skip
    assert reasons == expected
    # Good rows around every bad one: never first, last, or next to another bad row.
    assert all(1 < k < len(lines) and k + 1 not in bad for k in bad)


def test_bad_rows_fail_as_recorded(catalog: SampleCatalog):
    lines = _lines(catalog)
    good_skus = [r["sku"] for r in _good_rows(catalog)]
    for k, b in _bad(catalog).items():
        raw = lines[k - 1]
        reason = b["expected_reason"]
        if reason == "invalid_utf8":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
            continue
        if reason == "malformed_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(raw)
            continue
        row = json.loads(raw)
        if reason == "missing_product_id":
            assert "sku" not in row
        elif reason == "missing_title":
            assert row["name"] == ""
        elif reason == "wrong_type":
            assert not isinstance(row["name"], str)
        elif reason == "field_too_long":
            assert len(row["name"]) >= 1_000_000
        elif reason == "bad_specs":
            assert isinstance(row["attributes"], str)
        elif reason == "duplicate_in_input":
            earlier = [json.loads(g) for g in lines[: k - 1] if row["sku"].encode() in g]
            assert row["sku"] in good_skus and any(e.get("sku") == row["sku"] for e in earlier)
            assert all(e["name"] != row["name"] for e in earlier)
        elif reason == "media_unreachable":
            assert not (catalog.root / row["image_urls"][0]).exists()
        elif reason in ("media_not_image", "media_corrupt"):
            with pytest.raises(OSError), Image.open(catalog.root / row["image_urls"][0]) as im:
                im.load()
        elif reason == "media_not_video":
            import av

            with pytest.raises(av.error.FFmpegError):
                av.open(str(catalog.root / row["video_urls"][0])).close()


def test_good_rows_are_well_formed_with_readable_images(catalog: SampleCatalog):
    rows = _good_rows(catalog)
    assert len({r["sku"] for r in rows}) == len(rows)
    for r in rows:
        assert isinstance(r["name"], str) and r["name"]
        assert isinstance(r["attributes"], dict | list)
        assert 1 <= len(r["image_urls"]) <= 2
        for rel in r["image_urls"]:
            with Image.open(catalog.root / rel) as im:
                im.load()
                assert im.format == "JPEG" and min(im.size) >= 200
        for lab in r["tagged_attributes"]:  # spans point at the value (up to case)
            if lab["begin"] is not None:
                text = r["name"] if lab["field"] == "title" else r["description"]
                assert text[lab["begin"] : lab["end"]].lower() == lab["value"].lower()
    assert sum(isinstance(r["attributes"], list) for r in rows) >= 1  # both spec-table shapes occur
    implicit = [lab for r in rows for lab in r["tagged_attributes"] if lab["field"] is None]
    assert implicit, "some values should be visible only in the image"


def test_videos_open_and_have_frames(catalog: SampleCatalog):
    import av

    videos = [v for r in _good_rows(catalog) for v in r["video_urls"]]
    assert len(videos) == catalog.n_videos == 2
    with av.open(str(catalog.root / videos[0])) as container:
        frames = list(container.decode(video=0))
    assert len(frames) >= 10
    assert frames[0].width == frames[0].height == 256


def test_near_duplicate_truth_refers_to_catalog_skus(catalog: SampleCatalog):
    skus = {r["sku"] for r in _good_rows(catalog)}
    with open(catalog.duplicates_truth_path, newline="") as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == catalog.n_near_duplicates >= 1
    by_sku = {r["sku"]: r for r in _good_rows(catalog)}
    for p in pairs:
        assert p["sku_a"] in skus and p["sku_b"] in skus and p["sku_a"] != p["sku_b"]
        a, b = by_sku[p["sku_a"]], by_sku[p["sku_b"]]
        assert a["attributes"] == b["attributes"] and a["name"] != b["name"]


def test_csv_export(catalog: SampleCatalog):
    with open(catalog.csv_path, newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    (bad,) = json.loads(catalog.csv_bad_rows_path.read_text())
    assert tuple(records[0]) == CSV_COLUMNS
    assert len(records) == 1 + catalog.n_good_rows + 1
    widths = {k + 1: len(rec) for k, rec in enumerate(records)}
    assert [line for line, w in widths.items() if w != len(CSV_COLUMNS)] == [bad["line"]]
    first = dict(zip(CSV_COLUMNS, records[1], strict=True))
    assert isinstance(json.loads(first["attributes"]), dict | list)


def test_same_seed_same_bytes(catalog: SampleCatalog, tmp_path: Path):
    again = generate(tmp_path / "b", n_products=N, seed=7, n_videos=2)
    assert again.catalog_path.read_bytes() == catalog.catalog_path.read_bytes()
    assert again.csv_path.read_bytes() == catalog.csv_path.read_bytes()
    other = generate(tmp_path / "c", n_products=N, seed=8, n_videos=0)
    assert other.catalog_path.read_bytes() != catalog.catalog_path.read_bytes()


def test_too_few_products_is_an_error(tmp_path: Path):
    with pytest.raises(ValueError, match="at least"):
        generate(tmp_path, n_products=5)
