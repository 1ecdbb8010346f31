"""TREC qrels (``qid 0 pid rel``) and runs (``qid Q0 pid rank score tag``).

:func:`read_run` also takes MS MARCO's three-column run (``qid \\t pid \\t rank``) — the layout of the
official baseline runs — since it shares the TREC run's checks and result.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass

from kdlab.data.readers.base import (
    DataFormatError,
    PathLike,
    _as_container,
    _parse_float,
    _parse_int,
    iter_lines,
)


@dataclass(frozen=True, slots=True)
class RunEntry:
    """One line of a TREC run file."""

    doc_id: str
    rank: int
    score: float


def _check_known_ids(path: PathLike, line: int, qid: str, pid: str, known_queries: Container[str] | None,
                     known_docs: Container[str] | None) -> None:
    """A qrels/run line must name a query and a document that the other files define (when given)."""
    if known_queries is not None and qid not in known_queries:
        raise DataFormatError(path, line, "qid", f"unknown query id {qid!r} (not in the queries file)")
    if known_docs is not None and pid not in known_docs:
        raise DataFormatError(path, line, "pid", f"unknown document id {pid!r} (not in the collection)")


def read_trec_qrels(path: PathLike, doc_ids: Container[str] | Iterable[str] | None = None,
                    query_ids: Container[str] | Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """Read TREC qrels ``qid 0 pid rel`` (whitespace-separated). When ``doc_ids``/``query_ids`` are
    given, ids outside them are errors (a qrels file for another collection is a common mistake)."""
    known_docs = _as_container(doc_ids)
    known_queries = _as_container(query_ids)
    qrels: dict[str, dict[str, int]] = {}
    for line, text in iter_lines(path):
        parts = text.split()
        if len(parts) != 4:
            raise DataFormatError(path, line, None, f"expected 4 columns 'qid 0 pid rel', got {len(parts)}")
        qid, _, pid, rel_token = parts
        rel = _parse_int(path, line, "rel", rel_token)
        _check_known_ids(path, line, qid, pid, known_queries, known_docs)
        judged = qrels.setdefault(qid, {})
        if pid in judged:
            raise DataFormatError(path, line, "pid", f"duplicate judgement for query {qid!r}, document {pid!r}")
        judged[pid] = rel
    return qrels


def read_trec_run(path: PathLike, doc_ids: Container[str] | Iterable[str] | None = None,
                  query_ids: Container[str] | Iterable[str] | None = None) -> dict[str, list[RunEntry]]:
    """Read a TREC run ``qid Q0 pid rank score tag``. Each query's entries are returned best first
    (by score descending, then rank ascending, then doc id, so ties are ordered deterministically).
    Scores must be finite; a (qid, pid) pair may appear once."""
    known_docs = _as_container(doc_ids)
    known_queries = _as_container(query_ids)
    run: dict[str, dict[str, RunEntry]] = {}
    for line, text in iter_lines(path):
        parts = text.split()
        if len(parts) != 6:
            raise DataFormatError(path, line, None, f"expected 6 columns 'qid Q0 pid rank score tag', got {len(parts)}")
        qid, _, pid, rank_token, score_token, _tag = parts
        rank = _parse_int(path, line, "rank", rank_token)
        score = _parse_float(path, line, "score", score_token)
        _check_known_ids(path, line, qid, pid, known_queries, known_docs)
        entries = run.setdefault(qid, {})
        if pid in entries:
            raise DataFormatError(path, line, "pid", f"duplicate entry for query {qid!r}, document {pid!r}")
        entries[pid] = RunEntry(pid, rank, score)
    return {
        qid: sorted(entries.values(), key=lambda e: (-e.score, e.rank, e.doc_id))
        for qid, entries in run.items()
    }


def read_run(path: PathLike, doc_ids: Container[str] | Iterable[str] | None = None,
             query_ids: Container[str] | Iterable[str] | None = None, *,
             allow_msmarco_tsv: bool = False) -> dict[str, list[RunEntry]]:
    """A TREC run, or (``allow_msmarco_tsv``) an MS MARCO run ``qid \t pid \t rank`` — the format of
    the official MS MARCO baseline runs, which carry ranks but no scores. The whole file must use one
    of the two layouts (decided by its first line). An MS MARCO run's entries get ``score = −rank``,
    an order-preserving stand-in, so the first-stage ordering (all that NDCG/MRR use) is kept."""
    first = next(iter_lines(path))
    if not allow_msmarco_tsv or len(first[1].split()) == 6:
        return read_trec_run(path, doc_ids, query_ids)
    known_docs = _as_container(doc_ids)
    known_queries = _as_container(query_ids)
    run: dict[str, dict[str, RunEntry]] = {}
    for line, text in iter_lines(path):
        parts = text.split("\t")
        if len(parts) != 3:
            raise DataFormatError(path, line, None, f"expected 3 tab-separated columns 'qid pid rank' (the layout "
                                                    f"of line {first[0]}), got {len(parts)}")
        qid, pid, rank_token = (p.strip() for p in parts)
        rank = _parse_int(path, line, "rank", rank_token)
        _check_known_ids(path, line, qid, pid, known_queries, known_docs)
        entries = run.setdefault(qid, {})
        if pid in entries:
            raise DataFormatError(path, line, "pid", f"duplicate entry for query {qid!r}, document {pid!r}")
        entries[pid] = RunEntry(pid, rank, float(-rank))
    return {qid: sorted(entries.values(), key=lambda e: (e.rank, e.doc_id)) for qid, entries in run.items()}


__all__ = ["RunEntry", "read_run", "read_trec_qrels", "read_trec_run"]
