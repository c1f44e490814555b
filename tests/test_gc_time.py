"""``benchmarks/gc_time.py``'s timer, driven through its two pytest hooks by hand (running a
pytest session inside this one would load the suite's conftest twice)."""

from __future__ import annotations

import gc

from conftest import benchmark_module


def test_the_timer_sets_the_thresholds_and_counts_every_collection():
    bench = benchmark_module("gc_time")
    before = gc.get_threshold()
    timer = bench.GcTimer((700, 10, 10))
    try:
        timer.pytest_sessionstart(None)
        assert gc.get_threshold() == (700, 10, 10)
        for _ in range(3):
            cycle = []
            cycle.append(cycle)  # garbage only the cyclic collector frees
            del cycle
            gc.collect()  # a full collection: generation 2
        timer.pytest_sessionfinish(None)
        gc.collect(0)  # after the session: not counted
    finally:
        gc.set_threshold(*before)
        if timer._callback in gc.callbacks:
            gc.callbacks.remove(timer._callback)
    assert timer.counts[2] >= 3 and timer.seconds > 0
    assert timer._callback not in gc.callbacks
