"""Exact solve, PCG and the paper's preconditioners (§3.5)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lnb.testing import correlated_features, rel_err
from lnb.testing.strategies import seeds
from lnb.testing.tolerances import RECURRENCE_RTOL, RTOL, SOLVE_RTOL
from lnb_ref import (
    Dense,
    DiagonalPreconditioner,
    IncompleteCholeskyPreconditioner,
    NotPositiveDefiniteError,
    metric_factor,
    metric_from_forward,
    metric_matvec,
    paper_preconditioner,
    pcg,
    row_metric,
    solve_exact,
)
from lnb_ref.solvers import design_moments


@given(
    seed=seeds, n=st.integers(10, 40), d=st.integers(1, 6), k=st.integers(1, 3), bias=st.booleans()
)
def test_exact_solve_matches_dense_inverse(seed, n, d, k, bias):
    rng = np.random.default_rng(seed)
    neuron = Dense("w", d, k, bias=bias)
    X = correlated_features(rng, n, d)
    g = rng.normal(size=neuron.theta_shape)
    M = metric_from_forward(neuron, X)
    expected = np.linalg.solve(M, g.ravel()).reshape(g.shape)
    assert rel_err(solve_exact(neuron, row_metric(neuron, X), g), expected) < SOLVE_RTOL


@given(
    seed=seeds,
    d=st.integers(1, 6),
    k=st.integers(1, 3),
    bias=st.booleans(),
    precondition=st.booleans(),
)
def test_pcg_to_full_dimension_is_exact(seed, d, k, bias, precondition):
    """CG on a P-dimensional SPD system terminates in P iterations (exact arithmetic). Each row
    is an independent copy of the same D×D system, so D iterations already suffice; we run P
    and compare to the Cholesky solve. Tolerance 1e-8: CG loses orthogonality at a rate that
    grows with κ(M) (≤ ~1e3 here)."""
    rng = np.random.default_rng(seed)
    neuron = Dense("w", d, k, bias=bias)
    X = correlated_features(rng, 6 * d + 6, d)
    g = rng.normal(size=neuron.theta_shape)
    mu, chi = design_moments(neuron, X)
    P = None
    if precondition:
        P = (
            IncompleteCholeskyPreconditioner(neuron, mu, chi)
            if bias
            else DiagonalPreconditioner(neuron, chi)
        )
    x0 = rng.normal(size=neuron.theta_shape)
    result = pcg(lambda v: metric_matvec(neuron, X, v), g, neuron.n_params, P, x0)
    exact = solve_exact(neuron, row_metric(neuron, X), g)
    assert rel_err(result.x, exact) < RECURRENCE_RTOL
    assert len(result.iterates) == neuron.n_params
    assert len(result.residual_norms) == neuron.n_params + 1


def test_pcg_stops_cleanly_at_exact_solution():
    """Warm-started at the solution the residual is 0: the iterates repeat it (no 0/0)."""
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    b = np.array([1.0, -1.0])
    x = np.linalg.solve(A, b)
    result = pcg(lambda v: A @ v, b, 3, x0=A @ np.zeros(2) + x)
    assert np.all(np.isfinite(result.x))
    assert rel_err(result.x, x) < RTOL


@given(seed=seeds, d=st.integers(1, 6))
def test_incomplete_cholesky_preconditioner_is_eq12_with_diagonal_sigma(seed, d):
    """P = W̃ W̃ᵀ is the inverse of Eq. 12's M with Σ replaced by diag(χ − μ⊙μ): exact when the
    covariance is diagonal, and it keeps the μ cross terms (it is not a diagonal matrix)."""
    rng = np.random.default_rng(seed)
    neuron = Dense("w", d, 2, bias=True)
    X = rng.normal(size=(50, d)) * rng.uniform(0.5, 2.0, size=d) + rng.normal(size=d)
    mu, chi = design_moments(neuron, X)
    pre = IncompleteCholeskyPreconditioner(neuron, mu, chi)
    var = chi[0] - mu[0] ** 2
    M_diag = np.block(
        [[np.diag(var) + np.outer(mu[0], mu[0]), mu[0][:, None]], [mu[0][None, :], np.ones((1, 1))]]
    )
    assert rel_err(pre.row_matrix()[0], np.linalg.inv(M_diag)) < SOLVE_RTOL
    _, W = metric_factor(mu[0], np.diag(var))
    assert rel_err(pre.row_matrix()[0], W @ W.T) < SOLVE_RTOL
    v = rng.normal(size=neuron.theta_shape)
    assert rel_err(pre(v), v @ pre.row_matrix()[0].T) < RTOL
    assert np.count_nonzero(pre.row_matrix()[0] - np.diag(np.diag(pre.row_matrix()[0]))) > 0


def test_diagonal_preconditioner_is_jacobi():
    rng = np.random.default_rng(0)
    neuron = Dense("w", 4, 3)
    X = correlated_features(rng, 30, 4)
    _, chi = design_moments(neuron, X)
    pre = DiagonalPreconditioner(neuron, chi, gamma=0.1)
    C = row_metric(neuron, X, 0.1)[0]
    assert rel_err(pre.row_matrix()[0], np.diag(1.0 / np.diag(C))) < RTOL
    v = rng.normal(size=neuron.theta_shape)
    assert rel_err(pre(v), v / np.diag(C)) < RTOL


def energy_error(neuron, X, ridge, x, exact) -> float:
    """``‖x − x*‖_M / ‖x*‖_M``: the error CG minimises, which for LNB is the relative error of
    the step *in function space*, ``‖f(·; x − x*)‖ / ‖f(·; x*)‖`` (§3.1), and equals the residual
    measured in the dual norm, ``‖r‖_{M⁻¹}``."""
    e = x - exact
    Me = metric_matvec(neuron, X, e, ridge)
    Mx = metric_matvec(neuron, X, exact, ridge)
    return float(np.sqrt(np.vdot(e, Me) / np.vdot(exact, Mx)))


def test_warm_started_pcg_beats_plain_cg_on_correlated_features():
    """§3.5: with the paper's preconditioners and a warm start from the previous minibatch's
    solution, 2 PCG iterations leave a smaller error than 2 plain CG iterations from zero.

    The family: a dense neuron (d = 20, with and without bias) whose features have a large
    common mean, unequal scales and correlations (κ(M) ~ 1e5); two consecutive minibatches of
    256 from the same distribution; the gradient drifts by 10% between them. Asserted on each of
    20 seeds × 2 neurons. The warm start is only as good as the previous batch's solution: with
    minibatches of 64 (3 samples per parameter of a row) consecutive solutions disagree by more
    than their size on some seeds and warm PCG lost 4 of the 40 problems when we measured it.

    The error is measured in the metric's norm (:func:`energy_error`). Measured while writing
    this test (batches of 256): plain CG leaves 0.99 of the initial error after 2 iterations on
    average, warm PCG 0.27. The *Euclidean* residual ``‖b − A x‖₂`` is no measure of that: the
    warm start carries the previous batch's components along the stiffest directions, so its
    Euclidean residual starts far above ``‖b‖`` and, with batches of 64, is still above plain
    CG's after 2 iterations on every seed even though its solution is much closer in function
    space.
    """
    wins = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        d, k = 20, 4
        mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
        scales = np.exp(rng.uniform(-1.5, 1.5, size=d))
        mean = 3.0 * rng.normal(size=d)
        X_prev, X = [(rng.normal(size=(256, d)) @ mix) * scales + mean for _ in range(2)]
        g_prev = rng.normal(size=(k, d + 1))
        g_next = g_prev + 0.1 * rng.normal(size=g_prev.shape)
        ridge = 1e-4
        for bias in (True, False):
            neuron = Dense("w", d, k, bias=bias)
            gp, g = (g_prev, g_next) if bias else (g_prev[:, :d], g_next[:, :d])
            prev = solve_exact(neuron, row_metric(neuron, X_prev, ridge), gp)
            exact = solve_exact(neuron, row_metric(neuron, X, ridge), g)
            mu, chi = design_moments(neuron, np.vstack([X_prev, X]))  # the EMA's stand-in
            P = paper_preconditioner(neuron, mu, chi, ridge)

            def A(v, X=X, neuron=neuron, ridge=ridge):
                return metric_matvec(neuron, X, v, ridge)

            warm = pcg(A, g, 2, precondition=P, x0=prev)
            plain = pcg(A, g, 2)
            err_warm = energy_error(neuron, X, ridge, warm.x, exact)
            err_plain = energy_error(neuron, X, ridge, plain.x, exact)
            wins.append(err_warm < err_plain)
    assert all(wins), f"warm-started PCG lost on {wins.count(False)} of {len(wins)} problems"


def test_singular_metric_raises_naming_the_neuron():
    neuron = Dense("layer3", 4, 2)
    X = np.ones((10, 4))  # every feature equal: rank-1 second moment
    g = np.ones(neuron.theta_shape)
    with pytest.raises(NotPositiveDefiniteError, match="layer3.*gamma"):
        solve_exact(neuron, row_metric(neuron, X), g)
    X = np.random.default_rng(0).normal(size=(3, 4))  # fewer samples than features
    with pytest.raises(NotPositiveDefiniteError, match="layer3"):
        solve_exact(neuron, row_metric(neuron, X), g)
    # the ridge fixes it (§3.4)
    assert np.all(np.isfinite(solve_exact(neuron, row_metric(neuron, X, 1e-3), g)))
