"""The hypothesis strategies of the test suite, in one place.

* :data:`seeds`: a NumPy seed (the tests draw their arrays from ``numpy.random.default_rng``
  with it, so a failing example is one integer);
* :func:`problems`: one neuron's solve of the cross-check harness
  (:class:`lnb.testing.crosscheck.Problem`), well-posed;
* :func:`local_problems`: the same neurons with LocoProp/ProxProp's options;
* :func:`xp_problems`: a neuron of ``lnb_fast.xp`` and its ``lnb_ref`` twin with the arrays of
  one solve.

The ranges of :func:`problems` live in :func:`lnb.testing.crosscheck.draw_problem`, which
``lnb check`` draws from with ``numpy.random``; here hypothesis does the drawing, so a
counterexample shrinks. How many examples run is the profile's (``tests/conftest.py``:
``LNB_HYPOTHESIS_PROFILE=ci`` small and derandomized, ``dev`` exploring). Needs ``hypothesis``
(the ``dev`` extra); :func:`problems` and :func:`local_problems` need JAX, :func:`xp_problems`
does not (imports happen on first draw).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from . import correlated_features

__all__ = ["local_problems", "problems", "seeds", "xp_problems"]

#: A seed of ``numpy.random.default_rng``.
seeds = st.integers(0, 2**32 - 1)


def _draw_problem(draw):
    from .crosscheck import draw_problem

    return draw_problem(
        lambda lo, hi: draw(st.integers(lo, hi)), lambda options: draw(st.sampled_from(options))
    )


@st.composite
def problems(draw):
    """A random neuron's solve (:class:`lnb.testing.crosscheck.Problem`: dense or convolutional,
    both layouts, a ridge, 1–4 PCG iterations, cold or warm); a singular metric (γ = 0 and a
    rank-deficient design) is ill-posed for PCG on both sides and is not drawn
    (:meth:`~lnb.testing.crosscheck.Problem.well_posed`)."""
    problem = _draw_problem(draw)
    assume(problem.well_posed())
    return problem


@st.composite
def local_problems(draw):
    """``(case, seed, transfer, kappa, steps, tau)``: a random neuron (as :func:`problems`, not
    filtered: LocoProp's and ProxProp's solves are regularised) with a transfer φ, LocoProp's κ,
    a number of inner steps J and ProxProp's τ."""
    problem = _draw_problem(draw)
    transfer = draw(st.sampled_from(["identity", "tanh", "sigmoid", "relu"]))
    kappa = draw(st.sampled_from([0.0, 1e-3, 0.5]))
    steps = draw(st.integers(1, 6))
    tau = draw(st.sampled_from([1e-3, 0.1, 10.0]))
    return problem.case, problem.seed, transfer, kappa, steps, tau


@st.composite
def xp_problems(draw):
    """``(ref, new, X, g, v, x0, mu, chi, ridge)``: a random dense or conv neuron on both sides
    (``lnb_ref`` and ``lnb_fast.xp``), its input X, a gradient-like g, a vector v, a warm start
    x0, moments μ, χ of the right shapes (from another batch) and a ridge γ ≥ 1e-3 (so that no
    metric is singular)."""
    import lnb_ref
    from lnb_fast import xp as lnbxp
    from lnb_ref import solvers as ref_solvers

    rng = np.random.default_rng(draw(seeds))
    bias = draw(st.booleans())
    if draw(st.booleans()):
        d_in, d_out = draw(st.integers(1, 8)), draw(st.integers(1, 5))
        lead = draw(st.sampled_from([(12,), (3, 5), (40,)]))
        X = correlated_features(rng, math.prod(lead), d_in).reshape(*lead, d_in)
        ref = lnb_ref.Dense("layer", d_in, d_out, bias=bias)
        new = lnbxp.Dense(d_in, d_out, bias=bias, name="layer")
    else:
        groups = draw(st.sampled_from([1, 2]))
        c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
        k = draw(st.sampled_from([1, 2, 3, (2, 3)]))
        stride = draw(st.sampled_from([1, 2, (1, 2)]))
        padding = draw(st.sampled_from([0, 1, (1, 0)]))
        dilation = draw(st.sampled_from([1, 2]))
        hw = draw(st.integers(3, 7))
        n = draw(st.integers(1, 3))
        args = (c_in, c_out, k, stride, padding, dilation, groups, bias)
        ref = lnb_ref.Conv2d("layer", *args)
        assume(min(ref.output_hw(hw, hw)) >= 1)
        new = lnbxp.Conv2d(*args, name="layer")
        X = rng.normal(size=(n, c_in, hw, hw)) + rng.normal(size=(1, c_in, 1, 1))
    theta_shape = ref.theta_shape
    g, v, x0 = (rng.normal(size=theta_shape) for _ in range(3))
    mu, chi = ref_solvers.design_moments(ref, X + 0.1 * rng.normal(size=X.shape))
    ridge = draw(st.sampled_from([1e-3, 1e-1]))
    return ref, new, X, g, v, x0, mu, chi, ridge
