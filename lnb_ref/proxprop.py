"""ProxProp (Frerix, Möllenhoff, Moeller & Cremers, 2018): implicit steps on the linear layers.

For neuron ``i`` with design Φ (``n_i`` rows), parameters θ_k and error ``λ_i = ∂ℓ/∂z_i``
(Eq. 6–7, with the ``1/n`` of the mean loss), the *local energy* is the mean of squares over the
rows, with per-sample targets one error away from the current outputs::

    E(θ) = ½ mean‖Φθ − T‖²,     T = z_k − n_i λ_i,     so that  ∇E(θ_k) = Φᵀλ_i = g,  ∇²E = M

with ``M = ΦᵀΦ/n_i`` the metric of Eq. 11. Instead of the explicit gradient step ``θ_k − τ g``
ProxProp takes the proximal (implicit, backward-Euler) step of size τ::

    θ⁺ = argmin_θ E(θ) + ‖θ − θ_k‖² / (2τ)   ⇔   θ⁺ = θ_k − τ ∇E(θ⁺)
       ⇔  Δ = θ⁺ − θ_k = −τ (I + τ M)⁻¹ g = −(M + I/τ)⁻¹ g

So ProxProp is LNB's direction with a ridge ``1/τ`` on every entry, the bias included (paper
§4.1); it is LocoProp-S's exact minimiser with ``η = 1`` and proximity ``κ = 1/τ`` (LocoProp's
Appendix C reduction):

* ``τ → 0``: ``Δ/τ → −g``, the gradient step; with ``s = τ λ_max(M)``,
  ``‖Δ/τ + g‖ ≤ s/(1 + s)·‖g‖`` (the eigenvalues of ``I − (I + τM)⁻¹`` are ``t/(1+t)``);
* ``τ → ∞``: ``Δ → −M⁻¹g``, LNB's θ̂.

**Mean, not sum.** Frerix et al. write the energy as a sum over the batch. With the gradient of a
*mean* loss that choice makes the step ``−τ(I + n_iτM)⁻¹g``, which saturates at ``−M⁻¹g/n_i``:
the longest step shrinks with the batch size (on the digits MLP every τ from 1 to 100 trained
alike, slowly). The mean energy above is the same family reparameterised (its τ is ``n_i`` times
the sum's, and its step ``n_i`` times longer), batch-size independent, and reaches LNB's θ̂.
Notebook 4 (§8.3) derives the sum version.

Solvers: ``"exact"`` (Cholesky of each ``I + τ C_g``) or ``"cg"`` (``cg_iterations`` CG steps
from 0 on ``(I + τM)Δ = −τg``, matrix-free with Eq. 11's product). Either way ``Δ`` is a
descent direction, ``−gᵀΔ > 0`` for ``g ≠ 0``: the exact one because ``(I + τM)⁻¹`` is SPD, and
every CG iterate from 0 on an SPD system ``Ax = b`` (here ``b = −τg``) has ``bᵀx_k = x_kᵀAx_k > 0``:
``x_k`` lies in the Krylov space ``K_k(A, b)`` to which CG's residual ``r_k = b − Ax_k`` is
orthogonal, so ``bᵀx_k − x_kᵀAx_k = r_kᵀx_k = 0`` (and ``x_1 = αb ≠ 0``).

Identity-metric neurons (embeddings) take the gradient step ``−τ g``.

Reference: T. Frerix, T. Möllenhoff, M. Moeller, D. Cremers, *Proximal Backpropagation*,
ICLR 2018; Munoz (2025) §4.1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .lnb import check_step_inputs
from .locoprop import LocalStepInfo
from .metric import metric_matvec, row_metric
from .neurons import LinearNeuron
from .schedules import Schedule, as_schedule
from .solvers import pcg, solve_exact


def proximal_step(
    neuron: LinearNeuron,
    X: np.ndarray,
    grad: np.ndarray,
    tau: float,
    solver: str = "exact",
    cg_iterations: int = 3,
) -> list[np.ndarray]:
    """``Δ = −τ (I + τ M)⁻¹ g`` (module docstring), returned as a list of iterates:
    ``[Δ]`` for ``solver="exact"``, every CG iterate ``[Δ_1, ..., Δ_k]`` for ``"cg"``."""
    if neuron.identity_metric:
        return [-tau * np.asarray(grad, dtype=float)]
    if solver == "exact":
        A = np.eye(neuron.row_dim) + tau * row_metric(neuron, X, 0.0)
        return [-tau * solve_exact(neuron, A, grad)]
    result = pcg(
        lambda v: v + tau * metric_matvec(neuron, X, v), -tau * np.asarray(grad), cg_iterations
    )
    return list(result.iterates)


class ProxProp:
    """ProxProp: the proximal step of size τ on every neuron's local energy (module docstring),
    ``θ ← θ_k − τ (I + τ M)⁻¹ g``.

    Args:
        neurons: the network's linear neurons, in the order of ``params``.
        tau: τ > 0, the proximal step size (a number or a schedule ``t ↦ τ_t``).
        solver: ``"exact"`` (Cholesky) or ``"cg"`` (``cg_iterations`` CG steps from 0).
        cg_iterations: CG iterations for ``solver="cg"``.
    """

    def __init__(
        self,
        neurons: Sequence[LinearNeuron],
        tau: float | Schedule,
        solver: str = "exact",
        cg_iterations: int = 3,
    ):
        if solver not in ("exact", "cg"):
            raise ValueError(f"solver must be 'exact' or 'cg', got {solver!r}")
        if int(cg_iterations) != cg_iterations or cg_iterations < 1:
            raise ValueError(f"cg_iterations must be an integer >= 1, got {cg_iterations!r}")
        self.neurons = list(neurons)
        self.tau = as_schedule(tau)
        self.solver, self.cg_iterations = solver, int(cg_iterations)

    def init(self, params: Sequence[np.ndarray]) -> dict:
        """No state but the step count ``t`` (for a schedule τ_t)."""
        return {"t": 0}

    def step(self, params, grads, features, state):
        """One ProxProp step. Returns ``(params, state, LocalStepInfo)``."""
        check_step_inputs(self.neurons, params, grads, features)
        tau = self.tau(state["t"])
        iterates = [
            proximal_step(n, X, g, tau, self.solver, self.cg_iterations)
            for n, g, X in zip(self.neurons, grads, features, strict=True)
        ]
        updates = [steps[-1] for steps in iterates]
        new = [p + d for p, d in zip(params, updates, strict=True)]
        info = LocalStepInfo(tau, updates, [None] * len(updates), iterates)
        return new, {"t": state["t"] + 1}, info
