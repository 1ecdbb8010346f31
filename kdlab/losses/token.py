"""Token-level losses on sequences: pure tensor functions (no Lightning).

Each returns ``(total, count)``: the loss summed over the valid tokens and how many there were, so
that a caller can take the mean over one batch (``total / count``) or over every rank's tokens
(:func:`kdlab.stages._common.global_token_mean`) without the loss knowing about ranks.

Shapes: ``logits [B, T, V]``, ``targets [B, T]`` (``IGNORE_INDEX`` = no loss), ``mask [B, T]`` bool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.defaults import IGNORE_INDEX

__all__ = ["forward_kl", "next_token_nll", "token_cross_entropy"]


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
