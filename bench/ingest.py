"""Ingestion benchmark (``make bench``): text rows/s and media images/s, ours beside the naive way, peak memory.

Text: 1M synthetic catalog rows (JSONL: title, a 100-300 character description, category, a spec mapping of 3-6
entries, updated_at, one or two unknown columns) into the ``products`` Delta table through the same core functions
the ingest flow calls per batch (``read_batches(parse=False)`` -> ``prepare_batches`` -> ``finish_batch`` ->
``write_batch``), against pandas ``read_json(lines=True)`` + ``to_parquet``. Then a rerun of the same file (all
unchanged: nothing written), and 250k rows for both, to show which memory grows with the input.

Media: ``warehouse.ingest.ingest_media`` (fetch, verify, EXIF-rotate, draft-mode downscale, store) over 200 JPEGs
(the Myntra images, 1440x1080 to 2400x1800, when ../shared/data/myntra-100 is there, else generated 1024x768),
against opening, converting and saving them one by one with PIL.

Every variant runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own; ours also reports the peak of
its worker processes. CPU seconds (user + sys, workers included) are reported too: on a shared machine they are the
steadier number, and ``rows / cpu_s`` is what each core sustains.

    python bench/ingest.py                 # everything, ~5 minutes on 2 cores; writes bench/results/ingest.json
    python bench/ingest.py --rows 200000   # smaller text runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "bench"  # git-ignored
RESULTS = REPO / "bench" / "results" / "ingest.json"
MYNTRA = Path(os.environ.get("ENRICH_SHARED_DATA", REPO.parent / "shared" / "data")) / "myntra-100" / "images"

# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------

WORDS = [
    "cotton",
    "linen",
    "soft",
    "breathable",
    "classic",
    "slim",
    "fit",
    "regular",
    "stretch",
    "durable",
    "lightweight",
    "everyday",
    "premium",
    "stainless",
    "steel",
    "ceramic",
    "handmade",
    "organic",
    "recycled",
    "waterproof",
    "wireless",
    "compact",
    "portable",
    "ergonomic",
    "vintage",
    "modern",
    "elegant",
    "casual",
    "summer",
    "winter",
    "café",
    "naïve",
    "crème",
    "résumé",
]
CATEGORIES = (
    "Apparel > Shirts",
    "Apparel > Dresses",
    "Home > Kitchen > Mugs",
    "Electronics > Audio",
    "Shoes > Sneakers",
    "Beauty > Skincare",
    "Toys > Puzzles",
    "Home > Bedding",
)
SPEC_KEYS = ("Material", "Colour", "Size", "Fit", "Pattern", "Weight", "Capacity", "Brand", "Origin", "Care")


def catalog_row(i: int, rng: random.Random) -> dict:
    """One synthetic catalog row, shaped like a retailer export (``sku``/``title``... plus unknown columns)."""
    words = rng.choices(WORDS, k=rng.randint(14, 40))  # ~100-300 characters
    row = {
        "sku": f"SKU-{i:08d}",
        "title": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))).title(),
        "description": " ".join(words).capitalize() + ".",
        "category": rng.choice(CATEGORIES),
        "specs": {k: rng.choice(WORDS) for k in rng.sample(SPEC_KEYS, rng.randint(3, 6))},
        "updated_at": f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:00:00Z",
        "brand_code": f"B{rng.randint(1, 999):03d}",
    }
    if i % 3 == 0:
        row["rating"] = round(rng.uniform(1, 5), 1)
    return row


def catalog(rows: int) -> Path:
    """The first ``rows`` rows of the synthetic catalog (seeded, cached under data/bench)."""
    import orjson

    path = DATA / f"catalog-{rows}.jsonl"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for start in range(0, rows, 10_000):
            f.write(
                b"".join(orjson.dumps(catalog_row(i, rng)) + b"\n" for i in range(start, min(rows, start + 10_000)))
            )
    tmp.rename(path)
    return path


def images(n: int) -> tuple[Path, list[str]]:
    """``n`` JPEGs: the Myntra images (cycled) if present, else generated 1024x768 ones (cached)."""
    if MYNTRA.is_dir() and any(MYNTRA.glob("*.jpg")):
        found = sorted(MYNTRA.glob("*.jpg"))
        folder = DATA / "myntra"
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(n):  # distinct files, so neither side is served from a content-addressed cache
            name = f"{i:04d}.jpg"
            if not (folder / name).exists():
                data = found[i % len(found)].read_bytes()
                (folder / name).write_bytes(data + i.to_bytes(4, "big"))  # bytes after EOI: same image, new sha
            names.append(name)
        return folder, names
    import numpy as np
    from PIL import Image

    folder = DATA / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"{i:04d}.jpg"
        if not (folder / name).exists():
            base = np.linspace(0, 255, 1024, dtype=np.uint8)[None, :, None].repeat(768, 0).repeat(3, 2)
            noise = rng.integers(0, 40, (768, 1024, 3), dtype=np.uint8)
            Image.fromarray(base // 2 + noise).save(folder / name, "JPEG", quality=90)
        names.append(name)
    return folder, names


# ---------------------------------------------------------------------------------------------------------------
# Variants (each runs in its own subprocess: ``bench/ingest.py --variant NAME``)
# ---------------------------------------------------------------------------------------------------------------


def text_ours(path: Path, warehouse: Path, batch_size: int, workers: int) -> dict:
    """The flow's per-batch core functions, without Prefect."""
    from warehouse import ingest as core
    from warehouse.sources import read_batches
    from warehouse.tables import Warehouse
    from warehouse.validate import resolve_mapping

    wh = Warehouse(warehouse)
    state = core.RunState.load(wh)
    total = core.BatchResult()
    batches = read_batches(path, "jsonl", batch_size, parse=False)
    kw = dict(source=str(path), mapping=resolve_mapping(None, None), run_id="bench")
    for batch, prepared in core.prepare_batches(batches, workers=workers, **kw):
        now = datetime.now(UTC)
        done = core.finish_batch(prepared, state, batch=batch, source=kw["source"], run_id="bench", now=now)
        core.write_batch(
            wh, new=done.new, changed=done.changed, media=[], quarantine=done.quarantine, run_id="bench", now=now
        )
        total.add(done.result())
    return total.as_dict()


