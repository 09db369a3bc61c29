"""Public-dataset importers: the registry, the shared helpers, and each dataset read end to end from ../shared/data."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from tests.conftest import shared_path
from warehouse.importers import IMPORTERS, NA_VALUE, ImportStats, align_value, field_text, get_importer
from warehouse.importers._common import html_to_text, linearize_specs, make_label
from warehouse.importers.ditto import parse_record, record_id, split_of
from warehouse.importers.mepave import parse_tagged, tag_sentence
from warehouse.schema import CANONICAL_FIELDS, PAIRS, to_canonical_table

# dataset -> (folder under ../shared/data, rows per split). Counts from ../shared/data/README.md where it gives
# them (ImplicitAVE val/test, WDC-PAVE train and the Ditto record counts are what the files hold).
EXPECTED: dict[str, tuple[str, dict[str, int]]] = {
    "ae-110k": ("ae-110k", {"train": 1568, "test": 524}),
    "oa-mine": ("oa-mine", {"train": 1452, "test": 491}),
    "wdc-pave": ("wdc-pave", {"train": 1066, "test": 354}),  # 1,420 offers
    "implicitave": ("implicitave", {"train": 54881, "val": 13723, "test": 1610}),
    "myntra": ("myntra-100", {"all": 100}),
    "ditto": (
        "ditto",  # distinct records, each counted under the first split it appears in
        {
            "train": 1920,
            "train_balance": 0,
            "valid": 105,
            "test": 582,
            "train_small": 7693,
            "train_medium": 4394,
            "valid_small": 124,
            "valid_medium": 348,
        },
    ),
    "mepave": ("mepave-sample", {"train": 50, "valid": 20, "test": 20}),
}
EXACT_SOURCES = {"ae-110k", "oa-mine", "mepave"}  # every value is written exactly as labelled


def _check_spans(row: dict, exact: bool) -> int:
    """Assert every aligned label's span holds its value (up to case unless ``exact``); return how many."""
    n = 0
    for label in row["labels"]:
        if label["field"] is None:
            assert label["begin"] is None and label["end"] is None, label
            continue
        text = field_text(row, label["field"])
        span = text[label["begin"] : label["end"]]
        if exact:
            assert span == label["value"], (row["product_id"], label, span)
        else:
            assert span.casefold() == label["value"].casefold(), (row["product_id"], label, span)
        n += 1
    return n


# ----------------------------------------------------------------------------------------- registry, helpers


