"""Blocking variants on the WDC valid pairs: can a fusion of candidate lists lift recall@20 above SupCon alone?

Reads the SupCon record vectors that ``bench/dedupe_quality.py --cache DIR`` saves (``DIR/wdc_<set>_supcon.npz``),
so it fine-tunes nothing itself. Every number is on the **valid** matches of the set (the split that chooses
methods). The test pairs are read only for their record ids (the candidate pool is every record of every split, as
in ``bench/dedupe_quality.py``); their labels are never used here. Candidates per record: 20 (the goal's k). A
match counts when either record lists the other, as in ``bench/dedupe_quality.py``. Variants:

- ``supcon@k`` / ``tfidf@k``: the SupCon cosine or the char (3-5)-gram TF-IDF cosine alone;
- ``union sA+tB``: the top A by SupCon, then the top B by TF-IDF (A + B = 20; filled from TF-IDF on overlap);
- ``rrf c``: reciprocal-rank fusion of the two lists (``1 / (c + rank)`` summed);
- ``codes c``: up to ``c`` records sharing a rare model-number code (``features.matcher.code_tokens``, in at most 50
  records, ranked by summed IDF, then SupCon), then SupCon to 20;
- ``pool P∪P``: the ceiling of any reranker of the SupCon top-P ∪ TF-IDF top-P (is the match in the pool at all).

Run: ``.venv/bin/python bench/dedupe_quality.py --benchmarks wdc/computers wdc/shoes --epochs 0 --no-ablations
--cache /tmp/dq`` (about 8-14 min per set on 2 cores), then ``.venv/bin/python bench/blocking_variants.py --cache
/tmp/dq --benchmarks wdc/computers wdc/shoes``; prints a table, writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.dedupe_quality import DATA, SPLITS  # noqa: E402

K = 20


def variants(name: str, cache: Path) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from features.matcher import code_tokens, serialize
    from warehouse.importers.ditto import iter_pairs, iter_rows

    s_train, s_valid, s_test = SPLITS[name]
    rows = {r["product_id"]: r for r in iter_rows(DATA, benchmark=name)}
    pairs = {s: list(iter_pairs(DATA, s, benchmark=name)) for s in (s_train, s_valid, s_test)}
    # the same records, in the same order, as bench/dedupe_quality.py (every record of every split's pairs)
    ids = sorted({p[side] for v in pairs.values() for p in v for side in ("left_id", "right_id")})
    saved = cache / f"{name.replace('/', '_')}_supcon.npz"
    if not saved.exists():
        raise SystemExit(f"{saved} is missing: run bench/dedupe_quality.py --benchmarks {name} --cache {cache} first")
    with np.load(saved) as z:
        if z["ids"].tolist() != ids:
            raise SystemExit(f"{saved} holds other records than {name}'s pairs: re-run dedupe_quality with --cache")
        vectors = z["vectors"]
    texts = [serialize(rows[i]) for i in ids]
    pos = {p: i for i, p in enumerate(ids)}
    sc = vectors @ vectors.T
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True).fit_transform(texts)
    tf = (char @ char.T).toarray().astype(np.float32)
    for m in (sc, tf):
        np.fill_diagonal(m, -np.inf)
    matches = [(pos[p["left_id"]], pos[p["right_id"]]) for p in pairs[s_valid] if p["label"] == 1]
    depth = 200
    lists = {key: np.argsort(-m, axis=1, kind="stable")[:, :depth] for key, m in (("sc", sc), ("tf", tf))}
    n = len(ids)

    def recall(cand: list[set]) -> float:
        return float(np.mean([(b in cand[a]) or (a in cand[b]) for a, b in matches]))

    def fill(first: list, then: np.ndarray) -> set:
        out = list(dict.fromkeys(first))
        for j in then:
            if len(out) >= K:
                break
            if j not in out:
                out.append(j)
        return set(out)

    out = {"records": n, "valid_matches": len(matches)}
    for k in (20, 50, 100):
        out[f"supcon@{k}"] = recall([set(r[:k]) for r in lists["sc"]])
        out[f"tfidf@{k}"] = recall([set(r[:k]) for r in lists["tf"]])
    for a in (18, 15, 12, 10):
        out[f"union s{a}+t{K - a}"] = recall(
            [fill(list(lists["sc"][i][:a]) + list(lists["tf"][i][: K - a]), lists["tf"][i][K - a :]) for i in range(n)]
        )
    for c in (10, 60):
        fused = []
        for i in range(n):
            score: dict[int, float] = defaultdict(float)
            for name_ in ("sc", "tf"):
                for r, j in enumerate(lists[name_][i]):
                    score[j] += 1.0 / (c + r + 1)
            fused.append(set(sorted(score, key=lambda j: -score[j])[:K]))
        out[f"rrf c{c}"] = recall(fused)
    codes = [code_tokens(t) for t in texts]
    holders: dict[str, set[int]] = defaultdict(set)
    for i, cs in enumerate(codes):
        for c in cs:
            holders[c].add(i)
    idf = {c: float(np.log(n / len(h))) for c, h in holders.items()}
    by_code = []
    for i in range(n):
        score = defaultdict(float)
        for c in codes[i]:
            if len(holders[c]) <= 50:
                for j in holders[c] - {i}:
                    score[j] += idf[c]
        by_code.append(sorted(score, key=lambda j: (-score[j], -sc[i, j])))
    for c in (3, 5):
        out[f"codes {c}"] = recall([fill(by_code[i][:c], lists["sc"][i]) for i in range(n)])
    for p in (50, 100):
        out[f"pool {p}∪{p}"] = recall([set(a[:p]) | set(b[:p]) for a, b in zip(lists["sc"], lists["tf"], strict=True)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True, help="the --cache folder of bench/dedupe_quality.py")
    parser.add_argument("--benchmarks", nargs="+", default=["wdc/computers", "wdc/shoes"], choices=list(SPLITS)[1:])
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (set ENRICH_SHARED_DATA to the folder holding ditto/)")
        return
    results = {b: variants(b, Path(args.cache)) for b in args.benchmarks}
    keys = [k for k in next(iter(results.values())) if k not in ("records", "valid_matches")]
    print("| variant (valid recall) | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.3f}" for r in results.values()) + " |")
    print("| valid matches | " + " | ".join(str(r["valid_matches"]) for r in results.values()) + " |")


if __name__ == "__main__":
    main()
