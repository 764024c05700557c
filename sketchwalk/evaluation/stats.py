"""Confidence intervals for accuracy over samples."""
from __future__ import annotations

import random
from typing import Sequence


def bootstrap_ci(scores: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval of per-sample scores (each in [0, 1]); returns ×100 values.

    Bootstrap rather than Wilson because RULER's string_match_all gives fractional per-sample
    scores (e.g. 2 of 4 values found), which a binomial interval does not model.
    """
    n = len(scores)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(scores) / n
    rng = random.Random(seed)
    means = sorted(sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return 100 * mean, 100 * lo, 100 * hi
