"""Step-size schedules ``{ε_t}`` (Algorithms 1 and 2 take a schedule, not a constant).

A schedule is any callable ``t ↦ ε_t`` of the 0-based step count, the same convention as optax's
schedules, so an optax schedule can be passed to the reference too. A plain number means constant.
"""

from __future__ import annotations

from collections.abc import Callable

Schedule = Callable[[int], float]


def constant(value: float) -> Schedule:
    """``ε_t = value``."""
    return lambda t: float(value)


def exponential_decay(init_value: float, decay_rate: float) -> Schedule:
    """``ε_t = init_value · decay_rate^t``."""
    return lambda t: float(init_value) * float(decay_rate) ** t


def as_schedule(value: float | Schedule) -> Schedule:
    """A number becomes :func:`constant`; a callable is returned as is."""
    if callable(value):
        return value
    if not value > 0:
        raise ValueError(f"step size must be positive, got {value!r}")
    return constant(value)
