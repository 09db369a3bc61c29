"""Architecture configuration of JAVE (Zhu et al., EMNLP 2020, "Multimodal Joint Attribute Prediction and Value
Extraction for E-commerce Product"), with `tiny` (tests) and `default` (offline pretrained towers) presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from features.towers import ImageTowerConfig, TextTowerConfig


@dataclass(frozen=True)
class JaveConfig:
    """One JAVE architecture; ``dataclasses.asdict(cfg)`` is what gets logged as run parameters.

    Attributes:
        num_attributes: A, the attributes the tagger extracts and the attribute head predicts.
        implicit_value_sizes: value-set size per implicit attribute (closed sets, e.g. sleeve style from the image).
        text: the text tower.
        image: the image tower.
        hidden_size: D, the fused width every stage works in.
        dropout: applied to every projected feature and head input while training.
        use_image: False = text-only ablation; the image tower is not even built.
        use_global_gate: False = h_i = t_i + attended_i (no global visual gate).
        use_regional_gate: False = the tagger's regional visual vector uses the plain attention over regions.
        use_kl: False = no KL consistency term between attribute head and tagger.
        kl_weight: λ, the KL term's weight (0.5 in JAVE).
    """

    num_attributes: int
    implicit_value_sizes: tuple[int, ...] = ()
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    hidden_size: int = 256
    dropout: float = 0.1
    use_image: bool = True
    use_global_gate: bool = True
    use_regional_gate: bool = True
    use_kl: bool = True
    kl_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.num_attributes < 1:
            raise ValueError(f"num_attributes ({self.num_attributes}) must be >= 1: JAVE needs an attribute to tag")
        bad = [n for n in self.implicit_value_sizes if n < 2]
        if bad:
            raise ValueError(
                f"implicit_value_sizes {self.implicit_value_sizes} has sets of size {bad}; each needs >= 2"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout ({self.dropout}) must be in [0, 1)")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight ({self.kl_weight}) must be >= 0; use use_kl=False to switch the term off")

    @property
    def num_tags(self) -> int:
        """K = 1 + 2A: "O", then B-a at 1 + 2a and I-a at 2 + 2a (as jave.codec numbers them)."""
        return 1 + 2 * self.num_attributes

    @classmethod
    def tiny(
        cls, num_attributes: int = 3, implicit_value_sizes: tuple[int, ...] = (3,), **overrides: Any
    ) -> JaveConfig:
        """Random hidden-32 towers and D=32, for tests: builds in a second, reads no weights."""
        base = cls(
            num_attributes=num_attributes,
            implicit_value_sizes=tuple(implicit_value_sizes),
            text=TextTowerConfig(tiny=True),
            image=ImageTowerConfig(tiny=True, trainable=True),
            hidden_size=32,
            dropout=0.1,
        )
        return replace(base, **overrides)

    @classmethod
    def default(cls, num_attributes: int, implicit_value_sizes: tuple[int, ...] = (), **overrides: Any) -> JaveConfig:
        """all-MiniLM-L6-v2 (fine-tuned) + frozen ImageNet tf_efficientnet_lite0 (cacheable features), D=256."""
        base = cls(num_attributes=num_attributes, implicit_value_sizes=tuple(implicit_value_sizes))
        return replace(base, **overrides)
