"""FlagEmbedding's reranker/embedder training JSONL (``query``, ``pos``, ``neg``, ``*_scores``), read
into ranking groups and written from groups with teacher scores."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kdlab.data.readers.base import (
    DataFormatError,
    PathLike,
    RankingDoc,
    RankingGroup,
    _as_number,
    _describe,
    _require_str,
    iter_jsonl,
)
from kdlab.runs import write_jsonl_atomic


def _text_id(text: str) -> str:
    """A document id for formats without ids: a digest of the text, so one passage gets one id."""
    import hashlib

    return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def read_flagembedding_jsonl(path: PathLike) -> list[RankingGroup]:
    """FlagEmbedding's reranker/embedder training JSONL:
    ``{"query": str, "pos": [str, ...], "neg": [str, ...], "pos_scores"?: [float], "neg_scores"?: [float]}``
    (other keys such as ``prompt``/``type`` are ignored). ``pos`` documents get label 1, ``neg``
    documents label 0; ``pos_scores``/``neg_scores`` (a teacher's scores, when present) become
    ``teacher_score`` and must have one number per passage. Query ids are ``line<N>``; passages have
    no ids in this format, so each gets a digest of its text (the same passage twice in one line is an
    error: it would be both a positive and a negative, or counted twice)."""
    groups: list[RankingGroup] = []
    for line, obj in iter_jsonl(path):
        query = _require_str(path, line, obj, "query")
        docs: list[RankingDoc] = []
        seen: dict[str, str] = {}
        for key, label in (("pos", 1.0), ("neg", 0.0)):
            texts = obj.get(key, [])
            if not isinstance(texts, list):
                raise DataFormatError(path, line, key, f"expected a list of passages, got {_describe(texts)}")
            scores = obj.get(f"{key}_scores")
            if scores is not None and (not isinstance(scores, list) or len(scores) != len(texts)):
                raise DataFormatError(path, line, f"{key}_scores",
                                      f"expected a list of {len(texts)} numbers (one per '{key}' passage), "
                                      f"got {_describe(scores)}")
            for j, text in enumerate(texts):
                name = f"{key}[{j}]"
                if not isinstance(text, str) or not text.strip():
                    raise DataFormatError(path, line, name, f"expected a non-empty string, got {_describe(text)}")
                doc_id = _text_id(text)
                if doc_id in seen:
                    raise DataFormatError(path, line, name, f"the same passage as {seen[doc_id]}")
                seen[doc_id] = name
                teacher = None if scores is None else _as_number(path, line, f"{key}_scores[{j}]", scores[j])
                docs.append(RankingDoc(id=doc_id, title="", body=text, label=label, teacher_score=teacher))
        if not any(d.label for d in docs):
            raise DataFormatError(path, line, "pos", "expected at least one positive passage")
        groups.append(RankingGroup(f"line{line}", query, tuple(docs)))
    return groups


def flagembedding_record(group: RankingGroup) -> dict[str, Any]:
    """A group as FlagEmbedding JSONL: documents with a label > 0 are ``pos``, the rest ``neg``;
    teacher scores (which every document must have) go to ``pos_scores``/``neg_scores``."""
    missing = [d.id for d in group.docs if d.teacher_score is None]
    if missing:
        raise ValueError(f"query {group.query_id!r}: document {missing[0]!r} has no teacher_score; "
                         "FlagEmbedding distillation data needs one on every document (run `kdlab label` first)")
    pos = [d for d in group.docs if (d.label or 0.0) > 0]
    neg = [d for d in group.docs if (d.label or 0.0) <= 0]
    return {"query": group.query, "pos": [d.text for d in pos], "neg": [d.text for d in neg],
            "pos_scores": [d.teacher_score for d in pos], "neg_scores": [d.teacher_score for d in neg]}


def write_flagembedding_jsonl(path: PathLike, groups: Iterable[RankingGroup]) -> None:
    """Write groups with teacher scores as FlagEmbedding JSONL, atomically."""
    write_jsonl_atomic(path, (flagembedding_record(g) for g in groups))


__all__ = ["flagembedding_record", "read_flagembedding_jsonl", "write_flagembedding_jsonl"]
