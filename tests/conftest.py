"""Shared test setup: hypothesis profiles, the ``x64`` marker, single-threaded BLAS.

The harness, tolerances and strategies the tests share live in :mod:`lnb.testing`
(``docs/testing.md`` is the guide for newcomers):

* tolerances by quantity and dtype: :mod:`lnb.testing.tolerances` (``RTOL = 1e-10`` for
  rounding-level float64 agreement, ``STEP_RTOL = 1e-9`` for whole steps, ...);
* hypothesis strategies: :mod:`lnb.testing.strategies`;
* the fast-vs-reference harness: :mod:`lnb.testing.crosscheck`.

**Hypothesis profiles**, chosen by ``LNB_HYPOTHESIS_PROFILE``: ``ci`` (what ``make test`` and
``.ci/run`` use: few examples, derandomized, so a run is reproducible and fast) and ``dev`` (the
default for a plain ``pytest``: more examples, random, so local runs explore). A test's own
``@settings(max_examples=...)`` wins over both; a property whose examples each compile new XLA
programs uses ``COMPILED`` (10 examples in ``ci``, 40 in ``dev``).

**float32 means float32**: on GPUs JAX's default float32 matrix product may round its inputs to
fewer mantissa bits; on an H200 it made a Gram 57× less accurate than full float32
(``benchmarks/matmul_precision.py``) and failed 7 float32 tolerances that hold at full float32.
The tolerances here are float32's own (:mod:`lnb.testing.tolerances`), so the suite runs with
``JAX_DEFAULT_MATMUL_PRECISION=highest`` unless the environment sets it (a no-op on the CPU).

**float64 only where needed**: JAX runs in float32 (what users run) unless a test is marked
``@pytest.mark.x64`` (or its module sets ``pytestmark = pytest.mark.x64``); a marked test runs
inside ``jax.enable_x64(True)``, set-up and tear-down included, and an unmarked one inside
``jax.enable_x64(False)``, whatever an earlier test did.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from threadpoolctl import threadpool_limits

# numpy and scipy each ship an OpenBLAS; on the small matrices used here their two thread pools
# only contend (8x slower on 2 cores: benchmarks/blas_threads.py), so the suite runs BLAS
# single-threaded.
threadpool_limits(limits=1)

# Python's cyclic garbage collector, less often. Tracing and compiling allocate many short-lived
# container objects (tracers, jaxpr equations, pytrees), and with the default thresholds
# (700, 10, 10) the collector ran 3,543 times in 120 s of tests, 5.4 s in all, walking the
# long-lived objects of JAX's caches again each time; with these, 22 times and 1.1 s
# (benchmarks/gc_time.py on 5 of the suite's files: docs/testing.md, "Time"). The same garbage
# is collected, in fewer passes.
gc.set_threshold(50_000, 20, 100)

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=60, print_blob=True)
PROFILE = os.environ.get("LNB_HYPOTHESIS_PROFILE", "dev")
settings.load_profile(PROFILE)
#: Examples for a property whose every example compiles new XLA programs (its shapes are drawn):
#: there the examples, not the arithmetic, are the time. ``@settings(max_examples=COMPILED)``.
COMPILED = {"ci": 10, "dev": 40}.get(PROFILE, settings().max_examples)


# XLA compilation is most of the suite's time. JAX's persistent compilation cache keeps every
# compiled program on disk, keyed by the program itself: a second run, another xdist worker or
# another test that builds the same step loads it instead of compiling it again. Set through the
# environment before JAX is imported, so the processes the tests start (notebook kernels, the
# CLI) share it. LNB_JAX_CACHE moves it (default build/jax-cache); LNB_JAX_CACHE= turns it off.
JAX_CACHE = os.environ.get(
    "LNB_JAX_CACHE", str(Path(__file__).resolve().parents[1] / "build" / "jax-cache")
)
if JAX_CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Full-precision float32 products on GPUs too (see the module docstring); before JAX is imported.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Three XLA compile options for the suite, which runs each program a few times on tiny arrays,
# so that compiling is its time. None changes what a program computes or in which dtype; every
# comparison is against a tolerance or between programs compiled alike, and every float32 and
# 1e-9 tolerance holds under them (the suite passed with all three, with the first two, with the
# first alone, and with none before the first was added).
# * the backend's (LLVM's) optimisation off: compiles about a third faster (measured, CPU time:
#   tests/test_optax_composition.py 185 -> 119 s, tests/scaling_check.py 87 -> 56 s);
# * XLA:CPU's older elemental emitters instead of its MLIR fusion emitters, which spend more time
#   compiling each small fusion: the suite's CPU time 12 min 20 s -> 8 min 31 s on 2 workers
#   (cold compilation cache; docs/testing.md, "Time");
# * the LLVM module compiled whole instead of split in 32 parts for a thread pool: on 2 cores
#   that both workers keep busy the split only adds work (tests/test_optax_composition.py and
#   tests/test_models.py in one process without cache 47.2 -> 44.8 s, the suite's wall time
#   4 min 38 s -> 4 min 13 s with a cold cache; docs/testing.md, "Time").
# Through the environment, so the processes the tests start (the CLI, the scaling checks) compile
# alike; a notebook kernel that times steps gets XLA's defaults back (tests/test_notebooks.py),
# and a test whose time is running one long loop compiles that loop with them
# (:func:`compile_optimised`). A flag the environment already sets is left as set;
# LNB_XLA_FAST_COMPILE=0 adds none.
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)
#: XLA's own values of the options FAST_COMPILE_FLAGS changes (its DebugOptions defaults)
XLA_DEFAULTS = {
    "xla_backend_optimization_level": 3,
    "xla_cpu_use_fusion_emitters": True,
    "xla_cpu_parallel_codegen_split_count": 32,
}
if os.environ.get("LNB_XLA_FAST_COMPILE", "1") != "0":
    _flags = os.environ.get("XLA_FLAGS", "")
    for _flag in FAST_COMPILE_FLAGS:
        if _flag.split("=")[0] not in _flags:
            _flags = f"{_flags} {_flag}".strip()
    os.environ["XLA_FLAGS"] = _flags


def compile_optimised(fun, *args):
    """``jax.jit(fun)`` compiled for ``args`` with XLA's default options
    (:data:`XLA_DEFAULTS`), not the suite's fast-compile ones: for a test whose time is running
    one long loop (a ``lax.scan`` of 1000 steps), where unoptimised code costs more than
    optimising it (the README model's 1000-step scans: docs/testing.md, "Time"). Returns the
    compiled function; call it with ``args``."""
    import jax

    return jax.jit(fun).lower(*args).compile(compiler_options=XLA_DEFAULTS)


try:
    import jax
except ImportError:  # pragma: no cover - lnb_fast tests are skipped without jax
    jax = None


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as the module ``name`` (registered in ``sys.modules``:
    the scripts' dataclasses look their module up), for the tests that run a script's
    ``main`` in-process."""
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pytest_report_header(config):
    x64 = "x64 only where marked" if jax is not None else "no jax"
    return f"lnb: hypothesis profile {PROFILE!r} (LNB_HYPOTHESIS_PROFILE), JAX {x64}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Run a test marked ``x64`` in float64, every other one in float32 (JAX's default)."""
    if jax is None:
        return (yield)
    x64 = item.get_closest_marker("x64") is not None
    with jax.enable_x64(x64):
        return (yield)


#: The longest tests (``--durations``, cold), started first: xdist hands out work in collection
#: order, so a long test collected last leaves one worker running it alone at the end (a long
#: tail). Longest first balances the two workers; only the order changes. Prefixes of node ids.
LONGEST_FIRST = (
    "tests/test_notebooks.py::test_notebook_executes[05_reproducing_the_paper]",
    "tests/test_scaling.py",
    "tests/test_step_time.py",
    "tests/test_experiments.py",
    "tests/test_conformance.py",
    "tests/test_invariance.py",
)


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook
def pytest_collection_modifyitems(config, items):
    def rank(item):
        # the site is built from the notebooks the suite executes: its tests last (under xdist
        # they share the notebooks' group, hence their worker; tests/test_site.py)
        if item.nodeid.startswith("tests/test_site.py"):
            return len(LONGEST_FIRST) + 1
        for i, prefix in enumerate(LONGEST_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each rank is kept
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        for item in items:
            _join_xdist_group(item)


def _join_xdist_group(item) -> None:
    """``@pytest.mark.xdist_group(name)`` under pytest 9.2 (the version here): ``--dist loadgroup``
    sends the tests whose node id ends in ``@name`` to one worker, and pytest-xdist (3.8) adds
    that suffix by assigning ``item._nodeid``, which pytest 9.2 replaced by a structured
    ``item._id``: there the marks were silently ignored (each worker set up its own copy of a
    module's fixtures and compiled the shared programs again). Adds the suffix where xdist's did
    not take (older pytest: xdist's own suffix is there, nothing to do)."""
    names = {
        m.args[0] if m.args else m.kwargs.get("name", "default")
        for m in item.iter_markers("xdist_group")
    }
    if not names or item.nodeid.rfind("@") > item.nodeid.rfind("]"):  # none, or xdist's took
        return
    nodeid = f"{item.nodeid}@{'_'.join(sorted(map(str, names)))}"
    try:
        from _pytest.nodeid import NodeId  # pytest 9.2
    except ImportError:  # older pytest: xdist's own suffix took (item._nodeid)
        return
    item._id = NodeId.parse(nodeid)


def naive_conv2d(X, filters, bias, stride, padding, dilation, groups):
    """A loop-by-loop convolution, independent of the im2col code under test."""
    n, _, h, w = X.shape
    co, cg, kh, kw = filters.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Xp = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, co, ho, wo))
    kg = co // groups
    for o in range(co):
        g = o // kg
        for y in range(ho):
            for x in range(wo):
                ys, xs = y * sh, x * sw
                patch = Xp[
                    :,
                    g * cg : (g + 1) * cg,
                    ys : ys + dh * (kh - 1) + 1 : dh,
                    xs : xs + dw * (kw - 1) + 1 : dw,
                ]
                out[:, o, y, x] = np.sum(patch * filters[o], axis=(1, 2, 3))
                if bias is not None:
                    out[:, o, y, x] += bias[o]
    return out
