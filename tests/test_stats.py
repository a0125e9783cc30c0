"""Bootstrap intervals and paired win-rates."""

import numpy as np
import pytest

from models.stats import bootstrap_ci, win_rate


def test_bootstrap_interval_contains_the_estimate():
    values = np.random.default_rng(1).normal(loc=3.0, scale=1.0, size=200)
    estimate, low, high = bootstrap_ci(values)
    assert estimate == pytest.approx(values.mean())
    assert low < estimate < high
    # a 95% interval for a mean of 200 N(3, 1) draws: half-width about 1.96 / sqrt(200) = 0.139
    assert high - low == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.25)


def test_bootstrap_of_constant_values_is_a_point():
    assert bootstrap_ci([1.0] * 50) == (1.0, 1.0, 1.0)


def test_bootstrap_narrows_with_more_data():
    rng = np.random.default_rng(2)
    _, low_small, high_small = bootstrap_ci(rng.integers(0, 2, size=50))
    _, low_big, high_big = bootstrap_ci(rng.integers(0, 2, size=2000))
    assert high_big - low_big < (high_small - low_small) / 3  # width ~ 1/sqrt(n): sqrt(40) = 6.3x narrower


def test_bootstrap_is_seeded_and_takes_a_statistic():
    values = [1.0, 2.0, 3.0, 10.0]
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    estimate, low, high = bootstrap_ci(values, statistic=np.median)
    assert estimate == 2.5
    assert 1.0 <= low <= estimate <= high <= 10.0


@pytest.mark.parametrize("values, kwargs, message", [([], {}, "non-empty"), ([1.0], {"confidence": 1.5}, "got 1.5")])
def test_bootstrap_bad_arguments(values, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(values, **kwargs)


def test_win_rate_per_item_and_mean():
    outcomes = win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 0.0])
    assert outcomes == [1.0, 0.5, 0.0, 1.0]
    # win-rate with ties counted half: (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert bootstrap_ci(outcomes)[0] == 0.625


def test_win_rate_needs_pairs():
    with pytest.raises(ValueError, match="3 for A and 2 for B"):
        win_rate([1, 2, 3], [1, 2])
