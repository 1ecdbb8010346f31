"""The estimator of :class:`~kdlab.stages.rl_distill_kstep.RLDistillKStep`: rollouts and teacher /
student logits in, each objective's loss (and the stats the stage logs) out.

What is where, top to bottom:

* :class:`Rollout` and :func:`as_rollout` — continuations of a batch of prompts laid out for
  one-pass scoring (the stage samples them; this module only scores them).
* :func:`action_logits` / :func:`reference_logits` — one forward pass of a student or a teacher,
  decoder-only or encoder-decoder, at the positions that predict a rollout's actions / the
  references' target tokens.
* :func:`pg_loss` — KETCHUP's estimator: teacher-induced rewards → K-step returns → baseline →
  policy gradient (the tensor maths is :mod:`kdlab.losses.returns`).
* :func:`ce_loss`, :func:`kd_loss`, :func:`teacher_sequence_loss`, :func:`divergence_loss` — the
  comparison rows of KETCHUP's table (token losses from :mod:`kdlab.losses.token`);
  :func:`objective_loss` picks one by name.

The objectives see the stage only through :class:`KStepPolicy` (its options, its rollouts, its
scoring), so this module needs no Lightning; the stage keeps sampling, the teacher protocol and the
Lightning hooks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdlab.defaults import IGNORE_INDEX
from kdlab.losses.returns import (
    kstep_returns_from_logits,
    length_normalized_returns,
    normalized_teacher_logits,
    policy_gradient_loss,
    teacher_expected_baseline,
)
from kdlab.losses.token import (
    forward_kl,
    jensen_shannon,
    token_cross_entropy,
    total_variation,
)
from kdlab.models.sampling import left_padded_positions
from kdlab.stages._common import global_token_mean

__all__ = [
    "KStepPolicy",
    "Rollout",
    "action_logits",
    "as_rollout",
    "ce_loss",
    "decoder_start_id",
    "divergence_loss",
    "kd_loss",
    "objective_loss",
    "pg_loss",
    "reference_logits",
    "teacher_sequence_loss",
    "until_first_eos",
]

Batch = Mapping[str, Any]
LossAndStats = tuple[Tensor, dict[str, Tensor]]


# ---------------------------------------------------------------------- rollout layout
@dataclass
class Rollout:
    """Sampled (or greedy) continuations of a batch of prompts, laid out for one-pass scoring.

    ``full_ids = prompt_ids ⊕ actions`` (prompt left-padded), ``full_mask`` its attention mask;
    ``actions[:, t]`` is predicted by position ``prompt_len − 1 + t`` of a causal model on ``full_ids``.
    For encoder-decoder students ``decoder_ids = [start] ⊕ actions``.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    actions: Tensor
    action_mask: Tensor
    full_ids: Tensor
    full_mask: Tensor
    position_ids: Tensor
    decoder_ids: Tensor | None
    seconds: float

    @property
    def num_generated(self) -> int:
        """Valid generated tokens (up to and including EOS)."""
        return int(self.action_mask.sum().item())


