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


def paired_example_bootstrap_ci(
    mine: Sequence[Sequence[bool]],
    theirs: Sequence[Sequence[bool]],
    confidence: float = 0.95,
    resamples: int = 2_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean accuracy difference of two methods, paired by seed and example.

    ``mine[s][i]`` / ``theirs[s][i]``: whether each method got test example i right at seed s. Each resample draws
    seeds and examples with replacement, the same draws for both methods, so the interval holds the noise of the
    training seeds and of the finite test set together.
    """
    if not mine or len(mine) != len(theirs) or any(len(a) != len(b) for a, b in zip(mine, theirs)):
        raise ValueError("paired_example_bootstrap_ci() needs the same seeds and test examples for both methods.")
    differences = [[int(a) - int(b) for a, b in zip(run_a, run_b)] for run_a, run_b in zip(mine, theirs)]
    rng = random.Random(seed)
    seeds, examples = len(differences), len(differences[0])
    means = []
    for _ in range(resamples):
        rows = rng.choices(range(seeds), k=seeds)
        columns = rng.choices(range(examples), k=examples)
        means.append(sum(differences[row][column] for row in rows for column in columns) / (seeds * examples))
    means.sort()
    tail = (1 - confidence) / 2
    return means[math.floor(tail * (resamples - 1))], means[math.ceil((1 - tail) * (resamples - 1))]
