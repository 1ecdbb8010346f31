"""RLDistillKStep — KETCHUP: on-policy rollouts, teacher-induced rewards, K-step returns, policy gradient.

One training step (``objective="pg"``)::

    y ~ π_θ(· | x)  (or greedy)         student rollouts (KV cache, no grad, left-padded x)
    q = teacher(x, y)                   one teacher forward pass over the continuation (no grad)
    R^(K)_t = q(s_t,a_t) − V(s_{t+K})   induced K-step segment rewards     (kdlab.losses.returns)
    G^(K)_t = Σ_j R^(K)_{t+jK}          K-step returns (tail: kdlab's ``zero`` or the released ``last-state``)
    loss = − mean_t w_t · log π_θ(a_t | s_t)    w_t = G_t − b_t (REINFORCE) or clip(G_t·π_θ(a_t|s_t)) (released)

The released code's estimator is the option set ``greedy_rollouts=true, kstep_tail=last-state,
pg_weight=student-prob, weight_clip=50, baseline=none, state_value=max``
(``experiments/ketchup/xsum_flan_t5.yaml``); the defaults are kdlab's reading (sampled rollouts,
``zero`` tail, REINFORCE, per-position batch-mean baseline). The rows of the paper's table are
objectives of the same stage: ``ce`` / ``kd`` on the references, ``seqkd`` / ``kl`` on the
teacher's greedy outputs (cached per prompt), ``tvd`` / ``js`` on the student's and the teacher's
sequences, ``pg`` with K = 1 (LLMR) and K > 1 (KETCHUP). ``ce_warmup_steps`` runs CE for the first
optimiser steps of ``pg`` (an objective schedule; ``warmup_steps`` is the learning-rate warmup).

Students and teachers are decoder-only (``prompt ⊕ continuation``) or encoder-decoder (T5 /
Flan-T5: the prompt encoded, the continuation decoded), in any combination; they must share a
vocabulary (checked in :meth:`attach_teacher`).

This file is the LightningModule: options, rollouts (sampling), the teacher protocol, the Lightning
hooks and export. The estimator — rollout layout, scoring, and each objective's loss from the
rollouts and the teacher / student logits — is :mod:`kdlab.stages.kstep_estimator`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from kdlab.errors import ConfigError
from kdlab.metrics.generation import TaskMetrics, resolve_val_metric
from kdlab.models.backbones import load_generation_model, pad_token_id
from kdlab.models.sampling import generation_logits_processors, sample_causal
from kdlab.models.served import save_served_model
from kdlab.protocols import attach_unregistered, is_sharded_strategy
from kdlab.stages._common import build_optimizer
from kdlab.stages.kstep_estimator import (
    Rollout,
    action_logits,
    as_rollout,
    decoder_start_id,
    objective_loss,
    until_first_eos,
)

__all__ = ["RLDistillKStep", "Rollout"]


def _output_vocab_size(model: nn.Module) -> int:
    """Rows of the LM head = width of the logits (what rewards index by token id)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _model_name(model: nn.Module) -> str:
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


