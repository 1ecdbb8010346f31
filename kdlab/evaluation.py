"""Held-out evaluation of exported rankers, in one process, with per-query latency.

Used by the pipeline report: every model (teacher exports, student exports, and the first-stage
pre-ranker whose scores every test candidate carries as ``first_stage_score``: the run file's,
or BM25's) is scored on the same test groups, with the same metrics
(:class:`kdlab.metrics.RankingMetrics`) and the same timing rule: one forward pass
per query over all its candidates, after ``warmup`` untimed queries, on the given device and dtype
(fp32 on the CPU by default), median and mean milliseconds per query; the models take each query
in turn, so a slow spell of a shared machine cannot fall on one model's whole pass.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kdlab.data.collators import RankingCollator
from kdlab.data.readers import DataFormatError, RankingGroup, read_ranking_jsonl
from kdlab.defaults import (
    EVAL_K,
    EVAL_WARMUP_QUERIES,
    PAIR_MAX_LENGTH,
    RANDOM_ORDER_DRAWS,
)
from kdlab.metrics import RankingMetrics
from kdlab.metrics.ranking import Gain
from kdlab.models.backbones import count_parameters, load_tokenizer
from kdlab.models.served import load_rank_teacher

PRE_RANKER = "first-stage"
"""Model spec naming the first-stage pre-ranker: its scores are each document's ``first_stage_score``."""
RANDOM = "random"
"""Model spec naming random ordering: metrics averaged over ``RANDOM_ORDER_DRAWS`` seeded shuffles."""


def _metrics_row(name: str, per_query: list[tuple[list[float], list[float]]], k: int,
                 gain: Gain = "linear") -> dict[str, Any]:
    metrics = RankingMetrics(k=k, gain=gain)
    for index, (scores, labels) in enumerate(per_query):
        n = len(scores)
        metrics.update(torch.tensor([scores]), torch.tensor([labels], dtype=torch.float32),
                       torch.ones(1, n, dtype=torch.bool), torch.tensor([index]))
    return {"model": name, **{key: float(value) for key, value in metrics.compute().items()}}


def first_stage_scores(groups: Sequence[RankingGroup], source: str) -> list[list[float]]:
    """The first stage's ranking of each group as strictly decreasing scores ``n, n−1, …, 1``.

    A first stage is a ranked list: documents by ``first_stage_score`` descending, equal scores in
    the group's own order (a run's rank order, as the readers keep it; file order for JSONL). Its
    position, not the raw score, is what the pre-ranker row is scored on, so score ties (BM25
    scores rounded to 4 decimals tie often) are broken the way the first stage broke them, and a
    TREC run written from these scores gives trec_eval exactly the same ranking.
    The first document without a score is an error naming it.
    """
    out = []
    for group in groups:
        missing = next((d.id for d in group.docs if d.first_stage_score is None), None)
        if missing is not None:
            raise DataFormatError(source, None, "docs[].first_stage_score",
                                  f"query {group.query_id!r}, document {missing!r} has no first-stage score "
                                  "(needed for the pre-ranker row)")
        n = len(group.docs)
        order = sorted(range(n), key=lambda i: (-float(group.docs[i].first_stage_score), i))  # type: ignore[arg-type]
        strict = [0.0] * n
        for position, i in enumerate(order):
            strict[i] = float(n - position)
        out.append(strict)
    return out


def _groups(test: str | Sequence[RankingGroup]) -> tuple[list[RankingGroup], str]:
    if isinstance(test, str):
        return read_ranking_jsonl(test), test
    return list(test), "(test groups)"


