"""Hand-computed tests for kdlab.losses.returns (induced rewards, K-step returns, PG loss)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from kdlab.losses.returns import (
    induced_rewards,
    kstep_returns,
    kstep_returns_from_logits,
    length_normalized_returns,
    logprob_grad_sq,
    normalized_teacher_logits,
    one_step_returns,
    one_step_rewards,
    policy_gradient_loss,
    state_values,
    teacher_expected_baseline,
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


@pytest.mark.parametrize("state_value", ["max", "expected", "logsumexp"])
def test_k1_equals_one_step_return_random_padded(state_value: str) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g)
    actions = torch.randint(0, 11, (4, 7), generator=g)
    lengths = torch.tensor([7, 3, 1, 5])
    mask = torch.arange(7)[None] < lengths[:, None]
    r = one_step_rewards(logits, actions, mask, state_value=state_value)
    expected = one_step_returns(r, mask)
    # explicit loop definition of G_t = Σ_{i ≥ t} r_i
    for b in range(4):
        for t in range(int(lengths[b])):
            assert expected[b, t].item() == pytest.approx(r[b, t:lengths[b]].sum().item(), abs=1e-5)
    got = kstep_returns(induced_rewards(logits, actions, mask, k=1, state_value=state_value), mask, k=1)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("k", [5, 6, 100])
def test_k_at_least_length_gives_taken_logit(k: int) -> None:
    g = kstep_returns(induced_rewards(LOGITS, ACTIONS, MASK, k=k, center_logits=False), MASK, k=k)
    assert torch.equal(g, torch.tensor([[2.0, 0.0, 4.0, 1.0, 5.0]]))
    # centred: q(s_t, a_t) − mean_a q(s_t, a); row means 1, 4/3, 7/3, 1, 7/3
    gc = kstep_returns(induced_rewards(LOGITS, ACTIONS, MASK, k=k), MASK, k=k)
    exp = torch.tensor([[2 - 1.0, 0 - 4 / 3, 4 - 7 / 3, 1 - 1.0, 5 - 7 / 3]])
    assert torch.allclose(gc, exp, atol=1e-6)


def test_logsumexp_vs_max() -> None:
    # soft V = logsumexp; K = 2 on position 0: R0 = 2 − logsumexp(2, 1, 4)
    soft = induced_rewards(LOGITS, ACTIONS, MASK, k=2, state_value="logsumexp", center_logits=False)
    lse2 = math.log(math.exp(2) + math.exp(1) + math.exp(4))
    assert soft[0, 0].item() == pytest.approx(2 - lse2, abs=1e-6)
    assert soft[0, 3].item() == 1.0 and soft[0, 4].item() == 5.0  # past the end: V = 0 for both
    hard = induced_rewards(LOGITS, ACTIONS, MASK, k=2, state_value="max", center_logits=False)
    # logsumexp ≥ max, so soft rewards are ≤ hard rewards wherever a next value exists
    assert torch.all(soft[0, :3] < hard[0, :3])
    with pytest.raises(ValueError, match="state_value"):
        induced_rewards(LOGITS, ACTIONS, MASK, state_value="hard")  # type: ignore[arg-type]


def test_padding_never_leaks() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 9, generator=g)
    actions = torch.randint(0, 9, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    logits2, actions2 = logits.clone(), actions.clone()
    logits2[~mask] = 1e4 * torch.randn(int((~mask).sum()), 9, generator=g)
    actions2[~mask] = 12345  # out-of-vocabulary padding id
    for k in (1, 2, 4):
        for state_value, tail in itertools.product(("max", "expected", "logsumexp"), ("zero", "last-state")):
            r1 = induced_rewards(logits, actions, mask, k=k, state_value=state_value, kstep_tail=tail)
            r2 = induced_rewards(logits2, actions2, mask, k=k, state_value=state_value, kstep_tail=tail)
            assert torch.equal(r1, r2)
            g1, g2 = kstep_returns(r1, mask, k, tail), kstep_returns(r2 + 7.0 * (~mask), mask, k, tail)
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


# ---------------------------------------------------------------- state value: max / expected / logsumexp


def test_state_value_expected_hand_computed() -> None:
    # row [1, 1, 1]: every value is 1 for max and expected, 1 + ln 3 for logsumexp
    flat = torch.tensor([[[1.0, 1.0, 1.0]]])
    assert state_values(flat, "max", center_logits=False).item() == pytest.approx(1.0)
    assert state_values(flat, "expected", center_logits=False).item() == pytest.approx(1.0)
    assert state_values(flat, "logsumexp", center_logits=False).item() == pytest.approx(1 + math.log(3))
    # row [0, ln 3]: softmax = (1/4, 3/4); expected = 3/4·ln 3; centred (mean ln3/2): ln3/4 (softmax unchanged)
    two = torch.tensor([[[0.0, math.log(3)]]])
    assert state_values(two, "expected", center_logits=False).item() == pytest.approx(0.75 * math.log(3))
    assert state_values(two, "expected").item() == pytest.approx(math.log(3) / 4)
    # K = 2 on LOGITS: R0 = q0 − V(s2) with s2 logits (2, 1, 4); R1 = q1 − V(s3) = 0 − 1 for max and expected
    e = [math.exp(2), math.exp(1), math.exp(4)]
    expected_s2 = (2 * e[0] + 1 * e[1] + 4 * e[2]) / sum(e)  # ≈ 3.6455
    r = induced_rewards(LOGITS, ACTIONS, MASK, k=2, state_value="expected", center_logits=False)
    assert r[0, 0].item() == pytest.approx(2 - expected_s2, abs=1e-6)
    assert r[0, 1].item() == pytest.approx(-1.0, abs=1e-6)
    # R2 = q2 − V(s4), s4 logits (5, 0, 2): V = (5e⁵ + 0·e⁰ + 2e²)/(e⁵ + e⁰ + e²) ≈ 4.827
    v4 = (5 * math.exp(5) + 2 * math.exp(2)) / (math.exp(5) + 1 + math.exp(2))
    assert r[0, 2].item() == pytest.approx(4 - v4, abs=1e-6)
    assert r[0, 3].item() == 1.0 and r[0, 4].item() == 5.0  # zero tail: V = 0 past the end
    # expected ≤ max ≤ logsumexp  ⇒  rewards ordered the other way wherever a next value exists
    r_max = induced_rewards(LOGITS, ACTIONS, MASK, k=2, state_value="max", center_logits=False)
    r_lse = induced_rewards(LOGITS, ACTIONS, MASK, k=2, state_value="logsumexp", center_logits=False)
    assert torch.all(r[0, :3] >= r_max[0, :3]) and torch.all(r_max[0, :3] > r_lse[0, :3])


# ---------------------------------------------------------------- K-step tail: zero / last-state

# LOGITS with the last action changed to a4 = 2: q = (2, 0, 4, 1, 2), V_max = (2, 3, 4, 1, 5)
ACTIONS_B = torch.tensor([[1, 0, 2, 1, 2]])


def test_last_state_tail_hand_computed_length5_k2() -> None:
    # last-state: R_t = q_t − V(s_min(t+2, 4)) for t < 4, R4 = q4:
    #   R0 = 2 − V2 = −2, R1 = 0 − V3 = −1, R2 = 4 − V4 = −1, R3 = 1 − V4 = −4, R4 = 2
    r = induced_rewards(LOGITS, ACTIONS_B, MASK, k=2, center_logits=False, kstep_tail="last-state")
    assert torch.equal(r, torch.tensor([[-2.0, -1.0, -1.0, -4.0, 2.0]]))
    # chains 0,2 and 1,3 (< n−1 = 4), then R4 once:
    #   G0 = R0 + R2 + R4 = −1 (the chain lands on 4: counted once), G1 = R1 + R3 + R4 = −3
    #   (= q1 − V(s3) + q3 − V(s4) + q4 = 0 − 1 + 1 − 5 + 2), G2 = R2 + R4 = 1, G3 = R3 + R4 = −2, G4 = 2
    g = kstep_returns(r, MASK, k=2, kstep_tail="last-state")
    assert torch.equal(g, torch.tensor([[-1.0, -3.0, 1.0, -2.0, 2.0]]))
    # zero tail on the same rollout: R = (−2, −1, −1, 1 − 0, 2 − 0); G = (−1, 0, 1, 1, 2)
    gz = kstep_returns(induced_rewards(LOGITS, ACTIONS_B, MASK, k=2, center_logits=False), MASK, k=2)
    assert torch.equal(gz, torch.tensor([[-1.0, 0.0, 1.0, 1.0, 2.0]]))
    # they differ only on the chain that misses position 4 (t = 1, 3), by q4 − V(s4) = 2 − 5 = −3
    assert torch.equal(g - gz, torch.tensor([[0.0, -3.0, 0.0, -3.0, 0.0]]))
    # with the teacher's argmax as last action (ACTIONS: q4 = V4 = 5) the returns coincide, rewards don't
    r_a = induced_rewards(LOGITS, ACTIONS, MASK, k=2, center_logits=False, kstep_tail="last-state")
    assert torch.equal(r_a, torch.tensor([[-2.0, -1.0, -1.0, -4.0, 5.0]]))
    assert torch.equal(kstep_returns(r_a, MASK, 2, "last-state"), torch.tensor([[2.0, 0.0, 4.0, 1.0, 5.0]]))


@pytest.mark.parametrize("k", [4, 5, 6, 100])
def test_last_state_k_at_least_n_minus_1(k: int) -> None:
    # K ≥ n − 1 = 4: every t < 4 sees V(s4) = 5: R = (2−5, 0−5, 4−5, 1−5, 2) = (−3, −5, −1, −4, 2)
    # G_t = R_t + R4 = q_t − V(s_{n−1}) + q_{n−1}: (−1, −3, 1, −2, 2); G4 = 2
    out = kstep_returns_from_logits(LOGITS, ACTIONS_B, MASK, k=k, kstep_tail="last-state", center_logits=False)
    assert torch.equal(out.rewards, torch.tensor([[-3.0, -5.0, -1.0, -4.0, 2.0]]))
    assert torch.equal(out.returns, torch.tensor([[-1.0, -3.0, 1.0, -2.0, 2.0]]))
    # zero tail at K ≥ n: G_t = q_t; at K = 4: R0 = q0 − V4 = −3, G0 = R0 + R4 = −1, others q_t
    zero = kstep_returns_from_logits(LOGITS, ACTIONS_B, MASK, k=k, center_logits=False)
    exp_zero = [-1.0, 0.0, 4.0, 1.0, 2.0] if k == 4 else [2.0, 0.0, 4.0, 1.0, 2.0]
    assert torch.equal(zero.returns, torch.tensor([exp_zero]))


@pytest.mark.parametrize("state_value", ["max", "expected", "logsumexp"])
def test_k1_both_tails_coincide(state_value: str) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 7, 11, generator=g)
    actions = torch.randint(0, 11, (4, 7), generator=g)
    mask = torch.arange(7)[None] < torch.tensor([7, 3, 1, 0])[:, None]
    zero = kstep_returns_from_logits(logits, actions, mask, k=1, state_value=state_value)
    last = kstep_returns_from_logits(logits, actions, mask, k=1, state_value=state_value, kstep_tail="last-state")
    assert torch.equal(zero.rewards, last.rewards)  # min(t + 1, n − 1) = t + 1 for t < n − 1
    assert torch.allclose(zero.returns, last.returns, atol=1e-5)  # same sum, another summation order
    assert torch.allclose(last.returns, one_step_returns(last.rewards, mask), atol=1e-5)


def _released_last_state_row(logits: Tensor, actions: Tensor, k: int, softmax: bool) -> Tensor:
    """Loop re-statement of the released KETCHUP code for ONE unpadded row of length n ending in EOS.

    reinforce.py ``reward_fn``: centred logits, V of ``torch.roll(logits, −K)``, V zeroed at EOS (the
    last position); utils/helper.py ``n_step_reward_shift_upgrade`` (K > 1) or ``calc_returns`` (K = 1).
    """
    n = logits.shape[0]
    q = logits - logits.mean(-1, keepdim=True)
    sel = q.gather(-1, actions[:, None]).squeeze(-1)
    nxt = torch.roll(q, -k, 0)
    nsv = (torch.softmax(nxt, -1) * nxt).sum(-1) if softmax else nxt.max(-1).values
    nsv[n - 1] = 0.0  # output_ids == eos
    reward = sel - nsv
    if k == 1:
        return reward.flip(0).cumsum(0).flip(0)
    for t in range(n):
        if t + k >= n - 1 and t != n - 1 and k < n:
            reward[t] = sel[t] - nsv[-((1 + k) % n)]
    returns = torch.zeros_like(reward)
    for r in range(k):
        keep = torch.zeros_like(reward)
        keep[r::k] = 1
        keep[n - 1] = 1
        returns[r::k] = (reward * keep).flip(0).cumsum(0).flip(0)[r::k]
    return returns


@pytest.mark.parametrize("state_value", ["max", "expected"])
def test_last_state_matches_released_loops_per_row(state_value: str) -> None:
    g = torch.Generator().manual_seed(3)
    lengths = [9, 6, 4, 2, 1]
    logits = torch.randn(5, 9, 13, generator=g)
    actions = torch.randint(0, 13, (5, 9), generator=g)
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    for k in range(1, 11):
        got = kstep_returns_from_logits(logits, actions, mask, k=k, state_value=state_value, kstep_tail="last-state")
        assert torch.all(got.returns[~mask] == 0)
        for b, n in enumerate(lengths):
            row_l, row_a = logits[b, :n], actions[b, :n]
            if k < n:  # the released code, batch of one, no padding
                ref = _released_last_state_row(row_l, row_a, k, softmax=state_value == "expected")
            else:  # closed form: G_t = q_t − V(s_{n−1}) + q_{n−1} (t < n−1), G_{n−1} = q_{n−1}
                q = row_l - row_l.mean(-1, keepdim=True)
                sel = q.gather(-1, row_a[:, None]).squeeze(-1)
                v_last = state_values(row_l[None], state_value)[0, n - 1]
                ref = sel - v_last + sel[n - 1]
                ref[n - 1] = sel[n - 1]
            assert torch.allclose(got.returns[b, :n], ref, atol=1e-5), (k, b)
    # K ≥ n in the released code: the roll wraps; K = n gives R_t = q_t − V(s_t) (documented deviation)
    n = lengths[1]
    released = _released_last_state_row(logits[1, :n], actions[1, :n], n, softmax=state_value == "expected")
    ours = kstep_returns_from_logits(logits[1:2, :n], actions[1:2, :n], mask[1:2, :n], k=n, state_value=state_value,
                                     kstep_tail="last-state").returns[0]
    q = logits[1, :n] - logits[1, :n].mean(-1, keepdim=True)
    sel = q.gather(-1, actions[1, :n, None]).squeeze(-1)
    v = state_values(logits[1:2, :n], state_value)[0]
    assert torch.allclose(released[: n - 1], sel[: n - 1] - v[: n - 1] + sel[n - 1], atol=1e-5)
    assert not torch.allclose(released, ours, atol=1e-3)


def test_last_state_needs_prefix_mask_and_valid_tail() -> None:
    mask = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="prefix"):
        kstep_returns(torch.ones(1, 3), mask, 2, kstep_tail="last-state")
    with pytest.raises(ValueError, match="prefix"):
        induced_rewards(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), mask, k=2, kstep_tail="last-state")
    with pytest.raises(ValueError, match="kstep_tail"):
        kstep_returns(torch.ones(1, 3), mask, 2, kstep_tail="last")  # type: ignore[arg-type]


def test_last_state_padded_rows_hand_computed() -> None:
    # two rows, K = 2: row 0 = R (1, 2, 3, 4) n = 4; row 1 = R (5, 6) n = 2; row 2 empty
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 99.0, 99.0], [99.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # row 0: G0 = R0 + R2 + R3 = 8, G1 = R1 + R3 = 6 (lands on 3: once), G2 = R2 + R3 = 7, G3 = 4
    # row 1: G0 = R0 + R1 = 11, G1 = 6;  zero tail: row 0 (1+3, 2+4, 3, 4), row 1 (5, 6)
    assert torch.equal(kstep_returns(r, mask, 2, "last-state"),
                       torch.tensor([[8.0, 6.0, 7.0, 4.0], [11.0, 6.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(kstep_returns(r, mask, 2, "zero"),
                       torch.tensor([[4.0, 6.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- policy gradient: weight and baselines


def test_student_prob_hand_computed_clip_on_weight_and_mean_after_pi() -> None:
    ln2 = math.log(2)
    logp = torch.tensor([[-ln2, -2 * ln2, -ln2, 0.0]], requires_grad=True)  # π = (1/2, 1/4, 1/2, 1)
    ret = torch.tensor([[4.0, 8.0, 80.0, 120.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # w = clip(G·π, ±50) = clip(2, 2, 40, 120) = (2, 2, 40, 50)   (clipping G first would give 25 at t=2)
    # loss = −(2·−ln2 + 2·−2ln2 + 40·−ln2 + 50·0)/4 = 46 ln2 / 4
    out = policy_gradient_loss(logp, ret, mask, "none", pg_weight="student-prob", weight_clip=50.0)
    assert out.loss.item() == pytest.approx(46 * ln2 / 4, abs=1e-5)
    assert out.advantage_mean.item() == pytest.approx(94 / 4, abs=1e-5)
    out.loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([[2.0, 2.0, 40.0, 50.0]]) / 4, atol=1e-5)
    # KETCHUP "mean": b = mean w = 23.5 AFTER ·π and clip: w − b = (−21.5, −21.5, 16.5, 26.5)
    # loss = −(21.5 ln2 + 43 ln2 − 16.5 ln2 + 0)/4 = −12 ln2     (b from G, 53, would differ)
    out = policy_gradient_loss(logp, ret, mask, "mean", pg_weight="student-prob", weight_clip=50.0)
    assert out.loss.item() == pytest.approx(-12 * ln2, abs=1e-5)
    assert out.advantage_mean.item() == pytest.approx(0.0, abs=1e-5)
    # no clip: w = (2, 2, 40, 120); loss = −(−2ln2 − 4ln2 − 40ln2)/4 = 46 ln2/4 (the 120 has log π = 0)
    out = policy_gradient_loss(logp, ret, mask, "none", pg_weight="student-prob")
    assert out.advantage_mean.item() == pytest.approx(164 / 4, abs=1e-5)


def test_student_prob_with_pi_one_equals_logprob() -> None:
    # π = 1 (log π = 0): the weights, hence the gradients, are the same; the clip (100) does not bind
    ret = torch.tensor([[3.0, -1.0, 2.0], [1.0, 5.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    grads = []
    for weight in ("logprob", "student-prob"):
        for baseline in ("none", "mean", "batch-mean", "min-variance"):
            logp = torch.zeros(2, 3, requires_grad=True)
            out = policy_gradient_loss(
                logp, ret, mask, baseline, pg_weight=weight, weight_clip=100.0  # type: ignore[arg-type]
            )
            out.loss.backward()
            grads.append((baseline, logp.grad.clone(), out.advantage_std))
    for (b1, g1, s1), (b2, g2, s2) in zip(grads[:4], grads[4:]):
        assert b1 == b2 and torch.equal(g1, g2) and torch.equal(s1, s2)
    # a binding clip (2) acts on student-prob only: w = (2, −1, 2, 1, 2); logprob ignores it: w = G
    clipped, unclipped = [[2.0, -1.0, 2.0], [1.0, 2.0, 0.0]], [[3.0, -1.0, 2.0], [1.0, 5.0, 0.0]]
    for weight, w in (("student-prob", clipped), ("logprob", unclipped)):
        logp = torch.zeros(2, 3, requires_grad=True)
        out = policy_gradient_loss(logp, ret, mask, "none", pg_weight=weight, weight_clip=2.0)  # type: ignore[arg-type]
        out.loss.backward()
        assert torch.equal(logp.grad, -torch.tensor(w) / 5)


def test_mean_vs_batch_mean_equal_length_rows() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -1.0]])
    ret = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 9.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    # batch-mean: b = (2, 3, 5.5) per position → A = [[1, −2, −3.5], [−1, 2, 3.5]]
    # Σ A·logp = −1 + 4 + 10.5 + .5 − 3 − 3.5 = 7.5 → loss = −7.5/6 = −1.25
    bm = policy_gradient_loss(logp, ret, mask, "batch-mean")
    assert bm.loss.item() == pytest.approx(-1.25)
    assert bm.advantage_std.item() == pytest.approx(math.sqrt((1 + 4 + 12.25) * 2 / 6))
    # mean: one scalar b = 21/6 = 3.5 → A = [[−.5, −2.5, −1.5], [−2.5, 1.5, 5.5]]
    # Σ A·logp = .5 + 5 + 4.5 + 1.25 − 2.25 − 5.5 = 3.5 → loss = −3.5/6
    mn = policy_gradient_loss(logp, ret, mask, "mean")
    assert mn.loss.item() == pytest.approx(-3.5 / 6)
    assert mn.advantage_std.item() == pytest.approx(math.sqrt((0.25 + 6.25 + 2.25 + 6.25 + 2.25 + 30.25) / 6))
    # in logprob mode without a clip, "mean" = "running-mean" fed this batch's mean return
    rm = policy_gradient_loss(logp, ret, mask, "running-mean")
    assert torch.equal(rm.loss, mn.loss)


def test_min_variance_hand_computed() -> None:
    logp = torch.full((2, 4), -1.0)
    ret = torch.tensor([[1.0, 2.0, 3.0, 6.0], [100.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    g2 = torch.tensor([[1.0, 0.0, 1.0, 2.0], [50.0, 50.0, 50.0, 50.0]])  # padding row must not count
    # b = Σ G g² / Σ g² = (1 + 0 + 3 + 12)/4 = 4 → A = (−3, −2, −1, 2); loss = −Σ A·(−1)/4 = ΣA/4 = −1
    out = policy_gradient_loss(logp, ret, mask, "min-variance", grad_sq=g2)
    assert out.loss.item() == pytest.approx(-1.0)
    assert out.advantage_mean.item() == pytest.approx(-1.0)
    # released code: g = d Σ lprobs / d lprobs ≡ 1 → b = mean = 3: A = (−2, −1, 0, 3), loss = 0
    out = policy_gradient_loss(logp, ret, mask, "min-variance")
    assert out.loss.item() == pytest.approx(0.0)
    assert torch.equal(out.loss, policy_gradient_loss(logp, ret, mask, "mean").loss)
    # all g² = 0 → no baseline
    out = policy_gradient_loss(logp, ret, mask, "min-variance", grad_sq=torch.zeros(2, 4))
    assert out.loss.item() == pytest.approx(12 / 4)


def test_logprob_grad_sq_matches_autograd() -> None:
    # logits (0, 0), action 0: π = (½, ½): ‖(1, 0) − (½, ½)‖² = ½ = 1 − 2·½ + (¼ + ¼)
    assert logprob_grad_sq(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long),
                           torch.ones(1, 1, dtype=torch.bool)).item() == pytest.approx(0.5)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=g)
    actions = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    for tau in (1.0, 2.0):
        got = logprob_grad_sq(logits, actions, mask, temperature=tau)
        for b in range(2):
            for t in range(3):
                if not mask[b, t]:
                    assert got[b, t] == 0
                    continue
                z = logits[b, t].clone().requires_grad_(True)
                torch.log_softmax(z / tau, -1)[actions[b, t]].backward()
                assert got[b, t].item() == pytest.approx((z.grad ** 2).sum().item(), abs=1e-6)


def test_teacher_expected_baseline_hand_computed() -> None:
    # teacher logits (0, ln 3) at t = 0, (1, 1) at t = 1: centred expected values ln3/4 and 0
    tl = torch.tensor([[[0.0, math.log(3)], [1.0, 1.0], [7.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    b = teacher_expected_baseline(tl, mask)
    assert torch.allclose(b, torch.tensor([[math.log(3) / 4, 0.0, 0.0]]))
    assert torch.allclose(teacher_expected_baseline(tl, mask, divisor=2.0), b / 2)
    # uncentred: 3/4·ln 3 and 1
    assert torch.allclose(teacher_expected_baseline(tl, mask, center_logits=False),
                          torch.tensor([[0.75 * math.log(3), 1.0, 0.0]]))
    # PG: G = (3, 1), b = (1, 2) → A = (2, −1); logprob: loss = −(2·−1 + −1·−3)/2 = −0.5
    logp = torch.tensor([[-1.0, -3.0, 0.0]])
    ret = torch.tensor([[3.0, 1.0, 0.0]])
    tb = torch.tensor([[1.0, 2.0, 123.0]])
    out = policy_gradient_loss(logp, ret, mask, "teacher-expected", teacher_baseline=tb)
    assert out.loss.item() == pytest.approx(-0.5)
    # student-prob (LMReward order: baseline before ·π): π = (½, ¼): w = (1, −¼)
    # loss = −(1·−ln2 + −¼·−2ln2)/2 = ln2/4
    ln2 = math.log(2)
    logp = torch.tensor([[-ln2, -2 * ln2, 0.0]])
    out = policy_gradient_loss(logp, ret, mask, "teacher-expected", pg_weight="student-prob", teacher_baseline=tb)
    assert out.loss.item() == pytest.approx(ln2 / 4, abs=1e-6)
    with pytest.raises(ValueError, match="teacher_baseline"):
        policy_gradient_loss(logp, ret, mask, "teacher-expected")


def test_policy_gradient_option_errors() -> None:
    logp, ret, mask = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="baseline"):
        policy_gradient_loss(logp, ret, mask, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pg_weight"):
        policy_gradient_loss(logp, ret, mask, pg_weight="prob")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_clip"):
        policy_gradient_loss(logp, ret, mask, weight_clip=0.0)
    with pytest.raises(ValueError, match="grad_sq"):
        policy_gradient_loss(logp, ret, mask, "min-variance", grad_sq=torch.ones(2, 2))


@pytest.mark.parametrize("baseline", ["none", "mean", "min-variance", "batch-mean", "running-mean", "teacher-expected"])
@pytest.mark.parametrize("pg_weight", ["logprob", "student-prob"])
def test_policy_gradient_padding_never_leaks(baseline: str, pg_weight: str) -> None:
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    logp = -torch.rand(3, 4, generator=g)
    ret, tb, g2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g)
    logp2, ret2, tb2, g22 = logp.clone(), ret.clone(), tb.clone(), g2.clone()
    logp2[~mask], ret2[~mask], tb2[~mask], g22[~mask] = -math.inf, 1e6, 1e6, 1e6
    kw = dict(pg_weight=pg_weight, weight_clip=3.0)
    a = policy_gradient_loss(logp, ret, mask, baseline, teacher_baseline=tb, grad_sq=g2, **kw)  # type: ignore[arg-type]
    b = policy_gradient_loss(
        logp2, ret2, mask, baseline, teacher_baseline=tb2, grad_sq=g22, **kw  # type: ignore[arg-type]
    )
    assert torch.isfinite(b.loss) and a.loss.item() == pytest.approx(b.loss.item(), abs=1e-6)
    assert a.advantage_std.item() == pytest.approx(b.advantage_std.item(), abs=1e-6)


def test_normalized_teacher_logits_hand_computed() -> None:
    logits = torch.tensor([[[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]]])
    assert normalized_teacher_logits(logits, "none") is logits
    # [1, 2, 0]: mean 1, population std √(2/3); a flat row has std 0 and stays 0 (no division by 0)
    s = math.sqrt(2 / 3)
    expected = torch.tensor([[[0.0, 1 / s, -1 / s], [0.0, 0.0, 0.0]]])
    assert torch.allclose(normalized_teacher_logits(logits, "token-std"), expected, atol=1e-6)
    lse = math.log(math.e + math.e**2 + 1)
    expected = torch.tensor([[[1 - lse, 2 - lse, -lse], [-math.log(3)] * 3]])
    assert torch.allclose(normalized_teacher_logits(logits, "log-softmax"), expected, atol=1e-6)
    # token-std is invariant to each position's shift and scale (the point of it)
    shifted = logits * torch.tensor([3.0, 0.5]).view(1, 2, 1) + 7.0
    assert torch.allclose(normalized_teacher_logits(shifted, "token-std"), normalized_teacher_logits(logits, "token-std"),
                          atol=1e-5)
    with pytest.raises(ValueError, match="teacher_logit_normalization"):
        normalized_teacher_logits(logits, "z")  # type: ignore[arg-type]


def test_length_normalized_returns_hand_computed() -> None:
    returns = torch.tensor([[-6.0, -4.0, -3.0, 2.0], [-2.0, 1.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    # row 0: n = 4 → divide by 4, 3, 2, 1; row 1: n = 2 → 2, 1, padding stays 0
    expected = torch.tensor([[-1.5, -4 / 3, -1.5, 2.0], [-1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(length_normalized_returns(returns, mask), expected)
    # the point of it: a row of equal per-token rewards r has G_t / (n − t) = r whatever its length
    r = torch.full((1, 6), -0.5)
    for n in (1, 3, 6):
        m = torch.arange(6)[None] < n
        g = kstep_returns(r.masked_fill(~m, 0.0), m, k=1)
        assert torch.allclose(length_normalized_returns(g, m)[m], torch.full((n,), -0.5))
    assert torch.equal(length_normalized_returns(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool)),
                       torch.zeros(1, 3))
