"""Plain-JAX functional models for the paper's experiments: MLP, CNN, ViT and UNet.

No Equinox or Flax: the parameters are nested dicts of float32 ``jnp`` arrays and a model is a
pair of pure functions ``init(rng) -> params`` and ``apply(params, x) -> logits``. Nothing in
them is written for LNB: :mod:`lnb_fast` finds the neurons by itself in the traced loss
(``lnb_fast.describe(loss_fn(model), params, (x, y))`` lists them). The only conventions that
help it are the ordinary ones: every dense layer and convolution adds its bias directly to its
output (so the bias is fused with its neuron), and a LayerNorm's affine part is written
``x̂ · scale + bias`` (a scale neuron with its bias).

Images are NHWC float32 (``input_shape = (H, W, C)``); convolutions use
``lax.conv_general_dilated`` with ``("NHWC", "HWIO", "NHWC")``. Weights are Glorot-normal
(``N(0, 2 / (fan_in + fan_out))``, the paper's initialisation; for a kernel, fans include the
receptive field), biases zero, class token and position embedding ``N(0, 0.02²)``.

Example::

    model = build("cnn", (28, 28, 1), 10)
    params = model.init(np.random.default_rng(0))
    logits = model.apply(params, x)                  # (N, 10)
    loss = loss_fn(model)(params, (x, y))            # mean softmax cross-entropy
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Params = dict[str, Any]
#: Dimension numbers of every convolution: images NHWC, kernels HWIO.
CONV_DIMS = ("NHWC", "HWIO", "NHWC")
#: Activations :func:`mlp` accepts by name.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "sigmoid": jax.nn.sigmoid,
}
#: Standard deviation of the class token and the position embedding at initialisation.
EMBED_STD = 0.02
#: LayerNorm's ``ε`` in ``(x − mean) / sqrt(var + ε)``.
LN_EPS = 1e-6


class Model(NamedTuple):
    """A functional model.

    Attributes:
        name: a short description, e.g. ``"cnn(16, 32)"``.
        init: ``rng -> params``, a nested dict of float32 arrays, from a seeded
            ``np.random.Generator`` (the same seed gives the same parameters).
        apply: ``(params, x) -> logits``; ``(N, n_classes)`` for classification,
            ``(N, H, W, n_classes)`` for segmentation.
        task: ``"classification"`` or ``"segmentation"``.
    """

    name: str
    init: Callable[[np.random.Generator], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    task: str


# --- initialisers and layers ----------------------------------------------------------------------
def _f32(a: np.ndarray) -> jax.Array:
    """A float32 ``jnp`` array (whatever ``jax_enable_x64`` says)."""
    return jnp.asarray(a, dtype=jnp.float32)


def glorot_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> jax.Array:
    """Glorot-normal weights: ``N(0, 2 / (fan_in + fan_out))``.

    Args:
        rng: the generator to draw from.
        shape: ``(in, out)`` for a dense weight, ``(kh, kw, in, out)`` (HWIO) for a kernel;
            the fans are ``in`` and ``out`` times the receptive field ``kh · kw``.

    Returns:
        A float32 array of ``shape``.
    """
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    std = math.sqrt(2.0 / (fan_in + fan_out))
    return _f32(rng.normal(0.0, std, size=shape))


def dense_init(rng: np.random.Generator, d_in: int, d_out: int) -> Params:
    """``{"w": (d_in, d_out) Glorot-normal, "b": (d_out,) zeros}``."""
    return {"w": glorot_normal(rng, (d_in, d_out)), "b": _f32(np.zeros(d_out))}


def conv_init(rng: np.random.Generator, k: int, c_in: int, c_out: int) -> Params:
    """``{"w": (k, k, c_in, c_out) Glorot-normal (HWIO), "b": (c_out,) zeros}``."""
    return {"w": glorot_normal(rng, (k, k, c_in, c_out)), "b": _f32(np.zeros(c_out))}


def dense(p: Params, x: jax.Array) -> jax.Array:
    """``x @ w + b`` over the last axis of ``x`` (any leading axes)."""
    return x @ p["w"] + p["b"]


def conv(p: Params, x: jax.Array, stride: int = 1, padding: str = "SAME") -> jax.Array:
    """``conv(x, w) + b``: NHWC input, HWIO kernel, the bias added to the output channels."""
    y = lax.conv_general_dilated(x, p["w"], (stride, stride), padding, dimension_numbers=CONV_DIMS)
    return y + p["b"]


def layer_norm(p: Params | None, x: jax.Array) -> jax.Array:
    """LayerNorm over the last axis: ``x̂ = (x − mean) / sqrt(var + 1e-6)``.

    With ``p = None`` (the paper's choice) that is all; otherwise ``x̂ · p["scale"] +
    p["bias"]``.
    """
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    xhat = (x - mean) * lax.rsqrt(var + LN_EPS)
    if p is None:
        return xhat
    return xhat * p["scale"] + p["bias"]


def _image_shape(input_shape: Sequence[int], what: str) -> tuple[int, int, int]:
    """``input_shape`` as ``(H, W, C)``, or a ValueError naming the model."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{what} needs an image input_shape (H, W, C), got {tuple(input_shape)}")
    return shape[0], shape[1], shape[2]


