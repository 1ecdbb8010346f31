"""Where a split's ranking groups come from: one typed source per split, named in a config.

A :class:`RankingSource` says which ``format`` the user's files are in and names them; the data
module (``data.init_args.train: {format: beir, path: ..., run: ...}``), ``kdlab label --input.*``,
``kdlab data convert`` and ``kdlab pipeline`` all read it through :func:`read_source`, so every
format feeds the same :class:`~kdlab.data.readers.RankingGroup` records.

==============  ==================================================================================
format          files
==============  ==================================================================================
jsonl           ``path``: kdlab ranking groups (``{"query", "docs": [{"id", "text", "label"?,
                "teacher_score"?, "first_stage_score"?}]}``)
flagembedding   ``path``: FlagEmbedding JSONL (``{"query", "pos", "neg", "pos_scores"?,
                "neg_scores"?}``)
msmarco         ``collection`` (``pid\\ttext``), ``queries`` (``qid\\ttext``), ``qrels`` (TREC), ``run``
                (TREC, or MS MARCO's ``qid\\tpid\\trank``; none: BM25 over the collection)
trec            ``collection`` (TSV or BEIR-style corpus JSONL), ``queries`` (TSV or JSONL),
                ``qrels`` and ``run`` in TREC format (no run: BM25 over the collection)
beir            ``path``: a BEIR directory (``corpus.jsonl``, ``queries.jsonl``,
                ``qrels/<qrels_split>.tsv``), ``run``: a TREC run (none: BM25 over the corpus)
==============  ==================================================================================

Collections are offset-indexed (:class:`~kdlab.data.collection.TextCollection`): RAM holds an
index, and only the run's top-k documents are ever read. Each candidate keeps the first stage's
score (run file or BM25) as ``first_stage_score``, which the pipeline's pre-ranker row uses.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdlab.data.readers import (
    DataFormatError,
    RankingGroup,
    RunEntry,
    assemble_ranking_groups,
    read_beir_qrels,
    read_beir_queries,
    read_flagembedding_jsonl,
    read_ranking_jsonl,
    read_run,
    read_trec_qrels,
    read_tsv_texts,
)
from kdlab.errors import ConfigError

Format = Literal["jsonl", "msmarco", "beir", "trec", "flagembedding"]
FORMATS: tuple[str, ...] = ("jsonl", "msmarco", "beir", "trec", "flagembedding")

#: The qrels split a BEIR directory is read with when the source does not name one.
BEIR_SPLIT_OF_ROLE = {"train": "train", "val": "dev", "test": "test", "predict": "test"}


@dataclass
class RankingSource:
    """One split's ranking data as the user has it (see the module docstring for the formats).

    Args:
        format: ``jsonl | msmarco | beir | trec | flagembedding``.
        path: the JSONL file (jsonl, flagembedding) or the BEIR dataset directory (beir).
        collection: msmarco/trec: the document collection.
        queries: msmarco/trec: the queries (``qid\\ttext`` TSV, or JSONL with ``_id``/``text``).
        qrels: msmarco/trec: TREC qrels ``qid 0 docid rel``.
        run: msmarco/trec/beir: the first-stage run giving each query's candidates; left out, BM25
            (bm25s, ``bm25_k1``/``bm25_b``) over the collection retrieves them.
        qrels_split: beir: which ``qrels/<split>.tsv`` (default: train → train, val → dev, test → test).
        top_k: candidates per query taken from the run (msmarco/trec/beir).
        add_missing_positives: append judged-relevant documents the run missed (training splits
            only: on an evaluation split it would inflate the metrics).
        bm25_k1, bm25_b: BM25 parameters when there is no run.
    """

    format: Format = "jsonl"
    path: str | None = None
    collection: str | None = None
    queries: str | None = None
    qrels: str | None = None
    run: str | None = None
    qrels_split: str | None = None
    top_k: int = 20
    add_missing_positives: bool = False
    bm25_k1: float = 1.5
    bm25_b: float = 0.75

    def files(self) -> list[str]:
        """Every file or directory this source names."""
        return [str(v) for v in (self.path, self.collection, self.queries, self.qrels, self.run) if v]

    def label(self) -> str:
        """A short human name of the source: its main file."""
        return self.path or self.run or self.collection or "(embedded sample)"


@dataclass
class SplitData:
    """A split's groups and how their candidates were chosen (``first_stage``, recorded in runs)."""

    groups: list[RankingGroup]
    source: RankingSource
    first_stage: dict[str, Any] = field(default_factory=dict)


