"""Hand-computed tests for kdlab.losses.returns (induced rewards, K-step returns, PG loss)."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.losses.returns import (
    induced_rewards,
    kstep_returns,
    one_step_returns,
    one_step_rewards,
    policy_gradient_loss,
)

# One sequence of length 5 over a vocabulary of 3. Row t = teacher logits predicting action t.
LOGITS = torch.tensor(
    [
        [1.0, 2.0, 0.0],  # a0 = 1: q = 2, V = 2
        [0.0, 3.0, 1.0],  # a1 = 0: q = 0, V = 3
        [2.0, 1.0, 4.0],  # a2 = 2: q = 4, V = 4
        [1.0, 1.0, 1.0],  # a3 = 1: q = 1, V = 1
        [5.0, 0.0, 2.0],  # a4 = 0: q = 5, V = 5
    ]
).unsqueeze(0)
ACTIONS = torch.tensor([[1, 0, 2, 1, 0]])
MASK = torch.ones(1, 5, dtype=torch.bool)


def test_k2_hand_computed_length5() -> None:
    # R_t = q_t − V_{t+2}: R0 = 2−4 = −2, R1 = 0−1 = −1, R2 = 4−5 = −1, R3 = 1−0 = 1, R4 = 5−0 = 5
    r = induced_rewards(LOGITS, ACTIONS, MASK, k=2, center_logits=False)
    assert torch.equal(r, torch.tensor([[-2.0, -1.0, -1.0, 1.0, 5.0]]))
    # G_t = R_t + G_{t+2}: G4 = 5, G3 = 1, G2 = −1+5 = 4, G1 = −1+1 = 0, G0 = −2+4 = 2
    g = kstep_returns(r, MASK, k=2)
    assert torch.equal(g, torch.tensor([[2.0, 0.0, 4.0, 1.0, 5.0]]))


def test_k1_hand_computed_and_equals_one_step_definition() -> None:
    # r_t = q_t − V_{t+1}: −1, −4, 3, −4, 5 ; G = reverse cumsum: −1, 0, 4, 1, 5
    r1 = induced_rewards(LOGITS, ACTIONS, MASK, k=1, center_logits=False)
    assert torch.equal(r1, torch.tensor([[-1.0, -4.0, 3.0, -4.0, 5.0]]))
    g1 = kstep_returns(r1, MASK, k=1)
    assert torch.equal(g1, torch.tensor([[-1.0, 0.0, 4.0, 1.0, 5.0]]))


@pytest.mark.parametrize("bellman", ["hard", "soft"])
def test_k1_equals_one_step_return_random_padded(bellman: str) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g)
    actions = torch.randint(0, 11, (4, 7), generator=g)
    lengths = torch.tensor([7, 3, 1, 5])
    mask = torch.arange(7)[None] < lengths[:, None]
    r = one_step_rewards(logits, actions, mask, bellman=bellman)
    expected = one_step_returns(r, mask)
    # explicit loop definition of G_t = Σ_{i ≥ t} r_i
    for b in range(4):
        for t in range(int(lengths[b])):
            assert expected[b, t].item() == pytest.approx(r[b, t:lengths[b]].sum().item(), abs=1e-5)
    got = kstep_returns(induced_rewards(logits, actions, mask, k=1, bellman=bellman), mask, k=1)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("k", [5, 6, 100])
def test_k_at_least_length_gives_taken_logit(k: int) -> None:
    g = kstep_returns(induced_rewards(LOGITS, ACTIONS, MASK, k=k, center_logits=False), MASK, k=k)
    assert torch.equal(g, torch.tensor([[2.0, 0.0, 4.0, 1.0, 5.0]]))
    # centred: q(s_t, a_t) − mean_a q(s_t, a); row means 1, 4/3, 7/3, 1, 7/3
    gc = kstep_returns(induced_rewards(LOGITS, ACTIONS, MASK, k=k), MASK, k=k)
    exp = torch.tensor([[2 - 1.0, 0 - 4 / 3, 4 - 7 / 3, 1 - 1.0, 5 - 7 / 3]])
    assert torch.allclose(gc, exp, atol=1e-6)


def test_soft_vs_hard() -> None:
    # soft V = logsumexp; K = 2 on position 0: R0 = 2 − logsumexp(2, 1, 4)
    soft = induced_rewards(LOGITS, ACTIONS, MASK, k=2, bellman="soft", center_logits=False)
    lse2 = math.log(math.exp(2) + math.exp(1) + math.exp(4))
    assert soft[0, 0].item() == pytest.approx(2 - lse2, abs=1e-6)
    assert soft[0, 3].item() == 1.0 and soft[0, 4].item() == 5.0  # past the end: V = 0 for both
    hard = induced_rewards(LOGITS, ACTIONS, MASK, k=2, bellman="hard", center_logits=False)
    # logsumexp ≥ max, so soft rewards are ≤ hard rewards wherever a next value exists
    assert torch.all(soft[0, :3] < hard[0, :3])
    with pytest.raises(ValueError, match="bellman"):
        induced_rewards(LOGITS, ACTIONS, MASK, bellman="mean")  # type: ignore[arg-type]


def test_padding_never_leaks() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 9, generator=g)
    actions = torch.randint(0, 9, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    logits2, actions2 = logits.clone(), actions.clone()
    logits2[~mask] = 1e4 * torch.randn(int((~mask).sum()), 9, generator=g)
    actions2[~mask] = 12345  # out-of-vocabulary padding id
    for k in (1, 2, 4):
        for bellman in ("hard", "soft"):
            r1 = induced_rewards(logits, actions, mask, k=k, bellman=bellman)
            r2 = induced_rewards(logits2, actions2, mask, k=k, bellman=bellman)
            assert torch.equal(r1, r2)
            g1, g2 = kstep_returns(r1, mask, k), kstep_returns(r2 + 7.0 * (~mask), mask, k)
            assert torch.equal(g1, g2)
            assert torch.all(g1[~mask] == 0)
    # the last real action of row 1 (t = 2) sees V = 0: its K=1 reward is just q(s_2, a_2)
    q = logits - logits.mean(-1, keepdim=True)
    r = induced_rewards(logits, actions, mask, k=1)
    assert r[1, 2].item() == pytest.approx(q[1, 2, actions[1, 2]].item(), abs=1e-6)


def test_clip_and_divisor() -> None:
    r = induced_rewards(LOGITS, ACTIONS, MASK, k=2, center_logits=False, divisor=2.0, clip=1.0)
    # raw −2, −1, −1, 1, 5 → /2 → −1, −.5, −.5, .5, 2.5 → clip ±1
    assert torch.equal(r, torch.tensor([[-1.0, -0.5, -0.5, 0.5, 1.0]]))


def test_policy_gradient_loss_hand_computed() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]], requires_grad=True)
    ret = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    # none: loss = −(3·−1 + 1·−2 + 2·−3 + 1·−.5 + 5·−1.5)/5 = −(−3 −2 −6 −.5 −7.5)/5 = 19/5
    out = policy_gradient_loss(logp, ret, mask, baseline="none")
    assert out.loss.item() == pytest.approx(3.8)
    assert out.return_mean.item() == pytest.approx(12 / 5)
    # batch-mean per position: b = (2, 3, 2) → A = [[1, −2, 0], [−1, 2, ·]]
    out = policy_gradient_loss(logp, ret, mask, baseline="batch-mean")
    # loss = −(1·−1 + −2·−2 + 0 + −1·−.5 + 2·−1.5)/5 = −(−1 + 4 + .5 − 3)/5 = −0.1
    assert out.loss.item() == pytest.approx(-0.1)
    assert out.advantage_mean.item() == pytest.approx(0.0)
    assert out.advantage_std.item() == pytest.approx(math.sqrt((1 + 4 + 0 + 1 + 4) / 5))
    out.loss.backward()
    # d loss / d logp = −A / 5 on valid tokens, 0 on padding
    assert torch.allclose(logp.grad, torch.tensor([[-0.2, 0.4, 0.0], [0.2, -0.4, 0.0]]))
    # running mean 2 → A = [[1, −1, 0], [−1, 3, ·]]: loss = −(−1 + 2 + 0 + .5 − 4.5)/5 = 0.6
    out = policy_gradient_loss(logp, ret, mask, baseline="running-mean", running_mean=torch.tensor(2.0))
    assert out.loss.item() == pytest.approx(0.6)
    # normalised advantages have mean 0 / std 1 over valid tokens → loss = −Σ Â·logp / 5
    out = policy_gradient_loss(logp, ret, mask, baseline="none", normalize=True)
    a = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])
    a_hat = (a - a.mean()) / (a.std(unbiased=False) + 1e-6)
    lp = torch.tensor([-1.0, -2.0, -3.0, -0.5, -1.5])
    assert out.loss.item() == pytest.approx(-(a_hat * lp).sum().item() / 5, abs=1e-5)


def test_policy_gradient_all_padding_is_zero() -> None:
    logp = torch.randn(2, 4, requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    out = policy_gradient_loss(logp, torch.randn(2, 4), mask, baseline="batch-mean", normalize=True)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.all(logp.grad == 0)
