"""Ranking metrics: PNR as a torchmetrics ``Metric``, NDCG@k / MRR@k from ``torchmetrics.retrieval``,
and :func:`per_query_ranking_metrics`, the same NDCG@k / MRR@k query by query (for paired tests).

All metrics take the ranking-group layout of the data contract: ``scores [G, N]``,
``labels [G, N]``, ``doc_mask [G, N]`` (False = padding document) and, for the retrieval metrics,
``query_index [G]`` (a global query id; a query must not be split across groups for PNR, which is
how evaluation groups are built: all candidates of a query in one group).

DDP: PNR keeps integer *counts* in ``sum`` states, so its synced value is exactly the single-process
value; the retrieval metrics keep per-document ``cat`` states grouped by ``query_index`` afterwards,
so they are exact too (a query seen on two ranks is merged by its index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.retrieval import retrieval_normalized_dcg
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG

from kdlab.defaults import EVAL_K
from kdlab.losses.ranking import preference_pairs

__all__ = ["PNR", "Gain", "RankingMetrics", "pair_counts", "per_query_ranking_metrics"]

Gain = Literal["linear", "exponential"]
_GAINS = ("linear", "exponential")


def _check_gain(gain: str) -> None:
    if gain not in _GAINS:
        raise ValueError(f"gain must be one of {_GAINS}, got {gain!r}")


def _gain_values(labels: Tensor, gain: str) -> Tensor:
    """Per-document gain fed to torchmetrics' NDCG as its "relevance".

    ``linear``: ``max(y, 0)``; ``exponential``: ``2^max(y, 0) − 1``. Labels are kept as they are
    (fractional click rates / averaged judgements are not rounded); negative labels count as 0, as
    they always have. Feeding the gain itself as the target is exact: torchmetrics' NDCG is linear
    in its target, and ``2^y − 1`` is increasing, so the ideal order is unchanged.
    """
    rel = labels.float().clamp(min=0)
    if gain == "exponential":
        # expm1 in float64: integer labels give exact integer gains (1, 3, 7, ...) and a tiny
        # positive label keeps a positive gain (exp2(y) - 1 in float32 would round it to 0 and turn
        # the query into one "without relevant document" for NDCG but not for MRR)
        return torch.expm1(rel.double() * math.log(2.0)).float()
    return rel


def _rank_surrogate(s: Tensor, valid: Tensor) -> Tensor:
    """``1 + #valid docs of the group scored lower`` (same shape as ``s``, ``[..., N]``).

    torchmetrics' reciprocal rank treats preds ``<= 0`` as "not retrieved"; this order-preserving,
    always-positive surrogate (ties stay ties) avoids that. Exact because a query's candidates are
    all in one group.
    """
    return ((s.unsqueeze(-1) > s.unsqueeze(-2)) & valid.unsqueeze(-2)).sum(dim=-1) + 1


def pair_counts(scores: Tensor, labels: Tensor, doc_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Counts over the pairs ``P = {(g, i, j): valid_gi ∧ valid_gj ∧ y_gi > y_gj}``.

    Returns ``(concordant, discordant, tied)``: the number of pairs with ``s_i > s_j``,
    ``s_i < s_j`` and ``s_i == s_j`` respectively (``concordant + discordant + tied = |P|``).
    """
    pairs = preference_pairs(labels, doc_mask)
    s = scores.detach().masked_fill(~doc_mask.bool(), 0.0)
    diff = s.unsqueeze(2) - s.unsqueeze(1)
    conc = (pairs & (diff > 0)).sum()
    disc = (pairs & (diff < 0)).sum()
    tied = (pairs & (diff == 0)).sum()
    return conc, disc, tied


