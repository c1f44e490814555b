"""Time Python's cyclic garbage collector during some of the test suite, in one process.

    .venv/bin/python benchmarks/gc_time.py tests/test_optax_composition.py tests/test_fast.py \\
        tests/test_strategies.py tests/test_models.py tests/test_conformance.py
    .venv/bin/python benchmarks/gc_time.py --thresholds 700 10 10 tests/...   # Python's default

runs ``pytest -p no:xdist`` on the given tests with a ``gc.callbacks`` timer and prints the time
spent collecting, the session's time and the number of collections by generation.
``tests/conftest.py`` raises the thresholds (``gc.set_threshold(50_000, 20, 100)``, docs/testing.md,
"Time"); ``--thresholds`` sets others once it has run. Give ``LNB_JAX_CACHE`` a fresh folder to
compare two settings on equal terms (a filled compilation cache makes the second run shorter).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import pytest


class GcTimer:
    """A pytest plugin: sets the thresholds at session start (after ``tests/conftest.py``) and
    times every collection."""

    def __init__(self, thresholds):
        self.thresholds = thresholds
        self.seconds, self.counts, self._start = 0.0, [0, 0, 0], 0.0

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1

    def pytest_sessionstart(self, session):
        if self.thresholds:
            gc.set_threshold(*self.thresholds)
        gc.callbacks.append(self._callback)

    def pytest_sessionfinish(self, session):
        gc.callbacks.remove(self._callback)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", type=int, nargs=3, metavar=("G0", "G1", "G2"))
    parser.add_argument("tests", nargs="+", help="test files or node ids")
    args = parser.parse_args(argv)
    timer = GcTimer(args.thresholds)
    start = time.perf_counter()
    code = pytest.main(["-q", "-p", "no:xdist", *args.tests], plugins=[timer])
    total = time.perf_counter() - start
    print(
        f"gc thresholds {gc.get_threshold()}: {timer.seconds:.1f} s collecting of {total:.1f} s; "
        f"{sum(timer.counts)} collections (by generation {timer.counts})"
    )
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