def decoder_start_id(model: nn.Module, pad_id: int) -> int:
    """The token an encoder-decoder starts decoding from (T5: the pad token)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    return int(start) if start is not None else pad_id


def until_first_eos(tokens: Tensor, eos_ids: list[int]) -> Tensor:
    """Bool mask of tokens up to and including the first EOS of each row (all True if none)."""
    if not eos_ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    seen_before = is_eos.long().cumsum(-1) - is_eos.long()
    return seen_before == 0


def as_rollout(prompt_ids: Tensor, prompt_mask: Tensor, actions: Tensor, eos_ids: list[int], decoder_start: int | None,
               decoder_ids: Tensor | None = None, seconds: float = 0.0) -> Rollout:
    """Lay out continuations ``actions`` of left-padded prompts for one-pass scoring: mask up to and
    including each row's first EOS; with ``decoder_start`` (an encoder-decoder student) and no
    ``decoder_ids`` given, ``decoder_ids = [decoder_start] ⊕ actions``."""
    action_mask = until_first_eos(actions, eos_ids)
    if decoder_start is not None and decoder_ids is None:
        start = torch.full_like(actions[:, :1], decoder_start)
        decoder_ids = torch.cat([start, actions], dim=1)
    full_ids = torch.cat([prompt_ids, actions], dim=1)
    full_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
    return Rollout(
        prompt_ids, prompt_mask, actions, action_mask, full_ids, full_mask, left_padded_positions(full_mask), decoder_ids, seconds
    )


# ---------------------------------------------------------------------- scoring (one forward pass)
def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _causal_action_logits(model: nn.Module, ro: Rollout, device: torch.device) -> Tensor:
    """Logits ``[B, N, V]`` of a causal LM at the positions predicting each action (one pass)."""
    n = ro.actions.shape[1]
    model_device = next(model.parameters()).device
    out = model(
        input_ids=ro.full_ids.to(model_device),
        attention_mask=ro.full_mask.to(model_device),
        position_ids=ro.position_ids.to(model_device),
        logits_to_keep=n + 1,
        use_cache=False,
    )
    return out.logits[:, :-1].to(device)


def _seq2seq_action_logits(model: nn.Module, ro: Rollout, pad_id: int, device: torch.device) -> Tensor:
    """Logits ``[B, N, V]`` of an encoder-decoder reading the prompt and decoding ``[start] ⊕ actions``."""
    model_device = next(model.parameters()).device
    start = torch.full_like(ro.actions[:, :1], decoder_start_id(model, pad_id))
    decoder_ids = torch.cat([start, ro.actions[:, :-1]], dim=1)
    dec_mask = torch.cat([torch.ones_like(ro.action_mask[:, :1]), ro.action_mask[:, :-1]], dim=1).long()
    return model(
        input_ids=ro.prompt_ids.to(model_device), attention_mask=ro.prompt_mask.to(model_device),
        decoder_input_ids=decoder_ids.to(model_device), decoder_attention_mask=dec_mask.to(model_device), use_cache=False,
    ).logits.to(device)


def action_logits(model: nn.Module, ro: Rollout, pad_id: int, device: torch.device) -> Tensor:
    """Logits ``[B, N, V]`` on ``device`` predicting each action of ``ro``, for a decoder-only model
    (reading prompt ⊕ actions) or an encoder-decoder one (encoding the prompt)."""
    if _is_encoder_decoder(model):
        return _seq2seq_action_logits(model, ro, pad_id, device)
    return _causal_action_logits(model, ro, device)


def _pack_index(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Indices that move each row's valid positions to the front (order kept), and the packed mask."""
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    counts = valid.sum(-1)
    length = max(int(counts.max().item()) if valid.numel() else 0, 1)
    index = order[:, :length]
    packed_mask = torch.arange(length, device=valid.device)[None, :] < counts[:, None]
    return index, packed_mask


