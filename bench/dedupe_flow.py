"""Dedupe through the product's own commands on Ditto's benchmarks: what a user gets from `enrich`, end to end.

Per benchmark (Abt-Buy; WDC computers / cameras / shoes / watches with their *small* training sets), in a fresh
warehouse and MLflow store under ``data/bench/dedupe_flow/``, each step a CLI subprocess, timed:

1. ``enrich import ditto <data> --benchmark B`` (the benchmark's records and labelled pairs);
2. ``enrich train matcher --benchmark ditto/B --train-split S --valid-split V --supcon-epochs 4`` (trees on pair
   features, with the cosine of a SupCon-tuned tower as one more feature when that scores better on valid; threshold
   chosen on valid; registered as ``pair-matcher@champion``); it scores the test pairs once: ``matcher`` holds the
   matcher's pair F1 on the labelled test pairs, as ``bench/dedupe_quality.py`` scores a matcher;
3. ``enrich dedupe --method matcher --k 20 --matcher champion``: the matcher's SupCon-tuned tower embeds every
   record and gives its top-20 candidates among all records of the benchmark (``--method chars``: char n-gram
   sketches, no model); the matcher decides them; clusters merge where at least half the cross pairs match
   (``--min-linkage 0.5``, the default);
4. the same ``enrich dedupe`` again with nothing changed (every pair score read back, none recomputed).

From the warehouse afterwards: blocking recall of the test matches in the candidate graph (a match counts when
either record lists the other in its top k), and pair precision / recall / F1 on the labelled test pairs of what the
flow wrote: ``duplicates`` (the pair is in the table) and ``clusters`` (the two records share a cluster). Test pairs
decide nothing: the matcher's threshold comes from valid, k and the method are fixed here.

Run: ``.venv/bin/python bench/dedupe_flow.py [--benchmarks Abt-Buy wdc/computers ...] [--k 20]
[--tower pretrained|none] [--supcon-epochs 4]`` -> ``bench/results/dedupe_flow.json`` (benchmarks merged in).
About 3 min per benchmark on 2 cores without SupCon, 6-12 min with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("ENRICH_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA = REPO / "data" / "bench" / "dedupe_flow"
RESULTS = REPO / "bench" / "results" / "dedupe_flow.json"
BENCHMARKS = ("Abt-Buy", "wdc/computers", "wdc/cameras", "wdc/shoes", "wdc/watches")
SPLITS = {"Abt-Buy": ("train", "valid", "test")} | {b: ("train_small", "valid_small", "test") for b in BENCHMARKS[1:]}
ENRICH = str(Path(sys.executable).parent / "enrich")


def run(args: list[str], env: dict[str, str]) -> tuple[dict, float]:
    """One `enrich` command; (its JSON summary, wall seconds)."""
    started = time.perf_counter()
    out = subprocess.run([ENRICH, *args], env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(
            f"enrich {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
        )
    text = out.stdout
    summary, _ = json.JSONDecoder().raw_decode(text[text.index("{") :]) if "{" in text else ({}, 0)
    return summary, seconds


def pair_scores(pairs: list[dict], predicted) -> dict[str, float]:
    tp = sum(1 for p in pairs if p["label"] and predicted(p["left_id"], p["right_id"]))
    fp = sum(1 for p in pairs if not p["label"] and predicted(p["left_id"], p["right_id"]))
    pos = sum(p["label"] for p in pairs)
    precision, recall = tp / max(tp + fp, 1), tp / max(pos, 1)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-12)}


def flow_quality(wh_root: Path, k: int) -> dict:
    """Blocking recall of the candidate graph and pair P/R/F1 of ``duplicates`` / ``clusters`` on the test pairs."""
    from warehouse.tables import Warehouse

    wh = Warehouse(str(wh_root))
    test = wh.sql("SELECT left_id, right_id, label FROM pairs WHERE split = 'test'").to_pylist()
    matches = [p for p in test if p["label"]]
    graph = {
        r["product_id"]: r["neighbors"] for r in wh.read("knn_graph", columns=["product_id", "neighbors"]).to_pylist()
    }
    out = {}
    for depth in sorted({5, 10, k}):
        hit = sum(1 for p in matches if p["right_id"] in graph[p["left_id"]][:depth]
                  or p["left_id"] in graph[p["right_id"]][:depth])  # fmt: skip
        out[f"blocking_recall@{depth}"] = hit / len(matches)
    dup = {(r["a"], r["b"]) for r in wh.read("duplicates", columns=["a", "b"]).to_pylist()}
    cluster = {r["product_id"]: r["cluster_id"] for r in wh.read("clusters").to_pylist()}
    out["duplicates"] = pair_scores(test, lambda a, b: (min(a, b), max(a, b)) in dup)
    out["clusters"] = pair_scores(test, lambda a, b: cluster[a] == cluster[b])
    out["duplicate_pairs"], out["records"] = len(dup), len(cluster)
    return out


def run_benchmark(name: str, args: argparse.Namespace) -> dict:
    root = DATA / name.replace("/", "_")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = dict(os.environ, PREFECT_HOME=str(DATA / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", PREFECT_LOGGING_LEVEL="WARNING",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlruns/mlflow.db",
               ENRICH_WAREHOUSE_ROOT=str(root / "wh"))  # fmt: skip
    (root / "mlruns").mkdir()
    train, valid, test = SPLITS[name]
    res: dict = {"benchmark": name, "splits": {"train": train, "valid": valid, "test": test}, "k": args.k,
                 "method": args.method, "tower": args.tower, "supcon_epochs": args.supcon_epochs}  # fmt: skip
    res["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    _, res["import_seconds"] = run(["import", "ditto", str(SHARED / "ditto"), "--benchmark", name], env)
    fit, res["train_seconds"] = run(["train", "matcher", "--benchmark", f"ditto/{name}", "--train-split", train,
                                     "--valid-split", valid, "--test-split", test, "--tower", args.tower,
                                     "--supcon-epochs", str(args.supcon_epochs)],
                                    env)  # fmt: skip
    res["matcher"] = {k: v for k, v in fit.items() if k not in ("run_id", "source")}
    cmd = ["dedupe", "--method", args.method, "--k", str(args.k), "--matcher", "champion"]
    first, res["dedupe_seconds"] = run(cmd, env)
    res["dedupe"] = {k: first.get(k) for k in ("products", "pairs_scored", "duplicate_pairs", "clusters",
                                              "largest_cluster", "seconds")}  # fmt: skip
    again, res["rerun_seconds"] = run(cmd, env)
    res["rerun"] = {k: again.get(k) for k in ("pairs_scored", "pairs_reused", "seconds")}
    res |= flow_quality(root / "wh", args.k)
    print(f"[{name}] matcher test F1 {fit.get('test_pair_f1')}; flow: blocking R@{args.k} "
          f"{res[f'blocking_recall@{args.k}']:.3f}, duplicates F1 {res['duplicates']['f1']:.3f}, clusters F1 "
          f"{res['clusters']['f1']:.3f}; train {res['train_seconds']:.0f}s dedupe {res['dedupe_seconds']:.0f}s "
          f"rerun {res['rerun_seconds']:.0f}s", flush=True)  # fmt: skip
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    ap.add_argument("--k", type=int, default=20, help="candidates per record")
    ap.add_argument(
        "--method",
        default="matcher",
        choices=("matcher", "chars", "text"),
        help="the blocking embedder: the matcher's SupCon tower, char n-gram sketches or MiniLM",
    )
    ap.add_argument("--tower", default="pretrained", choices=("pretrained", "none"))
    ap.add_argument("--supcon-epochs", type=int, default=4, help="enrich train matcher --supcon-epochs (0: none)")
    args = ap.parse_args()
    if not (SHARED / "ditto").is_dir():
        sys.exit(f"skipped: {SHARED / 'ditto'} is absent (set ENRICH_SHARED_DATA to the shared data folder)")
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = old.get("benchmarks", {})
    for name in args.benchmarks:
        results[name] = run_benchmark(name, args)
    out = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "load_average": os.getloadavg(),
           "benchmarks": results}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'benchmark':<15} {'matcher F1':>10} {'R@k':>6} {'dup P':>6} {'dup R':>6} {'dup F1':>6} {'clu F1':>6}")
    for name, r in results.items():
        recall = r[f"blocking_recall@{r['k']}"]
        print(f"{name:<15} {r['matcher']['test_pair_f1']:>10.4f} {recall:>6.3f} "
              f"{r['duplicates']['precision']:>6.3f} {r['duplicates']['recall']:>6.3f} {r['duplicates']['f1']:>6.3f} "
              f"{r['clusters']['f1']:>6.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
