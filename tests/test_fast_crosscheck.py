"""lnb_fast against lnb_ref (float64, ``jax_enable_x64``): metric products, moments, every PCG
iterate, θ̂ and z for random dense and convolutional neurons, then whole Algorithm 2 steps on the
reference's MLP and CNN.

The machinery (the neurons on both sides, the random problems, the errors of one solve, whole
steps) is :mod:`lnb.testing.crosscheck`, which ``lnb check`` runs on fresh problems; here
hypothesis draws the problems (:func:`lnb.testing.strategies.problems`, from the same ranges)
and every error is asserted. Tolerances: ``rounding`` (1e-10) per neuron, ``steps`` (1e-9) for
whole steps, from :mod:`lnb.testing.tolerances`.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import COMPILED
from hypothesis import given, settings

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

from lnb.testing.crosscheck import (  # noqa: E402
    cnn_step_errors,
    conv_case,
    mlp_step_errors,
    neuron_errors,
)
from lnb.testing.strategies import problems  # noqa: E402
from lnb.testing.tolerances import RTOL, STEP_RTOL  # noqa: E402

pytestmark = pytest.mark.x64  # both sides in float64


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


@settings(max_examples=COMPILED)
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
