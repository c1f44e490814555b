"""Linear Neuron Boosting: Algorithm 1 (full batch, exact solve) and Algorithm 2 (online, PCG).

Every optimizer in :mod:`lnb_ref` has the same small interface, so a training loop can swap them::

    state = opt.init(params)
    params, state, info = opt.step(params, grads, features, state)

``params`` and ``grads`` are lists with one array per neuron (each of the neuron's
``theta_shape``); ``features`` holds each neuron's input ``X_i`` from the same forward pass that
produced the gradients (Algorithm 1, line 3). ``info`` reports ``z``, ``ε`` and the directions θ̂.

Both algorithms end with the same update (Alg. 1 lines 8–10, Alg. 2 lines 12–14)::

    θ ← (1 − √ε · ρ) θ                  weight decay, biases included (§3.2)
    z = max(z0, Σ_i θ̂_iᵀ (M_i + γ) θ̂_i)  ONE scalar over the whole network (Eq. 1–2)
    θ ← θ − √(ε / z) θ̂                  the step has squared length ε in function space

**The step norm.** The paper writes ``z = Σ_i θ̂_i · g_i`` (Eq. 2, Alg. 2 line 13), which is the
squared function-space length ``Σ θ̂ᵀ M θ̂`` only when θ̂ solves ``M θ̂ = g``. Algorithm 2's
warm-started 2-iteration PCG does not: its θ̂ can have ``θ̂ · g`` a thousandth of ``θ̂ᵀMθ̂`` (or
negative), and the step was then measured up to 2.7e4·ε long, with loss spikes. So by default
(``step_norm="metric"``) ``z`` is the direction's *measured* squared length in the metric the
solve used, ``θ̂ᵀ(M + γ)θ̂ = θ̂ · (g − r)`` from PCG's own residual ``r`` (no extra product), and
every step is exactly ``ε`` long; ``step_norm="paper"`` keeps the printed rule. For an exact
solve (Algorithm 1) the two agree to rounding.

**Descent.** With a warm start, PCG's θ̂ may point uphill (``θ̂ · g ≤ 0``). When ``θ̂ · g ≤
min_descent · θ̂ᵀ(M + γ)θ̂`` PCG is run again from 0, whose iterates satisfy the Galerkin condition
``θ̂ · r = 0``, i.e. ``θ̂ · g = θ̂ᵀ(M + γ)θ̂ > 0``: the restarted direction descends, and both norms
agree.

Weight decay: Algorithm 1 as printed writes ``1 − √(ερ)`` while Eq. 4 and Algorithm 2 give
``1 − √ε·ρ`` (the function-space step is ``√ε``); we use ``1 − √ε·ρ`` in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import NeuronShapeError, check_finite, check_shape
from .metric import metric_matvec, relative_ridge, row_metric, row_metric_matvec, step_norm
from .neurons import LinearNeuron
from .schedules import Schedule, as_schedule
from .solvers import (
    PCGResult,
    design_moments,
    metric_norm,
    paper_preconditioner,
    pcg,
    solve_exact,
)

STEP_NORMS = ("metric", "paper")
"""``step_norm`` options: ``"metric"`` (``z = Σ θ̂ᵀ(M + γ)θ̂``, measured; the default) and
``"paper"`` (``z = Σ θ̂ · g``, Alg. 2 line 13 as printed)."""


def check_options(step_norm: str, min_descent: float) -> None:
    """The clear ``ValueError`` for a bad ``step_norm`` or ``min_descent``."""
    if step_norm not in STEP_NORMS:
        raise ValueError(f"step_norm must be one of {STEP_NORMS}, got {step_norm!r}")
    if not 0.0 <= min_descent <= 1.0:
        raise ValueError(f"min_descent must lie in [0, 1], got {min_descent!r}")


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
    norms: Sequence[float] | None = None,
) -> tuple[list[np.ndarray], float, float]:
    """Weight decay, the norm ``z`` and the adaptive step (Alg. 1 lines 8–10, Alg. 2 lines 12–14).

    ``norms`` are the directions' squared lengths ``θ̂_iᵀ(M_i + γ)θ̂_i`` (the ``"metric"`` rule);
    without them ``z`` is the paper's ``Σ θ̂_i·g_i``. Returns the new parameters,
    ``z = max(z0, Σ_i norm_i)`` and the unclamped sum. If ``z`` is 0 (all gradients zero, or
    the paper's rule with ``Σ θ̂_i·g_i ≤ 0`` and ``z0 = 0``) no boosting step is taken; the
    weight decay still applies.
    """
    if norms is None:
        norms = [step_norm(d, g) for d, g in zip(directions, grads, strict=True)]
    raw_z = float(sum(norms))
    z = max(z0, raw_z)
    decay = 1.0 - np.sqrt(epsilon) * weight_decay
    scale = np.sqrt(epsilon / z) if z > 0 else 0.0
    new = [decay * p - scale * d for p, d in zip(params, directions, strict=True)]
    return new, z, raw_z


@dataclass
class StepInfo:
    """What one LNB step did: ``epsilon``, the norm ``z`` (before the ``z0`` clamp: ``raw_z``),
    the directions θ̂ per neuron, and for Algorithm 2 the PCG results per neuron (or None).

    ``dots`` and ``norms`` are each neuron's ``θ̂_i · g_i`` and ``θ̂_iᵀ(M_i + γ)θ̂_i`` (whichever
    rule ``z`` used), ``restarted`` whether its warm-started PCG was rerun from 0 (descent)."""

    epsilon: float
    z: float
    raw_z: float
    directions: list[np.ndarray]
    pcg: list[PCGResult | None] = field(default_factory=list)
    dots: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    restarted: list[bool] = field(default_factory=list)


def normalised_step(
    opt, params, directions, grads, eps, dots, norms, results=(), restarted=None
) -> tuple[list[np.ndarray], StepInfo]:
    """:func:`boosting_update` with ``opt``'s ``weight_decay``, ``z0`` and ``step_norm`` (the
    measured ``norms`` or the paper's ``dots``), and the :class:`StepInfo` of the step."""
    chosen = norms if opt.step_norm == "metric" else dots
    new, z, raw_z = boosting_update(
        params, directions, grads, eps, opt.weight_decay, opt.z0, chosen
    )
    restarted = [False] * len(norms) if restarted is None else restarted
    return new, StepInfo(eps, z, raw_z, directions, list(results), dots, norms, restarted)


