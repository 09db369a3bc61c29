"""Dedupe quality on Ditto's Abt-Buy (Li et al., VLDB 2021): pretrained-MiniLM cosine vs the fine-tuned PairMatcher.

- blocking recall@k: every Abt (left) record searched against all Buy (right) records by cosine of pretrained
  all-MiniLM-L6-v2 embeddings of the serialized record; share of the test split's matches found in the top k.
- pair F1 on the test pairs: cosine with the threshold chosen on valid; the cross-encoder (features/matcher.py)
  fine-tuned on train, epoch and threshold chosen on valid. Test is read only for the final numbers.
  Ditto reports F1 89.33 on Abt-Buy (RoBERTa, with its optimisations; this is the plain MiniLM cross-encoder).

Run: ``.venv/bin/python bench/dedupe_quality.py [--epochs 3] [--max-train N]``; writes
bench/results/dedupe_quality.json. CPU only, 2 threads; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("ENRICH_SHARED_DATA", REPO.parent / "shared" / "data")) / "ditto"
RESULTS = REPO / "bench" / "results" / "dedupe_quality.json"
BENCHMARK = "Abt-Buy"


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float, float]:
    pred = scores >= threshold
    tp = float((pred & (labels == 1)).sum())
    p = tp / max(pred.sum(), 1)
    r = tp / max((labels == 1).sum(), 1)
    return p, r, 2 * p * r / max(p + r, 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=0, help="subsample train pairs (0 = all)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--skip-matcher", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from features.matcher import MatcherConfig, PairMatcher, serialize
    from features.similarity import build_index, recall_at_k, search, threshold_for_f1
    from features.towers import TextTower, TextTowerConfig
    from warehouse.importers.ditto import iter_pairs, iter_rows

    rows = {r["product_id"]: r for r in iter_rows(DATA, benchmark=BENCHMARK)}
    pairs = {s: list(iter_pairs(DATA, s, benchmark=BENCHMARK)) for s in ("train", "valid", "test")}

    def triples(split: str) -> list[tuple[dict, dict, int]]:
        return [(rows[p["left_id"]], rows[p["right_id"]], p["label"]) for p in pairs[split]]

    results: dict = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "benchmark": BENCHMARK}
    results["pairs"] = {s: len(v) for s, v in pairs.items()}
    results["positives"] = {s: int(sum(p["label"] for p in v)) for s, v in pairs.items()}

    # ---- cosine on pretrained MiniLM
    t0 = time.perf_counter()
    tower = TextTower(TextTowerConfig(max_length=args.max_length, trainable=False))
    left_ids = sorted({p["left_id"] for v in pairs.values() for p in v})
    right_ids = sorted({p["right_id"] for v in pairs.values() for p in v})
    emb = {}
    for ids in (left_ids, right_ids):
        for i in range(0, len(ids), 128):
            chunk = ids[i : i + 128]
            for pid, v in zip(chunk, tower.embed([serialize(rows[x]) for x in chunk]).numpy(), strict=True):
                emb[pid] = v
    index = build_index(np.stack([emb[x] for x in right_ids]), kind="exact")
    right_pos = {x: i for i, x in enumerate(right_ids)}
    test_pos = [p for p in pairs["test"] if p["label"] == 1]
    _, top = search(index, np.stack([emb[p["left_id"]] for p in test_pos]), 50)
    truth = np.array([[right_pos[p["right_id"]]] for p in test_pos])
    blocking = {f"recall@{k}": recall_at_k(top[:, :k], truth) for k in (1, 5, 10, 20, 50)}
    cos = {}
    for s in ("valid", "test"):
        cos[s] = np.array([float(emb[p["left_id"]] @ emb[p["right_id"]]) for p in pairs[s]])
    y = {s: np.array([p["label"] for p in pairs[s]]) for s in ("train", "valid", "test")}
    cut, valid_f1 = threshold_for_f1(cos["valid"], y["valid"])
    p, r, f1 = f1_at(cos["test"], y["test"], cut)
    results["blocking"] = {"records_left": len(left_ids), "records_right": len(right_ids), **blocking}
    results["cosine"] = {"threshold": cut, "valid_f1": valid_f1, "test_precision": p, "test_recall": r, "test_f1": f1}
    results["cosine"]["seconds"] = time.perf_counter() - t0
    print(f"records: {len(left_ids)} Abt x {len(right_ids)} Buy; pairs {results['pairs']}")
    print(
        "blocking (pretrained MiniLM cosine, Abt -> all Buy): " + "  ".join(f"{k} {v:.3f}" for k, v in blocking.items())
    )

    # ---- fine-tuned cross-encoder
    if not args.skip_matcher:
        train = triples("train")
        if args.max_train and args.max_train < len(train):
            keep = np.random.default_rng(0).choice(len(train), args.max_train, replace=False)
            train = [train[i] for i in sorted(keep)]
        t0 = time.perf_counter()
        matcher = PairMatcher(MatcherConfig(epochs=args.epochs, max_length=args.max_length))
        matcher.fit(train, triples("valid"))
        t_fit = time.perf_counter() - t0
        test = triples("test")
        proba = matcher.predict_proba([(a, b) for a, b, _ in test])
        p2, r2, f12 = f1_at(proba, y["test"], matcher.threshold)
        results["matcher"] = {
            "train_pairs": len(train),
            "epochs": args.epochs,
            "max_length": args.max_length,
            "threshold": matcher.threshold,
            "valid_f1": max(h["valid_f1"] for h in matcher.history),
            "test_precision": p2,
            "test_recall": r2,
            "test_f1": f12,
            "fit_seconds": t_fit,
            "history": matcher.history,
        }

    print()
    print(f"{'method':38} | {'valid F1':>8} | {'test P':>6} | {'test R':>6} | {'test F1':>7} | {'time s':>6}")
    c = results["cosine"]
    print(
        f"{'cosine, pretrained MiniLM':38} | {c['valid_f1']:8.4f} | {c['test_precision']:6.4f} | "
        f"{c['test_recall']:6.4f} | {c['test_f1']:7.4f} | {c['seconds']:6.0f}"
    )
    if "matcher" in results:
        m = results["matcher"]
        name = f"PairMatcher MiniLM, {m['train_pairs']} pairs x {m['epochs']} ep"
        print(
            f"{name:38} | {m['valid_f1']:8.4f} | {m['test_precision']:6.4f} | {m['test_recall']:6.4f} | "
            f"{m['test_f1']:7.4f} | {m['fit_seconds']:6.0f}"
        )
    print(f"{'Ditto (paper, RoBERTa + optimisations)':38} | {'':>8} | {'':>6} | {'':>6} | {89.33 / 100:7.4f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
