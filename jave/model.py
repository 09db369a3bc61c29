"""JAVE (Zhu et al., EMNLP 2020, "Multimodal Joint Attribute Prediction and Value Extraction for E-commerce Product"):
attribute prediction and BIO value tagging over a product's text and images, joined by a global visual gate, a
regional visual gate conditioned on the predicted attributes, and (beyond the paper) an implicit-value head for
closed value sets that the text may never mention. Pure PyTorch; the towers come from ``features.towers``.

Unlike the reference TensorFlow code, the attention softmaxes are real (and masked) and dropout runs in training.
Letters: B batch, T tokens, M media per product, R regions (M x grid cells), D width, A attributes, K = 1 + 2A tags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from features.batch import NUM_FIELDS, ProductBatch
from features.towers import ImageTower, TextTower
from jave.config import JaveConfig

# ---------------------------------------------------------------------------------------------- stage results


@dataclass(frozen=True)
class JaveOutput:
    """What ``JaveModel.forward`` returns: logits for the losses, gates and attention for inspection."""

    attr_logits: Tensor  # (B, A)
    tag_logits: Tensor  # (B, T, K)
    implicit_logits: tuple[Tensor, ...]  # one (B, V_k) per implicit attribute
    global_gate: Tensor | None = None  # (B, T, D); None when the image path was skipped or the gate is off
    regional_gate: Tensor | None = None  # (B, R, D); likewise
    region_attention: Tensor | None = None  # (B, T, R); rows of products without media are all zero


@dataclass(frozen=True)
class TextFeatures:
    tokens: Tensor  # (B, T, D) t_i
    cls: Tensor  # (B, D) c
    mask: Tensor  # (B, T) bool, real tokens


@dataclass(frozen=True)
class VisualFeatures:
    pooled: Tensor  # (B, D) v_G: masked mean over the product's media; zeros without media
    regions: Tensor  # (B, R, D) v_j of all media, concatenated
    region_mask: Tensor  # (B, R) bool
    present: Tensor  # (B,) bool, the product has at least one image or frame


@dataclass(frozen=True)
class FusedFeatures:
    hidden: Tensor  # (B, T, D) h_i
    attention: Tensor | None = None  # (B, T, R)
    values: Tensor | None = None  # (B, R, D) attention values of the regions
    global_gate: Tensor | None = None  # (B, T, D)


def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` (x's shape without the last axis) holds; zeros where none does."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim) / w.sum(dim).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------- blocks


class RegionAttention(nn.Module):
    """Tokens attend over image regions (one scaled dot-product head), softmax over the unmasked regions only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, tokens: Tensor, regions: Tensor, region_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.query(tokens), self.key(regions), self.value(regions)  # (B, T, D), (B, R, D), (B, R, D)
        scores = torch.einsum("btd,brd->btr", q, k) * self.scale  # (B, T, R)
        # finfo.min instead of -inf keeps all-masked rows finite; they are zeroed below, so they attend to nothing.
        scores = scores.masked_fill(~region_mask[:, None, :], torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1) * region_mask.any(-1).to(scores.dtype)[:, None, None]  # (B, T, R)
        return weights @ v, weights, v  # (B, T, D), (B, T, R), (B, R, D)


