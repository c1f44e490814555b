"""``tag_neuron``: the escape hatch for a neuron that discovery cannot find by itself.

Wrap the layer's computation where it is used in the model::

    y = lnb_fast.tag_neuron(lambda x, w, b: my_op(x, w) + b, x, w, b)

``f(x, w[, b])`` must be linear in ``(w, b)`` jointly; ``w`` and ``b`` must be parameter leaves
as they are (not reshaped). The call is an ordinary ``jax.jit`` whose name marks it, so the model
computes exactly what it did before; discovery treats the whole call as one neuron with input
``x``. ``n_samples`` is ``n_i`` of Eq. 11 (default: output size / size of its last axis).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from .discovery import TAG_PREFIX


def tag_neuron(f: Callable, x, w, b=None, *, n_samples: int | None = None):
    """Evaluate ``f(x, w[, b])`` and mark it as one linear neuron with input ``x``."""
    if n_samples is not None and (int(n_samples) != n_samples or n_samples < 1):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}")
    name = f"{TAG_PREFIX}_{int(n_samples or 0)}"

    def neuron(*args):
        return f(*args)

    neuron.__name__ = name
    neuron.__qualname__ = name
    args = (x, w) if b is None else (x, w, b)
    return jax.jit(neuron)(*args)
