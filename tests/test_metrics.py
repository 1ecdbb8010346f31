"""PNR against a brute-force count; NDCG/MRR against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.metrics import PNR, RankingMetrics, pair_counts

T, F_ = True, False

SCORES = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.5, 7.0]])
LABELS = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 3.0]])
MASK = torch.tensor([[T, T, T], [T, T, F_]])
QIDX = torch.tensor([10, 11])


def _brute_force(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, int]:
    conc = disc = tied = 0
    for g in range(scores.shape[0]):
        for i in range(scores.shape[1]):
            for j in range(scores.shape[1]):
                if not (mask[g, i] and mask[g, j] and labels[g, i] > labels[g, j]):
                    continue
                si, sj = scores[g, i].item(), scores[g, j].item()
                conc += si > sj
                disc += si < sj
                tied += si == sj
    return conc, disc, tied


def test_pnr_matches_brute_force_with_ties_and_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    metric = PNR()
    totals = [0, 0, 0]
    for _ in range(5):
        scores = torch.randint(0, 4, (3, 6), generator=gen).float()  # many score ties
        labels = torch.randint(0, 3, (3, 6), generator=gen).float()
        mask = torch.rand(3, 6, generator=gen) > 0.2
        bf = _brute_force(scores, labels, mask)
        got = pair_counts(scores, labels, mask)
        assert tuple(int(x) for x in got) == bf
        totals = [a + b for a, b in zip(totals, bf)]
        metric.update(scores, labels, mask)
    assert metric.concordant.item() == totals[0] and metric.discordant.item() == totals[1]
    assert metric.tied.item() == totals[2] and totals[2] > 0
    assert metric.compute().item() == pytest.approx(totals[0] / totals[1])


def test_pnr_hand_example_and_zero_discordant() -> None:
    metric = PNR()
    metric.update(SCORES, LABELS, MASK)
    # q1: (1,0) disc, (1,2) conc, (2,0) disc; q2: (0,1) disc; padding doc ignored
    assert metric.compute().item() == pytest.approx(1 / 3)
    perfect = PNR()
    perfect.update(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[2.0, 1.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool))
    assert perfect.compute().item() == 3.0  # concordant / max(discordant, 1)
    assert math.isfinite(perfect.compute().item())
    assert PNR().compute().item() == 0.0  # no pair at all


def test_ranking_metrics_hand_computed() -> None:
    rm = RankingMetrics(k=10)
    rm.update(SCORES, LABELS, MASK, QIDX)
    out = rm.compute()
    # q1 ranked labels [0, 2, 1] -> DCG = 2/log2(3) + 1/log2(4); IDCG = 2 + 1/log2(3)  (linear gain)
    q1 = (2 / math.log2(3) + 0.5) / (2 + 1 / math.log2(3))
    # q2 ranked labels [0, 1] (padding doc with label 3 dropped) -> 1/log2(3) / 1
    q2 = 1 / math.log2(3)
    assert out["ndcg@10"].item() == pytest.approx((q1 + q2) / 2, rel=1e-5)
    assert out["mrr@10"].item() == pytest.approx(0.5)  # first label>0 at rank 2 in both queries
    assert out["pnr"].item() == pytest.approx(1 / 3)
    assert rm.names == ["ndcg@10", "mrr@10", "pnr"]


def test_ranking_metrics_top_k_and_split_query() -> None:
    rm = RankingMetrics(k=1)
    # the same query split over two updates is merged by its index
    rm.update(SCORES[:, :2], LABELS[:, :2], MASK[:, :2], QIDX)
    rm.update(SCORES[:1, 2:], LABELS[:1, 2:], MASK[:1, 2:], QIDX[:1])
    out = rm.compute()
    assert out["ndcg@1"].item() == pytest.approx(0.0)
    assert out["mrr@1"].item() == pytest.approx(0.0)
    rm.reset()
    rm.update(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool), QIDX[:1])
    assert rm.compute()["ndcg@1"].item() == pytest.approx(1.0)


def test_mrr_with_negative_scores() -> None:
    # torchmetrics alone would return 0 here (it drops preds <= 0); ours ranks by score
    rm = RankingMetrics(k=10)
    rm.update(torch.tensor([[-2.0, -0.5, -1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
              torch.tensor([[T, T, T, F_]]), QIDX[:1])
    assert rm.compute()["mrr@10"].item() == pytest.approx(1 / 3)


def test_query_without_relevant_doc_is_skipped() -> None:
    rm = RankingMetrics(k=10)
    rm.update(
        torch.tensor([[1.0, 0.0], [0.3, 0.9]]),
        torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
        torch.ones(2, 2, dtype=torch.bool),
        torch.tensor([0, 1]),
    )
    out = rm.compute()
    assert out["ndcg@10"].item() == pytest.approx(1.0) and out["mrr@10"].item() == pytest.approx(1.0)


def test_empty_metrics_compute_to_zero() -> None:
    out = RankingMetrics().compute()
    assert all(v.item() == 0.0 for v in out.values())
