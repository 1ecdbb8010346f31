"""Paired significance tests over per-query figures (e.g. NDCG@10 of two systems on the same queries).

Inputs are two equally long vectors ``a``, ``b`` (``a_i``, ``b_i``: the two systems on query ``i``;
:func:`kdlab.metrics.per_query_ranking_metrics` gives them). Both tests are two-sided and test the
mean of the differences ``d_i = a_i − b_i`` against 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["EXACT_MAX_QUERIES", "paired_randomization_test", "paired_t_test"]

#: Largest number of queries :func:`paired_randomization_test` enumerates exactly (2^16 sign patterns).
EXACT_MAX_QUERIES = 16

# Rows of sign patterns evaluated at once, so that n_resamples × n_queries never sits in memory whole.
_CHUNK_ELEMENTS = 1 << 22


def _pair(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"paired tests need two vectors of equal length >= 2, got lengths {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired tests need finite values (a per-query figure is NaN or infinite)")
    return x, y


def paired_randomization_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 10000,
    seed: int = 0,
    exact: bool = False,
) -> float:
    """Two-sided p-value of the mean difference by sign flipping (Fisher's randomisation test).

    Under H0 (the two systems are exchangeable on every query) each ``d_i = a_i − b_i`` is as likely
    to have the opposite sign. With ``T(σ) = |Σ_i σ_i d_i|`` for a sign pattern ``σ ∈ {±1}^n`` and
    the observed ``t = |Σ_i d_i|`` (a mean's absolute value up to the constant ``1/n``):

    * sampled (default): ``p = (#{j : T(σ_j) ≥ t} + 1) / (n_resamples + 1)`` over ``n_resamples``
      patterns drawn uniformly with ``numpy.random.default_rng(seed)`` (deterministic for a seed;
      the +1 counts the observed pattern, so ``p`` is never 0 and the test is valid);
    * ``exact=True``: ``p = #{σ : T(σ) ≥ t} / 2^n`` over all ``2^n`` patterns (``n ≤ 16``).

    Identical vectors give ``p = 1``.
    """
    x, y = _pair(a, b)
    d = x - y
    if exact:
        if d.size > EXACT_MAX_QUERIES:
            raise ValueError(f"exact=True enumerates 2^n sign patterns; n = {d.size} > {EXACT_MAX_QUERIES}")
    elif not (isinstance(n_resamples, int) and n_resamples >= 1):
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    observed = abs(math.fsum(d))
    # A pattern equivalent to the observed one (all +1 or all −1) must count even when the matrix
    # product sums in another order and rounds differently: compare with a rounding-sized slack.
    threshold = observed - 1e-12 * max(1.0, math.fsum(np.abs(d)))
    rows = max(1, _CHUNK_ELEMENTS // d.size)

    if exact:
        patterns = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.count_nonzero(np.abs(patterns @ d) >= threshold)) / patterns.shape[0]

    rng = np.random.default_rng(seed)
    count = 0
    done = 0
    while done < n_resamples:
        m = min(rows, n_resamples - done)
        signs = rng.integers(0, 2, size=(m, d.size), dtype=np.int8) * 2 - 1
        count += int(np.count_nonzero(np.abs(signs @ d) >= threshold))
        done += m
    return (count + 1) / (n_resamples + 1)


def paired_t_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``):
    ``t = mean(d) / (sd(d) / √n)`` with ``n − 1`` degrees of freedom, ``d_i = a_i − b_i``.

    When every ``d_i`` is the same the variance is 0 and scipy returns NaN for ``d = 0``: this
    returns ``1.0`` for identical vectors (no evidence of a difference) and ``0.0`` for a constant
    non-zero difference (the limit ``|t| → ∞``), both without scipy's precision warning.
    """
    x, y = _pair(a, b)
    d = x - y
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0 else 0.0
    from scipy import stats  # lazy: scipy is only needed here

    return float(stats.ttest_rel(x, y).pvalue)
