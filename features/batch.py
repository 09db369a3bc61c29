"""Batches of products as tensors: the input contract shared by JAVE (Zhu et al., EMNLP 2020) and the product encoder.

Text is one token sequence per product (title [SEP] description [SEP] linearised specs) with a field id per token.
Media are any number of images and sampled video frames per product, padded to M with a mask; a product without
media has an all-False mask row and is never given a fake image.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

FIELD_SPECIAL = -1
FIELD_TITLE = 0
FIELD_DESCRIPTION = 1
FIELD_SPECS = 2
NUM_FIELDS = 3
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ProductBatch:
    """B products: text (B, T), media (B, M, ...) and optional training labels.

    Attributes:
        input_ids: token ids (B, T).
        attention_mask: 1 for real tokens, 0 for padding (B, T).
        token_field: 0 title, 1 description, 2 specs, -1 special or padding (B, T).
        media_mask: True where media slot m of product b holds an image or frame (B, M); all False = no media.
        pixel_values: preprocessed media (B, M, 3, H, W); unused slots hold anything (zeros by convention).
        visual_global: precomputed per-media global features (B, M, Dv), instead of pixel_values (a cache hit).
        visual_regions: precomputed per-media region features (B, M, R, Dv), with visual_global.
        attr_labels: 1.0 where the product has attribute a (B, A).
        tag_labels: BIO tag id per token, -100 ignored (B, T).
        implicit_labels: value index per implicit attribute, -100 unknown (B, A_impl).
    """

    input_ids: Tensor
    attention_mask: Tensor
    token_field: Tensor
    media_mask: Tensor
    pixel_values: Tensor | None = None
    visual_global: Tensor | None = None
    visual_regions: Tensor | None = None
    attr_labels: Tensor | None = None
    tag_labels: Tensor | None = None
    implicit_labels: Tensor | None = None

    def __post_init__(self) -> None:
        b, t = self.input_ids.shape
        for name in ("attention_mask", "token_field", "tag_labels"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b, t):
                raise ValueError(
                    f"ProductBatch.{name} has shape {tuple(value.shape)}; it must match input_ids {(b, t)}"
                )
        if self.media_mask.ndim != 2 or self.media_mask.shape[0] != b:
            raise ValueError(f"ProductBatch.media_mask has shape {tuple(self.media_mask.shape)}; it must be (B={b}, M)")
        if self.media_mask.dtype != torch.bool:
            raise ValueError(f"ProductBatch.media_mask has dtype {self.media_mask.dtype}; pass a bool tensor")
        m = self.media_mask.shape[1]
        if self.pixel_values is not None and tuple(self.pixel_values.shape[:2]) != (b, m):
            raise ValueError(
                f"ProductBatch.pixel_values is {tuple(self.pixel_values.shape)}; it must be (B={b}, M={m}, 3, H, W)"
            )
        if (self.visual_global is None) != (self.visual_regions is None):
            raise ValueError("ProductBatch needs both visual_global and visual_regions (or neither)")
        if self.visual_global is not None and tuple(self.visual_global.shape[:2]) != (b, m):
            raise ValueError(
                f"ProductBatch.visual_global is {tuple(self.visual_global.shape)}; it must be (B={b}, M={m}, Dv)"
            )
        if self.visual_regions is not None and tuple(self.visual_regions.shape[:2]) != (b, m):
            raise ValueError(
                f"ProductBatch.visual_regions is {tuple(self.visual_regions.shape)}; it must be (B={b}, M={m}, R, Dv)"
            )

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def has_visual_features(self) -> bool:
        """True when precomputed visual features replace pixel values."""
        return self.visual_global is not None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ProductBatch:
        """The same batch with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }
        return replace(self, **moved)
