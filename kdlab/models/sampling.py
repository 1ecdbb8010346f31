"""A lean KV-cache sampling loop for decoder-only students (on-policy RL rollouts).

Why not ``model.generate``: an RL step samples a fresh batch every optimiser step, so per-token
overheads count. Two of HF ``generate``'s are avoidable without changing the distribution:

* ``torch.multinomial`` draws one exponential per vocabulary entry per row and step; on a CPU
  that costs more than a tiny student's forward pass. :func:`sample_from_probs` draws one uniform
  per row and inverts the CDF instead: the same categorical distribution.
* The logits-processor / stopping-criteria / model-kwargs machinery runs every step.

``bench/rl_step_vs_trl.py --kdlab-sampler {kdlab,hf-generate}`` measures what this is worth per
RL step. The loop supports what on-policy KETCHUP needs — temperature sampling and greedy
decoding — and matches ``generate`` token for token in greedy mode (tests). Anything else (top-k,
top-p, a repetition penalty or other logits processors, encoder-decoder students, sharded
students) is left to ``generate`` by the caller (``RLDistillKStep._uses_kdlab_sampler``);
:func:`generation_logits_processors` names the processors a model's own ``generation_config`` asks for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["generation_logits_processors", "left_padded_positions", "sample_causal", "sample_from_probs"]


def left_padded_positions(mask: Tensor) -> Tensor:
    """Position ids for a left-padded attention mask, as ``generate`` makes them: ``cumsum(mask) − 1``
    at real tokens, 1 at masked slots (never attended, so any value would do)."""
    mask = mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def sample_from_probs(probs: Tensor) -> Tensor:
    """One draw per row of the categorical ``probs`` ``[B, V]`` by inverse-CDF sampling::

        i = min { j : Σ_{v ≤ j} p_v > u · Σ_v p_v },   u ~ U[0, 1)

    Rows need not be normalised. The CDF is accumulated in float64 (float32 on MPS, which has no
    float64), so rounding cannot shift mass between tokens at any vocabulary size we meet; a
    zero-probability token is never drawn (its CDF step is flat). A row whose total is not finite
    and positive (NaN/Inf logits, all zeros) raises, as ``torch.multinomial`` does. Uses the global
    torch RNG of ``probs``' device, like ``torch.multinomial``.
    """
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.cumsum(-1, dtype=dtype)
    total = cdf[:, -1:]
    valid = torch.isfinite(total).all() & (total > 0).all()
    if probs.device.type == "cpu":
        if not bool(valid):
            raise ValueError("sample_from_probs: a row of probabilities is NaN/Inf or sums to zero")
    else:  # no host sync on accelerators: the check fails the next synchronising call instead
        torch._assert_async(valid, "sample_from_probs: a row of probabilities is NaN/Inf or sums to zero")
    u = torch.rand(probs.shape[0], 1, dtype=dtype, device=probs.device) * total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _cache_kwarg(output: Any) -> dict[str, Any]:
    """The KV cache of a forward output as the kwarg that feeds it back: transformers ≥ 5.24 names it
    ``cache`` (``past_key_values`` is deprecated there), earlier versions ``past_key_values``."""
    if "cache" in output:
        return {"cache": output["cache"]}
    return {"past_key_values": output["past_key_values"]}


@torch.no_grad()
def sample_causal(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
) -> Tensor:
    """Continuations ``[B, N]`` (N ≤ ``max_new_tokens``) of left-padded prompts, laid out like
    ``generate(...)[:, prompt_len:]``: after a row's first EOS it holds ``pad_id``, and the loop stops
    early once every row has finished.

    ``y_t ~ softmax(logits_t / temperature)`` (or ``argmax`` when ``greedy``), one forward pass per
    token over the KV cache the model itself allocates (in transformers 5 the kind its config asks
    for: sliding-window and hybrid models get theirs). Position ids follow ``generate``:
    ``cumsum(mask) − 1`` over the prompt, then +1 per token.
    """
    batch = prompt_ids.shape[0]
    if max_new_tokens < 1:
        return prompt_ids.new_empty(batch, 0)
    mask = prompt_mask.long()
    positions = left_padded_positions(mask)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, return_dict=True)
    next_position = positions[:, -1:] + 1
    eos = torch.tensor(eos_ids, device=prompt_ids.device, dtype=prompt_ids.dtype)
    unfinished = torch.ones(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens: list[Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if greedy:
            token = logits.argmax(-1)
        else:
            token = sample_from_probs(torch.softmax(logits / temperature, dim=-1))
        token = torch.where(unfinished, token, torch.full_like(token, pad_id))
        tokens.append(token)
        if eos.numel():
            unfinished &= ~torch.isin(token, eos)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, use_cache=True,
                    return_dict=True, **_cache_kwarg(out))
        next_position = next_position + 1
    return torch.stack(tokens, dim=1)


#: ``GenerationConfig`` fields whose non-default values make ``generate`` process the logits (beyond
#: temperature / top-k / top-p, which the stage sets itself), with their neutral values.
_NEUTRAL_PROCESSORS: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
}


def generation_logits_processors(model: nn.Module) -> list[str]:
    """The logits processors the model's own ``generation_config`` asks ``generate`` to apply (which
    :func:`sample_causal` would not: a model that sets one must sample through ``generate``)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    found = []
    for name, neutral in _NEUTRAL_PROCESSORS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            found.append(name)
    return found
