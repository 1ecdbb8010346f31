"""BEIR's ``queries.jsonl`` / ``corpus.jsonl`` (``_id``, ``text``, ``title``) and ``qrels/<split>.tsv``."""

from __future__ import annotations

from collections.abc import Container, Iterable
from pathlib import Path
from typing import Any

from kdlab.data.readers.base import (
    DataFormatError,
    PathLike,
    _as_container,
    _optional_id,
    _parse_int,
    _require_str,
    iter_jsonl,
    iter_lines,
)


def _read_beir_jsonl(path: Path, with_title: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    first_line: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        key = _optional_id(path, line, obj, "_id", "_id")
        if key is None:
            raise DataFormatError(path, line, "_id", "missing (expected an id)")
        if key in out:
            raise DataFormatError(path, line, "_id", f"duplicate id {key!r} (first on line {first_line[key]})")
        text = _require_str(path, line, obj, "text", allow_empty=with_title)
        if with_title:
            title = _require_str(path, line, obj, "title", allow_empty=True) if "title" in obj else ""
            if not (title.strip() or text.strip()):
                raise DataFormatError(path, line, "text", "title and text are both empty")
            out[key] = (title, text)
        else:
            out[key] = text
        first_line[key] = line
    return out


def read_beir_queries(path: PathLike) -> dict[str, str]:
    """A BEIR ``queries.jsonl`` (``_id``, ``text``): query id → text."""
    return _read_beir_jsonl(Path(path), with_title=False)


def read_beir_qrels(path: PathLike, doc_ids: Container[str] | Iterable[str] | None = None,
                    query_ids: Container[str] | Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """A BEIR ``qrels/<split>.tsv``: header ``query-id corpus-id score``, then tab-separated rows.
    Ids must exist in the queries and the corpus when those are given."""
    known_docs = _as_container(doc_ids)
    known_queries = _as_container(query_ids)
    qrels: dict[str, dict[str, int]] = {}
    header_seen = False
    for line, text in iter_lines(path):
        parts = text.split("\t")
        if not header_seen:
            header_seen = True
            if parts[0].strip().lower() in {"query-id", "query_id", "qid"}:
                continue
            raise DataFormatError(path, line, None, "expected a header 'query-id\\tcorpus-id\\tscore'")
        if len(parts) != 3:
            raise DataFormatError(path, line, None, f"expected 3 tab-separated columns, got {len(parts)}")
        qid, pid, score_token = (p.strip() for p in parts)
        if known_queries is not None and qid not in known_queries:
            raise DataFormatError(path, line, "query-id", f"unknown query id {qid!r} (not in queries.jsonl)")
        if known_docs is not None and pid not in known_docs:
            raise DataFormatError(path, line, "corpus-id", f"unknown document id {pid!r} (not in corpus.jsonl)")
        judged = qrels.setdefault(qid, {})
        if pid in judged:
            raise DataFormatError(path, line, "corpus-id", f"duplicate judgement for query {qid!r}, document {pid!r}")
        judged[pid] = _parse_int(path, line, "score", score_token)
    return qrels


__all__ = ["read_beir_qrels", "read_beir_queries"]
