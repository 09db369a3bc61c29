"""``make demo``: generate the sample catalog, ingest it, and show what landed where."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

console = Console()


def run_demo(workdir: str = "data/demo", warehouse_root: str | None = None, n_products: int = 300) -> dict:
    from flows.cli import print_arrow, print_summary
    from flows.ingest import ingest
    from warehouse.sample_catalog import FIELD_MAP, generate
    from warehouse.tables import Warehouse

    started = time.perf_counter()
    out = Path(workdir)
    catalog = out / "catalog.jsonl"
    if not catalog.exists():
        console.rule("1. sample catalog")
        info = generate(out, n_products=n_products, seed=0)
        console.print(f"generated {info} in {time.perf_counter() - started:.1f}s")
    console.rule("2. ingest (Prefect flow `ingest`)")
    summary = ingest(str(catalog), mapping=dict(FIELD_MAP), warehouse_root=warehouse_root)
    print_summary(summary)
    wh = Warehouse(warehouse_root)
    console.rule("3. the warehouse (enrich sql ...)")
    queries = {
        "tables": "SELECT 'products' AS t, count(*) AS n FROM products UNION ALL SELECT 'media', count(*) FROM media "
        "UNION ALL SELECT 'quarantine', count(*) FROM quarantine",
        "a few products": "SELECT product_id, title, category, len(specs) AS n_specs, len(images) AS n_images "
        "FROM products ORDER BY product_id LIMIT 5",
        "quarantine by reason": "SELECT reason, count(*) AS n, any_value(message) AS example FROM quarantine "
        "GROUP BY reason ORDER BY n DESC",
        "media": "SELECT kind, status, count(*) AS n, round(avg(width)) AS avg_w FROM media GROUP BY ALL ORDER BY ALL",
    }
    for title, q in queries.items():
        console.print(f'[dim]$ enrich sql "{q}"[/dim]')
        print_arrow(wh.sql(q), title=title, max_width=70)
    console.print(f"demo finished in {time.perf_counter() - started:.1f}s; warehouse at {wh.root}")
    return summary