class GlobalVisualGate(nn.Module):
    """g_i = σ(W1 t_i + W2 v_G + b): how much of the attended image each token lets in."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.text = nn.Linear(dim, dim)
        self.image = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: Tensor, pooled: Tensor) -> Tensor:
        return torch.sigmoid(self.text(tokens) + self.image(pooled)[:, None, :])  # (B, T, D)


class RegionalVisualGate(nn.Module):
    """g2_j = σ(W6 ŷ + W7 v_j + b): keeps the regions relevant to the attributes the product is predicted to have."""

    def __init__(self, num_attributes: int, dim: int) -> None:
        super().__init__()
        self.attributes = nn.Linear(num_attributes, dim)
        self.region = nn.Linear(dim, dim, bias=False)

    def forward(self, attr_probs: Tensor, regions: Tensor) -> Tensor:
        return torch.sigmoid(self.attributes(attr_probs)[:, None, :] + self.region(regions))  # (B, R, D)


# ----------------------------------------------------------------------------------------------------- model


class JaveModel(nn.Module):
    """JAVE over a `ProductBatch`; ``forward`` runs encode_text → encode_image → fuse → predict_attributes →
    tag_values → predict_implicit."""

    def __init__(
        self, cfg: JaveConfig, text_tower: nn.Module | None = None, image_tower: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        d, a = cfg.hidden_size, cfg.num_attributes
        self.text_tower = text_tower if text_tower is not None else TextTower(cfg.text)
        self.text_proj = nn.Linear(self.text_tower.hidden_size, d)
        # Zero-initialised, so a pretrained tower starts from its own states; learns title vs description vs specs.
        self.field_embed = nn.Embedding(NUM_FIELDS, d)
        nn.init.zeros_(self.field_embed.weight)
        self.image_tower = None
        if cfg.use_image:
            self.image_tower = image_tower if image_tower is not None else ImageTower(cfg.image)
            dv = self.image_tower.hidden_size
            self.region_proj = nn.Sequential(nn.Linear(dv, d), nn.LayerNorm(d))
            self.global_proj = nn.Sequential(nn.Linear(dv, d), nn.LayerNorm(d))
            self.attention = RegionAttention(d)
            self.global_gate = GlobalVisualGate(d) if cfg.use_global_gate else None
            self.regional_gate = RegionalVisualGate(a, d) if cfg.use_regional_gate else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.attr_head = nn.Linear(3 * d, a)  # [c; mean t; mean h]
        self.tag_head = nn.Linear(3 * d + a, cfg.num_tags)  # [t_i; h_i; ŷ; regional visual_i]
        self.implicit_heads = nn.ModuleList(nn.Linear(3 * d, n) for n in cfg.implicit_value_sizes)  # [c; mean h; v_G]

    # -- stages

    def encode_text(self, batch: ProductBatch) -> TextFeatures:
        states = self.text_tower(batch.input_ids, batch.attention_mask)  # (B, T, Dt)
        field = batch.token_field
        tokens = self.text_proj(states) + self.field_embed(field.clamp_min(0)) * (field >= 0).unsqueeze(-1)
        tokens = self.dropout(tokens)  # (B, T, D)
        return TextFeatures(tokens=tokens, cls=tokens[:, 0], mask=batch.attention_mask.bool())

    def encode_image(self, batch: ProductBatch) -> VisualFeatures | None:
        """Per-media features → projected regions of all media (masked) and their masked-mean global vector.

        None (the image path is skipped) with ``use_image=False`` or when no product in the batch has media.
        """
        if self.image_tower is None or not bool(batch.media_mask.any()):
            return None
        media = batch.media_mask  # (B, M)
        if batch.has_visual_features:
            # Zero the empty slots: a cache may fill them with anything, and 0 x NaN would still be NaN.
            glob = batch.visual_global.masked_fill(~media[:, :, None], 0.0)  # (B, M, Dv)
            regions = batch.visual_regions.masked_fill(~media[:, :, None, None], 0.0)  # (B, M, R/M, Dv)
        elif batch.pixel_values is None:
            raise ValueError(
                "ProductBatch has media (media_mask is True somewhere) but neither pixel_values nor precomputed "
                "visual_global/visual_regions; pass one of them, or set media_mask False for products without media."
            )
        else:
            g, r = self.image_tower(batch.pixel_values[media])  # (N, Dv), (N, R/M, Dv) for the N real media only
            glob = g.new_zeros(*media.shape, g.shape[-1])
            regions = r.new_zeros(*media.shape, *r.shape[1:])
            glob[media], regions[media] = g, r
        b, m, per_media, dv = regions.shape
        if dv != self.image_tower.hidden_size:
            raise ValueError(
                f"Visual features have width {dv} but the image tower gives {self.image_tower.hidden_size}: they "
                f"come from another backbone; recompute them with {self.cfg.image.name!r} or change JaveConfig.image."
            )
        region_feats = self.dropout(self.region_proj(regions.flatten(1, 2)))  # (B, R, D), R = M * per_media
        region_mask = media[:, :, None].expand(b, m, per_media).reshape(b, m * per_media)  # (B, R)
        pooled = self.dropout(masked_mean(self.global_proj(glob), media, dim=1))  # (B, D), zeros without media
        return VisualFeatures(pooled=pooled, regions=region_feats, region_mask=region_mask, present=media.any(1))

    def fuse(self, text: TextFeatures, visual: VisualFeatures | None) -> FusedFeatures:
        """Cross-modal attention tokens → regions, let in through the global visual gate: h_i = t_i + g_i ⊙ att_i."""
        if visual is None:
            return FusedFeatures(hidden=text.tokens)
        attended, weights, values = self.attention(text.tokens, visual.regions, visual.region_mask)  # (B, T, D)
        gate = None
        if self.global_gate is not None:
            gate = self.global_gate(text.tokens, visual.pooled)  # (B, T, D)
            attended = gate * attended
        return FusedFeatures(hidden=text.tokens + attended, attention=weights, values=values, global_gate=gate)

    def predict_attributes(self, text: TextFeatures, fused: FusedFeatures) -> Tensor:
        """Multi-label attribute logits (B, A) from [c; mean t; mean h]."""
        pooled = [text.cls, masked_mean(text.tokens, text.mask, 1), masked_mean(fused.hidden, text.mask, 1)]
        return self.attr_head(self.dropout(torch.cat(pooled, -1)))

    def tag_values(
        self, text: TextFeatures, fused: FusedFeatures, visual: VisualFeatures | None, attr_probs: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """BIO tag logits (B, T, K) from [t_i; h_i; ŷ; regional visual_i], and the regional gate (B, R, D).

        The regional visual vector re-reads the fused attention over regions, with each region's value scaled by
        the regional gate conditioned on the predicted attributes ŷ.
        """
        b, t, d = text.tokens.shape
        gate = None
        if visual is None or fused.attention is None:
            regional = text.tokens.new_zeros(b, t, d)
        else:
            values = fused.values  # (B, R, D)
            if self.regional_gate is not None:
                gate = self.regional_gate(attr_probs, visual.regions)  # (B, R, D)
                values = gate * values
            regional = fused.attention @ values  # (B, T, D)
        feats = [text.tokens, fused.hidden, attr_probs[:, None, :].expand(b, t, -1), regional]
        return self.tag_head(self.dropout(torch.cat(feats, -1))), gate

    def predict_implicit(
        self, text: TextFeatures, fused: FusedFeatures, visual: VisualFeatures | None
    ) -> tuple[Tensor, ...]:
        """One value-index logit vector (B, V_k) per implicit attribute from [c; mean h; v_G]."""
        if not self.implicit_heads:
            return ()
        pooled = visual.pooled if visual is not None else text.cls.new_zeros(text.cls.shape)
        feats = self.dropout(torch.cat([text.cls, masked_mean(fused.hidden, text.mask, 1), pooled], -1))
        return tuple(head(feats) for head in self.implicit_heads)

    def forward(self, batch: ProductBatch) -> JaveOutput:
        text = self.encode_text(batch)
        visual = self.encode_image(batch)
        fused = self.fuse(text, visual)
        attr_logits = self.predict_attributes(text, fused)
        tag_logits, regional_gate = self.tag_values(text, fused, visual, torch.sigmoid(attr_logits))
        return JaveOutput(
            attr_logits=attr_logits,
            tag_logits=tag_logits,
            implicit_logits=self.predict_implicit(text, fused, visual),
            global_gate=fused.global_gate,
            regional_gate=regional_gate,
            region_attention=fused.attention,
        )


# ---------------------------------------------------------------------------------------------------- presets


def jave_tiny(num_attributes: int = 3, implicit_value_sizes: tuple[int, ...] = (3,), **overrides) -> JaveModel:
    """Random hidden-32 towers, D=32: for tests."""
    return JaveModel(JaveConfig.tiny(num_attributes, implicit_value_sizes, **overrides))


def jave_default(num_attributes: int, implicit_value_sizes: tuple[int, ...] = (), **overrides) -> JaveModel:
    """all-MiniLM-L6-v2 + ImageNet tf_efficientnet_lite0 from their PyPI packages (offline), D=256."""
    return JaveModel(JaveConfig.default(num_attributes, implicit_value_sizes, **overrides))
