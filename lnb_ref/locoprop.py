"""LocoProp-S and LocoProp-M (Amid, Anil & Warmuth, 2022): layerwise local losses.

LocoProp trains each linear neuron ``i`` on a *local* problem built from one backward pass.
With the neuron's design Φ (``n_i`` rows: samples, or output pixels of a convolution), its
parameters θ_k, its pre-activation ``z_k = f(X; θ_k) = Φθ_k`` (bias included), its error
``λ_i = ∂ℓ/∂z_i`` (Eq. 6–7, carrying the ``1/n`` of the mean loss) and gradient ``g = Φᵀλ_i``,
write ``Jᵀu := Φᵀu / n_i`` for the *mean* pull-back (so ``g = Jᵀ(n_i λ_i)`` and
``M = JᵀJ·n_i = ΦᵀΦ/n_i``, the metric of Eq. 11) and ``Δ = θ − θ_k``.

**LocoProp-S** (squared local loss). Local targets one gradient step of size η away from the
current outputs, ``t = z_k − η·n_i·λ_i``, and::

    L_S(θ) = ½·mean_rows ‖f(X; θ) − t‖² + κ/2·‖θ − θ_k‖²
    ∇L_S  = (M + κI) Δ + η g

(κ, the *proximity*, is LocoProp's ``1/η_W``; it acts on every entry, the bias included). The
local problem is solved by ``inner_steps`` gradient steps of size ρ from ``Δ₀ = 0``::

    Δ_{j+1} = Δ_j − ρ [(M + κI) Δ_j + η g]

* the first step is ``Δ₁ = −ρη·g``: **the plain gradient step**;
* the minimiser is ``Δ* = −η (M + κI)⁻¹ g``: **−η times LNB's θ̂ (Eq. 10) with a ridge κ on
  every diagonal entry, the bias entries included** — for a neuron without bias exactly
  :class:`lnb_ref.lnb.ExactLNB`'s ``θ̂`` with ridge ``γ = κ`` (paper §4.1: LocoProp-S converged
  is a preconditioned step by the layer's input second moment).

**LocoProp-M** (matched local loss). Targets in the space of the transfer φ that follows the
neuron (its elementwise activation), ``y_t = φ(z_k) − η·n_i·λ_i``, and the Bregman divergence
matched to φ (``∂/∂z = φ(z) − y_t``, convex in θ because φ is monotone)::

    L_M(θ) = mean_rows [F(z) − F(z_k) − φ(z_k)·(z − z_k)] + η g·Δ + κ/2‖Δ‖²,   F' = φ
    ∇L_M  = Jᵀ[φ(z_k + JΔ·n_i) − φ(z_k)] + η g + κΔ    (JΔ·n_i = ΦΔ = f(X; Δ))

The target term is exactly ``η g``, so the step needs only X, θ_k, g and φ, not λ. With
φ = identity it is LocoProp-S; its first inner step is again ``−ρη·g``.

**Step size ρ** (``inner_learning_rate="auto"``): ``ρ = 1/(B + κ)`` per neuron, with ``B`` the
Gershgorin bound of the metric built from ``|X|``::

    λ_max(M) ≤ max_a Σ_b |M_ab| ≤ max_a (M(|X|) 1)_a =: B

(``|Φ(X)| = Φ(|X|)``: every design entry is an input entry, a zero of the padding, or the bias
column 1). ``M + κI`` then has eigenvalues in ``(κ, B + κ]``, so the S iteration is a contraction
and each step decreases ``L_S``. For LocoProp-M the Hessian is ``Jᵀ diag(φ') J·n_i + κI``, at most
``max φ' · B + κ``: ``ρ = 1/(max φ' · B + κ)``. We use ``max φ' = 1`` for every transfer: it is
exact for identity, tanh and relu (relu is not twice differentiable, but its potential
``½ max(z, 0)²`` has a 1-Lipschitz gradient, which is what the descent lemma needs), and an
upper bound for the sigmoid (``φ' ≤ 1/4``) and the softmax (``∇² logsumexp ≼ ½ I``): a smaller
step than necessary, still a monotone decrease. A numeric ``inner_learning_rate`` is used as is.

Unlike the trace ``tr(M_row) = Σ_j χ_j (+1 for a bias)``, the bound ``B`` needs no knowledge of
which parameters share an output row, so ``lnb_fast`` computes the same number matrix-free
(one metric product on ``|X|``); both bound ``λ_max``.

Neurons with an identity metric (embeddings) take the gradient step ``Δ = −η g``.

References: E. Amid, R. Anil, M. K. Warmuth, *LocoProp: Enhancing BackProp via Local Loss
Optimization*, AISTATS 2022; Munoz (2025) §4.1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import NeuronShapeError
from .lnb import check_step_inputs
from .metric import metric_matvec, row_metric, row_metric_matvec
from .network import Network
from .neurons import Dense, LinearNeuron
from .schedules import Schedule, as_schedule
from .solvers import solve_exact

# ----------------------------------------------------------------------------------------------
# Transfers φ and their convex potentials F (F' = φ): the matched losses of LocoProp-M.
# ----------------------------------------------------------------------------------------------


class Transfer(NamedTuple):
    """An elementwise (softmax: row-wise) monotone map ``φ = F'`` and its potential ``F``.

    ``potential(z)`` returns the sum of ``F`` over each row's outputs, shape ``z.shape[:-1]``
    for the softmax and ``z.shape`` otherwise (callers sum everything, then divide by ``n_i``).
    """

    fn: Callable[[np.ndarray], np.ndarray]
    potential: Callable[[np.ndarray], np.ndarray]


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = np.max(z, axis=-1, keepdims=True)
    return np.log(np.sum(np.exp(z - top), axis=-1)) + top[..., 0]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


TRANSFERS: dict[str, Transfer] = {
    # F(z) = z²/2: the matched loss is the squared loss (LocoProp-S).
    "identity": Transfer(lambda z: z, lambda z: 0.5 * z * z),
    # F(z) = log cosh z = logaddexp(z, −z) − log 2.
    "tanh": Transfer(np.tanh, lambda z: np.logaddexp(z, -z) - np.log(2.0)),
    # F(z) = softplus(z) = log(1 + e^z): the matched loss is the logistic loss.
    "sigmoid": Transfer(lambda z: 0.5 * (1.0 + np.tanh(0.5 * z)), lambda z: np.logaddexp(0.0, z)),
    # F(z) = ½ max(z, 0)².
    "relu": Transfer(lambda z: np.maximum(z, 0.0), lambda z: 0.5 * np.maximum(z, 0.0) ** 2),
    # Row-wise: F(z) = logsumexp(z), the matched loss is the cross-entropy / KL (output layer).
    "softmax": Transfer(_softmax, _logsumexp),
}


def get_transfer(name: str) -> Transfer:
    """The transfer called ``name``; ValueError listing the valid names otherwise."""
    if name not in TRANSFERS:
        raise ValueError(f"unknown transfer {name!r}; valid names: {', '.join(TRANSFERS)}")
    return TRANSFERS[name]


# ----------------------------------------------------------------------------------------------
# One neuron's local problem
# ----------------------------------------------------------------------------------------------


def metric_bound(neuron: LinearNeuron, X: np.ndarray) -> float:
    """``B = max_a (M(|X|) 1)_a ≥ max_a Σ_b |M_ab| ≥ λ_max(M)`` (Gershgorin; module docstring)."""
    C_abs = row_metric(neuron, np.abs(X), 0.0)
    return float(np.max(row_metric_matvec(neuron, C_abs, np.ones(neuron.theta_shape))))


def auto_inner_learning_rate(neuron: LinearNeuron, X: np.ndarray, proximity: float) -> float:
    """``ρ = 1/(B + κ)`` (module docstring): a contraction for LocoProp-S, and a monotone
    decrease of the local loss for LocoProp-M with any of :data:`TRANSFERS` (``φ' ≤ 1``)."""
    return 1.0 / (metric_bound(neuron, X) + proximity)


def _pullback(neuron: LinearNeuron, X: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``Jᵀu = Φᵀu / n_i``: the mean pull-back of an output-shaped ``u``."""
    return neuron.vjp_theta(X, u) / neuron.n_samples(X)


def local_gradient(
    neuron: LinearNeuron,
    X: np.ndarray,
    theta: np.ndarray,
    grad: np.ndarray,
    delta: np.ndarray,
    learning_rate: float,
    proximity: float,
    transfer: str = "identity",
) -> np.ndarray:
    """``∇L_M(Δ) = Jᵀ[φ(z_k + ΦΔ) − φ(z_k)] + η g + κΔ`` (module docstring); with
    ``transfer="identity"`` this is ``∇L_S = (M + κI)Δ + η g``."""
    if transfer == "identity":  # (M + κI)Δ + ηg, written with the metric product of Eq. 11
        return metric_matvec(neuron, X, delta) + proximity * delta + learning_rate * grad
    phi = get_transfer(transfer).fn
    z_k = neuron.forward(X, theta)
    residual = phi(z_k + neuron.forward(X, delta)) - phi(z_k)
    return _pullback(neuron, X, residual) + learning_rate * grad + proximity * delta


def local_loss(
    neuron: LinearNeuron,
    X: np.ndarray,
    theta: np.ndarray,
    grad: np.ndarray,
    delta: np.ndarray,
    learning_rate: float,
    proximity: float,
    transfer: str = "identity",
) -> float:
    """``L_M(θ_k + Δ) − L_M(θ_k)`` (module docstring): the matched local loss, 0 at ``Δ = 0``.

    ``mean_rows [F(z) − F(z_k) − φ(z_k)·(z − z_k)] + η g·Δ + κ/2‖Δ‖²`` with ``z = z_k + ΦΔ``;
    for ``transfer="identity"`` it is ``½ΔᵀMΔ + η g·Δ + κ/2‖Δ‖²``, i.e. ``L_S`` up to a constant.
    """
    t = get_transfer(transfer)
    z_k = neuron.forward(X, theta)
    dz = neuron.forward(X, delta)
    bregman = np.sum(t.potential(z_k + dz) - t.potential(z_k)) - np.sum(t.fn(z_k) * dz)
    return float(
        bregman / neuron.n_samples(X)
        + learning_rate * np.vdot(grad, delta)
        + 0.5 * proximity * np.vdot(delta, delta)
    )


def inner_iterates(
    neuron: LinearNeuron,
    X: np.ndarray,
    theta: np.ndarray,
    grad: np.ndarray,
    learning_rate: float,
    proximity: float,
    inner_steps: int,
    inner_learning_rate: float | str = "auto",
    transfer: str = "identity",
) -> list[np.ndarray]:
    """``[Δ_1, ..., Δ_J]``: gradient descent on the local loss from ``Δ₀ = 0``,
    ``Δ_{j+1} = Δ_j − ρ ∇L(Δ_j)`` (``transfer="identity"``: LocoProp-S)."""
    rho = (
        auto_inner_learning_rate(neuron, X, proximity)
        if inner_learning_rate == "auto"
        else float(inner_learning_rate)
    )
    delta = np.zeros(neuron.theta_shape)
    out = []
    for _ in range(inner_steps):
        delta = delta - rho * local_gradient(
            neuron, X, theta, grad, delta, learning_rate, proximity, transfer
        )
        out.append(delta)
    return out


def locoprop_s_minimizer(
    neuron: LinearNeuron, X: np.ndarray, grad: np.ndarray, learning_rate: float, proximity: float
) -> np.ndarray:
    """The exact minimiser of LocoProp-S's local loss: ``Δ* = −η (M + κI)⁻¹ g``.

    That is −η times LNB's ``θ̂ = M⁻¹g`` (Eq. 10) with a ridge κ on **every** diagonal entry,
    the bias entries included (``lnb_ref``'s ridge γ skips the biases, §3.4; for a neuron
    without bias the two coincide). Cholesky of each ``C_g + κI``. Identity-metric neurons: −ηg.
    """
    if neuron.identity_metric:
        return -learning_rate * np.asarray(grad, dtype=float)
    C = row_metric(neuron, X, 0.0) + proximity * np.eye(neuron.row_dim)
    return -learning_rate * solve_exact(neuron, C, grad)


# ----------------------------------------------------------------------------------------------
# The optimizers
# ----------------------------------------------------------------------------------------------


@dataclass
class LocalStepInfo:
    """What one LocoProp / ProxProp step did.

    Attributes:
        learning_rate: η (LocoProp) or τ (ProxProp) at this step.
        updates: ``Δ`` per neuron (``θ ← θ_k + Δ``).
        inner_learning_rates: ρ per neuron (None for identity-metric neurons and ProxProp).
        iterates: per neuron, every inner iterate ``[Δ_1, ..., Δ_J]`` (CG iterates for
            ProxProp's ``"cg"`` solver; ``[Δ]`` for the exact solver and identity neurons).
    """

    learning_rate: float
    updates: list[np.ndarray]
    inner_learning_rates: list[float | None] = field(default_factory=list)
    iterates: list[list[np.ndarray]] = field(default_factory=list)


def _check_local_args(proximity: float, inner_steps: int, inner_learning_rate) -> None:
    if not proximity >= 0:
        raise ValueError(f"proximity must be >= 0, got {proximity!r}")
    if int(inner_steps) != inner_steps or inner_steps < 1:
        raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
    if inner_learning_rate != "auto" and not (
        isinstance(inner_learning_rate, (int, float)) and inner_learning_rate > 0
    ):
        raise ValueError(
            f"inner_learning_rate must be 'auto' or a positive number, got {inner_learning_rate!r}"
        )


class _LocoProp:
    """Shared loop of :class:`LocoPropS` and :class:`LocoPropM`: per neuron, ``inner_steps``
    gradient steps on its local loss, then ``θ ← θ_k + Δ_J``."""

    neurons: list[LinearNeuron]
    transfers: list[str]

    def __init__(self, learning_rate, proximity, inner_steps, inner_learning_rate):
        _check_local_args(proximity, inner_steps, inner_learning_rate)
        self.learning_rate = as_schedule(learning_rate)
        self.proximity, self.inner_steps = float(proximity), int(inner_steps)
        self.inner_learning_rate = inner_learning_rate

    def init(self, params: Sequence[np.ndarray]) -> dict:
        """No state but the step count ``t`` (for a schedule η_t)."""
        return {"t": 0}

    def step(self, params, grads, features, state):
        """One LocoProp step from one forward/backward pass (the features are each neuron's
        input ``X_i``). Returns ``(params, state, LocalStepInfo)``."""
        check_step_inputs(self.neurons, params, grads, features)
        eta = self.learning_rate(state["t"])
        new, updates, rhos, iterates = [], [], [], []
        for neuron, theta, g, X, transfer in zip(
            self.neurons, params, grads, features, self.transfers, strict=True
        ):
            if neuron.identity_metric:
                steps, rho = [-eta * np.asarray(g, dtype=float)], None
            else:
                rho = (
                    auto_inner_learning_rate(neuron, X, self.proximity)
                    if self.inner_learning_rate == "auto"
                    else float(self.inner_learning_rate)
                )
                steps = inner_iterates(
                    neuron, X, theta, g, eta, self.proximity, self.inner_steps, rho, transfer
                )
            updates.append(steps[-1])
            new.append(theta + steps[-1])
            rhos.append(rho)
            iterates.append(steps)
        info = LocalStepInfo(eta, updates, rhos, iterates)
        return new, {"t": state["t"] + 1}, info


class LocoPropS(_LocoProp):
    """LocoProp-S: ``inner_steps`` gradient steps on each neuron's squared local loss (module
    docstring); the update is ``θ ← θ_k + Δ_J``.

    Args:
        neurons: the network's linear neurons, in the order of ``params``.
        learning_rate: η, the step on the outputs that defines the local targets
            ``t = z_k − η n_i λ_i`` (a number or a schedule ``t ↦ η_t``). Large next to SGD's
            rates (the converged step is ``−η(M + κI)⁻¹g``): see :func:`lnb_fast.locoprop_s`.
        proximity: κ ≥ 0, the weight of ``½‖θ − θ_k‖²`` (LocoProp's ``1/η_W``), on all entries.
        inner_steps: J ≥ 1, the gradient steps on the local loss.
        inner_learning_rate: ρ, ``"auto"`` (``1/(B + κ)``, module docstring) or a number.
    """

    def __init__(
        self,
        neurons: Sequence[LinearNeuron],
        learning_rate: float | Schedule,
        proximity: float = 1e-3,
        inner_steps: int = 5,
        inner_learning_rate: float | str = "auto",
    ):
        super().__init__(learning_rate, proximity, inner_steps, inner_learning_rate)
        self.neurons = list(neurons)
        self.transfers = ["identity"] * len(self.neurons)

    def minimizers(self, grads, features, learning_rate: float | None = None) -> list[np.ndarray]:
        """Every neuron's exact local minimiser ``−η (M + κI)⁻¹ g`` (:func:`locoprop_s_minimizer`),
        the limit of the inner loop as ``inner_steps → ∞`` (η: the schedule's first value unless
        given)."""
        eta = self.learning_rate(0) if learning_rate is None else learning_rate
        return [
            locoprop_s_minimizer(n, X, g, eta, self.proximity)
            for n, g, X in zip(self.neurons, grads, features, strict=True)
        ]


class LocoPropM(_LocoProp):
    """LocoProp-M: ``inner_steps`` gradient steps on each neuron's matched (Bregman) local loss,
    the transfer φ of neuron ``i`` being ``network.activations[i]`` (module docstring).

    The pre-activations ``z_k = neuron.forward(X, θ_k)`` are recomputed from the features, so the
    interface is the shared ``step(params, grads, features, state)``.

    Args:
        network: a :class:`~lnb_ref.network.Network` (its ``neurons`` and ``activations``).
        learning_rate, proximity, inner_steps, inner_learning_rate: as :class:`LocoPropS`.
        output_transfer: ``"identity"`` (the last neuron's own activation, the squared local
            loss on logits) or ``"softmax"`` (the last neuron must be Dense with no activation:
            its matched loss is then the cross-entropy / KL to ``softmax(z_k) − η n λ``).
    """

    def __init__(
        self,
        network: Network,
        learning_rate: float | Schedule,
        proximity: float = 1e-3,
        inner_steps: int = 5,
        inner_learning_rate: float | str = "auto",
        output_transfer: str = "identity",
    ):
        super().__init__(learning_rate, proximity, inner_steps, inner_learning_rate)
        self.neurons = list(network.neurons)
        self.transfers = list(network.activations)
        for name in self.transfers:
            get_transfer(name)
        if output_transfer not in ("identity", "softmax"):
            raise ValueError(
                f"output_transfer must be 'identity' or 'softmax', got {output_transfer!r}"
            )
        if output_transfer == "softmax":
            last = self.neurons[-1]
            if not isinstance(last, Dense) or self.transfers[-1] != "identity":
                raise NeuronShapeError(
                    f"neuron {last.name!r}: output_transfer='softmax' needs a Dense output neuron "
                    f"without activation, got {type(last).__name__} + {self.transfers[-1]!r}"
                )
            self.transfers[-1] = "softmax"
