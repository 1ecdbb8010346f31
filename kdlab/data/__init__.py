"""Data for kdlab: the embedded sample, readers with ``file:line`` errors, collators and data modules.

The embedded sample (``kdlab/data/sample/``, built by ``scripts/build_sample.py`` from the standard
library's docstrings) lets every stage, test and example config run offline with no download.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR: Path = Path(__file__).resolve().parent / "sample"


def sample_names() -> list[str]:
    """Names accepted by :func:`sample_path`: the sample's data files and the ``tokenizer`` dir."""
    if not SAMPLE_DIR.is_dir():
        return []
    return sorted(p.name for p in SAMPLE_DIR.iterdir() if p.suffix == ".jsonl" or p.name == "tokenizer")


def sample_path(name: str) -> str:
    """Path of one embedded sample file, e.g. ``sample_path("ranking_train.jsonl")`` or
    ``sample_path("tokenizer")``; the ``.jsonl`` suffix may be left out.

    Raises ``FileNotFoundError`` listing the available names, so a typo in a config is fixable
    from the message alone.
    """
    names = sample_names()
    for candidate in (name, f"{name}.jsonl"):
        if candidate in names:
            return str(SAMPLE_DIR / candidate)
    raise FileNotFoundError(
        f"unknown sample name {name!r}; available: {', '.join(names) or '(none: run scripts/build_sample.py)'}"
    )


from kdlab.data.readers import DataFormatError  # noqa: E402  (stdlib-only import; cheap)

_DATAMODULES = ("ClickLogDataModule", "RankingDataModule", "Seq2SeqDataModule")


def __getattr__(name: str) -> object:
    """Lazy access to the data modules (``class_path: kdlab.data.RankingDataModule`` in configs)
    without importing Lightning for code that only reads files."""
    if name in _DATAMODULES:
        from kdlab.data import datamodules

        return getattr(datamodules, name)
    raise AttributeError(f"module 'kdlab.data' has no attribute {name!r}")


__all__ = ["SAMPLE_DIR", "DataFormatError", "sample_names", "sample_path", *_DATAMODULES]
