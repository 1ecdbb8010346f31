"""A trec_eval-grade cross-check of kdlab's NDCG@k / MRR@k through ``ir_measures``.

``ir_measures`` computes nDCG@k with trec_eval itself (``pytrec_eval``, ``ndcg_cut``) and RR@k with
its MS MARCO evaluator, so agreement with :class:`kdlab.metrics.RankingMetrics` is a check against
the reference implementations of the field. Both sides use the same definitions:

* ``nDCG@k = DCG@k / IDCG@k``, ``DCG@k = Σ_{r ≤ k} g(rel_r) / log2(r + 1)``, IDCG over the judged
  documents sorted by relevance; ``g(rel) = max(rel, 0)`` (``linear``, trec_eval's own) or
  ``2^max(rel, 0) − 1`` (``exponential``, given to trec_eval as a ``gains=`` mapping).
* ``RR@k = 1 / rank of the first document with rel ≥ 1`` (0 when none is in the top k).

One known difference: with tied scores, torchmetrics (kdlab) averages the gain over the tie group,
whereas trec_eval breaks ties by document id (descending; the MS MARCO RR evaluator: ascending).
Figures are expected to agree only when no evaluated query has tied scores; :func:`cross_check`
counts those queries so that a disagreement can be explained.

``ir_measures`` is imported only when a figure is computed (importing this module stays cheap).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdlab.metrics.ranking import Gain, _check_gain, per_query_ranking_metrics
from kdlab.runs import write_text_atomic

__all__ = ["cross_check", "trec_eval_metrics", "write_trec_qrels", "write_trec_run"]

RUN_FILE = "run.trec"
QRELS_FILE = "qrels.trec"


def _check_token(kind: str, value: str) -> str:
    # TREC files are whitespace-separated: an id with a blank would silently shift the columns
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"{kind} must be a non-empty string without whitespace, got {value!r}")
    return value


def _check_k(k: int) -> None:
    if not (isinstance(k, int) and k > 0):
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _integer_relevance(qid: str, doc_id: str, rel: object) -> int:
    """trec_eval's rule: relevance is an integer. ``2.0`` is accepted as ``2``; ``0.5`` is refused."""
    try:
        value = float(rel)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"query {qid!r}, document {doc_id!r}: relevance {rel!r} is not a number") from None
    if not value.is_integer():
        raise ValueError(
            f"query {qid!r}, document {doc_id!r}: relevance {rel!r} is not an integer; fractional "
            "labels cannot be cross-checked by trec_eval (it reads integer qrels)"
        )
    return int(value)


