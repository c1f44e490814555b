"""Explicit linear neurons for the array-API path: shapes only, no parameters, no library.

Unlike :mod:`lnb_fast`'s JAX path, which *finds* the neurons in a traced loss, here the user
names them, because there is no tracer: a NumPy or CuPy training loop computes its own gradients
and hands over each neuron's input ``X_i`` (paper §3.1). A neuron is a function linear in θ,

    f(X; θ) = Φ(X) θ        (per group g: out_g = Φ_g(X) θ_gᵀ, Eq. 9)

and this module only builds the design ``Φ`` from ``X``. The parameter layout is exactly that of
:mod:`lnb_ref.neurons`, so the two are compared entry by entry:

* θ is an array of shape ``(K, D)``: row ``k`` holds output ``k``'s weights, followed by its bias
  when ``bias=True`` (the bias is the *last* column);
* rows are split into ``G`` groups of ``K/G`` consecutive rows, group ``g`` reading ``Φ_g`` of
  shape ``(n_i, D)``; dense neurons have ``G = 1``, a grouped convolution ``G = groups``;
* ``n_i`` (footnote 3) is the number of rows of ``Φ``: the number of samples (all leading axes)
  for a dense neuron, the number of output pixels ``n · H_out · W_out`` for a convolution.

:meth:`weight_design` returns ``Φ`` *without* the bias column of ones, shape ``(G, n_i, D_w)``,
``D_w = D − bias``; the metric product (:mod:`lnb_fast.xp.metric`) treats the bias analytically
instead of multiplying by a column of ones. :meth:`design` appends the column (for teaching and
for the cross-checks against ``lnb_ref``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

from ..errors import StructureError
from . import _compat
from ._compat import Array


def _pair(name: str, what: str, v, minimum: int) -> tuple[int, int]:
    """``v`` or ``(v, v)`` as a pair of ints ``≥ minimum``; ValueError naming the argument."""
    pair = (v, v) if isinstance(v, Integral) else tuple(v)
    if len(pair) != 2 or any(not isinstance(p, Integral) or p < minimum for p in pair):
        raise ValueError(
            f"neuron {name!r}: {what} must be an int >= {minimum} or a pair of them, got {v!r}"
        )
    return int(pair[0]), int(pair[1])


def _positive(name: str, **values: int) -> None:
    for what, v in values.items():
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"neuron {name!r}: {what} must be a positive int, got {v!r}")


def _as_ints(neuron, *fields: str) -> None:
    """Store integral sizes (NumPy ints included) as Python ints on the frozen dataclass."""
    for f in fields:
        object.__setattr__(neuron, f, int(getattr(neuron, f)))


class Neuron:
    """Shared machinery of :class:`Dense` and :class:`Conv2d` (see the module docstring)."""

    name: str
    bias: bool
    groups: int = 1

    @property
    def theta_shape(self) -> tuple[int, int]:  # pragma: no cover - abstract
        """``(K, D)``: the shape of θ, bias last."""
        raise NotImplementedError

    def n_samples(self, X: Array) -> int:  # pragma: no cover - abstract
        """``n_i`` of Eq. 11 (footnote 3)."""
        raise NotImplementedError

    def weight_design(self, X: Array) -> Array:  # pragma: no cover - abstract
        """``Φ(X)`` without the bias column, shape ``(G, n_i, D_w)``."""
        raise NotImplementedError

    @property
    def rows_per_group(self) -> int:
        """``K / G``: rows of θ that share one design ``Φ_g``."""
        return self.theta_shape[0] // self.groups

    @property
    def row_dim(self) -> int:
        """``D``: the length of one row of θ (with the bias)."""
        return self.theta_shape[1]

    @property
    def n_weights(self) -> int:
        """``D_w = D − bias``: the columns of :meth:`weight_design`."""
        return self.theta_shape[1] - int(self.bias)

    def check_theta(self, what: str, theta: Array) -> None:
        """:class:`~lnb_fast.errors.StructureError` (a ValueError) naming the neuron if ``theta``
        is not of :attr:`theta_shape`."""
        if tuple(theta.shape) != self.theta_shape:
            raise StructureError(
                f"neuron {self.name!r}: {what} has shape {tuple(theta.shape)}, "
                f"expected {self.theta_shape} (rows = outputs, bias last)"
            )

    def grouped(self, theta: Array) -> Array:
        """θ viewed as ``(G, K/G, D)``."""
        xp = _compat.namespace(theta)
        self.check_theta("theta", theta)
        return xp.reshape(theta, (self.groups, self.rows_per_group, self.row_dim))

    def design(self, X: Array) -> Array:
        """``Φ(X)`` as :mod:`lnb_ref.neurons` builds it, ``(G, n_i, D)``, the column of ones last
        when the neuron has a bias."""
        A = self.weight_design(X)
        if not self.bias:
            return A
        xp = _compat.namespace(A)
        return _compat.concat(xp, [A, _compat.ones(xp, (*A.shape[:2], 1), A)], axis=2)


@dataclass(frozen=True)
class Dense(Neuron):
    """``f(x; θ) = W x (+ b)`` with ``θ = [W | b]`` of shape ``(d_out, d_in [+1])``.

    The input ``X`` has shape ``(..., d_in)``; every leading position is a sample, so
    ``n_i = X.size / d_in``. ``Φ = X`` reshaped to ``(1, n_i, d_in)`` (a view: no copy).
    """

    d_in: int
    d_out: int
    bias: bool = False
    name: str = "dense"

    def __post_init__(self):
        _positive(self.name, d_in=self.d_in, d_out=self.d_out)
        _as_ints(self, "d_in", "d_out")

    @property
    def theta_shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in + int(self.bias))

    def check_input(self, X: Array) -> None:
        """StructureError naming the neuron unless ``X`` has shape ``(..., d_in)``."""
        if X.ndim < 2 or X.shape[-1] != self.d_in:
            raise StructureError(
                f"neuron {self.name!r}: input has shape {tuple(X.shape)}, "
                f"expected (..., {self.d_in})"
            )

    def n_samples(self, X: Array) -> int:
        self.check_input(X)
        return math.prod(X.shape[:-1])

    def weight_design(self, X: Array) -> Array:
        xp = _compat.namespace(X)
        return xp.reshape(X, (1, self.n_samples(X), self.d_in))


@dataclass(frozen=True)
class Conv2d(Neuron):
    """2-D convolution (cross-correlation), NCHW input, like :class:`lnb_ref.neurons.Conv2d`.

    θ has shape ``(c_out, c_in/groups · kh · kw [+1])``, row ``o`` being filter ``o`` flattened
    in ``(channel, kh, kw)`` order, then its bias. The design is the im2col matrix of the input
    patches, built from ``kh · kw`` strided slices of the zero-padded input (array-API slicing
    with steps; the padding is a slice assignment into zeros, as the standard has no ``pad``).
    ``n_i = n · H_out · W_out`` (footnote 3).
    """

    c_in: int
    c_out: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    bias: bool = False
    name: str = "conv2d"

    def __post_init__(self):
        _positive(self.name, c_in=self.c_in, c_out=self.c_out, groups=self.groups)
        _as_ints(self, "c_in", "c_out", "groups")
        _pair(self.name, "kernel_size", self.kernel_size, 1)
        _pair(self.name, "stride", self.stride, 1)
        _pair(self.name, "padding", self.padding, 0)
        _pair(self.name, "dilation", self.dilation, 1)
        if self.c_in % self.groups or self.c_out % self.groups:
            raise ValueError(
                f"neuron {self.name!r}: groups={self.groups} must divide c_in={self.c_in} "
                f"and c_out={self.c_out}"
            )

    def _geometry(self):
        return (
            _pair(self.name, "kernel_size", self.kernel_size, 1),
            _pair(self.name, "stride", self.stride, 1),
            _pair(self.name, "padding", self.padding, 0),
            _pair(self.name, "dilation", self.dilation, 1),
        )

    @property
    def theta_shape(self) -> tuple[int, int]:
        (kh, kw), *_ = self._geometry()
        return (self.c_out, self.c_in // self.groups * kh * kw + int(self.bias))

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Output height and width for an ``h × w`` input (the usual convolution formula)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry()
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return ho, wo

    def check_input(self, X: Array) -> None:
        """StructureError naming the neuron unless ``X`` is ``(n, c_in, h, w)`` and large
        enough."""
        if X.ndim != 4 or X.shape[1] != self.c_in:
            raise StructureError(
                f"neuron {self.name!r}: input has shape {tuple(X.shape)}, "
                f"expected (batch, {self.c_in}, height, width)"
            )
        ho, wo = self.output_hw(X.shape[2], X.shape[3])
        if ho < 1 or wo < 1:
            raise StructureError(
                f"neuron {self.name!r}: input of spatial size {tuple(X.shape[2:])} is too small "
                f"for this kernel/stride/padding/dilation"
            )

    def n_samples(self, X: Array) -> int:
        self.check_input(X)
        return X.shape[0] * math.prod(self.output_hw(X.shape[2], X.shape[3]))

    def patches(self, X: Array) -> Array:
        """im2col: ``(n, c_in, H_out, W_out, kh·kw)``, entry ``[..., i·kw + j]`` being the input
        under kernel tap ``(i, j)`` (dilated, strided, zero-padded)."""
        self.check_input(X)
        xp = _compat.namespace(X)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry()
        n, c, h, w = X.shape
        ho, wo = self.output_hw(h, w)
        if ph or pw:
            Xp = _compat.zeros(xp, (n, c, h + 2 * ph, w + 2 * pw), X)
            Xp[:, :, ph : ph + h, pw : pw + w] = X
        else:
            Xp = X
        taps = []
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dh, j * dw
                r1, c1 = r0 + sh * (ho - 1) + 1, c0 + sw * (wo - 1) + 1
                taps.append(Xp[:, :, r0:r1:sh, c0:c1:sw])
        return xp.stack(taps, axis=-1)

    def weight_design(self, X: Array) -> Array:
        xp = _compat.namespace(X)
        P = self.patches(X)
        n, c, ho, wo, kk = P.shape
        G, cg = self.groups, self.c_in // self.groups
        # (n, G, cg, ho, wo, kk) -> (G, n, ho, wo, cg, kk) -> (G, n·ho·wo, cg·kk)
        P = xp.reshape(P, (n, G, cg, ho, wo, kk))
        P = _compat.permute_dims(xp, P, (1, 0, 3, 4, 2, 5))
        return xp.reshape(P, (G, n * ho * wo, cg * kk))
