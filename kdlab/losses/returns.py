"""Induced step rewards, K-step returns and the policy-gradient loss (KETCHUP, arXiv 2504.19024).

Pure tensor functions over a padded batch ``[B, T]`` with an explicit boolean ``mask`` (True = a
real, sampled action). No Lightning, no hidden reductions.

Notation (see ``shared/PAPERS.md`` §3). A teacher trained by teacher forcing has logits
``q(s_t, ·)`` over the next token, ``s_t`` = source + prefix ``a_{<t}``. Read as an optimal
Q-function (Hao et al., NeurIPS 2022 **[paper]**) the Bellman optimality equation
``Q(s_t, a_t) = r_t + V(s_{t+1})``, ``V(s) = max_a Q(s, a)``, induces the one-step reward::

    r_t = q(s_t, a_t) − V(s_{t+1}),        V(s_{T+1}) = 0   (after the last action / EOS)

KETCHUP applies the equation over K steps, so a reward is induced for a K-step segment
**[paper: idea; reading: exact form]**::

    R_t^(K) = q(s_t, a_t) − V(s_{t+K}),    V(s_{t+K}) = 0 when t + K passes the last action
    G_t^(K) = Σ_{j ≥ 0} R^(K)_{t + jK}

K = 1 gives the one-step return ``G_t = Σ_{i ≥ t} r_i`` exactly; K ≥ T gives ``G_t = q(s_t, a_t)``.

Options inherited from the predecessor's public code (MANGA-UOFA/LMReward ``reinforce.py``
**[code]**): logits centred over the vocabulary before use, a reward divisor and clipping. The soft
Bellman value (``logsumexp`` instead of ``max``) is an option **[reading]**.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "PolicyGradientOutput",
    "induced_rewards",
    "kstep_returns",
    "one_step_returns",
    "one_step_rewards",
    "policy_gradient_loss",
    "state_values",
    "taken_action_values",
]


def _check_bt(name: str, x: Tensor, mask: Tensor) -> None:
    if x.dim() < 2 or x.shape[:2] != mask.shape:
        raise ValueError(
            f"{name} must start with the mask's shape [B, T]={tuple(mask.shape)}, got {tuple(x.shape)}"
        )


def _centred(logits: Tensor, center_logits: bool) -> Tensor:
    """``q(s, a) = logits(s, a) − mean_{a'} logits(s, a')`` when ``center_logits`` (LMReward), else logits."""
    logits = logits.float()
    if center_logits:
        logits = logits - logits.mean(dim=-1, keepdim=True)
    return logits


def taken_action_values(teacher_logits: Tensor, actions: Tensor, center_logits: bool = True) -> Tensor:
    """``q(s_t, a_t)`` ``[B, T]``: the (optionally centred) teacher logit of each taken action.

    ``teacher_logits[b, t]`` must be the teacher's logits at the position that *predicts*
    ``actions[b, t]`` (i.e. already shifted by the caller).
    """
    q = _centred(teacher_logits, center_logits)
    safe_actions = actions.clamp(0, q.shape[-1] - 1)  # padding ids may be out of range; masked later
    return q.gather(-1, safe_actions.unsqueeze(-1)).squeeze(-1)


def state_values(
    teacher_logits: Tensor, bellman: Literal["hard", "soft"] = "hard", center_logits: bool = True
) -> Tensor:
    """``V(s_t)`` ``[B, T]``: ``max_a q(s_t, a)`` (hard Bellman) or ``log Σ_a exp q(s_t, a)`` (soft)."""
    q = _centred(teacher_logits, center_logits)
    if bellman == "hard":
        return q.max(dim=-1).values
    if bellman == "soft":
        return torch.logsumexp(q, dim=-1)
    raise ValueError(f"bellman must be 'hard' or 'soft', got {bellman!r}")


def induced_rewards(
    teacher_logits: Tensor,
    actions: Tensor,
    mask: Tensor,
    k: int = 1,
    bellman: Literal["hard", "soft"] = "hard",
    center_logits: bool = True,
    clip: float | None = None,
    divisor: float = 1.0,
) -> Tensor:
    """K-step segment rewards induced by a teacher, ``[B, T]`` (0 on padding).

    ::

        q(s, a)    = logits(s, a) − mean_a' logits(s, a')         (if center_logits, LMReward [code])
        V(s)       = max_a q(s, a)           (bellman="hard")
                   = log Σ_a exp q(s, a)     (bellman="soft", [reading])
        R^(K)_t    = q(s_t, a_t) − V(s_{t+K})                       ([reading] for K > 1)
        V(s_{t+K}) = 0  if t + K ≥ T or mask[t + K] is False      (past EOS / padding)
        R^(K)_t   ← clamp(R^(K)_t / divisor, −clip, clip)         (divisor, clip: LMReward options)

    Args:
        teacher_logits: ``[B, T, V]``; position ``t`` holds the teacher logits predicting ``actions[:, t]``.
        actions: ``[B, T]`` long, the sampled tokens.
        mask: ``[B, T]`` bool, True for real actions (a prefix of each row: up to and including EOS).
        k: segment length K ≥ 1.
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    if divisor <= 0:
        raise ValueError(f"divisor must be > 0, got {divisor}")
    mask = mask.bool()
    _check_bt("teacher_logits", teacher_logits, mask)
    _check_bt("actions", actions, mask)
    q_taken = taken_action_values(teacher_logits, actions, center_logits)
    values = state_values(teacher_logits, bellman, center_logits)
    values = values.masked_fill(~mask, 0.0)
    batch, length = mask.shape
    next_values = torch.zeros_like(values)
    if k < length:
        next_values[:, : length - k] = values[:, k:]
    rewards = (q_taken - next_values) / divisor
    if clip is not None:
        rewards = rewards.clamp(-clip, clip)
    return rewards.masked_fill(~mask, 0.0)


