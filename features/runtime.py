"""Inference runtime settings shared by the towers' users: device choice, threads, bf16 autocast, channels_last, and
batched image-tower features with a fingerprint of the backbone that produced them (the visual cache's key)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16", "int8", "auto")


def resolve_device(device: str = "auto") -> torch.device:
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` (cuda when available) -> a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith(DEVICES[:2]):
        raise ValueError(f"device {device!r} is not one of {DEVICES} (or cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def cpu_bf16_supported() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX), where bf16 autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu_bf16_speedup(rows: int = 1024, width: int = 384, trials: int = 9) -> float:
    """fp32 time / bf16 time of a transformer-sized linear layer on this CPU: the median over ``trials`` of the
    ratio of back-to-back runs (~0.2 s, once per process; pairing and the median keep a busy machine from deciding).
    A CPU can have bf16 instructions and still run bf16 slower (no AMX, a VM, the oneDNN build), so ``auto``
    measures instead of trusting the flags."""
    x, layer = torch.randn(rows, width), nn.Linear(width, 4 * width)
    ratios = []
    with torch.no_grad():
        for dtype in (None, torch.bfloat16):  # warm-up: first-call setup is not what is measured
            with autocast(torch.device("cpu"), dtype):
                layer(x)
        for _ in range(trials):
            seconds = []
            for dtype in (None, torch.bfloat16):
                with autocast(torch.device("cpu"), dtype):
                    t = time.perf_counter()
                    layer(x)
                    seconds.append(time.perf_counter() - t)
            ratios.append(seconds[0] / seconds[1])
    return float(np.median(ratios))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``auto``: bf16 on a CUDA GPU with bf16 support; on a CPU with native bf16 kernels only where bf16 measures at
    least 1.2x faster than fp32 (`cpu_bf16_speedup`); else fp32. ``int8`` (CPU only) is no autocast: the text tower
    runs int8-quantized under ONNX Runtime (`features.onnx_backend`), the rest in fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision 'int8' runs on CPU only (ONNX Runtime), not {device}; use bf16 or auto on a GPU")
    if precision in ("fp32", "int8"):
        return None
    ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_bf16_supported()
    if precision == "bf16" and not ok:
        raise ValueError(f"precision 'bf16' was asked for but {device} has no native bf16 support; use fp32 or auto")
    if precision == "auto" and ok and device.type == "cpu":
        ok = cpu_bf16_speedup() >= 1.2
    return torch.bfloat16 if ok else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


FP32_ATTENTION = "sdpa_fp32"  # the attention implementation `autocast_inference_copy` registers with transformers


def _fp32_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kw):
    """transformers' SDPA attention with reduced-precision CPU inputs computed in fp32 (outputs cast back)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype == torch.float32 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kw)
    return out.to(dtype), weights


@functools.cache
def _register_fp32_attention() -> bool:
    """Register `FP32_ATTENTION` (attention + mask) with transformers; False where its interfaces are missing."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    AttentionInterface.register(FP32_ATTENTION, _fp32_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FP32_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


def autocast_inference_copy(tower: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An inference copy of a (Hugging Face) text tower for ``dtype`` autocast on ``device``, to run in its place.

    - Its Linear weights and biases are stored in ``dtype``. Autocast would cast them on every call: the outputs
      are the same bits, without the copies (``aten::copy_`` was 7% of a warm call's torch profile).
    - On CPU its SDPA attention computes in fp32 (`FP32_ATTENTION`). At product-title lengths (~50 tokens) the
      CPU flash kernel takes 3.2 ms per call in fp32 against 4.7 ms in bf16, and is more exact (it was 20.6% of
      that profile).

    The other parameters (embeddings, LayerNorms) are shared with ``tower``, not copied. Inference only: the copy
    holds frozen weights and is in eval mode; ``tower`` itself is left as it was.
    """
    import copy

    linear = {id(p) for m in tower.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    shared = {id(p): p for p in tower.parameters() if id(p) not in linear}
    out = copy.deepcopy(tower, memo=shared)
    for m in out.modules():
        if isinstance(m, nn.Linear):
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, nn.Parameter(p.detach().to(device=device, dtype=dtype), requires_grad=False))
    hf = getattr(out, "model", None)
    config = getattr(hf, "config", None)
    if (device.type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa"
            and hasattr(hf, "set_attn_implementation") and _register_fp32_attention()):  # fmt: skip
        hf.set_attn_implementation(FP32_ATTENTION)
    return out.eval()


