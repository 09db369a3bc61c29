"""Pair matcher as in Ditto (Li et al., VLDB 2021, "Deep Entity Matching with Pre-Trained Language Models"): a
cross-encoder over the serialized pair ``COL title VAL ... [SEP] COL title VAL ...``, fine-tuned from the text tower.

Ditto's optimisations (domain knowledge injection, span summarisation, MixDA augmentation) are left out: this is the
plain fine-tuned cross-encoder, kept CPU-sized (MiniLM-L6, 128 tokens, a few epochs). ``cosine_scores`` is the
bi-encoder baseline: cosine of the tower's mean-pooled embeddings of each record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from features.similarity import threshold_for_f1
from features.towers import TextTower, TextTowerConfig, mean_pool

Pair = tuple[Mapping, Mapping]


def serialize(row: Mapping) -> str:
    """A canonical row as Ditto writes a record: ``COL title VAL ... COL description VAL ... COL <key> VAL <value>``."""
    parts = [f"COL title VAL {row.get('title') or ''}"]
    if row.get("description"):
        parts.append(f"COL description VAL {row['description']}")
    parts += [f"COL {s['key']} VAL {s['value']}" for s in row.get("specs") or ()]
    return " ".join(parts)


@torch.no_grad()
def cosine_scores(tower: TextTower, pairs: Sequence[Pair], batch_size: int = 64) -> np.ndarray:
    """Baseline pair scores (P,): cosine of the tower's normalised embeddings of the two serialized records."""
    tower.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        left = tower.embed([serialize(a) for a, _ in chunk])
        right = tower.embed([serialize(b) for _, b in chunk])
        out.append((left * right).sum(-1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class MatcherConfig:
    """Cross-encoder size and training schedule.

    Attributes:
        text: the tower to fine-tune (all-MiniLM-L6-v2 by default).
        max_length: tokens of the serialized pair (both records, truncated longest first).
        epochs, batch_size, lr, weight_decay, warmup: AdamW with linear warmup then linear decay.
        seed: initialisation and shuffling.
    """

    text: TextTowerConfig = field(default_factory=lambda: TextTowerConfig(max_length=128))
    max_length: int = 128
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    seed: int = 0


class PairMatcher(nn.Module):
    """Cross-encoder: the text tower reads both records in one sequence; a linear head on the mean-pooled states."""

    def __init__(self, cfg: MatcherConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or MatcherConfig()
        torch.manual_seed(self.cfg.seed)
        self.tower = TextTower(self.cfg.text)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(self.tower.hidden_size, 1))
        self.threshold = 0.5
        self.history: list[dict[str, float]] = []

    def encode(self, pairs: Sequence[Pair]) -> dict[str, Tensor]:
        return self.tower.tokenizer(
            [serialize(a) for a, _ in pairs],
            [serialize(b) for _, b in pairs],
            padding=True,
            truncation="longest_first",
            max_length=self.cfg.max_length,
            return_tensors="pt",
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Match logits (B,)."""
        states = self.tower(input_ids, attention_mask)  # (B, T, D)
        return self.head(mean_pool(states, attention_mask)).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, pairs: Sequence[Pair], batch_size: int = 64) -> np.ndarray:
        """Match probabilities (P,) float32."""
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(pairs), batch_size):
            enc = self.encode(pairs[i : i + batch_size])
            out.append(torch.sigmoid(self(enc["input_ids"], enc["attention_mask"])).numpy())
        self.train(was_training)
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)

    def predict(self, pairs: Sequence[Pair]) -> np.ndarray:
        """Match decisions (P,) bool at the threshold chosen on validation."""
        return self.predict_proba(pairs) >= self.threshold

    def fit(
        self,
        pairs_train: Sequence[tuple[Mapping, Mapping, int]],
        pairs_valid: Sequence[tuple[Mapping, Mapping, int]],
        *,
        log: Callable[[str], None] | None = print,
    ) -> PairMatcher:
        """Fine-tune on (left, right, label) triples; keep the epoch with the best valid F1 and its threshold."""
        if not pairs_train or not pairs_valid:
            raise ValueError(f"fit needs training and validation pairs; got {len(pairs_train)} and {len(pairs_valid)}")
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        labels = torch.tensor([int(y) for *_, y in pairs_train], dtype=torch.float32)
        valid_pairs = [(a, b) for a, b, _ in pairs_valid]
        valid_labels = np.array([int(y) for *_, y in pairs_valid])
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * -(-len(pairs_train) // cfg.batch_size)
        warm = max(1, int(cfg.warmup * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
        )
        # positives are rare (≈10% in Abt-Buy): weight them so the loss does not settle on "no match"
        pos_weight = ((1 - labels.mean()) / labels.mean().clamp_min(1e-6)).clamp(1, 10)
        best, best_state = -1.0, None
        for epoch in range(cfg.epochs):
            self.train()
            start, total = time.perf_counter(), 0.0
            order = rng.permutation(len(pairs_train))
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                enc = self.encode([(pairs_train[j][0], pairs_train[j][1]) for j in idx])
                logits = self(enc["input_ids"], enc["attention_mask"])
                loss = F.binary_cross_entropy_with_logits(logits, labels[idx], pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            threshold, f1 = threshold_for_f1(self.predict_proba(valid_pairs), valid_labels)
            row = {"epoch": epoch, "loss": total / len(order), "valid_f1": f1, "threshold": threshold}
            row["seconds"] = time.perf_counter() - start
            self.history.append(row)
            if log:
                log(
                    f"epoch {epoch}: loss {row['loss']:.4f} valid F1 {f1:.4f} @ {threshold:.3f} ({row['seconds']:.0f}s)"
                )
            if f1 > best:
                best, self.threshold = f1, threshold
                best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if best_state is not None:
            self.load_state_dict(best_state)
        self.eval()
        return self
