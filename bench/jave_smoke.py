"""JAVE quality smoke benchmark on AE-110K (ExtractGPT's curation): train the ``default`` preset text-only (the
pretrained all-MiniLM-L6-v2 tower fine-tuned, image off) and report the ExtractGPT micro F1 on the test split.

Protocol (Brinkmann et al. 2023, "Product Attribute Value Extraction using Large Language Models"): every
(product, attribute) pair of the test gold data, "n/a" included, is NN/NV/VN/VC/VW; P = VC / (NV + VC + VW),
R = VC / (VN + VC + VW). 10% of the train split (seeded) is held out for early stopping and per-attribute
thresholds; the test split is only ever scored, never tuned on. Published anchors on this data: the best
fine-tuned PLM ~80 F1, GPT-4 ~86.

    python bench/jave_smoke.py                       # 15 epochs, ~ minutes on 2 CPU cores
    python bench/jave_smoke.py --epochs 3 --threads 2
    python bench/jave_smoke.py --epochs 3 --resume   # after a kill: continue (or just evaluate) from last.pt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("ENRICH_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results" / "jave_smoke.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "ae-110k"))
    ap.add_argument("--dataset", default="ae-110k", help="an ExtractGPT-format importer: ae-110k or oa-mine")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tower-lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--no-kl", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-share", type=float, default=0.1)
    ap.add_argument("--checkpoint-dir", default=str(REPO / "data" / "bench" / "jave_smoke"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--resume", action="store_true", help="continue from --checkpoint-dir/last.pt (a finished run only evaluates)"
    )
    args = ap.parse_args()

    import torch

    from features.text import load_tokenizer
    from jave.config import JaveConfig
    from jave.data import TaskSpec, build_examples
    from jave.model import JaveModel
    from jave.trainer import TrainConfig, choose_thresholds, evaluate, train
    from warehouse.importers import get_importer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    importer = get_importer(args.dataset)
    train_rows = list(importer.iter_rows(args.data, split="train"))
    test_rows = list(importer.iter_rows(args.data, split="test"))
    order = list(range(len(train_rows)))
    random.Random(args.seed).shuffle(order)
    n_val = round(args.val_share * len(order))
    val_rows = [train_rows[i] for i in sorted(order[:n_val])]
    fit_rows = [train_rows[i] for i in sorted(order[n_val:])]

    spec = TaskSpec.from_rows(fit_rows, max_length=args.max_length)
    tok = load_tokenizer()
    fit, val, test = (build_examples(r, spec, tok) for r in (fit_rows, val_rows, test_rows))
    torch.manual_seed(args.seed)
    arch = JaveConfig.default(
        len(spec.vocab), spec.implicit_value_sizes, use_image=False, hidden_size=args.hidden,
        dropout=args.dropout, use_kl=not args.no_kl,
    )  # fmt: skip
    model = JaveModel(arch)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, tower_lr=args.tower_lr, patience=args.patience,
        seed=args.seed, num_threads=args.threads, checkpoint_dir=args.checkpoint_dir,
    )  # fmt: skip
    prep_s = time.perf_counter() - t0
    print(
        f"{args.dataset}: {len(fit)} train / {len(val)} val / {len(test)} test products, {len(spec.vocab)} "
        f"attributes, max_length {spec.max_length}; data + model ready in {prep_s:.1f}s",
        flush=True,
    )

    epoch_times: list[float] = []
    last = [time.perf_counter()]

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        now = time.perf_counter()
        epoch_times.append(now - last[0])
        last[0] = now
        print(
            f"epoch {epoch:2d}  {epoch_times[-1]:6.1f}s  loss {m['train/total']:.4f} "
            f"(ce {m['train/value_ce']:.4f} bce {m['train/attr_bce']:.4f} kl {m['train/kl']:.4f})  "
            f"val ExtractGPT F1 {100 * m.get('val/extractgpt_f1', float('nan')):.2f}  "
            f"strict span F1 {100 * m.get('val/value_f1_strict', float('nan')):.2f}",
            flush=True,
        )

    t_train = time.perf_counter()
    result = train(model, fit, val, spec, cfg, on_epoch=on_epoch, resume=args.resume)
    train_s = time.perf_counter() - t_train
    thresholds = choose_thresholds(model, val, spec)
    t_eval = time.perf_counter()
    at_half = evaluate(model, test, spec)
    tuned = evaluate(model, test, spec, thresholds=thresholds)
    eval_s = time.perf_counter() - t_eval
    wall = time.perf_counter() - t0

    rows = [
        ("threshold 0.5", at_half),
        ("val-tuned thresholds", tuned),
    ]
    print(f"\nbest epoch {result.best_epoch} (val {result.select_metric} {100 * result.best_metric:.2f})")
    print(f"{'test (' + args.dataset + ')':<24}{'F1':>7}{'P':>7}{'R':>7}{'macro':>7}{'span F1':>9}{'no gate':>9}")
    for name, m in rows:
        print(
            f"{name:<24}{100 * m['extractgpt_f1']:7.2f}{100 * m['extractgpt_precision']:7.2f}"
            f"{100 * m['extractgpt_recall']:7.2f}{100 * m['extractgpt_macro_f1']:7.2f}"
            f"{100 * m['value_f1_strict']:9.2f}{100 * m['extractgpt_f1_ungated']:9.2f}"
        )
    mean_epoch = sum(epoch_times) / max(len(epoch_times), 1)
    print(f"\n{len(epoch_times)} epochs, {mean_epoch:.1f}s/epoch on {args.threads} threads; total wall {wall:.0f}s")

    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "dataset": args.dataset,
        "sizes": {"train": len(fit), "val": len(val), "test": len(test), "attributes": len(spec.vocab)},
        "args": vars(args),
        "train_config": asdict(cfg),
        "best_epoch": result.best_epoch,
        "val_best": result.best_metric,
        "test": {"threshold_0.5": at_half, "tuned": tuned},
        "thresholds": thresholds,
        "seconds": {"prep": prep_s, "train": train_s, "eval": eval_s, "wall": wall, "per_epoch": epoch_times},
        "history": result.history,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