def reference_logits(model: nn.Module, batch: Batch, pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Packed logits ``[B, L, V]`` at the reference target positions, targets ``[B, L]``, mask ``[B, L]``.

    Causal models read ``input_ids`` (prompt ⊕ target) and predict ``labels[:, 1:]``; encoder-decoder
    models (student or teacher) encode ``prompt_input_ids`` and decode the packed targets.
    """
    labels = batch["labels"]
    valid = labels[:, 1:] != IGNORE_INDEX
    index, packed_mask = _pack_index(valid)
    targets = labels[:, 1:].gather(1, index).masked_fill(~packed_mask, IGNORE_INDEX)
    if _is_encoder_decoder(model):
        model_device = next(model.parameters()).device
        start = torch.full_like(targets[:, :1], decoder_start_id(model, pad_id))
        dec_in = torch.cat([start, targets[:, :-1].masked_fill(~packed_mask[:, :-1], pad_id)], dim=1)
        logits = model(
            input_ids=batch["prompt_input_ids"].to(model_device),
            attention_mask=batch["prompt_attention_mask"].to(model_device),
            decoder_input_ids=dec_in.to(model_device), decoder_attention_mask=torch.cat(
                [torch.ones_like(packed_mask[:, :1]), packed_mask[:, :-1]], dim=1).long().to(model_device),
            use_cache=False,
        ).logits.to(device)
    else:
        model_device = next(model.parameters()).device
        mask = batch["attention_mask"]
        logits = model(
            input_ids=batch["input_ids"].to(model_device), attention_mask=mask.to(model_device), use_cache=False,
        ).logits[:, :-1].to(device)
        logits = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    return logits, targets, packed_mask


# ---------------------------------------------------------------------- the objectives
class KStepPolicy(Protocol):
    """What the objectives read from the stage (:class:`~kdlab.stages.rl_distill_kstep.RLDistillKStep`)."""

    student: nn.Module
    pad_id: int
    return_running_mean: Tensor

    @property
    def hparams(self) -> Any: ...

    @property
    def device(self) -> torch.device: ...

    def rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, greedy: bool = False,
                max_new_tokens: int | None = None) -> Rollout: ...

    def teacher_rollout(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Rollout: ...

    def require_teacher(self) -> nn.Module: ...

    def student_action_logits(self, ro: Rollout) -> Tensor: ...

    def student_action_logprobs(self, ro: Rollout, logits: Tensor | None = None) -> Tensor: ...

    def teacher_action_logits(self, ro: Rollout) -> Tensor: ...

    def start_policy_action_logits(self, ro: Rollout) -> Tensor: ...


def _token_mean(stage: KStepPolicy, total: Tensor, count: Tensor, across_ranks: bool) -> Tensor:
    return global_token_mean(stage, total, count) if across_ranks else total / count.clamp(min=1)


def pg_loss(stage: KStepPolicy, batch: Batch) -> LossAndStats:
    """KETCHUP's estimator on fresh rollouts of the batch's prompts (``objective="pg"``)::

        y ~ π_θ(· | x)                       stage.rollout (sampled, or greedy with greedy_rollouts)
        q = normalized_teacher_logits(teacher logits, teacher_logit_normalization)   (one pass)
        R^(K)_t = q(s_t,a_t) − V(s_{t+K})    kstep_returns_from_logits
        G^(K)_t = Σ_j R^(K)_{t+jK}          (÷ (n − t) with return_normalization="length")
        loss = − mean_t w_t · log π_θ(a_t | s_t)    policy_gradient_loss (baseline, pg_weight, clip)
             + β_T · mean_t KL(p_T(·|s_t) ‖ π_θ(·|s_t))     teacher_kl_weight     [reading: GKD, on-policy]
             + β_0 · mean_t KL(π_θ(·|s_t) ‖ π_0(·|s_t))     start_kl_weight       [reading: TRL's reference KL]

    The KL terms use the untempered logits over the whole vocabulary on the rollout's valid
    positions (exact, not the sampled ``log π_θ − log π_0`` estimate PPO puts in its reward).

    Stats: reward / return / log-prob means, the PG loss, the advantages' std, rollout length and
    speed, and each KL term that is on.
    """
    hp = stage.hparams
    for key in ("prompt_input_ids", "prompt_attention_mask"):
        if key not in batch:
            raise KeyError(f"objective 'pg' needs {key!r} in the batch (use kdlab.data.Seq2SeqDataModule)")
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=hp.greedy_rollouts)
    t_logits = stage.teacher_action_logits(ro)
    q_logits = normalized_teacher_logits(t_logits, hp.teacher_logit_normalization)
    rewards, returns = kstep_returns_from_logits(
        q_logits, ro.actions, ro.action_mask, k=hp.k, state_value=hp.state_value, kstep_tail=hp.kstep_tail,
        center_logits=hp.center_logits, clip=hp.reward_clip, divisor=hp.reward_divisor,
    )
    if hp.return_normalization == "length":
        returns = length_normalized_returns(returns, ro.action_mask)
    running = None if torch.isnan(stage.return_running_mean) else stage.return_running_mean
    s_logits = stage.student_action_logits(ro)
    logprobs = stage.student_action_logprobs(ro, s_logits)
    teacher_baseline = None
    if hp.baseline == "teacher-expected":
        teacher_baseline = teacher_expected_baseline(q_logits, ro.action_mask, hp.center_logits, divisor=hp.reward_divisor)
    # min-variance: grad_sq=None is the released code's (its per-token g is all ones).
    out = policy_gradient_loss(
        logprobs, returns, ro.action_mask, hp.baseline, running, hp.normalize_advantages,
        pg_weight=hp.pg_weight, weight_clip=hp.weight_clip, teacher_baseline=teacher_baseline,
    )
    loss = out.loss
    n_valid = ro.action_mask.sum().clamp_min(1)
    kl_stats: dict[str, Tensor] = {}
    if hp.teacher_kl_weight > 0:
        teacher_kl = _token_mean(stage, *forward_kl(s_logits, t_logits, ro.action_mask), False)
        loss = loss + hp.teacher_kl_weight * teacher_kl
        kl_stats["teacher_kl"] = teacher_kl.detach()
    if hp.start_kl_weight > 0:
        # KL(π_θ ‖ π_0) is forward_kl with π_θ in the "teacher" slot: Σ π_θ (log π_θ − log π_0).
        start_kl = _token_mean(stage, *forward_kl(stage.start_policy_action_logits(ro), s_logits, ro.action_mask), False)
        loss = loss + hp.start_kl_weight * start_kl
        kl_stats["start_kl"] = start_kl.detach()
    stats = {
        "reward_mean": rewards.sum() / n_valid,
        "return_mean": out.return_mean,
        "pg_loss": out.loss.detach(),
        "advantage_std": out.advantage_std,
        "gen_length": ro.action_mask.sum(-1).float().mean(),
        "gen_tokens_per_s": torch.tensor(ro.num_generated / max(ro.seconds, 1e-9)),
        "logprob_mean": (logprobs.detach().sum() / n_valid),
        **kl_stats,
    }
    return loss, stats


def ce_loss(stage: KStepPolicy, batch: Batch, across_ranks: bool = False) -> LossAndStats:
    """Teacher-forced cross-entropy on the references: ``− mean_t log p_θ(y_t | x, y_<t)``
    (the mean over the global batch's target tokens when ``across_ranks``)."""
    logits, targets, _ = reference_logits(stage.student, batch, stage.pad_id, stage.device)
    loss = _token_mean(stage, *token_cross_entropy(logits, targets), across_ranks)
    return loss, {"ce_loss": loss.detach()}


def kd_loss(stage: KStepPolicy, batch: Batch, across_ranks: bool = False) -> LossAndStats:
    """Token-level forward KL on the references (:func:`kdlab.losses.token.forward_kl`)::

        loss = τ² · mean_t Σ_v p_T^τ(v) (log p_T^τ(v) − log p_S^τ(v)),  p^τ = softmax(logits / τ)
    """
    tau = stage.hparams.kd_temperature
    s_logits, _, mask = reference_logits(stage.student, batch, stage.pad_id, stage.device)
    with torch.no_grad():
        t_logits, _, _ = reference_logits(stage.require_teacher(), batch, stage.pad_id, stage.device)
    loss = tau**2 * _token_mean(stage, *forward_kl(s_logits, t_logits, mask, tau), across_ranks)
    return loss, {"kd_loss": loss.detach()}


def teacher_sequence_loss(stage: KStepPolicy, batch: Batch) -> LossAndStats:
    """SeqKD and KL: the student trained on the teacher's own (greedy, cached) outputs.

    ::

        seqkd: loss = − mean_t log p_θ(ŷ_t | x, ŷ_<t)                       ŷ = teacher's greedy output
        kl:    loss = τ² · mean_t KL(p_T^τ(· | x, ŷ_<t) ‖ p_θ^τ(· | x, ŷ_<t))

    (KETCHUP's SeqKD and KL rows [code: distill.py]; ``kd`` is the same KL on the references.)
    """
    ro = stage.teacher_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    s_logits = stage.student_action_logits(ro)
    stats = {"teacher_gen_length": ro.action_mask.sum(-1).float().mean()}
    if stage.hparams.objective == "seqkd":
        targets = ro.actions.masked_fill(~ro.action_mask, IGNORE_INDEX)
        loss = _token_mean(stage, *token_cross_entropy(s_logits, targets), False)
        return loss, {"seqkd_loss": loss.detach(), **stats}
    tau = stage.hparams.kd_temperature
    loss = tau**2 * _token_mean(stage, *forward_kl(s_logits, stage.teacher_action_logits(ro), ro.action_mask, tau), False)
    return loss, {"kl_loss": loss.detach(), **stats}


def divergence_loss(stage: KStepPolicy, batch: Batch) -> LossAndStats:
    """TVD and JS on the student's own rollouts and on the teacher's greedy outputs, averaged
    (as the released code's ``TVD`` / ``JS``, ``utils/distillation.py`` [code])::

        loss = ½ mean_t D(p_θ, p_T | student's sequence) + ½ mean_t D(p_θ, p_T | teacher's sequence)

    with ``D`` = :func:`~kdlab.losses.token.total_variation` or
    :func:`~kdlab.losses.token.jensen_shannon` (β = ``js_beta``, ``js_terms``).
    """
    hp = stage.hparams
    prompts = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    rollouts = (stage.rollout(*prompts, greedy=hp.greedy_rollouts), stage.teacher_rollout(*prompts))
    parts = []
    for ro in rollouts:
        s_logits, t_logits = stage.student_action_logits(ro), stage.teacher_action_logits(ro)
        if hp.objective == "tvd":
            parts.append(_token_mean(stage, *total_variation(s_logits, t_logits, ro.action_mask), False))
        else:
            parts.append(_token_mean(stage, *jensen_shannon(s_logits, t_logits, ro.action_mask, hp.js_beta, hp.js_terms),
                                     False))
    loss = 0.5 * (parts[0] + parts[1])
    return loss, {f"{hp.objective}_loss": loss.detach(), f"{hp.objective}_student_seq": parts[0].detach(),
                  f"{hp.objective}_teacher_seq": parts[1].detach(),
                  "gen_length": rollouts[0].action_mask.sum(-1).float().mean()}


def objective_loss(stage: KStepPolicy, objective: str, batch: Batch, across_ranks: bool = False) -> LossAndStats:
    """The loss of ``objective`` (one of the stage's ``objective`` values) on ``batch``, and its stats.
    ``across_ranks``: CE/KD token means over the global batch under DDP (training step only; PG and
    the teacher-sequence objectives keep per-rank means: their rollouts differ per rank anyway)."""
    if objective == "pg":
        return pg_loss(stage, batch)
    if objective == "kd":
        return kd_loss(stage, batch, across_ranks)
    if objective in ("seqkd", "kl"):
        return teacher_sequence_loss(stage, batch)
    if objective in ("tvd", "js"):
        return divergence_loss(stage, batch)
    return ce_loss(stage, batch, across_ranks)
