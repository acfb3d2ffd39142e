"""Benchmarks: the ``peft-ladder bench`` harness (memory, speed, estimate), the quality suites, and shared helpers."""
