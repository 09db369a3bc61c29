"""Multimodal product encoder after M5Product's SCALE (Dong et al., CVPR 2022, "M5Product: Self-harmonized
Contrastive Learning for E-commercial Multi-modal Pretraining").

Per-modality encoders: text (title [SEP] description) through the ``TextTower``; the spec table as entities, each a
key and a value token bag embedded by a small table encoder; image regions and video frames from precomputed
``ImageTower`` features (so frozen visual features are cached, never recomputed per epoch). A joint co-transformer
runs over ``[PRODUCT] + text + entities + regions + frames`` with modality-type embeddings and a key padding mask: a
missing modality contributes no tokens (masked), never zero vectors posing as present. The product vector is the
L2-normalised projection of the [PRODUCT] token; per-modality vectors are the normalised projections of each
modality's pooled unimodal tokens (those are what the contrastive task aligns).

Pretraining tasks (``encoder_loss``):

- masked text tokens: MLM over the text vocabulary at 15% of the tokens, all replaced by [MASK]. Chosen over
  feature regression because the targets are free (the input ids) and the logits are only computed at masked
  positions (≈0.15·T·V per product), while regression onto tower features needs a second, clean tower pass.
- masked region features: 15% of image regions and video frames replaced by a learned mask vector; the fused state
  regresses the cached feature (MSE; the targets are frozen, so there is no collapse to a constant).
- masked table entities: 15% of entities replaced by a mask vector; the fused state must pick the original entity
  embedding among every entity in the batch (InfoNCE), which avoids a softmax over all possible values.
- product-to-modality contrastive ("ptc"): the [PRODUCT] vector must pick its own product's modality vectors among
  the batch's (InfoNCE, averaged over the modalities present). It is the term that trains the product vector itself:
  without it only pair fine-tuning reached the [PRODUCT] token, and the self-supervised vectors collapsed.
- inter-modality contrastive (self-harmonized): for each modality pair (m, n) an InfoNCE ``L_mn`` between e_m and
  e_n over the products having both, weighted by LEARNED pair weights::

      s_mn = mean_b  MLP([e_m^b ⊙ e_n^b ; |e_m^b - e_n^b|])          (embeddings detached)
      w    = softmax_{(m,n) present in the batch}(s)
      L_itc = Σ_mn w_mn L_mn + λ · KL(w ‖ uniform)

  The pair scorer sees only the embeddings, so it learns which pairs agree from how they look; minimising over w
  on the simplex has the closed form w_mn ∝ exp(-L_mn / λ): pairs that align poorly (noisy images, empty spec
  tables) are down-weighted smoothly instead of dominating, the harmonizing SCALE is after, while the KL term
  (λ = ``pair_weight_reg``) keeps every pair in play so no modality is dropped. Detaching the embeddings stops the
  encoders from gaming the weights (making a pair look "easy" to shed its loss).

``pair_contrastive_loss`` fine-tunes on labelled match pairs (supervised contrastive: a match is pulled together
against the batch's other products as negatives; a labelled non-match is pushed below a margin). That alone leaves
the product vector poor at finding matches (pair F1 0.19 on Abt-Buy); ``EncoderConfig.text_skip`` (the ``matching``
preset) adds the text tower's own pooled embedding to it, so that SupCon fine-tuning of the tower on the labelled
pairs' clusters (features/supcon.py, ``EncoderTrainConfig.supcon_epochs``) reaches the product vector.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from features.towers import TextTower, TextTowerConfig, mean_pool

MODALITIES = ("text", "table", "image", "video")
PAIRS = tuple(itertools.combinations(range(len(MODALITIES)), 2))
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of the product encoder.

    Attributes:
        text: the text tower.
        dim: width D of the co-transformer.
        out_dim: size of the product and modality vectors.
        layers, heads: co-transformer depth and heads.
        dropout: in the co-transformer.
        visual_dim: Dv of the cached image/frame features (1280 for EfficientNet-Lite0, 16 for the tiny CNN).
        max_entities: spec entities kept per product (E).
        key_tokens, value_tokens: tokens kept per entity key and value.
        mask_prob: share of text tokens, regions/frames and entities masked in pretraining.
        temperature: InfoNCE temperature.
        pair_weight_reg: λ of the KL(w ‖ uniform) term on the self-harmonized pair weights.
        text_skip: weight s of the text tower's own mean-pooled, normalised embedding in the product vector,
            ``normalize((1 - s)·head([PRODUCT]) + s·text)``; 0 keeps the co-transformer's vector alone. With s > 0
            a text similarity taught by SupCon fine-tuning (``EncoderTrainConfig.supcon_epochs``) reaches the
            product vector through this skip instead of having to survive the co-transformer. Needs ``out_dim``
            equal to the text tower's width (384 for all-MiniLM-L6-v2): see the ``matching`` preset.
    """

    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    dim: int = 256
    out_dim: int = 256
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    visual_dim: int = 1280
    max_entities: int = 16
    key_tokens: int = 4
    value_tokens: int = 8
    mask_prob: float = 0.15
    temperature: float = 0.07
    pair_weight_reg: float = 1.0
    text_skip: float = 0.0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"EncoderConfig.dim ({self.dim}) is not a multiple of heads ({self.heads})")
        if not 0.0 <= self.text_skip <= 1.0:
            raise ValueError(f"EncoderConfig.text_skip ({self.text_skip}) must lie in [0, 1]")


