"""Training loop of the SCALE-style product encoder (Dong et al., CVPR 2022, "M5Product: Self-harmonized
Contrastive Learning for E-commercial Multi-modal Pretraining") in pure PyTorch.

Self-supervised pretraining on canonical catalog rows with every ``encoder_loss`` term (masked text, masked
region/frame features, masked entities, self-harmonized inter-modality contrastive), optionally followed within each
epoch by supervised fine-tuning on labelled match pairs (``pair_contrastive_loss``). AdamW with a lower learning
rate for the pretrained text tower; no weight decay on 1-d tensors.

With labelled pairs and ``supcon_epochs`` > 0, the text tower is first fine-tuned alone with the supervised
contrastive loss on the record clusters the pairs define (``features/supcon.py``, after R-SupCon, Peeters & Bizer
2022), on the same (title, description) input the encoder gives it, then frozen for the rest of training
(``supcon_freeze_tower``) so that pretraining does not wash the learned similarity out. The product vector reaches
that similarity only through ``EncoderConfig.text_skip`` (the ``matching`` preset): the co-transformer's [PRODUCT]
token alone does not keep it (pair F1 0.19 on Abt-Buy without).

Held-out check each epoch, the standard one for self-supervised retrieval encoders: for every modality pair (m, n)
with products having both, each such product's m-vector queries the n-vectors of all validation products, and
Recall@1/5/10 and mAP@10 of finding the same product are averaged over pairs and both directions
(``val_recall_at_k``, ``val_map_at_10``). With labelled duplicate pairs, ``val_dup_recall_at_k`` is the share of
pair members whose duplicate is among the k nearest product vectors. Early stopping and the best checkpoint follow
``val_recall_at_10`` (ties broken by ``val_map_at_10``).

Checkpoint folder: ``best.safetensors`` (the best weights; safetensors only, nothing pickled) and ``config.json``
(``{"model": EncoderConfig, "train": EncoderTrainConfig}``); ``load_encoder_checkpoint`` rebuilds the model.

Under ``torchrun`` (``features.distributed.init``) training is data-parallel: each rank takes its shard of every
epoch's batches (pretraining and pairs), DDP averages the gradients (contrastive negatives stay within each rank's
batch), rank 0 alone computes the held-out metrics (the others take them, so all stop together), writes the
checkpoint folder and calls ``on_epoch``.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from features import distributed
from features.encoder import (
    MODALITIES,
    PAIRS,
    EncoderConfig,
    ProductEncoder,
    collate,
    encoder_loss,
    pair_contrastive_loss,
)
from features.towers import TextTowerConfig

BEST, CONFIG = "best.safetensors", "config.json"
SELECT_METRIC = "val_recall_at_10"
KS = (1, 5, 10)

Features = Mapping[str, Tensor | np.ndarray]
Pair = tuple[Mapping[str, Any], Mapping[str, Any], int]


@dataclass(frozen=True)
class EncoderTrainConfig:
    """One encoder training run; ``dataclasses.asdict(cfg)`` is what gets logged as run parameters.

    Attributes:
        epochs: passes over the training rows.
        batch_size: products (or labelled pairs) per optimizer step, per process under torchrun.
        lr: learning rate of everything but the text tower (table encoder, co-transformer, heads).
        tower_lr: learning rate of the pretrained text tower.
        weight_decay: AdamW decay of weight matrices (biases, norms and 1-d parameters get none).
        seed: seeds torch, numpy, random, the masking and the batch order of epoch e (``seed + e``).
        max_steps: stop after this many optimizer steps in all (tests, smoke runs); None for no limit.
        num_threads: torch intra-op threads while training; None leaves the setting alone.
        checkpoint_dir: where ``best.safetensors`` and ``config.json`` go; None keeps nothing on disk.
        patience: stop after this many epochs without a better ``val_recall_at_10``; 0 never stops early.
        pair_weight: weight of ``pair_contrastive_loss`` when labelled pairs are given.
        supcon_epochs: epochs of SupCon fine-tuning of the text tower on the labelled pairs' clusters before
            pretraining (at ``tower_lr``, the encoder's temperature); 0 skips it.
        supcon_freeze_tower: freeze the text tower after SupCon fine-tuning.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    tower_lr: float = 5e-5
    weight_decay: float = 0.01
    seed: int = 0
    max_steps: int | None = None
    num_threads: int | None = None
    checkpoint_dir: str | None = None
    patience: int = 3
    pair_weight: float = 1.0
    supcon_epochs: int = 0
    supcon_freeze_tower: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(
                f"EncoderTrainConfig needs epochs >= 1 and batch_size >= 2 (contrastive terms need two products), "
                f"got epochs={self.epochs}, batch_size={self.batch_size}"
            )


@dataclass
class EncoderTrainResult:
    """What ``train_encoder`` returns; ``history`` holds one metrics dict per epoch (with its "epoch")."""

    epochs_run: int
    best_epoch: int
    best_metrics: dict[str, float]
    stopped_early: bool
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: str | None = None


# ------------------------------------------------------------------------------------------------------- metrics


def _rank_of_target(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of ``target[i]`` in row i of ``scores`` (Q, G), ties counted against the target."""
    own = scores[np.arange(len(scores)), target][:, None]
    return (scores > own).sum(1) + 1


def _retrieval(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}recall_at_{k}": float((ranks <= k).mean()) for k in KS}
    # one relevant item per query: AP@10 is 1/rank when it is in the top 10
    out[f"{prefix}map_at_10"] = float(np.where(ranks <= 10, 1.0 / ranks, 0.0).mean())
    return out


@torch.no_grad()
def _modality_vectors(
    model: ProductEncoder, rows: Sequence[Mapping], batch_size: int, regions: Features | None, frames: Features | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eval-mode product vectors (N, D), modality vectors (N, 4, D) and presence (N, 4)."""
    device = next(model.parameters()).device
    prod, mod, present = [], [], []
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size], model.tokenizer, model.cfg, regions=regions, frames=frames)
        out = model(batch.to(device))
        prod.append(out.product.float().cpu().numpy())
        mod.append(out.modality.float().cpu().numpy())
        present.append(out.present.cpu().numpy())
    return np.concatenate(prod), np.concatenate(mod), np.concatenate(present)


