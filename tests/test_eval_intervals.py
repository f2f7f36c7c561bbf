"""Intervals from scipy.stats give the numbers the hand-written ones gave (same draws, same
percentiles), including resamples whose denominator is 0."""

import math

import numpy as np
import pytest

from mixsd_jax.eval.intervals import ratio_bootstrap_ci, wilson_interval


def _by_hand(numerator, denominator, seed, samples=1000):
    """The explicit paired bootstrap: rows drawn with replacement, ratio of sums, 2.5/97.5 percentiles."""
    draws = np.random.default_rng(seed).integers(0, len(numerator), (samples, len(numerator)))
    num, den = np.asarray(numerator)[draws].sum(1), np.asarray(denominator)[draws].sum(1)
    return np.percentile(num[den > 0] / den[den > 0], [2.5, 97.5])


def test_wilson_known_values():
    # Wilson (1927) / Newcombe (1998) 95% interval for 8 of 10: 0.4902 to 0.9433.
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    # A 99% interval through z (Wilson's formula by hand: centre 0.6803, half-width 0.2795).
    assert wilson_interval(8, 10, z=2.5758293035489) == pytest.approx((0.4008, 0.9598), abs=1e-4)


@pytest.mark.parametrize("seed", [0, 3])
def test_paired_bootstrap_matches_the_explicit_resampling(seed):
    rng = np.random.default_rng(100 + seed)
    tuned, base = (rng.random(40) < 0.4).astype(float), (rng.random(40) < 0.6).astype(float)
    np.testing.assert_allclose(ratio_bootstrap_ci(tuned, base, seed=seed), _by_hand(tuned, base, seed), rtol=1e-12)
    nll, tokens = rng.random(15) * 30, rng.integers(1, 20, 15).astype(float)
    np.testing.assert_allclose(ratio_bootstrap_ci(nll, tokens, seed=seed), _by_hand(nll, tokens, seed), rtol=1e-12)


def test_resamples_without_a_denominator_are_left_out():
    tuned, base = np.array([1.0, 0, 0, 0]), np.array([1.0, 1, 0, 1])  # some resamples draw only the 0-base row
    np.testing.assert_allclose(ratio_bootstrap_ci(tuned, base), _by_hand(tuned, base, 0))
    assert ratio_bootstrap_ci([1.0, 1.0], [0.0, 0.0]) == (None, None)
    assert ratio_bootstrap_ci([3.0], [2.0]) == (1.5, 1.5)


def test_normal_mean_interval_is_the_mean_plus_minus_two_standard_errors():
    from mixsd_jax.eval.intervals import normal_mean_interval

    low, high = normal_mean_interval(np.array([1.0, 2.0, 3.0]), 2.0)  # sample sd 1, n 3
    assert (low, high) == pytest.approx((2.0 - 1.96 / np.sqrt(3), 2.0 + 1.96 / np.sqrt(3)))
    assert normal_mean_interval(np.array([0.7]), 0.7) == [0.7, 0.7]


def test_mean_accuracy_interval_keeps_uncertainty_at_zero_and_full_marks():
    from mixsd_jax.eval.intervals import mean_accuracy_interval

    # Splits at 0/10 and 10/10: Agresti-Coull reads them as 2/14 and 12/14, each with variance p(1-p)/14.
    p = 2 / 14
    half = 1.96 * np.sqrt(2 * p * (1 - p) / 14 / 4)
    assert mean_accuracy_interval([(0, 10), (10, 10)], 0.5) == pytest.approx([0.5 - half, 0.5 + half])
    low, high = mean_accuracy_interval([(0, 10)], 0.0)
    assert low == 0.0 and 0.0 < high < 0.5  # clipped at 0, yet not a point


def test_seed_mean_interval_is_students_t():
    from mixsd_jax.eval.intervals import seed_mean_interval

    block = seed_mean_interval([0.5, 0.7, 0.9])
    half = 4.303 * 0.2 / math.sqrt(3)
    assert block["mean"] == pytest.approx(0.7) and block["seeds"] == 3
    assert block["ci95"] == pytest.approx([0.7 - half, 0.7 + half])
    assert seed_mean_interval([0.4])["ci95"] == [None, None]
