"""kdlab's own ranking JSONL: one query and its candidate documents per line, read and written.

:func:`read_ranking_jsonl` and :func:`write_ranking_jsonl` are inverses (:func:`ranking_group_to_json`
is one line of the file), so groups assembled from any other format can be saved in this one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kdlab.data.readers.base import (
    DataFormatError,
    PathLike,
    RankingDoc,
    RankingGroup,
    _describe,
    _optional_id,
    _optional_number,
    _require_str,
    iter_jsonl,
)
from kdlab.runs import write_jsonl_atomic


def read_ranking_jsonl(path: PathLike) -> list[RankingGroup]:
    """Read ranking groups: one JSON object per line,
    ``{"query_id"?: str, "query": str, "docs": [{"id", "text" | "title"+"summary", "label"?,
    "teacher_score"?, "first_stage_score"?, "reason"?}, ...]}``. Other keys are ignored. Labels may be
    fractional (click rates, averaged judgements); they are kept as they are.

    ``query_id`` defaults to the line number. Document ids must be unique within a group and query
    ids unique in the file; labels and teacher scores must be finite numbers.
    """
    groups: list[RankingGroup] = []
    seen_queries: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        query = _require_str(path, line, obj, "query")
        query_id = _optional_id(path, line, obj, "query_id", "query_id") or f"line{line}"
        if query_id in seen_queries:
            raise DataFormatError(path, line, "query_id",
                                  f"duplicate id {query_id!r} (first on line {seen_queries[query_id]})")
        seen_queries[query_id] = line
        if "docs" not in obj:
            raise DataFormatError(path, line, "docs", "missing (expected a list of documents)")
        raw_docs = obj["docs"]
        if not isinstance(raw_docs, list) or not raw_docs:
            raise DataFormatError(path, line, "docs", f"expected a non-empty list of documents, got {_describe(raw_docs)}")
        docs: list[RankingDoc] = []
        seen_docs: set[str] = set()
        for j, d in enumerate(raw_docs):
            prefix = f"docs[{j}]"
            if not isinstance(d, dict):
                raise DataFormatError(path, line, prefix, f"expected an object, got {_describe(d)}")
            doc_id = _optional_id(path, line, d, "id", f"{prefix}.id")
            if doc_id is None:
                raise DataFormatError(path, line, f"{prefix}.id", "missing (expected a document id)")
            if doc_id in seen_docs:
                raise DataFormatError(path, line, f"{prefix}.id", f"duplicate document id {doc_id!r} in this group")
            seen_docs.add(doc_id)
            if "text" in d:
                title, body = "", _require_str(path, line, d, "text", f"{prefix}.text")
            elif "title" in d or "summary" in d:
                title = _require_str(path, line, d, "title", f"{prefix}.title", allow_empty=True) if "title" in d else ""
                body = _require_str(path, line, d, "summary", f"{prefix}.summary", allow_empty=True) if "summary" in d else ""
                if not (title.strip() or body.strip()):
                    raise DataFormatError(path, line, f"{prefix}.title", "title and summary are both empty")
            else:
                raise DataFormatError(path, line, f"{prefix}.text", "missing (expected 'text' or 'title'+'summary')")
            docs.append(RankingDoc(
                id=doc_id, title=title, body=body,
                label=_optional_number(path, line, d, "label", f"{prefix}.label"),
                teacher_score=_optional_number(path, line, d, "teacher_score", f"{prefix}.teacher_score"),
                first_stage_score=_optional_number(path, line, d, "first_stage_score", f"{prefix}.first_stage_score"),
                reason=None if d.get("reason") is None else _require_str(path, line, d, "reason", f"{prefix}.reason"),
            ))
        groups.append(RankingGroup(query_id, query, tuple(docs)))
    return groups


def ranking_group_to_json(group: RankingGroup) -> dict[str, Any]:
    """The JSONL form of a group (inverse of :func:`read_ranking_jsonl`); absent fields stay absent."""
    docs = []
    for d in group.docs:
        row: dict[str, Any] = {"id": d.id, "title": d.title, "summary": d.body}
        if d.label is not None:
            row["label"] = d.label
        if d.teacher_score is not None:
            row["teacher_score"] = d.teacher_score
        if d.first_stage_score is not None:
            row["first_stage_score"] = d.first_stage_score
        if d.reason is not None:
            row["reason"] = d.reason
        docs.append(row)
    return {"query_id": group.query_id, "query": group.query, "docs": docs}


def write_ranking_jsonl(path: PathLike, groups: Iterable[RankingGroup]) -> None:
    """Write ranking groups atomically in the JSONL format the ranking data module reads."""
    write_jsonl_atomic(path, (ranking_group_to_json(g) for g in groups))


__all__ = ["ranking_group_to_json", "read_ranking_jsonl", "write_ranking_jsonl"]
