"""Linear Neuron Boosting: Algorithm 1 (full batch, exact solve) and Algorithm 2 (online, PCG).

Every optimizer in :mod:`lnb_ref` has the same small interface, so a training loop can swap them::

    state = opt.init(params)
    params, state, info = opt.step(params, grads, features, state)

``params`` and ``grads`` are lists with one array per neuron (each of the neuron's
``theta_shape``); ``features`` holds each neuron's input ``X_i`` from the same forward pass that
produced the gradients (Algorithm 1, line 3). ``info`` reports ``z``, ``ε`` and the directions θ̂.

Both algorithms end with the same update (Alg. 1 lines 8–10, Alg. 2 lines 12–14)::

    θ ← (1 − √ε · ρ) θ                  weight decay, biases included (§3.2)
    z = max(z0, Σ_i θ̂_i · g_i)          ONE scalar over the whole network (Eq. 2)
    θ ← θ − √(ε / z) θ̂                  the step has squared length ε in function space

Weight decay: Algorithm 1 as printed writes ``1 − √(ερ)`` while Eq. 4 and Algorithm 2 give
``1 − √ε·ρ`` (the function-space step is ``√ε``); we use ``1 − √ε·ρ`` in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import NeuronShapeError, check_finite, check_shape
from .metric import metric_matvec, row_metric, step_norm
from .neurons import LinearNeuron
from .schedules import Schedule, as_schedule
from .solvers import PCGResult, design_moments, paper_preconditioner, pcg, solve_exact


def check_step_inputs(
    neurons: Sequence[LinearNeuron],
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    features: Sequence[np.ndarray] | None,
) -> None:
    """Shapes and finiteness of everything a step reads, each error naming its neuron."""
    for what, seq in (("params", params), ("grads", grads), ("features", features)):
        if seq is not None and len(seq) != len(neurons):
            raise NeuronShapeError(
                f"got {len(seq)} {what} for {len(neurons)} neurons "
                f"({', '.join(n.name for n in neurons)})"
            )
    for i, neuron in enumerate(neurons):
        check_shape(neuron.name, "parameters", params[i], neuron.theta_shape)
        check_shape(neuron.name, "gradient", grads[i], neuron.theta_shape)
        check_finite(neuron.name, "parameters", params[i])
        check_finite(neuron.name, "gradient", grads[i])
        if features is not None:
            neuron.check_input(features[i])
            check_finite(neuron.name, "input features", features[i])


def boosting_update(
    params: Sequence[np.ndarray],
    directions: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    epsilon: float,
    weight_decay: float = 0.0,
    z0: float = 0.0,
) -> tuple[list[np.ndarray], float, float]:
    """Weight decay, the norm ``z`` and the adaptive step (Alg. 1 lines 8–10, Alg. 2 lines 12–14).

    Returns the new parameters, ``z = max(z0, Σ θ̂_i·g_i)`` and the unclamped ``Σ θ̂_i·g_i``.
    If ``z`` is 0 (all gradients zero, or an inexact θ̂ with ``Σ θ̂_i·g_i ≤ 0`` and ``z0 = 0``)
    no boosting step is taken; the weight decay still applies.
    """
    raw_z = sum(step_norm(d, g) for d, g in zip(directions, grads, strict=True))
    z = max(z0, raw_z)
    decay = 1.0 - np.sqrt(epsilon) * weight_decay
    scale = np.sqrt(epsilon / z) if z > 0 else 0.0
    new = [decay * p - scale * d for p, d in zip(params, directions, strict=True)]
    return new, z, raw_z


@dataclass
class StepInfo:
    """What one LNB step did: ``epsilon``, the norm ``z`` (before the ``z0`` clamp: ``raw_z``),
    the directions θ̂ per neuron, and for Algorithm 2 the PCG results per neuron (or None)."""

    epsilon: float
    z: float
    raw_z: float
    directions: list[np.ndarray]
    pcg: list[PCGResult | None] = field(default_factory=list)


class ExactLNB:
    """Algorithm 1: full-batch Linear Neuron Boosting with an exact solve of Eq. 10.

    For each neuron, ``θ̂_i = M_i⁻¹ g_i`` by Cholesky of the closed-form metric (the metric of an
    identity neuron is I, so ``θ̂_i = g_i``), then the update of the module docstring.

    Args:
        neurons: the network's linear neurons, in the order of ``params``.
        epsilon: ``ε`` — a number or a schedule ``t ↦ ε_t``.
        weight_decay: ``ρ``.
        ridge: ``γ`` added to the non-bias diagonal of every ``M_i`` (§3.4). With ``γ = 0`` a
            singular metric raises :class:`~lnb_ref.errors.NotPositiveDefiniteError`.
        z0: lower bound on ``z``; Algorithm 1 has none (0).
    """

    def __init__(
        self,
        neurons: Sequence[LinearNeuron],
        epsilon: float | Schedule,
        weight_decay: float = 0.0,
        ridge: float = 0.0,
        z0: float = 0.0,
    ):
        self.neurons = list(neurons)
        self.epsilon = as_schedule(epsilon)
        self.weight_decay, self.ridge, self.z0 = weight_decay, ridge, z0

    def init(self, params: Sequence[np.ndarray]) -> dict:
        """Algorithm 1 keeps no state but the step count ``t`` (for the schedule ε_t)."""
        return {"t": 0}

    def directions(
        self, grads: Sequence[np.ndarray], features: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """``θ̂_i = M_i⁻¹ g_i`` for every neuron (Alg. 1, lines 4–7)."""
        out = []
        for neuron, g, X in zip(self.neurons, grads, features, strict=True):
            if neuron.identity_metric:
                out.append(np.array(g, dtype=float))
            else:
                out.append(solve_exact(neuron, row_metric(neuron, X, self.ridge), g))
        return out

    def step(self, params, grads, features, state):
        """One iteration of Algorithm 1 (lines 3–10) from the gradients and features of one
        full-batch forward/backward pass. Returns ``(params, state, StepInfo)``."""
        check_step_inputs(self.neurons, params, grads, features)
        eps = self.epsilon(state["t"])
        directions = self.directions(grads, features)
        new, z, raw_z = boosting_update(params, directions, grads, eps, self.weight_decay, self.z0)
        return new, {"t": state["t"] + 1}, StepInfo(eps, z, raw_z, directions)


class OnlineLNB:
    """Algorithm 2: online Linear Neuron Boosting with EMAs and warm-started PCG.

    Per step, for each neuron ``i`` (identity-metric neurons skip the solver, ``θ̂_i = g_i``)::

        g_i ← ema(g_i, ∇ℓ)                  β₁, bias-corrected like Adam    (line 4)
        μ_i ← ema(μ_i, mean(X_i)),  χ_i ← ema(χ_i, mean(X_i ⊙ X_i))   β₂, bias-corrected  (6–7)
        P_i ← diag(χ_i + γ)⁻¹ (no bias)  or  W̃ W̃ᵀ (bias)                                 (8)
        θ̂_i ← pcg(M_i of *this* minibatch + γ, g_i, P_i, x0 = previous θ̂_i, k iterations)  (9–10)

    then the update of the module docstring with the bias-corrected ``g``.

    Args:
        neurons: the network's linear neurons, in the order of ``params``.
        epsilon: ``ε`` — a number or a schedule ``t ↦ ε_t``.
        weight_decay: ``ρ``.
        ridge: ``γ`` (§3.4), on the non-bias diagonal of ``M_i`` and in ``P_i``.
        z0: the minimum norm of line 13.
        b1: EMA rate of the gradient (0 disables the EMA).
        b2: EMA rate of the feature moments μ and χ.
        cg_iterations: PCG iterations per step (the paper uses 2).
        precondition: use the §3.5 preconditioners (False: plain CG, for comparisons).
        warm_start: start PCG from the previous θ̂ (False: from 0).
    """

    def __init__(
        self,
        neurons: Sequence[LinearNeuron],
        epsilon: float | Schedule,
        weight_decay: float = 0.0,
        ridge: float = 0.0,
        z0: float = 0.0,
        b1: float = 0.9,
        b2: float = 0.99,
        cg_iterations: int = 2,
        precondition: bool = True,
        warm_start: bool = True,
    ):
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"EMA rates must lie in [0, 1); got b1={b1}, b2={b2}")
        if cg_iterations < 1:
            raise ValueError(f"cg_iterations must be >= 1, got {cg_iterations}")
        self.neurons = list(neurons)
        self.epsilon = as_schedule(epsilon)
        self.weight_decay, self.ridge, self.z0 = weight_decay, ridge, z0
        self.b1, self.b2 = b1, b2
        self.cg_iterations = cg_iterations
        self.precondition, self.warm_start = precondition, warm_start

    def init(self, params: Sequence[np.ndarray]) -> dict:
        """EMAs at zero (bias correction undoes that), previous θ̂ at zero, ``t = 0``."""
        state: dict = {"t": 0, "g": [np.zeros(n.theta_shape) for n in self.neurons]}
        state["theta_hat"] = [np.zeros(n.theta_shape) for n in self.neurons]
        state["mu"], state["chi"] = [], []
        for n in self.neurons:
            shape = None if n.identity_metric else (n.groups, n.row_dim - int(n.bias))
            state["mu"].append(None if shape is None else np.zeros(shape))
            state["chi"].append(None if shape is None else np.zeros(shape))
        return state

    def step(self, params, grads, features, state):
        """One iteration of Algorithm 2 (lines 3–14) from one minibatch's gradients and
        features. Returns ``(params, state, StepInfo)``; ``info.pcg`` holds each neuron's PCG
        iterates and residuals."""
        check_step_inputs(self.neurons, params, grads, features)
        t = state["t"] + 1
        eps = self.epsilon(state["t"])
        c1, c2 = 1.0 - self.b1**t, 1.0 - self.b2**t
        g_ema = [self.b1 * m + (1 - self.b1) * g for m, g in zip(state["g"], grads, strict=True)]
        g_hat = [m / c1 for m in g_ema]
        new_state = {"t": t, "g": g_ema, "mu": [], "chi": [], "theta_hat": []}
        directions, results = [], []
        for i, neuron in enumerate(self.neurons):
            if neuron.identity_metric:
                directions.append(g_hat[i])
                results.append(None)
                for key in ("mu", "chi"):
                    new_state[key].append(None)
                new_state["theta_hat"].append(g_hat[i])
                continue
            X = features[i]
            mean, sq = design_moments(neuron, X)
            mu = self.b2 * state["mu"][i] + (1 - self.b2) * mean
            chi = self.b2 * state["chi"][i] + (1 - self.b2) * sq
            new_state["mu"].append(mu)
            new_state["chi"].append(chi)
            P = None
            if self.precondition:
                P = paper_preconditioner(neuron, mu / c2, chi / c2, self.ridge)
            x0 = state["theta_hat"][i] if self.warm_start else None
            result = pcg(
                lambda v, neuron=neuron, X=X: metric_matvec(neuron, X, v, self.ridge),
                g_hat[i],
                self.cg_iterations,
                precondition=P,
                x0=x0,
            )
            directions.append(result.x)
            results.append(result)
            new_state["theta_hat"].append(result.x)
        new, z, raw_z = boosting_update(params, directions, g_hat, eps, self.weight_decay, self.z0)
        return new, new_state, StepInfo(eps, z, raw_z, directions, results)
