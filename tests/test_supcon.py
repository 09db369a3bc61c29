"""SupCon fine-tuning (features/supcon.py): clusters from pairs, batches, the loss, and a tiny-tower training run."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from features.matcher import FEATURES, PairFeatures
from features.supcon import SupConConfig, SupConTuner, cluster_batches, clusters_from_pairs, supcon_loss
from features.towers import TextTowerConfig


def test_clusters_are_connected_components_of_positive_pairs():
    pairs = [("a", "b", 1), ("b", "c", 1), ("c", "d", 0), ("e", "f", 1), ("x", "a", 0)]
    cluster = clusters_from_pairs(["a", "b", "c", "d", "e", "f", "g"], pairs)
    assert cluster["a"] == cluster["b"] == cluster["c"]  # transitive through b
    assert cluster["e"] == cluster["f"] != cluster["a"]
    singles = [cluster[k] for k in ("d", "g", "x")]  # a negative pair links nothing; x came only from a pair
    assert len(set(singles)) == 3 and not set(singles) & {cluster["a"], cluster["e"]}
    assert sorted(set(cluster.values())) == list(range(5))


def test_cluster_batches_keep_clusters_together_and_pull_in_hard_negatives():
    labels = [0, 0, 0, 0, 0, 1, 1] + list(range(2, 30))  # a 5-member cluster, a pair, 28 singletons
    negatives = {5: [30], 30: [5]}  # record 5's labelled non-match is record 30 (a singleton)
    batches = cluster_batches(labels, 8, np.random.default_rng(0), per_cluster=4, negatives=negatives)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) and all(len(b) <= 8 for b in batches)
    assert sum(i < 5 for i in seen) == 4  # the 5-member cluster contributes per_cluster members, all in one batch
    assert len({next(k for k, b in enumerate(batches) if i in b) for i in seen if i < 5}) == 1
    assert set(range(5, len(labels))) <= set(seen)  # every other cluster is visited
    with_pair = next(b for b in batches if 5 in b)
    assert 6 in with_pair and 30 in with_pair  # cluster-mate and hard negative in the same batch


def test_supcon_loss_prefers_clustered_embeddings_and_handles_no_positives():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(6, 16), dim=-1)
    labels = torch.arange(6).repeat_interleave(3)  # (18,)
    z = F.normalize(centers[labels] + 0.05 * torch.randn(18, 16), dim=-1)
    clustered = supcon_loss(z, labels)
    shuffled = supcon_loss(z, labels[torch.randperm(18, generator=torch.Generator().manual_seed(1))])
    assert clustered < 0.5 * shuffled
    lone = supcon_loss(z.clone().requires_grad_(), torch.arange(18))  # nobody has a positive
    assert float(lone.detach()) == 0.0
    lone.backward()  # still part of the graph
    # gradient descent on free vectors lowers it
    w = torch.randn(18, 16, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    first = float(supcon_loss(F.normalize(w, dim=-1), labels).detach())
    for _ in range(30):
        loss = supcon_loss(F.normalize(w, dim=-1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def _toy(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Two listings per product sharing only a random model code; each right listing copies the filler words of the
    NEXT product's left listing, so an untrained tower pairs it with the wrong product (a hard negative)."""
    rng = np.random.default_rng(seed)
    filler = ["black", "new", "kit", "pro", "edition", "pack", "series", "camera", "laptop", "drive", "case", "usb"]
    codes = ["".join(rng.choice(list("bdfhkmnprstvxz"), 2)) + str(rng.integers(10, 99)) for _ in range(n)]
    words = [" ".join(rng.choice(filler, 6)) for _ in range(n)]
    left = [f"COL title VAL {codes[i]} {words[i]}" for i in range(n)]
    right = [f"COL title VAL {words[(i + 1) % n]} {codes[i]}" for i in range(n)]
    return left, right


def _recall_at_1(tuner: SupConTuner, left: list[str], right: list[str]) -> float:
    a, b = tuner.embed(left), tuner.embed(right)
    return float(((a @ b.T).argmax(1) == np.arange(len(left))).mean())


def test_tiny_tower_fine_tuning_raises_recall_of_known_matches():
    left, right = _toy(16, 0)
    texts = left + right
    pairs = [(f"l{i}", f"r{i}", 1) for i in range(16)] + [(f"l{i}", f"r{(i + 1) % 16}", 0) for i in range(16)]
    ids = [f"l{i}" for i in range(16)] + [f"r{i}" for i in range(16)]
    cluster = clusters_from_pairs(ids, pairs)
    index = {k: i for i, k in enumerate(ids)}
    negatives: dict[int, list[int]] = {}
    for a, b, y in pairs:
        if not y:
            negatives.setdefault(index[a], []).append(index[b])
    cfg = SupConConfig(
        text=TextTowerConfig(tiny=True), max_length=16, epochs=12, batch_size=16, lr=3e-3, warmup=0.0, seed=0
    )
    tuner = SupConTuner(cfg)
    before = _recall_at_1(tuner, left, right)
    result = tuner.fit(
        texts,
        [cluster[k] for k in ids],
        negatives=negatives,
        select=lambda t: _recall_at_1(t, left, right),
        log=None,
    )
    after = _recall_at_1(tuner, left, right)
    assert after >= before + 0.3, (before, after)
    assert after == result.best_score and result.best_epoch >= 0
    assert [h["epoch"] for h in result.history] == list(range(-1, 12))
    losses = [h["loss"] for h in result.history[1:]]
    assert losses[-1] < losses[0]


