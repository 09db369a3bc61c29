"""Enrichment benchmark: end-to-end products/s of the JAVE enrichment path, cold and warm, beside a naive baseline.

The catalog: ``--n`` synthetic products (``warehouse.sample_catalog``'s text generator and renderer: a title, a
description, a spec table and one 256 px product image each, all distinct), ingested once with the ``ingest`` flow
(media on) into a warehouse under ``data/bench/enrich/`` (git-ignored, reused by later runs). The model: JAVE with
the ``--preset`` towers (``default``: pretrained all-MiniLM-L6-v2 + ImageNet EfficientNet-Lite0; ``tiny``: random
hidden-32 towers, for a smoke run) and randomly initialised heads — throughput does not depend on training, and the
path is the flow's: ``flows.enrich.products_to_predict`` -> ``prepare_enricher`` -> ``JaveEnricher.predict_rows``
per batch -> ``write_predictions`` into Delta, in the flow's commit groups (``CommitGroups``: ``flows.defaults``'
``COMMIT_ROWS`` products or ``COMMIT_SECONDS`` of work; until 2026-11-23 this benchmark committed every 4,096).
``cpu_ms_per_product`` (all threads' CPU time) is steadier than wall time on a shared host.

Variants, each in its own subprocess (so each peak RSS is its own):

- ``naive``: the path before this work: per product one forward (batch 1), images decoded and run through the
  tower every time, fp32, no cache (on the first ``--naive-n`` products: it is slow);
- ``cold_torch``: batched, bucketed by token length, the image tower in eager PyTorch (channels_last), bf16 autocast
  where it measures faster than fp32 (``--precision auto``; ``features.runtime.cpu_bf16_speedup``), the visual
  feature cache empty (every image runs through the tower and is stored); on the first ``--cold-torch-n`` products
  (2,000: it is the ablation of ONNX Runtime, a rate, and a full 10k run of it cost 4.5 of ``make bench``'s 90 min);
- ``cold``: the same with the image tower under ONNX Runtime (``--backend auto``, the default on CPU), cache empty;
- ``warm``: ``cold`` with the cache it filled: no image is decoded or run again; the text tower in PyTorch with bf16
  autocast where that measures faster (``--precision auto``), else in fp32 under ONNX Runtime;
- ``warm_fp32`` / ``warm_fp32_torch``: ``warm`` in fp32 with the text tower under ONNX Runtime / in eager PyTorch (the
  ablation of ONNX Runtime for the text tower, on the first ``--cold-torch-n`` products);
- ``warm_int8``: ``warm`` with the text tower int8-quantized under ONNX Runtime (``--precision int8``; its quality
  against fp32 is bench/precision.py's).

Achieved GFLOP/s = the model FLOPs of the products (``torch.utils.flop_counter`` on a sample) / wall time, beside a
2048x2048 matmul measured in the same run (fp32 and bf16).

    python bench/enrich.py                        # 10k products, default preset; writes bench/results/enrich.json
    python bench/enrich.py --n 500 --preset tiny  # smoke run
    python bench/enrich.py --device cuda          # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from flows.defaults import BATCH_ROWS, COMMIT_ROWS, COMMIT_SECONDS  # noqa: E402

DATA = REPO / "data" / "bench" / "enrich"  # git-ignored
RESULTS = REPO / "bench" / "results" / "enrich.json"
FLOW_BATCH = BATCH_ROWS  # the enrich flow's default batch_size
# variant -> (image-tower backend, precision override); None keeps --precision
VARIANTS: dict[str, tuple[str, str | None]] = {
    "naive": ("torch", "fp32"),
    "cold_torch": ("torch", None),
    "cold": ("auto", None),
    "warm": ("auto", None),
    "warm_fp32": ("auto", "fp32"),
    "warm_fp32_torch": ("torch", "fp32"),
    "warm_int8": ("auto", "int8"),
}


# ---------------------------------------------------------------------------------------------------------------
# Inputs: catalog, warehouse, model
# ---------------------------------------------------------------------------------------------------------------


def catalog(n: int) -> Path:
    """``n`` synthetic products with one distinct rendered image each (seeded, cached)."""
    from warehouse.sample_catalog import FAMILIES, FAMILY_WEIGHTS, _jpeg, _make_product, _row, render_image

    root = DATA / f"catalog-{n}"
    path = root / "catalog.jsonl"
    if path.exists():
        return path
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    lines = []
    for i in range(n):
        fam = rng.choices(FAMILIES, weights=FAMILY_WEIGHTS)[0]
        p = _make_product(i, f"{fam.code}-{i:07d}", fam, rng, t0)
        rel = f"images/{p.sku}.jpg"
        (root / rel).write_bytes(_jpeg(render_image(fam, p.attrs, seed=i)))
        p.images = [rel]
        lines.append(json.dumps(_row(p, []), ensure_ascii=False))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.rename(path)
    return path


def warehouse(n: int) -> Path:
    """The catalog ingested with the ``ingest`` flow (products + media + image blobs), cached."""
    root = DATA / f"wh-{n}"
    if (root / ".done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    path = catalog(n)
    code = (
        "from flows.ingest import ingest; from warehouse.sample_catalog import FIELD_MAP; "
        f"print(ingest({str(path)!r}, mapping=dict(FIELD_MAP), warehouse_root={str(root)!r}, media=True, "
        "video_frames=1))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=_env())
    (root / ".done").write_text("ok")
    return root


def checkpoint(preset: str, n: int) -> Path:
    """A JAVE checkpoint folder with the ``preset`` towers and random heads (as ``jave.trainer`` writes one)."""
    import torch

    from jave.codec import AttributeVocab
    from jave.data import TaskSpec
    from jave.model import jave_default, jave_tiny
    from jave.trainer import save_weights
    from warehouse.sample_catalog import FAMILIES, FAMILY_WEIGHTS, _make_product

    root = DATA / f"model-{preset}"
    if (root / "best.safetensors").exists():
        return root
    rng = random.Random(0)
    attrs = sorted({a for _ in range(200) for a in _make_product(0, "x", _pick(rng, FAMILIES, FAMILY_WEIGHTS), rng,
                                                                 datetime(2025, 1, 1, tzinfo=UTC)).attrs})  # fmt: skip
    torch.manual_seed(0)
    build = jave_default if preset == "default" else jave_tiny
    model = build(num_attributes=len(attrs), implicit_value_sizes=()).eval()
    spec = TaskSpec(AttributeVocab(tuple(attrs)), {}, max_length=128)
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.json").write_text(json.dumps(spec.to_json()))
    (root / "config.json").write_text(json.dumps({"model": asdict(model.cfg)}, default=str))
    save_weights(model, root / "best.safetensors")
    return root


def _pick(rng: random.Random, items, weights):
    return rng.choices(items, weights=weights)[0]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(DATA / ".prefect"))
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
               PREFECT_LOGGING_LEVEL="WARNING", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    return env


# ---------------------------------------------------------------------------------------------------------------
# Variants (each in its own subprocess: ``bench/enrich.py --variant NAME``)
# ---------------------------------------------------------------------------------------------------------------


def run_variant(args: argparse.Namespace) -> dict:
    from features.onnx_backend import OnnxModule
    from flows.enrich import ModelRef, PredictionWriter, prediction_tables, prepare_enricher, products_to_predict
    from flows.jave_pyfunc import JaveEnricher
    from warehouse.tables import Warehouse

    wh = Warehouse(args.warehouse)
    t_load = time.perf_counter()
    enricher = JaveEnricher(args.checkpoint)
    backend, precision = VARIANTS[args.variant]
    cache = None if args.variant == "naive" else str(args.warehouse)
    ref = ModelRef("bench", "0", "bench", "", device=args.device, precision=precision or args.precision,
                   backend=backend, visual_cache_root=cache)  # fmt: skip
    prepare_enricher(enricher, ref)
    if args.threads:
        from features.runtime import set_threads

        set_threads(args.threads)
    load_s = time.perf_counter() - t_load
    meta = {"model_name": "bench", "model_version": args.variant, "run_id": "bench"}
    started, cpu_started = time.perf_counter(), time.process_time()
    todo = products_to_predict(wh, args.variant, None, only_changed=False)
    limit = {"naive": args.naive_n, "cold_torch": args.cold_torch_n, "warm_fp32": args.cold_torch_n,
             "warm_fp32_torch": args.cold_torch_n}.get(args.variant)  # fmt: skip
    n = todo.num_rows if limit is None else min(todo.num_rows, limit)
    query_s = time.perf_counter() - started
    n_values, predict_s = 0, 0.0

    writer = PredictionWriter(wh, n > 0, as_task=False)  # the flow's commits and deletes (predict_products)
    for start in range(0, n, FLOW_BATCH):
        rows = todo.slice(start, min(FLOW_BATCH, n - start)).to_pylist()
        for r in rows:
            r["labels"] = []
        t = time.perf_counter()
        preds = naive_predict(enricher, rows) if args.variant == "naive" else enricher.predict_rows(rows)
        predict_s += time.perf_counter() - t
        writer.add(prediction_tables(rows, preds, meta, datetime.now(UTC)), len(rows))
        n_values += len(preds)
    writer.close()
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    out = {
        "variant": args.variant, "products": n, "values": n_values, "seconds": round(seconds, 2),
        "products_per_s": round(n / seconds, 2), "model_load_s": round(load_s, 2), "query_s": round(query_s, 2),
        "predict_s": round(predict_s, 2), "write_s": round(seconds - query_s - predict_s, 2),
        # the CPU time of all threads per product: steadier than wall time on a shared host (steal, neighbours)
        "cpu_ms_per_product": round(1000 * cpu_s / n, 2),
        "predict_products_per_s": round(n / predict_s, 2), "commits": writer.commits.commits,
        "device": str(enricher.device), "autocast": str(enricher.dtype) if args.variant != "naive" else None,
        "backend": enricher.backend if args.variant != "naive" else "torch", "precision": enricher.precision,
        "text_tower": "onnx" if isinstance(enricher.text_runtime, OnnxModule) and args.variant != "naive" else "torch",
        "threads": __import__("torch").get_num_threads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }  # fmt: skip
    store = enricher.visual_store
    if store is not None:
        out.update(cache_hits=store.hits, cache_misses=store.misses, cache_writes=store.writes)
    if args.variant.startswith("warm"):
        out["flops"] = count_flops(enricher, todo.slice(0, min(64, todo.num_rows)).to_pylist())
    return out


def naive_predict(enricher, rows: list[dict]) -> list[dict]:
    """The pre-optimisation path: one product per forward, the image decoded + run every time, fp32, no cache."""
    import torch

    from flows.jave_pyfunc import load_image
    from jave.data import build_examples
    from jave.predict import predict

    out = []
    model = enricher.model
    for row in rows:
        blobs = {m["uri"]: m["blob_uri"] for m in row.get("image_media") or ()}
        row = dict(row, images=[blobs.get(u, u) for u in row["images"]])
        ex = build_examples([row], enricher.spec, enricher.tokenizer)
        kw = {"image_loader": load_image, "preprocess": model.image_tower.preprocess} if enricher.use_image else {}
        with torch.no_grad():
            preds = predict(model, ex, enricher.spec, 1, thresholds=enricher.thresholds, gate=False, **kw)
        out += enricher.prediction_rows(preds)
    return out


def count_flops(enricher, rows: list[dict]) -> dict:
    """Model FLOPs per product: text tower + JAVE heads (a bucketed batch of real products), and per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from jave.data import build_examples
    from jave.predict import infer

    examples = build_examples(rows, enricher.spec, enricher.tokenizer)
    feats = enricher.visual_features(rows) if enricher.use_image else None
    with FlopCounterMode(display=False) as fc:
        infer(enricher.model, examples, enricher.spec, 16, visual_cache=feats)  # bucketed: little padding, as run
    text = fc.get_total_flops() / len(examples)
    image = 0.0
    if enricher.use_image:
        size = enricher.model.image_tower.data_config["input_size"]
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            enricher.model.image_tower(torch.zeros(1, *size).to(enricher.device))
        image = fc.get_total_flops()
    mean_tokens = sum(e.length for e in examples) / len(examples)
    return {"text_gflop_per_product": round(text / 1e9, 3), "image_gflop": round(image / 1e9, 3),
            "mean_tokens": round(mean_tokens, 1)}  # fmt: skip


