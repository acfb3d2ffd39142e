"""The replacement schedule of BERT-of-Theseus: module boundaries, the rate p, and the per-forward draws.

Everything here is a pure function of the config and two counters (optimizer steps, training forwards), so the same
numbers come out on every data-parallel rank and after a resume from checkpoint.
"""

from __future__ import annotations

import random


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


def replacing_rate(config, optimizer_steps: int) -> float:
    """p after ``optimizer_steps`` optimizer steps.

    ``"constant"``: ``config.replacing_rate`` until ``config.steps_for_replacing`` steps (if set), then 1.0.
    ``"linear"``: the curriculum p_t = min(1, k * t + b) with b = ``config.replacing_rate``, k = ``config.linear_k``.
    """
    if config.scheduler == "linear":
        return min(1.0, config.linear_k * optimizer_steps + config.replacing_rate)
    if config.steps_for_replacing is not None and optimizer_steps >= config.steps_for_replacing:
        return 1.0
    return float(config.replacing_rate)


def draw_replacements(seed: int, forward_index: int, rate: float, num_modules: int) -> list[bool]:
    """Bernoulli(``rate``) draws, one per module, for training forward number ``forward_index``.

    A private generator seeded from (seed, forward index) rather than the global RNG: identical on every rank, and
    replayable after a resume. ``random.Random`` seeds from a string through SHA-512, so the result does not depend on
    Python's hash randomisation.
    """
    generator = random.Random(f"theseus:{seed}:{forward_index}")
    return [generator.random() < rate for _ in range(num_modules)]
