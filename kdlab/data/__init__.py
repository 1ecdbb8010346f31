"""Data for kdlab: the embedded sample, readers with ``file:line`` errors, collators and data modules.

The embedded sample (``kdlab/data/sample/``, built by ``scripts/build_sample.py`` from the standard
library's docstrings) lets every stage, test and example config run offline with no download.
"""

from __future__ import annotations

from kdlab.data.embedded import SAMPLE_DIR, sample_names, sample_path
from kdlab.data.readers import DataFormatError  # stdlib-only import; cheap

_DATAMODULES = ("ClickLogDataModule", "RankingDataModule", "Seq2SeqDataModule")


def __getattr__(name: str) -> object:
    """Lazy access to the data modules (``class_path: kdlab.data.RankingDataModule`` in configs)
    without importing Lightning for code that only reads files."""
    if name in _DATAMODULES:
        from kdlab.data import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module 'kdlab.data' has no attribute {name!r}")


__all__ = ["SAMPLE_DIR", "DataFormatError", "sample_names", "sample_path", *_DATAMODULES]