# -------------------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class EncoderBatch:
    """B products by modality; every ``*_mask`` is True where a token/entity/region/frame is real.

    Attributes:
        input_ids, attention_mask: title [SEP] description tokens (B, T).
        key_ids, value_ids: spec entity key and value tokens, 0 = pad (B, E, Lk), (B, E, Lv).
        entity_mask: (B, E).
        regions: cached image region features (B, R, Dv), all images' regions concatenated.
        region_mask: (B, R); an all-False row = no image.
        frames: cached video frame features (B, F, Dv).
        frame_mask: (B, F); an all-False row = no video.
    """

    input_ids: Tensor
    attention_mask: Tensor
    key_ids: Tensor
    value_ids: Tensor
    entity_mask: Tensor
    regions: Tensor
    region_mask: Tensor
    frames: Tensor
    frame_mask: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> EncoderBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def drop(self, *modalities: str) -> EncoderBatch:
        """The same products with whole modalities masked out (as if absent); text keeps its [CLS]/[SEP] only."""
        changes: dict[str, Tensor] = {}
        for m in modalities:
            if m not in MODALITIES:
                raise ValueError(f"Unknown modality {m!r}; pick from {MODALITIES}")
            if m == "text":
                changes["attention_mask"] = torch.zeros_like(self.attention_mask)
            else:
                key = {"table": "entity_mask", "image": "region_mask", "video": "frame_mask"}[m]
                changes[key] = torch.zeros_like(getattr(self, key))
        return replace(self, **changes)


def _pad_features(items: Sequence[Tensor | None], b: int, dv: int) -> tuple[Tensor, Tensor]:
    n = max([0 if x is None else int(x.reshape(-1, dv).shape[0]) for x in items] + [1])
    out = torch.zeros(b, n, dv)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, x in enumerate(items):
        if x is None:
            continue
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, dv)
        out[i, : len(x)] = x
        mask[i, : len(x)] = True
    return out, mask


def collate(
    rows: Sequence[Mapping],
    tokenizer,
    cfg: EncoderConfig,
    *,
    regions: Mapping[str, Tensor | np.ndarray] | None = None,
    frames: Mapping[str, Tensor | np.ndarray] | None = None,
) -> EncoderBatch:
    """Canonical catalog rows -> an ``EncoderBatch``.

    Args:
        rows: dicts with title, description, specs (list of {key, value}) and product_id.
        tokenizer: the text tower's tokenizer.
        cfg: sizes (max tokens, entities, visual_dim).
        regions: product_id -> cached region features (M, R, Dv) or (R, Dv) of its images; absent = no image.
        frames: product_id -> cached frame features (F, Dv) of its video; absent = no video.
    """
    b = len(rows)
    enc = tokenizer(
        [r.get("title") or "" for r in rows],
        [r.get("description") or "" for r in rows],
        padding=True,
        truncation="longest_first",
        max_length=cfg.text.max_length,
        return_tensors="pt",
    )
    lk, lv, e = cfg.key_tokens, cfg.value_tokens, cfg.max_entities
    key_ids = torch.zeros(b, e, lk, dtype=torch.long)
    value_ids = torch.zeros(b, e, lv, dtype=torch.long)
    entity_mask = torch.zeros(b, e, dtype=torch.bool)
    for i, r in enumerate(rows):
        specs = [s for s in r.get("specs") or () if s.get("key") or s.get("value")][:e]
        if not specs:
            continue
        keys = tokenizer([s.get("key") or "" for s in specs], add_special_tokens=False)["input_ids"]
        values = tokenizer([s.get("value") or "" for s in specs], add_special_tokens=False)["input_ids"]
        for j, (k_ids, v_ids) in enumerate(zip(keys, values, strict=True)):
            key_ids[i, j, : len(k_ids[:lk])] = torch.tensor(k_ids[:lk], dtype=torch.long)
            value_ids[i, j, : len(v_ids[:lv])] = torch.tensor(v_ids[:lv], dtype=torch.long)
            entity_mask[i, j] = True
    dv = cfg.visual_dim
    reg, reg_mask = _pad_features([(regions or {}).get(r.get("product_id")) for r in rows], b, dv)
    frm, frm_mask = _pad_features([(frames or {}).get(r.get("product_id")) for r in rows], b, dv)
    return EncoderBatch(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        key_ids=key_ids,
        value_ids=value_ids,
        entity_mask=entity_mask,
        regions=reg,
        region_mask=reg_mask,
        frames=frm,
        frame_mask=frm_mask,
    )