def one_step_rewards(
    teacher_logits: Tensor,
    actions: Tensor,
    mask: Tensor,
    bellman: Literal["hard", "soft"] = "hard",
    center_logits: bool = True,
) -> Tensor:
    """The one-step reward ``r_t = q(s_t, a_t) − V(s_{t+1})`` (``induced_rewards`` with K = 1)."""
    return induced_rewards(teacher_logits, actions, mask, k=1, bellman=bellman, center_logits=center_logits)


def kstep_returns(segment_rewards: Tensor, mask: Tensor, k: int) -> Tensor:
    """``G^(K)_t = Σ_{j ≥ 0} R^(K)_{t + jK}`` ``[B, T]`` (0 on padding).

    Vectorised as a strided reverse cumulative sum: positions ``t = iK + r`` are laid out as
    ``[B, ⌈T/K⌉, K]`` and summed from the end along ``i`` (``G_t = R_t + G_{t+K}``).
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    mask = mask.bool()
    _check_bt("segment_rewards", segment_rewards, mask)
    rewards = segment_rewards.masked_fill(~mask, 0.0)
    batch, length = rewards.shape
    n_segments = -(-length // k)
    padded = rewards.new_zeros(batch, n_segments * k)
    padded[:, :length] = rewards
    grid = padded.view(batch, n_segments, k)
    returns = grid.flip(1).cumsum(1).flip(1).reshape(batch, n_segments * k)[:, :length]
    return returns.masked_fill(~mask, 0.0)


def one_step_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """The definition ``G_t = Σ_{i ≥ t} r_i`` (undiscounted reverse cumulative sum; 0 on padding)."""
    mask = mask.bool()
    _check_bt("rewards", rewards, mask)
    r = rewards.masked_fill(~mask, 0.0)
    return r.flip(-1).cumsum(-1).flip(-1).masked_fill(~mask, 0.0)


class PolicyGradientOutput(NamedTuple):
    """What ``policy_gradient_loss`` returns: the loss and the statistics a stage logs."""

    loss: Tensor
    """Scalar loss (has grad through ``logprobs``)."""
    advantage_mean: Tensor
    """Mean advantage over valid tokens (before normalisation), detached."""
    advantage_std: Tensor
    """Std of the advantages over valid tokens (before normalisation), detached."""
    return_mean: Tensor
    """Mean return over valid tokens, detached (feed it to a running-mean baseline)."""


def policy_gradient_loss(
    logprobs: Tensor,
    returns: Tensor,
    mask: Tensor,
    baseline: Literal["none", "batch-mean", "running-mean"] = "batch-mean",
    running_mean: Tensor | float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
) -> PolicyGradientOutput:
    """REINFORCE with a baseline, averaged over valid tokens.

    ::

        A_t  = G_t − b_t                        (detached; G has no grad anyway)
        b_t  = 0                                 baseline="none"
             = mean_{b : mask[b,t]} G_{b,t}      baseline="batch-mean" (per position, over the batch)
             = running_mean                      baseline="running-mean" (a scalar the caller keeps,
                                                 e.g. an EMA of ``return_mean``; None → this batch's
                                                 mean return over valid tokens)
        A_t ← (A_t − mean A) / (std A + eps)    if normalize (over valid tokens)
        loss = − Σ_{b,t} mask·A·log π(a_t|s_t) / Σ mask

    Note: with ``batch-mean`` a position that only one sequence reaches gets ``A_t = 0``, so a batch
    of a single sequence gets no gradient — sample several continuations per prompt.
    All-padding input gives a zero loss (still connected to ``logprobs``).
    """
    mask = mask.bool()
    _check_bt("logprobs", logprobs, mask)
    _check_bt("returns", returns, mask)
    m = mask.float()
    n_valid = m.sum().clamp_min(1.0)
    g = returns.detach().float().masked_fill(~mask, 0.0)
    return_mean = g.sum() / n_valid
    if baseline == "none":
        b = torch.zeros_like(g)
    elif baseline == "batch-mean":
        per_pos = m.sum(0).clamp_min(1.0)
        b = (g.sum(0) / per_pos).unsqueeze(0).expand_as(g)
    elif baseline == "running-mean":
        rm = return_mean if running_mean is None else torch.as_tensor(running_mean, dtype=g.dtype, device=g.device)
        b = rm.expand_as(g)
    else:
        raise ValueError(f"baseline must be 'none', 'batch-mean' or 'running-mean', got {baseline!r}")
    adv = (g - b).masked_fill(~mask, 0.0)
    adv_mean = adv.sum() / n_valid
    adv_var = (((adv - adv_mean) ** 2) * m).sum() / n_valid
    adv_std = adv_var.sqrt()
    if normalize:
        adv = ((adv - adv_mean) / (adv_std + eps)).masked_fill(~mask, 0.0)
    loss = -(adv * logprobs.float() * m).sum() / n_valid
    return PolicyGradientOutput(loss, adv_mean.detach(), adv_std.detach(), return_mean.detach())
