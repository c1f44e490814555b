"""Differences between the JAX versions ``lnb_fast`` supports, detected from behaviour rather
than from version strings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def bind(primitive: Any, params: Mapping, operands: Sequence) -> Any:
    """``primitive.bind(*operands, **params)`` as an equation of a jaxpr would run it.

    ``Primitive.get_bind_params`` turns an equation's params into bind arguments. JAX ≥ 0.9.2
    returns the keyword arguments; earlier versions return a pair ``(subfuns, kwargs)`` whose
    ``subfuns`` (callables, for call-like primitives) go before the operands.
    """
    got = primitive.get_bind_params(dict(params))
    if isinstance(got, Mapping):
        return primitive.bind(*operands, **got)
    subfuns, kwargs = got
    return primitive.bind(*subfuns, *operands, **kwargs)
