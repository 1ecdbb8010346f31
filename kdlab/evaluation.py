"""Held-out evaluation of exported rankers, in one process, with per-query latency.

Used by the pipeline report: every model (teacher exports, student exports, and the first-stage
pre-ranker whose scores every test candidate carries as ``first_stage_score``: the run file's,
or BM25's) is scored on the same test groups, with the same metrics
(:class:`kdlab.metrics.RankingMetrics`) and the same timing rule: one forward pass
per query over all its candidates, after ``warmup`` untimed queries, on the given device and dtype
(fp32 on the CPU by default), median and mean milliseconds per query.
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
from kdlab.defaults import EVAL_K, EVAL_WARMUP_QUERIES, PAIR_MAX_LENGTH, RANDOM_ORDER_DRAWS
from kdlab.metrics import RankingMetrics
from kdlab.metrics.ranking import Gain
from kdlab.models.backbones import count_parameters, load_tokenizer
from kdlab.models.export import load_rank_teacher

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
def score_per_query(model_dir: str | Path, test: str | Sequence[RankingGroup], max_length: int = PAIR_MAX_LENGTH,
                    warmup: int = EVAL_WARMUP_QUERIES, device: str | torch.device = "cpu",
                    dtype: str = "float32") -> tuple[list[list[float]], list[float], int]:
    """Scores of every test document, per-query latencies (ms) and the served parameter count.

    On a CUDA device the clock is read after ``torch.cuda.synchronize`` (kernels run asynchronously)."""
    model = load_rank_teacher(str(model_dir), device=device, dtype=dtype)
    cuda = torch.device(device).type == "cuda"
    encoder = RankingCollator(load_tokenizer(str(model_dir)), text_format=model.text_format, max_length=max_length)
    groups, _ = _groups(test)
    scores: list[list[float]] = []
    latencies: list[float] = []
    for index, group in enumerate(tqdm(groups, desc=f"evaluating {Path(model_dir).parent.name}", unit="query")):
        start = time.perf_counter()
        batch = encoder.pad([encoder.encode(group.query, doc.text) for doc in group.docs])
        inputs = {key: value.to(device) for key, value in batch.items()}
        scores.append(model(**inputs).float().cpu().tolist())  # .cpu() waits for the device
        if cuda:
            torch.cuda.synchronize()
        if index >= warmup:
            latencies.append((time.perf_counter() - start) * 1000.0)
    return scores, latencies, count_parameters(model)


def evaluate_models(models: Mapping[str, str | Path], test: str | Sequence[RankingGroup],
                    max_length: int = PAIR_MAX_LENGTH, k: int = EVAL_K, gain: Gain = "linear",
                    scores_out: dict[str, list[list[float]]] | None = None, device: str | torch.device = "cpu",
                    dtype: str = "float32", max_lengths: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per model: ``ndcg@k``, ``mrr@k``, ``pnr``, ``parameters``, ``ms_per_query`` (median).

    Every model reads at most ``max_length`` tokens per pair, except those named in ``max_lengths``.

    ``test`` is a kdlab JSONL path or the groups themselves. ``scores_out``, when given, receives
    each scored model's per-document scores (not the random ordering's), e.g. for a TREC run file.
    """
    groups, source = _groups(test)
    labels = [[float(doc.label or 0.0) for doc in group.docs] for group in groups]
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
            length = (max_lengths or {}).get(name, max_length)
            scores, latencies, parameters = score_per_query(spec, groups, max_length=length, device=device,
                                                            dtype=dtype)
            row = _metrics_row(name, list(zip(scores, labels)), k, gain)
            row.update(parameters=parameters, ms_per_query=statistics.median(latencies) if latencies else None,
                       ms_per_query_mean=statistics.fmean(latencies) if latencies else None)
        row["queries"] = len(labels)
        rows.append(row)
        if scores is not None and scores_out is not None:
            scores_out[name] = scores
    return rows
