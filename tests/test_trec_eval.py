"""The trec_eval cross-check: hand-computed nDCG/RR, agreement with kdlab's RankingMetrics on a
tie-free example, TREC files round-tripping through kdlab's readers, refusals and the tie flag."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdlab.data.readers import read_trec_qrels, read_trec_run
from kdlab.metrics import RankingMetrics, cross_check, trec_eval_metrics, write_trec_qrels, write_trec_run

L3 = math.log2(3)

# q1: labels a=2, b=0, c=1; scores rank b, c, a.   q2: no relevant document.   q3: ranks z(3), y(0), x(1).
# q4 is judged but has no run entry.
QRELS = {"q1": {"a": 2, "b": 0, "c": 1}, "q2": {"a": 0, "b": 0}, "q3": {"x": 1, "y": 0, "z": 3}, "q4": {"a": 1}}
RUN = {
    "q1": {"a": 0.1, "b": 0.9, "c": 0.5},
    "q2": {"a": 1.0, "b": 0.5},
    "q3": {"x": 1.0, "y": 2.0, "z": 3.0},
}


def test_hand_computed_linear_and_exponential() -> None:
    agg, per_query = trec_eval_metrics(QRELS, RUN, k=10)
    # q1 ranked labels [0, 1, 2]: DCG = 1/log2(3) + 2/log2(4); IDCG = 2 + 1/log2(3)
    q1 = (1 / L3 + 1.0) / (2 + 1 / L3)
    # q3 ranked labels [3, 0, 1]: DCG = 3 + 1/2; IDCG = 3 + 1/log2(3)
    q3 = 3.5 / (3 + 1 / L3)
    assert sorted(per_query) == ["q1", "q3"]  # q2: nothing relevant; q4: not in the run
    assert per_query["q1"]["ndcg@10"] == pytest.approx(q1, abs=1e-12)
    assert per_query["q3"]["ndcg@10"] == pytest.approx(q3, abs=1e-12)
    assert per_query["q1"]["mrr@10"] == 0.5 and per_query["q3"]["mrr@10"] == 1.0
    assert agg == pytest.approx({"ndcg@10": (q1 + q3) / 2, "mrr@10": 0.75}, abs=1e-12)

    agg_exp, per_exp = trec_eval_metrics(QRELS, RUN, k=10, gain="exponential")
    # gains 2^rel - 1: q1 [0, 1, 3] -> DCG = 1/log2(3) + 3/2, IDCG = 3 + 1/log2(3); q3 [7, 0, 1]
    e1 = (1 / L3 + 1.5) / (3 + 1 / L3)
    e3 = 7.5 / (7 + 1 / L3)
    assert per_exp["q1"]["ndcg@10"] == pytest.approx(e1, abs=1e-12)
    assert per_exp["q3"]["ndcg@10"] == pytest.approx(e3, abs=1e-12)
    assert agg_exp["mrr@10"] == 0.75  # RR does not depend on the gain

    agg1, per1 = trec_eval_metrics(QRELS, RUN, k=1)
    # cut at 1: q1's top document b is non-relevant (0 and 0); q3's top is the ideal one
    assert per1["q1"] == {"ndcg@1": 0.0, "mrr@1": 0.0}
    assert per1["q3"] == pytest.approx({"ndcg@1": 1.0, "mrr@1": 1.0})
    assert agg1 == pytest.approx({"ndcg@1": 0.5, "mrr@1": 0.5})


def test_negative_relevance_counts_as_zero_and_empty_input() -> None:
    # ranked labels [-1, 1]: trec_eval (like kdlab) gives the -1 document no gain, not a negative one
    _, per_query = trec_eval_metrics({"q": {"x": 1, "y": -1}}, {"q": {"y": 2.0, "x": 1.0}}, k=10)
    assert per_query["q"]["ndcg@10"] == pytest.approx(1 / L3, abs=1e-12)
    assert per_query["q"]["mrr@10"] == 0.5
    assert trec_eval_metrics({}, {}, k=5) == ({"ndcg@5": 0.0, "mrr@5": 0.0}, {})


def _random_groups(seed: int, n_queries: int = 30, n_docs: int = 9):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_queries, n_docs, generator=gen)  # continuous: no ties
    labels = torch.randint(-1, 4, (n_queries, n_docs), generator=gen).float()  # -1: no gain on either side
    labels[:3] = 0.0  # three queries without a relevant document (skipped on both sides)
    mask = torch.rand(n_queries, n_docs, generator=gen) > 0.2
    mask[:, :2] = True
    return scores, labels, mask


@pytest.mark.parametrize("gain", ["linear", "exponential"])
@pytest.mark.parametrize("k", [3, 10])
def test_trec_eval_agrees_with_ranking_metrics_without_ties(gain: str, k: int) -> None:
    scores, labels, mask = _random_groups(seed=k)
    rm = RankingMetrics(k=k, gain=gain)  # type: ignore[arg-type]
    half = scores.shape[0] // 2  # two updates, as batches arrive
    rm.update(scores[:half], labels[:half], mask[:half], torch.arange(half))
    rm.update(scores[half:], labels[half:], mask[half:], torch.arange(half, scores.shape[0]))
    ours = {name: value.item() for name, value in rm.compute().items()}

    per_query = {}
    for q in range(scores.shape[0]):
        valid = mask[q]
        per_query[f"q{q}"] = (
            [f"d{i}" for i in range(int(valid.sum()))],
            scores[q][valid].tolist(),  # float32 values: trec_eval sees exactly kdlab's scores
            [int(v) for v in labels[q][valid].tolist()],
        )
    result = cross_check(per_query, kdlab_figures=ours, k=k, gain=gain)  # type: ignore[arg-type]
    assert result["queries_with_tied_scores"] == 0 and result["tied_query_ids"] == []
    assert result["queries_evaluated"] == scores.shape[0] - 3
    for name in (f"ndcg@{k}", f"mrr@{k}"):
        assert result[name]["trec_eval"] == pytest.approx(ours[name], abs=1e-6)
        assert result[name]["abs_diff"] <= 1e-6
    assert result["agrees"] is True
    assert "run_file" not in result  # nothing written without out_dir
    # without kdlab_figures, kdlab's per-query function supplies them: the same agreement
    assert cross_check(per_query, k=k, gain=gain)["agrees"] is True  # type: ignore[arg-type]


def test_files_round_trip_through_readers(tmp_path: Path) -> None:
    run = {"q1": {"a": 0.1, "b": 1 / 3, "c": -2.5e-300}, "q2": {"z": 7.0, "y": 7.0}}
    write_trec_run(tmp_path / "run.trec", run, tag="mine")
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert lines[:3] == ["q1 Q0 b 1 0.3333333333333333 mine", "q1 Q0 a 2 0.1 mine", "q1 Q0 c 3 -2.5e-300 mine"]
    back = read_trec_run(tmp_path / "run.trec")
    assert {q: {e.doc_id: e.score for e in entries} for q, entries in back.items()} == run  # exact floats
    assert [(e.doc_id, e.rank) for e in back["q2"]] == [("y", 1), ("z", 2)]  # tie: by doc id
    qrels = {"q1": {"a": 2, "b": 0, "c": -1}, "q2": {"z": 1}}
    write_trec_qrels(tmp_path / "qrels.trec", qrels)
    assert (tmp_path / "qrels.trec").read_text().splitlines()[0] == "q1 0 a 2"
    assert read_trec_qrels(tmp_path / "qrels.trec") == qrels

    per_query = {"q1": (["a", "b"], [0.5, 0.25], [1, 0])}
    result = cross_check(per_query, k=10, out_dir=tmp_path / "check")
    assert read_trec_run(result["run_file"])["q1"][0].doc_id == "a"
    assert read_trec_qrels(result["qrels_file"]) == {"q1": {"a": 1, "b": 0}}


def test_fractional_labels_and_bad_input_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fractional labels cannot be cross-checked by trec_eval"):
        trec_eval_metrics({"q": {"a": 0.5}}, {"q": {"a": 1.0}})
    with pytest.raises(ValueError, match="fractional labels cannot be cross-checked by trec_eval"):
        cross_check({"q": (["a", "b"], [1.0, 0.0], [1.0, 0.25])})
    with pytest.raises(ValueError, match="fractional"):
        write_trec_qrels(tmp_path / "q.trec", {"q": {"a": 1.5}})
    assert trec_eval_metrics({"q": {"a": 2.0}}, {"q": {"a": 1.0}})[1]["q"]["ndcg@10"] == 1.0  # 2.0 is an integer
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run(tmp_path / "r.trec", {"q 1": {"a": 1.0}})
    with pytest.raises(ValueError, match="not finite"):
        write_trec_run(tmp_path / "r.trec", {"q": {"a": float("nan")}})
    with pytest.raises(ValueError, match="k must be a positive integer"):
        trec_eval_metrics({}, {}, k=0)
    with pytest.raises(ValueError, match="2 doc ids, 1 scores, 2 labels"):
        cross_check({"q": (["a", "b"], [1.0], [1, 0])})
    with pytest.raises(ValueError, match="lacks"):
        cross_check({"q": (["a"], [1.0], [1])}, kdlab_figures={"ndcg@10": 1.0})
    assert not (tmp_path / "r.trec").exists()  # refused before anything was written


def test_tied_scores_are_flagged_and_explain_a_disagreement() -> None:
    # a (relevant) and b (not) tie at rank 1-2. kdlab averages: each gets gain 1/2 over ranks 1 and
    # 2 -> NDCG = (1/2)(1 + 1/log2(3)); trec_eval orders ties by doc id descending: b, a -> 1/log2(3)
    per_query = {
        "tied": (["a", "b"], [1.0, 1.0], [1, 0]),
        "clean": (["a", "b"], [2.0, 1.0], [1, 0]),
        # distinct as float64, equal once rounded to the float32 kdlab's metrics use
        "float32": (["a", "b"], [1.0, 1.0 + 1e-12], [0, 1]),
        "no_relevant": (["a", "b"], [1.0, 1.0], [0, 0]),  # not evaluated, so its tie is harmless
    }
    result = cross_check(per_query, k=10)
    assert result["queries_with_tied_scores"] == 2
    assert result["tied_query_ids"] == ["tied", "float32"]
    assert result["queries_evaluated"] == 3
    kdlab_tied = 0.5 * (1 + 1 / L3)
    trec_tied, trec_f32 = 1 / L3, 1.0  # float32 query: b is above a in float64
    assert result["ndcg@10"]["kdlab"] == pytest.approx((kdlab_tied + 1.0 + kdlab_tied) / 3, abs=1e-6)
    assert result["ndcg@10"]["trec_eval"] == pytest.approx((trec_tied + 1.0 + trec_f32) / 3, abs=1e-12)
    assert result["agrees"] is False
