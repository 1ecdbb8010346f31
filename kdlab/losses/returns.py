"""Induced step rewards, K-step returns and policy-gradient estimators (KETCHUP, arXiv 2504.19024).

Pure tensor functions over a padded batch ``[B, T]`` with an explicit boolean ``mask`` (True = a
real, sampled action; a prefix of each row, up to and including EOS). Per-row valid length
``n_b = mask[b].sum()``. No Lightning, no hidden reductions; 0 on padding everywhere.

Sources, as tagged below: **[paper]** the KETCHUP paper (only its abstract and idea are confirmed
here: "induce a K-step return by using the Bellman Optimality Equation for multiple steps");
**[code]** the official repository ``jiabinfan/KETCHUP`` (``reinforce.py`` ``reward_fn``,
``utils/helper.py`` ``n_step_reward_shift_upgrade``, ``Mymodel.py`` ``Net.reinforce``,
``scripts/reinforce_xsum.sh``) or its predecessor ``MANGA-UOFA/LMReward`` (``reinforce.py``);
**[reading]** kdlab's own choice where neither says.

Notation (see ``shared/PAPERS.md`` §3). A teacher trained by teacher forcing has logits
``q(s_t, ·)`` over the next token, ``s_t`` = source + prefix ``a_{<t}``, centred over the vocabulary
(``q ← q − mean_a q``, both released codes). Read as an optimal Q-function (Hao et al., NeurIPS 2022)
the Bellman optimality equation ``Q(s_t, a_t) = r_t + V(s_{t+1})`` induces the one-step reward::

    r_t = q(s_t, a_t) − V(s_{t+1}),        V(s_n) = 0   (after the last action / EOS)

State value ``V`` (``state_value=``): ``"max"`` = ``max_a q`` (both codes' default), ``"expected"`` =
``Σ_a softmax(q)_a q(s, a)`` (both codes' ``--softmax``), ``"logsumexp"`` (soft Bellman, [reading]).

K-step segment reward and return (``kstep_tail=``)::

    "zero"        R_t = q_t − V(s_{t+K}),  V = 0 when t + K ≥ n          [reading: the clean Bellman form]
                  G_t = Σ_{j ≥ 0, t+jK < n} R_{t+jK}
    "last-state"  R_t = q_t − V(s_{min(t+K, n−1)})  for t < n−1,  R_{n−1} = q_{n−1}      [code]
                  G_t = Σ_{j ≥ 0, t+jK < n−1} R_{t+jK} + R_{n−1}   (terminal reward joins every chain once)

Both reduce to the one-step return ``G_t = Σ_{i ≥ t} r_i`` at K = 1. They differ only on chains that
do not land on ``n−1``, by ``q_{n−1} − V(s_{n−1})`` (0 with ``max`` when the last action is the
teacher's argmax).

Policy gradient (``policy_gradient_loss``): per-token weight ``w_t`` on ``log π_θ(a_t|s_t)``:
``"logprob"`` = REINFORCE ``w = G − b`` [reading]; ``"student-prob"`` = ``w = clip(G·π_θ(a_t|s_t))``
(detached ``π``), the released KETCHUP estimator [code]. Baselines: ``none`` (released default),
``mean`` and ``min-variance`` (KETCHUP options, subtracted from the clipped weight) [code],
``teacher-expected`` (LMReward's ``--baseline``: teacher's expected value of ``s_t``, subtracted from
the return) [code], ``batch-mean`` / ``running-mean`` [reading].
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Baseline",
    "KStepReturns",
    "KStepTail",
    "PGWeight",
    "PolicyGradientOutput",
    "StateValue",
    "induced_rewards",
    "kstep_returns",
    "kstep_returns_from_logits",
    "length_normalized_returns",
    "logprob_grad_sq",
    "normalized_teacher_logits",
    "one_step_returns",
    "one_step_rewards",
    "policy_gradient_loss",
    "state_values",
    "taken_action_values",
    "teacher_expected_baseline",
]

StateValue = Literal["max", "expected", "logsumexp"]
KStepTail = Literal["zero", "last-state"]
PGWeight = Literal["logprob", "student-prob"]
LogitNormalization = Literal["none", "token-std", "log-softmax"]
Baseline = Literal["none", "mean", "min-variance", "batch-mean", "running-mean", "teacher-expected"]

_STATE_VALUES = ("max", "expected", "logsumexp")
_TAILS = ("zero", "last-state")
_PG_WEIGHTS = ("logprob", "student-prob")
_NORMALIZATIONS = ("none", "token-std", "log-softmax")
_BASELINES = ("none", "mean", "min-variance", "batch-mean", "running-mean", "teacher-expected")


def _check_bt(name: str, x: Tensor, mask: Tensor) -> None:
    if x.dim() < 2 or x.shape[:2] != mask.shape:
        raise ValueError(
            f"{name} must start with the mask's shape [B, T]={tuple(mask.shape)}, got {tuple(x.shape)}"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def _row_lengths(mask: Tensor) -> Tensor:
    """``n_b = mask[b].sum()`` ``[B]`` (long); raises if a row's mask is not a prefix."""
    lengths = mask.sum(-1)
    prefix = torch.arange(mask.shape[-1], device=mask.device)[None] < lengths[:, None]
    if not torch.equal(prefix, mask):
        raise ValueError("mask must be a prefix of each row (True up to the row's last action, then False)")
    return lengths


