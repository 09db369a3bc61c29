"""Report artifacts for MLflow runs: markdown tables, per-attribute F1 bar charts, confusion heatmaps (PNG); the
run logger."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task (it shows in the UI), the caller's module logger outside one."""
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # MissingContextError: called as a library
        return logging.getLogger("enrich")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4f") -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def f1_bar_chart(rows: Sequence[dict[str, Any]], path: str | Path, title: str, key: str = "f1") -> Path:
    """Horizontal bars of ``key`` per attribute, sorted, with support in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r.get(key, 0.0))
    height = max(2.5, 0.28 * len(rows) + 1)
    fig, ax = plt.subplots(figsize=(7, height))
    labels = [f"{r['attribute']} (n={r.get('support', '?')})" for r in rows]
    ax.barh(labels, [r.get(key, 0.0) for r in rows], color="#3b7dd8")
    ax.set_xlim(0, 1)
    ax.set_xlabel(key)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_heatmap(matrix: Any, labels: Sequence[str], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    size = max(4, 0.35 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
