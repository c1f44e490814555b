"""lnb_fast against lnb_ref (float64, ``jax_enable_x64``): metric products, moments, every PCG
iterate, θ̂ and z for random dense and convolutional neurons, then whole Algorithm 2 steps on the
reference's MLP and CNN.

The machinery (the neurons on both sides, the random problems, the errors of one solve, whole
steps) is :mod:`lnb.check`, which ``lnb check`` runs on fresh problems; here hypothesis draws the
problems (from the same ranges, :func:`lnb.check.draw_problem`) and every error is asserted.

Tolerances: both sides run in float64 and differ only in summation order (XLA vs NumPy/BLAS), so
each quantity agrees to ``κ · (a few ops) · eps``; with the well-conditioned features drawn here
(κ ≲ 1e3) 1e-10 leaves two orders of magnitude of headroom. Whole steps compound that over 10
steps and the network's nonlinearity, hence 1e-9 (the issue's bound).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
from conftest import RTOL  # noqa: E402

from lnb.check import (  # noqa: E402
    cnn_step_errors,
    conv_case,
    draw_problem,
    mlp_step_errors,
    neuron_errors,
)

STEP_RTOL = 1e-9


@st.composite
def problems(draw):
    """A random neuron's solve (:class:`lnb.check.Problem`), drawn by hypothesis so it shrinks;
    a singular metric (γ = 0 and a rank-deficient design) is ill-posed for PCG on both sides and
    is not drawn (``Problem.well_posed``)."""
    problem = draw_problem(
        lambda lo, hi: draw(st.integers(lo, hi)), lambda options: draw(st.sampled_from(options))
    )
    assume(problem.well_posed())
    return problem


def check_neuron(case, seed: int, ridge: float, iterations: int, warm: bool):
    """Every quantity of one neuron's solve, fast vs reference."""
    errors = neuron_errors(case, seed, ridge, iterations, warm)
    # Eq. 11: the metric product.
    assert errors["metric product"] < RTOL, errors
    # Alg. 2 lines 6-7: the design-column moments, broadcast over each row of θ.
    assert errors["moments"] < RTOL, errors
    # Lines 8-10: preconditioner, every PCG iterate and residual, θ̂; then z = θ̂·g.
    assert errors["preconditioner"] < RTOL, errors
    assert errors["CG iterates"] < RTOL, errors
    # A residual that has converged is rounding noise: compared against the initial residual.
    assert errors["residual norms"] <= RTOL, errors
    assert errors["theta_hat"] < RTOL, errors
    # |z − z_ref| relative to Σ|θ̂||g|; the measured norm θ̂ᵀ(M + γ)θ̂ from each PCG's residual.
    assert errors["z"] <= RTOL, errors
    assert errors["step norm"] <= RTOL, errors


@given(problems())
def test_neuron_matches_reference(problem):
    check_neuron(*problem)


def test_conv_cases_cover_the_options():
    """The strategy above draws strided, padded, dilated, grouped, biased convolutions in both
    layouts; make sure one of each is actually exercised (not only hoped for)."""
    rng = np.random.default_rng(1)
    for layout in ("NCHW", "NHWC"):
        case = conv_case(rng, 2, 4, 6, 7, 3, 2, 1, 2, 2, True, layout)
        check_neuron(case, seed=3, ridge=1e-3, iterations=3, warm=True)


# --- whole steps on the reference's networks ------------------------------------------------------
STEP_RULES = [
    {},  # the defaults: measured step norm, descent restart, relative ridge
    {"step_norm": "paper", "min_descent": 0.0, "relative_ridge": False},  # Algorithm 2 as printed
]


@pytest.mark.parametrize("rule", STEP_RULES, ids=["defaults", "paper"])
def test_whole_steps_match_reference_on_mlp(rule):
    """12 steps with weight decay, ridge and z0: the loss before and the parameters after every
    step, under both step-norm rules."""
    errors = mlp_step_errors(np.random.default_rng(5), np.random.default_rng(0), **rule)
    assert errors.loss <= STEP_RTOL, errors
    assert errors.params < STEP_RTOL, errors
    assert errors.params > 0  # the parameters did move apart from rounding, and stayed within 1e-9


@pytest.mark.parametrize("rule", STEP_RULES, ids=["defaults", "paper"])
def test_whole_steps_match_reference_on_cnn(rule):
    """10 steps with strides and padding."""
    errors = cnn_step_errors(np.random.default_rng(6), np.random.default_rng(0), **rule)
    assert errors.loss <= STEP_RTOL, errors
    assert errors.params < STEP_RTOL, errors
