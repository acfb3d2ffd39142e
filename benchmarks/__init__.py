"""The research harness of peft-ladder: memory and speed benchmarks, quality suites and the demo.

Not part of the installed package (``pip install peft-ladder`` ships the library alone). Run it from the repository
root, e.g. ``python -m benchmarks.demo`` or ``python -m benchmarks.memory --help``. It uses only the public API of
``peft_ladder``.
"""
