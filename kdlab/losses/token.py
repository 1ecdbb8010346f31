"""Token-level losses on sequences: pure tensor functions (no Lightning).

Each returns ``(total, count)``: the loss summed over the valid tokens and how many there were, so
that a caller can take the mean over one batch (``total / count``) or over every rank's tokens
(:func:`kdlab.stages._common.global_token_mean`) without the loss knowing about ranks.

Shapes: ``logits [B, T, V]``, ``targets [B, T]`` (``IGNORE_INDEX`` = no loss), ``mask [B, T]`` bool.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.defaults import IGNORE_INDEX

__all__ = ["forward_kl", "jensen_shannon", "next_token_nll", "token_cross_entropy", "total_variation"]


def token_cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of aligned targets: ``logits[b, t]`` predicts ``targets[b, t]``. [paper]

    ``total = Σ_{(b,t): y_bt ≠ IGNORE} − log softmax(logits_bt)[y_bt]``, ``count`` = those positions.
    Computed in float32 whatever the logits' dtype. No valid token: ``total = 0``, ``count = 0``.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must agree on [B, T]")
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def next_token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Causal-LM negative log-likelihood: position ``t`` predicts ``labels[:, t + 1]``. [paper]

    ``total = Σ_t − log p(labels_{t+1} | ≤ t)`` over positions whose shifted label is not
    ``IGNORE_INDEX`` (the prompt and padding carry ``IGNORE_INDEX``): the CPT loss of DisRanker and
    the cross-entropy objective of the generation stage, before the mean.
    """
    return token_cross_entropy(logits[:, :-1], labels[:, 1:])


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
               temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Forward KL from the teacher's token distributions to the student's (word-level KD). [paper]

    ``total = Σ_{t: mask_t} Σ_v p_T^τ(v) (log p_T^τ(v) − log p_S^τ(v))`` with
    ``p^τ = softmax(logits / τ)``, ``count = Σ mask``. The usual KD loss is
    ``τ² · total / count`` (Hinton et al.: τ² keeps gradient sizes comparable across τ).
    Identical distributions give 0; at τ = 1 it equals ``F.kl_div(log p_S, log p_T, log_target=True)``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
                         "logits must have the same [B, T, V] shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_ps = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return (kl * mask.float()).sum(), mask.sum()


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
                         "logits must have the same [B, T, V] shape")
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must be the logits' [B, T] {tuple(student_logits.shape[:-1])}")


def total_variation(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token-level total variation distance (the TVD row of KETCHUP's table). [code]

    ``total = Σ_{t: mask_t} ½ Σ_v |p_S(v) − p_T(v)|``, ``p = softmax(logits)``, ``count = Σ mask``;
    each term lies in [0, 1]. The released code (``utils/distillation.py: calc_tvd_loss``) takes the
    mean over valid tokens (``total / count``) on the student's and on the teacher's sequences and
    averages the two; the stage does that. Identical distributions give 0, disjoint supports 1.
    """
    _check_pair(student_logits, teacher_logits, mask)
    ps = torch.softmax(student_logits.float(), dim=-1)
    pt = torch.softmax(teacher_logits.float(), dim=-1)
    tvd = 0.5 * (ps - pt).abs().sum(-1)
    return (tvd * mask.float()).sum(), mask.sum()


def jensen_shannon(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, beta: float = 0.5,
                   terms: str = "both") -> tuple[Tensor, Tensor]:
    """Token-level (generalised) Jensen–Shannon divergence (the JS row of KETCHUP's table).

    ``m = β p_T + (1 − β) p_S``; per valid token::

        terms="both"     JS_β = β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m)          [paper: Wen et al. 2023 / reading]
        terms="student"  KL(p_S ‖ m)                                         [code]

    ``count = Σ mask``. ``terms="student"`` is what the released ``calc_js_loss`` computes
    (``KLDivLoss(log m, p_S)``, with β = 0.5; its ``JS`` wrapper averages that over the student's and
    the teacher's sequences). Identical distributions give 0 for both; the symmetric form at
    β = ½ is at most ``log 2`` per token.
    """
    _check_pair(student_logits, teacher_logits, mask)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if terms not in ("both", "student"):
        raise ValueError(f"terms must be 'both' or 'student', got {terms!r}")
    log_ps = torch.log_softmax(student_logits.float(), dim=-1)
    log_pt = torch.log_softmax(teacher_logits.float(), dim=-1)
    # log m = logsumexp(log β + log p_T, log(1 − β) + log p_S): stable where either p underflows
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    if terms == "student":
        js = kl_s
    else:
        kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
        js = beta * kl_t + (1.0 - beta) * kl_s
    return (js * mask.float()).sum(), mask.sum()
