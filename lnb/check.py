"""``lnb check``: ``lnb_fast`` (JAX) against ``lnb_ref`` (NumPy) on fresh random problems.

The command only: :func:`run_check` draws the problems with ``numpy.random`` and runs the
cross-check harness of :mod:`lnb.testing.crosscheck` (the same one the tests drive with
hypothesis), :func:`passed` and :func:`format_report` judge and print the worst error per
quantity against :data:`TOLERANCES` (:data:`lnb.testing.tolerances.CHECK_TOLERANCES`, explained
in :mod:`lnb.testing.tolerances`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .testing.crosscheck import (
    CheckError,
    cnn_step_errors,
    draw_problem,
    mlp_step_errors,
    neuron_errors,
    numpy_draws,
)
from .testing.tolerances import CHECK_TOLERANCES

__all__ = ["TOLERANCES", "CheckError", "format_report", "passed", "run_check"]

#: The largest relative error ``lnb check`` accepts per quantity: 1e-10 per neuron, 1e-9 for the
#: parameters after ≥ 10 whole steps (:mod:`lnb.testing.tolerances`). Measured over 500 random
#: problems: at most 7e-16 (metric product), 5e-14 (CG iterates, θ̂), 3e-14 (z); steps ≤ 4e-14.
TOLERANCES: dict[str, float] = CHECK_TOLERANCES


# --- the command ----------------------------------------------------------------------------------
def run_check(
    n_problems: int = 20, seed: int | None = None, progress: bool = True
) -> dict[str, float]:
    """Worst relative error per quantity of :data:`TOLERANCES`, ``lnb_fast`` against ``lnb_ref``.

    Over ``n_problems`` random neurons (:func:`draw_problem`: dense and convolutional, random
    options) the metric product, CG iterates, θ̂ and z (:func:`neuron_errors`), then ``"step"``:
    the parameters over whole Algorithm 2 steps on a small MLP (12 steps) and CNN (10 steps)
    (:func:`mlp_step_errors`, :func:`cnn_step_errors`) with fresh data and initial parameters.

    Runs in float64 (``jax.enable_x64(True)`` for its duration, restored afterwards: the
    comparison is only meaningful in float64), with NumPy's BLAS single-threaded meanwhile
    (faster on these small matrices).

    Args:
        n_problems: how many random neurons.
        seed: seed of ``numpy.random.default_rng``; None draws fresh entropy.
        progress: show a tqdm progress bar.

    Returns:
        ``{quantity: worst relative error}`` with the keys of :data:`TOLERANCES`; pass it to
        :func:`format_report` and :func:`passed`.

    Raises:
        CheckError: if the two sides do not describe the same problem at all.
    """
    rng = np.random.default_rng(seed)
    integer, choice = numpy_draws(rng)
    worst = dict.fromkeys(TOLERANCES, 0.0)
    with (
        jax.enable_x64(True),
        threadpool_limits(limits=1),
        tqdm(total=n_problems + 2, desc="lnb check", disable=not progress) as bar,
    ):
        for _ in range(n_problems):
            problem = draw_problem(integer, choice)
            while not problem.well_posed():
                problem = draw_problem(integer, choice)
            errors = neuron_errors(*problem)
            for key in ("metric product", "CG iterates", "theta_hat", "z", "step norm"):
                worst[key] = _worse(worst[key], errors[key])
            bar.update()
        for run in (mlp_step_errors, cnn_step_errors):
            worst["step"] = _worse(worst["step"], run(rng).params)
            bar.update()
    return worst


def _worse(a: float, b: float) -> float:
    """``max`` that keeps a NaN (``max(0.0, nan)`` is 0.0)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def passed(errors: dict[str, float]) -> bool:
    """Whether every error is finite and within its tolerance (:data:`TOLERANCES`)."""
    return all(_ok(key, value) for key, value in errors.items())


def _ok(key: str, value: float) -> bool:
    return math.isfinite(value) and value <= TOLERANCES[key]


def format_report(errors: dict[str, float]) -> str:
    """A Markdown table: quantity | worst relative error | tolerance | ok."""
    lines = [
        "| quantity | worst relative error | tolerance | ok |",
        "|---|---:|---:|:---:|",
    ]
    for key, value in errors.items():
        mark = "yes" if _ok(key, value) else "**NO**"
        lines.append(f"| {key} | {value:.2e} | {TOLERANCES[key]:.0e} | {mark} |")
    return "\n".join(lines)
