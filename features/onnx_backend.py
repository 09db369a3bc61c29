"""ONNX Runtime for the towers at inference on CPU: the frozen image tower in fp32, the text tower in fp32 or int8.

Measured on the 2-core box (bench/enrich.py, bench/precision.py): tf_efficientnet_lite0 at 224², batch 32 runs
~4x faster under ONNX Runtime than in eager PyTorch (depthwise convolutions; outputs equal to 1e-5), and
all-MiniLM-L6-v2 with dynamically quantized int8 weights (per output channel, AVX512-VNNI) ~1.7x faster than fp32
PyTorch, with a quality cost reported by bench/precision.py. In fp32 the text tower also runs ~2x faster under ONNX
Runtime than in eager PyTorch (2026-11-23, torch 2.14.1, onnxruntime 1.32, 2 cores: batch 64 at 42 tokens 337-356
vs 162-189 texts/s, at 16 tokens 1,000 vs 420, at 128 tokens 96 vs 55; states equal to ~4e-6), so fp32 inference on
CPU uses it (`flows.jave_pyfunc.JaveEnricher.configure`, `flows.dedupe.Embedder`); where bf16 autocast measures
faster than fp32 (an AVX512-BF16 CPU: 513-521 texts/s), PyTorch bf16 is faster still and keeps the tower.

A tower is exported once per weights fingerprint (`features.runtime.weights_fingerprint`) with the TorchScript
exporter into ``<cache>/onnx/<kind>-<fingerprint>[-int8].onnx`` (written atomically, so concurrent workers may race
safely) and reused by every later process. ONNX files are protobuf graphs + tensors: loading one runs no pickled code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "auto")
OPSET = 17
# MatMuls of the text tower that int8 leaves in fp32 (regexes over the exported node names): chosen on AE-110K
# *validation* with bench/precision.py --split validation (see the README's precision table)
# (152 products: extractgpt F1 fp32 0.6985; all MatMuls int8 -0.42 points; FFN output projections kept fp32 -0.21).
# BERT's FFN outputs carry the outlier activations that per-batch int8 handles worst.
INT8_KEEP_FP32: tuple[str, ...] = (r"layer\.\d+/output/dense/",)


def onnx_available() -> bool:
    """True when onnxruntime and onnx import (both are dependencies of enrich; a trimmed install may lack them)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``torch`` | ``onnx`` | ``auto`` on ``device`` -> ``torch`` or ``onnx``. ONNX Runtime is used on CPU only
    (this package ships the CPU build); ``auto`` picks it there when it is installed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend == "onnx":
        if device.type != "cpu":
            raise ValueError(f"backend 'onnx' runs on CPU only, not {device}; use --backend torch or auto on a GPU")
        if not onnx_available():
            raise ValueError("backend 'onnx' was asked for but onnxruntime/onnx are not installed: pip install enrich")
    if backend == "auto":
        return "onnx" if device.type == "cpu" and onnx_available() else "torch"
    return backend


def cache_dir() -> Path:
    """Where exported graphs live: ``$ENRICH_ONNX_CACHE`` or ``<towers cache>/onnx``."""
    if os.environ.get("ENRICH_ONNX_CACHE"):
        return Path(os.environ["ENRICH_ONNX_CACHE"])
    from features.towers import cache_root

    return cache_root() / "onnx"


def _export(module: nn.Module, inputs: tuple[Tensor, ...], names: Sequence[str], outputs: Sequence[str],
            dynamic: dict[str, dict[int, str]]) -> bytes:  # fmt: skip
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module, inputs, buf, input_names=list(names), output_names=list(outputs), dynamic_axes=dynamic,
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    return buf.getvalue()


