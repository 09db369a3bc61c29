"""The ``enrich`` command line (typer): ingest, import, sql, train, predict, dedupe, nightly, serve, demo, ..."""

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

from flows.defaults import BATCH_ROWS, COMMIT_ROWS, COMMIT_SECONDS

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
BatchOpt = Annotated[
    int, typer.Option(min=1, help="Products per model call (sorted by token length into batches of 64).")
]
PrecisionOpt = Annotated[
    str,
    typer.Option(help="fp32 | bf16 | int8 | auto. auto: bf16 where it measures faster; int8: text tower int8 (CPU)."),
]
EmbedPrecisionOpt = Annotated[
    str, typer.Option(help="Embedder precision: fp32 | int8 (text tower int8 under ONNX Runtime; re-embeds all).")
]
BackendOpt = Annotated[str, typer.Option(help="torch | onnx | auto (ONNX Runtime for the image tower on CPU).")]


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
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per batch (one Delta commit each).")] = 20_000,
    media: Annotated[bool, typer.Option(help="Fetch and decode images / video frames.")] = True,
    video_frames: Annotated[int, typer.Option(min=1, help="Frames sampled per video.")] = 4,
) -> None:
    """Ingest a catalog file into the warehouse; bad rows and media go to `quarantine`."""
    _env_defaults()
    from flows.ingest import ingest as ingest_flow

    mapping_dict = _mapping(mapping)
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
    benchmark: Annotated[
        str | None, typer.Option(help="ditto: only this benchmark (Abt-Buy, wdc/computers, ...).")
    ] = None,
) -> None:
    """Import a public dataset (canonical rows with labels; Ditto also its labelled pairs)."""
    _env_defaults()
    from flows.ingest import import_dataset
    from warehouse.importers import get_importer

    get_importer(dataset)  # fail fast on a bad name, before Prefect starts

    with _progress(f"import {dataset}"):
        summary = import_dataset(dataset, path, split=split, warehouse_root=warehouse, media=media, benchmark=benchmark)
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


@app.command()
@_friendly
def maintain(
    table: Annotated[list[str] | None, typer.Option(help="A table to maintain (repeatable); default: all.")] = None,
    retention_hours: Annotated[
        int, typer.Option(min=0, help="Keep files that versions of the last N hours still read (Delta: 168).")
    ] = 168,
    compact: Annotated[bool, typer.Option(help="Rewrite small files into larger ones first.")] = True,
    warehouse: WarehouseOpt = None,
) -> None:
    """Compact the tables and delete the files replaced more than --retention-hours ago (Delta vacuum), under the
    nightly's lock. Merges and deletes leave the replaced files behind: run this weekly, or the warehouse of a
    nightly catalog grows without bound."""
    _env_defaults()
    from flows.nightly import maintain as maintain_flow

    out = maintain_flow(warehouse_root=warehouse, tables=table or None, retention_hours=retention_hours,
                        compact=compact)  # fmt: skip
    import pyarrow as pa

    print_arrow(pa.Table.from_pylist([{"table": t, **v} for t, v in out.items()]), title="maintain")


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


train_app = typer.Typer(help="Train models (tracked in MLflow).", no_args_is_help=True)
app.add_typer(train_app, name="train")

