"""Errors a user can cause. Each names the neuron it is about, so a message read in a long
training log says *which* layer had the bad shape, the non-finite value or the singular metric.
"""

from __future__ import annotations

import numpy as np


class LNBError(ValueError):
    """Base class of every error `lnb_ref` raises on purpose."""


class NeuronShapeError(LNBError):
    """An input, parameter or gradient has a shape the neuron cannot take."""


class NonFiniteError(LNBError):
    """NaN or Inf in a neuron's input features or gradient: refusing to take a NaN step."""


class NotPositiveDefiniteError(LNBError):
    """The metric M_i is singular (or numerically so) and no ridge γ was given (§3.4)."""


def check_finite(name: str, what: str, array: np.ndarray) -> None:
    """Raise `NonFiniteError` naming neuron `name` if `array` holds a NaN or an Inf."""
    array = np.asarray(array)
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteError(
            f"neuron {name!r}: {what} has {bad} non-finite value(s) (NaN or Inf) "
            f"out of {np.size(array)}; refusing to take a step"
        )


def check_shape(name: str, what: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    """Raise `NeuronShapeError` naming neuron `name` unless `array.shape == expected`."""
    if tuple(np.shape(array)) != tuple(expected):
        raise NeuronShapeError(
            f"neuron {name!r}: {what} has shape {tuple(np.shape(array))}, "
            f"expected {tuple(expected)}"
        )