def solve_online(
    matvec,
    g: np.ndarray,
    iterations: int,
    precondition,
    x0: np.ndarray | None,
    min_descent: float,
) -> tuple[PCGResult, float, float, bool]:
    """Algorithm 2, line 10, with the descent safeguard: PCG from ``x0``; if its θ̂ has
    ``θ̂ · g ≤ min_descent · θ̂ᵀAθ̂`` (possible only with a warm start), PCG again from 0.

    Returns ``(result, θ̂·g, θ̂ᵀAθ̂, restarted)``. From 0, PCG's iterates minimise the A-norm error
    over a Krylov space that contains them, so ``θ̂ · r = 0`` and ``θ̂ · g = θ̂ᵀAθ̂ > 0`` unless
    ``g = 0`` (then θ̂ = 0)."""
    result = pcg(matvec, g, iterations, precondition=precondition, x0=x0)
    dot, norm = step_norm(result.x, g), metric_norm(result, g)
    if x0 is None or dot > min_descent * norm:
        return result, dot, norm, False
    result = pcg(matvec, g, iterations, precondition=precondition)
    return result, step_norm(result.x, g), metric_norm(result, g), True


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
        relative_ridge: ``γ`` is relative to each feature's variance in the batch,
            ``γ·Var(x_j)`` (:func:`~lnb_ref.metric.relative_ridge`: keeps the invariance to
            per-feature affine maps), instead of the same absolute ``γ`` for every feature.
        step_norm: ``"metric"`` (``z = Σ θ̂ᵀ(M + γ)θ̂``) or ``"paper"`` (``Σ θ̂ · g``); equal to
            rounding here, as the solve is exact (module docstring).
    """

    def __init__(
        self,
        neurons: Sequence[LinearNeuron],
        epsilon: float | Schedule,
        weight_decay: float = 0.0,
        ridge: float = 0.0,
        z0: float = 0.0,
        relative_ridge: bool = False,
        step_norm: str = "metric",
    ):
        check_options(step_norm, 0.0)
        self.neurons = list(neurons)
        self.epsilon = as_schedule(epsilon)
        self.weight_decay, self.ridge, self.z0 = weight_decay, ridge, z0
        self.relative_ridge, self.step_norm = relative_ridge, step_norm

    def gamma(self, neuron: LinearNeuron, X: np.ndarray):
        """The ridge of ``neuron``: ``γ``, or ``γ·Var(x_j)`` of this batch per column."""
        if not self.relative_ridge or neuron.identity_metric:
            return self.ridge
        mean, sq = design_moments(neuron, X)
        return relative_ridge(mean, sq, self.ridge, neuron.bias)

    def init(self, params: Sequence[np.ndarray]) -> dict:
        """Algorithm 1 keeps no state but the step count ``t`` (for the schedule ε_t)."""
        return {"t": 0}

    def directions(
        self, grads: Sequence[np.ndarray], features: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """``θ̂_i = M_i⁻¹ g_i`` for every neuron (Alg. 1, lines 4–7)."""
        return self._solve(grads, features)[0]

    def _solve(self, grads, features):
        """The directions and their squared lengths ``θ̂ᵀ(M + γ)θ̂`` (``θ̂·g`` for identity)."""
        out, norms = [], []
        for neuron, g, X in zip(self.neurons, grads, features, strict=True):
            if neuron.identity_metric:
                out.append(np.array(g, dtype=float))
                norms.append(step_norm(g, g))
                continue
            C = row_metric(neuron, X, self.gamma(neuron, X))
            d = solve_exact(neuron, C, g)
            out.append(d)
            norms.append(step_norm(d, row_metric_matvec(neuron, C, d)))
        return out, norms

    def step(self, params, grads, features, state):
        """One iteration of Algorithm 1 (lines 3–10) from the gradients and features of one
        full-batch forward/backward pass. Returns ``(params, state, StepInfo)``."""
        check_step_inputs(self.neurons, params, grads, features)
        eps = self.epsilon(state["t"])
        directions, norms = self._solve(grads, features)
        dots = [step_norm(d, g) for d, g in zip(directions, grads, strict=True)]
        new, info = normalised_step(self, params, directions, grads, eps, dots, norms)
        return new, {"t": state["t"] + 1}, info


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
        relative_ridge: ``γ`` is relative to each feature's (EMA) variance, ``γ·Var(x_j)``
            (:func:`~lnb_ref.metric.relative_ridge`), instead of absolute.
        step_norm: ``"metric"`` (default: ``z = Σ θ̂ᵀ(M + γ)θ̂``, every step ε long) or
            ``"paper"`` (``z = Σ θ̂ · g``, Alg. 2 line 13 as printed); module docstring.
        min_descent: a warm-started θ̂ with ``θ̂ · g ≤ min_descent · θ̂ᵀ(M + γ)θ̂`` is replaced by
            PCG from 0 (:func:`solve_online`); 0 restarts only uphill directions.
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
        relative_ridge: bool = False,
        step_norm: str = "metric",
        min_descent: float = 0.5,
    ):
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"EMA rates must lie in [0, 1); got b1={b1}, b2={b2}")
        if cg_iterations < 1:
            raise ValueError(f"cg_iterations must be >= 1, got {cg_iterations}")
        check_options(step_norm, min_descent)
        self.neurons = list(neurons)
        self.epsilon = as_schedule(epsilon)
        self.weight_decay, self.ridge, self.z0 = weight_decay, ridge, z0
        self.b1, self.b2 = b1, b2
        self.cg_iterations = cg_iterations
        self.precondition, self.warm_start = precondition, warm_start
        self.relative_ridge, self.step_norm = relative_ridge, step_norm
        self.min_descent = min_descent

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
        directions, results, dots, norms, restarted = [], [], [], [], []
        for i, neuron in enumerate(self.neurons):
            if neuron.identity_metric:
                directions.append(g_hat[i])
                results.append(None)
                dots.append(step_norm(g_hat[i], g_hat[i]))
                norms.append(dots[-1])
                restarted.append(False)
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
            gamma = self.ridge
            if self.relative_ridge:
                gamma = relative_ridge(mu / c2, chi / c2, self.ridge, neuron.bias)
            P = None
            if self.precondition:
                P = paper_preconditioner(neuron, mu / c2, chi / c2, gamma)
            x0 = state["theta_hat"][i] if self.warm_start else None
            result, dot, norm, again = solve_online(
                lambda v, neuron=neuron, X=X, gamma=gamma: metric_matvec(neuron, X, v, gamma),
                g_hat[i],
                self.cg_iterations,
                P,
                x0,
                self.min_descent,
            )
            directions.append(result.x)
            results.append(result)
            dots.append(dot)
            norms.append(norm)
            restarted.append(again)
            new_state["theta_hat"].append(result.x)
        new, info = normalised_step(
            self, params, directions, g_hat, eps, dots, norms, results, restarted
        )
        return new, new_state, info