@torch.no_grad()
def score_models_per_query(models: Mapping[str, tuple[str | Path, int]], test: str | Sequence[RankingGroup],
                           warmup: int = EVAL_WARMUP_QUERIES, device: str | torch.device = "cpu",
                           dtype: str = "float32", interleaved: bool = True,
                           ) -> dict[str, tuple[list[list[float]], list[float], int]]:
    """Each model's scores of every test document, per-query latencies (ms) and served parameter count.

    ``models`` maps a name to (exported model directory, max tokens per pair). ``interleaved`` (the
    default) loads every model first and scores query by query, each query by every model in turn
    (the order rotated per query): a slow spell of a shared machine then slows every model alike
    instead of one model's whole pass, so the speed ratios stay fair. ``interleaved=False`` scores one
    model at a time with only that model loaded (less memory: several large teachers on one device).
    The scores are the same either way. On a CUDA device the clock is read after
    ``torch.cuda.synchronize`` (kernels run asynchronously).
    """
    groups, _ = _groups(test)
    if not models:
        return {}
    if not interleaved and len(models) > 1:
        return {name: score_models_per_query({name: spec}, groups, warmup, device, dtype)[name]
                for name, spec in models.items()}
    cuda = torch.device(device).type == "cuda"
    loaded = {}
    for name, (model_dir, max_length) in models.items():
        model = load_rank_teacher(str(model_dir), device=device, dtype=dtype)
        encoder = RankingCollator(load_tokenizer(str(model_dir)), text_format=model.text_format, max_length=max_length)
        loaded[name] = (model, encoder)
    out: dict[str, tuple[list[list[float]], list[float], int]] = {
        name: ([], [], count_parameters(model)) for name, (model, _) in loaded.items()}
    names = list(loaded)
    label = Path(str(next(iter(models.values()))[0])).parent.name if len(names) == 1 else f"{len(names)} models"
    for index, group in enumerate(tqdm(groups, desc=f"evaluating {label}", unit="query")):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            model, encoder = loaded[name]
            scores, latencies, _ = out[name]
            start = time.perf_counter()
            batch = encoder.pad([encoder.encode(group.query, doc.text) for doc in group.docs])
            inputs = {key: value.to(device) for key, value in batch.items()}
            scores.append(model(**inputs).float().cpu().tolist())  # .cpu() waits for the device
            if cuda:
                torch.cuda.synchronize()
            if index >= warmup:
                latencies.append((time.perf_counter() - start) * 1000.0)
    return out


def score_per_query(model_dir: str | Path, test: str | Sequence[RankingGroup], max_length: int = PAIR_MAX_LENGTH,
                    warmup: int = EVAL_WARMUP_QUERIES, device: str | torch.device = "cpu",
                    dtype: str = "float32") -> tuple[list[list[float]], list[float], int]:
    """One model's scores of every test document, per-query latencies (ms) and served parameter count."""
    return score_models_per_query({"model": (model_dir, max_length)}, test, warmup, device, dtype)["model"]


def evaluate_models(models: Mapping[str, str | Path], test: str | Sequence[RankingGroup],
                    max_length: int = PAIR_MAX_LENGTH, k: int = EVAL_K, gain: Gain = "linear",
                    scores_out: dict[str, list[list[float]]] | None = None, device: str | torch.device = "cpu",
                    dtype: str = "float32", max_lengths: Mapping[str, int] | None = None,
                    interleaved: bool = True) -> list[dict[str, Any]]:
    """One row per model: ``ndcg@k``, ``mrr@k``, ``pnr``, ``parameters``, ``ms_per_query`` (median).

    Every model reads at most ``max_length`` tokens per pair, except those named in ``max_lengths``.
    The scored models are timed query by query in turn (:func:`score_models_per_query`).

    ``test`` is a kdlab JSONL path or the groups themselves. ``scores_out``, when given, receives
    each scored model's per-document scores (not the random ordering's), e.g. for a TREC run file.
    """
    groups, source = _groups(test)
    labels = [[float(doc.label or 0.0) for doc in group.docs] for group in groups]
    scored = score_models_per_query(
        {name: (spec, (max_lengths or {}).get(name, max_length)) for name, spec in models.items()
         if str(spec) not in (RANDOM, PRE_RANKER)}, groups, device=device, dtype=dtype, interleaved=interleaved)
    rows = []
    for name, spec in models.items():
        scores: list[list[float]] | None = None
        if str(spec) == RANDOM:
            generator = torch.Generator().manual_seed(0)
            draws = [_metrics_row(name, [(torch.rand(len(y), generator=generator).tolist(), y) for y in labels], k, gain)
                     for _ in range(RANDOM_ORDER_DRAWS)]
            row = {"model": name, **{key: sum(d[key] for d in draws) / RANDOM_ORDER_DRAWS
                                     for key in draws[0] if key != "model"}}
            row.update(parameters=None, ms_per_query=None)
        elif str(spec) == PRE_RANKER:
            scores = first_stage_scores(groups, source)
            row = _metrics_row(name, list(zip(scores, labels)), k, gain)
            row.update(parameters=None, ms_per_query=None)
        else:
            scores, latencies, parameters = scored[name]
            row = _metrics_row(name, list(zip(scores, labels)), k, gain)
            row.update(parameters=parameters, ms_per_query=statistics.median(latencies) if latencies else None,
                       ms_per_query_mean=statistics.fmean(latencies) if latencies else None)
        row["queries"] = len(labels)
        rows.append(row)
        if scores is not None and scores_out is not None:
            scores_out[name] = scores
    return rows
