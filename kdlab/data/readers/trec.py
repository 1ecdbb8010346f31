"""TREC qrels (``qid 0 pid rel``) and runs (``qid Q0 pid rank score tag``).

:func:`read_run` also takes MS MARCO's three-column run (``qid \\t pid \\t rank``) — the layout of the
official baseline runs — since it shares the TREC run's checks and result.
"""

from __future__ import annotations

import heapq
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


class _BestEntries:
    """Each query's best ``top_k`` run entries while the run streams by: memory O(queries × top_k),
    not O(lines) (an MS MARCO run of 10 M lines held whole is ~1.4 GiB of entries).

    Order: score descending, then rank ascending, then doc id — the order the whole-file sort gave,
    so the kept entries are exactly that sort's first ``top_k``. A query's buffer grows to
    ``2 × top_k`` and is then cut back to its best ``top_k``; after a cut, an entry that ranks below
    the ``top_k``-th kept one cannot enter and is dropped without being stored (runs written best
    first, as trec_eval's and Pyserini's are, keep a query's first ``top_k`` lines and drop the rest).

    Duplicates: a (query, document) pair seen twice raises. Within a query's contiguous block of
    lines (the layout of every TREC/MS MARCO run) every line is checked; a run that is not grouped
    by query is checked against the entries kept so far, which is what keeps a document from
    entering a group twice.
    """

    __slots__ = ("block_qid", "block_seen", "floor", "kept", "path", "top_k")

    def __init__(self, path: PathLike, top_k: int | None) -> None:
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.path = path
        self.top_k = top_k
        self.kept: dict[str, dict[str, RunEntry]] = {}
        self.floor: dict[str, tuple[float, int, str]] = {}  # the worst kept key after a cut
        self.block_qid: str | None = None
        self.block_seen: set[str] = set()

    def add(self, line: int, qid: str, pid: str, rank: int, score: float) -> None:
        if qid != self.block_qid:
            self.block_qid, self.block_seen = qid, set()
        entries = self.kept.get(qid)
        if entries is None:
            entries = self.kept[qid] = {}
        if pid in self.block_seen or pid in entries:
            raise DataFormatError(self.path, line, "pid", f"duplicate entry for query {qid!r}, document {pid!r}")
        self.block_seen.add(pid)
        floor = self.floor.get(qid)
        if floor is not None and (-score, rank, pid) > floor:
            return
        entries[pid] = RunEntry(pid, rank, score)
        if self.top_k is not None and len(entries) >= 2 * self.top_k:
            self._cut(qid, entries)

    def _cut(self, qid: str, entries: dict[str, RunEntry]) -> None:
        best = heapq.nsmallest(self.top_k, entries.values(), key=_order)  # type: ignore[arg-type]
        entries.clear()
        entries.update((e.doc_id, e) for e in best)
        self.floor[qid] = _order(best[-1])

    def result(self) -> dict[str, list[RunEntry]]:
        return {qid: sorted(entries.values(), key=_order)[:self.top_k] for qid, entries in self.kept.items()}


def _order(entry: RunEntry) -> tuple[float, int, str]:
    return (-entry.score, entry.rank, entry.doc_id)


def read_trec_run(path: PathLike, doc_ids: Container[str] | Iterable[str] | None = None,
                  query_ids: Container[str] | Iterable[str] | None = None, *,
                  top_k: int | None = None) -> dict[str, list[RunEntry]]:
    """Read a TREC run ``qid Q0 pid rank score tag``. Each query's entries are returned best first
    (by score descending, then rank ascending, then doc id, so ties are ordered deterministically).
    Scores must be finite; a (qid, pid) pair may appear once. ``top_k`` keeps each query's best
    ``top_k`` while reading (memory O(queries × top_k), see :class:`_BestEntries`); every line is
    still checked."""
    known_docs = _as_container(doc_ids)
    known_queries = _as_container(query_ids)
    best = _BestEntries(path, top_k)
    for line, text in iter_lines(path):
        parts = text.split()
        if len(parts) != 6:
            raise DataFormatError(path, line, None, f"expected 6 columns 'qid Q0 pid rank score tag', got {len(parts)}")
        qid, _, pid, rank_token, score_token, _tag = parts
        rank = _parse_int(path, line, "rank", rank_token)
        score = _parse_float(path, line, "score", score_token)
        _check_known_ids(path, line, qid, pid, known_queries, known_docs)
        best.add(line, qid, pid, rank, score)
    return best.result()


def read_run(path: PathLike, doc_ids: Container[str] | Iterable[str] | None = None,
             query_ids: Container[str] | Iterable[str] | None = None, *,
             allow_msmarco_tsv: bool = False, top_k: int | None = None) -> dict[str, list[RunEntry]]:
    """A TREC run, or (``allow_msmarco_tsv``) an MS MARCO run ``qid \t pid \t rank`` — the format of
    the official MS MARCO baseline runs, which carry ranks but no scores. The whole file must use one
    of the two layouts (decided by its first line). An MS MARCO run's entries get ``score = −rank``,
    an order-preserving stand-in, so the first-stage ordering (all that NDCG/MRR use) is kept.
    ``top_k``: each query's best ``top_k`` only, kept while reading (as :func:`read_trec_run`)."""
    first = next(iter_lines(path))
    if not allow_msmarco_tsv or len(first[1].split()) == 6:
        return read_trec_run(path, doc_ids, query_ids, top_k=top_k)
    known_docs = _as_container(doc_ids)
    known_queries = _as_container(query_ids)
    best = _BestEntries(path, top_k)
    for line, text in iter_lines(path):
        parts = text.split("\t")
        if len(parts) != 3:
            raise DataFormatError(path, line, None, f"expected 3 tab-separated columns 'qid pid rank' (the layout "
                                                    f"of line {first[0]}), got {len(parts)}")
        qid, pid, rank_token = (p.strip() for p in parts)
        rank = _parse_int(path, line, "rank", rank_token)
        _check_known_ids(path, line, qid, pid, known_queries, known_docs)
        best.add(line, qid, pid, rank, float(-rank))
    return best.result()


__all__ = ["RunEntry", "read_run", "read_trec_qrels", "read_trec_run"]