_REQUIRED: dict[str, tuple[str, ...]] = {
    "jsonl": ("path",),
    "flagembedding": ("path",),
    "msmarco": ("collection", "queries", "qrels"),
    "trec": ("collection", "queries", "qrels"),
    "beir": ("path",),
}
_NOT_USED: dict[str, tuple[str, ...]] = {
    "jsonl": ("collection", "queries", "qrels", "run"),
    "flagembedding": ("collection", "queries", "qrels", "run"),
    "msmarco": ("path",),
    "trec": ("path",),
    "beir": ("collection", "queries", "qrels"),
}
_WHAT = {
    "path": "the file (jsonl/flagembedding) or BEIR directory", "collection": "the collection file",
    "queries": "the queries file", "qrels": "the TREC qrels file", "run": "the run file",
}


def as_source(value: RankingSource | str | os.PathLike[str] | Mapping[str, Any] | None, role: str,
              *, sample: str | None = None) -> RankingSource:
    """The source a config value stands for: a source as it is, a mapping of its fields, a path
    string (a kdlab JSONL file), or ``None`` (the embedded sample's file ``sample``, when given)."""
    if isinstance(value, RankingSource):
        return value
    if value is None:
        if sample is None:
            raise ConfigError(f"{role}: no ranking data given")
        from kdlab.data.embedded import sample_path

        return RankingSource(path=sample_path(sample))
    if isinstance(value, (str, os.PathLike)):
        return RankingSource(path=str(value))
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(RankingSource)}
        unknown = sorted(set(value) - known)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{role}: unknown key '{unknown[0]}'{hint}; a ranking source takes {', '.join(sorted(known))}")
        return RankingSource(**{k: v for k, v in value.items() if v is not None})
    raise ConfigError(f"{role}: expected a file path or a ranking source, got {value!r}")


def check_source(source: RankingSource, role: str) -> None:
    """Fields complete and consistent for the format, numbers in range, files present — one-line
    :class:`~kdlab.errors.ConfigError` otherwise (nothing is read yet)."""
    if source.format not in FORMATS:
        raise ConfigError(f"{role}.format: expected one of {', '.join(FORMATS)}, got {source.format!r}")
    for name in _REQUIRED[source.format]:
        if not getattr(source, name):
            raise ConfigError(f"{role}: format '{source.format}' needs '{name}' ({_WHAT[name]})")
    for name in _NOT_USED[source.format]:
        if getattr(source, name):
            raise ConfigError(f"{role}: format '{source.format}' does not read '{name}' ({getattr(source, name)}); "
                              f"remove it or pick the format it belongs to")
    if source.add_missing_positives and role.rsplit(".", 1)[-1] in ("val", "test", "predict"):
        raise ConfigError(f"{role}.add_missing_positives: only for training splits (adding the positives a run "
                          "missed to an evaluation split would inflate its metrics)")
    if source.top_k < 1:
        raise ConfigError(f"{role}.top_k: expected an integer >= 1, got {source.top_k}")
    if source.bm25_k1 < 0 or not 0 <= source.bm25_b <= 1:
        raise ConfigError(f"{role}: BM25 needs bm25_k1 >= 0 and 0 <= bm25_b <= 1, got k1={source.bm25_k1}, "
                          f"b={source.bm25_b}")
    for name in ("path", "collection", "queries", "qrels", "run"):
        value = getattr(source, name)
        if value and not Path(value).exists():
            raise DataFormatError(value, None, None, f"file not found ({role}.{name})")


def _read_queries(path: str) -> dict[str, str]:
    return read_beir_queries(path) if path.endswith(".jsonl") else read_tsv_texts(path, "qid")


