"""Every 95% interval of an evaluation.

- `wilson_interval` (an accuracy) and `ratio_bootstrap_ci` (a paired percentile bootstrap for
  ratios) are `scipy.stats` calls, so a reader checks one call, not our arithmetic. The bootstrap
  draws its resamples from `numpy.random.default_rng(seed)` (a fixed seed: the same rows give the
  same interval on every machine and rerun).
- `normal_mean_interval` (a mean of per-text values, e.g. KL) and `mean_accuracy_interval` (the
  mean of several splits' accuracies) are normal approximations written out here.
- `seed_mean_interval`: a Student-t interval over a method's seeded runs (`eval/seeds.py`).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats

BOOTSTRAP_SAMPLES = 1000
_Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval (95% by default): unlike the normal approximation it stays in [0, 1]."""
    if n == 0:
        return (0.0, 1.0)
    level = 2 * stats.norm.cdf(z) - 1
    ci = stats.binomtest(int(correct), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


def ratio_bootstrap_ci(numerator, denominator, seed: int = 0,
                       n_resamples: int = BOOTSTRAP_SAMPLES) -> tuple[float | None, float | None]:
    """Percentile 95% interval of sum(numerator) / sum(denominator) over rows resampled in pairs.

    A resample whose denominator sums to 0 has no ratio and is left out of the percentiles (a base
    model that scored none of the drawn items); with no ratio at all the interval is (None, None).
    """
    numerator = np.asarray(numerator, float)
    denominator = np.asarray(denominator, float)

    def ratio(num, den, axis=-1):
        total = den.sum(axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, num.sum(axis=axis) / np.where(total > 0, total, 1.0), np.nan)

    if len(numerator) < 2:  # scipy needs two observations; one row resamples only to itself
        value = ratio(numerator, denominator)
        return (None, None) if np.isnan(value) else (float(value), float(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # identical resamples: a point interval
        result = stats.bootstrap((numerator, denominator), ratio, paired=True, vectorized=True,
                                 n_resamples=n_resamples, method="percentile", confidence_level=0.95,
                                 rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    if np.isnan(low) or np.isnan(high):  # some resamples had no ratio: percentiles of the others
        kept = result.bootstrap_distribution[~np.isnan(result.bootstrap_distribution)]
        if not len(kept):
            return (None, None)
        low, high = np.percentile(kept, [2.5, 97.5])
    return (float(low), float(high))


def normal_mean_interval(values, center: float) -> list[float]:
    """`center` ± 1.96 standard errors of the mean of `values` (a point interval for one value)."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return [center, center]
    half = 1.96 * float(values.std(ddof=1)) / np.sqrt(len(values))
    return [center - half, center + half]


def mean_accuracy_interval(counts, mean: float) -> list[float]:
    """95% interval of the mean of several accuracies, each given as (correct, n), clipped to [0, 1].

    Each accuracy's variance is Agresti-Coull's ((correct + 2) / (n + 4)), so a split at 0% or 100%
    still carries some uncertainty; the mean's variance is their sum over the count squared.
    """
    adjusted = [((correct + 2) / (n + 4), n + 4) for correct, n in counts]
    variance = sum(p * (1 - p) / n for p, n in adjusted) / len(adjusted) ** 2
    half = 1.96 * float(np.sqrt(variance))
    return [max(0.0, mean - half), min(1.0, mean + half)]


# Two-sided 95% Student-t quantiles by degrees of freedom (beyond the table: the normal's 1.96).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(df: int) -> float:
    if df in _T975:
        return _T975[df]
    known = [d for d in _T975 if d <= df]
    return _T975[max(known)] if df <= 30 else 1.96


def seed_mean_interval(values: Sequence[float]) -> dict:
    """Mean and 95% t-interval of per-seed values (no interval from a single seed)."""
    values = [float(v) for v in values if v is not None]
    k = len(values)
    if k == 0:
        return {"mean": None, "ci95": [None, None], "seeds": 0, "values": []}
    mean = sum(values) / k
    if k == 1:
        return {"mean": mean, "ci95": [None, None], "seeds": 1, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    half = t_quantile(k - 1) * sd / math.sqrt(k)
    return {"mean": mean, "ci95": [mean - half, mean + half], "seeds": k, "values": values}