def _quantize(model_bytes: bytes, keep_fp32: Sequence[str] = ()) -> bytes:
    """Dynamic int8 quantization of the MatMuls, weights per output channel, activations per batch; MatMul nodes
    whose name matches a ``keep_fp32`` regex stay in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load_from_string(model_bytes).graph
    keep = [n.name for n in graph.node if n.op_type == "MatMul" and any(re.search(p, n.name) for p in keep_fp32)]
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantizer logs its preprocess advice on the root logger
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(model_bytes)
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=keep)  # fmt: skip
            return dst.read_bytes()
    finally:
        root.setLevel(level)


def exported(
    module: nn.Module,
    key: str,
    inputs: tuple[Tensor, ...],
    names: Sequence[str],
    outputs: Sequence[str],
    dynamic: dict[str, dict[int, str]],
    *,
    int8: bool = False,
    keep_fp32: Sequence[str] = (),
    root: Path | None = None,
) -> Path:
    """The ONNX file of ``module`` (traced on ``inputs``) cached under ``key``; exported (and quantized, but for the
    MatMuls matching ``keep_fp32``) if absent."""
    from warehouse.media import atomic_write

    suffix = ""
    if int8:
        suffix = "-int8" + (f"-{hashlib.sha256(repr(tuple(keep_fp32)).encode()).hexdigest()[:8]}" if keep_fp32 else "")
    path = (root or cache_dir()) / f"{key}{suffix}.onnx"
    fallback = Path(tempfile.gettempdir()) / "enrich-onnx" / path.name  # when the cache cannot be written
    for done in (path, fallback):
        if done.exists():
            return done
    was_training = module.training
    module.eval()
    try:
        data = _export(module, inputs, names, outputs, dynamic)
    finally:
        module.train(was_training)
    if int8:
        data = _quantize(data, keep_fp32)
    import fsspec

    try:
        atomic_write(fsspec.filesystem("file"), str(path), data, local=True)
    except OSError as err:  # a read-only cache (e.g. a container's): this process keeps its own copy
        log.warning("cannot write %s (%s); using %s. Set ENRICH_ONNX_CACHE to a writable folder", path, err, fallback)
        atomic_write(fsspec.filesystem("file"), str(fallback), data, local=True)
        return fallback
    log.info("exported %s (%.1f MB)", path, len(data) / 2**20)
    return path


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: torch's setting), 1 inter-op."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """Runs an exported graph in place of the module it came from: same tensors in, same tensors out (CPU)."""

    def __init__(self, path: Path, names: Sequence[str], threads: int | None = None, **attrs: object) -> None:
        super().__init__()
        self.path = Path(path)
        self.names = tuple(names)
        self.session = session(self.path, threads)
        for k, v in attrs.items():
            setattr(self, k, v)

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        feed = {n: x.detach().cpu().numpy() for n, x in zip(self.names, inputs, strict=True)}
        outs = [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def onnx_image_tower(tower: nn.Module, threads: int | None = None, root: Path | None = None) -> OnnxModule:
    """The image tower (pixels (N, 3, H, W) -> global (N, Dv), regions (N, R, Dv)) under ONNX Runtime, fp32."""
    from features.runtime import weights_fingerprint

    _, h, w = tower.data_config["input_size"]
    key = f"image-{weights_fingerprint(tower, 'onnx', OPSET, h, w)}"
    example = (torch.zeros(2, 3, h, w),)
    path = exported(tower, key, example, ["pixels"], ["global", "regions"],
                    {"pixels": {0: "n"}, "global": {0: "n"}, "regions": {0: "n"}}, root=root)  # fmt: skip
    return OnnxModule(path, ["pixels"], threads, hidden_size=tower.hidden_size)


def onnx_text_tower(
    tower: nn.Module,
    *,
    int8: bool,
    keep_fp32: Sequence[str] | None = None,
    threads: int | None = None,
    root: Path | None = None,
) -> OnnxModule:
    """The text tower (input_ids, attention_mask (B, T) -> states (B, T, Dt)) under ONNX Runtime, fp32 or int8
    (``keep_fp32``: MatMul name patterns left in fp32; default `INT8_KEEP_FP32`)."""
    from features.runtime import weights_fingerprint

    key = f"text-{weights_fingerprint(tower, 'onnx', OPSET)}"
    ids = torch.full((2, 8), 100, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    dyn = {"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}, "states": {0: "b", 1: "t"}}
    keep = INT8_KEEP_FP32 if keep_fp32 is None else tuple(keep_fp32)
    path = exported(tower, key, (ids, mask), ["input_ids", "attention_mask"], ["states"], dyn, int8=int8,
                    keep_fp32=keep, root=root)  # fmt: skip
    return OnnxModule(path, ["input_ids", "attention_mask"], threads, hidden_size=tower.hidden_size)


@contextlib.contextmanager
def swapped(owner: nn.Module, attr: str, replacement: nn.Module | None):
    """Temporarily set ``owner.<attr>`` to ``replacement`` (no-op when None); the original comes back after."""
    if replacement is None:
        yield
        return
    original = owner._modules[attr]
    owner._modules[attr] = replacement
    try:
        yield
    finally:
        owner._modules[attr] = original
