"""Training objective of JAVE (Zhu et al., EMNLP 2020): value CE + attribute BCE + λ·KL consistency, plus the
implicit-value CE added here; returned as a dict of named terms so each is logged by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from features.batch import IGNORE_INDEX, ProductBatch
from jave.config import JaveConfig
from jave.model import JaveOutput

KL_EPS = 1e-6


def tagger_attribute_probs(tag_logits: Tensor, token_mask: Tensor) -> Tensor:
    """p_tag(a) = max over real tokens of P(B-a) + P(I-a): the attribute distribution the tagger implies, (B, A).

    Tags are numbered "O", then B-a at 1 + 2a and I-a at 2 + 2a. Products without real tokens get 0.
    """
    probs = tag_logits.float().softmax(-1)  # (B, T, K)
    per_attr = probs[..., 1::2] + probs[..., 2::2]  # (B, T, A)
    per_attr = per_attr.masked_fill(~token_mask[..., None], 0.0)
    return per_attr.amax(1)  # (B, A)


def bernoulli_kl(p: Tensor, q: Tensor, eps: float = KL_EPS) -> Tensor:
    """KL(Bern(p) ‖ Bern(q)) elementwise, with both clamped into [eps, 1 - eps] so it is always finite."""
    p, q = p.clamp(eps, 1 - eps), q.clamp(eps, 1 - eps)
    return p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())


def jave_loss(out: JaveOutput, batch: ProductBatch, cfg: JaveConfig) -> dict[str, Tensor]:
    """Named loss terms and their weighted ``total``; a term without labels or switched off is a 0 tensor.

    Returns:
        ``attr_bce`` (multi-label attribute BCE), ``value_ce`` (BIO tag CE, -100 ignored), ``kl`` (Bernoulli KL
        between the attribute head and the tagger's implied attributes, mean over products and attributes),
        ``implicit_ce`` (mean over implicit attributes with labels), ``total`` = value_ce + attr_bce + λ·kl +
        implicit_ce.
    """
    zero = out.attr_logits.new_zeros((), dtype=torch.float32)
    losses = {"attr_bce": zero, "value_ce": zero, "kl": zero, "implicit_ce": zero}

    if batch.attr_labels is not None:
        losses["attr_bce"] = F.binary_cross_entropy_with_logits(
            out.attr_logits.float(), batch.attr_labels.to(torch.float32)
        )

    if batch.tag_labels is not None and bool((batch.tag_labels != IGNORE_INDEX).any()):
        losses["value_ce"] = F.cross_entropy(
            out.tag_logits.float().flatten(0, 1), batch.tag_labels.flatten(), ignore_index=IGNORE_INDEX
        )

    if cfg.use_kl:
        token_mask = batch.attention_mask.bool() & (batch.token_field >= 0)
        p_tag = tagger_attribute_probs(out.tag_logits, token_mask)
        losses["kl"] = bernoulli_kl(torch.sigmoid(out.attr_logits.float()), p_tag).mean()

    if batch.implicit_labels is not None and out.implicit_logits:
        if batch.implicit_labels.shape[1] != len(out.implicit_logits):
            raise ValueError(
                f"implicit_labels has {batch.implicit_labels.shape[1]} columns but the model has "
                f"{len(out.implicit_logits)} implicit heads; match JaveConfig.implicit_value_sizes to the labels."
            )
        terms = [
            F.cross_entropy(logits.float(), batch.implicit_labels[:, k], ignore_index=IGNORE_INDEX)
            for k, logits in enumerate(out.implicit_logits)
            if bool((batch.implicit_labels[:, k] != IGNORE_INDEX).any())
        ]
        if terms:
            losses["implicit_ce"] = torch.stack(terms).mean()

    losses["total"] = losses["value_ce"] + losses["attr_bce"] + cfg.kl_weight * losses["kl"] + losses["implicit_ce"]
    return losses