def _integer_qrels(qrels: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    return {
        _check_token("query id", qid): {
            _check_token("document id", did): _integer_relevance(qid, did, rel) for did, rel in judged.items()
        }
        for qid, judged in qrels.items()
    }


def _float_run(run: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for qid, scored in run.items():
        _check_token("query id", qid)
        docs: dict[str, float] = {}
        for did, score in scored.items():
            _check_token("document id", did)
            value = float(score)
            if not math.isfinite(value):
                raise ValueError(f"query {qid!r}, document {did!r}: score {score!r} is not finite")
            docs[did] = value
        out[qid] = docs
    return out


def write_trec_run(path: str | os.PathLike[str], run: Mapping[str, Mapping[str, float]], tag: str = "kdlab") -> None:
    """Write a TREC run ``qid Q0 docid rank score tag``, atomically.

    ``run[qid][docid] = score``. Within a query, ``rank`` is 1-based by score descending (ties by
    document id, so the file is deterministic; trec_eval ignores the column and re-sorts by score).
    Scores are written with ``repr``, the shortest text that reads back to the same float, so no
    precision is lost.
    """
    _check_token("tag", tag)
    lines = []
    for qid, scored in _float_run(run).items():
        ordered = sorted(scored.items(), key=lambda item: (-item[1], item[0]))
        lines.extend(f"{qid} Q0 {did} {rank} {score!r} {tag}" for rank, (did, score) in enumerate(ordered, start=1))
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def write_trec_qrels(path: str | os.PathLike[str], qrels: Mapping[str, Mapping[str, int]]) -> None:
    """Write TREC qrels ``qid 0 docid rel``, atomically (relevance must be integer, see
    :func:`trec_eval_metrics`)."""
    lines = [f"{qid} 0 {did} {rel}" for qid, judged in _integer_qrels(qrels).items() for did, rel in judged.items()]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def trec_eval_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    k: int = 10,
    gain: Gain = "linear",
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``nDCG@k`` and ``RR@k`` by ir_measures (trec_eval / MS MARCO evaluator).

    Returns ``(aggregate, per_query)``: ``aggregate = {"ndcg@k": mean, "mrr@k": mean}`` over the
    evaluated queries (0.0 for both when there is none) and ``per_query[qid] = {"ndcg@k", "mrr@k"}``.

    Only queries with at least one relevant document (``rel > 0``) that also appear in the run are
    evaluated: kdlab's :class:`~kdlab.metrics.RankingMetrics` skips queries without a relevant
    document (trec_eval would count them as 0), and a query missing from the run is left out as
    trec_eval does without ``-c``. ``gain="linear"``: trec_eval's ``ndcg_cut`` gain ``max(rel, 0)``;
    ``"exponential"``: ``nDCG(gains={rel: 2^max(rel, 0) − 1})``. RR is ``RR(rel=1)@k``.
    Relevance must be an integer (trec_eval's rule): a fractional label raises ``ValueError``.
    """
    _check_k(k)
    _check_gain(gain)
    int_qrels = _integer_qrels(qrels)
    float_run = _float_run(run)
    evaluated = [
        qid for qid, judged in int_qrels.items()
        if any(rel > 0 for rel in judged.values()) and float_run.get(qid)
    ]
    if not evaluated:
        return {f"ndcg@{k}": 0.0, f"mrr@{k}": 0.0}, {}

    import ir_measures  # lazy: keeps `import kdlab.metrics` light

    sub_qrels = {qid: int_qrels[qid] for qid in evaluated}
    sub_run = {qid: float_run[qid] for qid in evaluated}
    if gain == "linear":
        ndcg_measure = ir_measures.nDCG @ k
    else:
        levels = {rel for judged in sub_qrels.values() for rel in judged.values()}
        ndcg_measure = ir_measures.nDCG(gains={rel: 2 ** max(rel, 0) - 1 for rel in levels}) @ k
    rr_measure = ir_measures.RR(rel=1) @ k
    names = {ndcg_measure: f"ndcg@{k}", rr_measure: f"mrr@{k}"}

    per_query: dict[str, dict[str, float]] = {qid: {} for qid in evaluated}
    for metric in ir_measures.iter_calc(list(names), sub_qrels, sub_run):
        per_query[metric.query_id][names[metric.measure]] = float(metric.value)
    for qid, values in per_query.items():
        if len(values) != 2:  # would mean ir_measures dropped a query we gave it
            raise RuntimeError(f"ir_measures returned {sorted(values)} for query {qid!r}, expected both measures")
    aggregate = {name: math.fsum(v[name] for v in per_query.values()) / len(per_query) for name in names.values()}
    return aggregate, per_query


def _has_float32_tie(scores: Sequence[float]) -> bool:
    # kdlab's metrics see float32 scores: two float64 scores that round to the same float32 are a
    # tie there (averaged) but not for trec_eval, so ties are looked for after the same rounding
    s = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    return bool(torch.unique(s).numel() < s.numel())


def cross_check(
    per_query: Mapping[str, tuple[Sequence[str], Sequence[float], Sequence[float]]],
    *,
    kdlab_figures: Mapping[str, float] | None = None,
    k: int = 10,
    gain: Gain = "linear",
    tolerance: float = 1e-6,
    out_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Compare kdlab's NDCG@k / MRR@k with trec_eval's on the same candidates.

    ``per_query[qid] = (doc_ids, scores, labels)``: every candidate of the query (the evaluation
    group), labels integer. ``kdlab_figures`` holds ``"ndcg@k"`` and ``"mrr@k"`` as kdlab computed
    them (e.g. a run's test metrics from :class:`~kdlab.metrics.RankingMetrics`); when ``None`` they
    are computed here with :func:`~kdlab.metrics.per_query_ranking_metrics` (the same semantics).

    Returns ``{"ndcg@k": {"kdlab", "trec_eval", "abs_diff"}, "mrr@k": {...}, "agrees": bool,
    "queries_evaluated": n, "queries_with_tied_scores": n_tied, "tied_query_ids": [...]}`` and,
    when ``out_dir`` is given, ``"run_file"`` / ``"qrels_file"`` (``run.trec``, ``qrels.trec``
    written there, for running trec_eval by hand). ``agrees``: every ``abs_diff ≤ tolerance``.
    Agreement is expected only when ``queries_with_tied_scores == 0`` (see the module docstring);
    ties are counted among the evaluated queries (those with a relevant document).
    """
    _check_k(k)
    _check_gain(gain)
    if not (tolerance >= 0):
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    names = (f"ndcg@{k}", f"mrr@{k}")
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    tied: list[str] = []
    for qid, (doc_ids, scores, labels) in per_query.items():
        doc_ids, scores, labels = list(doc_ids), [float(s) for s in scores], list(labels)
        if not len(doc_ids) == len(scores) == len(labels):
            raise ValueError(f"query {qid!r}: {len(doc_ids)} doc ids, {len(scores)} scores, {len(labels)} labels")
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError(f"query {qid!r}: duplicate document ids")
        qrels[qid] = {did: _integer_relevance(qid, did, rel) for did, rel in zip(doc_ids, labels)}
        run[qid] = dict(zip(doc_ids, scores))
        if any(rel > 0 for rel in qrels[qid].values()) and _has_float32_tie(scores):
            tied.append(qid)

    trec_figures, trec_per_query = trec_eval_metrics(qrels, run, k=k, gain=gain)
    if kdlab_figures is None:
        ours = [m for m in per_query_ranking_metrics([(s, y) for _, s, y in per_query.values()], k=k, gain=gain) if m]
        kdlab_figures = {name: (math.fsum(m[name] for m in ours) / len(ours) if ours else 0.0) for name in names}
    missing = [name for name in names if name not in kdlab_figures]
    if missing:
        raise ValueError(f"kdlab_figures lacks {missing} (has {sorted(kdlab_figures)})")

    result: dict[str, Any] = {}
    for name in names:
        mine, theirs = float(kdlab_figures[name]), trec_figures[name]
        result[name] = {"kdlab": mine, "trec_eval": theirs, "abs_diff": abs(mine - theirs)}
    result["agrees"] = all(result[name]["abs_diff"] <= tolerance for name in names)
    result["queries_evaluated"] = len(trec_per_query)
    result["queries_with_tied_scores"] = len(tied)
    result["tied_query_ids"] = tied
    if out_dir is not None:
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        write_trec_run(directory / RUN_FILE, run)
        write_trec_qrels(directory / QRELS_FILE, qrels)
        result["run_file"] = str(directory / RUN_FILE)
        result["qrels_file"] = str(directory / QRELS_FILE)
    return result
