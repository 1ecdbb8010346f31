"""Ranking losses against hand-computed values and their limit cases."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.losses.ranking import (
    hybrid_distill_loss,
    listwise_ce_loss,
    margin_mse_loss,
    pairwise_hinge_loss,
    point_mse_loss,
    rank_loss,
    ranknet_loss,
)

T, F_ = True, False

# two groups; group 2 has a padding doc with a huge label that must be ignored
SCORES = torch.tensor([[1.0, 0.5, 2.0], [0.0, 1.0, 9.0]])
LABELS = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 5.0]])
MASK = torch.tensor([[T, T, T], [T, T, F_]])


def test_hinge_hand_computed() -> None:
    # pairs (y_i > y_j): g1 (0,1): 1-0.5=0.5, (0,2): 1+1=2, (1,2): 1+1.5=2.5; g2 (0,1): 1+1=2
    loss = pairwise_hinge_loss(SCORES, LABELS, MASK, margin=1.0)
    assert loss.item() == pytest.approx((0.5 + 2 + 2.5 + 2) / 4)
    # margin 0: only violated pairs count: diffs 0.5, -1, -1.5, -1 -> 0 + 1 + 1.5 + 1
    assert pairwise_hinge_loss(SCORES, LABELS, MASK, margin=0.0).item() == pytest.approx(3.5 / 4)


def test_ranknet_hand_computed() -> None:
    diffs = [0.5, -1.0, -1.5, -1.0]
    expected = sum(math.log1p(math.exp(-d)) for d in diffs) / 4
    assert ranknet_loss(SCORES, LABELS, MASK).item() == pytest.approx(expected, rel=1e-6)


def test_listwise_hand_computed() -> None:
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 7.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[T, T, T], [T, T, F_]])
    g1 = math.log(1 + math.exp(-1) + math.exp(-2))
    g2 = math.log(2.0)
    assert listwise_ce_loss(scores, labels, mask).item() == pytest.approx((g1 + g2) / 2, rel=1e-6)
    # the positive is the highest label, not necessarily index 0
    perm = torch.tensor([[1, 0, 2]])
    loss = listwise_ce_loss(scores[:1, perm[0]], labels[:1, perm[0]], mask[:1])
    assert loss.item() == pytest.approx(g1, rel=1e-6)


def test_point_mse_hand_computed_and_missing_teacher() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, float("nan")]])
    mask = torch.tensor([[T, T], [T, T]])
    assert point_mse_loss(s, t, mask).item() == pytest.approx((1 + 4 + 4) / 3)


def test_margin_mse_hand_computed() -> None:
    s = torch.tensor([[1.0, 2.0, 4.0]])
    t = torch.tensor([[3.0, 1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # positive vs each negative: ((1-2)-(3-1))^2 = 9, ((1-4)-(3-1))^2 = 25
    assert margin_mse_loss(s, t, mask).item() == pytest.approx(17.0)
    # all pairs add ((2-4)-(1-1))^2 = 4
    assert margin_mse_loss(s, t, mask, pairs="all").item() == pytest.approx(38.0 / 3)
    # hybrid: point = (4 + 1 + 9) / 3
    h = hybrid_distill_loss(s, t, mask, alpha=0.5, beta=2.0)
    assert h.item() == pytest.approx(0.5 * 14 / 3 + 2 * 17.0)


def test_hybrid_alpha_beta_zero_are_the_ablations() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert hybrid_distill_loss(s, t, mask, alpha=0.0, beta=1.0).item() == pytest.approx(
        margin_mse_loss(s, t, mask).item()
    )
    assert hybrid_distill_loss(s, t, mask, alpha=1.0, beta=0.0).item() == pytest.approx(
        point_mse_loss(s, t, mask).item()
    )
    zero = hybrid_distill_loss(s.requires_grad_(), t, mask, alpha=0.0, beta=0.0)
    assert zero.item() == 0.0 and zero.requires_grad


def test_one_doc_per_group() -> None:
    s = torch.tensor([[1.5], [0.2]], requires_grad=True)
    y = torch.tensor([[1.0], [0.0]])
    m = torch.ones(2, 1, dtype=torch.bool)
    for fn in (pairwise_hinge_loss, ranknet_loss, listwise_ce_loss):
        assert fn(s, y, m).item() == 0.0
    assert margin_mse_loss(s, y, m).item() == 0.0
    assert point_mse_loss(s, y, m).item() == pytest.approx(((1.5 - 1) ** 2 + 0.2**2) / 2)


def test_all_labels_equal_gives_zero() -> None:
    s = torch.randn(2, 4, requires_grad=True)
    y = torch.ones(2, 4)
    m = torch.ones(2, 4, dtype=torch.bool)
    for name in ("hinge", "ranknet", "listwise"):
        loss = rank_loss(name, s, y, m)  # type: ignore[arg-type]
        assert loss.item() == 0.0
        loss.backward()
        assert torch.all(s.grad == 0)


def test_group_without_pairs_does_not_dilute_the_mean() -> None:
    s = torch.tensor([[2.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m = torch.ones(2, 3, dtype=torch.bool)
    assert listwise_ce_loss(s, y, m).item() == pytest.approx(listwise_ce_loss(s[:1], y[:1], m[:1]).item())
    assert pairwise_hinge_loss(s, y, m).item() == pytest.approx(pairwise_hinge_loss(s[:1], y[:1], m[:1]).item())


def _all_losses(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> list[torch.Tensor]:
    return [
        pairwise_hinge_loss(s, y, m),
        ranknet_loss(s, y, m),
        listwise_ce_loss(s, y, m),
        point_mse_loss(s, t, m),
        margin_mse_loss(s, t, m),
        margin_mse_loss(s, t, m, pairs="all"),
        hybrid_distill_loss(s, t, m),
    ]


def test_padding_never_changes_loss_or_grad() -> None:
    torch.manual_seed(1)
    s = torch.randn(2, 3)
    y = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
    t = torch.randn(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    s_ref = s.clone().requires_grad_()
    ref = _all_losses(s_ref, y, t, m)
    # pad every group with two garbage docs (inf/nan scores, huge labels, nan teacher)
    pad_s = torch.tensor([[float("inf"), float("nan")]] * 2)
    s_pad = torch.cat([s, pad_s], dim=1).requires_grad_()
    y_pad = torch.cat([y, torch.full((2, 2), 9.0)], dim=1)
    t_pad = torch.cat([t, torch.tensor([[float("nan"), 1e6]] * 2)], dim=1)
    m_pad = torch.cat([m, torch.zeros(2, 2, dtype=torch.bool)], dim=1)
    got = _all_losses(s_pad, y_pad, t_pad, m_pad)
    for a, b in zip(ref, got):
        assert b.item() == pytest.approx(a.item(), rel=1e-6)
        ga, = torch.autograd.grad(a, s_ref)
        gb, = torch.autograd.grad(b, s_pad)
        assert torch.allclose(gb[:, :3], ga) and torch.all(gb[:, 3:] == 0)


def test_all_padding_batch_is_zero_with_grad() -> None:
    s = torch.full((2, 3), float("nan"), requires_grad=True)
    y = torch.zeros(2, 3)
    m = torch.zeros(2, 3, dtype=torch.bool)
    for loss in _all_losses(s, y, y, m):
        assert loss.item() == 0.0 and loss.requires_grad
        g, = torch.autograd.grad(loss, s)
        assert torch.all(g == 0)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same"):
        pairwise_hinge_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown rank loss"):
        rank_loss("foo", torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))  # type: ignore[arg-type]