def test_registry_names():
    assert set(IMPORTERS) == {"ae-110k", "oa-mine", "wdc-pave", "implicitave", "myntra", "ditto", "mepave"}
    for name, imp in IMPORTERS.items():
        assert imp.name == name and imp.splits and callable(imp.iter_rows)
    assert IMPORTERS["ditto"].iter_pairs is not None


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown dataset 'ae110k'.*valid datasets are \[.*'ae-110k'.*'wdc-pave'"):
        get_importer("ae110k")


def test_unknown_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown split 'dev' for dataset 'ae-110k'.*\['train', 'test'\]"):
        next(get_importer("ae-110k").iter_rows(tmp_path, split="dev"))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a mepave dataset folder"):
        next(get_importer("mepave").iter_rows(tmp_path / "nowhere"))


def test_align_value_prefers_exact_then_case_insensitive_and_whole_tokens():
    assert align_value("Red", title="red shirt, Red collar") == ("title", 11, 14)  # exact beats earlier lower-case
    assert align_value("red", title="Bored red shirt") == ("title", 6, 9)  # whole token beats the "red" in "Bored"
    assert align_value("cotton", title="Shirt", description="100% Cotton") == ("description", 5, 11)
    assert align_value("XL", title="a", description="size XL", order=("description", "title")) == ("description", 5, 7)
    assert align_value("wool", title="cotton shirt") is None
    assert align_value("", title="anything") is None


def test_align_value_into_specs_indexes_the_linearized_table_values_only():
    specs = [{"key": "Fit", "value": "Slim"}, {"key": "Fabric", "value": "Fit cotton"}]
    assert linearize_specs(specs) == "Fit: Slim | Fabric: Fit cotton"
    field, begin, end = align_value("Fit", title="Shirt", specs=specs)
    row = {"specs": specs}
    assert field == "specs" and field_text(row, field)[begin:end] == "Fit"
    assert begin == len("Fit: Slim | Fabric: ")  # the value "Fit cotton", not the key "Fit"


def test_import_stats_counts_labels_by_kind():
    stats = ImportStats()
    labels = [make_label("a", "x", "title", 0, 1), make_label("b", NA_VALUE), make_label("c", "implicit")]
    stats.add_row({"labels": labels}, "train")
    stats.add_row({"labels": []}, "test")
    assert stats.as_dict() == {
        "rows": 2,
        "labels": 3,
        "aligned": 1,
        "unaligned": 1,
        "na_values": 1,
        "per_split": {"train": 1, "test": 1},
    }


def test_html_to_text():
    html = "<p><strong>Wash&nbsp;Care</strong><br /> Machine wash<br/>Do not&amp; bleach</p><script>x()</script>"
    assert html_to_text(html) == "Wash Care\nMachine wash\nDo not& bleach"
    assert html_to_text("") is None


def test_mepave_tags_round_trip_synthetic():
    tagged = "这款<颜色>红色</颜色>连衣裙<材质>真丝</材质>"
    text, labels = parse_tagged(tagged)
    assert text == "这款红色连衣裙真丝"
    assert [(lb["attribute"], text[lb["begin"] : lb["end"]]) for lb in labels] == [("颜色", "红色"), ("材质", "真丝")]
    assert tag_sentence(text, labels) == tagged


def test_ditto_record_parsing():
    rec = "COL name VAL sony cam  COL description VAL  COL price VAL 9.5 "
    assert parse_record(rec) == [("name", "sony cam"), ("description", ""), ("price", "9.5")]
    assert record_id("Abt-Buy", rec) == record_id("Abt-Buy", rec.strip()) != record_id("wdc/shoes", rec)
    assert split_of(Path("train.txt.small")) == "train_small" and split_of(Path("test.txt")) == "test"


def test_extractgpt_offline(tmp_path):
    lines = [
        {"input": "Acme Red Shoe", "category": "Shoes", "target_scores": {"Brand": {"Acme": 1}, "Size": {"n/a": 1}}},
        {"input": "Blue hat", "category": "Hats", "target_scores": {"Color": {"blue": 1}}, "note": "kept"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text("", encoding="utf-8")
    stats = ImportStats()
    rows = list(get_importer("oa-mine").iter_rows(tmp_path, stats=stats))
    assert [r["product_id"] for r in rows] == ["oa-mine:train:0", "oa-mine:train:1"]
    assert rows[0]["labels"][1] == make_label("Size", NA_VALUE)
    assert rows[1]["labels"][0] == make_label("Color", "blue", "title", 0, 4)  # case-insensitive match
    assert json.loads(rows[1]["extra"]) == {"split": "train", "dataset": "oa-mine", "line": 1, "note": "kept"}
    assert stats.as_dict()["na_values"] == 1 and stats.per_split == {"train": 2}


# ----------------------------------------------------------------------------------- real data (../shared/data)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_rows_counts_spans_and_contract(name):
    folder, expected = EXPECTED[name]
    path = shared_path(folder)
    stats = ImportStats()
    ids: Counter[str] = Counter()
    for row in get_importer(name).iter_rows(path, stats=stats):
        assert tuple(row) == CANONICAL_FIELDS
        assert row["source"] == name and row["title"]
        extra = json.loads(row["extra"])
        assert extra["dataset"] == name and extra["split"] in expected
        for image in row["images"]:
            assert Path(image).is_absolute() and Path(image).is_file()
        _check_spans(row, exact=name in EXACT_SOURCES)
        ids[row["product_id"]] += 1
    assert stats.per_split == {s: n for s, n in expected.items() if n}
    assert stats.rows == sum(expected.values()) == len(ids)  # product ids unique across splits
    assert stats.labels == stats.aligned + stats.unaligned + stats.na_values
    table = to_canonical_table(islice(get_importer(name).iter_rows(path), 500))  # the Arrow schema accepts them
    assert table.num_rows == min(500, stats.rows)


@pytest.mark.shared_data
def test_single_split_matches_split_counts():
    assert sum(1 for _ in get_importer("ae-110k").iter_rows(shared_path("ae-110k"), split="test")) == 524
    assert sum(1 for _ in get_importer("mepave").iter_rows(shared_path("mepave-sample"), split="valid")) == 20


@pytest.mark.shared_data
def test_extractgpt_na_values_are_labels_not_unaligned():
    stats = ImportStats()
    rows = list(get_importer("ae-110k").iter_rows(shared_path("ae-110k"), stats=stats))
    assert stats.na_values > 0 and stats.unaligned == 0
    assert any(lb["value"] == NA_VALUE and lb["field"] is None for r in rows for lb in r["labels"])


@pytest.mark.shared_data
def test_mepave_tags_round_trip_on_the_published_sample():
    root = shared_path("mepave-sample")
    rows = {r["product_id"]: r for r in get_importer("mepave").iter_rows(root)}
    n = 0
    for split in ("train", "valid", "test"):
        for line in (root / "data" / f"jdai.jave.fashion.{split}.sample").read_text(encoding="utf-8").splitlines():
            _cid, sid, sentence, tagged = line.split("\t")
            row = rows[f"mepave:{sid}"]
            assert row["title"] == sentence
            assert tag_sentence(row["title"], row["labels"]) == tagged
            n += 1
    assert n == 90


@pytest.mark.shared_data
def test_wdc_pave_uses_mave_spans_and_keeps_the_validation_hold_out():
    stats = ImportStats()
    rows = list(get_importer("wdc-pave").iter_rows(shared_path("wdc-pave"), split="train", stats=stats))
    assert len(rows) == 1066
    fields = Counter(lb["field"] for r in rows for lb in r["labels"])
    assert fields["title"] > 0 and fields["description"] > 0
    assert stats.na_values > 0 and stats.aligned > 10 * stats.unaligned
    held_out = [json.loads(r["extra"]).get("mave_validation_attributes") for r in rows]
    assert sum(1 for h in held_out if h) == 818  # MAVE "validation" = attribute records of 818 train offers
    assert all("id" in json.loads(r["extra"]) for r in rows)


@pytest.mark.shared_data
def test_implicitave_evaluation_rows_are_the_test_rows_with_images():
    root = shared_path("implicitave")
    evaluation = list(get_importer("implicitave").iter_rows(root, split="evaluation"))
    assert len(evaluation) == 784
    assert all(len(r["images"]) == 1 for r in evaluation)
    test = {r["product_id"]: r for r in get_importer("implicitave").iter_rows(root, split="test")}
    assert all(test[r["product_id"]] == r for r in evaluation)
    assert sum(1 for r in test.values() if r["images"]) == 784
    assert all(len(r["labels"]) == 1 for r in evaluation)


@pytest.mark.shared_data
def test_myntra_rows():
    rows = list(get_importer("myntra").iter_rows(shared_path("myntra-100")))
    assert len(rows) == 100
    first = next(r for r in rows if r["product_id"] == "myntra:10065")
    assert first["title"] == "Puma Men ducati logo tee Yellow Tshirts"
    assert first["category"] == "Apparel > Topwear > Tshirts"
    assert first["specs"][0] == {"key": "Fit", "value": "Regular Fit"}  # articleAttributes, source order
    assert {"key": "Brand", "value": "Puma"} in first["specs"]
    assert make_label("Brand", "Puma", "title", 0, 4) in first["labels"]
    assert first["images"] == [str(shared_path("myntra-100", "images", "10065.jpg").resolve())]
    assert first["updated_at"].startswith("20")
    for r in rows:
        assert r["description"] is None or ("<" not in r["description"] and "&amp;" not in r["description"])
        assert len(r["images"]) == 1


@pytest.mark.shared_data
def test_ditto_pairs():
    root = shared_path("ditto")
    imp = get_importer("ditto")
    test = list(imp.iter_pairs(root, split="test", benchmark="Abt-Buy"))
    assert len(test) == 1916 and sum(p["label"] for p in test) == 206
    assert all(tuple(p) == tuple(PAIRS.names) for p in test)
    assert {p["benchmark"] for p in test} == {"ditto/Abt-Buy"}
    ids = {r["product_id"] for r in imp.iter_rows(root, benchmark="Abt-Buy")}
    assert all(p["left_id"] in ids and p["right_id"] in ids for p in imp.iter_pairs(root, benchmark="Abt-Buy"))
    counts = Counter((p["benchmark"], p["split"]) for p in imp.iter_pairs(root))
    assert counts[("ditto/wdc/computers", "train_small")] == 2231
    assert all(1000 <= counts[(f"ditto/wdc/{b}", "test")] <= 1100 for b in ("computers", "cameras", "shoes", "watches"))


def test_import_one_ditto_benchmark_into_the_warehouse(tmp_path, prefect_harness):
    from flows.ingest import import_dataset
    from warehouse.tables import Warehouse

    root = shared_path("ditto")
    wh_root = str(tmp_path / "wh")
    s = import_dataset("ditto", str(root), warehouse_root=wh_root, benchmark="Abt-Buy")
    wh = Warehouse(wh_root)
    assert s["pairs"] == wh.read("pairs").num_rows == 1916 * 2 + 5743 + 1232  # test, valid, train, train_balance
    assert wh.sql("SELECT DISTINCT benchmark FROM pairs").column("benchmark").to_pylist() == ["ditto/Abt-Buy"]
    assert wh.sql("SELECT count(*) AS n FROM products WHERE product_id NOT LIKE 'ditto:Abt-Buy:%'")["n"][0].as_py() == 0
    with pytest.raises(ValueError, match="benchmark"):
        import_dataset("myntra", str(tmp_path), warehouse_root=wh_root, benchmark="Abt-Buy")
