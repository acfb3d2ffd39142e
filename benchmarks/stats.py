"""Statistics over seeds: mean ± sample standard deviation and a percentile-bootstrap interval of the mean."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std() needs at least one value.")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (e.g. test accuracies over seeds).

    With few seeds the interval is coarse (it can never be wider than the observed range); report it next to
    mean ± std, not instead of it.
    """
    if not values:
        raise ValueError("bootstrap_ci() needs at least one value.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    rng = random.Random(seed)
    count = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=count)) for _ in range(resamples))
    tail = (1 - confidence) / 2
    low_index = math.floor(tail * (resamples - 1))
    high_index = math.ceil((1 - tail) * (resamples - 1))
    return means[low_index], means[high_index]


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"80.3 ± 0.8"`` (accuracies shown in percent by default)."""
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
