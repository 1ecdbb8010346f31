"""Offset-indexed document collections: RAM holds an index, not the texts.

:class:`TextCollection` reads an MS MARCO ``collection.tsv`` or a BEIR ``corpus.jsonl`` once,
validates every line with the same one-line :class:`~kdlab.data.readers.DataFormatError` messages as
the dict readers (:func:`~kdlab.data.readers.read_tsv_texts`, ``readers.beir._read_beir_jsonl``), and keeps
only two numpy arrays: the document ids, sorted, and each document's byte offset in the file. A
document's text is read from the file when it is asked for (``os.pread``: positional reads, so no
shared file position between threads, and no file pages counted in the process's RSS the way a
``mmap`` would count every page it touched).

Memory: ids are int32 when every id is a canonical decimal integer below 2³¹ (MS MARCO pids; int64
above), else fixed-width bytes (the longest id's length); offsets are uint32 for files under 4 GiB,
else int64. MS MARCO's 8.8 M passages (2.9 GiB) take 8 bytes per document: ~70 MiB. The index is
built in chunks of ~64 k lines; a file already sorted by id (MS MARCO is) needs no argsort, so the
peak while building is about twice the final arrays.

A collection is what :func:`~kdlab.data.readers.assemble_ranking_groups` needs as ``corpus``
(``__contains__`` and ``__getitem__`` → ``(title, text)``) and what
:func:`~kdlab.data.readers.read_trec_run` / :func:`~kdlab.data.readers.read_trec_qrels` accept as
``doc_ids`` (membership tests without copying the ids)::

    with TextCollection.open("collection.tsv") as corpus:
        run = read_trec_run("run.trec", doc_ids=corpus, query_ids=queries)
        groups = assemble_ranking_groups(queries, corpus, qrels, run, top_k=20)

Formats (``kind``):

* ``tsv`` — ``id \\t text`` per line (MS MARCO). Ids and texts are stripped of surrounding
  whitespace, exactly as :func:`~kdlab.data.readers.read_tsv_texts` does. A three-column variant
  ``id \\t title \\t text`` is accepted too: the *first* record decides the number of columns
  (2 or 3) and every other line must have the same; in the 3-column form the title may be empty,
  the text may not. A 2-column file gets exactly the dict reader's errors.
* ``jsonl`` — BEIR ``corpus.jsonl``: ``{"_id": str | int, "title"?: str, "text": str}``; the title
  defaults to ``""``; title and text may not both be empty. Ids are kept as written (not stripped).
* ``auto`` — by suffix: ``.tsv`` → ``tsv``, ``.jsonl`` → ``jsonl``.

Ids containing a NUL character are refused (fixed-width numpy bytes cannot hold a trailing NUL).
The file must not change while a collection is open: a reopen (after unpickling) checks its size
and modification time and refuses a changed file.

Standard library + numpy only (no torch, no Lightning).
"""

from __future__ import annotations

import json
import os
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np

from kdlab.data.readers.base import DataFormatError, _optional_id, _require_str

PathLike = str | os.PathLike

_READ_BLOCK = 1 << 20  # read buffer of a sequential pass
_CHUNK_LINES = 1 << 16  # records per chunk of the index while building
_FETCH_BYTES = 1024  # first read of a document line (x4 until a newline is seen); MS MARCO: ~350 B
_MAX_INT_DIGITS = 18  # canonical decimal ids up to this length fit in int64
_INT32_MAX = 2**31 - 1


def _is_int_id(key: str) -> bool:
    """A canonical non-negative decimal integer ('0', '17'; not '007', '+1', '١٢')."""
    return (key.isascii() and key.isdigit() and len(key) <= _MAX_INT_DIGITS
            and (len(key) == 1 or key[0] != "0"))


