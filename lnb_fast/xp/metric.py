"""The metric ``M_i = J_iᵀ J_i / n_i`` of an explicit neuron, matrix-free (paper Eq. 10–12).

Every neuron here is ``f(X; θ) = Φ(X) θ`` (:mod:`lnb_fast.xp.neurons`), so its Jacobian with
respect to θ is the design itself and Eq. 11's product needs two matrix products per group::

    J v     = Φ_w v_wᵀ + v_b                       (the neuron's output for parameters v)
    M v     = [ (J v)ᵀ Φ_w / n_i + γ v_w  |  Σ_n (J v) / n_i ]            (Eq. 11, §3.4)

where ``Φ_w`` is the design without its bias column and ``v = [v_w | v_b]`` (bias last). The ridge
``γ`` is added on the weights only (§3.4), as in :func:`lnb_ref.metric.metric_matvec`; with a
bias this is the product with Eq. 12's ``[[Σ + μμᵀ, μ], [μᵀ, 1]]`` (per row of θ) without ever
forming it. Nothing ``D × D`` is built; the cost is ``4 · n_i · D · K`` flops per product.

All functions use only array-API operations (``matmul``, ``sum``, ``reshape``, slicing), so
NumPy, CuPy and any other array-API library run the same code; the dtype and device follow
``X`` and ``v``.
"""

from __future__ import annotations

from collections.abc import Callable

from . import _compat
from ._compat import Array
from .neurons import Neuron

Operator = Callable[[Array], Array]


def _check_ridge(ridge: float) -> float:
    ridge = float(ridge)
    if not ridge >= 0.0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    return ridge


def design_product(neuron: Neuron, A: Array, n: int, v: Array, ridge=0.0) -> Array:
    """``M v`` (Eq. 11) from a precomputed weight design ``A = Φ_w``, ``(G, n_i, D_w)``.

    ``ridge`` is a number ``γ`` or one value per weight column, ``(G, D_w)``
    (:func:`~lnb_fast.xp.preconditioner.relative_ridge`).

    This is :func:`metric_matvec` without rebuilding the design: PCG calls it once per
    iteration with the same ``A`` (for a convolution the im2col matrix is built once per step).
    """
    xp = _compat.namespace(A, v)
    rows = neuron.grouped(v)  # (G, k, D)
    Dw = neuron.n_weights
    vw = rows[..., :Dw]
    Jv = xp.matmul(A, _compat.permute_dims(xp, vw, (0, 2, 1)))  # (G, n_i, k)
    if neuron.bias:
        Jv = Jv + rows[:, None, :, Dw]
    Mw = xp.matmul(_compat.permute_dims(xp, Jv, (0, 2, 1)), A) / n  # (G, k, D_w)
    if isinstance(ridge, (int, float)):
        if ridge:
            Mw = Mw + ridge * vw
    else:
        Mw = Mw + ridge[:, None, :] * vw
    if neuron.bias:
        Mb = xp.sum(Jv, axis=1) / n  # (G, k)
        Mw = _compat.concat(xp, [Mw, Mb[..., None]], axis=2)
    return xp.reshape(Mw, neuron.theta_shape)


def metric_operator(neuron: Neuron, X: Array, ridge: float = 0.0) -> Operator:
    """``v ↦ M_i v + γ v_w`` for the features ``X`` of one minibatch (Eq. 11, §3.4): builds the
    design once and returns a closure for PCG."""
    ridge = _check_ridge(ridge)
    A = neuron.weight_design(X)
    n = neuron.n_samples(X)
    return lambda v: design_product(neuron, A, n, v, ridge)


def metric_matvec(neuron: Neuron, X: Array, v: Array, ridge: float = 0.0) -> Array:
    """Eq. 11, matrix-free: ``M_i v = Jᵀ (J v) / n_i + γ v_w`` (ridge on non-bias entries).

    Args:
        neuron: a :class:`~lnb_fast.xp.Dense` or :class:`~lnb_fast.xp.Conv2d`.
        X: the neuron's input features (``(..., d_in)`` or NCHW).
        v: an array of ``neuron.theta_shape``.
        ridge: ``γ ≥ 0``.

    Returns:
        ``M v``, shaped like ``v``, in the dtype and on the device of the inputs.
    """
    return metric_operator(neuron, X, ridge)(v)


def design_moments(neuron: Neuron, X: Array) -> tuple[Array, Array]:
    """``(mean(Φ_w), mean(Φ_w ⊙ Φ_w))`` over the ``n_i`` rows, each ``(G, D_w)``: the feature
    moments μ_i and χ_i of Algorithm 2, lines 6–7 (for a convolution, of the patches)."""
    return moments_of_design(neuron.weight_design(X))


def moments_of_design(A: Array) -> tuple[Array, Array]:
    """:func:`design_moments` from a precomputed weight design ``A``, ``(G, n_i, D_w)``."""
    xp = _compat.namespace(A)
    return xp.mean(A, axis=1), xp.mean(A * A, axis=1)


def row_metric(neuron: Neuron, X: Array, ridge: float = 0.0) -> Array:
    """The closed form ``C_g = Φ_gᵀ Φ_g / n_i + γ I_w``, ``(G, D, D)``, as in
    :func:`lnb_ref.metric.row_metric` (for a bias, Eq. 12). Materialised: for tests and small
    neurons; the optimizer never builds it."""
    ridge = _check_ridge(ridge)
    xp = _compat.namespace(X)
    Phi = neuron.design(X)
    C = xp.matmul(_compat.permute_dims(xp, Phi, (0, 2, 1)), Phi) / neuron.n_samples(X)
    D = neuron.row_dim
    if ridge:
        diag = _compat.zeros(xp, (D, D), C)
        for j in range(neuron.n_weights):
            diag[j, j] = ridge
        C = C + diag
    return C
