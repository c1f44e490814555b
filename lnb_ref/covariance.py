"""Exact solves against an EMA of each neuron's second moment: LNB's covariance option and FOOF.

§3.5 of the paper offers two ways to apply ``M_i⁻¹``: PCG on the current minibatch's metric
(Algorithm 2, :class:`~lnb_ref.lnb.OnlineLNB`), or keep a running estimate of the metric and
invert it now and then. The second is :class:`CovarianceLNB`. Per neuron and group ``g``::

    A_g ← β₂ A_g + (1 − β₂) C_g(X)          C_g = Φ_gᵀΦ_g / n_i, augmented by Eq. 12 with a bias
    every ``refresh_every`` steps (the first included; ``A`` itself is updated every
    ``covariance_every`` steps, and c₂ = 1 − β₂ᵘ counts its ``u`` updates):
        F_g = cholesky(A_g / c₂ + γ I_nonbias)          c₂ = 1 − β₂ᵗ (bias correction)
    θ̂ = F⁻¹ ĝ, row by row  (the factor of the last refresh: stale in between)

then LNB's norm ``z`` and step (:func:`~lnb_ref.lnb.boosting_update`).

:class:`FOOF` (Benzing 2022, *Gradient descent on neurons and its link to approximate
second-order optimization*) is the same inverse without LNB's normalisation: ``θ ← θ − lr · θ̂``.
For a neuron without a bias, with ``β₂ = 0`` and a refresh every step, its direction is exactly
Algorithm 1's ``M_i⁻¹ g_i`` with ridge = damping (:meth:`~lnb_ref.lnb.ExactLNB.directions`):
FOOF is LNB without biases, a step-size rule and the z normalisation. With a bias, FOOF's
"input covariance" of ``[x; 1]`` is the uncentred second moment of Eq. 12 (notebook 4, §8.1),
so the two agree there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg

from .lnb import StepInfo, check_options, check_step_inputs, normalised_step
from .metric import relative_ridge, ridge_diagonal, row_metric, step_norm
from .neurons import LinearNeuron
from .schedules import Schedule, as_schedule
from .solvers import cholesky_or_raise


class _EMAInverse:
    """The EMA of every neuron's row metric ``C_g`` and its Cholesky factors, refreshed every
    ``refresh_every`` steps; shared by :class:`CovarianceLNB` and :class:`FOOF`."""

    def __init__(
        self,
        neurons: Sequence[LinearNeuron],
        damping: float,
        b2: float,
        refresh_every: int,
        covariance_every: int = 1,
        relative: bool = False,
    ):
        if not 0.0 <= b2 < 1.0:
            raise ValueError(f"b2 must lie in [0, 1), got {b2}")
        for name, value in (
            ("refresh_every", refresh_every),
            ("covariance_every", covariance_every),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value}")
        if damping < 0:
            raise ValueError(f"the ridge/damping must be >= 0, got {damping}")
        self.neurons = list(neurons)
        self.damping, self.b2, self.refresh_every = damping, b2, int(refresh_every)
        self.covariance_every = int(covariance_every)
        self.relative = relative

    def damping_of(self, neuron: LinearNeuron, A: np.ndarray):
        """The ridge added at a refresh: ``λ``, or with ``relative`` ``λ·Var(x_j)`` read off the
        (bias-corrected) EMA metric ``A`` itself, ``(G, D, D)`` (:func:`relative_ridge`)."""
        if not self.relative:
            return self.damping
        d = neuron.row_dim - int(neuron.bias)
        chi = np.diagonal(A, axis1=1, axis2=2)[:, :d]
        mu = A[:, :d, d] if neuron.bias else np.zeros_like(chi)
        return relative_ridge(mu, chi, self.damping, neuron.bias)

    def init(self) -> tuple[list, list]:
        shapes = [
            None if n.identity_metric else (n.groups, n.row_dim, n.row_dim) for n in self.neurons
        ]
        return [None if s is None else np.zeros(s) for s in shapes], [None] * len(shapes)

    def directions(self, t: int, grads, features, A, factors):
        """``θ̂_i = (A_i/c₂ + λ)⁻¹ g_i`` (identity neurons: ``g_i``); returns the directions and the
        new ``A`` and factors. ``t`` is the 1-based step number."""
        update = (t - 1) % self.covariance_every == 0  # steps 1, 1 + k, ... update the EMA
        c2 = 1.0 - self.b2 ** ((t - 1) // self.covariance_every + 1)  # u updates so far
        refresh = (t - 1) % self.refresh_every == 0
        out, new_A, new_factors = [], [], []
        for i, neuron in enumerate(self.neurons):
            if neuron.identity_metric:
                out.append(np.array(grads[i], dtype=float))
                new_A.append(None)
                new_factors.append(None)
                continue
            A_i = A[i]
            if update:
                A_i = self.b2 * A[i] + (1 - self.b2) * row_metric(neuron, features[i])
            factors_i = factors[i]
            if refresh:  # the damping on non-bias diagonal entries, as row_metric's γ (§3.4)
                diag = ridge_diagonal(neuron, self.damping_of(neuron, A_i / c2)).reshape(
                    neuron.groups, -1, neuron.row_dim
                )
                damped = A_i / c2 + diag[:, 0, :, None] * np.eye(neuron.row_dim)
                factors_i = [cholesky_or_raise(neuron.name, a) for a in damped]
            gg = neuron.grouped(grads[i])
            d = np.stack(
                [scipy.linalg.cho_solve(f, g.T).T for f, g in zip(factors_i, gg, strict=True)]
            )
            out.append(d.reshape(neuron.theta_shape))
            new_A.append(A_i)
            new_factors.append(factors_i)
        return out, new_A, new_factors

    def norms(self, directions, grads, factors) -> list[float]:
        """``θ̂_iᵀ F_i θ̂_i`` in the (stale) damped metric ``F_i = L Lᵀ`` each θ̂ was solved against,
        as ``‖Lᵀθ̂‖²`` per row; ``θ̂·g`` for identity neurons. Equal to ``θ̂ · g`` to rounding: the
        solve is exact against its own metric."""
        out = []
        for neuron, d, g, factors_i in zip(self.neurons, directions, grads, factors, strict=True):
            if neuron.identity_metric:
                out.append(step_norm(d, g))
                continue
            rows = neuron.grouped(d)
            out.append(
                float(
                    sum(
                        np.sum((r @ np.tril(f[0])) ** 2)
                        for r, f in zip(rows, factors_i, strict=True)
                    )
                )
            )
        return out


class CovarianceLNB:
    """LNB with the covariance option of §3.5: Algorithm 2's bookkeeping (gradient EMA β₁, both
    EMAs bias-corrected like Adam) but ``θ̂ = (A/c₂ + γ)⁻¹ ĝ`` against the EMA ``A`` of the row
    metric (Eq. 11–12), its Cholesky refreshed every ``refresh_every`` steps (module docstring).

    Args:
        neurons, epsilon, weight_decay, ridge, z0, b1, b2: as :class:`~lnb_ref.lnb.OnlineLNB`
            (``ridge`` = γ, on the non-bias diagonal; ``b2`` is the rate of the EMA of ``A``).
        refresh_every: steps between refactorizations (1: every step).
        covariance_every: steps between updates of the EMA ``A`` (1: every step; the bias
            correction ``c₂ = 1 − β₂ᵘ`` counts the ``u`` updates made).
        relative_ridge: ``γ·Var(x_j)`` from ``A``'s own diagonal at each refresh, instead of
            an absolute ``γ`` (:func:`~lnb_ref.metric.relative_ridge`).
        step_norm: ``"metric"`` (``z = Σ θ̂ᵀ(A/c₂ + γ)θ̂`` in the refreshed metric θ̂ was solved
            against) or ``"paper"`` (``Σ θ̂ · ĝ``); equal to rounding, as the solve is exact.
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
        refresh_every: int = 1,
        covariance_every: int = 1,
        relative_ridge: bool = False,
        step_norm: str = "metric",
    ):
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"b1 must lie in [0, 1), got {b1}")
        check_options(step_norm, 0.0)
        self.inverse = _EMAInverse(
            neurons, ridge, b2, refresh_every, covariance_every, relative=relative_ridge
        )
        self.neurons = self.inverse.neurons
        self.epsilon = as_schedule(epsilon)
        self.weight_decay, self.ridge, self.z0, self.b1 = weight_decay, ridge, z0, b1
        self.step_norm = step_norm

    def init(self, params: Sequence[np.ndarray]) -> dict:
        A, factors = self.inverse.init()
        return {
            "t": 0,
            "g": [np.zeros(n.theta_shape) for n in self.neurons],
            "A": A,
            "factors": factors,
        }

    def step(self, params, grads, features, state):
        """One step; returns ``(params, state, StepInfo)``."""
        check_step_inputs(self.neurons, params, grads, features)
        t = state["t"] + 1
        eps = self.epsilon(state["t"])
        g_ema = [self.b1 * m + (1 - self.b1) * g for m, g in zip(state["g"], grads, strict=True)]
        g_hat = [m / (1.0 - self.b1**t) for m in g_ema]
        directions, A, factors = self.inverse.directions(
            t, g_hat, features, state["A"], state["factors"]
        )
        dots = [step_norm(d, g) for d, g in zip(directions, g_hat, strict=True)]
        norms = self.inverse.norms(directions, g_hat, factors)
        new, info = normalised_step(self, params, directions, g_hat, eps, dots, norms)
        return new, {"t": t, "g": g_ema, "A": A, "factors": factors}, info


