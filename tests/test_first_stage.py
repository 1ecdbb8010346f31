"""First-stage BM25 (bm25s): obvious rankings, a hand-computed Lucene score, ties, candidate scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdlab.data.collection import TextCollection
from kdlab.data.first_stage import BM25Options, bm25_candidate_scores, bm25_run, describe
from kdlab.data.readers import RankingDoc, RankingGroup, RunEntry, assemble_ranking_groups

pytest.importorskip("bm25s")

DOCS = {
    "d1": "apple banana cherry",
    "d2": "banana banana durian",
    "d3": ("Fruit", "cherry elderberry fig grape"),  # (title, text): indexed as "Fruit cherry elderberry fig grape"
    "d4": "the quokka is a small marsupial",
    "d5": "apple apple apple",
}
PLAIN = BM25Options(stopwords=None)


def test_rare_query_term_ranks_its_document_first() -> None:
    run = bm25_run(DOCS, {"q": "where does a quokka live", "f": "fruit"}, top_k=3, progress=False)
    assert run["q"][0].doc_id == "d4" and run["q"][0].score > 0
    assert run["f"][0].doc_id == "d3"  # the title is indexed too
    assert [e.rank for e in run["q"]] == [1, 2, 3]
    assert all(isinstance(e, RunEntry) for e in run["q"])
    scores = [e.score for e in run["q"]]
    assert scores == sorted(scores, reverse=True)


def test_score_equals_hand_computed_lucene_bm25() -> None:
    k1, b = 1.2, 0.6
    options = BM25Options(k1=k1, b=b, stopwords=None)
    run = bm25_run(DOCS, {"q": "banana durian"}, top_k=len(DOCS), options=options, progress=False)
    got = {e.doc_id: e.score for e in run["q"]}

    # Tokens (lower-cased, words of 2+ characters, no stopwords): lengths 3, 3, 5, 5 ("a" is too
    # short), 3 → avgdl = 19 / 5. banana: df = 2; durian: df = 1; N = 5.
    n, avgdl = 5, 19 / 5

    def idf(df: int) -> float:  # Lucene: ln(1 + (N - df + 0.5) / (df + 0.5))
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def tf_part(tf: int, dl: int) -> float:  # Lucene (>= 8): tf / (tf + k1 · (1 - b + b · dl / avgdl))
        return tf / (tf + k1 * (1 - b + b * dl / avgdl))

    d2 = idf(2) * tf_part(2, 3) + idf(1) * tf_part(1, 3)
    d1 = idf(2) * tf_part(1, 3)
    assert got["d2"] == pytest.approx(d2, abs=1e-5)
    assert got["d1"] == pytest.approx(d1, abs=1e-5)
    assert got["d3"] == got["d4"] == got["d5"] == 0.0
    assert [e.doc_id for e in run["q"]] == ["d2", "d1", "d3", "d4", "d5"]  # zero scores: by id


def test_stopwords_are_dropped_by_default() -> None:
    default = bm25_run(DOCS, {"q": "the marsupial"}, top_k=2, progress=False)
    plain = bm25_run(DOCS, {"q": "the marsupial"}, top_k=2, options=PLAIN, progress=False)
    assert default["q"][0].doc_id == plain["q"][0].doc_id == "d4"
    assert default["q"][0].score != plain["q"][0].score  # "the" scores only without stopwords


def test_top_k_larger_than_the_collection_is_one_line() -> None:
    with pytest.raises(ValueError) as info:
        bm25_run(DOCS, {"q": "apple"}, top_k=6, progress=False)
    assert str(info.value) == "top_k=6 is larger than the collection (5 documents): ask for at most 5 documents per query"
    with pytest.raises(ValueError, match="top_k: expected an integer >= 1, got 0"):
        bm25_run(DOCS, {"q": "apple"}, top_k=0, progress=False)


def test_deterministic_and_ties_ordered_by_doc_id(tmp_path: Path) -> None:
    same = "identical passage text"
    docs = {pid: same for pid in ("9", "b", "10", "a", "100")} | {"x": "other words entirely"}
    queries = {"q1": "identical passage", "q2": "nothing matches", "q3": "words"}
    first = bm25_run(docs, queries, top_k=4, progress=False)
    assert first == bm25_run(dict(reversed(list(docs.items()))), queries, top_k=4, progress=False)
    assert [e.doc_id for e in first["q1"]] == ["10", "100", "9", "a"]  # equal scores: ids as text
    assert [e.doc_id for e in first["q2"]] == ["10", "100", "9", "a"]  # all zero
    assert [e.doc_id for e in first["q3"]] == ["x", "10", "100", "9"]
    assert list(first) == list(queries)


def test_many_ties_and_a_text_collection_give_the_same_run(tmp_path: Path) -> None:
    # 300 documents, integer pids written in shuffled order: a query matching nothing ties all 300
    # (the numpy path), a query matching a few ties the rest.
    pids = [str(p) for p in range(1, 301)]
    order = sorted(pids, key=lambda p: (int(p) * 7919) % 301)
    texts = {p: f"common filler words {'rare' if int(p) % 50 == 0 else 'plain'}" for p in order}
    path = tmp_path / "collection.tsv"
    path.write_text("".join(f"{p}\t{texts[p]}\n" for p in order), encoding="utf-8")
    queries = {"none": "zzz unknown", "rare": "rare", "all": "common"}
    from_dict = bm25_run(texts, queries, top_k=8, progress=False)
    from_file = bm25_run(TextCollection.open(path), queries, top_k=8, progress=False)
    assert from_file == from_dict
    by_text = sorted(pids)
    assert [e.doc_id for e in from_dict["none"]] == by_text[:8]
    assert [e.doc_id for e in from_dict["rare"]][:6] == ["100", "150", "200", "250", "300", "50"]
    assert [e.doc_id for e in from_dict["rare"]][6:] == [p for p in by_text if int(p) % 50][:2]
    assert [e.doc_id for e in from_dict["all"]] == by_text[:8]  # same score everywhere


def test_run_feeds_assemble_ranking_groups() -> None:
    run = bm25_run(DOCS, {"q": "quokka marsupial"}, top_k=3, progress=False)
    groups = assemble_ranking_groups({"q": "quokka marsupial"}, DOCS, {"q": {"d4": 1}}, run, top_k=3)
    assert [d.id for d in groups[0].docs][0] == "d4" and groups[0].docs[0].label == 1.0


def test_candidate_scores_shapes_order_and_values() -> None:
    groups = [
        RankingGroup("q1", "banana durian", (RankingDoc("d2", "", DOCS["d2"]), RankingDoc("d1", "", DOCS["d1"]),
                                             RankingDoc("d5", "", DOCS["d5"]))),
        RankingGroup("q2", "apple", (RankingDoc("d5", "", DOCS["d5"]),)),
        RankingGroup("q3", "quokka fruit", (RankingDoc("d4", "", DOCS["d4"]), RankingDoc("d3", "Fruit", DOCS["d3"][1]),
                                            RankingDoc("d1", "", "text ignored: d1 was seen first"))),
    ]
    scores = bm25_candidate_scores(groups, PLAIN)
    assert [len(s) for s in scores] == [3, 1, 3]
    assert all(isinstance(x, float) for s in scores for x in s)
    # The corpus is the union of the distinct documents (d1..d5): the same scores as a full run.
    union = {"d1": DOCS["d1"], "d2": DOCS["d2"], "d5": DOCS["d5"], "d4": DOCS["d4"], "d3": DOCS["d3"]}
    for group, got in zip(groups, scores):
        full = {e.doc_id: e.score for e in bm25_run(union, {"q": group.query}, top_k=5, options=PLAIN,
                                                    progress=False)["q"]}
        assert got == [full[d.id] for d in group.docs]
    assert scores[0][0] > scores[0][1] > scores[0][2] == 0.0
    assert scores[2][0] > 0 and scores[2][1] > 0 and scores[2][2] == 0.0
    assert bm25_candidate_scores([]) == []


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire", "bm25l", "bm25+"])
def test_every_method_scores_the_candidates_like_a_full_run(method: str) -> None:
    options = BM25Options(method=method, stopwords=None)  # type: ignore[arg-type]
    groups = [RankingGroup("q", "banana cherry", tuple(RankingDoc(d, *(t if isinstance(t, tuple) else ("", t)))
                                                       for d, t in DOCS.items()))]
    got = bm25_candidate_scores(groups, options)[0]
    full = {e.doc_id: e.score for e in bm25_run(DOCS, {"q": "banana cherry"}, 5, options, progress=False)["q"]}
    assert got == pytest.approx([full[d] for d in DOCS], abs=1e-6)
    assert max(got) == got[0] or max(got) == got[1]  # d1 or d2 best


@pytest.mark.parametrize("kwargs, message", [
    ({"k1": -0.5}, "BM25Options.k1: expected k1 >= 0, got -0.5"),
    ({"b": 1.5}, "BM25Options.b: expected 0 <= b <= 1, got 1.5"),
    ({"b": float("nan")}, "BM25Options.b: expected a finite number, got nan"),
    ({"method": "bm26"}, "BM25Options.method: expected one of lucene, robertson, atire, bm25l, bm25+, got 'bm26'"),
    ({"lowercase": "yes"}, "BM25Options.lowercase: expected true or false, got 'yes'"),
])
def test_options_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        BM25Options(**kwargs)
    assert str(info.value) == message


def test_unknown_stopword_list_and_missing_stemmer_are_one_line() -> None:
    with pytest.raises(ValueError) as info:
        bm25_run(DOCS, {"q": "apple"}, 1, BM25Options(stopwords="klingon"), progress=False)
    assert str(info.value).startswith("BM25Options.stopwords: bm25s has no stopword list 'klingon'")
    assert "\n" not in str(info.value)
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"needs PyStemmer \(pip install PyStemmer\)"):
            bm25_run(DOCS, {"q": "apple"}, 1, BM25Options(stemmer="english"), progress=False)


def test_describe_records_parameters_and_version() -> None:
    import bm25s

    info = describe(BM25Options(k1=0.9, b=0.4))
    assert info["bm25s_version"] == bm25s.__version__
    assert (info["k1"], info["b"], info["method"], info["stopwords"], info["lowercase"]) == (0.9, 0.4, "lucene", "en", True)
    assert "delta" not in info and describe(BM25Options(method="bm25+"))["delta"] == 0.5
    json.dumps(info)
