"""The metric ``M_i`` of a linear neuron (paper Eq. 10–12, §3.4), built three ways.

1. :func:`metric_from_forward` — from the forward function alone. Because ``f_i`` is linear in
   θ, ``J e_j = f(X; e_j) − f(X; 0)`` exactly: evaluating the neuron on each basis vector gives
   the Jacobian column by column, and ``M = Jᵀ J / n_i`` (Eq. 11). Works for *any* linear (or
   affine) neuron, knows nothing about its kind, and costs one forward per parameter: the oracle.
2. :func:`row_metric` — the closed form. Every neuron in :mod:`lnb_ref.neurons` is a design
   matrix times θ, so ``M = blockdiag_g(I_{K/G} ⊗ C_g)`` with ``C_g = Φ_gᵀ Φ_g / n_i``: for a dense
   neuron the uncentred second moment ``E[x xᵀ]``; with a bias the block matrix of Eq. 12; for a
   convolution the second moment of the filter's spatial patches.
3. :func:`metric_matvec` — the matrix-free product ``M v = Jᵀ (J v) / n_i`` of Eq. 11, the
   operation the online algorithm's conjugate gradient uses.

Ridge (§3.4): ``γ`` is added to the diagonal of ``M`` on the non-bias entries only. It is a
number (the same ``γ`` for every feature: the paper's) or one value per design column, shape
``(G, D − bias)`` — :func:`relative_ridge`'s ``γ·Var(x_j)``, which keeps LNB invariant to
per-feature affine maps of the inputs (see its docstring).
"""

from __future__ import annotations

import numpy as np

from .errors import check_finite
from .neurons import LinearNeuron


def jacobian(neuron: LinearNeuron, X: np.ndarray) -> np.ndarray:
    """``J = ∂f(X; θ)/∂θ`` as a matrix ``(outputs, parameters)``, built from the forward alone.

    Column j is ``vec(f(X; e_j) − f(X; 0))``: exact for a function linear (or affine) in θ.
    """
    zero = np.zeros(neuron.theta_shape)
    f0 = neuron.forward(X, zero).ravel()
    cols = []
    for j in range(neuron.n_params):
        e = zero.copy()
        e.flat[j] = 1.0
        cols.append(neuron.forward(X, e).ravel() - f0)
    return np.stack(cols, axis=1)


def ridge_diagonal(neuron: LinearNeuron, gamma) -> np.ndarray:
    """``γ`` on every non-bias parameter, ``0`` on the biases (§3.4), shaped like θ.

    ``gamma`` is a number, or one value per design column, ``(G, D − bias)`` (every row of group
    ``g`` gets ``gamma[g]``). Zero for a neuron with an identity metric: its solve is skipped
    (``θ̂ = g``, §3.3), so no ridge is ever applied to it and the materialised metric is
    exactly ``I``."""
    if neuron.identity_metric:
        return np.zeros(neuron.theta_shape)
    mask = (~neuron.bias_mask()).astype(float)
    if np.ndim(gamma) == 0:
        return gamma * mask
    gamma = np.asarray(gamma, dtype=float)
    per_column = np.zeros((neuron.groups, 1, neuron.row_dim))
    per_column[:, 0, : gamma.shape[-1]] = gamma
    rows = np.broadcast_to(per_column, (neuron.groups, neuron.rows_per_group, neuron.row_dim))
    return rows.reshape(neuron.theta_shape) * mask


def feature_variance(mu: np.ndarray, chi: np.ndarray, bias: bool) -> np.ndarray:
    """The per-column scale a relative ridge multiplies: ``Var(x_j) = χ_j − μ_j²`` for a neuron
    with a bias, the second moment ``χ_j`` without (its metric's diagonal). A variance within
    rounding of zero (``≤ 64·eps·χ``) counts as 0, as in the preconditioners."""
    chi = np.asarray(chi, dtype=float)
    if not bias:
        return chi
    var = chi - np.asarray(mu, dtype=float) ** 2
    return np.where(var > 64 * np.finfo(float).eps * chi, var, 0.0)


def relative_ridge(mu: np.ndarray, chi: np.ndarray, gamma: float, bias: bool) -> np.ndarray:
    """``γ_j = γ · Var(x_j)`` per design column (:func:`feature_variance`): a scale-free ridge.

    Why it keeps the invariance of §3.3 exactly: under ``x ↦ a ⊙ x + c`` the augmented input is
    ``x̂ ↦ S x̂`` with ``S = [[diag(a), c], [0, 1]]``, so ``M ↦ S M Sᵀ``, ``g ↦ S g``, and the
    step ``(M + R)⁻¹ g`` moves the neuron's *function* identically iff ``R ↦ S R Sᵀ``. With
    ``R = diag(r_j)`` on the non-bias entries, ``S R Sᵀ = diag(a_j² r_j)`` (the shift ``c`` meets
    only the bias row, which carries no ridge), so ``r_j`` must scale like ``a_j²`` and be
    indifferent to ``c``: the variance does, an absolute ``γ`` (scale) and ``χ_j`` with a bias
    (shift) do not, and ``tr(M)/d`` only for a common scale ``a_j = a``. Without a bias there is
    no shift symmetry and ``χ_j`` scales like ``a_j²``.

    A feature constant over the batch (variance 0) gets ``γ·χ_j`` instead (``γ`` if ``χ_j = 0``):
    its metric is singular along ``[e_j; −x_j]`` (or ``e_j``), where the gradient is 0 too, so
    *any* positive ridge there gives the same θ̂ (``θ̂_j = 0``); this one keeps the solve
    well-posed and still scales like ``a_j²``."""
    var = feature_variance(mu, chi, bias)
    chi = np.asarray(chi, dtype=float)
    return gamma * np.where(var > 0, var, np.where(chi > 0, chi, 1.0))


