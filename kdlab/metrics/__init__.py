"""Ranking metrics (PNR, NDCG@k, MRR@k) built on torchmetrics."""

from kdlab.metrics.ranking import PNR, RankingMetrics, pair_counts

__all__ = ["PNR", "RankingMetrics", "pair_counts"]
