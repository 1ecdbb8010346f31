"""The embedded sample (``kdlab/data/sample/``): where its files are, by name."""

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
