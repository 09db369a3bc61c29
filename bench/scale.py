"""Scaling benchmark: wall time and peak memory of the nightly run (ingest -> featurize -> predict (JAVE) -> embed ->
dedupe) as the catalog grows, and of its incremental rerun.

Per size N (``--sizes``), on a fresh warehouse under ``data/bench/scale/`` (git-ignored), three ``nightly`` flow runs,
each in its own process (its own peak RSS, ``ru_maxrss``; ``--dedupe-method text``: pretrained MiniLM embeddings):

1. ``full``: the first run: every product ingested (media on where the products have images), featurized,
   predicted, embedded, searched and clustered;
2. ``noop``: the same catalog again: nothing changed, so this is the fixed overhead of a nightly run (process start,
   Prefect, the run record, the change queries, the graph load);
3. ``one``: one title edited: the fixed overhead of a run that has work to do (both models load, the graph is
   searched again);
4. ``tenth`` (only when asked for in ``--runs``): a tenth of ``--changed`` edited (0.1%): already enough to touch
   every file of the prediction tables, so with ``changed`` it separates what a run pays per changed product from
   what it pays per table (a replaceWhere rewrites each file that holds a changed product's rows);
5. ``changed``: a catalog with ``--changed`` (1%) of the titles edited: each stage redoes only those products;
6. ``--curve`` shares (e.g. 0.5% and 5%): more such runs, in increasing order with ``tenth`` and ``changed`` (each
   edits every 1/share-th product with its own suffix, so each run's edits contain the last run's).

The claim to check (``check`` in the JSON): ``changed`` ≈ base + ``--changed`` x (``full`` - base), i.e. the changed
rows cost their share of the full run's work on top of the fixed overhead, with base = ``noop`` and base = ``one``;
with ``tenth``, also through the line cost = F + c x changed that joins ``tenth`` and ``changed``, and with three
or more such runs by least squares over them (``fit``: F, the cost per 1% changed, R²).

Products: ``warehouse.sample_catalog``'s generator (title, description, spec table, labels); one rendered image each
for N <= ``--images-up-to``; text-only above it, where JAVE's text tower and the embedder run int8 under ONNX Runtime
(the fast path for the largest sizes; ``--no-int8-text-only`` keeps fp32). The JAVE model is trained for a few steps
(``--preset``: ``tiny`` random hidden-32 towers; ``default`` pretrained towers) and registered in a private MLflow
store once; its quality is irrelevant here. Each size is written to the results file when it finishes, and sizes
measured earlier with the same settings are kept, so sizes can run in separate calls.

    python bench/scale.py                                                 # 2k products, tiny JAVE, one image each
    python bench/scale.py --sizes 10000,100000 --images-up-to 10000       # the curve in the README
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "data" / "bench" / "scale"  # git-ignored
RESULTS = REPO / "bench" / "results" / "scale.json"
PREFECT_HOME = DATA / ".prefect"  # the nightly steps' own Prefect database (see _env)
SOURCE = "bench-scale"
STAGES = ("ingest", "featurize", "predict", "embed", "dedupe")  # the nightly flow's


def catalog(n: int, images: bool) -> Path:
    """``n`` synthetic products (with labels; one rendered image each when ``images``), seeded and cached."""
    from warehouse.sample_catalog import FAMILIES, FAMILY_WEIGHTS, _jpeg, _make_product, _product_row, render_image

    root = DATA / f"catalog-{n}{'-img' if images else ''}"
    path = root / "catalog.jsonl"
    if path.exists():
        return path
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(n):
            fam = rng.choices(FAMILIES, weights=FAMILY_WEIGHTS)[0]
            p = _make_product(i, f"{fam.code}-{i:07d}", fam, rng, t0)
            if images:
                rel = f"images/{p.sku}.jpg"
                (root / rel).write_bytes(_jpeg(render_image(fam, p.attrs, seed=i)))
                p.images = [rel]
            f.write(json.dumps(_product_row(p), ensure_ascii=False) + "\n")
    tmp.rename(path)
    return path


def changed_catalog(path: Path, share: float, suffix: str = " (2025 edition)") -> tuple[Path, int]:
    """``path`` with every ``1/share``-th title edited (the images stay: same files, same sha256)."""
    every = max(1, round(1 / share))
    return _edited(path, f"catalog-changed-{share:g}.jsonl", lambda i: i % every == 0, suffix)


def curve_run(share: float) -> str:
    return f"share {share:.2%}"


def curve_catalog(path: Path, share: float) -> Path:
    """``path`` with every ``1/share``-th title edited, with a suffix of its own (a ``--curve`` run)."""
    return changed_catalog(path, share, f" (share {share:g})")[0]


def one_changed_catalog(path: Path) -> tuple[Path, int]:
    """``path`` with the first title edited: a nightly run that has something to do, but almost nothing."""
    return _edited(path, "catalog-changed-one.jsonl", lambda i: i == 0, " (single edit)")


def _edited(path: Path, name: str, edit, suffix: str) -> tuple[Path, int]:
    out = path.with_name(name)
    n = 0
    with path.open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if edit(i):
                row = json.loads(line)
                row["name"] += suffix
                line = json.dumps(row, ensure_ascii=False) + "\n"
                n += 1
            dst.write(line)
    return out, n


def _env(preset: str) -> dict[str, str]:
    env = dict(os.environ)
    # its own Prefect database, emptied per size (`main`): the ephemeral server records every task run, and a 1M
    # predict ran 1,328 s against a 240 MB database of earlier runs vs 1,113 s against a fresh one
    env["PREFECT_HOME"] = str(PREFECT_HOME)
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
               PREFECT_LOGGING_LEVEL="WARNING", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{DATA}/mlruns-{preset}/mlflow.db")  # fmt: skip
    return env


def run_step(args: argparse.Namespace) -> dict:
    """One nightly run (``--step nightly``) or the model training (``--step train``) in this process: its summary,
    wall seconds and peak RSS."""
    from warehouse.sample_catalog import FIELD_MAP

    started = time.perf_counter()
    if args.step == "nightly":
        from flows.nightly import nightly

        s = nightly(catalog=args.catalog, source=SOURCE, mapping=dict(FIELD_MAP), media=args.images,
                    warehouse_root=args.warehouse, dedupe_method=args.dedupe_method, batch_size=args.batch_size,
                    device=args.device, precision=args.precision, embed_precision=args.embed_precision,
                    resume=False)  # fmt: skip
        summary = {"stages_s": s["seconds"], "stages_peak_rss_mb": s["peak_rss_mb"], "flow_s": s["total_seconds"]} | {
            k: s.get(k) for k in ("changed_since_watermark", "ingested", "featurized_images", "predicted_products",
                                  "values_accepted", "embedded", "duplicate_pairs", "clusters", "graph",
                                  "ann_recall_at_k", "ann_nprobe")
        }  # fmt: skip
    else:  # train: a registered jave@champion (image path on) for the nightly runs, on its own warehouse
        from flows.ingest import ingest
        from flows.train_jave import train_jave

        ingest(args.catalog, mapping=dict(FIELD_MAP), source=SOURCE, warehouse_root=args.warehouse, media=args.images)
        s = train_jave(dataset=SOURCE, preset=args.preset, epochs=1, max_train=256, max_validation=64, max_steps=8,
                       warehouse_root=args.warehouse, checkpoint_root=str(DATA / f"checkpoints-{args.preset}"),
                       use_image=True)  # fmt: skip
        summary = {"model_version": s.get("model_version")}
    # the nightly resets the kernel's peak per stage (to report each stage's own): the process's is the max of both
    stage_peaks = [v for v in (summary.get("stages_peak_rss_mb") or {}).values() if v is not None]
    peak = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, *stage_peaks])
    return {"step": args.step, "wall_s": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak, 1),
            **summary}  # fmt: skip


def step(args: argparse.Namespace, name: str, wh: Path, path: Path, images: bool, label: str = "") -> dict:
    cmd = [sys.executable, __file__, "--step", name, "--warehouse", str(wh), "--catalog", str(path),
           "--preset", args.preset, "--device", args.device, "--dedupe-method", args.dedupe_method,
           "--batch-size", str(args.batch_size), *_precisions(args, images)]  # fmt: skip
    if images:
        cmd.append("--images")
    load = [round(x, 2) for x in os.getloadavg()]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(args.preset))
    if proc.returncode:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"step {name} failed (exit {proc.returncode})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(process_s=round(time.perf_counter() - t, 2), load_avg_before=load)
    stages = " ".join(f"{k} {v:.1f}" for k, v in (out.get("stages_s") or {}).items() if v is not None)
    print(f"  {label or name:11s} {out['process_s']:8.1f} s  {out['peak_rss_mb']:7.0f} MB  load {load[0]}  {stages}",
          flush=True)  # fmt: skip
    return out


def _precisions(args: argparse.Namespace, images: bool) -> list[str]:
    """The text-only sizes take the fast path: the JAVE text tower and the dedupe embedder in int8 (ONNX Runtime)."""
    if images or not args.int8_text_only:
        return ["--precision", args.precision, "--embed-precision", args.embed_precision]
    return ["--precision", "int8", "--embed-precision", "int8"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000", help="comma-separated catalog sizes, e.g. 10000,100000,1000000")
    p.add_argument("--preset", choices=("tiny", "default"), default="tiny", help="JAVE towers")
    p.add_argument("--images-up-to", type=int, default=10_000, help="sizes up to this get one image per product")
    p.add_argument("--changed", type=float, default=0.01, help="share of products changed for the incremental run")
    p.add_argument("--dedupe-method", default="text", help="text (pretrained MiniLM) | encoder")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256, help="nightly batch (one Delta commit set per batch)")
    p.add_argument("--precision", default="auto", help="JAVE precision, sizes with images: fp32|bf16|int8|auto")
    p.add_argument("--embed-precision", default="fp32", help="dedupe embedder precision for sizes with images")
    p.add_argument("--int8-text-only", action=argparse.BooleanOptionalAction, default=True,
                   help="text-only sizes run JAVE and the embedder in int8 (the fast path)")  # fmt: skip
    p.add_argument(
        "--runs",
        default="full,noop,one,changed",
        help="which runs after the full one (noop, one, tenth: a tenth of --changed, changed)",
    )
    p.add_argument("--curve", default="", help="more shares changed, each a run, e.g. 0.005,0.05 (see the fit)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--step", choices=("nightly", "train"), help=argparse.SUPPRESS)
    p.add_argument("--warehouse", help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    p.add_argument("--images", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        print(json.dumps(run_step(args), default=str))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    config = {k: v for k, v in vars(args).items() if k in ("preset", "images_up_to", "changed", "dedupe_method",
                                                            "device", "batch_size", "int8_text_only")}  # fmt: skip
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(), "config": config,
              "sizes": {}}  # fmt: skip
    if args.out.exists():  # sizes measured earlier with the same config are kept (run sizes in separate calls)
        old = json.loads(args.out.read_text())
        if old.get("config") == config:
            report["sizes"] = old.get("sizes", {})
    for n in sizes:
        images = n <= args.images_up_to
        path = catalog(n, images)
        marker = DATA / f"mlruns-{args.preset}" / ".registered"
        if not marker.exists():  # one model (image path on) per preset, trained once on the first size's catalog
            train_wh = DATA / f"train-wh-{args.preset}"
            shutil.rmtree(train_wh, ignore_errors=True)
            step(args, "train", train_wh, path, images)
            marker.write_text("jave@champion\n")
        wh = DATA / f"wh-{n}"
        shutil.rmtree(wh, ignore_errors=True)
        shutil.rmtree(PREFECT_HOME, ignore_errors=True)
        print(f"{n} products ({'text + 1 image' if images else 'text only'}): {' '.join(_precisions(args, images))}",
              flush=True)  # fmt: skip
        wanted = args.runs.split(",")
        runs = {"full": step(args, "nightly", wh, path, images, "full")}
        if "noop" in wanted:
            runs["noop"] = step(args, "nightly", wh, path, images, "noop")
        if "one" in wanted:
            runs["one"] = step(args, "nightly", wh, one_changed_catalog(path)[0], images, "one")
        if "tenth" in wanted:  # a tenth of the change (its own edit, so the changed run edits these again)
            runs["tenth"] = step(args, "nightly", wh, changed_catalog(path, args.changed / 10, " (tenth)")[0], images,
                                 "tenth")  # fmt: skip
        curve = sorted(float(x) for x in args.curve.split(",") if x)
        for share in (x for x in curve if x < args.changed):
            runs[curve_run(share)] = step(args, "nightly", wh, curve_catalog(path, share), images, curve_run(share))
        changed_path, n_changed = changed_catalog(path, args.changed)
        if "changed" in wanted:
            runs["changed"] = step(args, "nightly", wh, changed_path, images, "changed")
        for share in (x for x in curve if x > args.changed):
            runs[curve_run(share)] = step(args, "nightly", wh, curve_catalog(path, share), images, curve_run(share))
        report["sizes"][str(n)] = {"images": images, "changed_products": n_changed, "runs": runs,
                                   "precisions": _precisions(args, images), "date": report["date"],
                                   "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                                   "check": _check(runs, args.changed)}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")  # after every size
    print(table(report))


def _check(runs: dict, share: float) -> dict:
    """The changed run against base + share x (full - base), for the process (start to exit) and the flow alone,
    with two bases: ``noop`` (nothing changed: no model is even loaded) and ``one`` (one product changed: the
    models load and the graph is searched again, so this is the fixed cost of a run that has work to do)."""
    out = {}
    for key in ("process_s", "flow_s"):
        for base in ("noop", "one"):
            if base not in runs or "changed" not in runs:
                continue
            full, fixed, changed = (runs[r][key] for r in ("full", base, "changed"))
            out[f"{key} over {base}"] = {
                "fixed_overhead_s": fixed, "expected_s": round(fixed + share * (full - fixed), 2),
                "changed_s": changed, "changed_work_s": round(changed - fixed, 2),
                "changed_work_share_of_full": round((changed - fixed) / max(full - fixed, 1e-9), 4),
            }  # fmt: skip
        if "tenth" in runs and "changed" in runs:
            # cost = F + c x changed, through the tenth and the changed run: F is the fixed overhead of a run whose
            # change touches every file (a replaceWhere rewrites each file holding a changed product's rows)
            tenth, changed, full = (runs[r][key] for r in ("tenth", "changed", "full"))
            fixed = tenth - (changed - tenth) / 9
            out[f"{key} through tenth"] = {
                "fixed_overhead_s": round(fixed, 2), "changed_s": changed, "changed_work_s": round(changed - fixed, 2),
                "changed_work_share_of_full": round((changed - fixed) / max(full - fixed, 1e-9), 4),
            }  # fmt: skip
        # least squares over the runs whose change touches every file (tenth, changed, the curve): cost = F + c x
        # changed products, with c x N / 100 the cost of 1% changed, next to 1% of the full run's cost over F
        pts = [(r["predicted_products"], r[key]) for name, r in runs.items()
               if name in ("tenth", "changed") or name.startswith("share ")]  # fmt: skip
        if len(pts) >= 3 and "full" in runs:
            n_products = runs["full"]["predicted_products"]
            xs, ys = (np.array(v, float) for v in zip(*pts, strict=True))
            slope, fixed = np.polyfit(xs, ys, 1)
            r2 = 1 - ((ys - (fixed + slope * xs)) ** 2).sum() / max(((ys - ys.mean()) ** 2).sum(), 1e-12)
            per_1pct = slope * n_products / 100
            out[f"{key} fit"] = {
                "points": [[int(x), y] for x, y in pts], "fixed_overhead_s": round(fixed, 2),
                "per_1pct_changed_s": round(per_1pct, 2), "r2": round(r2, 4),
                "per_1pct_share_of_full": round(per_1pct / max(runs["full"][key] - fixed, 1e-9), 4),
            }  # fmt: skip
    return out


def _machine() -> dict:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    return {"cpu_model": cpu, "cores_usable": len(os.sched_getaffinity(0)),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip


def table(report: dict) -> str:
    lines = [
        f"scale · preset {report['config']['preset']} · {report['machine']['cpu_model']} "
        f"({report['machine']['cores_usable']} cores) · {report['date']}",
        "",
        "| products | run | ingest s | featurize s | predict s | embed s | dedupe s | flow s | process s "
        "| peak RSS MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in sorted(report["sizes"].items(), key=lambda kv: int(kv[0])):
        for run, out in r["runs"].items():
            st = out["stages_s"]
            label = {"changed": f"changed ({r['changed_products']})", "one": "one changed",
                     "tenth": f"tenth ({r['changed_products'] // 10})"}.get(run, run)  # fmt: skip
            if run.startswith("share "):
                label = f"{run} ({out['predicted_products']})"
            cells = " | ".join("—" if st.get(k) is None else f"{st[k]:.1f}" for k in STAGES)
            lines.append(f"| {n} | {label} | {cells} | {out['flow_s']:.1f} | {out['process_s']:.1f} | "
                         f"{out['peak_rss_mb']:.0f} |")  # fmt: skip
    for n, r in sorted(report["sizes"].items(), key=lambda kv: int(kv[0])):
        fit = (r.get("check") or {}).get("process_s fit")
        if fit:
            lines.append(f"\n{n}: process s = {fit['fixed_overhead_s']:.1f} s + {fit['per_1pct_changed_s']:.2f} s "
                         f"per 1% changed ({fit['per_1pct_share_of_full']:.2%} of the full run over that fixed cost; "
                         f"least squares over {len(fit['points'])} runs, R² {fit['r2']:.3f})")  # fmt: skip
    # each stage's own peak (the flow resets the kernel's high-water mark per stage): what grows with the catalog
    lines += ["", "peak RSS MB per stage, full runs (the flow process; the models stay loaded between stages)", "",
              "| products | " + " | ".join(STAGES) + " |", "|---:|" + "---:|" * len(STAGES)]  # fmt: skip
    for n, r in sorted(report["sizes"].items(), key=lambda kv: int(kv[0])):
        peaks = r["runs"].get("full", {}).get("stages_peak_rss_mb") or {}
        cells = " | ".join("—" if peaks.get(k) is None else f"{peaks[k]:.0f}" for k in STAGES)
        lines.append(f"| {n} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
