"""Held-out evaluation of rankers (kdlab.evaluation): hand-computed metrics for the pre-ranker row,
the random row's averaging, file errors, and an exported ranker's scores and latencies."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from kdlab import evaluation
from kdlab.data import sample_path
from kdlab.data.collators import RankingCollator
from kdlab.data.readers import DataFormatError, read_ranking_jsonl
from kdlab.defaults import PAIR_MAX_LENGTH, RANDOM_ORDER_DRAWS
from kdlab.evaluation import (
    PRE_RANKER,
    RANDOM,
    evaluate_models,
    score_models_per_query,
    score_per_query,
)
from kdlab.models.backbones import count_parameters, load_tokenizer
from kdlab.models.served import load_rank_teacher
from kdlab.stages.teacher_rank_sft import TeacherRankSFT


def _write(path: Path, groups: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(g) + "\n" for g in groups))
    return path


def _doc(doc_id: str, label: float, first_stage: float | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": doc_id, "title": f"title {doc_id}", "summary": f"summary {doc_id}", "label": label}
    if first_stage is not None:
        doc["first_stage_score"] = first_stage
    return doc


def _ndcg(scores: list[float], labels: list[float], k: int = 10) -> float:
    """NDCG@k with linear gain, written independently of the library (no ties in these tests)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    dcg = sum(labels[i] / math.log2(rank + 2) for rank, i in enumerate(order))
    ideal = sum(y / math.log2(rank + 2) for rank, y in enumerate(sorted(labels, reverse=True)[:k]))
    return dcg / ideal


# ------------------------------------------------------------------------------------- lexical row
def test_pre_ranker_row_equals_hand_computed_metrics(tmp_path: Path) -> None:
    path = _write(tmp_path / "test.jsonl", [
        {"query_id": "q1", "query": "first", "docs": [_doc("a", 2, 1.0), _doc("b", 0, 3.0), _doc("c", 1, 2.0)]},
        {"query_id": "q2", "query": "second", "docs": [_doc("x", 1, 5.0), _doc("y", 0, 1.0)]},
    ])
    # q1: BM25 order b (0), c (1), a (2): DCG = 0/log2 2 + 1/log2 3 + 2/log2 4 = 1.6309298
    #     ideal a, c, b: IDCG = 2/log2 2 + 1/log2 3 = 2.6309298 → NDCG 0.6199062
    #     first relevant document (label > 0) at rank 2 → RR 1/2
    #     pairs with y_i > y_j: (a,b) 1<3, (a,c) 1<2, (c,b) 2<3: all three discordant
    # q2: x (1) before y (0): NDCG 1, RR 1, one concordant pair
    # mean NDCG = (0.6199062 + 1) / 2 = 0.8099531; MRR = 0.75; PNR = 1 concordant / 3 discordant
    (row,) = evaluate_models({"bm25": PRE_RANKER}, str(path))
    assert row["model"] == "bm25" and row["queries"] == 2
    assert row["ndcg@10"] == pytest.approx(0.8099531, abs=1e-6)
    assert row["mrr@10"] == pytest.approx(0.75, abs=1e-6)
    assert row["pnr"] == pytest.approx(1 / 3, abs=1e-6)
    assert row["parameters"] is None and row["ms_per_query"] is None


def test_pre_ranker_row_of_a_perfect_ordering_is_one(tmp_path: Path) -> None:
    path = _write(tmp_path / "test.jsonl", [
        {"query": "q", "docs": [_doc("a", 0, 0.1), _doc("b", 3, 9.0), _doc("c", 1, 2.0), _doc("d", 2, 4.5)]},
        {"query": "r", "docs": [_doc("a", 1, 1.0), _doc("b", 0, -1.0)]},
    ])
    (row,) = evaluate_models({"bm25": PRE_RANKER}, str(path))
    assert row["ndcg@10"] == pytest.approx(1.0) and row["mrr@10"] == pytest.approx(1.0)
    # every one of the 6 + 1 preference pairs is concordant, none discordant: PNR = 7 / max(0, 1)
    assert row["pnr"] == pytest.approx(7.0)


