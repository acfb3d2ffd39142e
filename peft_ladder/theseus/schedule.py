"""The replacement schedule of BERT-of-Theseus: module boundaries, the two phases, the rate p and the draws.

A run has two phases. Phase 1 (progressive replacing) lasts :func:`replacing_steps` optimizer steps, during which each
module is replaced by its successor layer with probability p < 1. Phase 2 is every step after that: p = 1, the
successor trains alone. Everything here is a pure function of the config, the planned length of the run and two
counters (optimizer steps, training forwards), so the same numbers come out on every data-parallel rank and after a
resume from checkpoint.
"""

from __future__ import annotations

import math
import random
from typing import Optional


def split_into_modules(num_layers: int, num_modules: int) -> list[range]:
    """Consecutive predecessor layers of each module.

    When ``num_layers`` is not divisible by ``num_modules`` the modules differ in size by at most one layer, the larger
    ones first: 12 layers into 5 modules gives sizes 3, 3, 2, 2, 2.
    """
    base_size, num_larger = divmod(num_layers, num_modules)
    modules, start = [], 0
    for index in range(num_modules):
        size = base_size + (1 if index < num_larger else 0)
        modules.append(range(start, start + size))
        start += size
    return modules


def planned_steps(config) -> Optional[int]:
    """Optimizer steps planned for the whole run (both phases): ``config.total_steps``, or ``None`` if unknown.

    ``TheseusCallback`` fills ``total_steps`` in from the Trainer's ``max_steps`` when the user left it unset.
    """
    return config.total_steps


def replacing_steps(config) -> Optional[int]:
    """Optimizer steps of phase 1, after which p = 1 (phase 2); ``None`` when nothing fixes the end of phase 1.

    In order of precedence:

    * ``"linear"`` with an explicit ``linear_k``: the first step at which ``k * t + b`` reaches 1;
    * ``steps_for_replacing``, if set;
    * ``round(replacing_fraction * total_steps)`` when the run's length is known.
    """
    rate = float(config.replacing_rate)
    if rate >= 1.0:
        return 0
    if config.scheduler == "linear" and config.linear_k is not None:
        if config.linear_k <= 0:
            return None
        # the first t at which the float expression of replacing_rate() reaches 1
        steps = math.ceil((1.0 - rate) / config.linear_k)
        while steps > 0 and config.linear_k * (steps - 1) + rate >= 1.0:
            steps -= 1
        while config.linear_k * steps + rate < 1.0:
            steps += 1
        return steps
    if config.steps_for_replacing is not None:
        return config.steps_for_replacing
    total = planned_steps(config)
    if total is None:
        return None
    return int(round(config.replacing_fraction * total))


def replacing_rate(config, optimizer_steps: int) -> float:
    """p after ``optimizer_steps`` optimizer steps.

    ``"constant"``: ``config.replacing_rate`` during phase 1, then 1.0. ``"linear"``: the curriculum
    p_t = min(1, k * t + b) with b = ``config.replacing_rate``; k is ``config.linear_k`` or, when that is ``None``, the
    slope that reaches 1 at the end of phase 1. With no end of phase 1 known (:func:`replacing_steps` is ``None``), p
    stays at ``config.replacing_rate``.
    """
    rate = float(config.replacing_rate)
    phase_1 = replacing_steps(config)
    if config.scheduler == "linear" and config.linear_k is not None:
        return min(1.0, config.linear_k * optimizer_steps + rate)
    if phase_1 is None:
        return rate
    if optimizer_steps >= phase_1:
        return 1.0
    if config.scheduler == "linear":  # the slope that reaches 1 at the end of phase 1
        return min(1.0, rate + (1.0 - rate) * optimizer_steps / phase_1)
    return rate


def draw_replacements(
    seed: int, forward_index: int, rate: float, num_modules: int, at_least_one: bool = True
) -> list[bool]:
    """Bernoulli(``rate``) draws, one per module, for training forward number ``forward_index``.

    A private generator seeded from (seed, forward index) rather than the global RNG: identical on every rank, and
    replayable after a resume. ``random.Random`` seeds from a string through SHA-512, so the result does not depend on
    Python's hash randomisation.

    With ``at_least_one`` (the default) and 0 < ``rate``, a draw in which no module is replaced is drawn again from the
    same generator. Such a forward runs the frozen predecessor alone: it gives no gradient to any successor layer, yet
    it costs a forward and backward and advances the learning-rate and replacing schedules (with 3 modules at p = 0.5,
    one step in 8). Redrawing keeps exactly the draws that train something, each with the probability it has among
    them in independent draws; a module is then replaced with probability p / (1 - (1 - p)^n) (0.57 for 3 modules at
    p = 0.5, 0.50 for 6).
    """
    generator = random.Random(f"theseus:{seed}:{forward_index}")
    draws = [generator.random() < rate for _ in range(num_modules)]
    while at_least_one and rate > 0 and num_modules > 0 and not any(draws):
        draws = [generator.random() < rate for _ in range(num_modules)]
    return draws
