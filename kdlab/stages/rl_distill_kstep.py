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
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from kdlab.defaults import IGNORE_INDEX
from kdlab.errors import ConfigError
from kdlab.losses.returns import kstep_returns_from_logits, policy_gradient_loss, teacher_expected_baseline
from kdlab.losses.token import forward_kl, jensen_shannon, token_cross_entropy, total_variation
from kdlab.metrics.generation import TaskMetrics, resolve_val_metric
from kdlab.models.backbones import load_generation_model, pad_token_id
from kdlab.models.export import save_served_model
from kdlab.models.sampling import left_padded_positions, sample_causal
from kdlab.protocols import attach_unregistered, is_sharded_strategy
from kdlab.stages._common import build_optimizer, global_token_mean

__all__ = ["RLDistillKStep", "Rollout"]


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


def _output_vocab_size(model: nn.Module) -> int:
    """Rows of the LM head = width of the logits (what rewards index by token id)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _decoder_start_id(model: nn.Module, pad_id: int) -> int:
    """The token an encoder-decoder starts decoding from (T5: the pad token)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    return int(start) if start is not None else pad_id


def _model_name(model: nn.Module) -> str:
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


def _until_first_eos(tokens: Tensor, eos_ids: list[int]) -> Tensor:
    """Bool mask of tokens up to and including the first EOS of each row (all True if none)."""
    if not eos_ids:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    seen_before = is_eos.long().cumsum(-1) - is_eos.long()
    return seen_before == 0


#: ``GenerationConfig`` fields whose non-default values make ``generate`` process the logits (beyond
#: temperature / top-k / top-p, which the stage sets itself), with their neutral values.
_NEUTRAL_PROCESSORS: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
}


