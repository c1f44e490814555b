"""The analytic factorization of Eq. 12 and the whitening it stands for (paper §3.3).

For a neuron ``θᵀ x̂`` with ``x̂ = [x; 1]`` the metric is ``M = [[Σ + μμᵀ, μ], [μᵀ, 1]]``. With any
square root ``S`` of the covariance, ``Sᵀ S = Σ``, it factors as ``M = Lᵀ L`` with::

    L = [[S,  0],          W = L⁻¹ = [[S⁻¹,     0],
         [μᵀ, 1]]                     [−μᵀ S⁻¹, 1]]

so ``M⁻¹ = W Wᵀ``. Preconditioning by ``M⁻¹ = W Wᵀ`` is plain gradient descent on the
reparameterised neuron ``θ = W φ``, whose output is ``φᵀ Wᵀ x̂ = φᵀ [S⁻ᵀ (x − μ); 1]``: the inputs
are *whitened* before the weights, and nothing changes at inference.

Two square roots are offered (``method``):

* ``"symmetric"``: ``S = Σ^{1/2}`` from the eigendecomposition (ZCA whitening, ``S⁻ᵀ = Σ^{-1/2}``);
* ``"cholesky"``: ``S = Rᵀ`` where ``Σ = R Rᵀ`` is the lower Cholesky factor, so the whitened
  features are ``R⁻¹ (x − μ)`` (Cholesky whitening). Both give ``L`` with ``Lᵀ L = M``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.linalg

from .errors import NotPositiveDefiniteError

SqrtMethod = Literal["symmetric", "cholesky"]


def covariance_sqrt(sigma: np.ndarray, method: SqrtMethod = "symmetric") -> np.ndarray:
    """A square root ``S`` of ``Σ`` in the sense ``Sᵀ S = Σ`` (see the module docstring)."""
    if method == "symmetric":
        w, V = scipy.linalg.eigh(sigma)
        if w.min() <= 0:
            raise NotPositiveDefiniteError(
                f"covariance is not positive definite (smallest eigenvalue {w.min():.3e})"
            )
        return (V * np.sqrt(w)) @ V.T
    if method == "cholesky":
        try:
            R = scipy.linalg.cholesky(sigma, lower=True)
        except np.linalg.LinAlgError as err:
            raise NotPositiveDefiniteError(f"covariance is not positive definite: {err}") from err
        return R.T
    raise ValueError(f"unknown square-root method {method!r}; use 'symmetric' or 'cholesky'")


def metric_factor(
    mu: np.ndarray, sigma: np.ndarray, method: SqrtMethod = "symmetric"
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 12's factorization: ``(L, W)`` with ``Lᵀ L = M`` and ``W = L⁻¹`` (so ``W Wᵀ = M⁻¹``).

    ``W`` is written down analytically, not obtained by inverting ``L``: only ``S⁻¹`` is solved.
    """
    d = mu.shape[0]
    S = covariance_sqrt(sigma, method)
    S_inv = (
        scipy.linalg.solve_triangular(S, np.eye(d)) if method == "cholesky" else np.linalg.inv(S)
    )
    L = np.zeros((d + 1, d + 1))
    L[:d, :d] = S
    L[d, :d] = mu
    L[d, d] = 1.0
    W = np.zeros((d + 1, d + 1))
    W[:d, :d] = S_inv
    W[d, :d] = -mu @ S_inv
    W[d, d] = 1.0
    return L, W


def whiten(
    X: np.ndarray, mu: np.ndarray, sigma: np.ndarray, method: SqrtMethod = "symmetric"
) -> np.ndarray:
    """The whitening map of §3.3, ``x ↦ S⁻ᵀ (x − μ)`` (``Σ^{-1/2}(x − μ)`` for ``"symmetric"``),
    applied to every row of X. The result has mean 0 and identity covariance under ``(μ, Σ)``."""
    S = covariance_sqrt(sigma, method)
    # rows: (x − μ)ᵀ S⁻¹  ==  (S⁻ᵀ (x − μ))ᵀ
    return scipy.linalg.solve(S.T, (np.asarray(X) - mu).T).T


def whitened_features(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``Wᵀ x̂`` for every row: the features the reparameterised neuron ``φᵀ Wᵀ x̂`` reads.

    Its last column is the constant 1 (the bias feature survives the whitening untouched).
    """
    X = np.asarray(X)
    Xh = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
    return Xh @ W