# --------------------------------------------------------------------------------------------------------- blocks


class TableEncoder(nn.Module):
    """Spec entities -> (B, E, D): mean key-token embedding and mean value-token embedding, joined by an MLP."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.key_value = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim))

    def forward(self, key_ids: Tensor, value_ids: Tensor) -> Tensor:
        key = mean_pool(self.tokens(key_ids).flatten(0, 1), key_ids.flatten(0, 1) > 0)  # (B*E, D)
        value = mean_pool(self.tokens(value_ids).flatten(0, 1), value_ids.flatten(0, 1) > 0)
        return self.key_value(torch.cat([key, value], -1)).view(*key_ids.shape[:2], -1)  # (B, E, D)


class PairScorer(nn.Module):
    """Scores a modality pair from its two embeddings; the softmax over pairs gives the SCALE pair weights."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.mlp(torch.cat([a * b, (a - b).abs()], -1)).squeeze(-1)  # (B,)


@dataclass(frozen=True)
class EncoderOutput:
    """What ``ProductEncoder.forward`` returns; the masked-task fields are None outside pretraining.

    Attributes:
        product: L2-normalised product vectors (B, out_dim).
        modality: L2-normalised per-modality vectors (B, 4, out_dim), in ``MODALITIES`` order.
        present: which modalities each product has (B, 4).
        mlm_logits, mlm_labels: logits at masked text positions (N_t, V) and their token ids (N_t,).
        region_pred, region_target: predicted and cached features of masked regions/frames (N_r, Dv).
        entity_pred, entity_target, entity_pool: fused states of masked entities (N_e, D), the index of each
            one's original among ``entity_pool`` (N_e,), and every real entity embedding of the batch (N_all, D).
        pair_weights, pair_valid: self-harmonized weights over ``PAIRS`` (P,) and which pairs the batch supports.
    """

    product: Tensor
    modality: Tensor
    present: Tensor
    mlm_logits: Tensor | None = None
    mlm_labels: Tensor | None = None
    region_pred: Tensor | None = None
    region_target: Tensor | None = None
    entity_pred: Tensor | None = None
    entity_target: Tensor | None = None
    entity_pool: Tensor | None = None
    pair_weights: Tensor | None = None
    pair_valid: Tensor | None = None


# ---------------------------------------------------------------------------------------------------------- model


def _random_mask(valid: Tensor, prob: float, generator: torch.Generator | None) -> Tensor:
    """A Bernoulli(prob) subset of ``valid``, with at least one position when anything is valid."""
    draw = torch.rand(valid.shape, generator=generator, device=valid.device) < prob
    chosen = draw & valid
    if valid.any() and not chosen.any():
        chosen.view(-1)[valid.view(-1).nonzero()[0]] = True
    return chosen


