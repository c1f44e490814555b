"""Algorithm 2 (online LNB with EMAs and warm-started PCG) for explicit neurons, on any
array-API library: NumPy on the CPU, CuPy on a CUDA GPU.

The interface and arguments are those of :class:`lnb_ref.lnb.OnlineLNB`, so a NumPy loop can
swap one for the other::

    opt = OnlineLNB(neurons, epsilon=1e-2, ridge=1e-3)
    state = opt.init(params)                          # params: one (K, D) array per neuron
    params, state, info = opt.step(params, grads, features, state)

Per step, for each neuron ``i``::

    g_i ← ema(g_i, ∇ℓ)                     β₁, bias-corrected like Adam           (line 4)
    μ_i ← ema(μ_i, mean Φ_w),  χ_i ← ema(χ_i, mean Φ_w ⊙ Φ_w)   β₂, bias-corrected  (6–7)
    P_i ← diag(χ_i + γ)⁻¹ (no bias)  or  W̃ W̃ᵀ (bias)                              (8)
    θ̂_i ← pcg(M_i of this minibatch + γ, g_i, P_i, x0 = previous θ̂_i, k iterations) (9–10)

then, once for the whole network (lines 12–14)::

    θ ← (1 − √ε · ρ) θ;     z = max(z0, Σ_i θ̂_iᵀ(M_i + γ)θ̂_i);     θ ← θ − √(ε / z) θ̂

(weight decay ``1 − √ε·ρ``, as in the reference). The step norm, the descent restart and the
relative ridge are those of :mod:`lnb_ref.lnb` (``step_norm``, ``min_descent``,
``relative_ridge``). Two host synchronisations per step at most: the optional finiteness check,
and with a warm start the descent test (one for all neurons; the neurons whose warm-started θ̂
fails it are recomputed from 0). ``z`` and the PCG residuals are 0-d device arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import _compat
from ._compat import Array
from .metric import design_product, moments_of_design
from .neurons import Neuron
from .pcg import PCGResult, metric_norm, pcg
from .preconditioner import paper_preconditioner, relative_ridge

STEP_NORMS = ("metric", "paper")

Schedule = Callable[[int], float]


@dataclass
class StepInfo:
    """What one step did, as :class:`lnb_ref.lnb.StepInfo` (``z`` and ``raw_z`` are 0-d
    arrays on the device; ``float()`` them to read them)."""

    epsilon: float
    z: Array
    raw_z: Array
    directions: list[Array]
    pcg: list[PCGResult] = field(default_factory=list)
    dots: list[Array] = field(default_factory=list)
    norms: list[Array] = field(default_factory=list)
    restarted: list[bool] = field(default_factory=list)


def boosting_update(
    params: Sequence[Array],
    directions: Sequence[Array],
    grads: Sequence[Array],
    epsilon: float,
    weight_decay: float = 0.0,
    z0: float = 0.0,
    norms: Sequence[Array] | None = None,
) -> tuple[list[Array], Array, Array]:
    """Weight decay, ``z = max(z0, Σ_i norm_i)`` and the step ``−√(ε/z) θ̂`` (Alg. 2, lines
    12–14), as :func:`lnb_ref.lnb.boosting_update`: ``norms`` are the directions' squared lengths
    ``θ̂ᵀ(M + γ)θ̂``; without them, the paper's ``θ̂_i·g_i``. If ``z = 0`` no boosting step is
    taken (the decay still applies). Returns the new parameters, ``z`` and the unclamped sum."""
    xp = _compat.namespace(*params)
    if norms is None:
        norms = [_compat.vdot(xp, d, g) for d, g in zip(directions, grads, strict=True)]
    raw_z = sum(norms)
    floor = xp.zeros_like(raw_z) + z0
    z = xp.where(raw_z > floor, raw_z, floor)
    positive = z > 0
    scale = xp.where(positive, xp.sqrt(epsilon / xp.where(positive, z, floor + 1)), 0 * z)
    decay = 1.0 - math.sqrt(epsilon) * weight_decay
    new = [decay * p - scale * d for p, d in zip(params, directions, strict=True)]
    return new, z, raw_z


def _as_schedule(epsilon: float | Schedule) -> Schedule:
    if callable(epsilon):
        return epsilon
    if not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise ValueError(
            f"epsilon must be a positive number or a schedule t -> eps, got {epsilon!r}"
        )
    return lambda t: float(epsilon)


class OnlineLNB:
    """Algorithm 2 for explicit :class:`~lnb_fast.xp.Dense` / :class:`~lnb_fast.xp.Conv2d`
    neurons (see the module docstring). Arguments as :class:`lnb_ref.lnb.OnlineLNB`:

    Args:
        neurons: the network's linear neurons, in the order of ``params``.
        epsilon: ``ε`` — a number or a schedule ``t ↦ ε_t`` (0-based step count).
        weight_decay: ``ρ``.
        ridge: ``γ`` (§3.4), on the non-bias diagonal of ``M_i`` and in ``P_i``.
        z0: the minimum norm of line 13.
        b1: EMA rate of the gradient (0 disables the EMA).
        b2: EMA rate of the feature moments μ and χ.
        cg_iterations: PCG iterations per step (the paper uses 2).
        precondition: use the §3.5 preconditioners (False: plain CG).
        warm_start: start PCG from the previous θ̂ (False: from 0).
        check_finite: raise a ValueError naming the neuron if a gradient or a feature array is
            not finite (costs one host synchronisation per step; False skips it).
        relative_ridge: ``γ·Var(x_j)`` per weight column instead of an absolute ``γ``.
        step_norm: ``"metric"`` (``z = Σ θ̂ᵀ(M + γ)θ̂``, default) or ``"paper"`` (``Σ θ̂·g``).
        min_descent: warm-started directions with ``θ̂·g ≤ min_descent · θ̂ᵀ(M + γ)θ̂`` are
            recomputed by PCG from 0.
    """

    def __init__(
        self,
        neurons: Sequence[Neuron],
        epsilon: float | Schedule,
        weight_decay: float = 0.0,
        ridge: float = 0.0,
        z0: float = 0.0,
        b1: float = 0.9,
        b2: float = 0.99,
        cg_iterations: int = 2,
        precondition: bool = True,
        warm_start: bool = True,
        check_finite: bool = True,
        relative_ridge: bool = True,
        step_norm: str = "metric",
        min_descent: float = 0.5,
    ):
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"EMA rates must lie in [0, 1); got b1={b1}, b2={b2}")
        if not isinstance(cg_iterations, int) or cg_iterations < 1:
            raise ValueError(f"cg_iterations must be an int >= 1, got {cg_iterations!r}")
        for what, v in (("weight_decay", weight_decay), ("ridge", ridge), ("z0", z0)):
            if not v >= 0:
                raise ValueError(f"{what} must be >= 0, got {v!r}")
        if step_norm not in STEP_NORMS:
            raise ValueError(f"step_norm must be one of {STEP_NORMS}, got {step_norm!r}")
        if not 0.0 <= min_descent <= 1.0:
            raise ValueError(f"min_descent must lie in [0, 1], got {min_descent!r}")
        for i, n in enumerate(neurons):
            if not isinstance(n, Neuron):
                raise TypeError(
                    f"neurons[{i}] is a {type(n).__name__}; expected lnb_fast.xp.Dense or Conv2d"
                )
        self.neurons = list(neurons)
        self.epsilon = _as_schedule(epsilon)
        self.weight_decay, self.ridge, self.z0 = float(weight_decay), float(ridge), float(z0)
        self.b1, self.b2 = float(b1), float(b2)
        self.cg_iterations = cg_iterations
        self.precondition, self.warm_start = precondition, warm_start
        self.check_finite = check_finite
        self.relative_ridge, self.step_norm = relative_ridge, step_norm
        self.min_descent = float(min_descent)

    def init(self, params: Sequence[Array]) -> dict:
        """EMAs and the previous θ̂ at zero (bias correction undoes that), ``t = 0``; in the
        dtype and on the device of ``params``."""
        self._check_lengths(params=params)
        xp = _compat.namespace(*params)
        state: dict = {"t": 0, "g": [], "theta_hat": [], "mu": [], "chi": []}
        for n, p in zip(self.neurons, params, strict=True):
            n.check_theta("params", p)
            state["g"].append(xp.zeros_like(p))
            state["theta_hat"].append(xp.zeros_like(p))
            state["mu"].append(_compat.zeros(xp, (n.groups, n.n_weights), p))
            state["chi"].append(_compat.zeros(xp, (n.groups, n.n_weights), p))
        return state

    def _check_lengths(self, **seqs) -> None:
        for what, seq in seqs.items():
            if len(seq) != len(self.neurons):
                raise ValueError(
                    f"got {len(seq)} {what} for {len(self.neurons)} neurons "
                    f"({', '.join(n.name for n in self.neurons)})"
                )

    def _check_inputs(self, xp, params, grads, features) -> None:
        self._check_lengths(params=params, grads=grads, features=features)
        for n, p, g, X in zip(self.neurons, params, grads, features, strict=True):
            n.check_theta("params", p)
            n.check_theta("gradient", g)
            n.check_input(X)
        if not self.check_finite:
            return
        flags = [xp.all(xp.isfinite(a)) for a in (*grads, *features)]
        if bool(xp.all(xp.stack(flags))):  # one host synchronisation
            return
        for n, g, X in zip(self.neurons, grads, features, strict=True):
            for what, a in (("gradient", g), ("input features", X)):
                if not bool(xp.all(xp.isfinite(a))):
                    raise ValueError(f"neuron {n.name!r}: the {what} contain NaN or Inf")

    def step(self, params, grads, features, state):
        """One iteration of Algorithm 2 (lines 3–14). Returns ``(params, state, StepInfo)``;
        ``info.pcg`` holds each neuron's PCG iterates and residual norms."""
        xp = _compat.namespace(*params, *grads, *features)
        self._check_inputs(xp, params, grads, features)
        t = state["t"] + 1
        eps = float(self.epsilon(state["t"]))
        c1, c2 = 1.0 - self.b1**t, 1.0 - self.b2**t
        g_ema = [self.b1 * m + (1 - self.b1) * g for m, g in zip(state["g"], grads, strict=True)]
        g_hat = [m / c1 for m in g_ema]
        new_state = {"t": t, "g": g_ema, "mu": [], "chi": [], "theta_hat": []}
        solves = []  # per neuron: (matvec, preconditioner)
        results = []
        for i, neuron in enumerate(self.neurons):
            X = features[i]
            A = neuron.weight_design(X)  # built once, used by the moments and every product
            n = neuron.n_samples(X)
            mean, sq = moments_of_design(A)
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

            def matvec(v, neuron=neuron, A=A, n=n, gamma=gamma):
                return design_product(neuron, A, n, v, gamma)

            solves.append((matvec, P))
            results.append(pcg(matvec, g_hat[i], self.cg_iterations, precondition=P, x0=x0))
        dots = [_compat.vdot(xp, r.x, g) for r, g in zip(results, g_hat, strict=True)]
        norms = [metric_norm(r, g) for r, g in zip(results, g_hat, strict=True)]
        restarted = [False] * len(results)
        if self.warm_start and results:  # descent: one host synchronisation for all neurons
            ok = xp.stack([d > self.min_descent * m for d, m in zip(dots, norms, strict=True)])
            failed = [] if bool(xp.all(ok)) else [i for i in range(len(results)) if not bool(ok[i])]
            for i in failed:
                matvec, P = solves[i]
                results[i] = pcg(matvec, g_hat[i], self.cg_iterations, precondition=P)
                dots[i] = _compat.vdot(xp, results[i].x, g_hat[i])
                norms[i] = metric_norm(results[i], g_hat[i])
                restarted[i] = True
        directions = [r.x for r in results]
        new_state["theta_hat"] = list(directions)
        new, z, raw_z = boosting_update(
            params,
            directions,
            g_hat,
            eps,
            self.weight_decay,
            self.z0,
            norms if self.step_norm == "metric" else dots,
        )
        info = StepInfo(eps, z, raw_z, directions, results, dots, norms, restarted)
        return new, new_state, info
