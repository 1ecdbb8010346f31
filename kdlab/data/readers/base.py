"""The pieces every reader shares: the error, the records, line iteration and field checks.

:class:`DataFormatError` is the one error a reader raises for a malformed file (``file:line: field
'x': expected ..., got ...``). The records (:class:`RankingDoc`, :class:`CollectionDoc`,
:class:`RankingGroup`) are what every ranking format reads into, so one data module trains on all of
them. :func:`iter_lines` / :func:`iter_jsonl` and the ``_require_*`` / ``_parse_*`` helpers keep
the wording of errors the same across formats (``kdlab.data.collection`` uses them too).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    ``first_stage_score`` is the pre-ranker's score (a run file's score, BM25, ...) when known;
    ``reason`` is an LLM's one-sentence reason for its judgement (RRADistill), when labelled with one."""

    id: str
    title: str
    body: str
    label: float | None = None
    teacher_score: float | None = None
    first_stage_score: float | None = None
    reason: str | None = None

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
    reason = None  # documents assembled from a collection carry no LLM reason

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
                      base.first_stage_score if first_stage_score is None else first_stage_score, base.reason)


@dataclass(frozen=True, slots=True)
class RankingGroup:
    """A query and its candidate documents (in file order)."""

    query_id: str
    query: str
    docs: tuple[Doc, ...]


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


def _as_container(ids: Container[str] | Iterable[str] | None) -> Container[str] | None:
    """Membership tests without copying: a collection index, a set or a dict view is used as it is
    (a set of 8.8 M MS MARCO ids would cost GBs); a bare iterable is collected into a set."""
    if ids is None or isinstance(ids, Container):
        return ids  # type: ignore[return-value]
    return set(ids)


__all__ = ["CollectionDoc", "DataFormatError", "Doc", "PathLike", "RankingDoc", "RankingGroup", "iter_jsonl",
           "iter_lines", "with_scores"]