def text_naive(path: Path, out: Path) -> dict:
    """The whole file into pandas, then one Parquet file: no validation, no hashing, no dedup, no Delta."""
    import pandas as pd

    df = pd.read_json(path, lines=True)
    df.to_parquet(out / "products.parquet")
    return {"read": len(df)}


def text_flow(path: Path, warehouse: Path, batch_size: int) -> dict:
    """The Prefect ``ingest`` flow itself (ephemeral API), media off; what it calls is what flows/ingest.py wires."""
    from flows.ingest import ingest

    summary = ingest(str(path), warehouse_root=str(warehouse), batch_size=batch_size, media=False)
    return {k: summary[k] for k in ("read", "new", "changed", "unchanged", "quarantined", "duration_s")}


def media_ours(folder: Path, names: list[str], warehouse: Path) -> dict:
    from warehouse.ingest import ingest_media
    from warehouse.media import MediaConfig
    from warehouse.tables import Warehouse

    rows = [{"product_id": f"p{i}", "images": [name], "videos": []} for i, name in enumerate(names)]
    media, quarantine = ingest_media(
        rows, wh=Warehouse(warehouse), run_id="bench", source="bench", cfg=MediaConfig(), base_dir=str(folder)
    )
    return {"images": sum(m["status"] == "ok" for m in media), "bad": len(quarantine)}


def media_naive(folder: Path, names: list[str], out: Path) -> dict:
    from PIL import Image

    for name in names:
        with Image.open(folder / name) as im:
            im.convert("RGB").save(out / name, "JPEG", quality=90)
    return {"images": len(names)}


_IMPORTS = {  # imported before the clock starts: the work is measured, not the interpreter warming up
    "text-ours": ("warehouse.ingest", "warehouse.sources", "warehouse.tables", "warehouse.validate"),
    "text-naive": ("pandas", "pyarrow.parquet"),
    "text-flow": ("flows.ingest",),
    "media-ours": ("warehouse.ingest", "warehouse.media", "warehouse.tables"),
    "media-naive": ("PIL.Image",),
}


