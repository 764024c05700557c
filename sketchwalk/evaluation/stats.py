"""Confidence intervals for accuracy over samples (scipy.stats.bootstrap, percentile method)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def bootstrap_ci(scores: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval of per-sample scores; returns ×100 values.

    scores: per-sample values (RULER scores in [0, 1], or paired differences in [-1, 1]). Bootstrap
    rather than Wilson because RULER's string_match_all gives fractional per-sample scores (e.g. 2
    of 4 values found), which a binomial interval does not model. Constant scores (every resample
    equal) give (m, m, m); no scores give NaNs. Deterministic for a given seed.
    """
    from scipy.stats import bootstrap

    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = 100 * float(x.mean())
    if np.all(x == x[0]):  # a degenerate distribution: scipy would warn and return NaN bounds
        return mean, mean, mean
    res = bootstrap((x,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return mean, 100 * float(res.confidence_interval.low), 100 * float(res.confidence_interval.high)
