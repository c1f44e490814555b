"""Eq. 12's analytic factorization and the whitening equivalence of §3.3."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lnb.testing import correlated_features, rel_err
from lnb.testing.strategies import seeds
from lnb.testing.tolerances import RTOL, SOLVE_RTOL
from lnb_ref import (
    Dense,
    dense_bias_metric,
    feature_moments,
    metric_factor,
    row_metric,
    solve_exact,
    step_norm,
    whiten,
    whitened_features,
)
from lnb_ref.errors import NotPositiveDefiniteError
from lnb_ref.lnb import boosting_update

methods = st.sampled_from(["symmetric", "cholesky"])


@given(seed=seeds, d=st.integers(1, 8), method=methods)
def test_factorization_of_eq12(seed, d, method):
    """M = Lᵀ L and M⁻¹ = W Wᵀ with W = L⁻¹ written analytically."""
    rng = np.random.default_rng(seed)
    X = correlated_features(rng, 4 * d + 4, d)
    mu, sigma = feature_moments(X)
    M = dense_bias_metric(mu, sigma)
    L, W = metric_factor(mu, sigma, method)
    assert rel_err(L.T @ L, M) < RTOL
    assert rel_err(L @ W, np.eye(d + 1)) < SOLVE_RTOL  # one triangular/symmetric solve, κ(S) ≤ ~1e2
    assert rel_err(W @ W.T, np.linalg.inv(M)) < SOLVE_RTOL
    if method == "cholesky":  # S = Rᵀ is upper triangular (Σ = R Rᵀ), and so is S⁻¹ in W
        assert np.all(np.tril(L[:d, :d], -1) == 0.0)
        assert np.all(np.tril(W[:d, :d], -1) == 0.0)


@given(seed=seeds, d=st.integers(1, 8), method=methods)
def test_whitening_map(seed, d, method):
    """x ↦ S⁻ᵀ(x − μ) has zero mean and identity covariance; Wᵀx̂ = [that; 1]."""
    rng = np.random.default_rng(seed)
    X = correlated_features(rng, 4 * d + 4, d)
    mu, sigma = feature_moments(X)
    Z = whiten(X, mu, sigma, method)
    mz, sz = feature_moments(Z)
    assert np.max(np.abs(mz)) < RTOL
    assert rel_err(sz, np.eye(d)) < SOLVE_RTOL
    _, W = metric_factor(mu, sigma, method)
    F = whitened_features(X, W)
    assert rel_err(F[:, :d], Z) < SOLVE_RTOL
    assert np.all(F[:, d] == 1.0)
    if method == "symmetric":  # ZCA: Σ^{-1/2}(x − μ) with the symmetric inverse square root
        w, V = np.linalg.eigh(sigma)
        assert rel_err(Z, (X - mu) @ (V / np.sqrt(w)) @ V.T) < SOLVE_RTOL


@given(seed=seeds, d=st.integers(1, 6), k=st.integers(2, 4), method=methods)
def test_gradient_step_on_whitened_model_is_lnb_step(seed, d, k, method):
    """§3.3: one plain (normalised) gradient step on the reparameterised model φ, whose neuron
    reads the whitened features Wᵀx̂, is exactly the LNB step on the original model.

    The loss is softmax cross-entropy of the neuron's output; both gradients are computed by
    backprop through their own model (no use of the identity g_φ = W g_θ).
    """
    rng = np.random.default_rng(seed)
    n = 5 * d + 5
    X = correlated_features(rng, n, d)
    labels = rng.integers(0, k, size=n)
    mu, sigma = feature_moments(X)
    L, W = metric_factor(mu, sigma, method)

    def ce_and_error(logits):
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        onehot = np.eye(k)[labels]
        return -np.mean(np.log(np.sum(p * onehot, axis=1))), (p - onehot) / n

    original = Dense("w", d, k, bias=True)
    theta = rng.normal(size=original.theta_shape)
    _, lam = ce_and_error(original.forward(X, theta))
    g = original.vjp_theta(X, lam)

    # LNB step on θ with ε chosen freely: θ' = θ − √(ε/z) M⁻¹ g
    eps = 0.37
    theta_hat = solve_exact(original, row_metric(original, X), g)
    (lnb_theta,), z, _ = boosting_update([theta], [theta_hat], [g], eps)

    # the reparameterised model: a dense neuron without bias on the features Wᵀx̂ (which already
    # carry the constant 1), with φ such that Θ = Φ Wᵀ (each row θ_r = W φ_r), i.e. Φ = Θ Lᵀ
    whitened = Dense("phi", d + 1, k)
    F = whitened_features(X, W)
    phi = theta @ L.T
    assert rel_err(whitened.forward(F, phi), original.forward(X, theta)) < SOLVE_RTOL
    _, lam_w = ce_and_error(whitened.forward(F, phi))
    g_phi = whitened.vjp_theta(F, lam_w)
    # on whitened features the metric is the identity, so LNB there is normalised GD
    assert rel_err(row_metric(whitened, F)[0], np.eye(d + 1)) < SOLVE_RTOL
    z_phi = step_norm(g_phi, g_phi)
    assert abs(z_phi - z) < SOLVE_RTOL * z
    gd_phi = phi - np.sqrt(eps / z_phi) * g_phi
    assert rel_err(gd_phi @ W.T, lnb_theta) < SOLVE_RTOL


def test_factor_rejects_singular_covariance():
    X = np.zeros((5, 2))
    X[:, 0] = np.arange(5.0)  # second feature is constant: Σ is singular
    mu, sigma = feature_moments(X)
    for method in ("symmetric", "cholesky"):
        with pytest.raises(NotPositiveDefiniteError):
            metric_factor(mu, sigma, method)
    with pytest.raises(ValueError, match="unknown square-root method"):
        metric_factor(mu, sigma + np.eye(2), "qr")
