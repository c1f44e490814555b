"""``benchmarks/compile_time.py``'s timer, driven through its two pytest hooks by hand (running a
pytest session inside this one would load the suite's conftest twice)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from conftest import benchmark_module


def test_the_timer_tells_single_operations_from_programs():
    bench = benchmark_module("compile_time")
    timer = bench.CompileTimer()
    before = jax.config.jax_log_compiles
    timer.pytest_sessionstart(None)
    try:
        assert {"sin", "dot_general", "broadcast_in_dim"} <= timer.primitives
        # shapes no other test uses, so that nothing comes from a cache
        jnp.sin(jnp.arange(1237.0)).block_until_ready()  # eager: iota, convert, sin (or fewer)

        def program_of_the_timer_test(x):
            return jnp.cos(x) @ x.T

        jax.jit(program_of_the_timer_test)(jnp.ones((13, 7))).block_until_ready()
    finally:
        timer.pytest_sessionfinish(None)
    assert jax.config.jax_log_compiles == before
    assert timer.counts["program"] == 1 and timer.seconds["program"] > 0
    assert timer.counts["operation"] >= 1 and timer.seconds["operation"] > 0
    # after the session the handler is gone: nothing more is counted
    counts = dict(timer.counts)
    jnp.cos(jnp.arange(1239.0)).block_until_ready()
    assert timer.counts == counts
