"""Click logs as JSONL: one query and the (title, summary) of the document clicked for it per line."""

from __future__ import annotations

from dataclasses import dataclass

from kdlab.data.readers.base import PathLike, _require_str, iter_jsonl


@dataclass(frozen=True)
class ClickRecord:
    """A query and the (title, summary) of the document clicked for it."""

    query: str
    title: str
    summary: str


def read_clicks_jsonl(path: PathLike) -> list[ClickRecord]:
    """Read click logs: ``{"query": str, "title": str, "summary": str}`` per line."""
    rows = []
    for line, obj in iter_jsonl(path):
        rows.append(ClickRecord(
            _require_str(path, line, obj, "query"),
            _require_str(path, line, obj, "title"),
            _require_str(path, line, obj, "summary", allow_empty=True),
        ))
    return rows


__all__ = ["ClickRecord", "read_clicks_jsonl"]
