"""Readers: good files parse; every kind of malformed file fails with file:line and the field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kdlab.data.readers import (
    DataFormatError,
    RunEntry,
    Seq2SeqPair,
    assemble_ranking_groups,
    read_beir_qrels,
    read_clicks_jsonl,
    read_msmarco_collection,
    read_msmarco_queries,
    read_ranking_jsonl,
    read_seq2seq_jsonl,
    read_trec_qrels,
    read_run,
    read_trec_run,
    write_ranking_jsonl,
)
from kdlab.data.sources import RankingSource, read_source
from kdlab.runs import write_jsonl_atomic

GOOD_GROUP = {"query_id": "q1", "query": "open a file",
              "docs": [{"id": "d1", "title": "io.open", "summary": "Open file", "label": 2, "teacher_score": 1.5},
                       {"id": "d2", "text": "Close it", "label": 0}]}


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _expect(fn, path: Path, line: int | None, field: str | None, fragment: str,
            reported: Path | None = None) -> DataFormatError:
    """Call ``fn(path)``; the error must start with ``reported``(default ``path``)``:line:``."""
    with pytest.raises(DataFormatError) as info:
        fn(path)
    err = info.value
    msg = str(err)
    assert "\n" not in msg
    shown = reported or path
    where = f"{shown}:{line}:" if line is not None else f"{shown}:"
    assert msg.startswith(where), msg
    assert err.line == line and err.field == field, msg
    if field:
        assert f"field '{field}'" in msg
    assert fragment in msg, msg
    return err


def test_ranking_jsonl_good(tmp_path: Path) -> None:
    groups = read_ranking_jsonl(_jsonl(tmp_path / "r.jsonl", [GOOD_GROUP, {"query": "x", "docs": [{"id": 7, "text": "t"}]}]))
    assert [g.query_id for g in groups] == ["q1", "line2"]
    d1, d2 = groups[0].docs
    assert (d1.text, d1.label, d1.teacher_score) == ("io.open Open file", 2.0, 1.5)
    assert (d2.text, d2.teacher_score) == ("Close it", None)
    assert groups[1].docs[0].id == "7" and groups[1].docs[0].label is None


@pytest.mark.parametrize("row, field, fragment", [
    ({"docs": []}, "query", "missing"),
    ({"query": 3, "docs": []}, "query", "expected a string, got 3"),
    ({"query": "q"}, "docs", "missing"),
    ({"query": "q", "docs": []}, "docs", "non-empty list"),
    ({"query": "q", "docs": [{"text": "t"}]}, "docs[0].id", "missing"),
    ({"query": "q", "docs": [{"id": "a"}]}, "docs[0].text", "expected 'text' or 'title'+'summary'"),
    ({"query": "q", "docs": [{"id": "a", "text": "t"}, {"id": "b", "text": "u"}, {"id": "c", "text": "v", "label": "high"}]},
     "docs[2].label", "expected a number, got 'high'"),
    ({"query": "q", "docs": [{"id": "a", "text": "t", "label": True}]}, "docs[0].label", "expected a number"),
    ({"query": "q", "docs": [{"id": "a", "text": "t", "teacher_score": "NaN"}]}, "docs[0].teacher_score", "expected a number"),
    ({"query": "q", "docs": [{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]}, "docs[1].id", "duplicate document id 'a'"),
])
def test_ranking_jsonl_field_errors(tmp_path: Path, row: dict, field: str, fragment: str) -> None:
    path = _jsonl(tmp_path / "data.jsonl", [GOOD_GROUP, row])
    _expect(read_ranking_jsonl, path, 2, field, fragment)


def test_ranking_jsonl_nan_and_inf_literals(tmp_path: Path) -> None:
    bad = '{"query": "q", "docs": [{"id": "a", "text": "t", "teacher_score": NaN}]}'
    _expect(read_ranking_jsonl, _jsonl(tmp_path / "n.jsonl", [bad]), 1, "docs[0].teacher_score", "finite")
    bad = '{"query": "q", "docs": [{"id": "a", "text": "t", "label": Infinity}]}'
    _expect(read_ranking_jsonl, _jsonl(tmp_path / "i.jsonl", [bad]), 1, "docs[0].label", "finite")


def test_ranking_jsonl_file_level_errors(tmp_path: Path) -> None:
    _expect(read_ranking_jsonl, _jsonl(tmp_path / "j.jsonl", [GOOD_GROUP, "", '{"query": "q", "docs": [}']),
            3, None, "invalid JSON")
    _expect(read_ranking_jsonl, _jsonl(tmp_path / "a.jsonl", ["[1, 2]"]), 1, None, "expected a JSON object")
    _expect(read_ranking_jsonl, _write(tmp_path / "e.jsonl", "\n  \n"), None, None, "empty")
    _expect(read_ranking_jsonl, tmp_path / "missing.jsonl", None, None, "not found")
    dup = dict(GOOD_GROUP)
    _expect(read_ranking_jsonl, _jsonl(tmp_path / "d.jsonl", [GOOD_GROUP, dup]), 2, "query_id", "first on line 1")
    raw = json.dumps(GOOD_GROUP).encode() + b"\n" + b'{"query": "caf\xe9", "docs": []}\n'
    _expect(read_ranking_jsonl, _write(tmp_path / "u.jsonl", raw), 2, None, "not valid UTF-8 (byte 0xe9")


def test_clicks_and_seq2seq(tmp_path: Path) -> None:
    clicks = read_clicks_jsonl(_jsonl(tmp_path / "c.jsonl", [{"query": "q", "title": "t", "summary": "s"}]))
    assert clicks[0].title == "t"
    _expect(read_clicks_jsonl, _jsonl(tmp_path / "c2.jsonl", [{"query": "q", "summary": "s"}]), 1, "title", "missing")
    pairs = read_seq2seq_jsonl(_jsonl(tmp_path / "s.jsonl", [{"source": "a b", "target": "c"}]))
    assert pairs[0].target == "c"
    _expect(read_seq2seq_jsonl, _jsonl(tmp_path / "s2.jsonl", [{"source": "a", "target": ["c"]}]),
            1, "target", "expected a string")



def test_seq2seq_reads_gsm8k_question_answer(tmp_path: Path) -> None:
    gsm = Path(__file__).parent / "data" / "gsm8k_tiny.jsonl"
    pairs = read_seq2seq_jsonl(gsm)
    assert len(pairs) == 6
    assert pairs[0].source.startswith("A baker makes 12 loaves")
    assert pairs[0].target.endswith("\n#### 6") and "<<12+9=21>>" in pairs[0].target  # kept whole
    assert read_seq2seq_jsonl(gsm, fields="question-answer") == pairs
    extra = _jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "#### 1", "ans": 1}])  # other keys ignored
    assert read_seq2seq_jsonl(extra) == [Seq2SeqPair("q", "#### 1")]
    st = _jsonl(tmp_path / "st.jsonl", [{"source": "s", "target": "t"}])
    assert read_seq2seq_jsonl(st, fields="source-target") == [Seq2SeqPair("s", "t")]

    # neither pair on the first line: file:line:field naming both choices
    _expect(read_seq2seq_jsonl, _jsonl(tmp_path / "n.jsonl", [{"text": "a", "summary": "b"}]), 1, "source",
            "expected string fields 'source' and 'target', or GSM8K's 'question' and 'answer'; found keys: 'text'")
    # the first line fixes the pair; a later line in the other layout is named as such
    mixed = _jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "a"}, {"source": "s", "target": "t"}])
    _expect(read_seq2seq_jsonl, mixed, 2, "question", "line 1 chose fields question/answer, this line has source/target")
    _expect(lambda p: read_seq2seq_jsonl(p, fields="question-answer"), st, 1, "question",
            "the fields option chose fields question/answer, this line has source/target")
    _expect(read_seq2seq_jsonl, _jsonl(tmp_path / "a.jsonl", [{"question": "q"}]), 1, "answer", "missing")
    _expect(read_seq2seq_jsonl, _jsonl(tmp_path / "e.jsonl", [{"question": "q", "answer": ""}]), 1, "answer",
            "non-empty")
    _expect(read_seq2seq_jsonl, _jsonl(tmp_path / "t.jsonl", [{"source": "s", "target": "t"}, {"target": "u"}]),
            2, "source", "missing (expected a string)")
    with pytest.raises(ValueError, match="fields must be 'auto' or one of"):
        read_seq2seq_jsonl(st, fields="src-tgt")  # type: ignore[arg-type]

@pytest.fixture()
def msmarco(tmp_path: Path) -> dict[str, Path]:
    return {
        "collection": _write(tmp_path / "collection.tsv", "p1\tfirst passage\np2\tsecond passage\np3\tthird\n"),
        "queries": _write(tmp_path / "queries.tsv", "q1\twhat is first\nq2\tsecond?\n"),
        "qrels": _write(tmp_path / "qrels.txt", "q1 0 p1 1\nq2 0 p3 2\n"),
        "run": _write(tmp_path / "run.trec", "q1 Q0 p2 1 9.5 bm25\nq1 Q0 p1 2 7.0 bm25\nq1 Q0 p3 3 1 bm25\n"
                                             "q2 Q0 p1 1 3.0 bm25\n"),
    }


def _msmarco_groups(files: dict[str, Path], **options: object) -> list:
    source = RankingSource(format="msmarco", **{k: str(v) for k, v in files.items()}, **options)  # type: ignore[arg-type]
    return read_source(source, "train", cache=False).groups


def test_msmarco_and_trec_good(msmarco: dict[str, Path]) -> None:
    assert read_msmarco_collection(msmarco["collection"])["p2"] == "second passage"
    assert read_msmarco_queries(msmarco["queries"])["q2"] == "second?"
    assert read_trec_qrels(msmarco["qrels"]) == {"q1": {"p1": 1}, "q2": {"p3": 2}}
    run = read_trec_run(msmarco["run"])
    assert [e.doc_id for e in run["q1"]] == ["p2", "p1", "p3"]
    groups = _msmarco_groups(msmarco, top_k=2)
    assert [g.query_id for g in groups] == ["q1", "q2"]
    assert [(d.id, d.label) for d in groups[0].docs] == [("p2", 0.0), ("p1", 1.0)]
    assert [(d.id, d.label) for d in groups[1].docs] == [("p1", 0.0)]
    with_pos = _msmarco_groups(msmarco, top_k=1, add_missing_positives=True)
    assert [d.id for d in with_pos[0].docs] == ["p2", "p1"] and [d.id for d in with_pos[1].docs] == ["p1", "p3"]


def test_msmarco_and_trec_errors(tmp_path: Path, msmarco: dict[str, Path]) -> None:
    _expect(read_msmarco_collection, _write(tmp_path / "c.tsv", "p1\ta\np1\tb\n"), 2, "pid", "duplicate id 'p1'")
    _expect(read_msmarco_collection, _write(tmp_path / "c2.tsv", "p1\ta\np2 no tab\n"), 2, None, "2 tab-separated")
    _expect(read_msmarco_queries, _write(tmp_path / "q.tsv", "q1\t \n"), 1, "text", "empty text")
    _expect(read_trec_qrels, _write(tmp_path / "qr.txt", "q1 0 p1 1\nq1 0 p2 yes\n"), 2, "rel", "expected an integer, got 'yes'")
    _expect(read_trec_qrels, _write(tmp_path / "qr2.txt", "q1 0 p1\n"), 1, None, "expected 4 columns")
    _expect(lambda p: read_trec_qrels(p, doc_ids={"p1"}), _write(tmp_path / "qr3.txt", "q1 0 p1 1\nq1 0 p9 1\n"),
            2, "pid", "unknown document id 'p9'")
    _expect(read_trec_run, _write(tmp_path / "r.trec", "q1 Q0 p1 1 nan t\n"), 1, "score", "finite")
    _expect(read_trec_run, _write(tmp_path / "r2.trec", "q1 Q0 p1 1 inf t\n"), 1, "score", "finite")
    _expect(read_trec_run, _write(tmp_path / "r3.trec", "q1 Q0 p1 1 2 t\nq1 Q0 p1 2 1 t\n"), 2, "pid", "duplicate")
    _expect(read_trec_run, _write(tmp_path / "r4.trec", "q1 Q0 p1 first 2 t\n"), 1, "rank", "expected an integer")
    _expect(lambda p: read_trec_run(p, query_ids={"q1"}), _write(tmp_path / "r5.trec", "q7 Q0 p1 1 2 t\n"),
            1, "qid", "unknown query id 'q7'")
    bad_run = _write(tmp_path / "run_bad.trec", "q1 Q0 p1 1 2 t\nq1 Q0 zzz 2 1 t\n")
    with pytest.raises(DataFormatError, match=r"run_bad\.trec:2: field 'pid': unknown document id 'zzz'"):
        _msmarco_groups({**msmarco, "run": bad_run})


@pytest.mark.parametrize("layout", ["best_first", "worst_first", "shuffled", "interleaved"])
@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_a_streamed_top_k_is_the_whole_sort_s_first_k(tmp_path: Path, layout: str, top_k: int) -> None:
    """Keeping each query's best ``top_k`` while reading gives exactly the first ``top_k`` of the
    whole-file sort (score desc, rank asc, doc id), ties included, whatever the line order."""
    import random

    rng = random.Random(f"{layout}-{top_k}")
    rows = [(f"q{q}", f"d{d}", rank, float(rng.choice([1, 2, 2, 3, 5])))  # many tied scores
            for q in range(5) for rank, d in enumerate(rng.sample(range(100), 40), 1)]
    if layout == "worst_first":
        rows.reverse()
    elif layout == "shuffled":
        rng.shuffle(rows)
    elif layout == "interleaved":  # queries not in contiguous blocks
        rows.sort(key=lambda r: (r[2], r[0]))
    text = "".join(f"{q} Q0 {d} {rank} {score} t\n" for q, d, rank, score in rows)
    path = _write(tmp_path / "run.trec", text)
    whole = read_trec_run(path)
    streamed = read_trec_run(path, top_k=top_k)
    assert streamed == {qid: entries[:top_k] for qid, entries in whole.items()}
    tsv = _write(tmp_path / "run.tsv", "".join(f"{q}\t{d}\t{rank}\n" for q, d, rank, _ in rows))
    assert read_run(tsv, allow_msmarco_tsv=True, top_k=top_k) == {
        qid: entries[:top_k] for qid, entries in read_run(tsv, allow_msmarco_tsv=True).items()}


def test_a_streamed_run_still_checks_every_line(tmp_path: Path) -> None:
    """Lines that can no longer enter the top-k are still parsed and checked: a duplicate of a
    dropped entry within the query's block, a bad score or an unknown id on line 5 still raise."""
    head = "q1 Q0 a 1 9 t\nq1 Q0 b 2 8 t\nq1 Q0 c 3 7 t\nq1 Q0 d 4 6 t\n"
    _expect(lambda p: read_trec_run(p, top_k=1), _write(tmp_path / "r1.trec", head + "q1 Q0 c 5 1 t\n"),
            5, "pid", "duplicate entry for query 'q1', document 'c'")
    _expect(lambda p: read_trec_run(p, top_k=1), _write(tmp_path / "r2.trec", head + "q1 Q0 e 5 nan t\n"),
            5, "score", "finite")
    _expect(lambda p: read_trec_run(p, doc_ids={"a", "b", "c", "d"}, top_k=1),
            _write(tmp_path / "r3.trec", head + "q1 Q0 zzz 5 1 t\n"), 5, "pid", "unknown document id 'zzz'")
    # not grouped by query: a document kept in the top-k may still not come twice
    _expect(lambda p: read_trec_run(p, top_k=2), _write(tmp_path / "r4.trec", head + "q2 Q0 a 1 1 t\nq1 Q0 a 5 1 t\n"),
            6, "pid", "duplicate entry for query 'q1', document 'a'")
    with pytest.raises(ValueError, match="top_k"):
        read_trec_run(tmp_path / "r4.trec", top_k=0)


