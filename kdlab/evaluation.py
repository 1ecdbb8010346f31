"""Held-out evaluation of exported rankers, in one process, with per-query latency.

Used by the pipeline report: every model (teacher exports, student exports, and the lexical
pre-ranker whose BM25 scores ship in the data) is scored on the same test groups, with the
same metrics (:class:`kdlab.metrics.RankingMetrics`) and the same timing rule: one forward pass
per query over all its candidates, after ``warmup`` untimed queries, fp32 on this machine's CPU
(or the given device), median and mean milliseconds per query.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kdlab.data.collators import RankingCollator
from kdlab.data.readers import DataFormatError, iter_jsonl, read_ranking_jsonl
from kdlab.defaults import EVAL_K, EVAL_WARMUP_QUERIES, PAIR_MAX_LENGTH, RANDOM_ORDER_DRAWS
from kdlab.metrics import RankingMetrics
from kdlab.models.backbones import count_parameters, load_tokenizer
from kdlab.models.export import load_rank_teacher

LEXICAL = "bm25"
"""Model spec naming the lexical pre-ranker: its scores are the ``bm25`` field of each document."""
RANDOM = "random"
"""Model spec naming random ordering: metrics averaged over ``RANDOM_ORDER_DRAWS`` seeded shuffles."""


def _metrics_row(name: str, per_query: list[tuple[list[float], list[float]]], k: int) -> dict[str, Any]:
    metrics = RankingMetrics(k=k)
    for index, (scores, labels) in enumerate(per_query):
        n = len(scores)
        metrics.update(torch.tensor([scores]), torch.tensor([labels], dtype=torch.float32),
                       torch.ones(1, n, dtype=torch.bool), torch.tensor([index]))
    return {"model": name, **{key: float(value) for key, value in metrics.compute().items()}}


def lexical_scores(test_path: str) -> list[list[float]]:
    """The pre-ranker's per-document ``bm25`` scores, as stored by the sample builder."""
    out = []
    for line_no, row in iter_jsonl(test_path):
        try:
            out.append([float(doc["bm25"]) for doc in row["docs"]])
        except (KeyError, TypeError, ValueError):
            raise DataFormatError(test_path, line_no, "docs[].bm25", "every document needs a numeric "
                                  "bm25 score to evaluate the lexical pre-ranker") from None
    return out


@torch.no_grad()
def score_per_query(model_dir: str | Path, test_path: str, max_length: int = PAIR_MAX_LENGTH,
                    warmup: int = EVAL_WARMUP_QUERIES,
                    device: str | torch.device = "cpu") -> tuple[list[list[float]], list[float], int]:
    """Scores of every test document, per-query latencies (ms) and the served parameter count."""
    model = load_rank_teacher(str(model_dir), device=device)
    encoder = RankingCollator(load_tokenizer(str(model_dir)), text_format=model.text_format, max_length=max_length)
    groups = read_ranking_jsonl(test_path)
    scores: list[list[float]] = []
    latencies: list[float] = []
    for index, group in enumerate(tqdm(groups, desc=f"evaluating {Path(model_dir).parent.name}", unit="query")):
        start = time.perf_counter()
        batch = encoder.pad([encoder.encode(group.query, doc.text) for doc in group.docs])
        inputs = {key: value.to(device) for key, value in batch.items()}
        scores.append(model(**inputs).float().cpu().tolist())
        if index >= warmup:
            latencies.append((time.perf_counter() - start) * 1000.0)
    return scores, latencies, count_parameters(model)


def evaluate_models(models: Mapping[str, str | Path], test_path: str, max_length: int = PAIR_MAX_LENGTH,
                    k: int = EVAL_K) -> list[dict[str, Any]]:
    """One row per model: ``ndcg@k``, ``mrr@k``, ``pnr``, ``parameters``, ``ms_per_query`` (median)."""
    labels = [[float(doc.label or 0.0) for doc in group.docs] for group in read_ranking_jsonl(test_path)]
    rows = []
    for name, spec in models.items():
        if str(spec) == RANDOM:
            generator = torch.Generator().manual_seed(0)
            draws = [_metrics_row(name, [(torch.rand(len(y), generator=generator).tolist(), y) for y in labels], k)
                     for _ in range(RANDOM_ORDER_DRAWS)]
            row = {"model": name, **{key: sum(d[key] for d in draws) / RANDOM_ORDER_DRAWS
                                     for key in draws[0] if key != "model"}}
            row.update(parameters=None, ms_per_query=None)
        elif str(spec) == LEXICAL:
            row = _metrics_row(name, list(zip(lexical_scores(test_path), labels)), k)
            row.update(parameters=None, ms_per_query=None)
        else:
            scores, latencies, parameters = score_per_query(spec, test_path, max_length=max_length)
            row = _metrics_row(name, list(zip(scores, labels)), k)
            row.update(parameters=parameters, ms_per_query=statistics.median(latencies) if latencies else None,
                       ms_per_query_mean=statistics.fmean(latencies) if latencies else None)
        row["queries"] = len(labels)
        rows.append(row)
    return rows
