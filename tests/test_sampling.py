"""kdlab's KV-cache sampling loop: greedy equals HF ``generate`` token for token (left padding, EOS,
early stop); sampled tokens follow softmax(logits / T); the inverse-CDF draw is the categorical."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from kdlab.models.backbones import load_backbone, load_tokenizer
from kdlab.models.sampling import sample_causal, sample_from_probs
from kdlab.stages.rl_distill_kstep import RLDistillKStep

# tiny-llama-h32 with two layers (the KV cache must carry state across layers) and grouped-query
# attention (2 query heads share 1 KV head).
TINY = "tiny-llama-h32"
TINY_OVERRIDES = {"num_hidden_layers": 2, "num_key_value_heads": 1}


def _model_and_prompts() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, int]:
    torch.manual_seed(0)
    model = load_backbone(TINY, "causal-lm", config=TINY_OVERRIDES).eval()
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
    # Make a token that some row emits for the first time after step 0 the EOS: rows stop at
    # different steps, then pad.
    row, step = next((r, t) for r in range(4) for t in range(1, 10) if int(free[r, t]) not in free[r, :t].tolist())
    eos = int(free[row, step])
    ours = sample_causal(model, ids, mask, 10, eos_ids=[eos], pad_id=pad, greedy=True)
    assert torch.equal(ours, _hf_greedy(model, ids, mask, 10, eos=eos, pad=pad))
    assert int(ours[row, step]) == eos and bool((ours[row, step + 1:] == pad).all())


def test_greedy_equals_generate_for_absolute_positions() -> None:
    """GPT-2 adds learned absolute position embeddings: wrong position ids under left padding would
    change its tokens (a rotary model is blind to a constant per-row shift)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    ids = torch.randint(5, 512, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    ours = sample_causal(model, ids, mask, 8, eos_ids=[], pad_id=0, greedy=True)
    assert torch.equal(ours, _hf_greedy(model, ids, mask, 8, eos=-1, pad=0))
    shifted = ids.clone()
    shifted[0, :5] = 7  # what the padded slots hold must not matter
    assert torch.equal(sample_causal(model, shifted, mask, 8, eos_ids=[], pad_id=0, greedy=True), ours)


def test_all_rows_finishing_stops_early() -> None:
    model, ids, mask, pad = _model_and_prompts()
    first = sample_causal(model, ids, mask, 1, eos_ids=[], pad_id=pad, greedy=True)[:, 0]
    out = sample_causal(model, ids, mask, 10, eos_ids=first.unique().tolist(), pad_id=pad, greedy=True)
    assert out.shape == (4, 1)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_first_token_follows_tempered_softmax(temperature: float, device: str) -> None:
    """20 000 draws of the first token from one prompt against softmax(logits / T): total variation
    over the 20 most likely tokens and one bin for the rest."""
    model, ids, mask, pad = _model_and_prompts()
    model, ids, mask = model.to(device), ids.to(device), mask.to(device)
    model.lm_head.weight.data.mul_(20)  # peaked: the top 20 tokens hold ≈ 51% of the mass at T = 1
    prompt, prompt_mask = ids[1:2], mask[1:2]
    with torch.no_grad():
        logits = model(input_ids=prompt, attention_mask=prompt_mask).logits[0, -1].double().cpu()
    top = torch.softmax(logits / temperature, -1).topk(20).indices

    def binned(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([p[top], (1 - p[top].sum()).reshape(1)])

    n, chunk = 20_000, 4_000  # chunks keep the [rows, vocab] float64 CDF small
    torch.manual_seed(1)
    draws = torch.cat([sample_causal(model, prompt.expand(chunk, -1), prompt_mask.expand(chunk, -1), 1, eos_ids=[],
                                     pad_id=pad, temperature=temperature)[:, 0] for _ in range(n // chunk)]).cpu()
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_a_broken_distribution_raises(bad: float) -> None:
    probs = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    probs[1] = bad if bad != 0.0 else 0.0
    with pytest.raises(ValueError, match="NaN/Inf or sums to zero"):
        sample_from_probs(probs)


def test_zero_new_tokens_is_empty() -> None:
    model, ids, mask, pad = _model_and_prompts()
    assert sample_causal(model, ids, mask, 0, eos_ids=[], pad_id=pad).shape == (4, 0)


def _sampler_used(stage: RLDistillKStep, greedy: bool, monkeypatch: pytest.MonkeyPatch) -> str:
    """``kdlab`` if a rollout of ``stage`` went through kdlab's loop, ``generate`` if through HF generate."""
    import kdlab.stages.rl_distill_kstep as module

    calls: list[str] = []
    real_loop, real_generate = module.sample_causal, stage.student.generate

    def loop(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("kdlab")
        return real_loop(*args, **kwargs)

    def generate(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("generate")
        return real_generate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "sample_causal", loop)
        patch.setattr(stage.student, "generate", generate)
        _, ids, mask, _ = _model_and_prompts()
        stage.rollout(ids[:2], mask[:2], greedy=greedy)
    assert len(calls) == 1, calls
    return calls[0]


def test_stage_uses_the_loop_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    common = {"backbone": TINY, "backbone_config": TINY_OVERRIDES, "max_new_tokens": 4}
    stage = RLDistillKStep(**common)
    assert _sampler_used(stage, False, monkeypatch) == _sampler_used(stage, True, monkeypatch) == "kdlab"
    for kwargs in ({"top_k": 5}, {"top_p": 0.9}, {"generation_kwargs": {"repetition_penalty": 1.2}}):
        stage = RLDistillKStep(**common, **kwargs)
        assert _sampler_used(stage, False, monkeypatch) == "generate", kwargs
        assert _sampler_used(stage, True, monkeypatch) == "kdlab", kwargs  # validation decodes greedily either way
    assert _sampler_used(RLDistillKStep(**common, sampler="hf-generate"), True, monkeypatch) == "generate"
    # A student whose own generation config asks generate for a logits processor keeps generate.
    stage = RLDistillKStep(**common)
    stage.student.generation_config.repetition_penalty = 1.3
    assert _sampler_used(stage, False, monkeypatch) == _sampler_used(stage, True, monkeypatch) == "generate"
    # Sharded strategies keep generate (it steps every rank in lock step); DDP does not need to.
    stage = RLDistillKStep(**common)
    stage.trainer = SimpleNamespace(strategy=type("FSDPStrategy", (), {})())
    assert _sampler_used(stage, False, monkeypatch) == "generate"
    stage.trainer = SimpleNamespace(strategy=type("DDPStrategy", (), {})())
    assert _sampler_used(stage, False, monkeypatch) == "kdlab"


def test_stage_greedy_rollout_is_the_same_with_either_sampler() -> None:
    model, ids, mask, _ = _model_and_prompts()
    rollouts = []
    for sampler in ("kdlab", "hf-generate"):
        torch.manual_seed(0)
        stage = RLDistillKStep(backbone=TINY, backbone_config=TINY_OVERRIDES, max_new_tokens=6, sampler=sampler)
        rollouts.append(stage.rollout(ids, mask, greedy=True))
    a, b = rollouts
    assert torch.equal(a.actions, b.actions) and torch.equal(a.full_mask, b.full_mask)
