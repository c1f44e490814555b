"""Linear neurons: functions ``f(X; θ)`` that are linear in their parameters θ (paper §3.1).

A *neuron* in the paper is the linear part of a layer, without its nonlinearity. What makes
Linear Neuron Boosting work is that every neuron here can be written as a **design matrix times
the parameters**::

    f(X; θ) = Φ(X) θ          (per group g:  out_g = Φ_g(X) θ_gᵀ)

where the design ``Φ(X)`` depends only on the input features ``X``. For a dense layer Φ is X
itself (with a column of ones for the bias); for a convolution it is the matrix of the filter's
spatial patches (im2col); for an elementwise scale every feature is its own one-column design.
Everything the optimizer needs follows from Φ:

* the output, ``Φ θ`` (forward),
* the gradient, ``g = Φᵀ λ`` where λ is the error backpropagated to the output (Eq. 6–7),
* the metric, ``M = Φᵀ Φ / n_i`` (Eq. 10–11), with ``n_i`` per footnote 3.

Parameters are stored **as the design sees them**: an array of shape ``(K, D)`` whose row ``k``
holds output ``k``'s weights (and its bias in the last column when ``bias=True``). Rows are split
into ``G`` groups of ``K // G`` consecutive rows; group ``g`` reads design ``Φ_g`` of shape
``(n_i, D)``. Dense neurons have ``G = 1``; a grouped convolution has ``G = groups``; an
elementwise scale over ``d`` features has ``G = d`` groups of one row and ``D = 1``. So the metric
of every neuron is block diagonal, ``M = blockdiag_g(I_{K/G} ⊗ C_g)`` with ``C_g = Φ_gᵀ Φ_g / n_i``
(see :mod:`lnb_ref.metric`).

A neuron whose Jacobian is the identity (additive embedding) has no design: its metric is the
identity and LNB uses ``θ̂ = g`` (§3.3, last paragraph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import NeuronShapeError, check_shape


class LinearNeuron:
    """Base class. Subclasses define `theta_shape`, `design`, `n_samples` and the output layout.

    Attributes:
        name: how errors and tables refer to this neuron.
        bias: whether the last column of θ multiplies a constant feature 1.
        groups: ``G``, the number of independent row blocks (see the module docstring).
    """

    name: str
    bias: bool = False
    groups: int = 1
    identity_metric: bool = False
    kind: str = "linear"

    # --- what a subclass defines -------------------------------------------------------------
    @property
    def theta_shape(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        """Shape of θ as the design sees it: ``(K, D)`` (``(d,)`` for a scale)."""
        raise NotImplementedError

    def check_input(self, X: np.ndarray) -> None:  # pragma: no cover - abstract
        """Raise :class:`~lnb_ref.errors.NeuronShapeError` naming the neuron if X cannot be fed."""
        raise NotImplementedError

    def design(self, X: np.ndarray) -> np.ndarray:
        """The design Φ(X), shape ``(G, n_i, D)``, such that ``f(X; θ) = Φ θ`` (per group)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def n_samples(self, X: np.ndarray) -> int:
        """``n_i`` of Eq. 11: the number of rows of Φ (footnote 3)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _to_rows(self, out: np.ndarray) -> np.ndarray:
        """Output in its natural layout -> ``(G, n_i, K/G)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _from_rows(self, rows: np.ndarray, X: np.ndarray) -> np.ndarray:
        """``(G, n_i, K/G)`` -> output in its natural layout."""
        raise NotImplementedError  # pragma: no cover - abstract

    # --- shared machinery --------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """``P``: the number of parameters, the size of the materialised metric ``P × P``."""
        return math.prod(self.theta_shape)

    @property
    def rows_per_group(self) -> int:
        """``K / G``: rows of θ that share one design ``Φ_g`` (and one ``C_g``)."""
        return self.theta_shape[0] // self.groups

    @property
    def row_dim(self) -> int:
        """``D``: the length of one row of θ (features per output, plus 1 with a bias)."""
        return self.theta_shape[-1]

    def grouped(self, theta: np.ndarray) -> np.ndarray:
        """θ of shape ``theta_shape`` viewed as ``(G, K/G, D)``."""
        check_shape(self.name, "parameters", theta, self.theta_shape)
        return np.reshape(theta, (self.groups, self.rows_per_group, self.row_dim))

    def bias_mask(self) -> np.ndarray:
        """Boolean array of ``theta_shape``: True on the bias entries (excluded from the ridge)."""
        mask = np.zeros(self.theta_shape, dtype=bool)
        if self.bias:
            mask[..., -1] = True
        return mask

    def forward(self, X: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """``f(X; θ) = Φ(X) θ``: the neuron's output."""
        rows = np.einsum("gnd,gkd->gnk", self.design(X), self.grouped(theta))
        return self._from_rows(rows, X)

    def vjp_theta(self, X: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
        """``g_i = (∂x_i/∂θ_i)ᵀ λ_i = Φᵀ λ`` (Eq. 6): the gradient of the loss w.r.t. θ, given
        the error λ backpropagated to this neuron's output (same shape as the output)."""
        lam = self._to_rows(cotangent)
        return np.einsum("gnd,gnk->gkd", self.design(X), lam).reshape(self.theta_shape)

    def vjp_input(self, X: np.ndarray, theta: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
        """``(∂x_i/∂x_{i-1})ᵀ λ``: the error passed on to the neuron's input (Eq. 6)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, theta_shape={self.theta_shape})"


@dataclass(frozen=True, repr=False)
class Dense(LinearNeuron):
    """``f(x; θ) = W x`` or ``W x + b``, with ``θ = [W | b]`` of shape ``(d_out, d_in [+1])``.

    The input may have any leading dimensions (a batch, or a batch of tokens): every leading
    position is one sample, so ``n_i`` is their product (footnote 3).
    """

    name: str
    d_in: int
    d_out: int
    bias: bool = False
    kind = "dense"

    @property
    def theta_shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in + int(self.bias))

    def check_input(self, X: np.ndarray) -> None:
        if np.ndim(X) < 2 or np.shape(X)[-1] != self.d_in:
            raise NeuronShapeError(
                f"neuron {self.name!r}: input has shape {np.shape(X)}, expected (..., {self.d_in})"
            )

    def n_samples(self, X: np.ndarray) -> int:
        self.check_input(X)
        return math.prod(np.shape(X)[:-1])

    def design(self, X: np.ndarray) -> np.ndarray:
        self.check_input(X)
        flat = np.reshape(X, (-1, self.d_in))
        if self.bias:
            flat = np.concatenate([flat, np.ones((flat.shape[0], 1), dtype=flat.dtype)], axis=1)
        return flat[None]

    def _to_rows(self, out: np.ndarray) -> np.ndarray:
        return np.reshape(out, (1, -1, self.d_out))

    def _from_rows(self, rows: np.ndarray, X: np.ndarray) -> np.ndarray:
        return np.reshape(rows[0], (*np.shape(X)[:-1], self.d_out))

    def vjp_input(self, X, theta, cotangent):
        W = np.asarray(theta)[:, : self.d_in]
        return cotangent @ W


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True, repr=False)
class Conv2d(LinearNeuron):
    """2-D convolution (cross-correlation, as in deep-learning libraries), NCHW layout.

    θ has shape ``(c_out, c_in/groups · kh · kw [+1])``: row ``o`` is filter ``o`` flattened in
    ``(channel, kh, kw)`` order, followed by its bias. :meth:`filters` gives the usual
    ``(c_out, c_in/groups, kh, kw)`` view. The design Φ is the matrix of input patches (im2col),
    built with :func:`numpy.lib.stride_tricks.sliding_window_view`; ``n_i`` is the number of
    output pixels in the batch, ``n · H_out · W_out`` (footnote 3).
    """

    name: str
    c_in: int
    c_out: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    bias: bool = False
    kind = "conv2d"

    def __post_init__(self):
        if self.c_in % self.groups or self.c_out % self.groups:
            raise NeuronShapeError(
                f"neuron {self.name!r}: groups={self.groups} must divide c_in={self.c_in} "
                f"and c_out={self.c_out}"
            )

    @property
    def theta_shape(self) -> tuple[int, int]:
        kh, kw = _pair(self.kernel_size)
        return (self.c_out, self.c_in // self.groups * kh * kw + int(self.bias))

    def filters(self, theta: np.ndarray) -> np.ndarray:
        """The weights as ``(c_out, c_in/groups, kh, kw)`` (bias dropped)."""
        kh, kw = _pair(self.kernel_size)
        W = np.asarray(theta)[:, : self.theta_shape[1] - int(self.bias)]
        return W.reshape(self.c_out, self.c_in // self.groups, kh, kw)

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Output height and width for an input of ``h × w`` (the usual convolution formula)."""
        (kh, kw), (sh, sw) = _pair(self.kernel_size), _pair(self.stride)
        (ph, pw), (dh, dw) = _pair(self.padding), _pair(self.dilation)
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return ho, wo

    def check_input(self, X: np.ndarray) -> None:
        if np.ndim(X) != 4 or np.shape(X)[1] != self.c_in:
            raise NeuronShapeError(
                f"neuron {self.name!r}: input has shape {np.shape(X)}, "
                f"expected (batch, {self.c_in}, height, width)"
            )
        ho, wo = self.output_hw(*np.shape(X)[2:])
        if ho < 1 or wo < 1:
            raise NeuronShapeError(
                f"neuron {self.name!r}: input of spatial size {np.shape(X)[2:]} is too small "
                f"for this kernel/stride/padding/dilation"
            )

    def n_samples(self, X: np.ndarray) -> int:
        self.check_input(X)
        return np.shape(X)[0] * math.prod(self.output_hw(*np.shape(X)[2:]))

    def patches(self, X: np.ndarray) -> np.ndarray:
        """im2col: array ``(n, c_in, H_out, W_out, kh, kw)`` of the receptive fields."""
        self.check_input(X)
        (kh, kw), (sh, sw) = _pair(self.kernel_size), _pair(self.stride)
        (ph, pw), (dh, dw) = _pair(self.padding), _pair(self.dilation)
        Xp = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        windows = sliding_window_view(Xp, span, axis=(2, 3))  # (n, c, H', W', span_h, span_w)
        ho, wo = self.output_hw(*np.shape(X)[2:])
        return windows[:, :, : ho * sh : sh, : wo * sw : sw, ::dh, ::dw]

    def design(self, X: np.ndarray) -> np.ndarray:
        P = self.patches(X)
        n, c, ho, wo, kh, kw = P.shape
        G, cg = self.groups, self.c_in // self.groups
        # (n, G, cg, ho, wo, kh, kw) -> (G, n, ho, wo, cg, kh, kw) -> (G, n·ho·wo, cg·kh·kw)
        P = P.reshape(n, G, cg, ho, wo, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
        Phi = P.reshape(G, n * ho * wo, cg * kh * kw)
        if self.bias:
            Phi = np.concatenate([Phi, np.ones((*Phi.shape[:2], 1), dtype=Phi.dtype)], axis=2)
        return Phi

    def _to_rows(self, out: np.ndarray) -> np.ndarray:
        n, k, ho, wo = np.shape(out)
        G = self.groups
        rows = np.reshape(out, (n, G, k // G, ho, wo)).transpose(1, 0, 3, 4, 2)
        return rows.reshape(G, n * ho * wo, k // G)

    def _from_rows(self, rows: np.ndarray, X: np.ndarray) -> np.ndarray:
        n = np.shape(X)[0]
        ho, wo = self.output_hw(*np.shape(X)[2:])
        G, _, kg = rows.shape
        out = rows.reshape(G, n, ho, wo, kg).transpose(1, 0, 4, 2, 3)
        return out.reshape(n, G * kg, ho, wo)

    def vjp_input(self, X, theta, cotangent):
        """col2im: scatter every patch's error back onto the input pixels it was read from."""
        (kh, kw), (sh, sw) = _pair(self.kernel_size), _pair(self.stride)
        (ph, pw), (dh, dw) = _pair(self.padding), _pair(self.dilation)
        n, _, h, w = np.shape(X)
        ho, wo = self.output_hw(h, w)
        G, cg, kg = self.groups, self.c_in // self.groups, self.c_out // self.groups
        filt = self.filters(theta).reshape(G, kg, cg, kh, kw)
        lam = np.reshape(cotangent, (n, G, kg, ho, wo))
        # error on each patch entry: (n, G, cg, kh, kw, ho, wo)
        dpatch = np.einsum("ngkyx,gkcij->ngcijyx", lam, filt)
        dXp = np.zeros((n, G, cg, h + 2 * ph, w + 2 * pw), dtype=np.result_type(X, cotangent))
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dh, j * dw
                dXp[..., r0 : r0 + sh * ho : sh, c0 : c0 + sw * wo : sw] += dpatch[:, :, :, i, j]
        dXp = dXp.reshape(n, self.c_in, h + 2 * ph, w + 2 * pw)
        return dXp[:, :, ph : ph + h, pw : pw + w]


@dataclass(frozen=True, repr=False)
class Scale(LinearNeuron):
    """Elementwise scale ``f(x; θ) = x ⊙ θ`` over the last axis (e.g. LayerNorm's gain).

    θ has shape ``(d,)``; each feature is its own group with a one-column design, so the metric is
    ``diag(E[x ⊙ x])`` and LNB divides each gradient entry by the feature's second moment.
    """

    name: str
    d: int
    kind = "scale"

    @property
    def groups(self) -> int:  # type: ignore[override]
        return self.d

    @property
    def theta_shape(self) -> tuple[int]:
        return (self.d,)

    @property
    def rows_per_group(self) -> int:
        return 1

    @property
    def row_dim(self) -> int:
        return 1

    def check_input(self, X: np.ndarray) -> None:
        if np.ndim(X) < 2 or np.shape(X)[-1] != self.d:
            raise NeuronShapeError(
                f"neuron {self.name!r}: input has shape {np.shape(X)}, expected (..., {self.d})"
            )

    def n_samples(self, X: np.ndarray) -> int:
        self.check_input(X)
        return math.prod(np.shape(X)[:-1])

    def design(self, X: np.ndarray) -> np.ndarray:
        self.check_input(X)
        return np.reshape(X, (-1, self.d)).T[:, :, None]

    def _to_rows(self, out: np.ndarray) -> np.ndarray:
        return np.reshape(out, (-1, self.d)).T[:, :, None]

    def _from_rows(self, rows: np.ndarray, X: np.ndarray) -> np.ndarray:
        return np.reshape(rows[:, :, 0].T, np.shape(X))

    def vjp_input(self, X, theta, cotangent):
        return cotangent * np.asarray(theta)


@dataclass(frozen=True, repr=False)
class Embedding(LinearNeuron):
    """Additive embedding ``f(x; θ) = x + θ`` (a ViT's position embedding), θ broadcast over the
    batch axis. Its Jacobian is the identity for each sample, so with ``n_i`` the batch size the
    metric is the identity and LNB skips the solver: ``θ̂ = g`` (§3.3, last paragraph).

    This neuron is *affine*, not linear, in θ; the generic metric construction therefore uses
    ``f(X; e_j) − f(X; 0)`` as column j of the Jacobian, which is the same thing for linear ones.
    """

    name: str
    shape: tuple[int, ...]
    kind = "embedding"
    identity_metric = True

    @property
    def theta_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)

    def check_input(self, X: np.ndarray) -> None:
        if tuple(np.shape(X)[1:]) != tuple(self.shape):
            raise NeuronShapeError(
                f"neuron {self.name!r}: input has shape {np.shape(X)}, "
                f"expected (batch, {', '.join(map(str, self.shape))})"
            )

    def n_samples(self, X: np.ndarray) -> int:
        self.check_input(X)
        return np.shape(X)[0]

    def design(self, X):
        raise TypeError(f"neuron {self.name!r} has an identity metric and no design matrix")

    def bias_mask(self) -> np.ndarray:
        return np.zeros(self.theta_shape, dtype=bool)

    def forward(self, X: np.ndarray, theta: np.ndarray) -> np.ndarray:
        self.check_input(X)
        check_shape(self.name, "parameters", theta, self.theta_shape)
        return X + theta[None]

    def vjp_theta(self, X: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
        return np.sum(cotangent, axis=0)

    def vjp_input(self, X, theta, cotangent):
        return cotangent