def _as_input(params: Params, x: jax.Array) -> jax.Array:
    """``x`` in the parameters' dtype (lax convolutions do not promote)."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    return jnp.asarray(x, dtype=dtype)


# --- models ---------------------------------------------------------------------------------------
def mlp(
    in_dim: int,
    n_classes: int,
    hidden: Sequence[int] = (800, 800),
    activation: str = "tanh",
) -> Model:
    """A multilayer perceptron ``in_dim → hidden… → n_classes`` (§5.1–5.2).

    Args:
        in_dim: number of input features; the input is flattened, so ``(N, in_dim)`` and
            ``(N, H, W, C)`` with ``H·W·C = in_dim`` are both accepted.
        n_classes: number of output logits.
        hidden: widths of the hidden layers.
        activation: one of ``tanh`` (the paper's), ``relu``, ``gelu``, ``sigmoid``.

    Returns:
        A classification :class:`Model` with parameters ``{"layer0": {"w", "b"}, ...}``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    sizes = [int(in_dim), *(int(h) for h in hidden), int(n_classes)]

    def init(rng: np.random.Generator) -> Params:
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        return {f"layer{i}": dense_init(rng, a, b) for i, (a, b) in enumerate(pairs)}

    def apply(params: Params, x: jax.Array) -> jax.Array:
        h = _as_input(params, x).reshape(x.shape[0], -1)
        if h.shape[1] != sizes[0]:
            raise ValueError(f"mlp expects {sizes[0]} input features, got {h.shape[1]}")
        for i in range(len(sizes) - 1):
            h = dense(params[f"layer{i}"], h)
            if i < len(sizes) - 2:
                h = act(h)
        return h

    name = f"mlp({'-'.join(str(s) for s in sizes)}, {activation})"
    return Model(name, init, apply, "classification")


def cnn(
    input_shape: tuple[int, int, int],
    n_classes: int,
    channels: Sequence[int] = (16, 32),
    strides: Sequence[int] = (1, 2),
    kernel_size: int = 3,
) -> Model:
    """A convolutional network: ``[conv k×k (stride s) + ReLU]…``, flatten, dense (§5.2).

    Convolutions use "SAME" padding, so a stride ``s`` maps a side ``h`` to ``⌈h / s⌉``.

    Args:
        input_shape: ``(H, W, C)``.
        n_classes: number of output logits.
        channels: output channels of each convolution.
        strides: stride of each convolution (same length as ``channels``).
        kernel_size: side of every (square) kernel.

    Returns:
        A classification :class:`Model` with parameters ``{"conv0": {"w", "b"}, ...,
        "out": {"w", "b"}}``.
    """
    h, w, c = _image_shape(input_shape, "cnn")
    if len(channels) != len(strides):
        raise ValueError(f"cnn: {len(channels)} channels but {len(strides)} strides")
    for s in strides:
        h, w = -(-h // s), -(-w // s)
    flat = h * w * (channels[-1] if channels else c)

    def init(rng: np.random.Generator) -> Params:
        params, c_in = {}, c
        for i, c_out in enumerate(channels):
            params[f"conv{i}"] = conv_init(rng, kernel_size, c_in, c_out)
            c_in = c_out
        params["out"] = dense_init(rng, flat, n_classes)
        return params

    def apply(params: Params, x: jax.Array) -> jax.Array:
        y = _as_input(params, x)
        for i, s in enumerate(strides):
            y = jax.nn.relu(conv(params[f"conv{i}"], y, stride=s))
        return dense(params["out"], y.reshape(y.shape[0], -1))

    name = f"cnn({', '.join(f'{ch}/s{s}' for ch, s in zip(channels, strides, strict=True))})"
    return Model(name, init, apply, "classification")


def vit(
    input_shape: tuple[int, int, int],
    n_classes: int,
    patch: int = 4,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 128,
    layernorm_affine: bool = False,
) -> Model:
    """A Vision Transformer (§5.3): patch embedding, class token, position embedding,
    ``depth`` pre-LN blocks, final LayerNorm and a linear head on the class token.

    * patch embedding: a convolution with kernel = stride = ``patch`` ("VALID"), giving
      ``T = (H/patch)·(W/patch)`` tokens of width ``dim``;
    * ``h = concat(cls, tokens) + pos`` with ``cls: (1, 1, dim)``, ``pos: (1 + T, dim)``;
    * each block: ``h += out(MHSA(LN(h)))`` with separate ``q``, ``k``, ``v``, ``out`` dense
      projections (biases included), softmax over ``q·kᵀ / sqrt(dim / heads)``; then
      ``h += fc2(gelu(fc1(LN(h))))`` with ``fc1: dim → mlp_dim``, ``fc2: mlp_dim → dim``;
    * LayerNorm without affine parameters, as in the paper, unless ``layernorm_affine`` (then
      ``x̂ · scale + bias``, initialised to ones and zeros).

    Args:
        input_shape: ``(H, W, C)``, ``H`` and ``W`` divisible by ``patch``.
        n_classes: number of output logits.
        patch: side of the square patches.
        dim: token width (divisible by ``heads``).
        depth: number of transformer blocks.
        heads: number of attention heads.
        mlp_dim: hidden width of each block's MLP.
        layernorm_affine: give every LayerNorm a ``scale`` and a ``bias``.

    Returns:
        A classification :class:`Model` with parameters ``patch``, ``cls``, ``pos``,
        ``block0…`` (``attn.{q,k,v,out}``, ``mlp.{fc1,fc2}``, and ``ln1``, ``ln2`` if affine),
        ``ln`` (if affine) and ``head``.
    """
    h, w, c = _image_shape(input_shape, "vit")
    if h % patch or w % patch:
        raise ValueError(f"vit: input {h}×{w} is not divisible by patch size {patch}")
    if dim % heads:
        raise ValueError(f"vit: dim {dim} is not divisible by heads {heads}")
    n_tokens = 1 + (h // patch) * (w // patch)
    head_dim = dim // heads

    def ln_init() -> Params:
        """An affine LayerNorm's parameters: the identity map at initialisation."""
        return {"scale": _f32(np.ones(dim)), "bias": _f32(np.zeros(dim))}

    def init(rng: np.random.Generator) -> Params:
        params: Params = {
            "patch": conv_init(rng, patch, c, dim),
            "cls": _f32(rng.normal(0.0, EMBED_STD, size=(1, 1, dim))),
            "pos": _f32(rng.normal(0.0, EMBED_STD, size=(n_tokens, dim))),
        }
        for i in range(depth):
            block: Params = {
                "attn": {name: dense_init(rng, dim, dim) for name in ("q", "k", "v", "out")},
                "mlp": {"fc1": dense_init(rng, dim, mlp_dim), "fc2": dense_init(rng, mlp_dim, dim)},
            }
            if layernorm_affine:
                block["ln1"], block["ln2"] = ln_init(), ln_init()
            params[f"block{i}"] = block
        if layernorm_affine:
            params["ln"] = ln_init()
        params["head"] = dense_init(rng, dim, n_classes)
        return params

    def attention(p: Params, y: jax.Array) -> jax.Array:
        """Multi-head self-attention of ``y: (N, T, dim)``: per head
        ``softmax(q kᵀ / sqrt(dim / heads)) v``, heads concatenated, then ``out``."""
        n, t, _ = y.shape
        q, k, v = (dense(p[name], y).reshape(n, t, heads, head_dim) for name in ("q", "k", "v"))
        scores = jnp.einsum("nthd,nshd->nhts", q, k) / math.sqrt(head_dim)
        mixed = jnp.einsum("nhts,nshd->nthd", jax.nn.softmax(scores, axis=-1), v)
        return dense(p["out"], mixed.reshape(n, t, dim))

    def apply(params: Params, x: jax.Array) -> jax.Array:
        y = conv(params["patch"], _as_input(params, x), stride=patch, padding="VALID")
        tokens = y.reshape(y.shape[0], -1, dim)
        cls = jnp.broadcast_to(params["cls"], (tokens.shape[0], 1, dim))
        z = jnp.concatenate([cls, tokens], axis=1) + params["pos"]
        for i in range(depth):
            block = params[f"block{i}"]
            z = z + attention(block["attn"], layer_norm(block.get("ln1"), z))
            hidden = jax.nn.gelu(dense(block["mlp"]["fc1"], layer_norm(block.get("ln2"), z)))
            z = z + dense(block["mlp"]["fc2"], hidden)
        z = layer_norm(params.get("ln"), z)
        return dense(params["head"], z[:, 0])

    name = f"vit(patch {patch}, dim {dim}, depth {depth}, heads {heads}, mlp {mlp_dim}" + (
        ", affine LN)" if layernorm_affine else ")"
    )
    return Model(name, init, apply, "classification")


def unet(
    input_shape: tuple[int, int, int],
    n_classes: int,
    channels: Sequence[int] = (16, 32),
) -> Model:
    """A small UNet for segmentation (§5.4): one downsampling level with a skip connection.

    ``c0, c1 = channels``; every 3×3 convolution is followed by a ReLU::

        skip = conv_c0(conv_c0(x))                        # (N, H, W, c0)
        low  = conv_c1(conv_c1_stride2(skip))             # (N, H/2, W/2, c1)
        y    = concat(upsample×2(low), skip)              # (N, H, W, c1 + c0)
        out  = conv1×1_classes(conv_c0(conv_c0(y)))       # (N, H, W, n_classes), no ReLU

    The upsampling is nearest-neighbour (``jnp.repeat`` along H and W), the last 1×1
    convolution gives ``n_classes`` logits per pixel.

    Args:
        input_shape: ``(H, W, C)`` with ``H`` and ``W`` even.
        n_classes: number of classes per pixel.
        channels: ``(c0, c1)``, the widths at full and half resolution.

    Returns:
        A segmentation :class:`Model`: ``apply`` gives ``(N, H, W, n_classes)`` logits.
    """
    h, w, c = _image_shape(input_shape, "unet")
    if h % 2 or w % 2:
        raise ValueError(f"unet: input {h}×{w} must have even height and width")
    if len(channels) != 2:
        raise ValueError(f"unet: channels must be (c0, c1), got {tuple(channels)}")
    c0, c1 = (int(ch) for ch in channels)

    def init(rng: np.random.Generator) -> Params:
        return {
            "enc0": conv_init(rng, 3, c, c0),
            "enc1": conv_init(rng, 3, c0, c0),
            "down": conv_init(rng, 3, c0, c1),
            "mid": conv_init(rng, 3, c1, c1),
            "dec0": conv_init(rng, 3, c1 + c0, c0),
            "dec1": conv_init(rng, 3, c0, c0),
            "out": conv_init(rng, 1, c0, n_classes),
        }

    def apply(params: Params, x: jax.Array) -> jax.Array:
        relu = jax.nn.relu
        y = _as_input(params, x)
        skip = relu(conv(params["enc1"], relu(conv(params["enc0"], y))))
        low = relu(conv(params["down"], skip, stride=2))
        low = relu(conv(params["mid"], low))
        up = jnp.repeat(jnp.repeat(low, 2, axis=1), 2, axis=2)
        y = jnp.concatenate([up, skip], axis=-1)
        y = relu(conv(params["dec1"], relu(conv(params["dec0"], y))))
        return conv(params["out"], y)

    return Model(f"unet({c0}, {c1})", init, apply, "segmentation")


# --- by name, and losses --------------------------------------------------------------------------
#: Model names :func:`build` accepts.
NAMES = ("mlp", "cnn", "vit", "unet")


def build(name: str, input_shape: int | Sequence[int], n_classes: int, **overrides: Any) -> Model:
    """A model by name for inputs of ``input_shape`` and ``n_classes`` outputs.

    Args:
        name: ``"mlp"``, ``"cnn"``, ``"vit"`` or ``"unet"``.
        input_shape: ``(H, W, C)`` (the MLP also takes a feature count, and flattens an image).
        n_classes: number of classes.
        **overrides: keyword arguments of :func:`mlp`, :func:`cnn`, :func:`vit`, :func:`unet`.

    Returns:
        The :class:`Model`.

    Raises:
        ValueError: for an unknown name (the message lists :data:`NAMES`) or a shape the model
            cannot take.
    """
    if name == "mlp":
        dims = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
        return mlp(int(np.prod(dims)), n_classes, **overrides)
    if name in ("cnn", "vit", "unet"):
        if isinstance(input_shape, int):
            raise ValueError(f"{name} needs an image input_shape (H, W, C), got {input_shape}")
        return {"cnn": cnn, "vit": vit, "unet": unet}[name](
            tuple(input_shape), n_classes, **overrides
        )
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(NAMES)}")


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over every position of ``−log softmax(logits)[label]`` (classes on the last axis)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1))


def classification_loss(model: Model) -> Callable[[Params, tuple[jax.Array, jax.Array]], jax.Array]:
    """``(params, (x, y)) -> mean_n −log softmax(apply(params, x)_n)[y_n]``, ``y`` integer
    labels ``(N,)``."""

    def loss(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        return _cross_entropy(model.apply(params, x), y)

    return loss


def segmentation_loss(model: Model) -> Callable[[Params, tuple[jax.Array, jax.Array]], jax.Array]:
    """``(params, (x, y)) ->`` softmax cross-entropy averaged over images and pixels; ``y``
    integer masks ``(N, H, W)``, logits ``(N, H, W, n_classes)``."""

    def loss(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        return _cross_entropy(model.apply(params, x), y)

    return loss


def loss_fn(model: Model) -> Callable[[Params, tuple[jax.Array, jax.Array]], jax.Array]:
    """:func:`classification_loss` or :func:`segmentation_loss`, by ``model.task``."""
    if model.task == "classification":
        return classification_loss(model)
    if model.task == "segmentation":
        return segmentation_loss(model)
    raise ValueError(f"unknown task {model.task!r}; expected classification or segmentation")
