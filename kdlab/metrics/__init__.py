"""Metrics: ranking (PNR, NDCG@k, MRR@k on torchmetrics, per query too), a trec_eval cross-check
(ir_measures), paired significance tests; for generation, sacreBLEU and GSM8K answer accuracy as
torchmetrics ``Metric``s, the KETCHUP paper's tasks (:data:`TASKS`) and :class:`TaskMetrics`.

Light to import: no Lightning; ir_measures, scipy and sacrebleu load only when used.
"""

from kdlab.metrics.answers import AnswerAccuracy, extract_final_number, normalize_number
from kdlab.metrics.generation import (
    GENERATION_METRIC_KEYS,
    TASKS,
    SacreBLEU,
    TaskMetrics,
    main_generation_metric,
    resolve_val_metric,
)
from kdlab.metrics.ranking import PNR, Gain, RankingMetrics, pair_counts, per_query_ranking_metrics
from kdlab.metrics.significance import paired_randomization_test, paired_t_test
from kdlab.metrics.trec import cross_check, trec_eval_metrics, write_trec_qrels, write_trec_run

__all__ = [
    "GENERATION_METRIC_KEYS",
    "PNR",
    "TASKS",
    "AnswerAccuracy",
    "Gain",
    "RankingMetrics",
    "SacreBLEU",
    "TaskMetrics",
    "cross_check",
    "extract_final_number",
    "main_generation_metric",
    "normalize_number",
    "pair_counts",
    "paired_randomization_test",
    "paired_t_test",
    "per_query_ranking_metrics",
    "resolve_val_metric",
    "trec_eval_metrics",
    "write_trec_qrels",
    "write_trec_run",
]