def test_assemble_checks_ids() -> None:
    run = {"q1": [RunEntry("p1", 1, 1.0)]}
    with pytest.raises(KeyError, match="p1"):
        assemble_ranking_groups({"q1": "x"}, {}, {"q1": {"p1": 1}}, run)
    with pytest.raises(ValueError):
        assemble_ranking_groups({"q1": "x"}, {"p1": "t"}, {"q1": {"p1": 1}}, run, top_k=0)


def _beir(root: Path, qrels: str) -> Path:
    (root / "qrels").mkdir(parents=True)
    _jsonl(root / "corpus.jsonl", [{"_id": "d1", "title": "T1", "text": "one"}, {"_id": "d2", "title": "", "text": "two"}])
    _jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "find one"}])
    _write(root / "qrels" / "test.tsv", qrels)
    return root


def _beir_groups(root: Path, run: Path | None = None) -> list:
    source = RankingSource(format="beir", path=str(root), run=str(run) if run else None)
    return read_source(source, "test", cache=False).groups


def test_beir(tmp_path: Path) -> None:
    root = _beir(tmp_path / "beir", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert read_beir_qrels(root / "qrels" / "test.tsv") == {"q1": {"d1": 1}}
    run = _write(tmp_path / "run.trec", "q1 Q0 d2 1 5 x\nq1 Q0 d1 2 4 x\n")
    groups = _beir_groups(root, run)
    assert [(d.id, d.title, d.label, d.first_stage_score) for d in groups[0].docs] == [
        ("d2", "", 0.0, 5.0), ("d1", "T1", 1.0, 4.0)]

    bad = _beir(tmp_path / "b2", "query-id\tcorpus-id\tscore\nq1\tdX\t1\n")
    _expect(_beir_groups, bad, 2, "corpus-id", "unknown document id 'dX'", bad / "qrels" / "test.tsv")
    no_header = _beir(tmp_path / "b3", "q1\td1\t1\n")
    _expect(_beir_groups, no_header, 1, None, "header", no_header / "qrels" / "test.tsv")
    dup = tmp_path / "b4"
    _beir(dup, "query-id\tcorpus-id\tscore\n")
    _jsonl(dup / "corpus.jsonl", [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}])
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:2: field '_id': duplicate id 'd1'"):
        _beir_groups(dup)


def test_write_jsonl_atomic(tmp_path: Path) -> None:
    target = tmp_path / "out" / "rows.jsonl"
    write_jsonl_atomic(target, [{"a": 1}, {"b": "é"}])
    assert target.read_text(encoding="utf-8").splitlines() == ['{"a": 1}', '{"b": "é"}']

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(target, rows())
    assert target.read_text(encoding="utf-8").startswith('{"a": 1}'), "old file must survive a failed write"
    with pytest.raises(ValueError):
        write_jsonl_atomic(target, [{"x": float("nan")}])
    assert sorted(os.listdir(target.parent)) == ["rows.jsonl"], "no temp files left behind"


def test_ranking_roundtrip(tmp_path: Path) -> None:
    src = read_ranking_jsonl(_jsonl(tmp_path / "r.jsonl", [GOOD_GROUP]))
    write_ranking_jsonl(tmp_path / "w.jsonl", src)
    again = read_ranking_jsonl(tmp_path / "w.jsonl")
    assert [(d.id, d.text, d.label, d.teacher_score) for d in again[0].docs] == \
           [(d.id, d.text, d.label, d.teacher_score) for d in src[0].docs]
