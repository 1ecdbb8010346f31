"""PNR against a brute-force count; NDCG/MRR (both gains, fractional labels, per query) against a hand
computation; paired significance tests against hand-enumerated distributions."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.metrics import (
    PNR,
    RankingMetrics,
    pair_counts,
    paired_randomization_test,
    paired_t_test,
    per_query_ranking_metrics,
)

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


# --------------------------------------------------------------------------------------------------
# Gains: fractional labels kept, exponential gain, negative labels


def test_fractional_labels_are_not_rounded() -> None:
    rm = RankingMetrics(k=10)
    # q0 ranked labels [0, 0.5, 0.25]; q1 has only a 0.3 label (rounding used to drop this query)
    rm.update(torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.7, 0.0]]), torch.tensor([[0.0, 0.5, 0.25], [0.3, 0.0, 0.0]]),
              torch.ones(2, 3, dtype=torch.bool), torch.tensor([0, 1]))
    q0 = (0.5 / math.log2(3) + 0.25 / 2) / (0.5 + 0.25 / math.log2(3))
    q1 = (0.3 / math.log2(3)) / 0.3
    out = rm.compute()
    assert out["ndcg@10"].item() == pytest.approx((q0 + q1) / 2, rel=1e-6)
    assert out["mrr@10"].item() == pytest.approx(0.5)  # both queries: first label > 0 at rank 2


def test_exponential_gain_hand_computed() -> None:
    rm = RankingMetrics(k=10, gain="exponential")
    rm.update(SCORES, LABELS, MASK, QIDX)
    # q1 ranked labels [0, 2, 1] -> gains [0, 3, 1]: DCG = 3/log2(3) + 1/2; IDCG = 3 + 1/log2(3)
    q1 = (3 / math.log2(3) + 0.5) / (3 + 1 / math.log2(3))
    q2 = 1 / math.log2(3)  # gains [0, 1]
    assert rm.compute()["ndcg@10"].item() == pytest.approx((q1 + q2) / 2, rel=1e-6)
    frac = RankingMetrics(k=10, gain="exponential")
    frac.update(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.5]]), torch.ones(1, 2, dtype=torch.bool), QIDX[:1])
    g = 2 ** 0.5 - 1  # gain of the 0.5 label, ranked 2nd; ideal puts it 1st
    assert frac.compute()["ndcg@10"].item() == pytest.approx((g / math.log2(3)) / g, rel=1e-6)


@pytest.mark.parametrize("gain", ["linear", "exponential"])
def test_negative_labels_count_as_zero_gain(gain: str) -> None:
    rm = RankingMetrics(k=10, gain=gain)  # type: ignore[arg-type]
    # ranked labels [-2, 1]: the -2 document contributes 0, not a negative gain
    rm.update(torch.tensor([[2.0, 1.0]]), torch.tensor([[-2.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool), QIDX[:1])
    assert rm.compute()["ndcg@10"].item() == pytest.approx(1 / math.log2(3), rel=1e-6)


def test_integer_labels_linear_gain_match_integer_torchmetrics_bit_for_bit() -> None:
    # the figures recorded before fractional labels were kept came from long targets; integer labels
    # with linear gain must give exactly those numbers (ties averaged, empty queries skipped)
    from torchmetrics.retrieval import RetrievalNormalizedDCG

    gen = torch.Generator().manual_seed(3)
    rm, reference = RankingMetrics(k=5), RetrievalNormalizedDCG(top_k=5, empty_target_action="skip")
    for b in range(3):
        scores = torch.randint(-2, 3, (4, 7), generator=gen).float()  # many ties
        labels = torch.randint(-1, 4, (4, 7), generator=gen).float()
        mask = torch.rand(4, 7, generator=gen) > 0.2
        qidx = torch.arange(4 * b, 4 * b + 4)
        rm.update(scores, labels, mask, qidx)
        flat_index = qidx.view(-1, 1).expand_as(mask)[mask]
        reference.update(scores[mask], labels[mask].round().clamp(min=0).long(), indexes=flat_index)
    assert torch.equal(rm.compute()["ndcg@5"], reference.compute())


def test_bad_gain_is_refused() -> None:
    with pytest.raises(ValueError, match="gain"):
        RankingMetrics(gain="log")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gain"):
        per_query_ranking_metrics([([1.0], [1.0])], gain="log")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# per_query_ranking_metrics


def test_per_query_hand_computed_and_skips_queries_without_relevant_doc() -> None:
    out = per_query_ranking_metrics([
        ([0.9, 0.8, 0.1], [0.0, 2.0, 1.0]),
        ([1.0, 2.0], [0.0, 0.0]),  # no relevant document -> None (RankingMetrics skips it)
        ([-1.0, -3.0, -2.0], [0.0, 0.0, 1.0]),  # negative scores: the label-1 doc is ranked 2nd
    ], k=10)
    assert out[1] is None
    assert out[0] is not None and out[2] is not None
    assert out[0]["ndcg@10"] == pytest.approx((2 / math.log2(3) + 0.5) / (2 + 1 / math.log2(3)), rel=1e-6)
    assert out[0]["mrr@10"] == pytest.approx(0.5)
    assert out[2]["ndcg@10"] == pytest.approx(1 / math.log2(3), rel=1e-6)
    assert out[2]["mrr@10"] == pytest.approx(0.5)
    top1 = per_query_ranking_metrics([([0.9, 0.8, 0.1], [0.0, 2.0, 1.0])], k=1)
    assert top1 == [{"ndcg@1": 0.0, "mrr@1": 0.0}]
    assert per_query_ranking_metrics([]) == []


@pytest.mark.parametrize("gain", ["linear", "exponential"])
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("ties", [True, False])
def test_per_query_mean_equals_ranking_metrics(gain: str, k: int, ties: bool) -> None:
    gen = torch.Generator().manual_seed(k)
    rm = RankingMetrics(k=k, gain=gain)  # type: ignore[arg-type]
    queries: list[tuple[list[float], list[float]]] = []
    for b in range(3):
        if ties:
            scores = torch.randint(-3, 4, (5, 8), generator=gen).float()
        else:
            scores = torch.randn(5, 8, generator=gen)
        labels = torch.randint(-1, 4, (5, 8), generator=gen).float() * torch.rand(5, 8, generator=gen).round()
        labels[0] *= 0.37  # fractional labels too
        labels[1] = 0.0  # a query without a relevant document
        mask = torch.rand(5, 8, generator=gen) > 0.25
        mask[:, 0] = True
        rm.update(scores, labels, mask, torch.arange(5 * b, 5 * b + 5))
        queries += [(scores[g][mask[g]].tolist(), labels[g][mask[g]].tolist()) for g in range(5)]
    assert any(len(set(s)) < len(s) for s, _ in queries) == ties
    per_query = per_query_ranking_metrics(queries, k=k, gain=gain)  # type: ignore[arg-type]
    kept = [m for m in per_query if m is not None]
    assert 0 < len(kept) < len(queries)
    out = rm.compute()
    # NDCG is the same computation even with ties; RankingMetrics' RR under a tie is arbitrary
    # (torchmetrics' unstable sort decides), so RR is compared on tie-free scores only
    names = [f"ndcg@{k}"] if ties else [f"ndcg@{k}", f"mrr@{k}"]
    for name in names:
        assert sum(m[name] for m in kept) / len(kept) == pytest.approx(out[name].item(), abs=1e-6)


def test_per_query_reciprocal_rank_averages_over_ties() -> None:
    # scores [1, 1, 0], relevant first doc tied with a non-relevant one: rank 1 or 2 with
    # probability 1/2 each -> (1 + 1/2) / 2
    tied = per_query_ranking_metrics([([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])])[0]
    assert tied is not None and tied["mrr@10"] == pytest.approx(0.75)
    # a non-relevant doc on top, then a tie of 3 docs holding 2 relevant ones (ranks 2..4): the
    # first relevant is at rank 2 with P = C(2,1)/C(3,2) = 2/3, at rank 3 with P = 1/3
    q = ([2.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0])
    (at10,), (at2,) = per_query_ranking_metrics([q], k=10), per_query_ranking_metrics([q], k=2)
    assert at10 is not None and at10["mrr@10"] == pytest.approx(2 / 3 / 2 + 1 / 3 / 3)
    assert at2 is not None and at2["mrr@2"] == pytest.approx(2 / 3 / 2)  # rank 3 is beyond k


def test_per_query_length_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="query 0: 2 scores but 1 labels"):
        per_query_ranking_metrics([([1.0, 2.0], [1.0])])


# --------------------------------------------------------------------------------------------------
# Paired significance tests


def test_identical_systems_give_p_one() -> None:
    a = [0.1, 0.5, 0.7, 0.2]
    assert paired_randomization_test(a, a) == 1.0
    assert paired_randomization_test(a, a, exact=True) == 1.0
    assert paired_t_test(a, a) == 1.0


def test_clear_difference_is_significant() -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.rand(30, generator=gen).tolist()
    a = [x + 0.1 + 0.01 * float(torch.randn(1, generator=gen)) for x in b]
    assert paired_randomization_test(a, b) < 0.01
    assert paired_t_test(a, b) < 0.01
    # every d_i > 0 and n = 30: only the all-(+) / all-(-) patterns (chance 2^-29) reach the observed
    # sum, so the count is 0 and the +1 correction gives exactly 1 / (n + 1), never 0
    assert paired_randomization_test(a, b, n_resamples=99) == 1 / 100


def test_randomization_exact_distribution_by_hand() -> None:
    # d = (1, 2, 3): the 8 sums ±1 ±2 ±3 are 6, 0, 2, -4, 4, -2, 0, -6; |sum| >= 6 in 2 of 8
    assert paired_randomization_test([1, 2, 3], [0, 0, 0], exact=True) == 2 / 8
    # d = (1, -2, 3): sums 2, -4, 6, 0, 0, -6, 4, -2; |sum| >= 2 in 6 of 8
    assert paired_randomization_test([1, -2, 3], [0, 0, 0], exact=True) == 6 / 8
    sampled = paired_randomization_test([1, 2, 3], [0, 0, 0], n_resamples=20000, seed=5)
    assert sampled == pytest.approx(0.25, abs=0.015)  # 5 sd of the sampled proportion
    assert sampled == paired_randomization_test([1, 2, 3], [0, 0, 0], n_resamples=20000, seed=5)  # deterministic


def test_paired_t_test_hand_computed() -> None:
    # d = (1, 2, 3): mean 2, sd 1, t = 2 / (1 / sqrt 3) = sqrt 12 with 2 df;
    # Student t with 2 df: CDF(t) = 1/2 + t / (2 sqrt(2 + t^2))
    t = math.sqrt(12)
    expected = 2 * (1 - (0.5 + t / (2 * math.sqrt(2 + t * t))))
    assert paired_t_test([2, 4, 6], [1, 2, 3]) == pytest.approx(expected, rel=1e-9)
    assert paired_t_test([1, 2, 3], [0.5, 1.5, 2.5]) == 0.0  # constant non-zero difference: |t| -> inf


def test_significance_input_checks() -> None:
    for test in (paired_randomization_test, paired_t_test):
        with pytest.raises(ValueError, match="equal length >= 2"):
            test([1.0, 2.0], [1.0])  # type: ignore[operator]
        with pytest.raises(ValueError, match="equal length >= 2"):
            test([1.0], [1.0])  # type: ignore[operator]
        with pytest.raises(ValueError, match="finite"):
            test([1.0, float("nan")], [1.0, 2.0])  # type: ignore[operator]
    with pytest.raises(ValueError, match="exact=True"):
        paired_randomization_test([1.0] * 17, [0.0] * 17, exact=True)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_randomization_test([1.0, 2.0], [0.0, 0.0], n_resamples=0)