DatasetArg = Annotated[str, typer.Option("--dataset", "-d", help="Source/dataset name in the warehouse (ae-110k, ...)")]
DataPathOpt = Annotated[str | None, typer.Option(help="Import the dataset from this folder first if it is missing.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="Torch threads (default: all cores).")]
NprocOpt = Annotated[
    int, typer.Option("--nproc", min=1, help="Train data-parallel on N processes (torchrun: gloo on CPU, nccl on GPU).")
]


def _ddp_start(nproc: int) -> bool:
    """Data-parallel training: re-launch this command under ``torch.distributed.run`` when ``--nproc`` > 1, else
    join the process group torchrun set up (if any). True on ranks > 0: they have trained what rank 0 sent them
    (no Prefect, MLflow or warehouse access there) and are done."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch(nproc))
    if "WORLD_SIZE" not in os.environ:
        return False
    from features import distributed

    if distributed.init().is_main:
        return False
    distributed.serve_jobs()
    distributed.cleanup()
    return True


def _ddp_end() -> None:
    """Rank 0 after its flow: release the other ranks and leave the process group (no-op in a single process)."""
    if "WORLD_SIZE" not in os.environ:
        return
    from features import distributed

    distributed.stop_jobs()
    distributed.cleanup()


def _relaunch(nproc: int) -> int:
    """This command line without ``--nproc``, under ``torch.distributed.run --standalone``; its exit code."""
    import subprocess
    import sys

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        args.append(a)
    if len(args) == len(sys.argv) - 1:
        raise ValueError(
            "--nproc re-launches the command line it came on, which is not this one; run "
            "`torchrun --nproc_per_node N -m flows.cli train ...` instead"
        )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "flows.cli", *args]  # fmt: skip
    console.print(f"data-parallel training on {nproc} processes: {' '.join(cmd[1:])}")
    return subprocess.call(cmd)


@train_app.command("jave")
@_friendly
def train_jave_cmd(
    dataset: DatasetArg = "ae-110k",
    data_path: DataPathOpt = None,
    preset: Annotated[str, typer.Option(help="default (pretrained towers) | tiny (tests)")] = "default",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    tower_lr: float = 5e-5,
    max_length: int = 64,
    patience: int = 3,
    seed: int = 0,
    image: Annotated[bool, typer.Option(help="Use the image path (off = text-only ablation).")] = True,
    global_gate: bool = True,
    regional_gate: bool = True,
    kl: bool = True,
    max_train: int | None = None,
    max_steps: int | None = None,
    register: bool = True,
    warehouse: WarehouseOpt = None,
    threads: ThreadsOpt = None,
    nproc: NprocOpt = 1,
) -> None:
    """Train JAVE on a dataset's train split, evaluate on its test split, register it as `jave`."""
    _env_defaults()
    if _ddp_start(nproc):
        return
    from flows.train_jave import train_jave

    s = train_jave(dataset=dataset, data_path=data_path, preset=preset, epochs=epochs, batch_size=batch_size, lr=lr,
                   tower_lr=tower_lr, max_length=max_length, patience=patience, seed=seed, use_image=image,
                   use_global_gate=global_gate, use_regional_gate=regional_gate, use_kl=kl, max_train=max_train,
                   max_steps=max_steps, register_model=register, warehouse_root=warehouse,
                   num_threads=threads)  # fmt: skip
    console.print_json(data={k: s[k] for k in ("run_id", "model_version", "promotion", "published_metric", "test",
                                                "epochs_run", "seconds")})  # fmt: skip
    _ddp_end()


@train_app.command("encoder")
@_friendly
def train_encoder_cmd(
    source: Annotated[str | None, typer.Option(help="Only products from this source (default: all).")] = None,
    preset: Annotated[
        str, typer.Option(help="default (pretrained text tower) | matching (text skip, for --supcon-epochs) | tiny")
    ] = "default",
    epochs: int = 5,
    batch_size: int = 32,
    max_train: int | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    register: bool = True,
    warehouse: WarehouseOpt = None,
    nproc: NprocOpt = 1,
    supcon_epochs: Annotated[
        int, typer.Option(help="SupCon epochs on the warehouse's labelled train pairs first (0: none)")
    ] = 0,
) -> None:
    """Self-supervised M5Product-style encoder on the catalog; registered as `product-encoder`."""
    _env_defaults()
    if _ddp_start(nproc):
        return
    from flows.train_encoder import train_encoder

    s = train_encoder(source=source, preset=preset, epochs=epochs, batch_size=batch_size, max_train=max_train,
                      max_steps=max_steps, seed=seed, register_model=register, warehouse_root=warehouse,
                      supcon_epochs=supcon_epochs)  # fmt: skip
    console.print_json(data=s, default=str)
    _ddp_end()


@train_app.command("matcher")
@_friendly
def train_matcher_cmd(
    source: Annotated[
        str | None, typer.Option(help="Only pairs between products of this source (default all).")
    ] = None,
    tower: Annotated[
        str, typer.Option(help="pretrained (frozen MiniLM cosine features) | none (no tower: faster) | tiny (tests)")
    ] = "pretrained",
    benchmark: Annotated[str | None, typer.Option(help="Only this benchmark's pairs (e.g. ditto/Abt-Buy).")] = None,
    train_split: Annotated[str, typer.Option(help="Pairs to fit on: this split, or every split named so*.")] = "train",
    valid_split: Annotated[str, typer.Option(help="Pairs the threshold is chosen on (and @champion).")] = "valid",
    test_split: Annotated[str, typer.Option(help="Pairs scored once and logged; they decide nothing.")] = "test",
    max_iter: Annotated[int, typer.Option(min=1, help="Boosting iterations.")] = 300,
    learning_rate: float = 0.05,
    seed: int = 0,
    supcon_epochs: Annotated[
        int, typer.Option(min=0, help="Also fine-tune a tower with SupCon on the train pairs (its cosine a feature).")
    ] = 0,
    register: bool = True,
    warehouse: WarehouseOpt = None,
) -> None:
    """Pair matcher (trees on pair features) on the warehouse's labelled train pairs, threshold on the valid ones;
    registered as `pair-matcher` (`enrich dedupe --matcher champion` uses it)."""
    _env_defaults()
    from flows.train_matcher import train_matcher

    s = train_matcher(source=source, benchmark=benchmark, train_split=train_split, valid_split=valid_split,
                      test_split=test_split, tower=tower, max_iter=max_iter, learning_rate=learning_rate, seed=seed,
                      supcon_epochs=supcon_epochs, register_model=register, warehouse_root=warehouse)  # fmt: skip
    console.print_json(data=s, default=str)


@app.command()
@_friendly
def compare(
    dataset: DatasetArg = "ae-110k",
    data_path: DataPathOpt = None,
    preset: str = "default",
    epochs: int = 10,
    batch_size: int = 32,
    max_length: int = 64,
    max_train: int | None = None,
    max_validation: int | None = None,
    max_steps: int | None = None,
    variant: Annotated[list[str] | None, typer.Option(help="Only these variants (repeatable).")] = None,
    warehouse: WarehouseOpt = None,
    threads: ThreadsOpt = None,
    nproc: NprocOpt = 1,
) -> None:
    """Train JAVE, no global gate, no regional gate, no KL and text-only side by side in one MLflow experiment."""
    _env_defaults()
    if _ddp_start(nproc):
        return
    from flows.train_jave import _summary_md, compare_jave

    runs = compare_jave(dataset=dataset, data_path=data_path, preset=preset, epochs=epochs, batch_size=batch_size,
                        max_length=max_length, max_train=max_train, max_validation=max_validation,
                        max_steps=max_steps, variants=variant, warehouse_root=warehouse,
                        num_threads=threads)  # fmt: skip
    console.print(_summary_md(runs))
    _ddp_end()


@app.command()
@_friendly
def evaluate(
    dataset: DatasetArg,
    split: str = "test",
    model_version: Annotated[str | None, typer.Option(help="Registered version; default @champion.")] = None,
    data_path: DataPathOpt = None,
    warehouse: WarehouseOpt = None,
) -> None:
    """Score a registered JAVE version (default @champion) on a dataset split; logged to MLflow."""
    _env_defaults()
    from flows.enrich import evaluate_jave

    metrics = evaluate_jave(dataset, split=split, model_version=model_version, warehouse_root=warehouse,
                            data_path=data_path)  # fmt: skip
    console.print_json(data=metrics)


@app.command()
@_friendly
def predict(
    warehouse: WarehouseOpt = None,
    source: Annotated[str | None, typer.Option(help="Only products from this source.")] = None,
    model_version: Annotated[str | None, typer.Option(help="Registered version; default @champion.")] = None,
    all_products: Annotated[bool, typer.Option("--all", help="Re-predict unchanged products too.")] = False,
    batch_size: BatchOpt = BATCH_ROWS,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto (cuda when present).")] = "auto",
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    visual_cache: Annotated[
        bool, typer.Option(help="Keep image features in the warehouse (by image sha256 + backbone).")
    ] = True,
) -> None:
    """Write attribute values for new/changed products to `attribute_predictions` (low scores to `review_queue`)."""
    _env_defaults()
    from flows.enrich import enrich

    summary = enrich(warehouse_root=warehouse, model_version=model_version, source=source,
                     only_changed=not all_products, batch_size=batch_size, device=device, precision=precision,
                     backend=backend, visual_cache=visual_cache)  # fmt: skip
    console.print_json(data=summary)


@app.command("dedupe")
@_friendly
def dedupe_cmd(
    warehouse: WarehouseOpt = None,
    source: Annotated[str | None, typer.Option(help="Only products from this source.")] = None,
    method: Annotated[
        str,
        typer.Option(
            help="encoder (product-encoder@champion) | text (pretrained MiniLM) | chars (char n-gram "
            "TF-IDF sketch: no model, fastest) | matcher (the SupCon tower of pair-matcher@champion)"
        ),  # fmt: skip
    ] = "encoder",
    k: Annotated[int, typer.Option(help="Neighbours per product.")] = 10,
    threshold: Annotated[float, typer.Option(help="Cosine cut when no labelled validation pairs exist.")] = 0.9,
    max_cluster_size: int = 50,
    min_linkage: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of the cross pairs that must match for two clusters to merge "
            "(0: any one match chains them; 1: cliques only).",
        ),  # fmt: skip
    ] = 0.5,
    full: Annotated[bool, typer.Option("--full", help="Recompute everything instead of incrementally.")] = False,
    precision: EmbedPrecisionOpt = "fp32",
    exact_max: Annotated[int, typer.Option(min=2, help="Exact search up to this many products, IVF beyond.")] = 50_000,
    target_recall: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="IVF: raise nprobe until the top-k recall (sampled) reaches this.")
    ] = 0.99,
    refit: Annotated[
        bool, typer.Option("--refit", help="chars: fit the IDF again on today's catalog (re-embeds everything).")
    ] = False,
    matcher: Annotated[
        str | None,
        typer.Option(
            help="Score the top-k candidates with pair-matcher@champion ('champion') or a version number "
            "(`enrich train matcher`) instead of the cosine threshold."
        ),  # fmt: skip
    ] = None,
) -> None:
    """Embed products, find duplicate pairs (faiss top-k + threshold or pair matcher) and cluster them."""
    _env_defaults()
    from flows.dedupe import dedupe

    summary = dedupe(warehouse_root=warehouse, source=source, method=method, k=k, threshold=threshold,
                     max_cluster_size=max_cluster_size, min_linkage=min_linkage, full=full, precision=precision,
                     exact_max=exact_max, target_recall=target_recall, refit=refit, matcher=matcher)  # fmt: skip
    console.print_json(data=summary)


