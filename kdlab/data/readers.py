"""Readers for the formats kdlab users bring, with one-line errors a person can act on.

Every malformed input raises :class:`DataFormatError` naming the file, the line (1-based) and the
field, and saying what was expected, e.g.::

    data.jsonl:17: field 'docs[2].label': expected a number, got 'high'

Readers validate everything up front (they are called from ``DataModule.setup``), so a bad file
fails before any training step rather than in the middle of an epoch.

Formats: JSONL ranking groups, click logs and seq2seq pairs; MS MARCO TSV collection/queries;
TREC qrels and run files; BEIR queries and qrels; FlagEmbedding JSONL. :func:`assemble_ranking_groups`
turns a collection + queries + qrels + run into the same ranking groups the JSONL reader yields;
:mod:`kdlab.data.sources` puts the pieces together for each format (collections through the
offset-indexed :class:`~kdlab.data.collection.TextCollection`), so every format feeds one data
module (write groups with :func:`write_ranking_jsonl`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdlab.runs import write_jsonl_atomic

PathLike = str | os.PathLike


class DataFormatError(ValueError):
    """A malformed input file. ``str(err)`` is the whole user-facing message, on one line."""

    def __init__(self, path: PathLike, line: int | None, field: str | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


# --------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class RankingDoc:
    """One candidate document of a ranking group. ``label``/``teacher_score`` are None when absent;
    ``first_stage_score`` is the pre-ranker's score (a run file's score, BM25, ...) when known."""

    id: str
    title: str
    body: str
    label: float | None = None
    teacher_score: float | None = None
    first_stage_score: float | None = None

    @property
    def text(self) -> str:
        """Title and body joined by a space (what a cross-encoder reads as the document)."""
        return f"{self.title} {self.body}".strip()


class CollectionDoc:
    """A candidate whose title and text stay in its collection and are read when asked for.

    Groups assembled from a large collection hold these instead of :class:`RankingDoc`: RAM then
    holds ids, labels and scores, not texts (``bench/collection_scale.py``). Same attributes as
    :class:`RankingDoc`; ``with_scores`` / ``materialize`` give a :class:`RankingDoc`.
    """

    __slots__ = ("id", "label", "teacher_score", "first_stage_score", "_store")

    def __init__(self, id: str, store: Mapping[str, tuple[str, str]], label: float | None = None,
                 teacher_score: float | None = None, first_stage_score: float | None = None) -> None:
        self.id = id
        self._store = store
        self.label = label
        self.teacher_score = teacher_score
        self.first_stage_score = first_stage_score

    @property
    def title(self) -> str:
        return self._store[self.id][0]

    @property
    def body(self) -> str:
        return self._store[self.id][1]

    @property
    def text(self) -> str:
        title, body = self._store[self.id]
        return f"{title} {body}".strip()

    def materialize(self) -> RankingDoc:
        """The same document with its texts read, as a :class:`RankingDoc`."""
        title, body = self._store[self.id]
        return RankingDoc(self.id, title, body, self.label, self.teacher_score, self.first_stage_score)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (RankingDoc, CollectionDoc)):
            return self.materialize() == (other.materialize() if isinstance(other, CollectionDoc) else other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (mutable-looking, compared by value like RankingDoc)

    def __repr__(self) -> str:
        return (f"CollectionDoc(id={self.id!r}, label={self.label!r}, teacher_score={self.teacher_score!r}, "
                f"first_stage_score={self.first_stage_score!r})")


Doc = RankingDoc | CollectionDoc
"""A candidate document: its texts in memory (:class:`RankingDoc`) or in a collection (:class:`CollectionDoc`)."""


def with_scores(doc: Doc, *, teacher_score: float | None = None, first_stage_score: float | None = None) -> RankingDoc:
    """``doc`` with its texts and the given scores (the others kept), as a :class:`RankingDoc`."""
    base = doc.materialize() if isinstance(doc, CollectionDoc) else doc
    return RankingDoc(base.id, base.title, base.body, base.label,
                      base.teacher_score if teacher_score is None else teacher_score,
                      base.first_stage_score if first_stage_score is None else first_stage_score)


@dataclass(frozen=True, slots=True)
class RankingGroup:
    """A query and its candidate documents (in file order)."""

    query_id: str
    query: str
    docs: tuple[Doc, ...]


@dataclass(frozen=True)
class ClickRecord:
    """A query and the (title, summary) of the document clicked for it."""

    query: str
    title: str
    summary: str


@dataclass(frozen=True)
class Seq2SeqPair:
    """A source text and its reference target."""

    source: str
    target: str


@dataclass(frozen=True, slots=True)
class RunEntry:
    """One line of a TREC run file."""

    doc_id: str
    rank: int
    score: float


# --------------------------------------------------------------------------------------------------
# Low-level line iteration and field checks


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def iter_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for the non-blank lines of a UTF-8 text file.

    Decoding per line (instead of opening in text mode) is what lets a non-UTF-8 byte be reported
    with its line number. Raises on a missing file and on a file with no non-blank line.
    """
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(p, None, None, "file not found" if not p.exists() else "not a regular file")
    seen = False
    with open(p, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    p, number, None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            seen = True
            yield number, text
    if not seen:
        raise DataFormatError(p, None, None, "file is empty (expected at least one record)")


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each JSON object line; bad JSON or non-objects raise."""
    for number, text in iter_lines(path):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, number, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, number, None, f"expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _require_str(path: PathLike, line: int, obj: Mapping[str, Any], key: str, name: str | None = None,
                 *, allow_empty: bool = False) -> str:
    name = name or key
    if key not in obj:
        raise DataFormatError(path, line, name, "missing (expected a string)")
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(path, line, name, f"expected a string, got {_describe(value)}")
    if not allow_empty and not value.strip():
        raise DataFormatError(path, line, name, "expected a non-empty string, got ''")
    return value


def _optional_id(path: PathLike, line: int, obj: Mapping[str, Any], key: str, name: str) -> str | None:
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(path, line, name, f"expected a string or integer id, got {_describe(value)}")
    text = str(value)
    if not text.strip():
        raise DataFormatError(path, line, name, "expected a non-empty id, got ''")
    return text


def _as_number(path: PathLike, line: int, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataFormatError(path, line, name, f"expected a number, got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise DataFormatError(path, line, name, f"expected a finite number, got {value}")
    return number


def _optional_number(path: PathLike, line: int, obj: Mapping[str, Any], key: str, name: str) -> float | None:
    if key not in obj or obj[key] is None:
        return None
    return _as_number(path, line, name, obj[key])


def _parse_float(path: PathLike, line: int, name: str, token: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataFormatError(path, line, name, f"expected a number, got {token!r}") from None
    if not math.isfinite(value):
        raise DataFormatError(path, line, name, f"expected a finite number, got {token!r}")
    return value


def _parse_int(path: PathLike, line: int, name: str, token: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataFormatError(path, line, name, f"expected an integer, got {token!r}") from None


# --------------------------------------------------------------------------------------------------
# JSONL formats


def read_ranking_jsonl(path: PathLike) -> list[RankingGroup]:
    """Read ranking groups: one JSON object per line,
    ``{"query_id"?: str, "query": str, "docs": [{"id", "text" | "title"+"summary", "label"?,
    "teacher_score"?, "first_stage_score"?}, ...]}``. Other keys are ignored. Labels may be
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
            ))
        groups.append(RankingGroup(query_id, query, tuple(docs)))
    return groups


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


