"""Differences between the JAX versions ``lnb_fast`` supports, detected from behaviour rather
than from version strings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import jax

try:  # shard_map's check_vma flag, as a context manager and a value (no public accessor yet)
    from jax._src.config import _check_vma as _CHECK_VMA
except ImportError:  # pragma: no cover - another JAX layout: treated as "unknown"
    _CHECK_VMA = None


def bind(primitive: Any, params: Mapping, operands: Sequence) -> Any:
    """``primitive.bind(*operands, **params)`` as an equation of a jaxpr would run it.

    ``Primitive.get_bind_params`` turns an equation's params into bind arguments. JAX ≥ 0.9.2
    returns the keyword arguments; earlier versions return a pair ``(subfuns, kwargs)`` whose
    ``subfuns`` (callables, for call-like primitives) go before the operands.
    """
    operands = match_varying(operands)
    got = primitive.get_bind_params(dict(params))
    if isinstance(got, Mapping):
        return primitive.bind(*operands, **got)
    subfuns, kwargs = got
    return primitive.bind(*subfuns, *operands, **kwargs)


def manual_axes() -> tuple:
    """The mesh axes the code being traced is mapped over (``shard_map``, ``pmap``), empty
    outside them (and under ``vmap``)."""
    return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def checks_varying() -> bool | None:
    """Whether values are typed by the mesh axes they vary over (``shard_map``'s default
    ``check_vma=True``): True; False under ``check_vma=False`` or ``pmap``; None where this JAX
    does not say."""
    return None if _CHECK_VMA is None else bool(_CHECK_VMA.value)


def varying_axes(x) -> frozenset:
    """The mapped mesh axes ``x`` varies over, as ``shard_map`` types it (empty when it does not
    type them). JAX ≥ 0.10 calls it ``manual_axis_type.varying``, 0.9 ``vma``."""
    aval = jax.typeof(x)
    typed = getattr(aval, "manual_axis_type", None)
    if typed is not None:
        return frozenset(typed.varying)
    return frozenset(getattr(aval, "vma", ()))


def make_varying(x, axes: tuple):
    """``x`` typed as varying over ``axes`` too: a cast, no computation
    (``jax.lax.pcast(..., to="varying")``, ``jax.lax.pvary`` before it)."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)  # pragma: no cover - JAX < 0.10


def untyped_varying():
    """A context in which primitives are not typed by the axes they vary over, as under
    ``shard_map(check_vma=False)``: :mod:`lnb_fast.capture` replays, inside ``shard_map``, a
    jaxpr traced outside it, whose equations (and those of its custom-derivative calls) were
    never given the casts that ``check_vma`` needs. A no-op outside ``shard_map``."""
    if _CHECK_VMA is None or not manual_axes() or not _CHECK_VMA.value:
        return nullcontext()
    return _CHECK_VMA(False)


def varying_like(tree, reference):
    """``tree`` typed as varying over the axes ``reference`` varies over (a cast, under
    ``shard_map(check_vma=True)`` only). A pull-back ``Jᵀu`` through a replicated input that
    meets the replica's features would otherwise be summed over the replicas by autodiff (the
    transpose of the implicit cast is a ``psum``): cast first, the pull-back stays the replica's
    own, and :mod:`lnb_fast.spmd` averages it."""
    if not manual_axes() or not checks_varying():
        return tree
    axes = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(reference)))
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - varying_axes(x)))
        return make_varying(x, missing) if missing else x

    return jax.tree.map(cast, tree)


def match_varying(operands: Sequence) -> Sequence:
    """Operands cast to vary over the same mapped axes, as JAX's own tracing casts them under
    ``shard_map(check_vma=True)``: a neuron replayed from a jaxpr traced outside ``shard_map``
    meets the replica's features (varying over the batch axis) and replicated parameters, a
    mix its primitive refuses. Untouched outside ``shard_map`` (one cheap test)."""
    if not manual_axes() or not checks_varying():
        return operands
    axes = [varying_axes(x) for x in operands]
    union = frozenset().union(*axes)
    if all(a == union for a in axes):
        return operands
    return [
        x if a == union else make_varying(x, tuple(sorted(union - a)))
        for x, a in zip(operands, axes, strict=True)
    ]
