"""Metrics: ranking (PNR, NDCG@k, MRR@k on torchmetrics, per query too), a trec_eval cross-check
(ir_measures), paired significance tests, and sacreBLEU as a torchmetrics ``Metric``.

Light to import: no Lightning; ir_measures, scipy and sacrebleu load only when used.
"""

from kdlab.metrics.generation import SacreBLEU
from kdlab.metrics.ranking import PNR, Gain, RankingMetrics, pair_counts, per_query_ranking_metrics
from kdlab.metrics.significance import paired_randomization_test, paired_t_test
from kdlab.metrics.trec import cross_check, trec_eval_metrics, write_trec_qrels, write_trec_run

__all__ = [
    "PNR",
    "Gain",
    "RankingMetrics",
    "SacreBLEU",
    "cross_check",
    "pair_counts",
    "paired_randomization_test",
    "paired_t_test",
    "per_query_ranking_metrics",
    "trec_eval_metrics",
    "write_trec_qrels",
    "write_trec_run",
]
