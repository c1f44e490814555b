"""What the test suite and ``lnb check`` share (``docs/testing.md`` is the guide):

* here, small NumPy helpers (no JAX import, so the reference's tests can use them without the
  fast backend): :func:`rel_err`, :func:`correlated_features`, :func:`teacher_problem`;
* :mod:`lnb.testing.tolerances`: the one table of tolerances, by quantity and dtype, explained;
* :mod:`lnb.testing.crosscheck`: the fast-vs-reference harness (needs JAX): both sides of a
  random neuron, its solve's errors, whole steps on the reference's MLP and CNN;
* :mod:`lnb.testing.strategies`: the hypothesis strategies (needs hypothesis);
* :mod:`lnb.testing.mlp`: the tiny tanh MLP and batches the optax tests train (needs JAX).
"""

from __future__ import annotations

import numpy as np


def rel_err(a, b) -> float:
    """``‖a − b‖ / max(‖b‖, tiny)`` over whole arrays (Frobenius norms)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def correlated_features(rng, n: int, d: int, mean_scale: float = 1.0) -> np.ndarray:
    """Rows with a nonzero mean, unequal scales and correlated columns (a random mixing)."""
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    scales = np.exp(rng.uniform(-1.0, 1.0, size=d))
    return (rng.normal(size=(n, d)) @ mix) * scales + mean_scale * rng.normal(size=d)


def teacher_problem(loss: str, seed: int, n: int, d: int, k: int = 3):
    """``(X, Y)`` for a small network with ``loss``: correlated inputs, a noisy linear teacher's
    argmax labels (``"softmax_cross_entropy"``) or its tanh as regression targets (``"mse"``)."""
    rng = np.random.default_rng(seed)
    X = correlated_features(rng, n, d)
    scores = X @ rng.normal(size=(d, k)) + 0.3 * rng.normal(size=(n, k))
    Y = np.argmax(scores, axis=1) if loss == "softmax_cross_entropy" else np.tanh(scores)
    return X, Y