def test_pre_ranker_row_needs_first_stage_scores_and_names_the_document(tmp_path: Path) -> None:
    path = _write(tmp_path / "no_scores.jsonl", [
        {"query_id": "q", "query": "q", "docs": [_doc("a", 1, 1.0), _doc("b", 0, 0.5)]},
        {"query_id": "r", "query": "r", "docs": [_doc("a", 1, 1.0), _doc("b", 0)]},
    ])
    with pytest.raises(DataFormatError) as info:
        evaluate_models({"bm25": PRE_RANKER}, str(path))
    assert str(info.value) == (f"{path}: field 'docs[].first_stage_score': query 'r', document 'b' has no "
                               "first-stage score (needed for the pre-ranker row)")


def test_pre_ranker_ties_are_broken_by_the_first_stages_own_order(tmp_path: Path) -> None:
    # Equal scores: the first stage ranked a before b (their order in the group), so the relevant b
    # is second: NDCG = 1/log2 3 = 0.6309298, RR 1/2, and the pair (b, a) is discordant (PNR 0).
    path = _write(tmp_path / "tied.jsonl", [{"query": "q", "docs": [_doc("a", 0, 2.0), _doc("b", 1, 2.0)]}])
    (row,) = evaluate_models({"bm25": PRE_RANKER}, str(path))
    assert row["ndcg@10"] == pytest.approx(0.6309298, abs=1e-6) and row["mrr@10"] == pytest.approx(0.5)
    assert row["pnr"] == 0.0


# -------------------------------------------------------------------------------------- random row
def test_random_row_averages_seeded_draws_and_is_reproducible(tmp_path: Path) -> None:
    # One query, one relevant of two documents. A single random draw puts the relevant one first
    # (NDCG 1, RR 1, PNR 1/1) or second (NDCG 1/log2 3, RR 1/2, PNR 0/1); averaged over N draws of
    # which m put it first: PNR = m/N, NDCG = c + (1 − c)·m/N, MRR = 1/2 + m/(2N).
    path = _write(tmp_path / "test.jsonl", [{"query": "q", "docs": [_doc("a", 1, 1.0), _doc("b", 0, 0.0)]}])
    (row,) = evaluate_models({"chance": RANDOM}, str(path))
    n = RANDOM_ORDER_DRAWS
    m = row["pnr"] * n
    assert m == pytest.approx(round(m), abs=1e-6)
    m = round(m)
    assert 0 < m < n, "an average of several draws, not one draw"
    c = 1 / math.log2(3)
    assert row["ndcg@10"] == pytest.approx(c + (1 - c) * m / n, abs=1e-6)
    assert row["mrr@10"] == pytest.approx(0.5 + m / (2 * n), abs=1e-6)
    assert row["parameters"] is None and row["ms_per_query"] is None
    # the same numbers on every call, whatever else is evaluated beside it
    again = evaluate_models({"bm25": PRE_RANKER, "chance": RANDOM}, str(path))
    assert again[1] == row and again[0]["model"] == "bm25"


