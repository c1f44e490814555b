"""Why the reference and the benchmarks run BLAS single-threaded, in one run each:

    .venv/bin/python benchmarks/blas_threads.py          # lnb_ref: 1000 exact LNB steps
    .venv/bin/python benchmarks/blas_threads.py --jax    # lnb_fast: the covariance refresh

numpy and scipy each ship their own OpenBLAS; on small matrices their two thread pools contend.
The demo (``lnb_ref/__main__.py``) and the test suite (``tests/conftest.py``) limit BLAS to one
thread with threadpoolctl because of what this prints.

``--jax`` times the covariance strategy's refresh (:func:`lnb_fast.covariance.damped_inverse`,
a Cholesky of the MLP's 801 × 801 second moment and its solve against the identity) jitted, with
the default threading and with one thread. On a CPU, JAX runs ``cho_factor``/``cho_solve`` as
LAPACK calls on the host, in scipy's OpenBLAS, whose thread pool then contends with XLA's own;
``threadpoolctl.threadpool_limits(1)`` around the training loop pins it (docs/fast.md, Speed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits


def reference() -> dict[str, float]:
    from lnb_ref import ExactLNB, exponential_decay
    from lnb_ref.matfact import EXACT_LNB_SCHEDULE, MatrixFactorization, run

    problem = MatrixFactorization.make(0)
    times = {}
    for label, limits in (("default threads", None), ("1 thread", 1)):
        with threadpool_limits(limits=limits):  # None leaves the threading as it is
            opt = ExactLNB(problem.network.neurons, exponential_decay(*EXACT_LNB_SCHEDULE))
            start = time.perf_counter()
            run(problem, opt, 1000)
            times[label] = time.perf_counter() - start
    return times


def refresh(repeats: int = 20, d: int = 800) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from lnb_fast.covariance import GramLayout, augmented, damped_inverse

    layout = GramLayout(1, d, d, None, None, None, np.zeros((1, d), np.int64), (d,))
    x = np.tanh(np.random.default_rng(0).normal(size=(1000, d))).astype(np.float32)
    C = jnp.asarray(x.T @ x / len(x))[None]
    A = augmented(layout, C, jnp.asarray(x.mean(0))[None])
    inverse = jax.jit(lambda A: damped_inverse(layout, A, 1e-3))
    jax.block_until_ready(inverse(A))
    times = {}
    for label, limits in (("default threads", None), ("1 thread", 1)):
        with threadpool_limits(limits=limits):
            start = time.perf_counter()
            for _ in range(repeats):
                jax.block_until_ready(inverse(A))
            times[label] = (time.perf_counter() - start) / repeats
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jax", action="store_true", help="time lnb_fast's covariance refresh")
    args = parser.parse_args()
    if args.jax:
        times = refresh()
        what = "per refresh (jitted damped_inverse, D = 801)"
        times = {k: v * 1e3 for k, v in times.items()}
        unit = "ms"
    else:
        times, what, unit = reference(), "for 1000 exact LNB steps", "s"
    for label, value in times.items():
        print(f"{label:>16}: {value:8.2f} {unit} {what}")
    print(f"{'ratio':>16}: {times['default threads'] / times['1 thread']:8.1f}x")


if __name__ == "__main__":
    main()