class _Chunks:
    """Ids and offsets collected while scanning: finished chunks as numpy arrays, plus the open one.

    Ids are integers (int32 where they fit) while every id is a canonical integer; the first other
    id turns every chunk into fixed-width bytes (integers convert back to their exact decimal text).
    """

    def __init__(self, offset_dtype: type = np.int64) -> None:
        self.offset_dtype = offset_dtype
        self.int_mode = True
        self.id_arrays: list[np.ndarray] = []
        self.offset_arrays: list[np.ndarray] = []
        self.keys: list[str] = []
        self.offsets: list[int] = []
        self.chunk_int = True

    def add(self, key: str, offset: int) -> None:
        if self.chunk_int and not _is_int_id(key):
            self.chunk_int = False
        self.keys.append(key)
        self.offsets.append(offset)
        if len(self.keys) >= _CHUNK_LINES:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        if self.int_mode and not self.chunk_int:  # first non-integer id: every chunk becomes bytes
            self.int_mode = False
            self.id_arrays = [a.astype(np.bytes_) for a in self.id_arrays]
        self.id_arrays.append(_keys_array(self.keys, self.int_mode))
        self.offset_arrays.append(np.asarray(self.offsets, dtype=self.offset_dtype))
        self.keys, self.offsets, self.chunk_int = [], [], True

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """All ids and offsets in file order, releasing the chunks as it goes (the peak is the
        final arrays plus one half of the chunks, not twice the index)."""
        self.flush()
        if not self.id_arrays:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        ids = np.concatenate(self.id_arrays)
        self.id_arrays = []
        offsets = np.concatenate(self.offset_arrays)
        self.offset_arrays = []
        return ids, offsets

    def arrays(self, extra: tuple[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All ids and offsets so far (plus ``extra``), in file order, leaving the state as it is."""
        keys, offsets = [*self.keys], [*self.offsets]
        if extra is not None:
            keys.append(extra[0])
            offsets.append(extra[1])
        int_mode = self.int_mode and all(_is_int_id(k) for k in keys)
        id_arrays = [a if int_mode or a.dtype.kind != "i" else a.astype(np.bytes_) for a in self.id_arrays]
        offset_arrays = list(self.offset_arrays)
        if keys:
            id_arrays.append(_keys_array(keys, int_mode))
            offset_arrays.append(np.asarray(offsets, dtype=self.offset_dtype))
        if not id_arrays:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(id_arrays), np.concatenate(offset_arrays)


def _keys_array(keys: list[str], as_int: bool) -> np.ndarray:
    if as_int:
        ids = np.fromiter(map(int, keys), dtype=np.int64, count=len(keys))
        return ids.astype(np.int32) if int(ids.max()) <= _INT32_MAX else ids
    return np.array([k.encode("utf-8") for k in keys], dtype=np.bytes_)


def _sort_index(ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):  # already sorted (MS MARCO): no copy
        return ids, offsets
    order = np.argsort(ids, kind="stable")  # stable: equal ids stay in file order
    return ids[order], offsets[order]


def _first_duplicate(ids: np.ndarray, offsets: np.ndarray) -> tuple[int, int] | None:
    """``(offset of the repeat that comes first in the file, offset of that id's first line)``
    for sorted ids with file-ordered ties, or None."""
    if len(ids) < 2:
        return None
    repeats = np.flatnonzero(ids[1:] == ids[:-1]) + 1
    if not len(repeats):
        return None
    earliest = repeats[np.argmin(offsets[repeats])]
    first = int(np.searchsorted(ids, ids[earliest], side="left"))
    return int(offsets[earliest]), int(offsets[first])


def _id_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TextCollection:
    """An offset-indexed ``id → (title, text)`` collection read from a TSV or BEIR JSONL file.

    Build with :meth:`open`. Supports ``len``, ``in``, ``[id]`` (→ ``(title, text)``, title ``""``
    for 2-column TSV), :meth:`get_many`, :meth:`line_of`, :meth:`iter_documents`; picklable (the
    file is reopened lazily in the receiving process); a context manager (``close`` releases the
    file descriptor; a later read reopens it).
    """

    path: str
    kind: Literal["tsv", "jsonl"]

    def __init__(self, path: PathLike, kind: Literal["tsv", "jsonl"], ids: np.ndarray, offsets: np.ndarray,
                 columns: int, stat: tuple[int, int]) -> None:
        self.path = str(path)
        self.kind = kind
        self._ids = ids
        self._offsets = offsets
        self._columns = columns
        self._stat = stat
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._int_ids: memoryview | None = None  # bisect over int ids: ~1 µs, 5x a numpy scalar search
        # Ids first, first + 1, ..., first + n - 1 (MS MARCO's pids 0..N-1): a position is key - first.
        dense = ids.dtype.kind == "i" and len(ids) > 0 and int(ids[-1]) - int(ids[0]) == len(ids) - 1
        self._dense_first: int | None = int(ids[0]) if dense else None

    # ---------------------------------------------------------------------------------------------
    # Building

    @classmethod
    def open(cls, path: PathLike, kind: Literal["auto", "tsv", "jsonl"] = "auto") -> TextCollection:
        """Index ``path`` in one validating pass (see the module docstring for the formats).

        Raises :class:`~kdlab.data.readers.DataFormatError` (one line: ``file:line: field 'x':
        what was expected``) on a missing or empty file and on the first malformed line, with the
        same wording as the dict readers; a duplicate id names both lines.
        """
        p = Path(path)
        if kind not in ("auto", "tsv", "jsonl"):
            raise ValueError(f"kind must be 'auto', 'tsv' or 'jsonl', got {kind!r}")
        if not p.is_file():
            raise DataFormatError(p, None, None, "file not found" if not p.exists() else "not a regular file")
        if kind == "auto":
            suffix = p.suffix.lower()
            if suffix not in (".tsv", ".jsonl"):
                raise DataFormatError(p, None, None, f"cannot tell the format from the suffix {p.suffix!r} "
                                      "(expected .tsv or .jsonl, or pass kind='tsv' / kind='jsonl')")
            kind = "tsv" if suffix == ".tsv" else "jsonl"
        st = p.stat()
        chunks = _Chunks(np.uint32 if st.st_size < 2**32 else np.int64)
        columns = _scan(p, kind, chunks)
        ids, offsets = chunks.finish()
        del chunks
        ids, offsets = _sort_index(ids, offsets)
        dup = _first_duplicate(ids, offsets)
        if dup is not None:
            _raise_duplicate(p, kind, ids, offsets, dup)
        return cls(p, kind, ids, offsets, columns, (st.st_size, st.st_mtime_ns))

    # ---------------------------------------------------------------------------------------------
    # File access

    def _file(self) -> int:
        fd = self._fd
        if fd is not None:
            return fd
        with self._lock:
            if self._fd is None:
                try:
                    st = os.stat(self.path)
                except OSError:
                    raise DataFormatError(self.path, None, None, "file not found (it was indexed, then removed)") from None
                if (st.st_size, st.st_mtime_ns) != self._stat:
                    raise DataFormatError(self.path, None, None,
                                          "file changed since it was indexed (size or modification time differ); "
                                          "open it again")
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            return self._fd

    def _pread(self, size: int, offset: int) -> bytes:
        fd = self._file()
        if hasattr(os, "pread"):
            return os.pread(fd, size, offset)
        with self._lock:  # pragma: no cover - platforms without pread
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, size)

    def _read_line(self, offset: int) -> str:
        size = _FETCH_BYTES
        while True:
            buf = self._pread(size, offset)
            end = buf.find(b"\n")
            if end >= 0:
                buf = buf[:end]
                break
            if len(buf) < size:
                break
            size *= 4
        text = buf.decode("utf-8")
        if offset == 0:
            text = text.removeprefix("\ufeff")
        return text.rstrip("\r\n")

    def _parse(self, line: str) -> tuple[str, str, str]:
        """(id, title, text) of a validated line."""
        if self.kind == "tsv":
            parts = line.split("\t")
            if self._columns == 2:
                return parts[0].strip(), "", parts[1].strip()
            return parts[0].strip(), parts[1].strip(), parts[2].strip()
        obj = json.loads(line)
        return str(obj["_id"]), obj.get("title") or "", obj["text"]

    def close(self) -> None:
        """Release the file descriptor (the index stays usable: the next read reopens the file)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> TextCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._fd is not None:
                os.close(self._fd)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = None
        state["_int_ids"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd = None
        self._int_ids = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------
    # Lookups

    def _key(self, doc_id: object) -> Any:
        """The array key for ``doc_id``, or None when no id of this collection can equal it."""
        if not isinstance(doc_id, str):
            return None
        if self._ids.dtype.kind == "i":
            if not _is_int_id(doc_id):
                return None
            value = int(doc_id)
            return value if value <= (_INT32_MAX if self._ids.dtype == np.int32 else 2**63 - 1) else None
        raw = doc_id.encode("utf-8", "surrogatepass")
        if len(raw) > self._ids.dtype.itemsize or b"\x00" in raw:
            return None
        return raw

    def _position(self, doc_id: object) -> int:
        key = self._key(doc_id)
        if key is None:
            return -1
        ids = self._ids
        if self._dense_first is not None:
            pos = key - self._dense_first
            return pos if 0 <= pos < len(ids) else -1
        if ids.dtype.kind == "i":
            view = self._int_ids
            if view is None:
                view = self._int_ids = memoryview(ids)
            pos = bisect_left(view, key)
            return pos if pos < len(view) and view[pos] == key else -1
        pos = int(np.searchsorted(ids, key))  # ``key`` is no wider than ids: no copy of the array
        return pos if pos < len(ids) and ids[pos] == key else -1

    def _positions(self, doc_ids: Sequence[str]) -> np.ndarray:
        """Sorted-index positions of ``doc_ids`` (vectorised); -1 where absent."""
        n = len(doc_ids)
        ids = self._ids
        if not n or not len(ids):
            return np.full(n, -1, dtype=np.int64)
        keys = [self._key(d) for d in doc_ids]
        valid = np.fromiter((k is not None for k in keys), dtype=bool, count=n)
        if ids.dtype.kind == "i":  # the keys in the ids' own dtype (a wider one would copy ``ids``)
            arr = np.fromiter((k if k is not None else -1 for k in keys), dtype=np.int64, count=n).astype(ids.dtype)
        else:
            arr = np.array([k if k is not None else b"" for k in keys], dtype=ids.dtype)
        pos = np.searchsorted(ids, arr)
        clipped = np.minimum(pos, len(ids) - 1)
        found = valid & (pos < len(ids)) & (ids[clipped] == arr)
        return np.where(found, clipped, -1)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: object) -> bool:
        return self._position(doc_id) >= 0

    def __getitem__(self, doc_id: str) -> tuple[str, str]:
        pos = self._position(doc_id)
        if pos < 0:
            raise KeyError(doc_id)
        _, title, text = self._parse(self._read_line(int(self._offsets[pos])))
        return title, text

    def get(self, doc_id: str, default: Any = None) -> Any:
        """``self[doc_id]``, or ``default`` when absent."""
        pos = self._position(doc_id)
        if pos < 0:
            return default
        _, title, text = self._parse(self._read_line(int(self._offsets[pos])))
        return title, text

    def get_many(self, ids: Sequence[str]) -> list[tuple[str, str]]:
        """``[(title, text)]`` for ``ids``, in the order asked (reads go in file order). A missing id
        raises ``KeyError`` naming the first one."""
        ids = list(ids)
        pos = self._positions(ids)
        missing = np.flatnonzero(pos < 0)
        if len(missing):
            raise KeyError(ids[int(missing[0])])
        offsets = self._offsets[pos]
        out: list[tuple[str, str]] = [("", "")] * len(ids)
        for i in np.argsort(offsets, kind="stable").tolist():
            _, title, text = self._parse(self._read_line(int(offsets[i])))
            out[i] = (title, text)
        return out

    def line_of(self, doc_id: str) -> int:
        """The 1-based line number of ``doc_id`` in the file (counts newlines up to its offset:
        meant for error messages, not for hot loops)."""
        pos = self._position(doc_id)
        if pos < 0:
            raise KeyError(doc_id)
        return _line_at(self.path, int(self._offsets[pos]), self._pread)

    def iter_documents(self) -> Iterator[tuple[str, str, str]]:
        """Stream ``(id, title, text)`` in file order (sequential reads; nothing accumulates)."""
        self._file()  # refuses a changed file before streaming it
        for offset, raw in _iter_raw_lines(Path(self.path)):
            text = raw.decode("utf-8")
            if offset == 0:
                text = text.removeprefix("\ufeff")
            text = text.rstrip("\r\n")
            if not text or text.isspace():
                continue
            yield self._parse(text)

    # Internals the first-stage retriever uses (positions index the id-sorted arrays).

    def _file_order(self) -> np.ndarray:
        """Sorted-array positions in file order (``iter_documents``'s i-th document is at ``[i]``)."""
        return np.argsort(self._offsets, kind="stable")

    def _ids_at(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        return [_id_text(v) for v in self._ids[np.asarray(positions, dtype=np.int64)].tolist()]

    def _string_rank(self) -> np.ndarray:
        """Each sorted position's rank in *string* order of the ids (bytes order already is; integer
        ids sort differently as text: '10' < '9')."""
        if self._ids.dtype.kind != "i":
            return np.arange(len(self._ids), dtype=np.int64)
        order = np.argsort(self._ids.astype(np.bytes_), kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order), dtype=np.int64)
        return rank

    @property
    def nbytes(self) -> int:
        """Bytes held by the index arrays."""
        return int(self._ids.nbytes + self._offsets.nbytes)

    def __repr__(self) -> str:
        id_kind = self._ids.dtype.name if self._ids.dtype.kind == "i" else f"bytes{self._ids.dtype.itemsize}"
        return f"TextCollection({self.path!r}, kind={self.kind!r}, documents={len(self)}, ids={id_kind})"


# --------------------------------------------------------------------------------------------------
# The validating pass


def _iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, line)`` for every line (with its ``b"\\n"``, as binary file iteration gives
    it). One fixed read buffer and one small object per line: no large blocks are allocated and
    freed over and over, which leaves the heap fragmented (RSS that does not come back)."""
    pos = 0
    with open(path, "rb", buffering=_READ_BLOCK) as f:
        for raw in f:
            yield pos, raw
            pos += len(raw)


def _line_at(path: str, offset: int, pread: Any) -> int:
    """1 + the number of newlines before ``offset``."""
    count, pos = 0, 0
    while pos < offset:
        buf = pread(min(_READ_BLOCK, offset - pos), pos)
        if not buf:
            break
        count += buf.count(b"\n")
        pos += len(buf)
    return count + 1


def _raise_duplicate(path: Path, kind: str, ids: np.ndarray, offsets: np.ndarray,
                     dup: tuple[int, int]) -> None:
    later, first = dup
    field = "pid" if kind == "tsv" else "_id"
    pos = int(np.flatnonzero(offsets == later)[0])
    key = _id_text(ids[pos].item())

    def read(size: int, off: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(off)
            return f.read(size)

    line = _line_at(str(path), later, read)
    first_line = _line_at(str(path), first, read)
    raise DataFormatError(path, line, field, f"duplicate id {key!r} (first on line {first_line})")


def _scan(path: Path, kind: str, chunks: _Chunks) -> int:
    """Validate every line and record (id, offset) into ``chunks``; returns the TSV column count
    (0 for JSONL). Errors follow the dict readers' order: a duplicate id on an earlier line than a
    malformed one is reported first."""
    columns = 0
    seen = False

    def fail(line: int, field: str | None, message: str, current: tuple[str, int] | None = None) -> NoReturn:
        ids, offsets = chunks.arrays(current)
        ids, offsets = _sort_index(ids, offsets)
        dup = _first_duplicate(ids, offsets)
        if dup is not None:
            _raise_duplicate(path, kind, ids, offsets, dup)
        raise DataFormatError(path, line, field, message)

    number = 0
    for offset, raw in _iter_raw_lines(path):
        number += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            fail(number, None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
        if number == 1:
            text = text.removeprefix("\ufeff")
        text = text.rstrip("\r\n")
        if not text or text.isspace():
            continue
        seen = True
        if kind == "tsv":
            parts = text.split("\t")
            n = len(parts)
            if columns == 0:
                columns = 3 if n == 3 else 2
            if n != columns:
                if columns == 2:
                    fail(number, None, f"expected 2 tab-separated columns (pid, text), got {n}")
                fail(number, None, f"expected 3 tab-separated columns (pid, title, text) as on the first line, got {n}")
            key = parts[0].strip()
            if not key:
                fail(number, "pid", "empty id")
            body = parts[-1]
            if not body or body.isspace():
                fail(number, "text", "empty text")
            if "\x00" in key:
                fail(number, "pid", "id contains a NUL character (not supported by the offset index)")
            chunks.add(key, offset)
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                fail(number, None, f"invalid JSON ({err.msg} at column {err.colno})")
            if not isinstance(obj, dict):
                fail(number, None, f"expected a JSON object, got {type(obj).__name__}")
            try:
                key = _optional_id(path, number, obj, "_id", "_id")
                if key is None:
                    raise DataFormatError(path, number, "_id", "missing (expected an id)")
            except DataFormatError as err:
                fail(number, err.field, err.message)
            current = (key, offset)
            try:
                body = _require_str(path, number, obj, "text", allow_empty=True)
                title = _require_str(path, number, obj, "title", allow_empty=True) if "title" in obj else ""
                if not (title.strip() or body.strip()):
                    raise DataFormatError(path, number, "text", "title and text are both empty")
            except DataFormatError as err:
                fail(number, err.field, err.message, current)
            if "\x00" in key:
                fail(number, "_id", "id contains a NUL character (not supported by the offset index)", current)
            chunks.add(key, offset)
    if not seen:
        raise DataFormatError(path, None, None, "file is empty (expected at least one record)")
    return columns


__all__ = ["TextCollection"]