def _first_stage(source: RankingSource, collection: Any, queries: Mapping[str, str],
                 qrels: Mapping[str, Any], allow_msmarco_tsv: bool) -> tuple[dict[str, list[RunEntry]], dict[str, Any]]:
    """The run's entries (ids checked against collection and queries), or BM25's over the collection."""
    if source.run:
        run = read_run(source.run, doc_ids=collection, query_ids=queries, allow_msmarco_tsv=allow_msmarco_tsv,
                       top_k=source.top_k)
        return run, {"kind": "run", "run": source.run, "top_k": source.top_k}
    from kdlab.data.first_stage import BM25Options, bm25_run, describe

    options = BM25Options(k1=source.bm25_k1, b=source.bm25_b)
    # Only queries that can be evaluated or trained on are retrieved for (the rest carry no label).
    wanted = {qid: text for qid, text in queries.items() if qrels.get(qid)}
    run = bm25_run(collection, wanted, top_k=min(source.top_k, len(collection)), options=options)
    return run, {"kind": "bm25", "top_k": source.top_k, **describe(options)}


_CACHE: dict[tuple[Any, ...], SplitData] = {}
_CACHE_SIZE = 8


def _cache_key(source: RankingSource, role: str) -> tuple[Any, ...]:
    stats = []
    for name in source.files():
        try:
            st = os.stat(name)
            stats.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            stats.append((name, None, None))
    return (dataclasses.astuple(source), role, tuple(stats))


def read_source(source: RankingSource, role: str, *, cache: bool = True) -> SplitData:
    """Read and validate every file of ``source`` (errors name the user's file and line) into groups.

    A source read once in this process (same fields, files unchanged) is not read again: the CLI
    validates a run's data before any model loads, and the data module then uses the same groups.
    """
    key = _cache_key(source, role)
    if cache and key in _CACHE:
        return _CACHE[key]
    data = _read_source(source, role)
    if cache:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = data
    return data


def _read_source(source: RankingSource, role: str) -> SplitData:
    check_source(source, role)
    fmt = source.format
    if fmt == "jsonl":
        groups = read_ranking_jsonl(source.path)  # type: ignore[arg-type]
        scored = all(d.first_stage_score is not None for g in groups for d in g.docs)
        return SplitData(groups, source, {"kind": "field", "path": source.path} if scored else {})
    if fmt == "flagembedding":
        return SplitData(read_flagembedding_jsonl(source.path), source)  # type: ignore[arg-type]
    from kdlab.data.collection import TextCollection

    if fmt == "beir":
        root = Path(source.path)  # type: ignore[arg-type]
        if not root.is_dir():
            raise DataFormatError(root, None, None, "not a directory (expected a BEIR dataset directory)")
        split = source.qrels_split or BEIR_SPLIT_OF_ROLE.get(role.rsplit(".", 1)[-1], "test")
        collection = TextCollection.open(root / "corpus.jsonl", kind="jsonl")
        queries = read_beir_queries(root / "queries.jsonl")
        qrels = read_beir_qrels(root / "qrels" / f"{split}.tsv", doc_ids=collection, query_ids=queries)
        allow_tsv = False
    else:
        collection = TextCollection.open(source.collection)  # type: ignore[arg-type]
        queries = _read_queries(source.queries)  # type: ignore[arg-type]
        qrels = read_trec_qrels(source.qrels, doc_ids=collection, query_ids=queries)  # type: ignore[arg-type]
        allow_tsv = fmt == "msmarco"
    run, first_stage = _first_stage(source, collection, queries, qrels, allow_tsv)
    groups = assemble_ranking_groups(queries, collection, qrels, run, source.top_k,
                                     add_missing_positives=source.add_missing_positives, lazy_texts=True)
    del run  # the groups hold what they need of it (peak memory at MS MARCO scale)
    if not groups:
        raise DataFormatError(source.run or source.qrels or source.path, None, None,
                              "no query has both candidates and relevance judgements")
    return SplitData(groups, source, first_stage)


__all__ = ["BEIR_SPLIT_OF_ROLE", "FORMATS", "Format", "RankingSource", "SplitData", "as_source",
           "check_source", "read_source"]