class RLDistillKStep(L.LightningModule):
    """KETCHUP distillation of a generation teacher into a student by K-step-return policy gradient.

    Args:
        backbone: the student (``tiny-llama``, alias, local dir, hub id; a directory whose config is
            encoder-decoder loads as ``AutoModelForSeq2SeqLM``).
        backbone_config: tiny-model config overrides / pretrained config attribute overrides.
        backbone_keep_layers: build the student from ``backbone`` read as a causal-LM *teacher*,
            keeping these layer indices (or ``"every-other"``; DistilBERT-style init, same vocabulary)
            with :func:`kdlab.models.backbones.build_student_from_teacher`. ``None``: load as is.
        tokenizer: tokenizer name (default: the student's). Must equal the data module's ``tokenizer``
            (Lightning merges both hparams and refuses differing values).
        k: segment length K of the K-step return (K = 1: one-step RL-KD of Hao et al.).
        objective: the rows of KETCHUP's table as one stage: ``pg`` (policy gradient on teacher-induced
            K-step returns: LLMR with K = 1, KETCHUP with K > 1), ``ce`` (teacher-forced CE on the
            references), ``kd`` (forward KL on the references), ``seqkd`` (CE on the teacher's greedy
            outputs), ``kl`` (forward KL on the teacher's outputs), ``tvd`` / ``js`` (total variation /
            Jensen–Shannon on the student's and the teacher's sequences, averaged). The teacher's
            outputs are generated once per prompt and cached.
        state_value: ``V(s)`` of the induced reward: ``max`` (Bellman optimality; paper and released
            code), ``expected`` (``Σ_a softmax(q)_a q``, LMReward's option), ``logsumexp`` (soft, [reading]).
        kstep_tail: ``zero`` (V = 0 past the last action; kdlab's reading) or ``last-state`` (the
            released code: chains reaching the end take the last state's value and every chain ends
            with the terminal reward). See :mod:`kdlab.losses.returns`.
        center_logits: centre teacher logits over the vocabulary before inducing rewards (LMReward).
        teacher_logit_normalization: per-token scale of ``q`` (and so of ``V``) before rewards are
            induced ([reading]): ``none`` (both codes), ``token-std`` (``q ← (q − mean) / std`` over
            the vocabulary at each position), ``log-softmax`` (``q ← log p_T``; with
            ``state_value=logsumexp`` then ``V = 0`` and the return is the teacher's log-likelihood
            of the rest of the sequence; needs ``center_logits: false``, which would undo it).
            See :func:`~kdlab.losses.returns.normalized_teacher_logits`.
        return_normalization: ``none`` (the paper) or ``length``: each return divided by the number
            of actions it covers, ``G_t / (n − t)`` (MiniLLM's length normalisation [reading]): with
            ``V = max`` every later token adds a term ≤ 0, so raw returns reward stopping early
            (it did not prevent that on the real-weight search, docs/real_ketchup.md).
            See :func:`~kdlab.losses.returns.length_normalized_returns`.
        teacher_kl_weight: β_T of an on-policy teacher-KL term added to ``pg``:
            ``+ β_T · mean_t KL(p_T(·|s_t) ‖ π_θ(·|s_t))`` on the student's rollouts (GKD's
            on-policy forward KL, λ = 1 [reading]). 0 = off (the paper).
        start_kl_weight: β_0 of a KL-to-the-start-policy term added to ``pg``:
            ``+ β_0 · mean_t KL(π_θ(·|s_t) ‖ π_0(·|s_t))`` with π_0 a frozen copy of the student
            as loaded (the reference policy of TRL's PPO/GRPO, exact over the vocabulary instead of
            sampled [reading]). 0 = off (the paper); > 0 keeps one more student copy in memory.
        reward_clip / reward_divisor: ``R ← clamp(R / divisor, ±clip)`` (the divisor is the released
            code's ``denom``; this clip of the step reward is kdlab's own — the released code clips the
            weight ``G·π``, see ``weight_clip``).
        pg_weight: ``logprob`` (REINFORCE, ``A_t ∇ log π``; ours) or ``student-prob`` (the released
            code: ``clip(G_t · π_θ(a_t|s_t), ±weight_clip) ∇ log π``, its ``mean`` / ``min-variance``
            baselines subtracted after the clip, see :func:`~kdlab.losses.returns.policy_gradient_loss`).
        weight_clip: the clip of ``student-prob`` (released default 50; None = none; unused by ``logprob``).
        baseline: ``none`` (released default) | ``mean`` (one scalar per batch) | ``min-variance``
            (released option; as released its per-token gradient is all ones, so it equals ``mean``) |
            ``batch-mean`` (per position; ours) | ``teacher-expected`` (LMReward's:
            ``Σ_a softmax(q)_a q(s_t, a)``) | ``running-mean`` (EMA of the mean return).
        running_mean_momentum: EMA momentum m: ``b ← m·b + (1 − m)·mean(G)``.
        normalize_advantages: whiten advantages over the batch's valid tokens.
        greedy_rollouts: roll out the student greedily (the released script: ``--do_sample --top_k 1``)
            instead of sampling with ``temperature`` / ``top_k`` / ``top_p``.
        temperature / top_k / top_p: sampling; defaults (1, 0 = off, 1.0 = off) sample from π_θ itself.
            The log-probs of the PG loss use ``logits / temperature`` (the policy that sampled).
        max_new_tokens: continuation budget (training and validation).
        num_samples_per_prompt: continuations per prompt (each prompt repeated n times).
        ce_warmup_steps: optimiser steps of CE on references before PG starts (``pg`` only).
        kd_temperature: τ of the ``kd`` and ``kl`` objectives, ``loss = τ² · KL(p_T^τ ‖ p_S^τ)``.
        js_beta / js_terms: the ``js`` objective's mixture weight and form (``both`` = the symmetric
            divergence, ``student`` = the released code's ``KL(p_S ‖ m)``).
        val_metric: the validation metric that picks the best checkpoint: ``rouge1`` (XSum in the
            paper), ``rouge2``, ``rougeL``, ``bleu`` (sacreBLEU BLEU-4, translation) or ``accuracy``
            (final-number answer accuracy, GSM8K).
        lr, weight_decay, warmup_steps: AdamW (decay on every parameter) + linear learning-rate
            warmup, through the stages' shared optimizer builder.
        generation_kwargs: extra ``generate`` kwargs (e.g. ``repetition_penalty``) for training rollouts.
        sampler: ``kdlab`` — :func:`kdlab.models.sampling.sample_causal`, a lean KV-cache loop with
            inverse-CDF draws (same distribution as ``generate``, greedy identical, faster per token)
            for decoder-only students sampling with temperature only. ``generate`` is still used for
            encoder-decoder students, ``top_k`` / ``top_p``, ``generation_kwargs``, a student whose
            own ``generation_config`` sets a logits processor (e.g. ``repetition_penalty``, which
            ``generate`` would apply), and sharded strategies (FSDP/DeepSpeed: ``generate`` keeps
            the ranks in lock step). ``hf-generate``: always HF ``generate`` (HF's sampling stream).
        eos_token_ids: the tokens that end a continuation (chat models often have several, e.g.
            ``<|im_end|>`` and ``</s>``); None: the tokenizer's EOS (else the student config's).
        teacher_for_eval: with ``objective="ce"``, still ask for a teacher to report
            ``val/teacher_logprob`` (pg/kd always need one).
        dtype: student dtype.
    """

    @classmethod
    def check_options(cls, init_args: Mapping[str, Any]) -> None:
        """Config-time checks of the options alone (:class:`kdlab.protocols.ChecksData`), before any
        weights load: one-line :class:`~kdlab.errors.ConfigError` for ``k < 1`` and the like."""
        k, temperature = init_args.get("k", 1), init_args.get("temperature", 1.0)
        samples = init_args.get("num_samples_per_prompt", 1)
        if k is None or k < 1:
            raise ConfigError(f"model.init_args.k: the K-step segment length must be >= 1, got {k}")
        if temperature is None or not temperature > 0:
            raise ConfigError(f"model.init_args.temperature: expected > 0, got {temperature}")
        if samples is None or samples < 1:
            raise ConfigError(f"model.init_args.num_samples_per_prompt: expected >= 1, got {samples}")
        for name in ("weight_clip", "reward_clip"):
            value = init_args.get(name)
            if value is not None and not value > 0:
                raise ConfigError(f"model.init_args.{name}: expected > 0 or null (no clip), got {value}")
        divisor = init_args.get("reward_divisor", 1.0)
        if divisor is None or not divisor > 0:
            raise ConfigError(f"model.init_args.reward_divisor: expected > 0, got {divisor}")
        if init_args.get("teacher_logit_normalization") == "log-softmax" and init_args.get("center_logits", True):
            raise ConfigError("model.init_args.teacher_logit_normalization: log-softmax needs center_logits: false "
                              "(centring log p_T over the vocabulary gives back the centred logits)")
        for name in ("teacher_kl_weight", "start_kl_weight"):
            value = init_args.get(name, 0.0)
            if value is None or not value >= 0:
                raise ConfigError(f"model.init_args.{name}: expected a weight >= 0 (0 = off), got {value}")
        beta = init_args.get("js_beta", 0.5)
        if beta is None or not 0 < beta < 1:
            raise ConfigError(f"model.init_args.js_beta: the JS mixture weight must be in (0, 1), got {beta}")

    def __init__(
        self,
        backbone: str = "tiny-llama",
        backbone_config: dict[str, Any] | None = None,
        backbone_keep_layers: list[int] | Literal["every-other"] | None = None,
        tokenizer: str | None = None,
        k: int = 1,
        objective: Literal["pg", "ce", "kd", "seqkd", "kl", "tvd", "js"] = "pg",
        state_value: Literal["max", "expected", "logsumexp"] = "max",
        kstep_tail: Literal["zero", "last-state"] = "zero",
        center_logits: bool = True,
        reward_clip: float | None = None,
        reward_divisor: float = 1.0,
        teacher_logit_normalization: Literal["none", "token-std", "log-softmax"] = "none",
        teacher_kl_weight: float = 0.0,
        start_kl_weight: float = 0.0,
        return_normalization: Literal["none", "length"] = "none",
        pg_weight: Literal["logprob", "student-prob"] = "logprob",
        weight_clip: float | None = 50.0,
        baseline: Literal["none", "mean", "min-variance", "batch-mean", "teacher-expected", "running-mean"] = "batch-mean",
        running_mean_momentum: float = 0.9,
        normalize_advantages: bool = False,
        greedy_rollouts: bool = False,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples_per_prompt: int = 1,
        ce_warmup_steps: int = 0,
        kd_temperature: float = 1.0,
        js_beta: float = 0.5,
        js_terms: Literal["both", "student"] = "both",
        val_metric: Literal["rouge1", "rouge2", "rougeL", "bleu", "accuracy"] = "rougeL",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        generation_kwargs: dict[str, Any] | None = None,
        sampler: Literal["kdlab", "hf-generate"] = "kdlab",
        eos_token_ids: list[int] | None = None,
        teacher_for_eval: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.check_options({"k": k, "temperature": temperature, "num_samples_per_prompt": num_samples_per_prompt,
                            "weight_clip": weight_clip, "reward_clip": reward_clip, "reward_divisor": reward_divisor,
                            "js_beta": js_beta, "teacher_kl_weight": teacher_kl_weight,
                            "start_kl_weight": start_kl_weight, "center_logits": center_logits,
                            "teacher_logit_normalization": teacher_logit_normalization})
        # Recorded resolved (save_hyperparameters reads the locals): Lightning refuses a data module
        # whose ``tokenizer`` hparam differs, which also catches stage and data tokenising differently.
        tokenizer = tokenizer or backbone
        self.save_hyperparameters()
        from kdlab.models.backbones import load_tokenizer

        if backbone_keep_layers is None:
            self.student = load_generation_model(backbone, backbone_config, dtype)
        else:
            from kdlab.models.backbones import build_student_from_teacher

            self.student = build_student_from_teacher(backbone, backbone_keep_layers, dtype=dtype,
                                                      config=backbone_config)
            self.student.train()
        self.tokenizer = load_tokenizer(tokenizer)
        self.is_encoder_decoder = bool(getattr(self.student.config, "is_encoder_decoder", False))
        self.needs_teacher: bool = objective != "ce" or teacher_for_eval
        self._teacher_outputs: dict[tuple[int, ...], Tensor] = {}  # prompt ids → the teacher's greedy output
        attach_unregistered(self, "teacher", None)
        # π_0 is the student as loaded here: on resume __init__ reloads the same start weights, so
        # it stays out of the checkpoint (unregistered) and is still the start, not the resumed policy.
        start = copy.deepcopy(self.student).eval().requires_grad_(False) if start_kl_weight > 0 else None
        attach_unregistered(self, "start_policy", start)
        self.register_buffer("return_running_mean", torch.tensor(float("nan")), persistent=True)
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.student.config.eos_token_id
        if eos_token_ids is not None:
            eos = eos_token_ids
        self._eos_ids: list[int] = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [int(eos)])
        self.pad_id: int = pad_token_id(self.tokenizer)
        self.val_metrics = TaskMetrics()
        key, mode = resolve_val_metric(val_metric)
        self.main_metric: tuple[str, str] = (f"val/{key}", mode)  # the best checkpoint's
        self.test_metrics = TaskMetrics()
        self._eval_rows: list[dict[str, Any]] = []  # this evaluation's examples, written at its end

    # ------------------------------------------------------------------ teacher protocol
    def attach_teacher(self, teacher: nn.Module) -> None:
        """Keep the frozen ``teacher`` unregistered (never a submodule / in a checkpoint) after
        checking that it scores the student's vocabulary.

        Rewards index the teacher's logits by the student's token ids, so the logit widths and
        ``config.vocab_size`` must match.
        """
        from kdlab.models.backbones import VocabularyMismatchError

        t_head, s_head = _output_vocab_size(teacher), _output_vocab_size(self.student)
        t_cfg = getattr(getattr(teacher, "config", None), "vocab_size", t_head)
        s_cfg = getattr(self.student.config, "vocab_size", s_head)
        if t_head != s_head or t_cfg != s_cfg:
            raise VocabularyMismatchError(
                f"teacher and student vocabularies differ: teacher {_model_name(teacher)!r} has vocab_size "
                f"{t_cfg} (logits {t_head}), student {_model_name(self.student)!r} has vocab_size {s_cfg} "
                f"(logits {s_head}); RLDistillKStep scores the student's tokens with the teacher's logits, "
                "so both must use the same tokenizer"
            )
        attach_unregistered(self, "teacher", teacher)

    def require_teacher(self) -> nn.Module:
        """The attached teacher; a RuntimeError that says how to configure one if there is none."""
        teacher = getattr(self, "teacher", None)
        if teacher is None:
            raise RuntimeError(
                f"RLDistillKStep(objective={self.hparams.objective!r}) needs a teacher: configure it under "
                "`teacher:` (e.g. --teacher.backbone=DIR) or call attach_teacher()"
            )
        return teacher

    # ------------------------------------------------------------------ rollouts
    def _generation_config(self, greedy: bool, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        hp = self.hparams
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.pad_id,
            "eos_token_id": self._eos_ids or None,
            "use_cache": True,
        }
        if self.is_encoder_decoder:
            start = self.student.config.decoder_start_token_id
            kwargs["decoder_start_token_id"] = start if start is not None else self.pad_id
        if greedy:
            kwargs.update(do_sample=False, num_beams=1)
        else:
            kwargs.update(do_sample=True, temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
            kwargs.update(hp.generation_kwargs or {})
        return GenerationConfig(**kwargs)

    def _uses_kdlab_sampler(self, greedy: bool) -> bool:
        hp = self.hparams
        if hp.sampler != "kdlab" or self.is_encoder_decoder or generation_logits_processors(self.student):
            return False
        trainer = self._trainer  # None outside a Trainer (tests, the benchmark)
        if trainer is not None and is_sharded_strategy(trainer.strategy):
            return False
        return greedy or (hp.top_k == 0 and hp.top_p >= 1.0 and not hp.generation_kwargs)

    @torch.no_grad()
    def rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, greedy: bool = False, max_new_tokens: int | None = None) -> Rollout:
        """Generate continuations of left-padded prompts (KV cache, no grad; student in eval mode
        during generation, mode restored) and lay them out for scoring."""
        n = 1 if greedy else self.hparams.num_samples_per_prompt
        if n > 1:
            prompt_ids = prompt_ids.repeat_interleave(n, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(n, dim=0)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device).long()
        was_training = self.student.training
        self.student.eval()
        budget = max_new_tokens or self.hparams.max_new_tokens
        start = time.perf_counter()
        try:
            decoder_ids: Tensor | None = None
            if self._uses_kdlab_sampler(greedy):
                actions = sample_causal(
                    self.student, prompt_ids, prompt_mask, budget, self._eos_ids, self.pad_id,
                    temperature=self.hparams.temperature, greedy=greedy,
                )
            else:
                out = self.student.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask,
                    generation_config=self._generation_config(greedy, budget),
                )
                if self.is_encoder_decoder:
                    decoder_ids, actions = out, out[:, 1:]
                else:
                    actions = out[:, prompt_ids.shape[1]:]
        finally:
            self.student.train(was_training)
        if prompt_ids.is_cuda:
            torch.cuda.synchronize(prompt_ids.device)  # time the queued kernels too
        return self._as_rollout(prompt_ids, prompt_mask, actions, decoder_ids, time.perf_counter() - start)

    def _as_rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, actions: Tensor, decoder_ids: Tensor | None = None,
                    seconds: float = 0.0) -> Rollout:
        """:func:`~kdlab.stages.kstep_estimator.as_rollout` with this stage's EOS tokens and, for an
        encoder-decoder student, its decoder start token."""
        start = decoder_start_id(self.student, self.pad_id) if self.is_encoder_decoder else None
        return as_rollout(prompt_ids, prompt_mask, actions, self._eos_ids, start, decoder_ids, seconds)

    @torch.no_grad()
    def teacher_rollout(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Rollout:
        """The teacher's greedy continuations of the prompts, laid out like :meth:`rollout`.

        SeqKD / KL / TVD / JS train on them. They depend on the prompt alone, so each prompt's is
        generated once and cached (in memory, per rank; keyed by the prompt's token ids).
        """
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device).long()
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(prompt_ids, prompt_mask)]
        missing = [i for i, key in enumerate(keys) if key not in self._teacher_outputs]
        start = time.perf_counter()
        if missing:
            index = torch.tensor(missing, device=prompt_ids.device)
            actions = self._teacher_greedy(prompt_ids[index], prompt_mask[index])
            for row, i in enumerate(missing):
                self._teacher_outputs[keys[i]] = actions[row][until_first_eos(actions[row:row + 1], self._eos_ids)[0]].cpu()
        rows = [self._teacher_outputs[key] for key in keys]
        width = max(1, max(len(r) for r in rows))
        actions = torch.full((len(rows), width), self.pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
        for i, r in enumerate(rows):
            actions[i, : len(r)] = r.to(actions.device)
        return self._as_rollout(prompt_ids, prompt_mask, actions, seconds=time.perf_counter() - start)

    def _teacher_greedy(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Greedy decoding by the teacher (``[B, N]``, pad after each row's EOS)."""
        teacher = self.require_teacher()
        budget = self.hparams.max_new_tokens
        device = next(teacher.parameters()).device
        if not getattr(teacher.config, "is_encoder_decoder", False) and not generation_logits_processors(teacher):
            return sample_causal(teacher, prompt_ids.to(device), prompt_mask.to(device), budget, self._eos_ids,
                                 self.pad_id, greedy=True).to(self.device)
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = {"max_new_tokens": budget, "pad_token_id": self.pad_id, "do_sample": False,
                                  "num_beams": 1, "eos_token_id": self._eos_ids or None}
        if getattr(teacher.config, "is_encoder_decoder", False):
            kwargs["decoder_start_token_id"] = decoder_start_id(teacher, self.pad_id)
        out = teacher.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                               generation_config=GenerationConfig(**kwargs))
        actions = out[:, 1:] if getattr(teacher.config, "is_encoder_decoder", False) else out[:, prompt_ids.shape[1]:]
        return actions.to(self.device)

    # ------------------------------------------------------------------ scoring
    def student_action_logits(self, ro: Rollout) -> Tensor:
        """The student's logits ``[B, N, V]`` predicting each action, with grad."""
        return action_logits(self.student, ro, self.pad_id, self.device)

    def student_action_logprobs(self, ro: Rollout, logits: Tensor | None = None) -> Tensor:
        """``log π_θ(a_t | s_t)`` ``[B, N]`` with grad, from ``logits / temperature`` (0 where masked)."""
        logits = self.student_action_logits(ro) if logits is None else logits
        logp = torch.log_softmax(logits.float() / self.hparams.temperature, dim=-1)
        lp = logp.gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
        return lp.masked_fill(~ro.action_mask, 0.0)

    @torch.no_grad()
    def start_policy_action_logits(self, ro: Rollout) -> Tensor:
        """Logits ``[B, N, V]`` of the frozen start policy π_0 predicting each action (``start_kl_weight > 0``)."""
        if self.start_policy is None:
            raise RuntimeError("start_policy_action_logits needs start_kl_weight > 0")
        return action_logits(self.start_policy, ro, self.pad_id, self.device).float()

    @torch.no_grad()
    def teacher_action_logits(self, ro: Rollout) -> Tensor:
        """Teacher logits ``[B, N, V]`` (float32) predicting each action, one forward pass, no grad
        (a decoder-only teacher reads prompt ⊕ actions; an encoder-decoder one encodes the prompt)."""
        return action_logits(self.require_teacher(), ro, self.pad_id, self.device).float()

    # ------------------------------------------------------------------ losses (kdlab.stages.kstep_estimator)
    def _active_objective(self) -> str:
        hp = self.hparams
        if hp.objective == "pg" and self.global_step < hp.ce_warmup_steps:
            return "ce"
        return hp.objective

    def _loss(self, batch: dict[str, Any], across_ranks: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The active objective's loss and stats (:func:`~kdlab.stages.kstep_estimator.objective_loss`).
        ``across_ranks`` (training step only): CE/KD token means over the global batch under DDP."""
        return objective_loss(self, self._active_objective(), batch, across_ranks)

    def batch_loss(self, batch: Any) -> Tensor:
        """The training loss for ``batch`` with fresh rollouts; no logging, no state change (HasBatchLoss)."""
        return self._loss(batch)[0]

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, stats = self._loss(batch, across_ranks=True)
        if "return_mean" in stats and self.hparams.baseline == "running-mean":
            m = self.hparams.running_mean_momentum
            new = stats["return_mean"].to(self.return_running_mean)
            rm = self.return_running_mean
            self.return_running_mean.copy_(new if torch.isnan(rm) else m * rm + (1 - m) * new)
        bs = int(batch["input_ids"].shape[0]) if "input_ids" in batch else None
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in stats.items():
            self.log(f"train/{name}", value.float(), batch_size=bs)
        return loss

    def _eval_step(self, metrics: TaskMetrics, batch: dict[str, Any]) -> None:
        ro = self.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=True)
        preds = self.decode(ro)
        targets = list(batch["target_text"])
        metrics.update(preds, targets)  # ROUGE-1/2/L, BLEU-4, answer accuracy
        lengths = ro.action_mask.sum(-1)
        metrics.gen_length.update(lengths.float())
        teacher_ll: list[float | None] = [None] * len(preds)
        if getattr(self, "teacher", None) is not None and ro.num_generated > 0:
            logp = torch.log_softmax(self.teacher_action_logits(ro), dim=-1)
            ll = logp.gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
            metrics.teacher_logprob.update(ll[ro.action_mask])
            per_row = ll.masked_fill(~ro.action_mask, 0.0).sum(-1) / lengths.clamp_min(1)
            teacher_ll = [float(v) for v in per_row]
        self._eval_rows.extend(
            {"prediction": p, "target": t, "gen_length": int(n), "teacher_logprob": ll_row}
            for p, t, n, ll_row in zip(preds, targets, lengths.tolist(), teacher_ll)
        )

    def _eval_epoch_end(self, metrics: TaskMetrics, prefix: str) -> None:
        for name, value in metrics.compute().items():
            self.log(f"{prefix}/{name}", value, prog_bar=f"val/{name}" == self.main_metric[0])
        metrics.reset()
        self._write_generations(prefix)

    def _write_generations(self, prefix: str) -> None:
        """``{prefix}_generations/step{N}.jsonl`` in the run directory: one line per evaluation
        example, in loader order (prediction, reference, length, the teacher's mean log-likelihood),
        so runs can be compared example by example (``scripts/ketchup_paired.py``). Only inside a
        kdlab run directory (one with a ``manifest.json``; ``python -m kdlab fit``). Per-rank files
        (``step{N}.rank{r}.jsonl``) under DDP, whose sampler splits the examples."""
        rows, self._eval_rows = self._eval_rows, []
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking or not rows:
            return
        from kdlab.runs import write_text_atomic

        run_dir = Path(trainer.default_root_dir)
        if not (run_dir / "manifest.json").exists():  # not a kdlab run directory (a bare Trainer: cwd)
            return
        rank = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = run_dir / f"{prefix}_generations" / f"step{self.global_step}{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows), durable=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(self.test_metrics, batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        return self.decode(self.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=True))

    def decode(self, ro: Rollout) -> list[str]:
        """Continuations as text (tokens after the first EOS dropped, special tokens skipped)."""
        ids = ro.actions.masked_fill(~ro.action_mask, self.pad_id)
        return [s.strip() for s in self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]

    def on_fit_start(self) -> None:
        if self.start_policy is not None:  # unregistered, so Lightning does not move it
            self.start_policy.to(self.device)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Decay on every parameter, in one group: what this stage has always trained with, so its
        # results (and the KETCHUP figures) stay as they were.
        return build_optimizer(self, hp.lr, hp.weight_decay, hp.warmup_steps, decay_biases_and_norms=True)

    # ------------------------------------------------------------------ export
    def export_pretrained(self, directory: str) -> None:
        """The student + tokenizer as a plain Hugging Face directory (``save_pretrained``)."""
        save_served_model(self.student, self.hparams.tokenizer, directory, stage=type(self).__name__)
