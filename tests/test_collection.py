"""TextCollection: an offset index that answers like the dict readers, with the same one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import kdlab.data.collection as collection_module
from kdlab.data.collection import TextCollection
from kdlab.data.readers import (
    DataFormatError,
    assemble_ranking_groups,
    read_trec_qrels,
    read_trec_run,
    read_tsv_texts,
)
from kdlab.data.readers.beir import _read_beir_jsonl

TSV = (
    "\ufeff1\thello world\n"
    "\n"
    "  2 \t  café au lait — naïve  \r\n"
    "10\t日本語のテキスト 🙂\n"
    "   \n"
    "9\tnine\n"
    "100\tlast line without newline"
)


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))


def _same_error(dict_reader, path: Path, kind: str = "auto") -> DataFormatError:
    """TextCollection.open fails with exactly the dict reader's message (file:line: field: what)."""
    with pytest.raises(DataFormatError) as expected:
        dict_reader(path)
    with pytest.raises(DataFormatError) as got:
        TextCollection.open(path, kind)
    assert str(got.value) == str(expected.value)
    assert "\n" not in str(got.value)
    assert (got.value.line, got.value.field) == (expected.value.line, expected.value.field)
    return got.value


@pytest.fixture(params=[(1 << 16, 4 << 20), (2, 7)], ids=["one-chunk", "chunks-of-2-blocks-of-7-bytes"])
def chunk_lines(request, monkeypatch) -> int:
    """Run twice: one chunk and one read; chunks of 2 records (the int → bytes switch across
    chunks) read 7 bytes at a time (lines cut across reads, lines longer than a read)."""
    lines, block = request.param
    monkeypatch.setattr(collection_module, "_CHUNK_LINES", lines)
    monkeypatch.setattr(collection_module, "_READ_BLOCK", block)
    return lines


# --------------------------------------------------------------------------------------------------
# Lookups


def test_tsv_lookups_equal_the_dict_reader(tmp_path: Path, chunk_lines: int) -> None:
    path = _write(tmp_path / "collection.tsv", TSV)
    expected = read_tsv_texts(path)
    with TextCollection.open(path) as corpus:
        assert len(corpus) == len(expected) == 5
        assert corpus._ids.dtype.kind == "i"  # all pids are integers: an int64 index
        for pid, text in expected.items():
            assert pid in corpus
            assert corpus[pid] == ("", text)
        assert corpus["1"] == ("", "hello world")  # BOM stripped from line 1
        assert corpus["2"] == ("", "café au lait — naïve")  # id and text stripped, CRLF dropped
        assert corpus["100"] == ("", "last line without newline")
        assert [(d, t) for d, _, t in corpus.iter_documents()] == list(expected.items())  # file order
        assert [corpus.line_of(p) for p in ("1", "2", "10", "9", "100")] == [1, 3, 4, 6, 7]
        for absent in ("3", "01", " 1", "1 ", "", "-1", "+1", "1.0", "3000000000", "99999999999999999999999", "abc"):
            assert absent not in corpus
            with pytest.raises(KeyError):
                corpus[absent]
        assert 1 not in corpus and None not in corpus  # type: ignore[operator]
        assert corpus.get("3") is None and corpus.get("9") == ("", "nine")


def test_non_integer_and_mixed_ids(tmp_path: Path, chunk_lines: int) -> None:
    text = "5\tfive\n6\tsix\n007\tzero zero seven\n7\tseven\nMED-10\tmedical\nβ\tbeta\n3\tthree\n"
    path = _write(tmp_path / "c.tsv", text)
    expected = read_tsv_texts(path)
    corpus = TextCollection.open(path)
    assert corpus._ids.dtype.kind == "S"  # one non-integer id: fixed-width bytes for all
    assert {d: corpus[d][1] for d in expected} == expected
    assert "007" in corpus and "7" in corpus and corpus["007"] != corpus["7"]
    assert "07" not in corpus and "MED-1" not in corpus and "MED-100" not in corpus
    assert [d for d, _, _ in corpus.iter_documents()] == list(expected)
    assert corpus.line_of("β") == 6


def test_integer_ids_beyond_int32(tmp_path: Path, chunk_lines: int) -> None:
    path = _write(tmp_path / "c.tsv", "1\tone\n2\ttwo\n3000000000\tbig\n")
    corpus = TextCollection.open(path)
    assert corpus._ids.dtype == "int64"
    assert corpus["3000000000"] == ("", "big") and corpus["1"] == ("", "one") and "3000000001" not in corpus
    assert corpus.get_many(["3000000000", "2"]) == [("", "big"), ("", "two")]
    small = TextCollection.open(_write(tmp_path / "d.tsv", "1\tone\n2\ttwo\n"))
    assert small._ids.dtype == "int32" and small._offsets.dtype == "uint32"
    assert small._dense_first == 1 and corpus._dense_first is None  # 1, 2: a position is pid - 1
    assert ("0" not in small, "1" in small, "2" in small, "3" not in small) == (True, True, True, True)
    with pytest.raises(KeyError, match="3000000000"):
        small.get_many(["1", "3000000000"])


