"""The `enrich` command line: smoke tests through typer's runner (in-process, under the Prefect test harness)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_help_lists_commands():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for cmd in ("ingest", "import", "sql", "maintain", "demo"):
        assert cmd in out.output


def test_ingest_then_sql(tmp_path, prefect_harness):
    catalog = tmp_path / "c.jsonl"
    catalog.write_text(
        "\n".join(json.dumps(r) for r in [{"sku": "a", "name": "Red Mug"}, {"sku": "b"}, {"sku": "c", "name": "Tee"}])
    )
    wh = str(tmp_path / "wh")
    out = runner.invoke(app, ["ingest", str(catalog), "-w", wh, "--no-media"])
    assert out.exit_code == 0, out.output
    assert "missing_title" in out.output
    out = runner.invoke(app, ["sql", "SELECT product_id FROM products ORDER BY 1", "-w", wh])
    assert out.exit_code == 0 and "a" in out.output and "c" in out.output
    out = runner.invoke(app, ["maintain", "-w", wh, "--retention-hours", "0"])
    assert out.exit_code == 0, out.output
    assert "products" in out.output and "quarantine" in out.output and "files_deleted" in out.output
    out = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM products", "-w", wh])
    assert out.exit_code == 0 and "│ 2 " in out.output, out.output
    out = runner.invoke(app, ["maintain", "-w", wh, "--table", "product"])
    assert out.exit_code != 0 and "unknown tables ['product']" in out.output


def test_bad_arguments_say_what_to_fix(tmp_path):
    out = runner.invoke(app, ["ingest", "x.jsonl", "--mapping", "{not json"])
    assert out.exit_code != 0 and "--mapping must be a JSON object" in out.output
    out = runner.invoke(app, ["import", "no-such-dataset", str(tmp_path)])
    assert out.exit_code == 2 and "Unknown dataset 'no-such-dataset'" in out.output
    out = runner.invoke(app, ["sql", "SELECT 1 FROM products", "-w", str(tmp_path / "empty")])
    assert out.exit_code == 2 and "none yet" in out.output


def test_demo_small(tmp_path, prefect_harness, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "-w", str(tmp_path / "wh"),
                              "--n-products", "40", "--preset", "tiny", "--train-epochs", "1"])  # fmt: skip
    assert out.exit_code == 0, out.output
    from warehouse.tables import Warehouse

    wh = Warehouse(tmp_path / "wh")
    bad = json.loads((tmp_path / "demo" / "bad_rows.json").read_text())
    reasons = sorted(r["reason"] for r in wh.read("quarantine").to_pylist())
    assert reasons == sorted(b["expected_reason"] for b in bad), "bad rows quarantined once, however often ingested"
    assert wh.read("products").num_rows >= 40
    runs = sorted(wh.read("runs").to_pylist(), key=lambda r: r["started_at"])
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"]
    second = json.loads(runs[1]["stats"])
    assert second["predict"]["products"] == second["changed_since_watermark"] == 1, "the 1% change, nothing else"
    assert wh.read("attribute_predictions").num_rows + wh.read("review_queue").num_rows > 0
    assert "where to look" in out.output and "enrich ui" in out.output
