"""Never worse than the start: what a pipeline measures and falls back to when its models do not beat
the first stage.

* **Zero-shot** rows: the untouched student backbone as a bi-encoder (:func:`bi_encoder_scores`:
  mean-pooled, L2-normalised token states of the query and of each document, cosine) — what a
  sentence-embedding backbone such as all-MiniLM-L6-v2 gives with no training at all. (As a
  cross-encoder an untouched embedding model has no ranking head — a fresh head scores at random —
  so that row applies only to backbones that are cross-encoders already.)
* **Interpolation with the first stage** [reading; the standard fallback of a re-ranker, e.g.
  Pyserini's ``--alpha`` fusion]: per query, ``s_α = α · z(s_model) + (1 − α) · z(s_first)`` with
  ``z`` the query's z-score (mean 0, std 1 over its candidates; 0 where all are equal) and the
  first stage's own order breaking its ties, so ``α = 0`` *is* the first stage's ranking.
  ``α ∈ {0, 0.1, …, 1}`` is chosen by NDCG@10 on the user's validation split (ties: the smaller α,
  the start: no evidence for the model is no reason to move),
  then applied to the test split: on validation it is never below the first stage (α = 0 is a
  candidate), and the report shows what it gives on test.
* **The teacher's labels**: where the teacher does not beat the first stage on validation, the
  students learn from its interpolated scores (:func:`interpolate_labels`) instead of its raw ones.

Pure functions on scores (no model), except :func:`bi_encoder_scores`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from kdlab.data.readers import RankingGroup, with_scores

ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


def zscores(values: Sequence[float]) -> list[float]:
    """``(v − mean) / std`` over one query's candidates (population std); all zeros when constant."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [0.0] * n if std == 0.0 else [(v - mean) / std for v in values]


def first_stage_component(group: RankingGroup) -> list[float]:
    """``z(first_stage_score)`` of a group, its ties broken as the pre-ranker row breaks them
    (:func:`kdlab.evaluation.first_stage_scores`), by less than any real score gap: ranking by it is
    ranking by the first stage."""
    from kdlab.evaluation import first_stage_scores

    z = zscores([float(d.first_stage_score) for d in group.docs])  # type: ignore[arg-type]
    strict = first_stage_scores([group], "(groups)")[0]
    return [v + 1e-6 * rank / len(z) for v, rank in zip(z, strict)]


def interpolate(model_scores: Sequence[Sequence[float]], groups: Sequence[RankingGroup], alpha: float) -> list[list[float]]:
    """``α · z(model) + (1 − α) · z(first stage)`` per query (module docstring)."""
    out = []
    for scores, group in zip(model_scores, groups):
        first = first_stage_component(group)
        if alpha == 0.0:
            out.append(first)
            continue
        model = zscores([float(s) for s in scores])
        out.append([alpha * m + (1.0 - alpha) * f for m, f in zip(model, first)])
    return out


def choose_alpha(model_scores: Sequence[Sequence[float]], groups: Sequence[RankingGroup], k: int = 10,
                 gain: str = "linear") -> tuple[float, dict[float, float]]:
    """The α of :data:`ALPHAS` with the best NDCG@k on ``groups`` (validation), and every α's NDCG@k."""
    from kdlab.metrics.ranking import per_query_ranking_metrics

    labels = [[float(d.label or 0.0) for d in g.docs] for g in groups]
    by_alpha: dict[float, float] = {}
    for alpha in ALPHAS:
        per_query = per_query_ranking_metrics(list(zip(interpolate(model_scores, groups, alpha), labels)), k, gain)
        values = [m[f"ndcg@{k}"] for m in per_query if m]
        by_alpha[alpha] = sum(values) / len(values) if values else 0.0
    best = max(ALPHAS, key=lambda a: (round(by_alpha[a], 12), -a))
    return best, by_alpha


def interpolate_labels(groups: Sequence[RankingGroup], alpha: float) -> list[RankingGroup]:
    """Groups whose ``teacher_score`` is the teacher's score interpolated with the first stage."""
    scores = [[float(d.teacher_score) for d in g.docs] for g in groups]  # type: ignore[arg-type]
    mixed = interpolate(scores, groups, alpha)
    return [RankingGroup(g.query_id, g.query, tuple(with_scores(d, teacher_score=s) for d, s in zip(g.docs, row)))
            for g, row in zip(groups, mixed)]


def bi_encoder_scores(backbone: str, groups: Sequence[RankingGroup], max_length: int,
                      warmup: int = 2) -> tuple[list[list[float]], list[float], int]:
    """The untouched ``backbone`` as a bi-encoder: cosine of mean-pooled, normalised last hidden
    states (the sentence-transformers recipe of all-MiniLM-L6-v2). Returns scores per document,
    per-query latency in ms (the query and its candidates encoded, after ``warmup`` queries) and
    the parameter count."""
    import torch

    from kdlab.models.backbones import load_backbone, load_tokenizer

    model = load_backbone(backbone, task="encoder").eval()
    tok = load_tokenizer(backbone)
    scores: list[list[float]] = []
    latencies: list[float] = []

    def embed(texts: list[str]) -> Any:
        batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    with torch.no_grad():
        for index, group in enumerate(groups):
            start = time.perf_counter()
            vectors = embed([group.query, *(d.text for d in group.docs)])
            scores.append((vectors[1:] @ vectors[0]).tolist())
            if index >= warmup:
                latencies.append((time.perf_counter() - start) * 1000.0)
    return scores, latencies, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ in the pipeline
def has_first_stage(groups: Sequence[RankingGroup]) -> bool:
    return all(d.first_stage_score is not None for g in groups for d in g.docs)