def test_get_many_keeps_the_order_asked(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.tsv", TSV)
    corpus = TextCollection.open(path)
    ids = ["100", "1", "10", "1", "9"]
    assert corpus.get_many(ids) == [corpus[i] for i in ids]
    assert corpus.get_many([]) == []
    with pytest.raises(KeyError, match="'3'"):
        corpus.get_many(["1", "3", "4"])


def test_beir_jsonl_equals_the_dict_reader(tmp_path: Path, chunk_lines: int) -> None:
    rows = [{"_id": "doc1", "title": "Ünïcode", "text": "body one"},
            {"_id": 42, "text": "no title"},
            "",
            {"_id": "doc3", "title": "only a title", "text": ""},
            {"_id": " spaced ", "title": "", "text": "kept as written"}]
    path = _jsonl(tmp_path / "corpus.jsonl", rows)
    expected = _read_beir_jsonl(path, with_title=True)
    corpus = TextCollection.open(path)
    assert corpus.kind == "jsonl" and len(corpus) == 4
    assert {d: corpus[d] for d in expected} == expected
    assert "42" in corpus and corpus.line_of("doc3") == 4
    assert [(d, (t, x)) for d, t, x in corpus.iter_documents()] == list(expected.items())


def test_three_column_tsv(tmp_path: Path) -> None:
    corpus = TextCollection.open(_write(tmp_path / "c.tsv", "a\tTitle A\tText A\nb\t\tText B\n"))
    assert corpus["a"] == ("Title A", "Text A") and corpus["b"] == ("", "Text B")
    with pytest.raises(DataFormatError) as info:
        TextCollection.open(_write(tmp_path / "d.tsv", "a\tT\tX\nb\tY\n"))
    assert str(info.value) == (f"{tmp_path / 'd.tsv'}:2: expected 3 tab-separated columns (pid, title, text) "
                               "as on the first line, got 2")


def test_kind_by_suffix_or_explicit(tmp_path: Path) -> None:
    path = _write(tmp_path / "passages.txt", "1\tone\n")
    with pytest.raises(DataFormatError) as info:
        TextCollection.open(path)
    assert str(info.value) == (f"{path}: cannot tell the format from the suffix '.txt' "
                               "(expected .tsv or .jsonl, or pass kind='tsv' / kind='jsonl')")
    assert TextCollection.open(path, "tsv")["1"] == ("", "one")
    with pytest.raises(ValueError, match="kind must be"):
        TextCollection.open(path, "csv")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Errors: the dict readers' messages, word for word


@pytest.mark.parametrize("content, line, field", [
    (b"1\tok\n2\tbad \xff byte\n", 2, None),
    (b"\xef\xbb\xbf1\tok\xc3\n", 1, None),
    ("1\tok\n2\n", 2, None),
    ("1\tok\n2\ta\tb\n", 2, None),
    ("1\ta\tb\tc\n", 1, None),
    ("1\tok\n \tno id\n", 2, "pid"),
    ("1\tok\n2\t   \n", 2, "text"),
    ("1\tok\n2\ttwo\n1\tagain\n", 3, "pid"),
    ("x\tok\n\n\ny\t1\nx\tagain\ny\tagain\n", 5, "pid"),
    ("1\tok\n2\tok\n1\tdup first\n3\n", 3, "pid"),  # the duplicate (line 3) comes before the bad line
    ("1\tok\n1\t\n", 2, "text"),  # the reader checks the text before the duplicate
    ("\n  \n\r\n", None, None),
    ("", None, None),
], ids=["utf8", "utf8-bom-line1", "one-column", "three-columns-after-two", "four-columns", "empty-id",
        "empty-text", "duplicate", "duplicate-after-blank-lines", "duplicate-before-bad-line",
        "empty-text-before-duplicate", "blank-only", "empty"])
def test_tsv_errors(tmp_path: Path, chunk_lines: int, content: str | bytes, line: int | None, field: str | None) -> None:
    err = _same_error(read_tsv_texts, _write(tmp_path / "c.tsv", content))
    assert (err.line, err.field) == (line, field)


def test_duplicate_names_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.tsv", "1\tone\n2\ttwo\n\n3\tthree\n2\tagain\n")
    with pytest.raises(DataFormatError) as info:
        TextCollection.open(path)
    assert str(info.value) == f"{path}:5: field 'pid': duplicate id '2' (first on line 2)"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _same_error(read_tsv_texts, tmp_path / "absent.tsv")
    (tmp_path / "dir.tsv").mkdir()
    err = _same_error(read_tsv_texts, tmp_path / "dir.tsv")
    assert str(err) == f"{tmp_path / 'dir.tsv'}: not a regular file"


@pytest.mark.parametrize("rows, line, field", [
    ([{"_id": "a", "text": "x"}, "{not json"], 2, None),
    ([{"_id": "a", "text": "x"}, "[1, 2]"], 2, None),
    ([{"text": "x"}], 1, "_id"),
    ([{"_id": None, "text": "x"}], 1, "_id"),
    ([{"_id": True, "text": "x"}], 1, "_id"),
    ([{"_id": 1.5, "text": "x"}], 1, "_id"),
    ([{"_id": "  ", "text": "x"}], 1, "_id"),
    ([{"_id": "a"}], 1, "text"),
    ([{"_id": "a", "text": 3}], 1, "text"),
    ([{"_id": "a", "title": None, "text": "x"}], 1, "title"),
    ([{"_id": "a", "title": " ", "text": ""}], 1, "text"),
    ([{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}, {"_id": "a", "text": "z"}], 3, "_id"),
    ([{"_id": 7, "text": "x"}, {"_id": "7", "text": "y"}], 2, "_id"),
    ([{"_id": "a", "text": "x"}, {"_id": "a"}], 2, "_id"),  # duplicate before missing text
    ([{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}, "{bad"], 2, "_id"),
], ids=["invalid-json", "not-object", "missing-id", "null-id", "bool-id", "float-id", "blank-id", "missing-text",
        "text-not-string", "title-not-string", "both-empty", "duplicate", "duplicate-int-and-str",
        "duplicate-before-missing-text", "duplicate-before-invalid-json"])
def test_jsonl_errors(tmp_path: Path, chunk_lines: int, rows: list, line: int, field: str | None) -> None:
    err = _same_error(lambda p: _read_beir_jsonl(p, with_title=True), _jsonl(tmp_path / "corpus.jsonl", rows))
    assert (err.line, err.field) == (line, field)


def test_jsonl_not_utf8_and_empty(tmp_path: Path) -> None:
    reader = lambda p: _read_beir_jsonl(p, with_title=True)  # noqa: E731
    _same_error(reader, _write(tmp_path / "a.jsonl", b'{"_id": "a", "text": "x"}\n{"_id": "\xe9"}\n'))
    _same_error(reader, _write(tmp_path / "b.jsonl", "\n\n"))


# --------------------------------------------------------------------------------------------------
# With the run/qrels readers and assemble_ranking_groups


def test_feeds_run_reader_and_assembly(tmp_path: Path) -> None:
    coll = _write(tmp_path / "collection.tsv", TSV)
    queries = {"q1": "greeting", "q2": "japanese"}
    run_path = _write(tmp_path / "run.trec", "q1 Q0 1 1 9.0 bm25\nq1 Q0 10 2 8.0 bm25\nq1 Q0 2 3 7.0 bm25\n"
                                              "q2 Q0 10 1 5.0 bm25\nq2 Q0 100 2 5.0 bm25\n")
    qrels_path = _write(tmp_path / "qrels.txt", "q1 0 2 1\nq2 0 9 1\n")
    as_dict = read_tsv_texts(coll)
    corpus = TextCollection.open(coll)
    run = read_trec_run(run_path, doc_ids=corpus, query_ids=queries)
    qrels = read_trec_qrels(qrels_path, doc_ids=corpus, query_ids=queries)
    assert run == read_trec_run(run_path, doc_ids=as_dict.keys(), query_ids=queries)
    for missing in (False, True):
        got = assemble_ranking_groups(queries, corpus, qrels, run, top_k=2, add_missing_positives=missing)
        want = assemble_ranking_groups(queries, as_dict, qrels, run, top_k=2, add_missing_positives=missing)
        assert got == want and got
    bad_run = _write(tmp_path / "bad.trec", "q1 Q0 1 1 9.0 bm25\nq1 Q0 3 2 8.0 bm25\n")
    with pytest.raises(DataFormatError) as info:
        read_trec_run(bad_run, doc_ids=corpus)
    assert str(info.value) == f"{bad_run}:2: field 'pid': unknown document id '3' (not in the collection)"


# --------------------------------------------------------------------------------------------------
# Pickling, closing, a changed file, imports


def test_pickle_round_trip_reopens_lazily(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.tsv", TSV)
    corpus = TextCollection.open(path)
    assert corpus["10"][1] == "日本語のテキスト 🙂"  # opens the file descriptor
    clone = pickle.loads(pickle.dumps(corpus))
    assert clone._fd is None
    assert clone.get_many(["9", "1"]) == corpus.get_many(["9", "1"])
    assert len(clone) == len(corpus) and clone.path == corpus.path
    corpus.close()
    clone.close()
    assert corpus["1"] == ("", "hello world")  # a read after close reopens
    corpus.close()
    os.utime(path, ns=(0, 0))  # the file changed since it was indexed
    stale = pickle.loads(pickle.dumps(corpus))
    with pytest.raises(DataFormatError, match="file changed since it was indexed"):
        stale["1"]


def test_long_document_is_read_whole(tmp_path: Path) -> None:
    body = "word " * 5000  # longer than one fetch
    corpus = TextCollection.open(_write(tmp_path / "c.tsv", f"1\t{body}\n2\tshort\n"))
    assert corpus["1"] == ("", body.strip()) and corpus["2"] == ("", "short")


def test_imports_stay_light() -> None:
    code = ("import sys, kdlab.data.collection, kdlab.data.first_stage; "
            "print(sorted(m for m in ('torch', 'lightning', 'bm25s') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