def metric_from_forward(neuron: LinearNeuron, X: np.ndarray, gamma: float = 0.0) -> np.ndarray:
    """``M_i = Jᵀ J / n_i + γ I_{non-bias}`` (Eq. 11 and §3.4), materialised, shape ``(P, P)``.

    Parameters are ordered as ``θ.ravel()``. ``n_i`` is ``neuron.n_samples(X)`` (footnote 3):
    the batch size for dense neurons, the number of output pixels for a convolution.
    """
    check_finite(neuron.name, "input features", X)
    J = jacobian(neuron, X)
    return J.T @ J / neuron.n_samples(X) + np.diag(ridge_diagonal(neuron, gamma).ravel())


def row_metric(neuron: LinearNeuron, X: np.ndarray, gamma: float = 0.0) -> np.ndarray:
    """The closed form: ``C_g = Φ_gᵀ Φ_g / n_i (+ γ on non-bias entries)``, shape ``(G, D, D)``.

    For a dense neuron ``C = E[x xᵀ]`` (§3.3); with a bias, ``C`` is Eq. 12
    (see :func:`dense_bias_metric`); for a convolution, the second moment of the patches.
    The full metric is ``blockdiag_g(I_{K/G} ⊗ C_g)`` (:func:`expand_row_metric`).
    """
    if neuron.identity_metric:
        raise TypeError(f"neuron {neuron.name!r} has an identity metric; there is nothing to build")
    check_finite(neuron.name, "input features", X)
    Phi = neuron.design(X)
    C = np.einsum("gni,gnj->gij", Phi, Phi) / neuron.n_samples(X)
    ridge = ridge_diagonal(neuron, gamma).reshape(neuron.groups, -1, neuron.row_dim)[:, 0, :]
    return C + ridge[:, :, None] * np.eye(neuron.row_dim)


def expand_row_metric(neuron: LinearNeuron, C: np.ndarray) -> np.ndarray:
    """``blockdiag_g(I_{K/G} ⊗ C_g)``: the ``(P, P)`` metric on ``θ.ravel()`` from ``C``."""
    blocks = [np.kron(np.eye(neuron.rows_per_group), C_g) for C_g in C]
    P = neuron.n_params
    M = np.zeros((P, P))
    start = 0
    for block in blocks:
        stop = start + block.shape[0]
        M[start:stop, start:stop] = block
        start = stop
    return M


def metric_matvec(
    neuron: LinearNeuron, X: np.ndarray, v: np.ndarray, gamma: float = 0.0
) -> np.ndarray:
    """Eq. 11, matrix-free: ``M_i v = Jᵀ (J v) / n_i + γ v_{non-bias}``.

    ``J v = f(X; v)`` is a forward pass with parameters ``v`` (the JVP of a linear map), and
    ``Jᵀ u`` is the gradient that error ``u`` would give (the VJP). Nothing ``P × P`` is built.
    """
    if neuron.identity_metric:
        return np.asarray(v, dtype=float).copy()
    Jv = neuron.forward(X, v)
    return neuron.vjp_theta(X, Jv) / neuron.n_samples(X) + ridge_diagonal(neuron, gamma) * v


def row_metric_matvec(neuron: LinearNeuron, C: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``M v`` from the closed form: each row of θ times its group's ``C_g`` (symmetric)."""
    return np.einsum("gkd,gde->gke", neuron.grouped(v), C).reshape(neuron.theta_shape)


# --- the dense closed forms of §3.3 -------------------------------------------------------------


def feature_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``μ = E[x]`` and (population) covariance ``Σ = E[(x − μ)(x − μ)ᵀ]`` of rows of X."""
    X = np.reshape(X, (-1, np.shape(X)[-1]))
    mu = X.mean(axis=0)
    Xc = X - mu
    return mu, Xc.T @ Xc / X.shape[0]


def second_moment(X: np.ndarray) -> np.ndarray:
    """``E[x xᵀ]``: the metric of a dense neuron without bias (§3.3)."""
    X = np.reshape(X, (-1, np.shape(X)[-1]))
    return X.T @ X / X.shape[0]


def dense_bias_metric(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Eq. 12: ``M = [[Σ + μμᵀ, μ], [μᵀ, 1]]``, the metric of ``θᵀ [x; 1]``."""
    d = mu.shape[0]
    M = np.empty((d + 1, d + 1))
    M[:d, :d] = sigma + np.outer(mu, mu)
    M[:d, d] = M[d, :d] = mu
    M[d, d] = 1.0
    return M


def step_norm(theta_hat: np.ndarray, g: np.ndarray) -> float:
    """``θ̂ · g`` (Eq. 2 and §3.1; Alg. 2 line 13's ``z``): equals ``θ̂ᵀ M θ̂ = ‖f(·; θ̂)‖²_F``
    only when ``M θ̂ = g`` exactly. For an inexact (warm-started PCG) θ̂ the two differ, by any
    factor and even in sign; :func:`lnb_ref.solvers.metric_norm` is the step's actual norm."""
    return float(np.vdot(theta_hat, g))
