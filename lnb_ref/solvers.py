"""Solving the normal equation ``M_i θ̂_i = g_i`` (Eq. 10) exactly or by preconditioned CG (§3.5).

* :func:`solve_exact` — Cholesky (``scipy.linalg.cho_factor``/``cho_solve``) of each ``C_g``;
  what Algorithm 1 uses. A singular metric with ``γ = 0`` raises an error naming the neuron.
* :func:`pcg` — preconditioned conjugate gradient with a warm start and a fixed number of
  iterations, returning every iterate; what Algorithm 2 uses (2 iterations).
* :class:`DiagonalPreconditioner` and :class:`IncompleteCholeskyPreconditioner` — the paper's
  ``P_i`` of §3.5, built from the (EMA) feature moments ``μ_i`` and ``χ_i = E[x ⊙ x]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from .errors import NotPositiveDefiniteError
from .neurons import LinearNeuron

Operator = Callable[[np.ndarray], np.ndarray]


def solve_exact(neuron: LinearNeuron, C: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``θ̂ = M⁻¹ g`` for ``M = blockdiag_g(I ⊗ C_g)``: one Cholesky per group, every row of θ
    solved against its group's ``C_g`` (the rows are independent OLS problems, §3.3).

    Raises:
        NotPositiveDefiniteError: if some ``C_g`` is singular or numerically so (its Cholesky
            pivots span more than ``1/(D·eps)``); the message names the neuron and suggests γ.
    """
    gg = neuron.grouped(g)
    out = np.empty_like(gg, dtype=float)
    for k, C_g in enumerate(C):
        factor = cholesky_or_raise(neuron.name, C_g)
        out[k] = scipy.linalg.cho_solve(factor, gg[k].T).T
    return out.reshape(neuron.theta_shape)


def cholesky_or_raise(name: str, A: np.ndarray) -> tuple[np.ndarray, bool]:
    """``scipy.linalg.cho_factor(A)``, raising a clear error when A is not (numerically) PD."""
    D = A.shape[0]
    try:
        factor = scipy.linalg.cho_factor(A, lower=True)
    except np.linalg.LinAlgError:
        raise NotPositiveDefiniteError(
            f"neuron {name!r}: the metric M is singular (not positive definite); its features are "
            f"linearly dependent or fewer than its {D} parameters per row. Use a ridge gamma > 0 "
            f"(§3.4) or more samples per step."
        ) from None
    pivots = np.abs(np.diag(factor[0])) ** 2
    if pivots.min() <= D * np.finfo(float).eps * pivots.max():
        raise NotPositiveDefiniteError(
            f"neuron {name!r}: the metric M is numerically singular (Cholesky pivots range from "
            f"{pivots.min():.3e} to {pivots.max():.3e}). Use a ridge gamma > 0 (§3.4)."
        )
    return factor


@dataclass
class PCGResult:
    """What :func:`pcg` returns.

    Attributes:
        x: the last iterate.
        iterates: ``[x_1, ..., x_k]``, the iterate after each of the k iterations.
        residual_norms: ``[‖r_0‖, ‖r_1‖, ..., ‖r_k‖]`` with ``r = b − A x``.
        residual: the last residual ``r_k = b − A x_k`` (PCG's own recursion), so that
            ``xᵀ A x = x · (b − r_k)`` costs no further product (:func:`metric_norm`).
    """

    x: np.ndarray
    iterates: list[np.ndarray] = field(default_factory=list)
    residual_norms: list[float] = field(default_factory=list)
    residual: np.ndarray | None = None


def pcg(
    matvec: Operator,
    b: np.ndarray,
    iterations: int,
    precondition: Operator | None = None,
    x0: np.ndarray | None = None,
) -> PCGResult:
    """Preconditioned conjugate gradient for ``A x = b`` with ``A`` symmetric PSD, a fixed number
    of iterations, warm-started at ``x0`` (Algorithm 2, line 10). Arrays keep their shape (θ's).

    The textbook recursion (Nocedal & Wright, Alg. 5.3), with ``P ≈ A⁻¹``::

        r₀ = b − A x₀,  y₀ = P r₀,  p₀ = y₀
        αₖ = rₖ·yₖ / pₖ·A pₖ;   xₖ₊₁ = xₖ + αₖ pₖ;   rₖ₊₁ = rₖ − αₖ A pₖ
        yₖ₊₁ = P rₖ₊₁;   βₖ = rₖ₊₁·yₖ₊₁ / rₖ·yₖ;   pₖ₊₁ = yₖ₊₁ + βₖ pₖ

    If the residual becomes exactly zero (``rₖ·yₖ = 0``) the remaining iterates repeat ``xₖ``
    instead of dividing 0 by 0. Run to ``dim(b)`` iterations it is the exact solve (in exact
    arithmetic).
    """
    P = precondition if precondition is not None else (lambda v: v)
    x = np.zeros_like(b, dtype=float) if x0 is None else np.array(x0, dtype=float)
    r = b - matvec(x)
    y = P(r)
    p = y
    ry = float(np.vdot(r, y))
    result = PCGResult(x=x, residual_norms=[float(np.linalg.norm(r))])
    for _ in range(iterations):
        Ap = matvec(p)
        pAp = float(np.vdot(p, Ap))
        if ry == 0.0 or pAp == 0.0:
            result.iterates.append(x.copy())
            result.residual_norms.append(result.residual_norms[-1])
            continue
        alpha = ry / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        y = P(r)
        ry_next = float(np.vdot(r, y))
        p = y + (ry_next / ry) * p
        ry = ry_next
        result.iterates.append(x.copy())
        result.residual_norms.append(float(np.linalg.norm(r)))
    result.x = x
    result.residual = r
    return result