Seq2SeqFields = Literal["auto", "source-target", "question-answer"]

#: ``fields`` of :func:`read_seq2seq_jsonl` → the (source, target) keys of each record
SEQ2SEQ_FIELDS: dict[str, tuple[str, str]] = {
    "source-target": ("source", "target"),
    "question-answer": ("question", "answer"),  # GSM8K's own JSONL
}


def _seq2seq_pair_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """``source``/``target`` if the record has either key, else ``question``/``answer`` if it has
    either, else None."""
    return next((keys for keys in SEQ2SEQ_FIELDS.values() if any(k in obj for k in keys)), None)


def read_seq2seq_jsonl(path: PathLike, fields: Seq2SeqFields = "auto") -> list[Seq2SeqPair]:
    """Read seq2seq pairs, one JSON object per line: ``{"source": str, "target": str}`` or GSM8K's
    ``{"question": str, "answer": str}`` (question → source, answer → target, kept whole: the
    worked solution with its ``<<48/2=24>>`` calculator notes and the final ``#### 72``). Other keys
    are ignored.

    ``fields``: ``"auto"`` (the first record's pair — ``source``/``target`` if it has either key,
    else ``question``/``answer`` — then holds for every line of the file), ``"source-target"`` or
    ``"question-answer"``. A missing or non-string field is a :class:`DataFormatError` naming the
    file, line and field. **[code]** The released KETCHUP code first rewrites GSM8K answers
    (``data/gsm8k/change_format.py``: drops simple ``<<a=b>>`` notes, spaces operators, joins lines);
    kdlab reads the file as published.
    """
    if fields != "auto" and fields not in SEQ2SEQ_FIELDS:
        raise ValueError(f"fields must be 'auto' or one of {sorted(SEQ2SEQ_FIELDS)}, got {fields!r}")
    keys = SEQ2SEQ_FIELDS.get(fields)
    pairs: list[Seq2SeqPair] = []
    set_by = "the fields option"
    for line, obj in iter_jsonl(path):
        if keys is None:
            keys, set_by = _seq2seq_pair_of(obj), f"line {line}"
            if keys is None:
                found = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
                raise DataFormatError(path, line, "source", "missing (expected string fields 'source' and "
                                      f"'target', or GSM8K's 'question' and 'answer'; found keys: {found})")
        other = _seq2seq_pair_of(obj)
        missing = next((k for k in keys if k not in obj), None)
        if missing is not None and other not in (None, keys):
            raise DataFormatError(path, line, missing, f"missing (expected a string; {set_by} chose fields "
                                  f"{'/'.join(keys)}, this line has {'/'.join(other)}: one pair per file)")
        pairs.append(Seq2SeqPair(_require_str(path, line, obj, keys[0]), _require_str(path, line, obj, keys[1])))
    return pairs