def _centred(logits: Tensor, center_logits: bool) -> Tensor:
    """``q(s, a) = logits(s, a) − mean_{a'} logits(s, a')`` when ``center_logits`` (both codes), else logits."""
    logits = logits.float()
    if center_logits:
        logits = logits - logits.mean(dim=-1, keepdim=True)
    return logits


def normalized_teacher_logits(teacher_logits: Tensor, normalization: LogitNormalization = "none") -> Tensor:
    """The teacher's logits on a per-token scale before rewards are induced from them. [reading]

    ::

        "none"         q = logits                                         (both codes)
        "token-std"    q = (logits − mean_v logits) / std_v logits        at each position
        "log-softmax"  q = log softmax(logits) = logits − logsumexp_v logits

    Raw logit scales differ from position to position (a confident position has a wide spread), so
    the induced rewards ``q − V`` of some tokens dwarf the rest; ``token-std`` puts every position
    on unit spread (centring afterwards is then a no-op). ``log-softmax`` makes ``q`` the teacher's
    log-probability; with ``state_value="logsumexp"`` each ``V`` is then 0 and ``G_t`` is the
    teacher's log-likelihood of the continuation from ``t``. A position whose logits are all equal
    (std 0) keeps std 1 under ``token-std``.
    """
    _check_choice("teacher_logit_normalization", normalization, _NORMALIZATIONS)
    if normalization == "none":
        return teacher_logits
    logits = teacher_logits.float()
    if normalization == "log-softmax":
        return torch.log_softmax(logits, dim=-1)
    std = logits.std(dim=-1, keepdim=True, unbiased=False)
    return (logits - logits.mean(dim=-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def taken_action_values(teacher_logits: Tensor, actions: Tensor, center_logits: bool = True) -> Tensor:
    """``q(s_t, a_t)`` ``[B, T]``: the (optionally centred) teacher logit of each taken action.

    ``teacher_logits[b, t]`` must be the teacher's logits at the position that *predicts*
    ``actions[b, t]`` (i.e. already shifted by the caller).
    """
    q = _centred(teacher_logits, center_logits)
    safe_actions = actions.clamp(0, q.shape[-1] - 1)  # padding ids may be out of range; masked later
    return q.gather(-1, safe_actions.unsqueeze(-1)).squeeze(-1)


def state_values(
    teacher_logits: Tensor, state_value: StateValue = "max", center_logits: bool = True
) -> Tensor:
    """``V(s_t)`` ``[B, T]`` from the teacher's logits at position ``t``.

    ::

        "max"        V(s) = max_a q(s, a)                  [code] default of KETCHUP and LMReward
        "expected"   V(s) = Σ_a softmax(q(s, ·))_a q(s, a)  [code] their ``--softmax`` option
        "logsumexp"  V(s) = log Σ_a exp q(s, a)            [reading] soft Bellman

    ``expected ≤ max ≤ logsumexp``. KETCHUP's ``reward_fn`` (reinforce.py) computes
    ``torch.sum(torch.softmax(next_logits, -1) * next_logits, -1)`` on the centred logits of the
    state ``s_{t+K}``, as here. Of the two stored versions of LMReward's ``reward_fn``, commit 3a45ad0
    does the same; 08d88f2 weights the next state's logits by the *current* position's softmax
    (``softmax(logits) * next_logits``) — not reproduced.
    """
    _check_choice("state_value", state_value, _STATE_VALUES)
    q = _centred(teacher_logits, center_logits)
    if state_value == "max":
        return q.max(dim=-1).values
    if state_value == "expected":
        return (torch.softmax(q, dim=-1) * q).sum(dim=-1)
    return torch.logsumexp(q, dim=-1)


def induced_rewards(
    teacher_logits: Tensor,
    actions: Tensor,
    mask: Tensor,
    k: int = 1,
    state_value: StateValue = "max",
    center_logits: bool = True,
    clip: float | None = None,
    divisor: float = 1.0,
    kstep_tail: KStepTail = "zero",
) -> Tensor:
    """K-step segment rewards induced by a teacher, ``[B, T]`` (0 on padding).

    ::

        q(s, a)   = logits(s, a) − mean_a' logits(s, a')      (if center_logits; both codes [code])
        V(s)      = see ``state_values`` (state_value = "max" | "expected" | "logsumexp")
        kstep_tail="zero" ([reading]; kdlab's default, the clean Bellman form):
            R_t   = q(s_t, a_t) − V(s_{t+K}),   V(s_{t+K}) = 0 if t + K ≥ n
        kstep_tail="last-state" (the released KETCHUP code [code]):
            R_t   = q(s_t, a_t) − V(s_{min(t+K, n−1)})   for t < n − 1
            R_{n−1} = q(s_{n−1}, a_{n−1})                (the last action, EOS, keeps its own reward)
        R_t      ← clamp(R_t / divisor, −clip, clip)

    ``n = n_b`` is the row's valid length. Pair ``kstep_tail`` with the same value in
    ``kstep_returns`` (or call ``kstep_returns_from_logits``).

    What the released code does for ``last-state`` (``reinforce.py`` ``reward_fn`` then
    ``utils/helper.py`` ``n_step_reward_shift_upgrade``): ``next_logits = torch.roll(logits, -n_step, 1)``,
    ``V`` = max (or expected) of the centred next logits, zeroed where ``output_ids`` is pad or EOS;
    then for ``t + K ≥ n − 1, t ≠ n − 1`` it sets ``reward[:, t] = selection_value[:, t] −
    next_state_value[:, -((1+n_step) % n)]``, which is ``V(s_{n−1})``. Differences from here:

    - ``n`` there is the padded width of the batch (the released script trains with batch size 1,
      so no padding); here it is each row's own length, which generalises that batch-of-one case.
    - ``K ≥ n``: the released fix is guarded by ``if n_step < next_state_value.shape[1]`` and the
      roll wraps around, giving ``R_t = q_t − V(s_{(t+K) mod n})`` (a value of an *earlier* state);
      here ``R_t = q_t − V(s_{n−1})`` for every ``K ≥ n − 1``, the same formula as for ``K < n``.
    - A row that ends without EOS (truncated at the length limit): the released ``R_{n−1}`` is
      ``q_{n−1} − V(s_{(n−1+K) mod n})`` (roll wrap-around); here ``R_{n−1} = q_{n−1}``.
    - ``K = 1``: identical to ``"zero"`` (the released code calls plain ``calc_returns`` then).

    ``clip`` / ``divisor`` act on each step reward ([reading]). The released codes divide the
    *return* by ``--denom`` (equivalent, linear) and clip the per-token *weight* ``G·π`` (LMReward:
    ``(G − b)·ρ``) with ``--reward_clip`` — that is ``policy_gradient_loss(weight_clip=...)``, not this.

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
    _check_choice("kstep_tail", kstep_tail, _TAILS)
    mask = mask.bool()
    _check_bt("teacher_logits", teacher_logits, mask)
    _check_bt("actions", actions, mask)
    q_taken = taken_action_values(teacher_logits, actions, center_logits)
    values = state_values(teacher_logits, state_value, center_logits)
    values = values.masked_fill(~mask, 0.0)
    batch, length = mask.shape
    if kstep_tail == "zero":
        next_values = torch.zeros_like(values)
        if k < length:
            next_values[:, : length - k] = values[:, k:]
    else:
        last = (_row_lengths(mask) - 1).clamp_min(0)[:, None]  # [B, 1]; empty rows are masked below
        pos = torch.arange(length, device=mask.device)[None]
        target = torch.minimum(pos + k, last)  # min(t + K, n − 1)
        next_values = values.gather(1, target).masked_fill(pos == last, 0.0)  # R_{n−1} = q_{n−1}
    rewards = (q_taken - next_values) / divisor
    if clip is not None:
        rewards = rewards.clamp(-clip, clip)
    return rewards.masked_fill(~mask, 0.0)


def one_step_rewards(
    teacher_logits: Tensor,
    actions: Tensor,
    mask: Tensor,
    state_value: StateValue = "max",
    center_logits: bool = True,
) -> Tensor:
    """The one-step reward ``r_t = q(s_t, a_t) − V(s_{t+1})`` (``induced_rewards`` with K = 1)."""
    return induced_rewards(
        teacher_logits, actions, mask, k=1, state_value=state_value, center_logits=center_logits
    )


def _strided_reverse_cumsum(rewards: Tensor, k: int) -> Tensor:
    """``out_t = Σ_{j ≥ 0} rewards_{t + jK}`` over the full width (positions ``t = iK + r`` laid out as
    ``[B, ⌈T/K⌉, K]`` and summed from the end along ``i``)."""
    batch, length = rewards.shape
    n_segments = -(-length // k)
    padded = rewards.new_zeros(batch, n_segments * k)
    padded[:, :length] = rewards
    grid = padded.view(batch, n_segments, k)
    return grid.flip(1).cumsum(1).flip(1).reshape(batch, n_segments * k)[:, :length]


def kstep_returns(segment_rewards: Tensor, mask: Tensor, k: int, kstep_tail: KStepTail = "zero") -> Tensor:
    """K-step returns ``G^(K)_t`` ``[B, T]`` (0 on padding), ``n`` = the row's valid length.

    ::

        kstep_tail="zero"        G_t = Σ_{j ≥ 0, t+jK < n} R_{t+jK}                          [reading]
        kstep_tail="last-state"  G_t = Σ_{j ≥ 0, t+jK < n−1} R_{t+jK} + R_{n−1}               [code]

    ``"last-state"`` is ``utils/helper.py`` ``n_step_reward_shift_upgrade`` [code]: for each residue
    ``k`` in ``0..K−1`` it keeps the rewards at ``k::K`` *and* at ``n − 1``, reverse-cumsums them and
    reads the result back at ``k::K`` — so every chain ends with the terminal reward, counted once even
    when the chain itself lands on ``n − 1``; ``G_{n−1} = R_{n−1}``. (Its ``n`` is the padded width;
    here the row's length — identical for the released batch size 1.) At K = 1 both tails are the
    one-step return ``Σ_{i ≥ t} R_i``.

    Vectorised: a strided reverse cumulative sum (``G_t = R_t + G_{t+K}``) over ``[B, ⌈T/K⌉, K]``;
    ``last-state`` runs it on the rewards with ``R_{n−1}`` removed and adds ``R_{n−1}`` to every valid
    position.
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    _check_choice("kstep_tail", kstep_tail, _TAILS)
    mask = mask.bool()
    _check_bt("segment_rewards", segment_rewards, mask)
    rewards = segment_rewards.masked_fill(~mask, 0.0)
    if kstep_tail == "zero":
        returns = _strided_reverse_cumsum(rewards, k)
    else:
        last = _row_lengths(mask) - 1  # −1 for empty rows: never matches a position
        is_last = torch.arange(mask.shape[1], device=mask.device)[None] == last[:, None]
        terminal = rewards.masked_fill(~is_last, 0.0).sum(-1, keepdim=True)  # R_{n−1}
        returns = _strided_reverse_cumsum(rewards.masked_fill(is_last, 0.0), k) + terminal
    return returns.masked_fill(~mask, 0.0)


class KStepReturns(NamedTuple):
    """What ``kstep_returns_from_logits`` returns."""

    rewards: Tensor
    """Segment rewards ``R_t`` ``[B, T]`` (``induced_rewards``)."""
    returns: Tensor
    """K-step returns ``G_t`` ``[B, T]`` (``kstep_returns`` with the same tail)."""


def kstep_returns_from_logits(
    teacher_logits: Tensor,
    actions: Tensor,
    mask: Tensor,
    k: int = 1,
    state_value: StateValue = "max",
    kstep_tail: KStepTail = "zero",
    center_logits: bool = True,
    clip: float | None = None,
    divisor: float = 1.0,
) -> KStepReturns:
    """``induced_rewards`` then ``kstep_returns`` with one ``k`` and one ``kstep_tail`` (so they can't disagree)."""
    rewards = induced_rewards(
        teacher_logits, actions, mask, k=k, state_value=state_value, center_logits=center_logits,
        clip=clip, divisor=divisor, kstep_tail=kstep_tail,
    )
    return KStepReturns(rewards, kstep_returns(rewards, mask, k, kstep_tail))


def length_normalized_returns(returns: Tensor, mask: Tensor) -> Tensor:
    """``G_t / (n − t)``: each return divided by the number of actions it covers, from ``t`` to the
    row's end ``n`` (0 on padding). [reading, after MiniLLM (Gu et al., ICLR 2024), which normalises
    its long-term reward by the remaining length]

    The induced per-token terms ``q(s_i, a_i) − V(s_i)`` are ≤ 0 with ``V = max``, so an unnormalised
    return grows more negative with every token and the policy learns to stop early; the per-token
    mean is meant to weaken that pull. (On the real SmolLM2 pair it did not stop the length collapse:
    docs/real_ketchup.md, the search's ``length-normalised return`` row.)
    """
    mask = mask.bool()
    _check_bt("returns", returns, mask)
    remaining = mask.long().flip(-1).cumsum(-1).flip(-1)  # n − t on valid positions (prefix mask)
    return (returns / remaining.clamp_min(1)).masked_fill(~mask, 0.0)


def one_step_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """The definition ``G_t = Σ_{i ≥ t} r_i`` (undiscounted reverse cumulative sum; 0 on padding)."""
    mask = mask.bool()
    _check_bt("rewards", rewards, mask)
    r = rewards.masked_fill(~mask, 0.0)
    return r.flip(-1).cumsum(-1).flip(-1).masked_fill(~mask, 0.0)


def teacher_expected_baseline(
    teacher_logits: Tensor, mask: Tensor, center_logits: bool = True, divisor: float = 1.0
) -> Tensor:
    """LMReward's baseline ``b_t = Σ_a softmax(q(s_t, ·))_a q(s_t, a) / divisor`` ``[B, T]`` (0 on padding).

    The teacher's expected (centred) value of the *current* state ``s_t`` — the state whose action
    ``a_t`` is scored — from the same teacher logits as the rewards. [code] LMReward ``reinforce.py``
    ``reward_fn``: ``baselines = torch.sum(torch.softmax(logits, dim=-1) * logits, dim=-1)`` (centred
    logits, zeroed on padding), and in ``Trainer.train`` ``rewards = (returns − baselines) / denom``.
    Pass the same ``divisor`` as to ``induced_rewards`` so that ``b`` is on the return's scale.
    Not present in the KETCHUP code.
    """
    if divisor <= 0:
        raise ValueError(f"divisor must be > 0, got {divisor}")
    mask = mask.bool()
    _check_bt("teacher_logits", teacher_logits, mask)
    return (state_values(teacher_logits, "expected", center_logits) / divisor).masked_fill(~mask, 0.0)


def logprob_grad_sq(
    student_logits: Tensor, actions: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """``g_t² = ‖∂ log π(a_t|s_t) / ∂z_t‖²`` ``[B, T]`` w.r.t. the student's logits ``z_t`` (detached; 0 on padding).

    With ``π = softmax(z / τ)``: ``∂ log π_a / ∂z = (onehot(a) − π) / τ``, so
    ``g² = (1 − 2 π_a + Σ_v π_v²) / τ²``. A per-token proxy **[reading]** for the squared norm of the
    parameter gradient that the min-variance baseline ``Σ G g² / Σ g²`` calls for (the gradient w.r.t.
    the last layer's output, no extra backward pass). ``student_logits[b, t]`` predicts ``actions[b, t]``.

    The released KETCHUP code does *not* compute this: its ``g`` is ``lprobs.grad`` after
    ``lprobs.backward(torch.ones_like(lprobs))`` on the gathered log-probabilities ``[B, L]`` — the
    gradient of ``Σ lprobs`` w.r.t. ``lprobs`` itself, i.e. all ones (see ``policy_gradient_loss``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = mask.bool()
    _check_bt("student_logits", student_logits, mask)
    _check_bt("actions", actions, mask)
    with torch.no_grad():
        p = torch.softmax(student_logits.detach().float() / temperature, dim=-1)
        safe_actions = actions.clamp(0, p.shape[-1] - 1)
        p_a = p.gather(-1, safe_actions.unsqueeze(-1)).squeeze(-1)
        g2 = (1.0 - 2.0 * p_a + (p * p).sum(-1)) / (temperature * temperature)
    return g2.masked_fill(~mask, 0.0)


class PolicyGradientOutput(NamedTuple):
    """What ``policy_gradient_loss`` returns: the loss and the statistics a stage logs."""

    loss: Tensor
    """Scalar loss (has grad through ``logprobs``)."""
    advantage_mean: Tensor
    """Mean per-token weight ``w`` (the advantage, for ``logprob``) over valid tokens, before normalisation."""
    advantage_std: Tensor
    """Std of ``w`` over valid tokens, before normalisation; detached."""
    return_mean: Tensor
    """Mean return over valid tokens, detached (feed it to a running-mean baseline)."""


def policy_gradient_loss(
    logprobs: Tensor,
    returns: Tensor,
    mask: Tensor,
    baseline: Baseline = "batch-mean",
    running_mean: Tensor | float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    *,
    pg_weight: PGWeight = "logprob",
    weight_clip: float | None = None,
    grad_sq: Tensor | None = None,
    teacher_baseline: Tensor | None = None,
) -> PolicyGradientOutput:
    """Policy-gradient loss ``− Σ mask·w·log π_θ(a_t|s_t) / Σ mask`` with a per-token weight ``w``.

    ``logprobs`` ``[B, T]`` = ``log π_θ(a_t|s_t)`` of the taken actions (with grad); ``π = exp(logprobs)``
    is used detached. ``G`` = ``returns`` (detached). The weight is built in three steps, each baseline
    acting where its source code puts it (exactly one baseline is active)::

        1. return baselines      A_t = G_t − b_t
             "none", "mean", "min-variance"   b_t = 0 here
             "batch-mean"       b_t = mean_{b : mask[b,t]} G_{b,t}  (per position, over the batch) [reading]
             "running-mean"     b   = running_mean (a scalar the caller keeps, e.g. an EMA of
                                      ``return_mean``; None → this batch's mean return)     [reading]
             "teacher-expected" b_t = teacher_baseline[b, t]  (``teacher_expected_baseline``:
                                      LMReward subtracts it from the return before ρ)        [code]
        2. weight                w_t = A_t                 pg_weight="logprob"  (REINFORCE) [reading]
                                 w_t = clamp(A_t · π(a_t|s_t), −weight_clip, weight_clip)
                                                           pg_weight="student-prob"          [code]
        3. weight baselines      w_t ← w_t − b                                               [code]
             "mean"             b = Σ mask·w / Σ mask              (one scalar)
             "min-variance"     b = Σ mask·w·g² / Σ mask·g²        (g² = grad_sq; None → g² ≡ 1)
        w_t ← (w_t − mean w) / (std w + eps)   if normalize (over valid tokens)            [reading]
        loss = − Σ_{b,t} mask·w·log π(a_t|s_t) / Σ mask

    Defaults (``batch-mean``, ``logprob``) give kdlab's REINFORCE exactly as before. In ``logprob``
    mode steps 1 and 3 coincide (every baseline is "subtracted from G").

    The released KETCHUP estimator [code] ``Mymodel.py`` ``Net.reinforce``::

        returns = returns / denom
        rho = π(a_t|s_t) (softmax of the student's logits, under no_grad)
        rho_returns = clamp(returns * rho, -reward_clip, reward_clip)      # clip on G·π, not on G
        method 'mean':         rho_returns -= rho_returns.mean()           # baseline AFTER ·π and clip
        method 'min-variance': rho_returns -= (rho_returns·grads²).mean() / (grads²).mean()
        loss = (−lprobs · rho_returns).sum() / attention_mask.sum()

    i.e. ``pg_weight="student-prob"``, ``weight_clip=50`` (``--reward_clip`` default 50 in
    ``reinforce.py``), ``baseline="none"`` (``--method`` default ``'None'``; ``reinforce_xsum.sh`` sets
    ``METHOD=None``). Its ``π`` is an importance weight for a greedy behaviour policy (probability 1):
    ``Net.math_generate`` takes but never forwards the script's ``--do_sample --top_k 1``, so rollouts
    use the checkpoint's default generation config (greedy for T5). Details that differ here:

    - ``mean``: the released mean is over all ``[B, L]`` entries (padding counts as 0); here over
      valid tokens (equal for the released batch size 1, which has no padding).
    - ``min-variance``: the released ``grads`` is ``lprobs.grad`` after
      ``lprobs.retain_grad(); lprobs.backward(torch.ones_like(lprobs), retain_graph=True)`` — the
      gradient of ``Σ lprobs`` w.r.t. ``lprobs`` itself, **all ones**, so its baseline equals ``mean``
      (and that extra ``backward`` also accumulates ``∇ Σ log π`` into the parameters' gradients, a side
      effect not reproduced). ``grad_sq=None`` reproduces that value; pass ``logprob_grad_sq(...)`` for
      a per-token gradient-norm proxy [reading].
    - LMReward's ``ρ = π_θ / π_behaviour`` (sampled rollouts) is not modelled: ``student-prob`` assumes
      a greedy behaviour policy.

    Note: with ``batch-mean`` a position that only one sequence reaches gets ``A_t = 0``, so a batch
    of a single sequence gets no gradient — sample several continuations per prompt.
    All-padding input gives a zero loss (still connected to ``logprobs``).

    Args:
        grad_sq: ``[B, T]`` per-token ``g²`` for ``min-variance`` (e.g. ``logprob_grad_sq``); optional.
        teacher_baseline: ``[B, T]`` for ``teacher-expected`` (``teacher_expected_baseline``); required there.
        weight_clip: clip of the ``student-prob`` weight ``A·π`` (released default 50); None = no clip.
            Ignored with ``logprob`` (REINFORCE is never clipped here), so a stage may pass it always.
    """
    _check_choice("baseline", baseline, _BASELINES)
    _check_choice("pg_weight", pg_weight, _PG_WEIGHTS)
    if weight_clip is not None and weight_clip <= 0:
        raise ValueError(f"weight_clip must be > 0 or None, got {weight_clip}")
    mask = mask.bool()
    _check_bt("logprobs", logprobs, mask)
    _check_bt("returns", returns, mask)
    m = mask.float()
    n_valid = m.sum().clamp_min(1.0)
    g = returns.detach().float().masked_fill(~mask, 0.0)
    return_mean = g.sum() / n_valid
    # 1. baselines on the return
    if baseline == "batch-mean":
        per_pos = m.sum(0).clamp_min(1.0)
        b = (g.sum(0) / per_pos).unsqueeze(0).expand_as(g)
    elif baseline == "running-mean":
        rm = return_mean if running_mean is None else torch.as_tensor(running_mean, dtype=g.dtype, device=g.device)
        b = rm.expand_as(g)
    elif baseline == "teacher-expected":
        if teacher_baseline is None:
            raise ValueError(
                "baseline='teacher-expected' needs teacher_baseline [B, T] (see teacher_expected_baseline)"
            )
        _check_bt("teacher_baseline", teacher_baseline, mask)
        b = teacher_baseline.detach().float()
    else:  # none, mean, min-variance
        b = torch.zeros_like(g)
    w = (g - b).masked_fill(~mask, 0.0)
    # 2. the per-token weight
    if pg_weight == "student-prob":
        pi = logprobs.detach().float().masked_fill(~mask, 0.0).exp()
        w = w * pi
        if weight_clip is not None:
            w = w.clamp(-weight_clip, weight_clip)
        w = w.masked_fill(~mask, 0.0)
    # 3. baselines on the weight
    if baseline == "mean":
        w = (w - w.sum() / n_valid).masked_fill(~mask, 0.0)
    elif baseline == "min-variance":
        if grad_sq is None:
            g2 = m
        else:
            _check_bt("grad_sq", grad_sq, mask)
            g2 = grad_sq.detach().float().masked_fill(~mask, 0.0)
        g2_sum = g2.sum()
        mv = torch.where(g2_sum > 0, (w * g2).sum() / g2_sum.clamp_min(1e-30), torch.zeros_like(g2_sum))
        w = (w - mv).masked_fill(~mask, 0.0)
    adv_mean = w.sum() / n_valid
    adv_var = (((w - adv_mean) ** 2) * m).sum() / n_valid
    adv_std = adv_var.sqrt()
    if normalize:
        w = ((w - adv_mean) / (adv_std + eps)).masked_fill(~mask, 0.0)
    loss = -(w * logprobs.float().masked_fill(~mask, 0.0) * m).sum() / n_valid
    return PolicyGradientOutput(loss, adv_mean.detach(), adv_std.detach(), return_mean.detach())