def teacher_on_validation(teacher_dir: str, val_groups: Sequence[RankingGroup], max_length: int, k: int = 10,
                          gain: str = "linear", device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Does the teacher beat the first stage on validation? Its NDCG@k and the first stage's, and
    the α (:func:`choose_alpha`) its labels are interpolated with when it does not."""
    from kdlab.evaluation import score_models_per_query

    scores = score_models_per_query({"teacher": (teacher_dir, max_length)}, val_groups, device=device,
                                    dtype=dtype)["teacher"][0]
    alpha, by_alpha = choose_alpha(scores, val_groups, k, gain)
    beats = by_alpha[1.0] > by_alpha[0.0]
    # the scores are kept so the report's interpolated rows do not score the teacher on validation again
    return {"teacher_val_ndcg": by_alpha[1.0], "pre_ranker_val_ndcg": by_alpha[0.0], "teacher_beats_pre_ranker": beats,
            "label_alpha": 1.0 if beats else alpha, "val_ndcg_by_alpha": {str(a): v for a, v in by_alpha.items()},
            "queries": len(val_groups), "val_scores": scores}


def interpolated_rows(val_scores: dict[str, list[list[float]]], test_scores: dict[str, list[list[float]]],
                      val_groups: Sequence[RankingGroup], test_groups: Sequence[RankingGroup],
                      rows: Sequence[dict[str, Any]], k: int = 10, gain: str = "linear",
                      ) -> tuple[list[dict[str, Any]], dict[str, list[list[float]]], dict[str, Any]]:
    """For each model scored on both splits: α on validation, and — where α < 1 — a test row
    ``<model> ⊕ pre-ranker (α=…)`` with its scores. Returns (rows, scores, the α record)."""
    from kdlab.evaluation import _metrics_row

    by_name = {r["model"]: r for r in rows}
    labels = [[float(d.label or 0.0) for d in g.docs] for g in test_groups]
    new_rows, new_scores, record = [], {}, {}
    for name, val in val_scores.items():
        alpha, by_alpha = choose_alpha(val, val_groups, k, gain)
        record[name] = {"alpha": alpha, "val_ndcg_at_alpha": by_alpha[alpha], "val_ndcg_model": by_alpha[1.0],
                        "val_ndcg_pre_ranker": by_alpha[0.0]}
        if alpha == 1.0 or name not in test_scores:
            continue
        mixed = interpolate(test_scores[name], test_groups, alpha)
        row_name = f"{name} ⊕ pre-ranker (α={alpha:g}, chosen on validation)"
        row = _metrics_row(row_name, list(zip(mixed, labels)), k, gain)
        row.update(parameters=by_name[name].get("parameters"), ms_per_query=by_name[name].get("ms_per_query"),
                   queries=len(labels))
        new_rows.append(row)
        new_scores[row_name] = mixed
    return new_rows, new_scores, record


def zero_shot_row(backbone: str, test_groups: Sequence[RankingGroup], val_groups: Sequence[RankingGroup],
                  max_length: int, k: int = 10, gain: str = "linear") -> tuple[dict[str, Any], list[list[float]], float]:
    """The untouched student backbone as a bi-encoder (loaded once): the test split's report row and
    scores, and its NDCG@k on the validation split."""
    import statistics

    from kdlab.evaluation import _metrics_row

    groups = [*test_groups, *val_groups]
    scores, latencies, parameters = bi_encoder_scores(backbone, groups, max_length)
    labels = [[float(d.label or 0.0) for d in g.docs] for g in groups]
    test = len(test_groups)
    row = _metrics_row(f"untouched student backbone ({backbone}), zero-shot bi-encoder",
                       list(zip(scores[:test], labels[:test])), k, gain)
    test_latencies = latencies[:max(0, test - 2)]  # bi_encoder_scores skips 2 warm-up queries
    row.update(parameters=parameters, ms_per_query=statistics.median(test_latencies) if test_latencies else None,
               queries=test)
    val_ndcg = _metrics_row("val", list(zip(scores[test:], labels[test:])), k, gain)[f"ndcg@{k}"]
    return row, scores[:test], val_ndcg


def best_on_validation(record: dict[str, Any], pre_ranker: str) -> dict[str, Any] | None:
    """What to ship, chosen on validation among every candidate the fallbacks measured: the
    pre-ranker, each model alone, each model ⊕ pre-ranker at its α, the zero-shot bi-encoder.
    Ties go to the earlier (cheaper) candidate: the pre-ranker first."""
    alphas = record.get("alpha") or {}
    candidates: list[tuple[str, float]] = []
    if alphas:
        candidates.append((pre_ranker, next(iter(alphas.values()))["val_ndcg_pre_ranker"]))
    for name, chosen in alphas.items():
        candidates.append((name, chosen["val_ndcg_model"]))
        if chosen["alpha"] < 1.0:
            candidates.append((f"{name} ⊕ pre-ranker (α={chosen['alpha']:g}, chosen on validation)",
                               chosen["val_ndcg_at_alpha"]))
    if record.get("zero_shot") and record.get("zero_shot_val_ndcg") is not None:
        candidates.append((record["zero_shot"], record["zero_shot_val_ndcg"]))
    if not candidates:
        return None
    best = max(range(len(candidates)), key=lambda i: (round(candidates[i][1], 12), -i))
    return {"model": candidates[best][0], "val_ndcg": candidates[best][1],
            "candidates": {name: value for name, value in candidates}}


__all__ = ["ALPHAS", "best_on_validation", "bi_encoder_scores", "choose_alpha", "first_stage_component", "has_first_stage", "interpolate",
           "interpolate_labels", "interpolated_rows", "teacher_on_validation", "zero_shot_row", "zscores"]
