"""bf16 / int8 vs fp32 quality: one registered JAVE version scored on a labelled split: plain fp32; bf16 as ``enrich
--precision bf16`` runs it (autocast with the text tower's bf16 inference copy: bf16 weights, fp32 attention);
``bf16_autocast_only``, plain autocast (the bf16 path before 2026-11-23); and the text tower int8-quantized under ONNX
Runtime (``enrich --precision int8``), with the wall time of each.

    python bench/precision.py --dataset ae-110k --data-path ../shared/data/ae-110k            # jave@champion
    MLFLOW_TRACKING_URI=sqlite:///tmp/q/mlflow.db python bench/precision.py --warehouse /tmp/q/wh --version 1

Writes bench/results/precision.json. F1 values are on a 0-1 scale; the goal is |low precision - fp32| <= 0.2 F1
points (0.002) on ``extractgpt_f1`` (the quality table's metric) — the other metrics are reported beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "precision.json"
KEYS = ("extractgpt_f1", "extractgpt_f1_ungated", "value_f1_strict", "attr_micro_f1", "attr_macro_f1")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ae-110k")
    p.add_argument("--data-path", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--version", default=None, help="registered jave version; default @champion")
    p.add_argument("--warehouse", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import mlflow
    import torch

    from features.onnx_backend import onnx_text_tower, swapped
    from features.runtime import autocast_inference_copy, cpu_bf16_supported
    from flows import tracking
    from flows.datasets import load_labelled
    from flows.enrich import ModelRef, load_enricher, resolve_model
    from flows.jave_pyfunc import load_image
    from flows.train_jave import _ensure_imported
    from jave.data import build_examples
    from jave.trainer import evaluate
    from warehouse.tables import Warehouse

    mlflow.set_tracking_uri(tracking.tracking_uri())  # $MLFLOW_TRACKING_URI or ./mlruns, as the CLI uses
    wh = Warehouse(args.warehouse)
    _ensure_imported(wh, args.dataset, args.data_path)
    ref: ModelRef = resolve_model("jave", args.version)
    enricher = load_enricher(ref)
    enricher.configure(device="cpu", precision="fp32")
    data = load_labelled(wh, args.dataset)
    rows = {"test": data.test, "validation": data.validation, "train": data.train}[args.split]
    examples = build_examples(rows, enricher.spec, enricher.tokenizer)
    kw = {}
    if enricher.use_image:
        kw = {"image_loader": load_image, "preprocess": enricher.model.image_tower.preprocess}
    results = {}
    int8_tower = onnx_text_tower(enricher.model.text_tower, int8=True)
    bf16_tower = autocast_inference_copy(enricher.model.text_tower, torch.bfloat16, torch.device("cpu"))

    @contextlib.contextmanager
    def bf16():  # what `--precision bf16` runs: autocast, the text tower's bf16 inference copy in its place
        with torch.autocast("cpu", dtype=torch.bfloat16), swapped(enricher.model, "text_tower", bf16_tower):
            yield

    variants = {
        "fp32": contextlib.nullcontext,
        "bf16": bf16,
        "bf16_autocast_only": lambda: torch.autocast("cpu", dtype=torch.bfloat16),  # the bf16 path before 2026-11-23
        "int8": lambda: swapped(enricher.model, "text_tower", int8_tower),
    }
    for name, ctx in variants.items():
        if name.startswith("bf16") and not cpu_bf16_supported():
            continue
        load = [round(x, 2) for x in os.getloadavg()]
        t = time.perf_counter()
        with ctx():
            m = evaluate(enricher.model, examples, enricher.spec, thresholds=enricher.thresholds, **kw)
        results[name] = {k: round(float(m[k]), 5) for k in KEYS if k in m}
        results[name].update(seconds=round(time.perf_counter() - t, 2), load_avg_before=load)
        print(name, results[name], flush=True)
    diffs = {
        f"{name}_minus_fp32": {k: round(results[name][k] - results["fp32"][k], 5) for k in KEYS if k in results[name]}
        for name in results
        if name != "fp32"
    }
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "dataset": args.dataset, "split": args.split,
        "products": len(examples), "model": f"jave/{ref.version}", "cpu_bf16": cpu_bf16_supported(),
        "threads": torch.get_num_threads(), "results": results, **diffs,
        "within_0.2_points": {k[: -len("_minus_fp32")]: abs(d["extractgpt_f1"]) <= 0.002 for k, d in diffs.items()},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