def _student_logits_processors(model: nn.Module) -> list[str]:
    """The logits processors the model's own ``generation_config`` asks ``generate`` to apply."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    found = []
    for name, neutral in _NEUTRAL_PROCESSORS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            found.append(name)
    return found


def _pack_index(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Indices that move each row's valid positions to the front (order kept), and the packed mask."""
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    counts = valid.sum(-1)
    length = max(int(counts.max().item()) if valid.numel() else 0, 1)
    index = order[:, :length]
    packed_mask = torch.arange(length, device=valid.device)[None, :] < counts[:, None]
    return index, packed_mask


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
                            "js_beta": js_beta})
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
        self.register_buffer("return_running_mean", torch.tensor(float("nan")), persistent=True)
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.student.config.eos_token_id
        if eos_token_ids is not None:
            eos = eos_token_ids
        self._eos_ids: list[int] = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [int(eos)])
        self._pad_id: int = pad_token_id(self.tokenizer)
        self.val_metrics = TaskMetrics()
        key, mode = resolve_val_metric(val_metric)
        self.main_metric: tuple[str, str] = (f"val/{key}", mode)  # the best checkpoint's
        self.test_metrics = TaskMetrics()

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

    def _require_teacher(self) -> nn.Module:
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
            "pad_token_id": self._pad_id,
            "eos_token_id": self._eos_ids or None,
            "use_cache": True,
        }
        if self.is_encoder_decoder:
            start = self.student.config.decoder_start_token_id
            kwargs["decoder_start_token_id"] = start if start is not None else self._pad_id
        if greedy:
            kwargs.update(do_sample=False, num_beams=1)
        else:
            kwargs.update(do_sample=True, temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p)
            kwargs.update(hp.generation_kwargs or {})
        return GenerationConfig(**kwargs)

    def _uses_kdlab_sampler(self, greedy: bool) -> bool:
        hp = self.hparams
        if hp.sampler != "kdlab" or self.is_encoder_decoder or _student_logits_processors(self.student):
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
                    self.student, prompt_ids, prompt_mask, budget, self._eos_ids, self._pad_id,
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
        """Lay out continuations ``actions`` of left-padded prompts for one-pass scoring (mask up to
        and including each row's first EOS; ``decoder_ids = [start] ⊕ actions`` for an
        encoder-decoder student when not given)."""
        action_mask = _until_first_eos(actions, self._eos_ids)
        if self.is_encoder_decoder and decoder_ids is None:
            start = torch.full_like(actions[:, :1], _decoder_start_id(self.student, self._pad_id))
            decoder_ids = torch.cat([start, actions], dim=1)
        full_ids = torch.cat([prompt_ids, actions], dim=1)
        full_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
        return Rollout(
            prompt_ids, prompt_mask, actions, action_mask, full_ids, full_mask, left_padded_positions(full_mask), decoder_ids, seconds
        )

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
                self._teacher_outputs[keys[i]] = actions[row][_until_first_eos(actions[row:row + 1], self._eos_ids)[0]].cpu()
        rows = [self._teacher_outputs[key] for key in keys]
        width = max(1, max(len(r) for r in rows))
        actions = torch.full((len(rows), width), self._pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
        for i, r in enumerate(rows):
            actions[i, : len(r)] = r.to(actions.device)
        return self._as_rollout(prompt_ids, prompt_mask, actions, seconds=time.perf_counter() - start)

    def _teacher_greedy(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Greedy decoding by the teacher (``[B, N]``, pad after each row's EOS)."""
        teacher = self._require_teacher()
        budget = self.hparams.max_new_tokens
        device = next(teacher.parameters()).device
        if not getattr(teacher.config, "is_encoder_decoder", False) and not _student_logits_processors(teacher):
            return sample_causal(teacher, prompt_ids.to(device), prompt_mask.to(device), budget, self._eos_ids,
                                 self._pad_id, greedy=True).to(self.device)
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = {"max_new_tokens": budget, "pad_token_id": self._pad_id, "do_sample": False,
                                  "num_beams": 1, "eos_token_id": self._eos_ids or None}
        if getattr(teacher.config, "is_encoder_decoder", False):
            kwargs["decoder_start_token_id"] = _decoder_start_id(teacher, self._pad_id)
        out = teacher.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                               generation_config=GenerationConfig(**kwargs))
        actions = out[:, 1:] if getattr(teacher.config, "is_encoder_decoder", False) else out[:, prompt_ids.shape[1]:]
        return actions.to(self.device)

    def _causal_action_logits(self, model: nn.Module, ro: Rollout) -> Tensor:
        """Logits ``[B, N, V]`` of a causal LM at the positions predicting each action (one pass)."""
        n = ro.actions.shape[1]
        device = next(model.parameters()).device
        out = model(
            input_ids=ro.full_ids.to(device),
            attention_mask=ro.full_mask.to(device),
            position_ids=ro.position_ids.to(device),
            logits_to_keep=n + 1,
            use_cache=False,
        )
        return out.logits[:, :-1].to(self.device)

    def _seq2seq_action_logits(self, model: nn.Module, ro: Rollout) -> Tensor:
        """Logits ``[B, N, V]`` of an encoder-decoder reading the prompt and decoding ``[start] ⊕ actions``."""
        device = next(model.parameters()).device
        start = torch.full_like(ro.actions[:, :1], _decoder_start_id(model, self._pad_id))
        decoder_ids = torch.cat([start, ro.actions[:, :-1]], dim=1)
        dec_mask = torch.cat([torch.ones_like(ro.action_mask[:, :1]), ro.action_mask[:, :-1]], dim=1).long()
        return model(
            input_ids=ro.prompt_ids.to(device), attention_mask=ro.prompt_mask.to(device),
            decoder_input_ids=decoder_ids.to(device), decoder_attention_mask=dec_mask.to(device), use_cache=False,
        ).logits.to(self.device)

    def _action_logits(self, model: nn.Module, ro: Rollout) -> Tensor:
        """Logits ``[B, N, V]`` predicting each action, for a decoder-only or an encoder-decoder model."""
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return self._seq2seq_action_logits(model, ro)
        return self._causal_action_logits(model, ro)

    def student_action_logits(self, ro: Rollout) -> Tensor:
        """The student's logits ``[B, N, V]`` predicting each action, with grad."""
        return self._action_logits(self.student, ro)

    def student_action_logprobs(self, ro: Rollout, logits: Tensor | None = None) -> Tensor:
        """``log π_θ(a_t | s_t)`` ``[B, N]`` with grad, from ``logits / temperature`` (0 where masked)."""
        logits = self.student_action_logits(ro) if logits is None else logits
        logp = torch.log_softmax(logits.float() / self.hparams.temperature, dim=-1)
        lp = logp.gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
        return lp.masked_fill(~ro.action_mask, 0.0)

    @torch.no_grad()
    def teacher_action_logits(self, ro: Rollout) -> Tensor:
        """Teacher logits ``[B, N, V]`` (float32) predicting each action, one forward pass, no grad
        (a decoder-only teacher reads prompt ⊕ actions; an encoder-decoder one encodes the prompt)."""
        return self._action_logits(self._require_teacher(), ro).float()

    # ------------------------------------------------------------------ losses
    def _pg_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        for key in ("prompt_input_ids", "prompt_attention_mask"):
            if key not in batch:
                raise KeyError(f"objective 'pg' needs {key!r} in the batch (use kdlab.data.Seq2SeqDataModule)")
        ro = self.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=hp.greedy_rollouts)
        t_logits = self.teacher_action_logits(ro)
        rewards, returns = kstep_returns_from_logits(
            t_logits, ro.actions, ro.action_mask, k=hp.k, state_value=hp.state_value, kstep_tail=hp.kstep_tail,
            center_logits=hp.center_logits, clip=hp.reward_clip, divisor=hp.reward_divisor,
        )
        running = None if torch.isnan(self.return_running_mean) else self.return_running_mean
        logprobs = self.student_action_logprobs(ro)
        teacher_baseline = None
        if hp.baseline == "teacher-expected":
            teacher_baseline = teacher_expected_baseline(t_logits, ro.action_mask, hp.center_logits, divisor=hp.reward_divisor)
        # min-variance: grad_sq=None is the released code's (its per-token g is all ones).
        out = policy_gradient_loss(
            logprobs, returns, ro.action_mask, hp.baseline, running, hp.normalize_advantages,
            pg_weight=hp.pg_weight, weight_clip=hp.weight_clip, teacher_baseline=teacher_baseline,
        )
        n_valid = ro.action_mask.sum().clamp_min(1)
        stats = {
            "reward_mean": rewards.sum() / n_valid,
            "return_mean": out.return_mean,
            "pg_loss": out.loss.detach(),
            "advantage_std": out.advantage_std,
            "gen_length": ro.action_mask.sum(-1).float().mean(),
            "gen_tokens_per_s": torch.tensor(ro.num_generated / max(ro.seconds, 1e-9)),
            "logprob_mean": (logprobs.detach().sum() / n_valid),
        }
        return out.loss, stats

    def _reference_logits(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Packed logits ``[B, L, V]`` at the reference target positions, targets ``[B, L]``, mask ``[B, L]``.

        Causal models read ``input_ids`` (prompt ⊕ target) and predict ``labels[:, 1:]``; encoder-decoder
        models (student or teacher) encode ``prompt_input_ids`` and decode the packed targets.
        """
        labels = batch["labels"]
        valid = labels[:, 1:] != IGNORE_INDEX
        index, packed_mask = _pack_index(valid)
        targets = labels[:, 1:].gather(1, index).masked_fill(~packed_mask, IGNORE_INDEX)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            device = next(model.parameters()).device
            start = torch.full_like(targets[:, :1], _decoder_start_id(model, self._pad_id))
            dec_in = torch.cat([start, targets[:, :-1].masked_fill(~packed_mask[:, :-1], self._pad_id)], dim=1)
            logits = model(
                input_ids=batch["prompt_input_ids"].to(device), attention_mask=batch["prompt_attention_mask"].to(device),
                decoder_input_ids=dec_in.to(device), decoder_attention_mask=torch.cat(
                    [torch.ones_like(packed_mask[:, :1]), packed_mask[:, :-1]], dim=1).long().to(device),
                use_cache=False,
            ).logits.to(self.device)
        else:
            device = next(model.parameters()).device
            mask = batch["attention_mask"]
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device), use_cache=False,
            ).logits[:, :-1].to(self.device)
            logits = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return logits, targets, packed_mask

    def _token_mean(self, total: Tensor, count: Tensor, across_ranks: bool) -> Tensor:
        return global_token_mean(self, total, count) if across_ranks else total / count.clamp(min=1)

    def _ce_loss(self, batch: dict[str, Any], across_ranks: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher-forced cross-entropy on the references: ``− mean_t log p_θ(y_t | x, y_<t)``
        (the mean over the global batch's target tokens when ``across_ranks``)."""
        logits, targets, _ = self._reference_logits(self.student, batch)
        loss = self._token_mean(*token_cross_entropy(logits, targets), across_ranks)
        return loss, {"ce_loss": loss.detach()}

    def _kd_loss(self, batch: dict[str, Any], across_ranks: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Token-level forward KL on the references (:func:`kdlab.losses.token.forward_kl`)::

            loss = τ² · mean_t Σ_v p_T^τ(v) (log p_T^τ(v) − log p_S^τ(v)),  p^τ = softmax(logits / τ)
        """
        tau = self.hparams.kd_temperature
        s_logits, _, mask = self._reference_logits(self.student, batch)
        with torch.no_grad():
            t_logits, _, _ = self._reference_logits(self._require_teacher(), batch)
        loss = tau**2 * self._token_mean(*forward_kl(s_logits, t_logits, mask, tau), across_ranks)
        return loss, {"kd_loss": loss.detach()}

    def _teacher_sequence_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """SeqKD and KL: the student trained on the teacher's own (greedy, cached) outputs.

        ::

            seqkd: loss = − mean_t log p_θ(ŷ_t | x, ŷ_<t)                       ŷ = teacher's greedy output
            kl:    loss = τ² · mean_t KL(p_T^τ(· | x, ŷ_<t) ‖ p_θ^τ(· | x, ŷ_<t))

        (KETCHUP's SeqKD and KL rows [code: distill.py]; ``kd`` is the same KL on the references.)
        """
        ro = self.teacher_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        s_logits = self.student_action_logits(ro)
        stats = {"teacher_gen_length": ro.action_mask.sum(-1).float().mean()}
        if self.hparams.objective == "seqkd":
            targets = ro.actions.masked_fill(~ro.action_mask, IGNORE_INDEX)
            loss = self._token_mean(*token_cross_entropy(s_logits, targets), False)
            return loss, {"seqkd_loss": loss.detach(), **stats}
        tau = self.hparams.kd_temperature
        loss = tau**2 * self._token_mean(*forward_kl(s_logits, self.teacher_action_logits(ro), ro.action_mask, tau), False)
        return loss, {"kl_loss": loss.detach(), **stats}

    def _divergence_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """TVD and JS on the student's own rollouts and on the teacher's greedy outputs, averaged
        (as the released code's ``TVD`` / ``JS``, ``utils/distillation.py`` [code])::

            loss = ½ mean_t D(p_θ, p_T | student's sequence) + ½ mean_t D(p_θ, p_T | teacher's sequence)

        with ``D`` = :func:`~kdlab.losses.token.total_variation` or
        :func:`~kdlab.losses.token.jensen_shannon` (β = ``js_beta``, ``js_terms``).
        """
        hp = self.hparams
        prompts = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        rollouts = (self.rollout(*prompts, greedy=hp.greedy_rollouts), self.teacher_rollout(*prompts))
        parts = []
        for ro in rollouts:
            s_logits, t_logits = self.student_action_logits(ro), self.teacher_action_logits(ro)
            if hp.objective == "tvd":
                parts.append(self._token_mean(*total_variation(s_logits, t_logits, ro.action_mask), False))
            else:
                parts.append(self._token_mean(*jensen_shannon(s_logits, t_logits, ro.action_mask, hp.js_beta, hp.js_terms),
                                              False))
        loss = 0.5 * (parts[0] + parts[1])
        return loss, {f"{hp.objective}_loss": loss.detach(), f"{hp.objective}_student_seq": parts[0].detach(),
                      f"{hp.objective}_teacher_seq": parts[1].detach(),
                      "gen_length": rollouts[0].action_mask.sum(-1).float().mean()}

    def _active_objective(self) -> str:
        hp = self.hparams
        if hp.objective == "pg" and self.global_step < hp.ce_warmup_steps:
            return "ce"
        return hp.objective

    def _loss(self, batch: dict[str, Any], across_ranks: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The active objective's loss. ``across_ranks`` (training step only): CE/KD token means over
        the global batch under DDP. PG keeps per-rank means: its rollouts differ per rank anyway."""
        objective = self._active_objective()
        if objective == "pg":
            return self._pg_loss(batch)
        if objective == "kd":
            return self._kd_loss(batch, across_ranks)
        if objective in ("seqkd", "kl"):
            return self._teacher_sequence_loss(batch)
        if objective in ("tvd", "js"):
            return self._divergence_loss(batch)
        return self._ce_loss(batch, across_ranks)

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
        metrics.gen_length.update(ro.action_mask.sum(-1).float())
        if getattr(self, "teacher", None) is not None and ro.num_generated > 0:
            logp = torch.log_softmax(self.teacher_action_logits(ro), dim=-1)
            ll = logp.gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
            metrics.teacher_logprob.update(ll[ro.action_mask])

    def _eval_epoch_end(self, metrics: TaskMetrics, prefix: str) -> None:
        for name, value in metrics.compute().items():
            self.log(f"{prefix}/{name}", value, prog_bar=f"val/{name}" == self.main_metric[0])
        metrics.reset()

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
        ids = ro.actions.masked_fill(~ro.action_mask, self._pad_id)
        return [s.strip() for s in self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Decay on every parameter, in one group: what this stage has always trained with, so its
        # results (and the KETCHUP figures) stay as they were.
        return build_optimizer(self, hp.lr, hp.weight_decay, hp.warmup_steps, decay_biases_and_norms=True)

    # ------------------------------------------------------------------ export
    def export_pretrained(self, directory: str) -> None:
        """The student + tokenizer as a plain Hugging Face directory (``save_pretrained``)."""
        save_served_model(self.student, self.hparams.tokenizer, directory, stage=type(self).__name__)
