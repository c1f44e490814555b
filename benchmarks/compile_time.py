"""Time JAX's compilation during some of the test suite, in one process: how much of it compiles
single operations run eagerly, and how much whole programs.

    .venv/bin/python benchmarks/compile_time.py tests/test_fast.py tests/test_strategies.py \\
        tests/test_models.py

runs ``pytest -p no:xdist`` on the given tests with JAX's compile log on (``jax_log_compiles``)
and adds up, from its "Finished jaxpr to MLIR module conversion" and "Finished XLA compilation"
lines, the seconds spent lowering and compiling: for the programs JAX builds to run one
operation outside ``jit`` (named ``jit(<primitive>)``, e.g. ``jit(broadcast_in_dim)``; each
costs about 15 ms on this CPU, however small the operation) and for every other program. Give
``LNB_JAX_CACHE`` a fresh folder to compare two versions on equal terms: a program found in the
persistent compilation cache is counted with the time it took to load.
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import sys
import time

import pytest

#: the loggers JAX writes its compile log to (jax/_src/dispatch.py, interpreters/pxla.py)
LOGGERS = ("jax._src.dispatch", "jax._src.interpreters.pxla")
LINE = re.compile(
    r"Finished (?:jaxpr to MLIR module conversion|XLA compilation of) jit\((\w+)\) "
    r"in ([0-9.e+-]+) sec"
)


def primitive_names() -> set[str]:
    """The names of the JAX primitives defined so far (every ``Primitive`` object alive)."""
    import jax.numpy  # noqa: F401 - defines the lax and numpy primitives
    import jax.scipy.linalg  # noqa: F401 - and the linear algebra ones
    from jax._src.core import Primitive

    return {obj.name for obj in gc.get_objects() if isinstance(obj, Primitive)}


class CompileTimer(logging.Handler):
    """A pytest plugin (and the log handler it installs for the session): ``seconds`` and
    ``counts`` by ``"operation"`` (one primitive run eagerly) and ``"program"`` (anything else),
    lowering and compilation added together; ``counts`` counts programs, not log lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seconds = {"operation": 0.0, "program": 0.0}
        self.counts = {"operation": 0, "program": 0}
        self.primitives: set[str] = set()
        self._was_logging = False

    def emit(self, record):
        found = LINE.search(record.getMessage())
        if not found:
            return
        kind = "operation" if found[1] in self.primitives else "program"
        self.seconds[kind] += float(found[2])
        if "XLA compilation" in record.getMessage():
            self.counts[kind] += 1

    def pytest_sessionstart(self, session):
        import jax

        self.primitives = primitive_names()
        self._was_logging = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self)

    def pytest_sessionfinish(self, session):
        import jax

        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self)
        jax.config.update("jax_log_compiles", self._was_logging)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="+", help="test files or node ids")
    args = parser.parse_args(argv)
    timer = CompileTimer()
    start = time.perf_counter()
    code = pytest.main(["-q", "-p", "no:xdist", *args.tests], plugins=[timer])
    total = time.perf_counter() - start
    print(
        f"compiling single operations: {timer.seconds['operation']:.1f} s "
        f"({timer.counts['operation']} of them); whole programs: "
        f"{timer.seconds['program']:.1f} s ({timer.counts['program']}); the session: {total:.1f} s"
    )
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