@app.command()
@_friendly
def similar(
    product_id: Annotated[str, typer.Argument(help="The product to find neighbours of.")],
    k: int = 10,
    method: Annotated[
        str | None, typer.Option(help="Only this embedding model's vectors (default: the one that embedded it last).")
    ] = None,
    warehouse: WarehouseOpt = None,
) -> None:
    """The k most similar products (by the stored embeddings of one model version) with scores and titles."""
    from flows.dedupe import similar as find

    print_arrow(find(product_id, k=k, warehouse_root=warehouse, method=method), title=f"similar to {product_id}")


@app.command()
@_friendly
def promote(
    model: Annotated[str, typer.Argument(help="Registered model name, e.g. jave")],
    version: Annotated[str, typer.Argument(help="The version to make @champion")],
) -> None:
    """Move a registered model's @champion alias by hand (the flows move it only on a better score)."""
    from flows import tracking

    tracking.setup("jave")
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(model, tracking.CHAMPION, version)
    console.print(f"{model}@{tracking.CHAMPION} -> version {version}")


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: int = 5000,
) -> None:
    """Serve the MLflow UI over the local store (mlruns/) on 127.0.0.1."""
    import subprocess
    import sys

    from flows import tracking

    uri = tracking.tracking_uri()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    console.print(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C to stop")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]  # fmt: skip
    artifacts = tracking.artifact_root()
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    raise typer.Exit(subprocess.call(cmd, env=env))


def _mapping(mapping: str | None) -> dict[str, str] | None:
    """The ``--mapping`` option's JSON object, or a clear error naming the value."""
    try:
        return json.loads(mapping) if mapping else None
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--mapping must be a JSON object, got {mapping!r} ({e})") from None


CatalogArg = Annotated[str | None, typer.Argument(help="Catalog file to ingest first (none: the warehouse as is).")]
SourceOpt = Annotated[str | None, typer.Option(help="Source name for the catalog's rows (default: its path).")]
MappingOpt = Annotated[str | None, typer.Option(help='Column mapping as JSON, e.g. \'{"sku": "product_id"}\'')]
MethodOpt = Annotated[
    str,
    typer.Option(
        help="Dedupe embeddings: encoder (product-encoder@champion) | text | chars (no model) | matcher (the SupCon "
        "tower of pair-matcher@champion)"
    ),
]
RunnerOpt = Annotated[str, typer.Option(help="default (threads) | dask (featurize/predict/embed on Dask).")]
DaskOpt = Annotated[str | None, typer.Option(help="Address of an existing Dask scheduler (default: LocalCluster).")]


@app.command()
@_friendly
def nightly(
    catalog: CatalogArg = None,
    source: SourceOpt = None,
    mapping: MappingOpt = None,
    media: Annotated[bool, typer.Option(help="Fetch and decode images / video frames.")] = True,
    warehouse: WarehouseOpt = None,
    dedupe_method: MethodOpt = "encoder",
    k: int = 10,
    threshold: Annotated[float, typer.Option(help="Duplicate threshold when no labelled pairs choose one.")] = 0.9,
    batch_size: BatchOpt = BATCH_ROWS,
    commit_rows: Annotated[
        int,
        typer.Option(
            min=1,
            help=f"Products per Delta commit of predictions / embeddings (or every {COMMIT_SECONDS:g} s).",
        ),
    ] = COMMIT_ROWS,
    train_if_missing: Annotated[bool, typer.Option(help="Train small models when there is no @champion.")] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    embed_precision: EmbedPrecisionOpt = "fp32",
    dedupe_matcher: Annotated[
        str | None,
        typer.Option(
            help="Decide the top-k candidates with pair-matcher@champion ('champion') or a "
            "version (`enrich train matcher`); default: the cosine threshold."
        ),  # fmt: skip
    ] = None,
    runner: RunnerOpt = "default",
    dask_address: DaskOpt = None,
    dask_workers: Annotated[int, typer.Option(min=1)] = 2,
    resume: Annotated[bool, typer.Option(help="Continue the last run if it did not finish.")] = True,
    lock: Annotated[str, typer.Option(help="auto | file | prefect | none")] = "auto",
    wait_s: Annotated[float, typer.Option(help="Wait this long for a running nightly to finish.")] = 0.0,
) -> None:
    """Ad-hoc nightly run: ingest -> featurize -> predict -> embed -> dedupe for what changed since the last one."""
    _env_defaults()
    from flows.nightly import NightlyBusy, summary_markdown
    from flows.nightly import nightly as nightly_flow

    params = dict(catalog=catalog, source=source, mapping=_mapping(mapping), media=media, warehouse_root=warehouse,
                  dedupe_method=dedupe_method, k=k, threshold=threshold, batch_size=batch_size,
                  commit_rows=commit_rows, train_if_missing=train_if_missing, device=device, precision=precision,
                  backend=backend, embed_precision=embed_precision, dedupe_matcher=dedupe_matcher, runner=runner,
                  dask_address=dask_address, dask_workers=dask_workers, lock=lock, wait_s=wait_s)  # fmt: skip
    try:
        summary = nightly_flow(**params, resume=resume)
    except NightlyBusy as e:
        console.print(f"[yellow]busy:[/yellow] {e}")
        raise typer.Exit(3) from None
    from rich.markdown import Markdown

    console.print(Markdown(summary_markdown(summary)))


@app.command()
@_friendly
def serve(
    catalog: CatalogArg = None,
    cron: Annotated[str, typer.Option(help="Cron schedule of the nightly run.")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="Timezone of the schedule (IANA name).")] = "UTC",
    source: SourceOpt = None,
    mapping: MappingOpt = None,
    warehouse: WarehouseOpt = None,
    dedupe_method: MethodOpt = "encoder",
    runner: RunnerOpt = "default",
    dask_address: DaskOpt = None,
) -> None:
    """Serve the nightly flow on this machine (flow.serve): runs on the cron schedule until stopped (Ctrl-C)."""
    _env_defaults()
    from prefect.schedules import Cron

    from flows.nightly import nightly as nightly_flow

    given = dict(catalog=catalog, source=source, mapping=_mapping(mapping), warehouse_root=warehouse,
                 dedupe_method=dedupe_method, runner=runner, dask_address=dask_address)  # fmt: skip
    params = {k: v for k, v in given.items() if v is not None}  # the flow's defaults for everything else
    console.print(f"serving deployment 'nightly/nightly' on {cron!r} ({timezone}); parameters {params}")
    nightly_flow.serve(name="nightly", schedules=[Cron(cron, timezone=timezone)], parameters=params)


@app.command()
@_friendly
def demo(
    workdir: Annotated[str, typer.Option(help="Where the sample catalog is generated.")] = "data/demo",
    warehouse: WarehouseOpt = None,
    n_products: Annotated[int, typer.Option(min=20)] = 300,
    preset: Annotated[str, typer.Option(help="JAVE preset trained when there is no champion: default | tiny.")] = (
        "default"
    ),
    train_epochs: Annotated[int, typer.Option(min=1)] = 3,
) -> None:
    """The whole story on a generated sample catalog: train if no champion, nightly run, incremental nightly run."""
    _env_defaults()
    from flows.demo import run_demo

    run_demo(workdir=workdir, warehouse_root=warehouse, n_products=n_products, preset=preset, train_epochs=train_epochs)


if __name__ == "__main__":
    app()
