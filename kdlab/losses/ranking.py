"""Ranking and score-distillation losses: pure tensor functions (no Lightning).

Shapes: every function takes per-group tensors ``[G, N]`` (G query groups, N documents per group
after padding) and an explicit boolean ``doc_mask [G, N]`` (``False`` = padding document).

Reductions (the same for every loss, stated once here):

* pairwise losses average over **all valid pairs of the whole batch** (a group with more pairs
  weighs more, as in ``Σ_q Σ_(i,j)`` of the papers, divided by the number of pairs);
* point-wise losses average over all valid documents of the batch;
* the listwise loss averages over the groups that have a valid positive/negative pair.

A group with no valid pair (one document, or all labels equal) contributes 0 and does not count in
the denominator; a batch with nothing valid returns ``0`` that still carries a gradient (never NaN).
Scores at padding positions are replaced by 0 *before* any arithmetic, so padding can never change
the loss or its gradient, even when the padded score is ``inf``/``NaN``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.token import token_cross_entropy

__all__ = [
    "preference_pairs",
    "pairwise_hinge_loss",
    "ranknet_loss",
    "listwise_ce_loss",
    "point_mse_loss",
    "margin_mse_loss",
    "hybrid_distill_loss",
    "rank_loss",
    "rank_and_reasons_loss",
    "RankLossName",
]

RankLossName = Literal["hinge", "ranknet", "listwise"]
MarginPairs = Literal["positive", "all"]


def _check(scores: Tensor, other: Tensor, doc_mask: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [G, N], got shape {tuple(scores.shape)}")
    if other.shape != scores.shape or doc_mask.shape != scores.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)}, targets {tuple(other.shape)} and doc_mask "
            f"{tuple(doc_mask.shape)} must have the same [G, N] shape"
        )


def _masked_mean(values: Tensor, mask: Tensor, anchor: Tensor) -> Tensor:
    """``Σ values[mask] / max(1, |mask|)``; ``anchor * 0`` keeps a gradient path when mask is empty."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    count = mask.sum().clamp(min=1).to(values.dtype)
    return total / count + _anchor(anchor)


def _anchor(scores: Tensor) -> Tensor:
    """A zero that depends on ``scores`` (so the result has a grad_fn) and is never NaN."""
    return torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0).sum() * 0.0