class ProductEncoder(nn.Module):
    """SCALE-style encoder: modality encoders -> co-transformer -> product and modality vectors."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_tower = TextTower(cfg.text)
        self.tokenizer = self.text_tower.tokenizer
        vocab, d = len(self.tokenizer), cfg.dim
        self.text_proj = nn.Linear(self.text_tower.hidden_size, d)
        self.table = TableEncoder(vocab, d)
        self.visual_proj = nn.Sequential(nn.LayerNorm(cfg.visual_dim), nn.Linear(cfg.visual_dim, d))
        self.frame_proj = nn.Sequential(nn.LayerNorm(cfg.visual_dim), nn.Linear(cfg.visual_dim, d))
        self.product_token = nn.Parameter(torch.zeros(1, 1, d))
        self.type_embed = nn.Embedding(1 + len(MODALITIES), d)  # 0 = [PRODUCT], then MODALITIES
        self.feature_mask = nn.Parameter(torch.zeros(cfg.visual_dim))
        self.entity_mask = nn.Parameter(torch.zeros(d))
        layer = nn.TransformerEncoderLayer(
            d, cfg.heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.fusion = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.product_head = nn.Linear(d, cfg.out_dim)
        self.modality_heads = nn.ModuleList(nn.Linear(d, cfg.out_dim) for _ in MODALITIES)
        self.mlm_head = nn.Linear(d, vocab)
        self.region_head = nn.Linear(d, cfg.visual_dim)
        self.entity_head = nn.Linear(d, d)
        self.pair_scorer = PairScorer(cfg.out_dim)
        nn.init.normal_(self.product_token, std=0.02)
        if cfg.text_skip and cfg.out_dim != self.text_tower.hidden_size:
            raise ValueError(
                f"EncoderConfig.text_skip needs out_dim ({cfg.out_dim}) equal to the text tower's width "
                f"({self.text_tower.hidden_size}): set out_dim={self.text_tower.hidden_size} or text_skip=0"
            )

    # -- unimodal encoders
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_proj(self.text_tower(input_ids, attention_mask))  # (B, T, D)

    def encode_table(self, key_ids: Tensor, value_ids: Tensor) -> Tensor:
        return self.table(key_ids, value_ids)  # (B, E, D)

    def encode_regions(self, regions: Tensor) -> Tensor:
        return self.visual_proj(regions)  # (B, R, D)

    def encode_frames(self, frames: Tensor) -> Tensor:
        return self.frame_proj(frames)  # (B, F, D)

    # -- joint
    def fuse(self, parts: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        """Co-transformer over [PRODUCT] + every modality's tokens; padding and absent modalities are masked."""
        b = parts[0].shape[0]
        tokens = [self.product_token.expand(b, -1, -1)]
        keep = [torch.ones(b, 1, dtype=torch.bool, device=parts[0].device)]  # [PRODUCT] keeps no row all-masked
        for i, (x, m) in enumerate(zip(parts, masks, strict=True)):
            tokens.append(x + self.type_embed.weight[i + 1])
            keep.append(m)
        tokens[0] = tokens[0] + self.type_embed.weight[0]
        x = torch.cat(tokens, 1)  # (B, 1+T+E+R+F, D)
        return self.norm(self.fusion(x, src_key_padding_mask=~torch.cat(keep, 1)))

    def forward(self, batch: EncoderBatch, *, masked: bool = False, generator: torch.Generator | None = None):
        """Product and modality vectors; ``masked=True`` also applies and returns the masked-modality tasks."""
        cfg = self.cfg
        input_ids = batch.input_ids
        text_mask = batch.attention_mask.bool()
        entity_mask, region_mask, frame_mask = batch.entity_mask, batch.region_mask, batch.frame_mask
        out: dict[str, Tensor] = {}
        if masked:
            special = torch.isin(input_ids, torch.tensor(self.tokenizer.all_special_ids, device=input_ids.device))
            t_sel = _random_mask(text_mask & ~special, cfg.mask_prob, generator)
            input_ids = input_ids.masked_fill(t_sel, self.tokenizer.mask_token_id)
            out["mlm_labels"] = batch.input_ids[t_sel]
        states = self.text_tower(input_ids, batch.attention_mask)  # (B, T, Dt)
        text = self.text_proj(states)  # (B, T, D), as encode_text
        table = self.encode_table(batch.key_ids, batch.value_ids)
        regions, frames = batch.regions, batch.frames
        if masked:
            r_sel = _random_mask(region_mask, cfg.mask_prob, generator)
            f_sel = _random_mask(frame_mask, cfg.mask_prob, generator)
            regions = torch.where(r_sel[..., None], self.feature_mask, regions)
            frames = torch.where(f_sel[..., None], self.feature_mask, frames)
            out["region_target"] = torch.cat([batch.regions[r_sel], batch.frames[f_sel]])
            e_sel = _random_mask(entity_mask, cfg.mask_prob, generator)
            out["entity_pool"] = table[entity_mask].detach()
            # the index of each masked entity among the batch's real entities, in the same (row-major) order
            rank = torch.cumsum(entity_mask.view(-1).long(), 0).view_as(entity_mask) - 1
            out["entity_target"] = rank[e_sel]
            table_in = torch.where(e_sel[..., None], self.entity_mask, table)
        else:
            table_in = table
        parts = [text, table_in, self.encode_regions(regions), self.encode_frames(frames)]
        masks = [text_mask, entity_mask, region_mask, frame_mask]
        fused = self.fuse(parts, masks)
        present = torch.stack([m.any(1) for m in masks], 1)  # (B, 4)
        pooled = torch.stack([mean_pool(p, m) for p, m in zip(parts, masks, strict=True)], 1)  # (B, 4, D)
        modality = torch.stack([F.normalize(h(pooled[:, i]), dim=-1) for i, h in enumerate(self.modality_heads)], 1)
        product = F.normalize(self.product_head(fused[:, 0]), dim=-1)
        if cfg.text_skip:
            skip = F.normalize(mean_pool(states, batch.attention_mask), dim=-1)  # (B, Dt = out_dim)
            product = F.normalize((1 - cfg.text_skip) * product + cfg.text_skip * skip, dim=-1)
        if masked:
            starts = np.cumsum([1] + [p.shape[1] for p in parts])
            seg = [fused[:, s : s + p.shape[1]] for s, p in zip(starts[:-1], parts, strict=True)]
            out["mlm_logits"] = self.mlm_head(seg[0][t_sel])
            out["region_pred"] = self.region_head(torch.cat([seg[2][r_sel], seg[3][f_sel]]))
            out["entity_pred"] = self.entity_head(seg[1][e_sel])
            out["pair_weights"], out["pair_valid"] = self.pair_weights(modality, present)
        return EncoderOutput(product=product, modality=modality, present=present, **out)

    def pair_weights(self, modality: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Self-harmonized weights over the modality pairs present together in ≥2 products -> (w (P,), valid (P,))."""
        scores, valid = [], []
        for m, n in PAIRS:
            both = present[:, m] & present[:, n]
            valid.append(both.sum() >= 2)
            if both.any():
                s = self.pair_scorer(modality[both, m].detach(), modality[both, n].detach()).mean()
            else:
                s = modality.new_zeros(())
            scores.append(s)
        scores_t, valid_t = torch.stack(scores), torch.stack(valid)
        w = torch.softmax(scores_t.masked_fill(~valid_t, float("-inf")), 0) if valid_t.any() else scores_t * 0
        return torch.nan_to_num(w), valid_t


# -------------------------------------------------------------------------------------------------------- presets


def tiny() -> EncoderConfig:
    """Hidden-32, 1-layer random encoder over the tiny text tower and 16-d tiny-CNN features: tests only."""
    return EncoderConfig(
        text=TextTowerConfig(tiny=True, max_length=64),
        dim=32,
        out_dim=32,
        layers=1,
        heads=2,
        dropout=0.0,
        visual_dim=16,
        max_entities=8,
    )


def default() -> EncoderConfig:
    """all-MiniLM-L6-v2 text tower (fine-tuned) over cached frozen EfficientNet-Lite0 features (1280-d)."""
    return EncoderConfig(text=TextTowerConfig(max_length=128), visual_dim=1280)


def matching() -> EncoderConfig:
    """``default`` with 384-d vectors and the text skip (``text_skip=0.5``), for SupCon fine-tuning on labelled
    match pairs (``EncoderTrainConfig.supcon_epochs``). s = 0.5 is a starting point, not a measured optimum."""
    return replace(default(), out_dim=384, text_skip=0.5)


# --------------------------------------------------------------------------------------------------------- losses


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between row-aligned normalised vectors (B, D), (B, D)."""
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def encoder_loss(out: EncoderOutput, batch: EncoderBatch, cfg: EncoderConfig) -> dict[str, Tensor]:
    """Named pretraining terms, "total", and the current pair weights as ``"w/<m>-<n>"`` (detached, for logging).

    Terms: "mlm" (masked text tokens), "mrfr" (masked region/frame feature regression), "mep" (masked entity
    prediction), "itc" (self-harmonized inter-modality contrastive), "ptc" (product vector vs its own modality
    vectors, InfoNCE over the batch: what trains the product vector), "pair_kl" (λ·KL(w ‖ uniform)).
    ``out`` must come from ``model(batch, masked=True)``.
    """
    if out.mlm_labels is None:
        raise ValueError("encoder_loss needs the masked tasks: call model(batch, masked=True)")
    zero = out.product.new_zeros(())
    terms: dict[str, Tensor] = {}
    terms["mlm"] = F.cross_entropy(out.mlm_logits, out.mlm_labels) if len(out.mlm_labels) else zero
    terms["mrfr"] = F.mse_loss(out.region_pred, out.region_target) if len(out.region_target) else zero
    if len(out.entity_target):
        pred = F.normalize(out.entity_pred, dim=-1)
        pool = F.normalize(out.entity_pool, dim=-1)
        terms["mep"] = F.cross_entropy(pred @ pool.T / cfg.temperature, out.entity_target)
    else:
        terms["mep"] = zero
    w, valid = out.pair_weights, out.pair_valid
    itc = zero
    for p, (m, n) in enumerate(PAIRS):
        if valid[p]:
            both = out.present[:, m] & out.present[:, n]
            itc = itc + w[p] * info_nce(out.modality[both, m], out.modality[both, n], cfg.temperature)
    terms["itc"] = itc
    # product-to-modality contrastive: the [PRODUCT] vector must pick its own product's modality vectors among the
    # batch's. Without it no pretraining term reaches the product vector (only pair fine-tuning would), and it
    # collapses to one direction: seen on Abt-Buy, every pair cosine 1.0000.
    ptc, n_mod = zero, 0
    for m in range(len(MODALITIES)):
        has = out.present[:, m]
        if int(has.sum()) > 1:
            ptc, n_mod = ptc + info_nce(out.product[has], out.modality[has, m], cfg.temperature), n_mod + 1
    terms["ptc"] = ptc / max(n_mod, 1)
    k = int(valid.sum())
    if k > 1:
        wv = w[valid].clamp_min(1e-8)
        terms["pair_kl"] = cfg.pair_weight_reg * (wv * (wv * k).log()).sum()
    else:
        terms["pair_kl"] = zero
    terms["total"] = sum(terms.values())
    for p, (m, n) in enumerate(PAIRS):
        terms[f"w/{MODALITIES[m]}-{MODALITIES[n]}"] = w[p].detach()
    return terms


def pair_contrastive_loss(vec_a: Tensor, vec_b: Tensor, labels: Tensor, temperature: float = 0.05) -> Tensor:
    """Supervised contrastive loss on labelled pairs of normalised vectors (B, D), (B, D), labels (B,) in {0, 1}.

    A match (label 1) is pulled together against every other b (and a) of the batch as negatives, InfoNCE in both
    directions; a labelled non-match is pushed below cosine 0.5 (softplus hinge at the same temperature).
    """
    labels = labels.bool()
    logits = vec_a @ vec_b.T / temperature  # (B, B)
    target = torch.arange(len(vec_a), device=vec_a.device)
    loss = vec_a.new_zeros(())
    if labels.any():
        pos = (F.cross_entropy(logits[labels], target[labels]) + F.cross_entropy(logits.T[labels], target[labels])) / 2
        loss = loss + pos
    if (~labels).any():
        cos = (vec_a[~labels] * vec_b[~labels]).sum(-1)
        loss = loss + F.softplus((cos - 0.5) / temperature).mean() * temperature
    return loss


# ------------------------------------------------------------------------------------------------------ inference


@torch.no_grad()
def encode_products(
    model: ProductEncoder,
    rows: Sequence[Mapping],
    *,
    batch_size: int = 64,
    regions: Mapping[str, Tensor | np.ndarray] | None = None,
    frames: Mapping[str, Tensor | np.ndarray] | None = None,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Product vectors (N, out_dim) float32 for canonical rows, in order; eval mode, so deterministic.

    Args:
        model: a trained encoder.
        rows: canonical catalog rows (title, description, specs, product_id).
        batch_size: products per forward pass.
        regions, frames: cached visual features by product_id (see ``collate``); missing = no image / no video.
        device: where to run; the model's device when None.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    chunks = []
    try:
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], model.tokenizer, model.cfg, regions=regions, frames=frames)
            chunks.append(model(batch.to(device)).product.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, model.cfg.out_dim), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)
