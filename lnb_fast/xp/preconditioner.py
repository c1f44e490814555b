"""The paper's preconditioners ``P_i ≈ M_i⁻¹`` (§3.5), from the feature moments μ_i and χ_i.

Built from the (EMA, bias-corrected) moments of Algorithm 2, lines 6–8, with the rules of
:mod:`lnb_ref.solvers`, so the two agree entry by entry:

* no bias — Jacobi: ``P = diag(χ + γ)⁻¹`` on every row of θ;
* bias — incomplete Cholesky ``P = W̃ W̃ᵀ``: Eq. 12's exact inverse ``W Wᵀ`` with the
  covariance Σ replaced by its diagonal ``δ = (χ − μ ⊙ μ) + γ``. On a row ``v = [v_x; v_b]``::

      u = (v_x − μ v_b) / δ,        P v = [u;  v_b − μ · u]

  which keeps the μ cross terms of Eq. 12 (it is *not* a diagonal approximation of ``M⁻¹``).

Two safeguards, as in the reference: a zero entry (a feature identically zero, or a constant
feature under a bias) gets the reciprocal 1 instead of ``1/0``; and a variance ``χ − μ²`` within
rounding of zero, ``≤ 64 · eps · χ`` with ``eps`` the machine epsilon *of the inputs' dtype*
(float32 on a GPU), counts as 0, so that rounding never becomes a huge preconditioner entry
along the metric's null direction.
"""

from __future__ import annotations

from . import _compat
from ._compat import Array
from .neurons import Neuron


def _ridge(ridge):
    """A number as a float; a per-column ``(G, D_w)`` array as it is."""
    return float(ridge) if isinstance(ridge, (int, float)) else ridge


def feature_variance(mu: Array, chi: Array, bias: bool) -> Array:
    """``χ − μ²`` with a bias (within rounding of 0: 0, as in the module docstring), ``χ``
    without: the scale of :func:`relative_ridge`."""
    if not bias:
        return chi
    xp = _compat.namespace(mu, chi)
    var = chi - mu * mu
    tiny = 64 * xp.finfo(chi.dtype).eps
    return xp.where(var > tiny * chi, var, xp.zeros_like(var))


def relative_ridge(mu: Array, chi: Array, ridge: float, bias: bool) -> Array:
    """``γ·Var(x_j)`` per weight column, ``γ·χ_j`` (or ``γ``) where the variance is 0, ``(G, D_w)``:
    the scale-free ridge of :func:`lnb_ref.metric.relative_ridge` (which derives why it keeps
    the invariance to per-feature affine maps)."""
    xp = _compat.namespace(mu, chi)
    var = feature_variance(mu, chi, bias)
    one = xp.ones_like(chi)
    return float(ridge) * xp.where(var > 0, var, xp.where(chi > 0, chi, one))


def safe_reciprocal(v: Array) -> Array:
    """``1 / v`` where ``v > 0``, and 1 where ``v ≤ 0`` (see the module docstring)."""
    xp = _compat.namespace(v)
    one = xp.ones_like(v)
    positive = v > 0
    return xp.where(positive, one / xp.where(positive, v, one), one)


class DiagonalPreconditioner:
    """``P = diag(χ + γ)⁻¹`` for a neuron without bias (§3.5); ``chi`` has shape ``(G, D)``."""

    def __init__(self, neuron: Neuron, chi: Array, ridge: float = 0.0):
        if neuron.bias:
            raise ValueError(
                f"neuron {neuron.name!r} has a bias; use IncompleteCholeskyPreconditioner"
            )
        _check_moment(neuron, "chi", chi)
        self.neuron = neuron
        self.inv_diag = safe_reciprocal(chi + _ridge(ridge))  # (G, D)

    def __call__(self, v: Array) -> Array:
        xp = _compat.namespace(v)
        return xp.reshape(self.neuron.grouped(v) * self.inv_diag[:, None, :], v.shape)


class IncompleteCholeskyPreconditioner:
    """``P = W̃ W̃ᵀ`` for a neuron with bias (§3.5, Eq. 12 with Σ → diag(Σ));
    ``mu`` and ``chi`` have shape ``(G, D − 1)``."""

    def __init__(self, neuron: Neuron, mu: Array, chi: Array, ridge: float = 0.0):
        if not neuron.bias:
            raise ValueError(f"neuron {neuron.name!r} has no bias; use DiagonalPreconditioner")
        _check_moment(neuron, "mu", mu)
        _check_moment(neuron, "chi", chi)
        self.neuron = neuron
        self.mu = mu
        self.inv_var = safe_reciprocal(feature_variance(mu, chi, True) + _ridge(ridge))

    def __call__(self, v: Array) -> Array:
        xp = _compat.namespace(v)
        rows = self.neuron.grouped(v)
        vx, vb = rows[..., :-1], rows[..., -1:]
        mu = self.mu[:, None, :]
        u = (vx - mu * vb) * self.inv_var[:, None, :]
        out = _compat.concat(xp, [u, vb - xp.sum(mu * u, axis=-1, keepdims=True)], axis=-1)
        return xp.reshape(out, v.shape)


def paper_preconditioner(neuron: Neuron, mu: Array, chi: Array, ridge: float = 0.0):
    """The §3.5 choice: incomplete Cholesky with a bias, Jacobi without."""
    if neuron.bias:
        return IncompleteCholeskyPreconditioner(neuron, mu, chi, ridge)
    return DiagonalPreconditioner(neuron, chi, ridge)


def _check_moment(neuron: Neuron, what: str, m: Array) -> None:
    shape = (neuron.groups, neuron.n_weights)
    if tuple(m.shape) != shape:
        raise ValueError(
            f"neuron {neuron.name!r}: {what} has shape {tuple(m.shape)}, expected {shape} "
            f"(groups, weights per row)"
        )