def metric_norm(result: PCGResult, b: np.ndarray) -> float:
    """``xᵀ A x`` of PCG's last iterate, as ``x · (b − r)`` with PCG's residual ``r = b − A x``:
    the squared length of the direction in the metric the solve used, without another product.

    This is the step norm that keeps the trust region ε exact (Eq. 1–2) whatever the solve's
    accuracy; ``x · b`` (Alg. 2, line 13) equals it only when ``A x = b``. PCG's recursive
    residual drifts from ``b − A x`` by rounding only (``O(k·eps·‖A‖‖x‖)`` after ``k``
    iterations), which the tests bound against ``x · (A x)`` computed directly."""
    return float(np.vdot(result.x, b - result.residual))


def _safe_reciprocal(v: np.ndarray) -> np.ndarray:
    """``1/v`` where ``v > 0``, and 1 where ``v == 0``. A zero second moment means a feature that
    is identically zero (zero metric row and zero gradient); a zero variance with a bias means a
    constant feature, whose metric is singular along ``[e_j; −c]``. In both cases a finite,
    moderate entry keeps PCG from stepping along the null direction."""
    return np.where(v > 0, 1.0 / np.where(v > 0, v, 1.0), 1.0)


def design_moments(neuron: LinearNeuron, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean(X_i), mean(X_i ⊙ X_i))`` over the neuron's ``n_i`` samples, per design column
    (bias column excluded), shape ``(G, D − bias)`` each: Algorithm 2, lines 6–7.

    For a convolution the samples are the patches at every output pixel (footnote 4), so these
    are exactly the diagonal of ``E[x xᵀ]`` and the bias column of Eq. 12 for the patches.
    """
    Phi = neuron.design(X)
    if neuron.bias:
        Phi = Phi[..., :-1]
    return Phi.mean(axis=1), (Phi * Phi).mean(axis=1)


class DiagonalPreconditioner:
    """``P = diag(χ + γ)⁻¹`` for a neuron without bias (§3.5): the Jacobi preconditioner of the
    ridge-regularised metric, applied to every row of θ. ``chi`` has shape ``(G, D)``."""

    def __init__(self, neuron: LinearNeuron, chi: np.ndarray, gamma: float = 0.0):
        self.neuron = neuron
        self.inv_diag = _safe_reciprocal(np.asarray(chi) + gamma)  # (G, D)

    def __call__(self, v: np.ndarray) -> np.ndarray:
        return (self.neuron.grouped(v) * self.inv_diag[:, None, :]).reshape(v.shape)

    def row_matrix(self) -> np.ndarray:
        """``P`` restricted to one row of group g, as ``(G, D, D)`` (for tests and notebooks)."""
        return np.stack([np.diag(d) for d in self.inv_diag])


class IncompleteCholeskyPreconditioner:
    """``P = W̃ W̃ᵀ`` for a neuron with bias (§3.5): Eq. 12's exact inverse ``W Wᵀ`` with the
    covariance Σ replaced by its diagonal ``δ = (χ − μ ⊙ μ) + γ`` (a variance within rounding
    error of 0, ``≤ 64·eps·χ``, counts as 0). It keeps the ``μ`` cross terms, so it is *not* a
    diagonal approximation of ``M⁻¹``. Applied to a row
    ``v = [v_x; v_b]``::

        u = (v_x − μ v_b) / δ,      P v = [u; v_b − μ · u]

    which is ``W̃ (W̃ᵀ v)`` with ``W̃ = [[δ^{-1/2}, 0], [−μᵀ δ^{-1/2}, 1]]``.
    ``mu`` and ``chi`` have shape ``(G, D − 1)``.
    """

    def __init__(self, neuron: LinearNeuron, mu: np.ndarray, chi: np.ndarray, gamma: float = 0.0):
        if not neuron.bias:
            raise ValueError(f"neuron {neuron.name!r} has no bias; use DiagonalPreconditioner")
        self.neuron = neuron
        self.mu = np.asarray(mu)
        chi = np.asarray(chi)
        var = chi - self.mu**2
        # A constant feature has variance 0, but χ − μ² rounds to ±O(eps·χ); a positive rounding
        # error would become a ~1e17 preconditioner entry along the metric's null direction and
        # make the weights grow without bound. Treat anything within rounding of 0 as 0.
        var = np.where(var > 64 * np.finfo(float).eps * chi, var, 0.0)
        self.inv_var = _safe_reciprocal(var + gamma)

    def __call__(self, v: np.ndarray) -> np.ndarray:
        rows = self.neuron.grouped(v)
        vx, vb = rows[..., :-1], rows[..., -1:]
        mu = self.mu[:, None, :]
        u = (vx - mu * vb) * self.inv_var[:, None, :]
        out = np.concatenate([u, vb - np.sum(mu * u, axis=-1, keepdims=True)], axis=-1)
        return out.reshape(v.shape)

    def row_matrix(self) -> np.ndarray:
        """``W̃ W̃ᵀ`` for each group, ``(G, D, D)``."""
        mats = []
        for mu, iv in zip(self.mu, self.inv_var, strict=True):
            d = mu.shape[0]
            Wt = np.zeros((d + 1, d + 1))
            Wt[:d, :d] = np.diag(np.sqrt(iv))
            Wt[d, :d] = -mu * np.sqrt(iv)
            Wt[d, d] = 1.0
            mats.append(Wt @ Wt.T)
        return np.stack(mats)


def paper_preconditioner(
    neuron: LinearNeuron, mu: np.ndarray, chi: np.ndarray, gamma: float = 0.0
) -> Operator:
    """The §3.5 choice: incomplete Cholesky with a bias, diagonal without."""
    if neuron.bias:
        return IncompleteCholeskyPreconditioner(neuron, mu, chi, gamma)
    return DiagonalPreconditioner(neuron, chi, gamma)
