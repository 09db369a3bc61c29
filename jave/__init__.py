"""JAVE (Zhu et al., EMNLP 2020): multimodal joint attribute prediction and value extraction, in pure PyTorch."""

from jave.config import JaveConfig
from jave.losses import jave_loss
from jave.model import JaveModel, JaveOutput, jave_default, jave_tiny

__all__ = ["JaveConfig", "JaveModel", "JaveOutput", "jave_default", "jave_loss", "jave_tiny"]
