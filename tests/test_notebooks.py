"""Every notebook in ``notebooks/`` executes without error (each checks its own claims with
assertions, most through a one-line ``check(condition, message)``, and runs its exercises'
solutions), and is stored without outputs. The executed copies are written to
``docs/notebooks/`` (not in version control), where ``make docs`` renders them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from conftest import FAST_COMPILE_FLAGS  # noqa: E402

#: one worker runs the notebooks one after the other, then tests/test_site.py builds the docs
#: from them and opens the site, while the other worker goes on with the rest of the suite
pytestmark = pytest.mark.xdist_group("notebooks")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "notebooks"
RENDERED = ROOT / "docs" / "notebooks"
EXPECTED = [
    "01_boosting_to_least_squares",
    "02_metric_and_whitening",
    "03_solving_online",
    "04_second_order_in_context",
    "05_reproducing_the_paper",
    "06_lnb_from_scratch_in_jax",
]
#: notebooks that time their steps (and assert on the ratio, and print it in the docs): their
#: kernel compiles with XLA's default optimisation, not the suite's fast-compile flags
#: (tests/conftest.py), so the times are those a reader gets
TIMED = {"05_reproducing_the_paper"}


def kernel_env(name: str) -> dict:
    env = dict(os.environ)
    if name in TIMED:
        flags = env.get("XLA_FLAGS", "")
        for flag in FAST_COMPILE_FLAGS:
            flags = flags.replace(flag, "")
        env["XLA_FLAGS"] = " ".join(flags.split())
    return env


def test_the_six_notebooks_are_there():
    assert sorted(p.stem for p in SOURCES.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes(name):
    path = SOURCES / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        f"{path.name} must be stored without outputs (clear them before committing)"
    )
    checks = sum("assert" in c.source or "check(" in c.source for c in code)
    assert checks >= 3, "a notebook checks its claims (assert, or its one-line check(...) helper)"
    # `timeout` is a hang guard per cell, not a speed test (each notebook takes well under the
    # 2 minutes the project allows; the test log shows the time).
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(SOURCES)}}
    )
    start = time.perf_counter()
    client.execute(env=kernel_env(name))
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    RENDERED.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, RENDERED / path.name)
