"""First-order baselines in NumPy, with the same interface as the LNB optimizers.

They ignore the features; they exist so that the reference can run side-by-side comparisons
(matrix factorization, the affine-invariance check) with no deep-learning library.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .lnb import StepInfo
from .schedules import Schedule, as_schedule


class GradientDescent:
    """``θ ← θ − η_t g`` (§2.1): preconditioned gradient descent with the identity metric."""

    def __init__(self, learning_rate: float | Schedule):
        self.learning_rate = as_schedule(learning_rate)

    def init(self, params: Sequence[np.ndarray]) -> dict:
        """Only the step count ``t`` (for the schedule)."""
        return {"t": 0}

    def step(self, params, grads, features, state):
        """``θ ← θ − η_t g``; ``features`` is ignored. Returns ``(params, state, StepInfo)``."""
        lr = self.learning_rate(state["t"])
        new = [p - lr * g for p, g in zip(params, grads, strict=True)]
        return new, {"t": state["t"] + 1}, StepInfo(lr, float("nan"), float("nan"), list(grads))


class Adam:
    """Adam (Kingma & Ba, 2015), as in ``optax.adam``::

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,
    θ ← θ − η_t m̂ / (√v̂ + eps),   m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)
    """

    def __init__(
        self,
        learning_rate: float | Schedule,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
    ):
        self.learning_rate = as_schedule(learning_rate)
        self.b1, self.b2, self.eps = b1, b2, eps

    def init(self, params: Sequence[np.ndarray]) -> dict:
        """First and second moment EMAs at zero, ``t = 0``."""
        zeros = [np.zeros_like(p, dtype=float) for p in params]
        return {"t": 0, "m": zeros, "v": [z.copy() for z in zeros]}

    def step(self, params, grads, features, state):
        """One Adam step (class docstring); ``features`` is ignored."""
        t = state["t"] + 1
        lr = self.learning_rate(state["t"])
        m = [self.b1 * m + (1 - self.b1) * g for m, g in zip(state["m"], grads, strict=True)]
        v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(state["v"], grads, strict=True)]
        c1, c2 = 1 - self.b1**t, 1 - self.b2**t
        updates = [(mi / c1) / (np.sqrt(vi / c2) + self.eps) for mi, vi in zip(m, v, strict=True)]
        new = [p - lr * u for p, u in zip(params, updates, strict=True)]
        return new, {"t": t, "m": m, "v": v}, StepInfo(lr, float("nan"), float("nan"), updates)
