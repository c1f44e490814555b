"""Why the reference runs BLAS single-threaded: time 1000 exact LNB steps on the matrix-
factorization problem with the default BLAS threading and with one thread, in one run.

    .venv/bin/python benchmarks/blas_threads.py

numpy and scipy each ship their own OpenBLAS; on small matrices their two thread pools contend.
The demo (``lnb_ref/__main__.py``) and the test suite (``tests/conftest.py``) limit BLAS to one
thread with threadpoolctl because of what this prints.
"""

from __future__ import annotations

import time

from threadpoolctl import threadpool_limits

from lnb_ref import ExactLNB, exponential_decay
from lnb_ref.matfact import EXACT_LNB_SCHEDULE, MatrixFactorization, run


def main() -> None:
    problem = MatrixFactorization.make(0)
    times = {}
    for label, limits in (("default threads", None), ("1 thread", 1)):
        with threadpool_limits(limits=limits):  # None leaves the threading as it is
            opt = ExactLNB(problem.network.neurons, exponential_decay(*EXACT_LNB_SCHEDULE))
            start = time.perf_counter()
            run(problem, opt, 1000)
            times[label] = time.perf_counter() - start
    for label, seconds in times.items():
        print(f"{label:>16}: {seconds:6.2f} s for 1000 exact LNB steps")
    print(f"{'ratio':>16}: {times['default threads'] / times['1 thread']:6.1f}x")


if __name__ == "__main__":
    main()
