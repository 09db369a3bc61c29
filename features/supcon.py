"""Supervised contrastive fine-tuning of the text tower on labelled match pairs, after R-SupCon (Peeters & Bizer,
"Supervised Contrastive Learning for Product Matching", WWW 2022) with the SupCon loss of Khosla et al. (NeurIPS 2020).

Labelled pairs become record-level labels: the connected components of the positive pairs are clusters (one
product each), every other record is a cluster of its own (``clusters_from_pairs``). Batches of records are drawn so
that most hold several members of the same cluster and the labelled non-matches of those members (hard negatives):
``cluster_batches`` visits each cluster once per epoch, takes up to ``per_cluster`` of its members, then follows the
negative pairs out of the batch's records to fill it. A record alone in the batch with its label gets a second,
identical view when ``singleton_views`` is 2 (dropout makes the two views differ, as in SimCSE), so it is an anchor
too instead of only a negative. The tower's mean-pooled, L2-normalised states are trained with the SupCon loss
(``supcon_loss``): every other member of an anchor's cluster in the batch is a positive, all the rest negatives.

``SupConTuner.fit`` runs the epochs (AdamW, linear warmup then decay) and keeps the weights of the epoch that a
caller-given ``select`` scores highest on held-out data (valid blocking recall, valid pair F1: never test);
``SupConTuner.embed`` gives the fine-tuned record vectors for blocking and as a pair feature.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from features.towers import TextTower, TextTowerConfig, mean_pool

Record = str | tuple[str, str]

# --------------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SupConConfig:
    """SupCon fine-tuning of a text tower.

    Attributes:
        text: the tower to fine-tune (all-MiniLM-L6-v2 by default).
        max_length: tokens per record.
        epochs, batch_size, lr, weight_decay, warmup: AdamW with linear warmup then linear decay.
        temperature: τ of the SupCon loss (0.07 in Khosla et al. and R-SupCon).
        per_cluster: most members of one cluster put in a batch.
        singleton_views: 1, or 2 to add a duplicate view of each record that has no cluster-mate in its batch.
        hard_negatives: fill batches with the labelled non-match partners of the records already in them.
        seed: shuffling and initialisation of the dropout masks.
    """

    text: TextTowerConfig = field(default_factory=lambda: TextTowerConfig(max_length=64))
    max_length: int = 64
    epochs: int = 3
    batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    temperature: float = 0.07
    per_cluster: int = 4
    singleton_views: int = 2
    hard_negatives: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.singleton_views not in (1, 2):
            raise ValueError(f"singleton_views must be 1 or 2, got {self.singleton_views}")
        if self.per_cluster < 2 or self.batch_size < 2 * self.per_cluster:
            raise ValueError(
                f"per_cluster ({self.per_cluster}) must be >= 2 and batch_size ({self.batch_size}) >= 2 * per_cluster"
            )


# ------------------------------------------------------------------------------------------------- labels, batches


def clusters_from_pairs(
    ids: Iterable[Hashable], pairs: Iterable[tuple[Hashable, Hashable, int]]
) -> dict[Hashable, int]:
    """Cluster id per record: connected components of the positive pairs (union-find); any other record alone.

    Args:
        ids: every record to label (records of positive pairs missing here are added).
        pairs: (id_a, id_b, label) triples; only label 1 links records, label 0 says nothing about clusters.

    Returns:
        record id -> cluster number in 0..C-1, numbered in order of first appearance (deterministic).
    """
    parent: dict[Hashable, Hashable] = {i: i for i in ids}

    def find(x: Hashable) -> Hashable:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, label in pairs:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        if int(label) == 1:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra
    number: dict[Hashable, int] = {}
    return {i: number.setdefault(find(i), len(number)) for i in parent}


def records_from_pairs(
    pairs: Iterable[tuple[Mapping, Mapping, int]],
) -> tuple[list[Mapping], list[int], dict[int, list[int]]]:
    """Labelled (row, row, label) pairs as SupCon training data: the distinct rows by ``product_id`` (sorted by
    it), their cluster numbers (``clusters_from_pairs``), and each record's labelled non-match partners by index
    (``negatives`` of ``SupConTuner.fit``)."""
    pairs = list(pairs)
    rows: dict[str, Mapping] = {}
    for a, b, _ in pairs:
        for r in (a, b):
            if r.get("product_id") is None:
                raise ValueError(f"SupCon fine-tuning needs product_id on every paired row; got {dict(r)!r:.120}")
            rows[str(r["product_id"])] = r
    ids = sorted(rows)
    cluster = clusters_from_pairs(ids, ((str(a["product_id"]), str(b["product_id"]), y) for a, b, y in pairs))
    index = {pid: i for i, pid in enumerate(ids)}
    negatives: dict[int, list[int]] = defaultdict(list)
    for a, b, y in pairs:
        if not int(y):
            i, j = index[str(a["product_id"])], index[str(b["product_id"])]
            negatives[i].append(j)
            negatives[j].append(i)
    return [rows[i] for i in ids], [cluster[i] for i in ids], dict(negatives)


def cluster_batches(
    labels: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    *,
    per_cluster: int = 4,
    negatives: dict[int, Sequence[int]] | None = None,
) -> list[list[int]]:
    """One epoch of record-index batches, each cluster visited once.

    Clusters are taken in random order, up to ``per_cluster`` random members each; after each cluster the batch is
    filled first with the labelled non-match partners (``negatives``: record index -> record indices) of the records
    it holds, whose clusters are then visited there, so a product meets its hard negatives in the same batch.

    Args:
        labels: cluster number per record (N,).
        batch_size: records per batch (the last one may be smaller).
        rng: the shuffling.
        per_cluster: most members of a cluster in one batch.
        negatives: hard-negative partners per record index.

    Returns:
        lists of record indices.
    """
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(labels):
        members[int(c)].append(i)
    order = [int(c) for c in rng.permutation(sorted(members))]
    visited: set[int] = set()
    batches: list[list[int]] = []
    batch: list[int] = []

    def take(c: int) -> None:
        nonlocal batch
        group = members[c]
        pick = group if len(group) <= per_cluster else [group[j] for j in rng.choice(len(group), per_cluster, False)]
        if len(batch) + len(pick) > batch_size:
            batches.append(batch)
            batch = []
        batch.extend(pick)
        visited.add(c)

    for c in order:
        if c in visited:
            continue
        take(c)
        frontier = list(batch)
        while negatives and frontier and len(batch) < batch_size:
            i = frontier.pop(0)
            for j in negatives.get(i, ()):
                cj = int(labels[j])
                if cj not in visited and len(batch) + min(len(members[cj]), per_cluster) <= batch_size:
                    take(cj)
                    frontier.extend(batch[-min(len(members[cj]), per_cluster) :])
        if len(batch) >= batch_size:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    return batches


# ------------------------------------------------------------------------------------------------------------- loss


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """SupCon loss (Khosla et al. 2020, L_out) of normalised vectors z (B, D) with cluster labels (B,).

    For each anchor i with at least one positive (another row with its label)::

        L_i = -1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )

    averaged over those anchors; a batch without any positive gives 0 (connected to z, so backward still works).
    """
    b = z.shape[0]
    logits = z @ z.T / temperature  # (B, B)
    self_mask = torch.eye(b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (B, B), -inf on the diagonal
    positive = (labels[:, None] == labels[None, :]) & ~self_mask  # (B, B)
    count = positive.sum(1)  # (B,)
    anchors = count > 0
    if not anchors.any():
        return z.sum() * 0.0
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1)[anchors] / count[anchors]
    return per_anchor.mean()


# ------------------------------------------------------------------------------------------------------------ tuner


@dataclass
class SupConResult:
    """What ``SupConTuner.fit`` did: per-epoch history, the epoch kept (by ``select``) and the seconds spent."""

    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    seconds: float


class SupConTuner(nn.Module):
    """The text tower fine-tuned with SupCon; record vectors are its mean-pooled, L2-normalised states."""

    def __init__(self, cfg: SupConConfig | None = None, tower: TextTower | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SupConConfig()
        torch.manual_seed(self.cfg.seed)
        self.tower = tower if tower is not None else TextTower(self.cfg.text)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Normalised record vectors (B, D)."""
        states = self.tower(input_ids, attention_mask)  # (B, T, D)
        return F.normalize(mean_pool(states, attention_mask), dim=-1)

    def _encode(self, texts: Sequence[Record]) -> dict[str, Tensor]:
        device = next(self.parameters()).device
        pairs = bool(texts) and not isinstance(texts[0], str)  # (first, second) segments, e.g. title, description
        enc = self.tower.tokenizer(
            [t[0] for t in texts] if pairs else list(texts),
            [t[1] for t in texts] if pairs else None,
            padding=True,
            truncation="longest_first",
            max_length=self.cfg.max_length,
            return_tensors="pt",
        )
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def embed(self, texts: Sequence[Record], batch_size: int = 128) -> np.ndarray:
        """(N, D) float32 normalised vectors; texts are batched by length so little padding is computed."""
        was_training = self.training
        self.eval()
        out = np.zeros((len(texts), self.tower.hidden_size), dtype=np.float32)
        order = np.argsort([len(t) if isinstance(t, str) else sum(map(len, t)) for t in texts], kind="stable")
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            out[idx] = self(**self._encode([texts[j] for j in idx])).float().cpu().numpy()
        self.train(was_training)
        return out

    def fit(
        self,
        texts: Sequence[Record],
        labels: Sequence[int],
        *,
        negatives: dict[int, Sequence[int]] | None = None,
        select: Callable[[SupConTuner], float | dict[str, float]] | None = None,
        log: Callable[[str], None] | None = print,
    ) -> SupConResult:
        """Fine-tune on records ``texts`` with cluster ``labels``; keep the epoch ``select`` scores highest.

        Args:
            texts: the training records, serialized: strings, or (first, second) segment pairs that the tokenizer
                joins with [SEP] (the product encoder's title, description).
            labels: cluster number per record (``clusters_from_pairs``).
            negatives: labelled non-match partners per record index, sampled into the same batches.
            select: scores the tuner on held-out data after each epoch (a float, or a dict whose ``"score"`` is
                used and the rest logged); None keeps the last epoch. Epoch -1 (before training) is scored too, so a
                fine-tuning that only hurts leaves the tower as it was.
            log: progress lines.
        """
        cfg = self.cfg
        if len(texts) != len(labels):
            raise ValueError(f"texts ({len(texts)}) and labels ({len(labels)}) must have the same length")
        started = time.perf_counter()
        rng = np.random.default_rng(cfg.seed)
        labels_arr = np.asarray(labels, dtype=np.int64)
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the text tower is frozen: build it with TextTowerConfig(trainable=True) to fine-tune it")
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        probe = cluster_batches(
            labels_arr,
            cfg.batch_size,
            np.random.default_rng(cfg.seed),
            per_cluster=cfg.per_cluster,
            negatives=negatives,
        )
        steps = max(1, cfg.epochs * len(probe))  # the packing differs a little between epochs; close enough
        warm = max(1, int(cfg.warmup * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
        )

        def score() -> tuple[float, dict[str, float]]:
            if select is None:
                return 0.0, {}
            got = select(self)
            return (float(got["score"]), dict(got)) if isinstance(got, dict) else (float(got), {"score": float(got)})

        history: list[dict[str, float]] = []
        best, extra = score()
        best_epoch = -1
        best_state = {k: v.detach().clone() for k, v in self.state_dict().items()} if select is not None else None
        history.append({"epoch": -1, "loss": float("nan"), "seconds": 0.0} | extra)
        for epoch in range(cfg.epochs):
            self.train()
            t0, total, n = time.perf_counter(), 0.0, 0
            batches = cluster_batches(labels_arr, cfg.batch_size, rng, per_cluster=cfg.per_cluster, negatives=negatives)
            for idx in batches:
                batch_labels = labels_arr[idx]
                if cfg.singleton_views == 2:  # second view of each record without a cluster-mate in the batch
                    _, inverse, counts = np.unique(batch_labels, return_inverse=True, return_counts=True)
                    alone = [i for i, k in zip(idx, counts[inverse], strict=True) if k == 1]
                    idx = list(idx) + alone
                    batch_labels = labels_arr[idx]
                z = self(**self._encode([texts[j] for j in idx]))  # (B, D)
                loss = supcon_loss(z, torch.as_tensor(batch_labels, device=z.device), cfg.temperature)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                total, n = total + float(loss.detach()), n + 1
            got, extra = score()
            row = {"epoch": epoch, "loss": total / max(n, 1), "seconds": time.perf_counter() - t0} | extra
            history.append(row)
            if log:
                log(f"supcon epoch {epoch}: loss {row['loss']:.4f} select {got:.4f} ({row['seconds']:.0f}s)")
            if select is not None and got > best:
                best, best_epoch = got, epoch
                best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            elif select is None:
                best, best_epoch = got, epoch
        if best_state is not None and best_epoch != cfg.epochs - 1:
            self.load_state_dict(best_state)
            if log and best_epoch == -1:
                log("supcon: no epoch beat the starting tower on select; its weights were kept")
        self.eval()
        return SupConResult(history, best_epoch, best, time.perf_counter() - started)
