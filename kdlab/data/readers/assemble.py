"""Ranking groups from a collection + queries + qrels + run: how MS MARCO, BEIR and TREC data become
the same records a kdlab JSONL file reads into."""

from __future__ import annotations

from collections.abc import Mapping

from kdlab.data.readers.base import CollectionDoc, RankingDoc, RankingGroup
from kdlab.data.readers.trec import RunEntry


def assemble_ranking_groups(
    queries: Mapping[str, str],
    corpus: Mapping[str, str | tuple[str, str]],
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, list[RunEntry]],
    top_k: int = 20,
    *,
    add_missing_positives: bool = False,
    only_judged_queries: bool = True,
    lazy_texts: bool = False,
) -> list[RankingGroup]:
    """Ranking groups from a run's top-k candidates per query, labelled from qrels (unjudged → 0),
    each candidate keeping the run's score as its ``first_stage_score`` (added positives have none).

    This is how MS MARCO / BEIR data feed the same data module as JSONL groups. Queries come out
    sorted by id so the result does not depend on dict order. ``add_missing_positives`` appends
    judged-relevant documents the run missed (useful for training sets; leave off for evaluation,
    where it would inflate metrics). ``only_judged_queries`` drops run queries without qrels, which
    carry no label signal. Unknown query/document ids raise ``KeyError`` naming the id — read the
    run with ``doc_ids``/``query_ids`` to get file:line errors instead. ``lazy_texts``: documents
    are :class:`CollectionDoc`s that read their texts from ``corpus`` when asked (``corpus`` must
    map an id to ``(title, text)``, as a :class:`~kdlab.data.collection.TextCollection` does).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    groups: list[RankingGroup] = []
    labels: dict[int, float] = {}
    for qid in sorted(run):
        judged = qrels.get(qid, {})
        if only_judged_queries and not judged:
            continue
        if qid not in queries:
            raise KeyError(f"query id {qid!r} of the run is not in the queries")
        first_stage = {e.doc_id: e.score for e in run[qid][:top_k]}
        doc_ids = list(first_stage)
        if add_missing_positives:
            doc_ids += sorted(pid for pid, rel in judged.items() if rel > 0 and pid not in first_stage)
        docs = []
        for pid in doc_ids:
            if pid not in corpus:
                raise KeyError(f"document id {pid!r} of the run is not in the collection")
            label = labels.setdefault(judged.get(pid, 0), float(judged.get(pid, 0)))  # one float per grade
            if lazy_texts:
                docs.append(CollectionDoc(pid, corpus, label, first_stage_score=first_stage.get(pid)))  # type: ignore[arg-type]
                continue
            entry = corpus[pid]
            title, body = entry if isinstance(entry, tuple) else ("", entry)
            docs.append(RankingDoc(id=pid, title=title, body=body, label=label, first_stage_score=first_stage.get(pid)))
        groups.append(RankingGroup(qid, queries[qid], tuple(docs)))
    return groups


__all__ = ["assemble_ranking_groups"]
