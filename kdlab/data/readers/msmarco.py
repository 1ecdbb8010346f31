"""MS MARCO's ``id \\t text`` TSV files: ``collection.tsv`` (passages) and ``queries.*.tsv``.

These read a whole file into a dict; large collections go through the offset-indexed
:class:`~kdlab.data.collection.TextCollection` instead, with the same errors. MS MARCO's qrels and
runs are TREC-style (:mod:`kdlab.data.readers.trec`).
"""

from __future__ import annotations

from kdlab.data.readers.base import DataFormatError, PathLike, iter_lines


def read_tsv_texts(path: PathLike, id_field: str = "pid") -> dict[str, str]:
    """Read an MS MARCO style ``id \\t text`` file (``collection.tsv`` with ``pid``,
    ``queries.*.tsv`` with ``qid``). Ids must be unique and texts non-empty."""
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, text in iter_lines(path):
        parts = text.split("\t")
        if len(parts) != 2:
            raise DataFormatError(path, line, None, f"expected 2 tab-separated columns ({id_field}, text), got {len(parts)}")
        key, value = parts[0].strip(), parts[1].strip()
        if not key:
            raise DataFormatError(path, line, id_field, "empty id")
        if not value:
            raise DataFormatError(path, line, "text", "empty text")
        if key in texts:
            raise DataFormatError(path, line, id_field, f"duplicate id {key!r} (first on line {first_line[key]})")
        texts[key], first_line[key] = value, line
    return texts


def read_msmarco_collection(path: PathLike) -> dict[str, str]:
    """MS MARCO ``collection.tsv``: passage id → text."""
    return read_tsv_texts(path, "pid")


def read_msmarco_queries(path: PathLike) -> dict[str, str]:
    """MS MARCO ``queries.*.tsv``: query id → text."""
    return read_tsv_texts(path, "qid")


__all__ = ["read_msmarco_collection", "read_msmarco_queries", "read_tsv_texts"]