class PeakRSS:
    """Samples the RSS of this process and its children (the worker processes) every 20 ms; keeps the peaks."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.me = psutil.Process()
        self.tree = 0  # peak of (this process + its children) at one instant
        self.workers = 0  # peak of the children alone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.02):
            kids = 0
            for child in self.me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a child that just exited
                    kids += child.memory_info().rss
            self.workers = max(self.workers, kids)
            self.tree = max(self.tree, self.me.memory_info().rss + kids)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_variant(args: argparse.Namespace) -> None:
    """In the subprocess: run one variant, print its measurements as one JSON line."""
    import importlib

    for module in _IMPORTS[args.variant]:
        importlib.import_module(module)
    if args.variant.startswith("media"):
        folder, names = images(args.images)
    scratch = Path(args.scratch)
    rss = PeakRSS()
    cpu0 = _cpu()
    started = time.perf_counter()
    if args.variant == "text-ours":
        out = text_ours(Path(args.input), scratch / "wh", args.batch_size, args.workers)
    elif args.variant == "text-naive":
        out = text_naive(Path(args.input), scratch)
    elif args.variant == "text-flow":
        out = text_flow(Path(args.input), scratch / "wh", args.batch_size)
    elif args.variant == "media-ours":
        out = media_ours(folder, names, scratch / "wh")
    else:
        out = media_naive(folder, names, scratch)
    seconds = time.perf_counter() - started
    cpu = _cpu() - cpu0
    rss.stop()
    out.update(
        seconds=round(seconds, 3),
        cpu_s=round(cpu, 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB, exact
        peak_rss_workers_mb=round(rss.workers / 2**20, 1),  # sampled
        peak_rss_total_mb=round(max(rss.tree, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20, 1),
    )
    print("RESULT " + json.dumps(out))


def _cpu() -> float:
    """User + system CPU seconds of this process and its finished children (the workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(variant: str, scratch: Path, **opts: object) -> dict:
    """Run ``variant`` in a fresh subprocess (optionally reusing ``scratch``, e.g. the warehouse for a rerun)."""
    cmd = [sys.executable, __file__, "--variant", variant, "--scratch", str(scratch)]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_LOGGING_LEVEL="WARNING")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def machine() -> dict:
    import deltalake
    import pyarrow

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "pyarrow": pyarrow.__version__,
        "deltalake": deltalake.__version__,
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="text rows of the big run")
    parser.add_argument("--small-rows", type=int, default=250_000, help="text rows of the memory-flatness run")
    parser.add_argument("--batch-size", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2, help="parse/validate worker processes (0: inline)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--flow-rows", type=int, default=50_000, help="text rows through the Prefect flow (0: skip)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    # subprocess side
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return

    info = machine()
    big, small = catalog(args.rows), catalog(args.small_rows)
    images(args.images)
    root = DATA / "runs"
    shutil.rmtree(root, ignore_errors=True)
    text = dict(batch_size=args.batch_size, workers=args.workers)
    rows: list[dict] = []

    def record(name: str, what: str, n: int, result: dict, unit: str = "rows") -> None:
        seconds = result.get("duration_s") or result["seconds"]  # the flow: its own clock, without API start-up
        result = dict(
            result,
            name=name,
            what=what,
            n=n,
            unit=unit,
            per_s=round(n / seconds, 1),
            cpu_us_per_item=round(result["cpu_s"] / n * 1e6, 2),
        )
        rows.append(result)
        print(
            f"  {name:<18} {n:>9,} {unit:<6} {seconds:>7.2f} s {result['per_s']:>10,.0f} {unit}/s "
            f"{result['cpu_us_per_item']:>8.1f} cpu-us/{unit[:-1]}  peak RSS {result['peak_rss_mb']:>6.0f} MB"
            + (f", with workers {result['peak_rss_total_mb']:.0f} MB" if result["peak_rss_workers_mb"] else ""),
            flush=True,
        )

    print(f"machine: {info['nproc']} x {info['cpu_model']}, load {info['load_avg_at_start']}")
    for n, path in ((args.rows, big), (args.small_rows, small)):
        record(
            f"text ours {n // 1000}k",
            "core functions, fresh warehouse",
            n,
            measure("text-ours", root / f"ours-{n}", input=path, **text),
        )
        record(
            f"text naive {n // 1000}k",
            "pandas read_json + to_parquet",
            n,
            measure("text-naive", _fresh(root / f"naive-{n}"), input=path),
        )
    record(
        f"rerun ours {args.rows // 1000}k",
        "same file again: all unchanged",
        args.rows,
        measure("text-ours", root / f"ours-{args.rows}", input=big, **text),
    )
    if args.flow_rows:
        record(
            f"flow {args.flow_rows // 1000}k",
            "Prefect ingest flow, media off (its own clock)",
            args.flow_rows,
            measure("text-flow", root / "flow", input=catalog(args.flow_rows), batch_size=args.batch_size),
        )
    record(
        f"media ours {args.images}",
        "ingest_media: fetch+verify+EXIF+downscale+store",
        args.images,
        measure("media-ours", root / "media-ours", images=args.images),
        unit="images",
    )
    record(
        f"media naive {args.images}",
        "PIL open + convert + save, one by one",
        args.images,
        measure("media-naive", _fresh(root / "media-naive"), images=args.images),
        unit="images",
    )

    by = {r["name"]: r for r in rows}
    summary = {
        "text_rows_per_s": by[f"text ours {args.rows // 1000}k"]["per_s"],
        "text_naive_rows_per_s": by[f"text naive {args.rows // 1000}k"]["per_s"],
        "rerun_rows_per_s": by[f"rerun ours {args.rows // 1000}k"]["per_s"],
        "images_per_s": by[f"media ours {args.images}"]["per_s"],
        "images_naive_per_s": by[f"media naive {args.images}"]["per_s"],
        "peak_rss_mb_ours": {n: by[f"text ours {n // 1000}k"]["peak_rss_mb"] for n in (args.small_rows, args.rows)},
        "peak_rss_mb_naive": {n: by[f"text naive {n // 1000}k"]["peak_rss_mb"] for n in (args.small_rows, args.rows)},
    }
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
        "config": {
            **text,
            "rows": args.rows,
            "small_rows": args.small_rows,
            "images": args.images,
            "image_source": "myntra-100 (1440x1080 to 2400x1800)" if MYNTRA.is_dir() else "generated 1024x768",
        },
        "summary": summary,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    shutil.rmtree(root, ignore_errors=True)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


if __name__ == "__main__":
    main()
