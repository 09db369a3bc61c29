"""Public-dataset importers: each streams a dataset folder as canonical catalog rows (``warehouse.schema``).

``get_importer(name).iter_rows(path, split=None, stats=None)`` yields dicts with exactly the canonical fields;
``source`` is the dataset name and ``extra`` a JSON object with at least ``split`` and ``dataset``. Ditto also
has ``iter_pairs(path, split=None)`` yielding ``PAIRS`` rows.
"""

from __future__ import annotations

from ._common import NA_VALUE, Importer, ImportStats, align_value, field_text, linearize_specs
from .ditto import IMPORTER as _DITTO
from .extractgpt import AE110K as _AE110K
from .extractgpt import OAMINE as _OAMINE
from .implicitave import IMPORTER as _IMPLICITAVE
from .mepave import IMPORTER as _MEPAVE
from .myntra import IMPORTER as _MYNTRA
from .wdc_pave import IMPORTER as _WDC_PAVE

IMPORTERS: dict[str, Importer] = {
    imp.name: imp for imp in (_AE110K, _OAMINE, _WDC_PAVE, _IMPLICITAVE, _MYNTRA, _DITTO, _MEPAVE)
}


def get_importer(name: str) -> Importer:
    """The importer registered as ``name``; a ValueError lists the valid names otherwise."""
    try:
        return IMPORTERS[name]
    except KeyError:
        raise ValueError(f"Unknown dataset {name!r}; valid datasets are {sorted(IMPORTERS)}") from None


__all__ = [
    "IMPORTERS",
    "NA_VALUE",
    "ImportStats",
    "Importer",
    "align_value",
    "field_text",
    "get_importer",
    "linearize_specs",
]
