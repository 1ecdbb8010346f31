"""Golden values of the pure token losses (kdlab.losses.token): forward KL, token CE, next-token NLL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.defaults import IGNORE_INDEX
from kdlab.losses.token import forward_kl, jensen_shannon, next_token_nll, token_cross_entropy, total_variation

LN3 = math.log(3.0)


def _mask(*rows: list[bool]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.bool)


# ------------------------------------------------------------------------------------------ forward KL
def test_forward_kl_of_identical_logits_is_zero() -> None:
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.bool)
    for temperature in (0.5, 1.0, 4.0):
        total, count = forward_kl(logits, logits.clone(), mask, temperature=temperature)
        assert total.item() == pytest.approx(0.0, abs=1e-6)
        assert int(count) == 10


def test_forward_kl_equals_torch_kl_div_at_temperature_one() -> None:
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 4, 7, generator=gen), torch.randn(3, 4, 7, generator=gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    total, count = forward_kl(student, teacher, mask)
    # F.kl_div(input = log q, target = log p, log_target) = Σ p (log p − log q) = KL(p_T ‖ p_S)
    expected = F.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True,
                        reduction="sum")
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(count) == 12
    # the direction matters: the reverse KL is a different number on these logits
    reverse, _ = forward_kl(teacher, student, mask)
    assert abs(reverse.item() - total.item()) > 1e-3


def test_forward_kl_two_token_hand_example() -> None:
    # Two tokens, vocabulary of 2.
    #   t=0: teacher logits [0, 0]    → p_T = [1/2, 1/2]; student logits [ln 3, 0] → p_S = [3/4, 1/4]
    #        KL = 1/2·ln((1/2)/(3/4)) + 1/2·ln((1/2)/(1/4)) = 1/2·ln(4/3)           = 0.1438410362
    #   t=1: teacher logits [ln 3, 0] → p_T = [3/4, 1/4]; student logits [0, 0]    → p_S = [1/2, 1/2]
    #        KL = 3/4·ln((3/4)/(1/2)) + 1/4·ln((1/4)/(1/2)) = 3/4·ln(3/2) − 1/4·ln 2 = 0.1308120359
    #   total = 0.2746530722, count = 2
    student = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]])
    total, count = forward_kl(student, teacher, _mask([True, True]))
    assert total.item() == pytest.approx(0.2746530722, rel=1e-6)
    assert int(count) == 2
    first, _ = forward_kl(student, teacher, _mask([True, False]))
    assert first.item() == pytest.approx(0.1438410362, rel=1e-6)


def test_forward_kl_masked_positions_contribute_nothing() -> None:
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    mask = _mask([True, False, True], [False, False, True])
    total, count = forward_kl(student, teacher, mask)
    assert int(count) == 3
    # any logits at masked positions: same total
    wild_s, wild_t = student.clone(), teacher.clone()
    wild_s[~mask] = 50.0 * torch.randn(int((~mask).sum()), 5, generator=gen)
    wild_t[~mask] = -30.0
    again, _ = forward_kl(wild_s, wild_t, mask)
    assert again.item() == pytest.approx(total.item(), rel=1e-6)
    # and the total is the sum over the kept positions alone
    kept = sum(forward_kl(student[b:b + 1, t:t + 1], teacher[b:b + 1, t:t + 1], _mask([True]))[0].item()
               for b, t in mask.nonzero().tolist())
    assert total.item() == pytest.approx(kept, rel=1e-6)
    nothing, zero = forward_kl(student, teacher, torch.zeros(2, 3, dtype=torch.bool))
    assert nothing.item() == 0.0 and int(zero) == 0


def test_forward_kl_high_temperature_limit() -> None:
    # As τ → ∞ both distributions tend to uniform: KL → 0, and τ²·KL tends to the logit-matching
    # limit (Hinton et al.) (1 / 2V) · Σ_v (a_v − mean(a))² with a = z_T − z_S, per position.
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(1, 2, 6, generator=gen), torch.randn(1, 2, 6, generator=gen)
    mask = torch.ones(1, 2, dtype=torch.bool)
    a = (teacher - student).double()
    limit = ((a - a.mean(-1, keepdim=True)) ** 2).sum(-1).div(2 * 6).sum().item()
    tau = 200.0
    total, _ = forward_kl(student, teacher, mask, temperature=tau)
    assert total.item() == pytest.approx(0.0, abs=1e-4)
    assert tau**2 * total.item() == pytest.approx(limit, rel=2e-2)
    # and the temperature really changes the value
    assert forward_kl(student, teacher, mask, temperature=2.0)[0].item() < forward_kl(student, teacher, mask)[0].item()


def test_forward_kl_rejects_bad_arguments() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="same"):
        forward_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), mask)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), mask, temperature=0.0)


# ------------------------------------------------------------------------------------- CE and NLL
def test_token_cross_entropy_uniform_logits_is_n_log_v() -> None:
    v = 7
    targets = torch.tensor([[0, 3, 6], [2, 2, 5]])
    total, count = token_cross_entropy(torch.zeros(2, 3, v), targets)
    assert total.item() == pytest.approx(6 * math.log(v), rel=1e-6)
    assert int(count) == 6


def test_token_cross_entropy_two_position_hand_example() -> None:
    # logits [2, 0, 0] with target 0: −log(e² / (e² + 2)) = ln(e² + 2) − 2 = 0.2395447662
    # logits [0, 1, 0] with target 2: −log(1 / (e + 2))  = ln(e + 2)     = 1.5514447139
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    total, count = token_cross_entropy(logits, torch.tensor([[0, 2]]))
    assert total.item() == pytest.approx(0.2395447662 + 1.5514447139, rel=1e-6)
    assert int(count) == 2
    assert total.dtype == torch.float32
    half, _ = token_cross_entropy(logits.bfloat16(), torch.tensor([[0, 2]]))
    assert half.dtype == torch.float32  # computed in float32 whatever the logits' dtype


def test_token_cross_entropy_ignores_ignore_index() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, -9.0, 0.0]]])
    total, count = token_cross_entropy(logits, torch.tensor([[0, 2, IGNORE_INDEX]]))
    assert total.item() == pytest.approx(0.2395447662 + 1.5514447139, rel=1e-6)
    assert int(count) == 2
    nothing, zero = token_cross_entropy(logits, torch.full((1, 3), IGNORE_INDEX))
    assert nothing.item() == 0.0 and int(zero) == 0


def test_next_token_nll_shifts_by_one() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 9, generator=gen)
    labels = torch.randint(0, 9, (2, 5), generator=gen)
    labels[0, :2] = IGNORE_INDEX  # a prompt
    labels[1, 4] = IGNORE_INDEX  # padding
    total, count = next_token_nll(logits, labels)
    ref_total, ref_count = token_cross_entropy(logits[:, :-1], labels[:, 1:])
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    # position t predicts labels[t + 1]: row 0 has labels 2, 3, 4 to predict, row 1 has 1, 2, 3
    assert int(count) == int(ref_count) == 6
    by_hand = sum(-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                  for b in range(2) for t in range(1, 5) if labels[b, t] != IGNORE_INDEX)
    assert total.item() == pytest.approx(by_hand, rel=1e-5)
    # the unshifted loss is a different number: the shift is really there
    assert abs(token_cross_entropy(logits, labels)[0].item() - total.item()) > 1e-3


def test_token_losses_reject_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        token_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        next_token_nll(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------- TVD and JS
# Two tokens, vocabulary 2. Token 0: p_S = (½, ½), p_T = (¾, ¼) (logits log of the probabilities).
# Token 1: p_S = p_T = (0.9, 0.1).
_PS = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])
_PT = torch.tensor([[[0.75, 0.25], [0.9, 0.1]]])


def test_tvd_two_tokens_by_hand() -> None:
    # token 0: ½ (|½ − ¾| + |½ − ¼|) = ½ (¼ + ¼) = ¼; token 1: 0
    total, count = total_variation(_PS.log(), _PT.log(), torch.ones(1, 2, dtype=torch.bool))
    assert total.item() == pytest.approx(0.25, abs=1e-6) and int(count) == 2
    total, count = total_variation(_PS.log(), _PT.log(), torch.tensor([[False, True]]))
    assert total.item() == pytest.approx(0.0, abs=1e-7) and int(count) == 1


def test_tvd_limits_identical_zero_disjoint_one() -> None:
    logits = torch.randn(3, 4, 9, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert total_variation(logits, logits + 7.0, mask)[0].item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    far = torch.tensor([[[50.0, -50.0]]]), torch.tensor([[[-50.0, 50.0]]])
    assert total_variation(*far, torch.ones(1, 1, dtype=torch.bool))[0].item() == pytest.approx(1.0, abs=1e-6)


def test_js_two_tokens_by_hand() -> None:
    # token 0: m = (⅝, ⅜). KL(p_T‖m) = ¾ ln(6/5) + ¼ ln(2/3); KL(p_S‖m) = ½ ln(4/5) + ½ ln(4/3)
    kl_t = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    kl_s = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    mask = torch.ones(1, 2, dtype=torch.bool)
    total, count = jensen_shannon(_PS.log(), _PT.log(), mask)
    assert total.item() == pytest.approx(0.5 * kl_t + 0.5 * kl_s, abs=1e-6) and int(count) == 2
    # the released calc_js_loss keeps the student's term only
    total, _ = jensen_shannon(_PS.log(), _PT.log(), mask, terms="student")
    assert total.item() == pytest.approx(kl_s, abs=1e-6)
    # β = ¼: m = ¼ p_T + ¾ p_S = (0.5625, 0.4375)
    m = (0.5625, 0.4375)
    kl_t = 0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])
    kl_s = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    total, _ = jensen_shannon(_PS.log(), _PT.log(), mask, beta=0.25)
    assert total.item() == pytest.approx(0.25 * kl_t + 0.75 * kl_s, abs=1e-6)


def test_js_limits_identical_zero_disjoint_log2_and_bad_beta() -> None:
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 3, dtype=torch.bool)
    for terms in ("both", "student"):
        assert jensen_shannon(logits, logits.clone(), mask, terms=terms)[0].item() == pytest.approx(0.0, abs=1e-6)
    far = torch.tensor([[[60.0, -60.0]]]), torch.tensor([[[-60.0, 60.0]]])
    total, _ = jensen_shannon(*far, torch.ones(1, 1, dtype=torch.bool))
    assert total.item() == pytest.approx(math.log(2.0), abs=1e-6)  # finite where p underflows
    with pytest.raises(ValueError, match="beta"):
        jensen_shannon(logits, logits, mask, beta=1.0)
