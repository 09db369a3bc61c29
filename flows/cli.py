"""The ``enrich`` command line (typer): ingest, import, sql, demo."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Multimodal catalog enrichment: ingest, enrich, dedupe.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()

WarehouseOpt = Annotated[
    str | None,
    typer.Option(
        "--warehouse",
        "-w",
        help="Warehouse root (path or s3:// URI); default $ENRICH_WAREHOUSE_ROOT or data/warehouse.",
    ),
]


def _friendly(fn):
    """Expected user errors (bad value, missing table/dataset) print one line naming the fix, exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, LookupError, FileNotFoundError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None

    return wrapper


def _env_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@contextmanager
def _progress(label: str):
    import flows.ingest

    with Progress(
        SpinnerColumn(),
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed:,} rows"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as p:
        task_id = p.add_task(label, total=None, rate="")

        def advance(n: int) -> None:
            p.advance(task_id, n)
            t = p.tasks[0]
            if t.elapsed:
                p.update(task_id, rate=f"{t.completed / t.elapsed:,.0f} rows/s")

        flows.ingest.progress_hook = advance
        try:
            yield advance
        finally:
            flows.ingest.progress_hook = None


def print_summary(summary: dict) -> None:
    table = Table(title=f"ingest of {summary['source']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("read", "accepted", "new", "changed", "unchanged", "quarantined", "media_ok", "media_bad", "duration_s"):
        table.add_row(k, f"{summary[k]:,}" if isinstance(summary[k], int) else str(summary[k]))
    for r, n in summary["quarantined_by_reason"].items():
        table.add_row(f"  quarantined: {r}", str(n))
    for k in ("pairs",):
        if k in summary:
            table.add_row(k, f"{summary[k]:,}")
    console.print(table)


@app.command()
@_friendly
def ingest(
    path: Annotated[str, typer.Argument(help="Catalog file: JSONL, CSV or Parquet (local path or URI).")],
    fmt: Annotated[
        str | None, typer.Option("--format", "-f", help="jsonl | csv | parquet (default: extension)")
    ] = None,
    warehouse: WarehouseOpt = None,
    mapping: Annotated[str | None, typer.Option(help='Column mapping as JSON, e.g. \'{"sku": "product_id"}\'')] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 5_000,
    media: Annotated[bool, typer.Option(help="Fetch and decode images / video frames.")] = True,
    video_frames: Annotated[int, typer.Option(min=1, help="Frames sampled per video.")] = 4,
) -> None:
    """Ingest a catalog file into the warehouse; bad rows and media go to `quarantine`."""
    _env_defaults()
    from flows.ingest import ingest as ingest_flow

    try:
        mapping_dict = json.loads(mapping) if mapping else None
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--mapping must be a JSON object, got {mapping!r} ({e})") from None
    with _progress(f"ingest {Path(path).name}"):
        summary = ingest_flow(
            path,
            fmt=fmt,
            warehouse_root=warehouse,
            batch_size=batch_size,
            mapping=mapping_dict,
            media=media,
            video_frames=video_frames,
        )
    print_summary(summary)


@app.command("import")
@_friendly
def import_(
    dataset: Annotated[
        str, typer.Argument(help="ae-110k | oa-mine | wdc-pave | implicitave | myntra | ditto | mepave")
    ],
    path: Annotated[str, typer.Argument(help="The dataset's folder (e.g. ../shared/data/ae-110k).")],
    split: Annotated[str | None, typer.Option(help="Only this split (train / valid / test ...).")] = None,
    warehouse: WarehouseOpt = None,
    media: Annotated[bool, typer.Option(help="Also fetch and decode the dataset's images.")] = False,
) -> None:
    """Import a public dataset (canonical rows with labels; Ditto also its labelled pairs)."""
    _env_defaults()
    from flows.ingest import import_dataset
    from warehouse.importers import get_importer

    get_importer(dataset)  # fail fast on a bad name, before Prefect starts

    with _progress(f"import {dataset}"):
        summary = import_dataset(dataset, path, split=split, warehouse_root=warehouse, media=media)
    print_summary(summary)
    if "import_stats" in summary:
        console.print_json(data=summary["import_stats"])


@app.command()
@_friendly
def sql(
    query: Annotated[str, typer.Argument(help="DuckDB SQL over the tables: products, media, quarantine, ...")],
    warehouse: WarehouseOpt = None,
    max_rows: Annotated[int, typer.Option(help="Rows to print at most.")] = 50,
    max_width: Annotated[int, typer.Option(help="Characters per cell at most.")] = 60,
) -> None:
    """Run SQL over the warehouse tables and print the result as a table."""
    from warehouse.tables import Warehouse

    result = Warehouse(warehouse).sql(query)
    print_arrow(result, max_rows=max_rows, max_width=max_width)


def print_arrow(result, *, max_rows: int = 50, max_width: int = 60, title: str | None = None) -> None:
    table = Table(show_header=True, title=title)
    for name in result.column_names:
        table.add_column(name, overflow="fold")
    for row in result.slice(0, max_rows).to_pylist():
        cells = []
        for v in row.values():
            s = "∅" if v is None else str(v)
            cells.append(s if len(s) <= max_width else s[: max_width - 1] + "…")
        table.add_row(*cells)
    console.print(table)
    if result.num_rows > max_rows:
        console.print(f"({result.num_rows:,} rows, {max_rows} shown)")


@app.command()
@_friendly
def demo(
    workdir: Annotated[str, typer.Option(help="Where the sample catalog is generated.")] = "data/demo",
    warehouse: WarehouseOpt = None,
    n_products: Annotated[int, typer.Option(min=20)] = 300,
) -> None:
    """The end-to-end demo on a generated sample catalog (no external data needed)."""
    _env_defaults()
    from flows.demo import run_demo

    run_demo(workdir=workdir, warehouse_root=warehouse, n_products=n_products)


if __name__ == "__main__":
    app()
