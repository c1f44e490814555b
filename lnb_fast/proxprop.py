"""``proxprop``: ProxProp (Frerix et al., 2018) as an optax transformation.

Per neuron ``i`` found by :func:`lnb_fast.value_and_grad` (design Φ with ``n_i`` rows, gradient
``g = Φᵀλ_i`` of the mean loss, metric ``M = ΦᵀΦ/n_i`` of Eq. 11), the proximal (implicit,
backward-Euler) step of size τ on the local energy ``E(θ) = ½ mean‖Φθ − (z_k − n_iλ_i)‖²`` (a
mean over the rows, so ``∇E(θ_k) = g`` and ``∇²E = M``)::

    θ⁺ = argmin E(θ) + ‖θ − θ_k‖²/(2τ)   ⇔   Δ = −τ (I + τ M)⁻¹ g = −(M + I/τ)⁻¹ g

solved by ``cg_iterations`` steps of CG from 0 on ``(I + τM)Δ = −τg``, matrix-free
(``Neuron.metric_matvec``, :func:`lnb_fast.pcg`). It is LNB's direction with a ridge ``1/τ`` on
every entry (bias included) (paper §4.1): ``τ → 0`` gives the gradient step ``−τg``, ``τ → ∞``
LNB's θ̂. Every CG iterate from 0 is a descent direction (``−gᵀΔ = Δᵀ(I + τM)Δ/τ > 0``). Why
the mean and not Frerix et al.'s sum over the batch: see :mod:`lnb_ref.proxprop`, the NumPy
oracle this matches.

Parameters that belong to no neuron (identity metric) take the gradient step ``−τ g``.

Reference: T. Frerix, T. Möllenhoff, M. Moeller, D. Cremers, *Proximal Backpropagation*,
ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from .locoprop import NO_AXIS, local_transformation, metric_product
from .neuron import Neuron
from .pcg import pcg
from .plumbing import check_rate, static_int


def proximal_step(neuron: Neuron, X, grad: tuple, tau, cg_iterations: int, reduce=NO_AXIS) -> tuple:
    """``Δ ≈ −τ (I + τM)⁻¹ g`` by ``cg_iterations`` CG steps from 0 (module docstring); with an
    axis, ``M`` of the global batch (:mod:`lnb_fast.spmd`)."""

    def matvec(v):
        Mv = metric_product(neuron, X, v, 0.0, reduce)
        return tuple(u + tau * m for u, m in zip(v, Mv, strict=True))

    return pcg(matvec, tuple(-tau * g for g in grad), cg_iterations).x


def proxprop(
    tau: float | Callable[[jax.Array], jax.Array],
    *,
    cg_iterations: int | None = None,
    nonfinite: str | None = "skip",
    axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """ProxProp: ``θ ← θ_k − τ (I + τM)⁻¹ g`` per neuron, by CG (module docstring).

    Use like :func:`lnb_fast.lnb` (the parameters are required, for the error messages' sake
    and to share the checks; the step itself reads only ``g`` and the features)::

        opt = lnb_fast.proxprop(tau=1.0)
        loss, grads, features = lnb_fast.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params, features=features)

    Args:
        tau: τ > 0, the proximal step size (a number or an optax schedule ``count ↦ τ``): a
            gradient step of size τ for small τ, LNB's θ̂ (unnormalised) for large τ.
        cg_iterations: CG iterations from 0 per neuron and step (None: 3); a Python integer
            (unrolled at trace time), as :func:`lnb_fast.lnb`'s.
        nonfinite: ``"skip"`` (default), ``"raise"`` or None, as :func:`lnb_fast.lnb`.
        axis_name: the mesh axis (or axes) the batch is split over inside ``shard_map``/``pmap``:
            the gradients and metric products are averaged over it, as :func:`lnb_fast.lnb`.
    """
    check_rate("tau", tau, positive=True)
    cg_iterations = static_int("cg_iterations", 3 if cg_iterations is None else cg_iterations)

    def per_neuron(neuron, X, theta, grad, tau_now, reduce):
        del theta
        return proximal_step(neuron, X, grad, tau_now, cg_iterations, reduce)

    return local_transformation(
        "proxprop", tau, per_neuron, nonfinite, rate_name="tau", axis_name=axis_name
    )
