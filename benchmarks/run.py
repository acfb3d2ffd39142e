"""``python -m benchmarks.run [SUITE ...]``: run the quality suites with their declared protocols.

Every suite is a module of ``benchmarks.quality`` whose ``main(argv)`` runs it; the arguments below are the ones each
runs with by default (its declared grids, seeds and splits). A failing suite is reported and the others still run.
"""

import importlib
import sys

SUITES = {
    "lst_quality": [[]],
    "lst_clm_quality": [[]],
    "theseus_quality": [[]],
    "distill_quality": [[]],
    "quant_quality": [["lst"], ["deploy"]],
}


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    failures = 0
    for name in names or list(SUITES):
        for argv in SUITES[name]:
            print(f"[quality] {name} {' '.join(argv)}", flush=True)
            try:
                importlib.import_module(f"benchmarks.quality.{name}").main(list(argv))
            except (Exception, SystemExit) as error:  # one broken suite must not hide the others' results
                if isinstance(error, SystemExit) and not error.code:
                    continue
                failures += 1
                print(f"[quality] {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