# --------------------------------------------------------------------------------------------------
# MS MARCO TSV and TREC formats


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


def _as_container(ids: Container[str] | Iterable[str] | None) -> Container[str] | None:
    """Membership tests without copying: a collection index, a set or a dict view is used as it is
    (a set of 8.8 M MS MARCO ids would cost GBs); a bare iterable is collected into a set."""
    if ids is None or isinstance(ids, Container):
        return ids  # type: ignore[return-value]
    return set(ids)


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


# --------------------------------------------------------------------------------------------------
# BEIR


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


# --------------------------------------------------------------------------------------------------
# Assembling ranking groups from collection + queries + qrels + run


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


# --------------------------------------------------------------------------------------------------
# FlagEmbedding reranker JSONL


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


# --------------------------------------------------------------------------------------------------
# Writing


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
        docs.append(row)
    return {"query_id": group.query_id, "query": group.query, "docs": docs}


def write_ranking_jsonl(path: PathLike, groups: Iterable[RankingGroup]) -> None:
    """Write ranking groups atomically in the JSONL format the ranking data module reads."""
    write_jsonl_atomic(path, (ranking_group_to_json(g) for g in groups))


__all__ = [
    "ClickRecord", "CollectionDoc", "DataFormatError", "Doc", "RankingDoc", "RankingGroup", "RunEntry", "Seq2SeqPair",
    "assemble_ranking_groups", "flagembedding_record", "iter_jsonl", "iter_lines", "ranking_group_to_json",
    "read_beir_qrels", "read_beir_queries", "read_clicks_jsonl", "read_flagembedding_jsonl",
    "read_msmarco_collection", "read_msmarco_queries", "read_ranking_jsonl", "read_run", "read_seq2seq_jsonl",
    "SEQ2SEQ_FIELDS", "Seq2SeqFields",
    "read_trec_qrels", "read_trec_run", "read_tsv_texts", "with_scores", "write_flagembedding_jsonl", "write_ranking_jsonl",
]