def matmul_gflops(device: str) -> dict:
    """Best-of-5 2048x2048 matmul GFLOP/s in fp32 and bf16 on ``device``, with the thread count the variants use."""
    import torch

    from features.runtime import resolve_device

    dev = resolve_device(device)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(2048, 2048, device=dev, dtype=dtype) for _ in range(2))
        best = float("inf")
        for _ in range(6):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out[name] = round(2 * 2048**3 / best / 1e9, 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    import torch

    from features.runtime import cpu_bf16_supported

    cpu = platform.processor()
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    return {"cpu_model": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "cpu_bf16": cpu_bf16_supported(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}  # fmt: skip


def subprocess_variant(args: argparse.Namespace, variant: str, wh: Path, ckpt: Path) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--warehouse", str(wh), "--checkpoint", str(ckpt),
           "--device", args.device, "--precision", args.precision, "--naive-n", str(args.naive_n),
           "--cold-torch-n", str(args.cold_torch_n)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    load = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env())
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_avg_before"] = [round(x, 2) for x in load]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="products (text + one image each)")
    p.add_argument("--naive-n", type=int, default=300, help="products the naive baseline runs on (it is slow)")
    p.add_argument("--cold-torch-n", type=int, default=2000, help="products the ablations run on")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--default", dest="preset", action="store_const", const="default", help="pretrained towers")
    preset.add_argument("--tiny", dest="preset", action="store_const", const="tiny", help="random tiny towers")
    p.add_argument("--preset", dest="preset", choices=("default", "tiny"))
    p.set_defaults(preset="default")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--variants", default=",".join(VARIANTS), help="which variants to run, in order")
    p.add_argument("--warehouse", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    started = datetime.now(UTC)
    load_start = _load()
    wh = warehouse(args.n)
    ckpt = checkpoint(args.preset, args.n)
    results = {}
    for v in args.variants.split(","):
        if v.startswith("cold"):
            shutil.rmtree(wh / "visual_features", ignore_errors=True)  # cold means cold
        results[v] = subprocess_variant(args, v, wh, ckpt)
    import torch

    from features.runtime import set_threads

    if args.threads:
        set_threads(args.threads)
    mm = matmul_gflops(args.device)
    flops = [r.pop("flops") for r in results.values() if "flops" in r][0]
    per_image = flops["image_gflop"]
    for name, r in results.items():
        images = r["products"] if name == "naive" else r.get("cache_writes", 0)
        total = r["products"] * flops["text_gflop_per_product"] + images * per_image
        r["achieved_gflops"] = round(total / r["seconds"], 1)
    report = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine() | {"load_avg_at_start": load_start, "load_avg_at_end": _load()},
        "config": {"n": args.n, "naive_n": min(args.naive_n, args.n), "cold_torch_n": min(args.cold_torch_n, args.n),
                   "preset": args.preset, "device": args.device,
                   "precision": args.precision, "torch_threads": torch.get_num_threads(), "flow_batch": FLOW_BATCH,
                   "commit_rows": COMMIT_ROWS, "commit_seconds": COMMIT_SECONDS,
                   "model": "random heads on the preset's towers (throughput does not depend on training)"},
        "matmul_gflops": mm,
        "model_flops": flops,
        "results": results,
        "goals": {"cold_products_per_s": 50, "warm_products_per_s": 300},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


def table(report: dict) -> str:
    m, mm = report["machine"], report["matmul_gflops"]
    lines = [
        f"enrichment · {report['config']['n']} products · preset {report['config']['preset']} · "
        f"{report['config']['device']} · {m['cpu_model']} ({m['cores_usable']} cores) · {report['date']}",
        f"matmul 2048²: fp32 {mm['fp32']} GFLOP/s, bf16 {mm['bf16']} GFLOP/s · model: "
        f"{report['model_flops']['text_gflop_per_product']} GFLOP text+heads per product "
        f"({report['model_flops']['mean_tokens']} tokens), {report['model_flops']['image_gflop']} GFLOP per image",
        "",
        "| variant | image / text backend / precision | products | products/s | model products/s "
        "| query / predict / write s | GFLOP/s | peak RSS MB | cache hits / misses | load avg before |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for name, r in report["results"].items():
        cache = f"{r['cache_hits']} / {r['cache_misses']}" if "cache_hits" in r else "—"
        lines.append(
            f"| {name} | {r.get('backend', 'torch')} / {r.get('text_tower', '?')} / {r.get('precision', '?')} | "
            f"{r['products']} | "
            f"{r['products_per_s']} | {r['predict_products_per_s']} | "
            f"{r['query_s']} / {r['predict_s']} / {r['write_s']} | {r['achieved_gflops']} | {r['peak_rss_mb']} | "
            f"{cache} | {' '.join(map(str, r['load_avg_before']))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