# ----------------------------------------------------------------------------- an exported ranker
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny TeacherRankSFT export and a 4-query test file (5 candidates each)."""
    base = tmp_path_factory.mktemp("evaluation")
    L.seed_everything(0)
    model_dir = base / "teacher"
    TeacherRankSFT(backbone="tiny-llama-h32").export_pretrained(str(model_dir))
    rows = [json.loads(line) for line in Path(sample_path("ranking_test.jsonl")).read_text().splitlines()[:4]]
    for row in rows:
        row["docs"] = sorted(row["docs"], key=lambda d: -d["label"])[:5]
    return model_dir, _write(base / "test.jsonl", rows)


def _direct_scores(model_dir: Path, test_path: Path) -> list[list[float]]:
    """Each (query, document) scored alone, unpadded, by the reloaded ranker."""
    teacher = load_rank_teacher(str(model_dir))
    encoder = RankingCollator(load_tokenizer(str(model_dir)), "decoder", max_length=PAIR_MAX_LENGTH)
    out = []
    with torch.no_grad():
        for group in read_ranking_jsonl(str(test_path)):
            scores = []
            for doc in group.docs:
                ids = torch.tensor([encoder.encode(group.query, doc.text)["input_ids"]])
                scores.append(teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).item())
            out.append(scores)
    return out


def test_score_per_query_matches_the_reloaded_ranker(exported: tuple[Path, Path]) -> None:
    model_dir, test_path = exported
    scores, latencies, parameters = score_per_query(model_dir, str(test_path), warmup=1)
    direct = _direct_scores(model_dir, test_path)
    assert [len(s) for s in scores] == [len(s) for s in direct] == [5, 5, 5, 5]
    for got, want in zip(scores, direct):
        assert got == pytest.approx(want, abs=1e-5)
    assert len(latencies) == 3 and all(ms > 0 for ms in latencies)  # the first query is not timed
    assert parameters == count_parameters(load_rank_teacher(str(model_dir)))
    assert len(score_per_query(model_dir, str(test_path), warmup=0)[1]) == 4
    assert score_per_query(model_dir, str(test_path), warmup=10)[1] == []


def test_model_row_metrics_come_from_the_model_scores(exported: tuple[Path, Path]) -> None:
    model_dir, test_path = exported
    (row,) = evaluate_models({"teacher": model_dir}, str(test_path))
    direct = _direct_scores(model_dir, test_path)
    labels = [[d.label for d in g.docs] for g in read_ranking_jsonl(str(test_path))]
    expected = sum(_ndcg(s, y) for s, y in zip(direct, labels)) / len(labels)
    assert row["ndcg@10"] == pytest.approx(expected, abs=1e-5)
    assert row["queries"] == 4 and row["parameters"] == count_parameters(load_rank_teacher(str(model_dir)))
    assert row["ms_per_query"] > 0 and row["ms_per_query_mean"] > 0


def test_a_model_named_in_max_lengths_reads_its_own_length(exported: tuple[Path, Path]) -> None:
    """``max_lengths`` cuts one model's pairs to its own length (a teacher trained on other lengths
    than its students) and leaves the rest at ``max_length``."""
    model_dir, test_path = exported
    full, cut = evaluate_models({"full": model_dir, "cut": model_dir}, str(test_path), max_length=PAIR_MAX_LENGTH,
                                max_lengths={"cut": 8}, scores_out=(scores := {}))
    for got, want in zip(scores["full"], _direct_scores(model_dir, test_path)):
        assert got == pytest.approx(want, abs=1e-5)
    assert scores["full"] != scores["cut"]
    only_cut = evaluate_models({"cut": model_dir}, str(test_path), max_length=8, scores_out=(again := {}))
    assert again["cut"] == scores["cut"] and only_cut[0]["ndcg@10"] == cut["ndcg@10"]


def test_models_take_each_query_in_turn_and_score_as_if_alone(exported: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed query by query, each query by every model in turn (order rotated), so a slow spell of
    the machine cannot fall on one model's whole pass; the scores equal one-model-at-a-time scoring."""
    model_dir, test_path = exported
    other = tmp_path / "other" / "model"
    shutil.copytree(model_dir, other)
    calls: list[str] = []
    real_load = evaluation.load_rank_teacher

    def recording_load(path: str, **kwargs: Any) -> torch.nn.Module:
        model = real_load(path, **kwargs)
        forward = model.forward
        model.forward = lambda *a, **k: (calls.append(path), forward(*a, **k))[1]  # type: ignore[method-assign]
        return model

    monkeypatch.setattr(evaluation, "load_rank_teacher", recording_load)
    specs = {"a": (model_dir, PAIR_MAX_LENGTH), "b": (other, 8)}
    together = score_models_per_query(specs, str(test_path), warmup=1)
    a, b = str(model_dir), str(other)
    assert calls == [a, b, b, a, a, b, b, a]
    calls.clear()
    apart = score_models_per_query(specs, str(test_path), warmup=1, interleaved=False)
    assert calls == [a] * 4 + [b] * 4
    for name in specs:
        assert together[name][0] == apart[name][0]
        assert len(together[name][1]) == 3 and together[name][2] == apart[name][2]
    assert together["a"][0] != together["b"][0]  # each model read its own length
    assert score_models_per_query({}, str(test_path)) == {}
