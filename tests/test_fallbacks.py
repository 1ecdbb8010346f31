"""Never worse than the start (kdlab.pipeline.fallbacks): interpolation with the first stage by hand,
α chosen on validation, α = 0 is the first stage's own ranking, interpolated labels."""

from __future__ import annotations

import math

import pytest

from kdlab.data.readers import RankingDoc, RankingGroup
from kdlab.pipeline.fallbacks import ALPHAS, choose_alpha, interpolate, interpolate_labels, zscores


def _group(first: list[float], labels: list[float], teacher: list[float] | None = None) -> RankingGroup:
    return RankingGroup("q", "query", tuple(
        RankingDoc(f"d{i}", "", f"text {i}", label=y, first_stage_score=f,
                   teacher_score=None if teacher is None else teacher[i]) for i, (f, y) in enumerate(zip(first, labels))))


def test_zscores_by_hand() -> None:
    assert zscores([1.0, 2.0, 3.0]) == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert zscores([4.0, 4.0]) == [0.0, 0.0]


def test_alpha_zero_is_the_first_stage_and_one_is_the_model() -> None:
    g = _group([2.0, 2.0, 1.0], [0, 1, 0])  # a tie in the first stage: its own order breaks it
    model = [[0.1, 0.5, 0.9]]
    first = interpolate(model, [g], 0.0)[0]
    assert sorted(range(3), key=lambda i: -first[i]) == [0, 1, 2]
    full = interpolate(model, [g], 1.0)[0]
    assert sorted(range(3), key=lambda i: -full[i]) == [2, 1, 0]
    half = interpolate(model, [g], 0.5)[0]
    z_model, z_first = zscores(model[0]), zscores([2.0, 2.0, 1.0])
    assert half == pytest.approx([0.5 * m + 0.5 * f for m, f in zip(z_model, z_first)], abs=1e-5)


def test_alpha_is_chosen_on_validation() -> None:
    """The first stage puts the relevant document 1st in query A and 3rd in query B; the model the
    other way round. α = 0 and α = 1 each get one query right: NDCG@10 = (1 + 1/log2(4)) / 2 = 0.75;
    a mix does better (here α = 0.6: A's relevant document 1st, B's 2nd: (1 + 1/log2(3)) / 2)."""
    a = _group([3.0, 2.0, 1.0], [1, 0, 0])
    b = _group([3.0, 2.0, 1.0], [0, 0, 1])
    model = [[0.0, 0.2, 0.1], [0.0, 0.1, 5.0]]  # A: relevant doc last; B: relevant doc first, by far
    alpha, by_alpha = choose_alpha(model, [a, b])
    assert set(by_alpha) == set(ALPHAS) and 0.0 < alpha < 1.0
    assert by_alpha[0.0] == pytest.approx(0.75) and by_alpha[1.0] == pytest.approx(0.75)
    assert alpha == 0.6 and by_alpha[alpha] == pytest.approx((1 + 1 / math.log2(3)) / 2, abs=1e-6)
    worse = [[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]  # the model ranks both queries backwards: α = 0 (the start)
    assert choose_alpha(worse, [_group([3.0, 2.0, 1.0], [1, 0, 0]), _group([1.0, 2.0, 3.0], [0, 0, 1])])[0] == 0.0


def test_interpolated_labels_replace_only_the_teacher_score() -> None:
    g = _group([3.0, 2.0, 1.0], [1, 0, 0], teacher=[0.0, 1.0, 2.0])
    out = interpolate_labels([g], 0.3)[0]
    assert [d.teacher_score for d in out.docs] == pytest.approx(interpolate([[0.0, 1.0, 2.0]], [g], 0.3)[0])
    assert [(d.id, d.label, d.first_stage_score) for d in out.docs] == [(d.id, d.label, d.first_stage_score) for d in g.docs]


def test_the_best_on_validation_is_chosen_among_every_fallback() -> None:
    from kdlab.pipeline.fallbacks import best_on_validation

    record = {"alpha": {"teacher": {"alpha": 1.0, "val_ndcg_at_alpha": 0.70, "val_ndcg_model": 0.70, "val_ndcg_pre_ranker": 0.65},
                        "student": {"alpha": 0.4, "val_ndcg_at_alpha": 0.72, "val_ndcg_model": 0.60, "val_ndcg_pre_ranker": 0.65}},
              "zero_shot": "zero-shot", "zero_shot_val_ndcg": 0.71}
    choice = best_on_validation(record, "BM25")
    assert choice["model"] == "student ⊕ pre-ranker (α=0.4, chosen on validation)" and choice["val_ndcg"] == 0.72
    assert list(choice["candidates"]) == ["BM25", "teacher", "student", choice["model"], "zero-shot"]
    record["zero_shot_val_ndcg"] = 0.9
    assert best_on_validation(record, "BM25")["model"] == "zero-shot"
    tied = {"alpha": {"m": {"alpha": 0.0, "val_ndcg_at_alpha": 0.65, "val_ndcg_model": 0.5, "val_ndcg_pre_ranker": 0.65}}}
    assert best_on_validation(tied, "BM25")["model"] == "BM25"  # a tie goes to the start
    assert best_on_validation({}, "BM25") is None


def test_a_teacher_that_loses_on_validation_teaches_its_interpolated_scores(tmp_path, monkeypatch) -> None:
    """The pipeline's labeling step: when the validation check says the teacher does not beat the
    first stage, the students' file holds the interpolated scores and the raw ones stay beside it;
    when it does, the raw labels are the students' file."""
    import kdlab.pipeline.run as run
    from kdlab.data.readers import read_ranking_jsonl, write_ranking_jsonl
    from kdlab.pipeline import PipelineConfig

    group = _group([3.0, 2.0, 1.0], [1, 0, 0], teacher=[0.0, 1.0, 2.0])

    def fake_label(teacher_dir, source, output, config, dtype):
        write_ranking_jsonl(output, [group])
        return output

    monkeypatch.setattr(run, "label_split", fake_label)
    lost = tmp_path / "lost" / "train.jsonl"
    run._label_with_fallback(tmp_path, "in.jsonl", lost, PipelineConfig(), "float32",
                             {"teacher_beats_pre_ranker": False, "label_alpha": 0.3})
    assert read_ranking_jsonl(lost) == interpolate_labels([group], 0.3)
    assert read_ranking_jsonl(lost.with_name("train.teacher.jsonl")) == [group]
    won = tmp_path / "won" / "train.jsonl"
    won.parent.mkdir()
    run._label_with_fallback(tmp_path, "in.jsonl", won, PipelineConfig(), "float32",
                             {"teacher_beats_pre_ranker": True, "label_alpha": 1.0})
    assert read_ranking_jsonl(won) == [group] and not won.with_name("train.teacher.jsonl").exists()
