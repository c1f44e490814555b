"""The few helpers that keep :mod:`lnb_fast.xp` on the Python array API standard.

The namespace ``xp`` is always taken from the arrays themselves (``x.__array_namespace__()``,
NumPy ≥ 2, CuPy ≥ 13, ``array_api_strict``), never imported, so the same code runs on NumPy
(CPU) and CuPy (CUDA) without a dependency on either. Where a library lags the standard
(older CuPy spells ``permute_dims`` ``transpose`` and ``concat`` ``concatenate``, and may not
take ``device=``), the helpers fall back to the older spelling; nothing else is special-cased.
"""

from __future__ import annotations

from typing import Any

Array = Any


def namespace(*arrays: Array) -> Any:
    """The array-API namespace shared by ``arrays`` (ValueError if they disagree or lack one)."""
    found = None
    for a in arrays:
        if a is None:
            continue
        get = getattr(a, "__array_namespace__", None)
        if get is None and type(a).__module__.startswith("cupy"):  # CuPy < 13: its own module
            import cupy

            get = lambda: cupy  # noqa: E731
        if get is None:
            raise TypeError(
                f"lnb_fast.xp works on array-API arrays (NumPy >= 2, CuPy >= 13); got "
                f"{type(a).__module__}.{type(a).__name__}, which has no __array_namespace__"
            )
        xp = get()
        if found is None:
            found = xp
        elif xp is not found:
            raise ValueError(
                f"arrays from two array libraries were mixed: {found.__name__} and {xp.__name__}"
            )
    if found is None:
        raise ValueError("no arrays given: cannot tell which array library to use")
    return found


def permute_dims(xp: Any, x: Array, axes: tuple[int, ...]) -> Array:
    """``xp.permute_dims`` (``xp.transpose`` on libraries that predate the name)."""
    fn = getattr(xp, "permute_dims", None) or xp.transpose
    return fn(x, axes)


def concat(xp: Any, arrays: list[Array], axis: int) -> Array:
    """``xp.concat`` (``xp.concatenate`` on libraries that predate the name)."""
    fn = getattr(xp, "concat", None) or xp.concatenate
    return fn(arrays, axis=axis)


def zeros(xp: Any, shape: tuple[int, ...], like: Array) -> Array:
    """Zeros of ``like``'s dtype on ``like``'s device."""
    try:
        return xp.zeros(shape, dtype=like.dtype, device=like.device)
    except TypeError:  # a library whose creation functions take no device= (the current one)
        return xp.zeros(shape, dtype=like.dtype)


def ones(xp: Any, shape: tuple[int, ...], like: Array) -> Array:
    """Ones of ``like``'s dtype on ``like``'s device."""
    try:
        return xp.ones(shape, dtype=like.dtype, device=like.device)
    except TypeError:
        return xp.ones(shape, dtype=like.dtype)


def vdot(xp: Any, a: Array, b: Array) -> Array:
    """``Σ a ⊙ b`` over every entry, a 0-d array (no host synchronisation)."""
    return xp.sum(a * b)


def norm(xp: Any, a: Array) -> Array:
    """The Euclidean norm of all entries, a 0-d array."""
    return xp.sqrt(xp.sum(a * a))
