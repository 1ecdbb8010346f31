"""Ranking metrics: PNR as a torchmetrics ``Metric``, NDCG@k / MRR@k from ``torchmetrics.retrieval``.

All metrics take the ranking-group layout of the data contract: ``scores [G, N]``,
``labels [G, N]``, ``doc_mask [G, N]`` (False = padding document) and, for the retrieval metrics,
``query_index [G]`` (a global query id; a query must not be split across groups for PNR, which is
how evaluation groups are built: all candidates of a query in one group).

DDP: PNR keeps integer *counts* in ``sum`` states, so its synced value is exactly the single-process
value; the retrieval metrics keep per-document ``cat`` states grouped by ``query_index`` afterwards,
so they are exact too (a query seen on two ranks is merged by its index).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG

from kdlab.defaults import EVAL_K
from kdlab.losses.ranking import preference_pairs

__all__ = ["PNR", "RankingMetrics", "pair_counts"]


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

    * ``ndcg@k``: ``torchmetrics.retrieval.RetrievalNormalizedDCG(top_k=k)`` — **linear gain**
      (``DCG = Σ_{r ≤ k} rel_r / log2(r + 1)``, as trec_eval and scikit-learn, not ``2^rel − 1``),
      ties in score averaged (scikit-learn's rule). Labels are rounded to integers (torchmetrics
      requires integer relevance).
    * ``mrr@k``: ``RetrievalMRR(top_k=k)`` with relevance ``label > 0`` (``relevance_threshold``).
      torchmetrics counts documents with a score ``<= 0`` as not retrieved, so it is fed each
      document's within-group rank surrogate (``1 + #lower-scored valid docs``) rather than the raw
      score — the same order, always positive. This assumes a query's candidates are in one group
      (true for evaluation groups).
    * ``pnr``: :class:`PNR`.

    Queries with no relevant document are handled by ``empty_target_action`` (default ``"skip"``:
    left out of the NDCG/MRR means; use ``"neg"`` to count them as 0).
    Only valid documents (``doc_mask``) are fed to the retrieval metrics.
    """

    def __init__(
        self,
        k: int = EVAL_K,
        relevance_threshold: float = 0.0,
        empty_target_action: Literal["skip", "neg", "pos", "error"] = "skip",
    ) -> None:
        super().__init__()
        self.k = k
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
            self.ndcg.update(flat_s, flat_y.round().clamp(min=0).long(), indexes=idx)
            # torchmetrics' reciprocal rank treats preds <= 0 as "not retrieved"; feed an
            # order-preserving positive surrogate instead: 1 + #valid docs of the group scored lower
            # (ties stay ties). Correct because a query's candidates are all in one group.
            lower = ((s.unsqueeze(2) > s.unsqueeze(1)) & valid.unsqueeze(1)).sum(dim=2) + 1
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