def set_threads(threads: int | None = None) -> int:
    """Intra-op threads = the cores this process may use (or ``threads``); inter-op 1, as the forward is one
    sequential graph. Returns the intra-op count. Safe to call more than once."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(threads)))
    with contextlib.suppress(RuntimeError):  # only settable before the first inter-op parallel work
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def weights_fingerprint(module: nn.Module, *extra: object) -> str:
    """16 hex digits of sha256 over the module's state dict (names, shapes, dtypes, bytes) and ``extra``."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps([str(e) for e in extra]).encode())
    return h.hexdigest()[:16]


@dataclass
class ImageEncoder:
    """Batched features from an image tower (its ``forward`` -> global (N, Dv), regions (N, R, Dv)) on a device,
    channels_last and with optional autocast, or exported to ONNX Runtime (``backend="onnx"``, CPU, fp32: ~4x
    eager PyTorch for EfficientNet-Lite0 here, same features to 1e-5). ``calls`` counts the tower's forward passes."""

    tower: nn.Module
    device: torch.device
    dtype: torch.dtype | None = None
    batch_size: int = 32
    channels_last: bool = True
    backend: str = "torch"
    calls: int = 0

    def __post_init__(self) -> None:
        self._onnx = None
        if self.backend == "onnx":
            from features.onnx_backend import onnx_image_tower

            self._onnx = onnx_image_tower(self.tower)
        elif self.channels_last:
            self.tower.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images (N, 3, H, W) -> float32 numpy global (N, Dv) and regions (N, R, Dv)."""
        globs, regions = [], []
        for chunk in _chunks(pixels, self.batch_size):
            if self._onnx is not None:
                g, r = self._onnx(chunk)
                self.calls += 1
                globs.append(g.numpy())
                regions.append(r.numpy())
                continue
            x = chunk.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.dtype):
                g, r = self.tower(x)
            self.calls += 1
            globs.append(g.float().cpu().numpy())
            regions.append(r.float().cpu().numpy())
        return np.concatenate(globs), np.concatenate(regions)


def encode_images(
    encoder: ImageEncoder,
    keys: Sequence[Hashable],
    load: Callable[[Hashable], torch.Tensor | None],
    *,
    io_threads: int = 4,
    chunk: int = 256,
    max_bytes: int | None = None,
) -> dict[Hashable, tuple[np.ndarray, np.ndarray]]:
    """key -> (global (Dv,), regions (R, Dv)) float16 features of the images ``load`` gives for ``keys``.

    ``load(key)`` returns one preprocessed image (3, H, W), or None when it cannot be read (that key is left out).
    Images are loaded on ``io_threads`` threads and encoded ``chunk`` at a time, so pixels never take more than one
    chunk's memory. Features are rounded to float16, as the visual feature store keeps them, so a model sees the
    same numbers whether they were computed now or read back. With ``max_bytes``, an empty dict comes back as soon
    as the features would need more than that (the caller then computes them per batch instead).
    """
    out: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}
    keys = list(dict.fromkeys(keys))
    with ThreadPoolExecutor(max(1, io_threads)) as pool:
        for start in range(0, len(keys), chunk):
            loaded = [(k, px) for k, px in zip(keys[start : start + chunk], pool.map(load, keys[start : start + chunk]),
                                               strict=True) if px is not None]  # fmt: skip
            if not loaded:
                continue
            # filled in numpy: a plain copy, where torch.stack's intra-op threads only add barriers
            pixels = np.empty((len(loaded), *loaded[0][1].shape), np.float32)
            for i, (_, px) in enumerate(loaded):
                pixels[i] = px.numpy()
            glob, regions = encoder(torch.from_numpy(pixels))
            glob, regions = glob.astype(np.float16), regions.astype(np.float16)
            out.update((k, (glob[i], regions[i])) for i, (k, _) in enumerate(loaded))
            if max_bytes is not None and (glob[0].nbytes + regions[0].nbytes) * len(keys) > max_bytes:
                return {}
    return out


def cuda_batch_size(per_item_bytes: int, fraction: float = 0.5, cap: int = 1024, floor: int = 8) -> int:
    """A batch size that fills ``fraction`` of the GPU's free memory at ``per_item_bytes`` of activations each."""
    free, _ = torch.cuda.mem_get_info()
    return int(max(floor, min(cap, fraction * free // max(per_item_bytes, 1))))


def _chunks(x: torch.Tensor, n: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], n):
        yield x[i : i + n]