def _clean(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with masked-out entries set to 0 (their gradient is 0 and they can hold inf/NaN)."""
    return x.masked_fill(~mask, 0.0)


def preference_pairs(labels: Tensor, doc_mask: Tensor) -> Tensor:
    """Boolean ``[G, N, N]``: entry ``(g, i, j)`` is True iff docs i, j of group g are valid and
    ``y_i > y_j`` (strictly; equal labels form no pair)."""
    valid = doc_mask.bool()
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    return both & (labels.unsqueeze(2) > labels.unsqueeze(1))


def _score_diffs(scores: Tensor, doc_mask: Tensor) -> Tensor:
    s = _clean(scores, doc_mask.bool())
    return s.unsqueeze(2) - s.unsqueeze(1)  # [G, N, N]: s_i - s_j


def pairwise_hinge_loss(scores: Tensor, labels: Tensor, doc_mask: Tensor, margin: float = 1.0) -> Tensor:
    """Pairwise max-margin loss (DisRanker rank SFT, our reading).

    ``L = (1 / |P|) Σ_{(g,i,j) ∈ P} max(0, m − (s_gi − s_gj))`` where
    ``P = {(g, i, j): doc_mask_gi ∧ doc_mask_gj ∧ y_gi > y_gj}`` (all pairs of the batch).
    Returns 0 (with grad) when ``P`` is empty.
    """
    _check(scores, labels, doc_mask)
    pairs = preference_pairs(labels, doc_mask)
    terms = F.relu(margin - _score_diffs(scores, doc_mask))
    return _masked_mean(terms, pairs, scores)


def ranknet_loss(scores: Tensor, labels: Tensor, doc_mask: Tensor) -> Tensor:
    """RankNet: ``L = (1 / |P|) Σ_{(g,i,j) ∈ P} −log σ(s_gi − s_gj)`` over the same pairs ``P`` as
    :func:`pairwise_hinge_loss` (computed stably as ``softplus(−(s_i − s_j))``)."""
    _check(scores, labels, doc_mask)
    pairs = preference_pairs(labels, doc_mask)
    terms = F.softplus(-_score_diffs(scores, doc_mask))
    return _masked_mean(terms, pairs, scores)


def listwise_ce_loss(scores: Tensor, labels: Tensor, doc_mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Listwise softmax cross-entropy (RankLLaMA style).

    For each group, the positive ``p`` is the valid document with the highest label (the first one
    on ties, so with the data's "positive first" layout ``p = 0``);
    ``L_g = −log( exp(s_gp/τ) / Σ_{j valid} exp(s_gj/τ) )``, and ``L = mean_g L_g`` over the
    groups that have a valid pair (``max y > min y`` among valid docs); other groups contribute 0.
    """
    _check(scores, labels, doc_mask)
    valid = doc_mask.bool()
    has_pair = preference_pairs(labels, doc_mask).flatten(1).any(dim=1)  # [G]
    neg_inf = torch.finfo(scores.dtype).min
    masked_labels = labels.masked_fill(~valid, neg_inf)
    positive = masked_labels.argmax(dim=1)  # first max
    logits = _clean(scores, valid) / temperature
    logits = logits.masked_fill(~valid, neg_inf)
    # groups without any valid doc would be all -inf: give them a harmless row (they are masked out)
    logits = torch.where(valid.any(dim=1, keepdim=True), logits, torch.zeros_like(logits))
    per_group = F.cross_entropy(logits, positive, reduction="none")
    return _masked_mean(per_group, has_pair, scores)


def _distill_valid(teacher_scores: Tensor, doc_mask: Tensor) -> Tensor:
    return doc_mask.bool() & torch.isfinite(teacher_scores)


def point_mse_loss(scores: Tensor, teacher_scores: Tensor, doc_mask: Tensor) -> Tensor:
    """Point-wise MSE: ``L = (1 / |D|) Σ_{(g,i) ∈ D} (s_gi − t_gi)^2`` over the valid documents
    ``D`` of the batch; documents whose teacher score is missing (NaN/inf) are left out of ``D``."""
    _check(scores, teacher_scores, doc_mask)
    valid = _distill_valid(teacher_scores, doc_mask)
    diff = _clean(scores, valid) - _clean(teacher_scores, valid)
    return _masked_mean(diff.pow(2), valid, scores)


def _margin_pairs(valid: Tensor, pairs: MarginPairs, positive_index: int) -> Tensor:
    g, n = valid.shape
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    if pairs == "all":
        upper = torch.ones(n, n, dtype=torch.bool, device=valid.device).triu(diagonal=1)
        return both & upper
    if pairs == "positive":
        sel = torch.zeros(n, n, dtype=torch.bool, device=valid.device)
        if 0 <= positive_index < n:
            sel[positive_index] = True
            sel[positive_index, positive_index] = False
        return both & sel
    raise ValueError(f"pairs must be 'positive' or 'all', got {pairs!r}")


def margin_mse_loss(
    scores: Tensor,
    teacher_scores: Tensor,
    doc_mask: Tensor,
    pairs: MarginPairs = "positive",
    positive_index: int = 0,
) -> Tensor:
    """Margin-MSE (Hofstätter et al., arXiv 2010.02666).

    ``L = (1 / |P|) Σ_{(g,i,j) ∈ P} ((s_gi − s_gj) − (t_gi − t_gj))^2``.

    ``pairs="positive"`` (default, Hofstätter): ``P = {(g, p, j): j ≠ p}`` with ``p = positive_index``
    (the data puts the positive first), i.e. the positive against each negative;
    ``pairs="all"``: every unordered pair ``i < j`` of valid documents (the term is symmetric in
    ``i, j``, so this equals the mean over all ordered pairs ``i ≠ j``).
    Documents with a missing teacher score or padding are in no pair.
    """
    _check(scores, teacher_scores, doc_mask)
    valid = _distill_valid(teacher_scores, doc_mask)
    p = _margin_pairs(valid, pairs, positive_index)
    s = _clean(scores, valid)
    t = _clean(teacher_scores, valid)
    ds = s.unsqueeze(2) - s.unsqueeze(1)
    dt = t.unsqueeze(2) - t.unsqueeze(1)
    return _masked_mean((ds - dt).pow(2), p, scores)


def hybrid_distill_loss(
    scores: Tensor,
    teacher_scores: Tensor,
    doc_mask: Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    pairs: MarginPairs = "positive",
    positive_index: int = 0,
) -> Tensor:
    """DisRanker hybrid loss: ``L = α · L_point + β · L_margin`` (:func:`point_mse_loss`,
    :func:`margin_mse_loss`). A term whose weight is exactly 0 is not computed, so ``α = 0`` is
    margin-MSE only and ``β = 0`` point-MSE only."""
    _check(scores, teacher_scores, doc_mask)
    total = _anchor(scores)
    if alpha != 0.0:
        total = total + alpha * point_mse_loss(scores, teacher_scores, doc_mask)
    if beta != 0.0:
        total = total + beta * margin_mse_loss(scores, teacher_scores, doc_mask, pairs, positive_index)
    return total


def rank_loss(
    name: RankLossName, scores: Tensor, labels: Tensor, doc_mask: Tensor, margin: float = 1.0
) -> Tensor:
    """Dispatch to ``hinge`` (:func:`pairwise_hinge_loss` with ``margin``), ``ranknet`` or
    ``listwise`` (:func:`listwise_ce_loss`)."""
    if name == "hinge":
        return pairwise_hinge_loss(scores, labels, doc_mask, margin=margin)
    if name == "ranknet":
        return ranknet_loss(scores, labels, doc_mask)
    if name == "listwise":
        return listwise_ce_loss(scores, labels, doc_mask)
    raise ValueError(f"unknown rank loss {name!r}; use 'hinge', 'ranknet' or 'listwise'")



def rank_and_reasons_loss(rank_term: Tensor, reason_logits: Tensor, reason_targets: Tensor,
                          reasons_weight: float) -> tuple[Tensor, Tensor]:
    """RRA-GPT's joint objective: the ranking layer's loss plus ``λ`` times the reasons' token NLL.

    ``L = L_rank + λ · L_reason``,  ``L_reason = (1 / |R|) Σ_{i ∈ R} − log softmax(z_i)[y_i]``

    [paper] RRADistill's decoder student is "trained jointly on classification/ranking and generation
    of the reasons" an LLM gave for its ranking. [reading] the two terms are summed with weight
    ``λ = reasons_weight``; ``z_i`` are the LM head's logits at the position *before* reason token
    ``y_i`` (aligned: ``reason_logits[..., i, :]`` predicts ``reason_targets[..., i]``, any leading
    shape), ``R`` the targets that are not ``IGNORE_INDEX``, so ``L_reason`` is the causal-LM NLL of
    the reasons averaged over their tokens; ``L_rank`` is whatever ranking loss the caller computed
    on the same model's scores. No reason token: ``L_reason = 0`` (no NaN, logits still in the
    graph). Returns ``(L, L_reason)``.
    """
    if reasons_weight < 0:
        raise ValueError(f"reasons_weight must be >= 0, got {reasons_weight}")
    vocab = reason_logits.shape[-1]
    total, count = token_cross_entropy(reason_logits.reshape(1, -1, vocab), reason_targets.reshape(1, -1))
    reason = total / count.clamp(min=1)
    return rank_term + reasons_weight * reason, reason
