"""Small statistics for evaluation: percentile bootstrap intervals and paired win-rates."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic` on `values` and its percentile bootstrap interval.

    Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13: resample the items
    with replacement, recompute the statistic, and read the interval off its quantiles.
    Seeded, so the same values give the same interval.
    """
    x = np.asarray(values, dtype=float)  # (N,)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of values, got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_ci confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"bootstrap_ci n_resamples must be >= 1, got {n_resamples}")

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))  # (R, N)
    stats = np.array([statistic(x[row]) for row in idx])  # (R,)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(statistic(x)), float(low), float(high)


def win_rate(a_scores: Sequence[float], b_scores: Sequence[float]) -> list[float]:
    """Per-item outcome of A against B on paired scores: 1 win, 0.5 tie, 0 loss.

    The mean of the list is A's win-rate (ties count half); feed the list to `bootstrap_ci`.
    """
    if len(a_scores) != len(b_scores):
        raise ValueError(f"win_rate needs paired scores, got {len(a_scores)} for A and {len(b_scores)} for B")
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(a_scores, b_scores)]