def test_fit_keeps_the_starting_weights_when_no_epoch_scores_higher():
    cfg = SupConConfig(text=TextTowerConfig(tiny=True), max_length=8, epochs=2, batch_size=8, lr=1e-2)
    tuner = SupConTuner(cfg)
    start = {k: v.clone() for k, v in tuner.state_dict().items()}
    scores = iter([1.0, 0.0, 0.0])  # the untouched tower scores best
    left, right = _toy(4, 1)
    result = tuner.fit(left + right, [0, 1, 2, 3] * 2, select=lambda t: next(scores), log=None)
    assert result.best_epoch == -1
    assert all(torch.equal(start[k], v) for k, v in tuner.state_dict().items())


def test_pair_features_take_the_supcon_cosine_when_given():
    a = {"title": "sony kdl-40v4100 tv", "description": None, "specs": []}
    b = {"title": "bravia KDL40V4100", "description": None, "specs": []}
    col = FEATURES.index("supcon_cosine")
    assert np.isnan(PairFeatures().fit([a, b])([(a, b)])[0, col])
    calls = []

    def supcon(texts):
        calls.append(len(texts))
        return np.tile(np.array([[0.6, 0.8]], np.float32), (len(texts), 1))

    feats = PairFeatures(supcon=supcon).fit([a, b])
    assert feats([(a, b)])[0, col] == np.float32(1.0)
    feats([(a, b), (b, a)])
    assert calls == [1, 1]  # each record text embedded once (left side, right side), then cached


def _toy_rows(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    left, right = _toy(n, seed)

    def row(pid: str, text: str) -> dict:
        return {"product_id": pid, "title": text.removeprefix("COL title VAL "), "description": "", "specs": []}

    return [row(f"l{i}", t) for i, t in enumerate(left)], [row(f"r{i}", t) for i, t in enumerate(right)]


def _encoder_recall_at_1(model, left: list[dict], right: list[dict]) -> float:
    from features.encoder import encode_products

    a, b = encode_products(model, left), encode_products(model, right)
    return float(((a @ b.T).argmax(1) == np.arange(len(left))).mean())


def test_encoder_text_skip_needs_matching_widths():
    from dataclasses import replace

    import pytest

    from features.encoder import ProductEncoder, tiny

    with pytest.raises(ValueError, match="out_dim"):
        ProductEncoder(replace(tiny(), out_dim=16, text_skip=0.5))
    with pytest.raises(ValueError, match="text_skip"):
        replace(tiny(), text_skip=1.5)


def test_encoder_supcon_reaches_the_product_vector_through_the_text_skip():
    from dataclasses import replace

    from features.encoder import ProductEncoder, tiny
    from features.encoder_train import EncoderTrainConfig, train_encoder

    left, right = _toy_rows(16, 0)
    pairs = [(left[i], right[i], 1) for i in range(16)] + [(left[i], right[(i + 1) % 16], 0) for i in range(16)]
    arch = replace(tiny(), text=TextTowerConfig(tiny=True, max_length=16), text_skip=0.8)
    recall, metrics = {}, {}
    for supcon_epochs in (0, 12):
        torch.manual_seed(0)
        model = ProductEncoder(arch)
        cfg = EncoderTrainConfig(epochs=1, batch_size=16, tower_lr=3e-3, patience=0, supcon_epochs=supcon_epochs)
        result = train_encoder(model, left + right, left[:4] + right[:4], cfg, pairs=pairs)
        recall[supcon_epochs], metrics[supcon_epochs] = _encoder_recall_at_1(model, left, right), result.history[-1]
    assert "train_supcon" in metrics[12] and "train_supcon" not in metrics[0]
    assert recall[12] >= recall[0] + 0.25, recall


def test_train_encoder_flow_reads_labelled_train_pairs_between_training_rows(tmp_path):
    import pyarrow as pa
    import pytest

    from flows.train_encoder import CatalogSplit, load_train_pairs
    from warehouse.tables import Warehouse

    wh = Warehouse(str(tmp_path / "wh"))
    data = CatalogSplit([{"product_id": p, "title": p} for p in ("a", "b", "c")], [{"product_id": "v"}], 0)
    with pytest.raises(LookupError, match="no labelled pairs"):
        load_train_pairs.fn(wh, data)
    found = [("train", "a", "b", 1), ("train", "a", "c", 0), ("train", "a", "v", 1), ("valid", "b", "c", 1)]
    wh.append("pairs", pa.Table.from_pylist([
        {"benchmark": "toy", "split": s, "line": i, "left_id": a, "right_id": b, "label": y}
        for i, (s, a, b, y) in enumerate(found)
    ]))  # fmt: skip
    pairs = load_train_pairs.fn(wh, data)  # the validation row "v" and the valid split stay out
    assert [(a["product_id"], b["product_id"], y) for a, b, y in pairs] == [("a", "b", 1), ("a", "c", 0)]