class FOOF:
    """FOOF (Benzing 2022): ``θ ← θ − lr · (A/c₂ + λ I_nonbias)⁻¹ g`` per neuron, with ``A`` the
    EMA (rate ``b2``, bias-corrected) of the neuron's uncentred input second moment — augmented
    ``[x; 1]`` with a bias, i.e. Eq. 12 — and its Cholesky refreshed every ``refresh_every``
    steps. No gradient EMA and no ``z`` normalisation (chain a momentum if wanted); identity
    neurons take ``−lr · g``. ``info.z`` reports ``Σ θ̂·g`` for comparison only.

    Args:
        neurons: the network's linear neurons, in the order of ``params``.
        learning_rate: a number or a schedule ``t ↦ lr_t``.
        damping: ``λ``, on the non-bias diagonal (LNB's γ).
        b2: EMA rate of ``A``; refresh_every: steps between refactorizations;
        covariance_every: steps between updates of ``A`` (as :class:`CovarianceLNB`).
    """

    def __init__(
        self,
        neurons: Sequence[LinearNeuron],
        learning_rate: float | Schedule,
        damping: float = 0.0,
        b2: float = 0.95,
        refresh_every: int = 1,
        covariance_every: int = 1,
    ):
        self.inverse = _EMAInverse(neurons, damping, b2, refresh_every, covariance_every)
        self.neurons = self.inverse.neurons
        self.learning_rate = as_schedule(learning_rate)

    def init(self, params: Sequence[np.ndarray]) -> dict:
        A, factors = self.inverse.init()
        return {"t": 0, "A": A, "factors": factors}

    def step(self, params, grads, features, state):
        """One step; returns ``(params, state, StepInfo)`` (``epsilon`` holds the learning rate)."""
        check_step_inputs(self.neurons, params, grads, features)
        t = state["t"] + 1
        lr = self.learning_rate(state["t"])
        directions, A, factors = self.inverse.directions(
            t, grads, features, state["A"], state["factors"]
        )
        new = [p - lr * d for p, d in zip(params, directions, strict=True)]
        z = sum(step_norm(d, g) for d, g in zip(directions, grads, strict=True))
        return new, {"t": t, "A": A, "factors": factors}, StepInfo(lr, z, z, directions)