def retrieval_metrics(
    model: ProductEncoder,
    rows: Sequence[Mapping],
    *,
    val_pairs: Sequence[tuple[str, str]] | None = None,
    regions: Features | None = None,
    frames: Features | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Held-out retrieval: cross-modal Recall@1/5/10 and mAP@10 (``val_*``), per pair (``val_<m>-<n>_*``), and
    duplicate Recall@k by product vector (``val_dup_*``) for the ``val_pairs`` whose ids are both among ``rows``.

    Empty when no modality pair has two products with both (and no usable duplicate pair).
    """
    if len(rows) < 2:
        return {}
    was_training = model.training
    model.eval()
    try:
        prod, mod, present = _modality_vectors(model, rows, batch_size, regions, frames)
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    all_ranks = []
    for m, n in PAIRS:
        both = np.flatnonzero(present[:, m] & present[:, n])
        if len(both) < 2:
            continue
        ranks = []
        for q, g in ((m, n), (n, m)):
            gallery = np.flatnonzero(present[:, g])  # every validation product having modality g
            position = {int(j): i for i, j in enumerate(gallery)}
            scores = mod[both, q] @ mod[gallery, g].T  # (Q, G)
            ranks.append(_rank_of_target(scores, np.array([position[int(j)] for j in both])))
        ranks_mn = np.concatenate(ranks)
        all_ranks.append(ranks_mn)
        out |= _retrieval(ranks_mn, f"val_{MODALITIES[m]}-{MODALITIES[n]}_")
    if all_ranks:
        per_pair = [_retrieval(r, "") for r in all_ranks]  # macro over pairs: each pair counts the same
        out |= {f"val_{k}": float(np.mean([p[k] for p in per_pair])) for k in per_pair[0]}
    index = {str(r.get("product_id")): i for i, r in enumerate(rows)}
    dup = [(index[a], index[b]) for a, b in val_pairs or () if a in index and b in index and a != b]
    if dup:
        sims = prod @ prod.T
        np.fill_diagonal(sims, -np.inf)  # a product is not its own duplicate
        q = np.array([a for a, b in dup] + [b for a, b in dup])
        t = np.array([b for a, b in dup] + [a for a, b in dup])
        ranks = _rank_of_target(sims[q], t)
        out |= {f"val_dup_recall_at_{k}": float((ranks <= k).mean()) for k in KS}
    return out


# ------------------------------------------------------------------------------------------------------- training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: ProductEncoder, cfg: EncoderTrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: the text tower at ``tower_lr``, the rest at ``lr``; no weight decay on 1-d tensors."""
    tower_ids = {id(p) for p in model.text_tower.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
    for p in model.parameters():
        if p.requires_grad:
            groups[id(p) in tower_ids, p.ndim > 1].append(p)
    return [
        {
            "params": params,
            "lr": cfg.tower_lr if tower else cfg.lr,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{'tower' if tower else 'heads'}{'' if decay else '_no_decay'}",
        }
        for (tower, decay), params in sorted(groups.items())
    ]


def save_weights(model: nn.Module, path: str | Path) -> None:
    """The model's weights as safetensors (shared tensors handled), written atomically."""
    from safetensors.torch import save_model

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def _batches(items: Sequence, size: int, rng: random.Random) -> list[list]:
    order = list(range(len(items)))
    rng.shuffle(order)
    out = [[items[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
    if len(out) > 1 and len(out[-1]) < 2:  # a lone product has no in-batch negatives
        out[-2].extend(out.pop())
    return out


def _better(metrics: Mapping[str, float], best: Mapping[str, float] | None) -> bool:
    if best is None:
        return True
    key = (metrics.get(SELECT_METRIC, float("-inf")), metrics.get("val_map_at_10", float("-inf")))
    return key > (best.get(SELECT_METRIC, float("-inf")), best.get("val_map_at_10", float("-inf")))


class _Objective(nn.Module):
    """The encoder and its losses as one module: what DDP wraps (one forward per step, pair steps included)."""

    def __init__(self, model: ProductEncoder, generator: torch.Generator) -> None:
        super().__init__()
        self.model = model
        self.generator = generator

    def forward(self, batch: Any = None, pair: tuple[Any, Any, Tensor] | None = None) -> dict[str, Tensor] | Tensor:
        """``encoder_loss`` terms of a masked ``batch``, or ``pair_contrastive_loss`` of ``pair`` = (a, b, labels)."""
        if pair is None:
            return encoder_loss(self.model(batch, masked=True, generator=self.generator), batch, self.model.cfg)
        a, b, labels = pair
        return pair_contrastive_loss(self.model(a).product, self.model(b).product, labels)


def train_encoder(
    model: ProductEncoder,
    train_rows: Sequence[Mapping],
    val_rows: Sequence[Mapping],
    cfg: EncoderTrainConfig,
    *,
    regions: Features | None = None,
    frames: Features | None = None,
    pairs: Sequence[Pair] | None = None,
    val_pairs: Sequence[tuple[str, str]] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> EncoderTrainResult:
    """Pretrain ``model`` on catalog rows (then fine-tune on ``pairs`` each epoch, when given); keeps the best weights.

    Args:
        model: the encoder to train in place; it ends with the best epoch's weights, in eval mode.
        train_rows, val_rows: canonical catalog rows (product_id, title, description, specs).
        cfg: the run's settings.
        regions, frames: cached visual features by product_id (see ``collate``); absent = no image / no video.
        pairs: labelled match pairs (row_a, row_b, label in {0, 1}) for supervised fine-tuning.
        val_pairs: labelled duplicate pairs (id_a, id_b) for ``val_dup_recall_at_k`` on ``val_rows``.
        on_epoch: called after every epoch with (epoch from 1, metrics): ``train_<term>`` for every loss term
            (epoch means), ``w_<m>-<n>`` for the mean learned pair weights, ``train_pair`` when fine-tuning, and the
            ``val_*`` retrieval metrics (loss terms averaged over ranks under torchrun). Rank 0 only.
    """
    if len(train_rows) < 2:
        raise ValueError(f"train_encoder needs at least 2 training rows, got {len(train_rows)}")
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(model, train_rows, val_rows, cfg, regions, frames, pairs, val_pairs, on_epoch)
    finally:
        torch.set_num_threads(threads)


def supcon_text_tower(model: ProductEncoder, pairs: Sequence[Pair], cfg: EncoderTrainConfig) -> dict[str, float]:
    """SupCon fine-tuning of ``model.text_tower`` on the clusters of labelled ``pairs`` (``features/supcon.py``).

    Records are the pairs' rows by ``product_id``, fed as (title, description), as ``collate`` feeds the tower.
    Returns ``train_supcon`` (the last epoch's mean loss) and ``supcon_seconds``.
    """
    from features.supcon import SupConConfig, SupConTuner, records_from_pairs

    records, labels, negatives = records_from_pairs(pairs)
    text = model.cfg.text
    sc = SupConConfig(text=text, max_length=text.max_length, epochs=cfg.supcon_epochs,
                      batch_size=max(cfg.batch_size, 8), lr=cfg.tower_lr, temperature=model.cfg.temperature,
                      seed=cfg.seed)  # fmt: skip
    tuner = SupConTuner(sc, tower=model.text_tower)
    texts = [(r.get("title") or "", r.get("description") or "") for r in records]
    result = tuner.fit(texts, labels, negatives=negatives, log=None)
    return {"train_supcon": float(result.history[-1]["loss"]), "supcon_seconds": result.seconds}


def _train(model, train_rows, val_rows, cfg, regions, frames, pairs, val_pairs, on_epoch) -> EncoderTrainResult:
    seed_everything(cfg.seed)
    device = next(model.parameters()).device
    ddp = distributed.current()  # rank 0 of 1 outside torchrun
    supcon: dict[str, float] = {}
    if pairs and cfg.supcon_epochs:  # every rank alike; DDP then starts all from rank 0's weights
        supcon = supcon_text_tower(model, pairs, cfg)
        if cfg.supcon_freeze_tower:
            model.text_tower.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # the masking draws
    objective = distributed.wrap(_Objective(model, generator), ddp)  # DDP averages the gradients under torchrun
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt is not None and ddp.is_main:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / CONFIG).write_text(json.dumps({"model": asdict(model.cfg), "train": asdict(cfg)}, indent=1))
    best: dict[str, float] | None = None
    best_epoch, stale, steps, stopped_early = 0, 0, 0, False
    best_state: dict[str, Tensor] | None = None
    history: list[dict[str, float]] = []
    epoch = 0

    def step(loss: Tensor) -> None:
        nonlocal steps
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1

    def out_of_steps() -> bool:
        return cfg.max_steps is not None and steps >= cfg.max_steps

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        rng = random.Random(cfg.seed + epoch)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        row_batches = _batches(train_rows, cfg.batch_size, rng)
        pair_batches = _batches(list(pairs or ()), cfg.batch_size, rng)  # drawn here: the rng order stays as it was
        for rows in distributed.shard(row_batches, ddp):
            if out_of_steps():
                break
            batch = collate(rows, model.tokenizer, model.cfg, regions=regions, frames=frames).to(device)
            terms = objective(batch)
            step(terms["total"])
            for k, v in terms.items():
                name = f"w_{k[2:]}" if k.startswith("w/") else f"train_{k}"
                sums[name] += float(v.detach())
                counts[name] += 1
        for chunk in distributed.shard(pair_batches, ddp):
            if out_of_steps():
                break
            a = collate([p[0] for p in chunk], model.tokenizer, model.cfg, regions=regions, frames=frames)
            b = collate([p[1] for p in chunk], model.tokenizer, model.cfg, regions=regions, frames=frames)
            labels = torch.tensor([int(p[2]) for p in chunk], device=device)
            loss = objective(pair=(a.to(device), b.to(device), labels))
            step(cfg.pair_weight * loss)
            sums["train_pair"] += float(loss.detach())
            counts["train_pair"] += 1
        metrics = distributed.all_reduce_mean({k: sums[k] / counts[k] for k in sums}, ddp)
        # rank 0 scores the held-out rows; the others take its numbers, so every rank decides the same
        held_out = retrieval_metrics(model, val_rows, val_pairs=val_pairs, regions=regions, frames=frames) if (
            ddp.is_main) else None  # fmt: skip
        metrics |= distributed.broadcast_object(held_out, ddp)
        metrics |= supcon
        history.append({"epoch": float(epoch), **metrics})
        if _better(metrics, best):
            best, best_epoch, stale = metrics, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if ckpt is not None and ddp.is_main:
                save_weights(model, ckpt / BEST)
        else:
            stale += 1
        if on_epoch is not None and ddp.is_main:
            on_epoch(epoch, metrics)
        if out_of_steps():
            break
        if cfg.patience and stale >= cfg.patience and epoch < cfg.epochs:
            stopped_early = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return EncoderTrainResult(
        epochs_run=epoch,
        best_epoch=best_epoch,
        best_metrics=dict(best or {}),
        stopped_early=stopped_early,
        steps=steps,
        history=history,
        checkpoint_dir=str(ckpt) if ckpt else None,
    )


# ------------------------------------------------------------------------------------------------------ loading


def encoder_config_from_dict(arch: Mapping[str, Any]) -> EncoderConfig:
    """An ``EncoderConfig`` from its ``asdict`` form (unknown keys, e.g. from a newer version, are ignored)."""
    known = {f.name for f in fields(EncoderConfig)}
    kwargs = {k: v for k, v in arch.items() if k in known}
    text_known = {f.name for f in fields(TextTowerConfig)}
    kwargs["text"] = TextTowerConfig(**{k: v for k, v in dict(arch.get("text") or {}).items() if k in text_known})
    return EncoderConfig(**kwargs)


def load_encoder_checkpoint(checkpoint_dir: str | Path, weights: str = BEST) -> ProductEncoder:
    """A ``ProductEncoder`` in eval mode with the saved weights, from a folder ``train_encoder`` wrote."""
    from safetensors.torch import load_model

    root = Path(checkpoint_dir)
    for name in (CONFIG, weights):
        if not (root / name).exists():
            raise FileNotFoundError(f"{root / name} is missing; pass a checkpoint_dir that train_encoder() wrote")
    model = ProductEncoder(encoder_config_from_dict(json.loads((root / CONFIG).read_text())["model"]))
    load_model(model, str(root / weights), strict=True)
    return model.eval()


__all__ = [
    "EncoderTrainConfig",
    "EncoderTrainResult",
    "load_encoder_checkpoint",
    "retrieval_metrics",
    "train_encoder",
]
