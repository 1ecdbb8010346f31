"""kdlab's KV-cache sampling loop: greedy equals HF ``generate`` token for token (left padding, EOS,
early stop); sampled tokens follow softmax(logits / T); the inverse-CDF draw is the categorical."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from kdlab.models.backbones import load_backbone, load_tokenizer
from kdlab.models.sampling import sample_causal, sample_from_probs
from kdlab.stages.rl_distill_kstep import RLDistillKStep

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64}


def _model_and_prompts() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, int]:
    torch.manual_seed(0)
    model = load_backbone("tiny-llama", "causal-lm", config=TINY).eval()
    ids = torch.randint(5, model.config.vocab_size, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding of different widths
    mask[3, :7] = 0
    return model, ids, mask, load_tokenizer("tiny-llama").pad_token_id


def _hf_greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int, eos: int, pad: int) -> torch.Tensor:
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:]


def test_greedy_equals_generate_with_padding_eos_and_early_stop() -> None:
    model, ids, mask, pad = _model_and_prompts()
    free = sample_causal(model, ids, mask, 10, eos_ids=[], pad_id=pad, greedy=True)
    assert free.shape == (4, 10)
    assert torch.equal(free, _hf_greedy(model, ids, mask, 10, eos=-1, pad=pad))
    # Make a token that row 0 emits at step 2 the EOS: rows stop at different steps, then pad.
    eos = int(free[0, 2])
    ours = sample_causal(model, ids, mask, 10, eos_ids=[eos], pad_id=pad, greedy=True)
    assert torch.equal(ours, _hf_greedy(model, ids, mask, 10, eos=eos, pad=pad))
    assert int(ours[0, 2]) == eos and bool((ours[0, 3:] == pad).all())


def test_all_rows_finishing_stops_early() -> None:
    model, ids, mask, pad = _model_and_prompts()
    first = sample_causal(model, ids, mask, 1, eos_ids=[], pad_id=pad, greedy=True)[:, 0]
    out = sample_causal(model, ids, mask, 10, eos_ids=first.unique().tolist(), pad_id=pad, greedy=True)
    assert out.shape == (4, 1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_first_token_follows_tempered_softmax(temperature: float) -> None:
    """20 000 draws of the first token from one prompt against softmax(logits / T): total variation
    over the 20 most likely tokens and one bin for the rest."""
    model, ids, mask, pad = _model_and_prompts()
    model.lm_head.weight.data.mul_(20)  # peaked: the top 20 tokens hold ≈ 51% of the mass at T = 1
    prompt, prompt_mask = ids[1:2], mask[1:2]
    with torch.no_grad():
        logits = model(input_ids=prompt, attention_mask=prompt_mask).logits[0, -1].double()
    top = torch.softmax(logits / temperature, -1).topk(20).indices

    def binned(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([p[top], (1 - p[top].sum()).reshape(1)])

    n = 20_000
    torch.manual_seed(1)
    draws = sample_causal(model, prompt.expand(n, -1), prompt_mask.expand(n, -1), 1, eos_ids=[], pad_id=pad,
                          temperature=temperature)[:, 0]
    empirical = binned(torch.bincount(draws, minlength=logits.numel()).double() / n)
    tv = 0.5 * (empirical - binned(torch.softmax(logits / temperature, -1))).abs().sum().item()
    tv_wrong = 0.5 * (empirical - binned(torch.softmax(logits / (2 * temperature), -1))).abs().sum().item()
    assert tv < 0.02, tv  # sampling noise alone: ≈ 0.01 at n = 20 000
    assert tv_wrong > 0.1, tv_wrong  # a temperature off by 2× is far outside that


def test_inverse_cdf_draw_is_the_categorical() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.2, 0.0, 0.3], [2.0, 0.0, 0.0, 0.0, 6.0]])  # row 2 unnormalised
    torch.manual_seed(0)
    draws = torch.stack([sample_from_probs(probs) for _ in range(20_000)])
    freq0 = torch.bincount(draws[:, 0], minlength=5).double() / 20_000
    freq1 = torch.bincount(draws[:, 1], minlength=5).double() / 20_000
    assert torch.allclose(freq0, torch.tensor([0.0, 0.5, 0.2, 0.0, 0.3], dtype=torch.float64), atol=0.015)
    assert torch.allclose(freq1, torch.tensor([0.25, 0.0, 0.0, 0.0, 0.75], dtype=torch.float64), atol=0.015)
    assert freq0[0] == 0 and freq0[3] == 0 and freq1[1:4].sum() == 0  # zero mass is never drawn
    one_hot = torch.zeros(3, 7)
    one_hot[torch.arange(3), torch.tensor([0, 6, 3])] = 1.0
    assert sample_from_probs(one_hot).tolist() == [0, 6, 3]  # the first and last tokens are reachable


def test_stage_uses_the_loop_only_where_it_applies() -> None:
    common = {"student_config": TINY, "max_new_tokens": 4}
    stage = RLDistillKStep(**common)
    assert stage._uses_kdlab_sampler(greedy=False) and stage._uses_kdlab_sampler(greedy=True)
    for kwargs in ({"top_k": 5}, {"top_p": 0.9}, {"generation_kwargs": {"repetition_penalty": 1.2}}):
        stage = RLDistillKStep(**common, **kwargs)
        assert not stage._uses_kdlab_sampler(greedy=False)
        assert stage._uses_kdlab_sampler(greedy=True)  # validation decodes greedily either way
    assert not RLDistillKStep(**common, sampler="hf-generate")._uses_kdlab_sampler(greedy=True)


def test_stage_greedy_rollout_is_the_same_with_either_sampler() -> None:
    model, ids, mask, _ = _model_and_prompts()
    rollouts = []
    for sampler in ("kdlab", "hf-generate"):
        torch.manual_seed(0)
        stage = RLDistillKStep(student_config=TINY, max_new_tokens=6, sampler=sampler)
        rollouts.append(stage.rollout(ids, mask, greedy=True))
    a, b = rollouts
    assert torch.equal(a.actions, b.actions) and torch.equal(a.full_mask, b.full_mask)