class PNR(Metric):
    """Positive-negative ratio (DisRanker): over all pairs of documents of one query with
    ``y_i > y_j``, ``PNR = #{s_i > s_j} / #{s_i < s_j}``.

    * Ties in score (``s_i == s_j``) count **neither** way (they are kept in the ``tied`` state
      for inspection only).
    * When no pair is discordant the ratio is undefined; this metric returns
      ``concordant / max(discordant, 1)`` (finite, safe to log and to monitor; equal to the
      concordant count in that case). With no pair at all it returns 0.
    * Counts accumulate in ``sum`` states (exact under DDP); the ratio is taken once in ``compute``,
      so it is the ratio of total counts, not a mean of per-batch ratios.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    concordant: Tensor
    discordant: Tensor
    tied: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        for name in ("concordant", "discordant", "tied"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, labels: Tensor, doc_mask: Tensor) -> None:  # type: ignore[override]
        """Add the pair counts of a batch of groups (see :func:`pair_counts`)."""
        conc, disc, tied = pair_counts(scores, labels, doc_mask)
        self.concordant += conc
        self.discordant += disc
        self.tied += tied

    def compute(self) -> Tensor:
        """``concordant / max(discordant, 1)`` as a float tensor."""
        return self.concordant.double().div(self.discordant.clamp(min=1).double()).float()


class RankingMetrics(nn.Module):
    """NDCG@k, MRR@k and PNR for ranking groups, as stages use them.

    * ``ndcg@k``: ``torchmetrics.retrieval.RetrievalNormalizedDCG(top_k=k)`` fed each document's
      gain ``g(y)``: ``DCG@k = Σ_{r ≤ k} g(rel_r) / log2(r + 1)``, ``NDCG@k = DCG@k / IDCG@k`` (IDCG:
      the candidates sorted by label). ``gain="linear"`` (default): ``g(y) = max(y, 0)``, as trec_eval
      and scikit-learn; ``gain="exponential"``: ``g(y) = 2^max(y, 0) − 1`` (Burges et al.). Labels
      are used as they are: fractional graded labels (click rates, averaged judgements) are **not**
      rounded (torchmetrics 1.9's NDCG takes float targets as they are); negative labels count as 0.
      Ties in score are averaged (scikit-learn's rule: every tied document gets the mean gain of
      its tie group over the tie group's positions).
    * ``mrr@k``: ``RetrievalMRR(top_k=k)``, ``RR = 1 / rank of the first document with
      label > relevance_threshold`` (0 when none is in the top k). torchmetrics counts documents
      with a score ``<= 0`` as not retrieved, so it is fed each document's within-group rank
      surrogate (``1 + #lower-scored valid docs``) rather than the raw score — the same order,
      always positive. This assumes a query's candidates are in one group (true for evaluation
      groups). When the best relevant document ties in score with a non-relevant one, which of
      them comes first is torchmetrics' internal (unstable-sort) order: arbitrary.
    * ``pnr``: :class:`PNR`.

    Queries with no relevant document are handled by ``empty_target_action`` (default ``"skip"``:
    left out of the NDCG/MRR means; use ``"neg"`` to count them as 0).
    Only valid documents (``doc_mask``) are fed to the retrieval metrics.
    :func:`per_query_ranking_metrics` gives the same NDCG/MRR query by query (MRR: the same
    unless there is such a tie, which it averages over).
    """

    def __init__(
        self,
        k: int = EVAL_K,
        relevance_threshold: float = 0.0,
        empty_target_action: Literal["skip", "neg", "pos", "error"] = "skip",
        gain: Gain = "linear",
    ) -> None:
        super().__init__()
        _check_gain(gain)
        self.k = k
        self.gain = gain
        self.relevance_threshold = relevance_threshold
        self.ndcg = RetrievalNormalizedDCG(top_k=k, empty_target_action=empty_target_action)
        self.mrr = RetrievalMRR(top_k=k, empty_target_action=empty_target_action)
        self.pnr = PNR()

    @property
    def names(self) -> list[str]:
        """The keys :meth:`compute` returns."""
        return [f"ndcg@{self.k}", f"mrr@{self.k}", "pnr"]

    def update(self, scores: Tensor, labels: Tensor, doc_mask: Tensor, query_index: Tensor) -> None:
        """Accumulate one batch of groups (``scores``, ``labels``, ``doc_mask`` ``[G, N]``,
        ``query_index [G]``)."""
        valid = doc_mask.bool()
        s = scores.detach().float()
        idx = query_index.view(-1, 1).expand_as(valid)[valid].long()
        flat_s = s[valid]
        flat_y = labels[valid]
        if flat_s.numel() > 0:
            self.ndcg.update(flat_s, _gain_values(flat_y, self.gain), indexes=idx)
            lower = _rank_surrogate(s, valid)
            self.mrr.update(lower[valid].float(), flat_y > self.relevance_threshold, indexes=idx)
        self.pnr.update(s, labels, valid)

    def compute(self) -> dict[str, Tensor]:
        """``{"ndcg@k", "mrr@k", "pnr"}`` over everything seen since the last :meth:`reset`."""
        out: dict[str, Tensor] = {}
        for name, metric in zip(self.names, (self.ndcg, self.mrr, self.pnr)):
            # Under DDP every rank must call compute() (it syncs), even a rank that saw no query.
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            if metric is not self.pnr and not getattr(metric, "indexes", None) and not distributed:
                out[name] = torch.tensor(0.0)
            else:
                out[name] = metric.compute()
        return out

    def reset(self) -> None:
        """Clear all accumulated state."""
        self.ndcg.reset()
        self.mrr.reset()
        self.pnr.reset()


def _tie_averaged_reciprocal_rank(scores: Tensor, relevant: Tensor, k: int) -> float:
    """``E[RR@k]`` when the documents tied in score are put in a uniformly random order.

    Let the first tie group holding a relevant document start at rank ``p`` (everything above it is
    non-relevant), with ``m`` documents of which ``r`` are relevant. The first relevant document of
    the group lands at its ``j``-th place with ``P(j) = C(m − j, r − 1) / C(m, r)``, so
    ``E[RR@k] = Σ_{j ≤ m − r + 1, p + j − 1 ≤ k} P(j) / (p + j − 1)``. Without a tie (``m = 1``) this
    is the plain ``1 / p`` (0 when ``p > k``).
    """
    best = scores[relevant].max()
    p = int((scores > best).sum()) + 1
    group = scores == best
    m, r = int(group.sum()), int((group & relevant).sum())
    total = math.comb(m, r)
    return math.fsum(
        math.comb(m - j, r - 1) / total / (p + j - 1) for j in range(1, m - r + 2) if p + j - 1 <= k
    )


def per_query_ranking_metrics(
    per_query: Sequence[tuple[Sequence[float], Sequence[float]]],
    k: int = EVAL_K,
    gain: Gain = "linear",
) -> list[dict[str, float] | None]:
    """Each query's ``ndcg@k`` and ``mrr@k`` with :class:`RankingMetrics`' semantics.

    ``per_query[i] = (scores, labels)`` over all candidates of query ``i``. Entry ``i`` of the
    result is ``{"ndcg@k": NDCG@k_i, "mrr@k": RR@k_i}``, or ``None`` for a query with no relevant
    document (``label > 0``; ``RankingMetrics`` skips those), so the mean over the non-``None``
    entries is ``RankingMetrics(k, gain=gain)``'s figure on the same queries. Feeds paired
    significance tests (:mod:`kdlab.metrics.significance`).

    * ``ndcg@k``: the very torchmetrics computation ``RankingMetrics`` runs on each query (same
      gains, same tie averaging, float32), so it is equal even with tied scores.
    * ``mrr@k``: ``1 / rank of the first document with label > 0`` (0 beyond ``k``), equal to
      ``RankingMetrics``' value whenever no non-relevant document shares the score of the best
      relevant one. Under such a tie ``RankingMetrics``' reciprocal rank is arbitrary (torchmetrics
      takes whichever tied document its unstable sort and ``topk`` put first, which depends on the
      other queries seen), so no per-query function can reproduce it; this one returns the
      expectation over random tie orders instead (see :func:`_tie_averaged_reciprocal_rank`),
      the analogue of NDCG's tie averaging.
    """
    _check_gain(gain)
    if not (isinstance(k, int) and k > 0):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    out: list[dict[str, float] | None] = []
    for i, (scores, labels) in enumerate(per_query):
        # float32, as RankingMetrics feeds torchmetrics: the same ties and the same arithmetic
        s = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        y = torch.as_tensor(labels, dtype=torch.float32).reshape(-1)
        if s.shape != y.shape:
            raise ValueError(f"query {i}: {s.numel()} scores but {y.numel()} labels")
        relevant = y > 0
        if not bool(relevant.any()):
            out.append(None)
            continue
        ndcg = retrieval_normalized_dcg(s, _gain_values(y, gain), top_k=k)
        rr = _tie_averaged_reciprocal_rank(s, relevant, k)
        out.append({f"ndcg@{k}": float(ndcg), f"mrr@{k}": rr})
    return out
