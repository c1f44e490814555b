"""Small networks with hand-written backprop: an MLP and a CNN (paper §3.1, Eq. 6).

A network here is a chain of linear neurons (:mod:`lnb_ref.neurons`), each followed by an
elementwise activation σ_i::

    X_0 = data,      z_i = f_i(X_i; θ_i),      a_i = σ_i(z_i),      X_{i+1} = a_i (flattened
                                                                    if the next neuron is Dense)

and a loss ℓ on the last output. Backprop is Eq. 6 of the paper, written out by hand in
:meth:`Network.loss_grads_features`: starting from λ = ∂ℓ/∂(output), walk the layers backwards,

    λ on z_i      = σ_i'(z_i) ⊙ (λ on a_i)                   (through the activation)
    g_i           = (∂z_i/∂θ_i)ᵀ λ  = neuron.vjp_theta(X_i, λ)      (the gradient, Φᵀλ)
    λ on a_{i-1}  = (∂z_i/∂X_i)ᵀ λ  = neuron.vjp_input(X_i, θ_i, λ)  (the error passed down)

The linear algebra lives in the neurons; this module only strings them together, in the spirit
of micrograd / minitorch. Besides the gradients, a training step needs every neuron's input
features ``X_i`` (LNB builds its metric ``M_i = Φ(X_i)ᵀΦ(X_i)/n_i`` from them, Eq. 10–11), so the
forward pass keeps them and :meth:`Network.loss_grads_features` returns them.

Every network has the same interface, used by the optimizers::

    net.neurons                                   # the linear neurons, input side first
    params = net.init(rng)                        # one θ per neuron, shape neuron.theta_shape
    loss, grads, features = net.loss_grads_features(params, X, Y)   # one forward, one backward
    params, state, info = optimizer.step(params, grads, features, state)

Validation: parameters and inputs of the wrong shape raise
:class:`~lnb_ref.errors.NeuronShapeError`, non-finite data raises
:class:`~lnb_ref.errors.NonFiniteError`, each naming the neuron concerned. Non-finite
*parameters* are not rejected here: they give a non-finite loss, which is how a training loop
(e.g. :func:`lnb_ref.matfact.run`) detects that a run diverged; the optimizers check parameters
and gradients themselves before taking a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import numpy as np

from .errors import NeuronShapeError, check_finite, check_shape
from .neurons import Conv2d, Dense, LinearNeuron, _pair

# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


class Activation(NamedTuple):
    """An elementwise nonlinearity ``a = fn(z)`` and its derivative ``grad(z, a) = σ'(z)``.

    ``grad`` receives both the pre-activation ``z`` and the output ``a`` so that each derivative
    can use whichever is cheaper (``tanh' = 1 − a²``, ``relu' = [z > 0]``).
    """

    fn: Callable[[np.ndarray], np.ndarray]
    grad: Callable[[np.ndarray, np.ndarray], np.ndarray]


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(np.tanh, lambda z, a: 1.0 - a * a),
    # The derivative at the kink z = 0 is taken as 0 (as in every deep-learning library).
    "relu": Activation(lambda z: np.maximum(z, 0.0), lambda z, a: (z > 0).astype(z.dtype)),
    "identity": Activation(lambda z: z, lambda z, a: np.ones_like(z)),
    # The logistic function 1/(1 + e^{-z}), written with tanh so that it cannot overflow.
    "sigmoid": Activation(lambda z: 0.5 * (1.0 + np.tanh(0.5 * z)), lambda z, a: a * (1.0 - a)),
}


def get_activation(name: str) -> Activation:
    """The activation called ``name``; ValueError listing the valid names otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------
# Losses: each returns the loss value and λ = ∂ℓ/∂(network output), the start of backprop.
# --------------------------------------------------------------------------------------------


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of integer ``labels`` (shape ``(n,)``) under ``softmax(logits)``.

    ``ℓ = (1/n) Σ_n [logsumexp(z_n) − z_{n, y_n}]``, computed with the log-sum-exp shifted by the
    row maximum so that large logits cannot overflow. Its gradient is
    ``∂ℓ/∂z = (softmax(z) − onehot(y)) / n``.

    Returns:
        ``(ℓ, ∂ℓ/∂logits)``.
    """
    n = logits.shape[0]
    shifted = logits - np.max(logits, axis=1, keepdims=True)
    log_norm = np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    log_probs = shifted - log_norm  # log-softmax, every entry <= 0
    rows = np.arange(n)
    loss = -float(np.mean(log_probs[rows, labels]))
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1.0
    return loss, grad / n


def mean_squared_error(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """``ℓ = (1/n) Σ_n ‖ŷ_n − y_n‖²``: a mean over samples of the *sum* over outputs (no ½).

    This is the loss of the matrix-factorization problem (§5.1). Its gradient is
    ``∂ℓ/∂ŷ = 2 (ŷ − y) / n``.

    Returns:
        ``(ℓ, ∂ℓ/∂pred)``.
    """
    n = pred.shape[0]
    residual = pred - target
    return float(np.sum(residual * residual) / n), 2.0 * residual / n


LOSSES: dict[str, Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]] = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "mse": mean_squared_error,
}


def get_loss(name: str) -> Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]:
    """The loss called ``name``; ValueError listing the valid names otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return LOSSES[name]


# --------------------------------------------------------------------------------------------
# Initialization
# --------------------------------------------------------------------------------------------

INIT_SCHEMES = ("glorot_normal", "he_normal", "normal")


def fans(neuron: LinearNeuron) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a Dense or Conv2d neuron, as in PyTorch.

    Dense: ``(d_in, d_out)``. Conv2d: ``(c_in/groups · kh · kw, c_out · kh · kw)``: every output
    pixel reads ``fan_in`` inputs, and every input pixel feeds ``fan_out`` outputs.
    """
    if isinstance(neuron, Dense):
        return neuron.d_in, neuron.d_out
    if isinstance(neuron, Conv2d):
        kh, kw = _pair(neuron.kernel_size)
        return neuron.c_in // neuron.groups * kh * kw, neuron.c_out * kh * kw
    raise TypeError(f"neuron {neuron.name!r}: no fan-in/fan-out for a {type(neuron).__name__}")


def init_theta(neuron: LinearNeuron, rng: np.random.Generator, scheme: str) -> np.ndarray:
    """One θ of shape ``neuron.theta_shape``: normal weights, biases zero.

    Schemes (standard deviation of the weights):
        ``"glorot_normal"``: ``√(2 / (fan_in + fan_out))`` (Glorot & Bengio, 2010);
        ``"he_normal"``: ``√(2 / fan_in)`` (He et al., 2015), for ReLU networks;
        ``"normal"``: 1, standard normal entries (the matrix-factorization problem, §5.1).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; valid names: {', '.join(INIT_SCHEMES)}")
    if scheme == "normal":
        std = 1.0
    elif scheme == "glorot_normal":
        fan_in, fan_out = fans(neuron)
        std = math.sqrt(2.0 / (fan_in + fan_out))
    else:  # he_normal
        std = math.sqrt(2.0 / fans(neuron)[0])
    theta = np.zeros(neuron.theta_shape)
    n_weights = neuron.theta_shape[-1] - int(neuron.bias)
    theta[..., :n_weights] = rng.normal(0.0, std, size=(*neuron.theta_shape[:-1], n_weights))
    return theta


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


@dataclass
class Record:
    """What the forward pass remembers about layer ``i`` for the backward pass.

    Attributes:
        features: ``X_i``, the exact array passed as ``X`` to ``neurons[i].forward``.
        pre: ``z_i = f_i(X_i; θ_i)``, the neuron's output (the pre-activation).
        post: ``a_i = σ_i(z_i)``, the layer's output, before any flatten.
    """

    features: np.ndarray
    pre: np.ndarray
    post: np.ndarray


@dataclass
class Tape:
    """Everything one forward and backward pass computed (:meth:`Network.backprop`).

    Attributes:
        loss: ℓ, a mean over the samples.
        records: the forward pass, one :class:`Record` per neuron.
        errors_pre: ``λ_i = ∂ℓ/∂z_i`` on each neuron's output (Eq. 6–7), shaped like ``z_i``.
        errors_post: ``∂ℓ/∂a_i`` on each layer's output after its activation.
        grads: ``g_i = Φ(X_i)ᵀ λ_i``, each of ``neurons[i].theta_shape``.
    """

    loss: float
    records: list[Record]
    errors_pre: list[np.ndarray]
    errors_post: list[np.ndarray]
    grads: list[np.ndarray]

    @property
    def features(self) -> list[np.ndarray]:
        """``X_i``, the input of every neuron."""
        return [rec.features for rec in self.records]


class Network:
    """A chain of linear neurons with activations and a loss; the base of :class:`MLP` and
    :class:`CNN`. Subclasses build ``neurons``, ``activations`` (one name per neuron) and
    ``input_shape`` (the shape of one sample), then call :meth:`_setup_loss`.

    Between layers, a 4-D output followed by a Dense neuron is flattened to ``(n, features)``;
    that flattened array is the Dense neuron's input ``X_i``.
    """

    neurons: list[LinearNeuron]
    activations: list[str]
    input_shape: tuple[int, ...]
    loss_name: str

    def _setup_loss(self, loss: str) -> None:
        self._loss_fn = get_loss(loss)
        self.loss_name = loss

    # --- validation ---------------------------------------------------------------------------
    @property
    def output_neuron(self) -> LinearNeuron:
        """The last neuron, which produces the network's output."""
        return self.neurons[-1]

    @property
    def n_outputs(self) -> int:
        """The width of the output (number of classes for cross-entropy)."""
        return self.output_neuron.theta_shape[0]

    def check_params(self, params: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One float64 array per neuron, each of the neuron's ``theta_shape``."""
        if len(params) != len(self.neurons):
            raise NeuronShapeError(
                f"got {len(params)} parameter arrays for {len(self.neurons)} neurons "
                f"({', '.join(n.name for n in self.neurons)})"
            )
        out = []
        for neuron, theta in zip(self.neurons, params, strict=True):
            theta = np.asarray(theta, dtype=np.float64)
            check_shape(neuron.name, "parameters", theta, neuron.theta_shape)
            out.append(theta)
        return out

    def check_input(self, X: np.ndarray) -> np.ndarray:
        """``X`` as float64 of shape ``(n, *input_shape)`` with ``n ≥ 1``, all finite."""
        X = np.asarray(X, dtype=np.float64)
        first = self.neurons[0].name
        if X.ndim != 1 + len(self.input_shape) or X.shape[1:] != self.input_shape or not len(X):
            raise NeuronShapeError(
                f"neuron {first!r}: input has shape {X.shape}, "
                f"expected (batch, {', '.join(map(str, self.input_shape))}) with batch >= 1"
            )
        check_finite(first, "input features", X)
        return X

    def check_targets(self, Y: np.ndarray, n: int) -> np.ndarray:
        """Targets for ``n`` samples: integer labels in ``[0, n_outputs)`` of shape ``(n,)`` for
        cross-entropy, finite floats of the output's shape ``(n, n_outputs)`` for ``"mse"``."""
        name, k = self.output_neuron.name, self.n_outputs
        Y = np.asarray(Y)
        if self.loss_name == "softmax_cross_entropy":
            return check_labels(name, Y, n, k)
        Y = Y.astype(np.float64, copy=False)
        check_shape(name, "targets", Y, (n, k))
        check_finite(name, "targets", Y)
        return Y

    # --- forward --------------------------------------------------------------------------------
    def forward(self, params: Sequence[np.ndarray], X: np.ndarray, ensembles=None) -> list[Record]:
        """Run the layers on ``X`` and return one :class:`Record` per neuron (the tape).

        The network output is ``records[-1].post``. Parameters and input are validated.
        ``ensembles`` (boosted backprop, :mod:`lnb_ref.boosting`): per layer, a list of
        ``(c, h)`` weak learners whose ``c·h(X_i)`` are added to ``z_i``.
        """
        params = self.check_params(params)
        h = self.check_input(X)
        records = []
        for i, (neuron, theta, act) in enumerate(
            zip(self.neurons, params, self.activations, strict=True)
        ):
            if isinstance(neuron, Dense) and h.ndim > 2:
                h = h.reshape(h.shape[0], -1)  # flatten (n, c, h, w) -> (n, c·h·w)
            z = neuron.forward(h, theta)
            for c, learner in ensembles[i] if ensembles else ():
                z = z + c * learner(h)
            a = get_activation(act).fn(z)
            records.append(Record(features=h, pre=z, post=a))
            h = a
        return records

    def predict(self, params: Sequence[np.ndarray], X: np.ndarray) -> np.ndarray:
        """The network output for ``X`` (logits, for cross-entropy), shape ``(n, n_outputs)``."""
        return self.forward(params, X)[-1].post

    def loss(self, params: Sequence[np.ndarray], X: np.ndarray, Y: np.ndarray) -> float:
        """The loss ℓ on ``(X, Y)``, a mean over the samples."""
        out = self.predict(params, X)
        return self._loss_fn(out, self.check_targets(Y, out.shape[0]))[0]

    def accuracy(self, params: Sequence[np.ndarray], X: np.ndarray, Y: np.ndarray) -> float:
        """Fraction of samples whose largest output is at the integer label ``Y``."""
        out = self.predict(params, X)
        Y = check_labels(self.output_neuron.name, np.asarray(Y), out.shape[0], self.n_outputs)
        return float(np.mean(np.argmax(out, axis=1) == Y))

    # --- forward + backward ---------------------------------------------------------------------
    def backprop(
        self, params: Sequence[np.ndarray], X: np.ndarray, Y: np.ndarray, ensembles=None
    ) -> Tape:
        """One forward and one backward pass (Eq. 6), keeping every error on the way.

        Backprop walks the layers from the output to the input with the error λ (Eq. 6)::

            λ on z_i      = σ_i'(z_i) ⊙ (λ on a_i)             (through the activation)
            g_i           = (∂z_i/∂θ_i)ᵀ λ = neuron.vjp_theta(X_i, λ)       (Φᵀλ)
            λ on a_{i-1}  = (∂z_i/∂X_i)ᵀ λ = neuron.vjp_input(X_i, θ_i, λ)  (passed down)

        The error on the neuron's output ``z_i`` is the paper's ``λ_i`` (Eq. 7): the regression
        target of neuron ``i``'s weak learner (Eq. 8). Both errors are per-sample rows of the
        *mean* loss's gradient, so they carry its ``1/n``. With ``ensembles`` (see
        :meth:`forward`) the error passed down also gets ``Σ_t c_t (∂h_{i,t}/∂X_i)ᵀ λ``.

        Returns:
            a :class:`Tape` with the loss, the forward records, ``errors_pre[i] = ∂ℓ/∂z_i``,
            ``errors_post[i] = ∂ℓ/∂a_i`` and ``grads[i] = g_i`` (``neurons[i].theta_shape``).
        """
        params = self.check_params(params)
        records = self.forward(params, X, ensembles)
        Y = self.check_targets(Y, records[-1].post.shape[0])
        loss, lam = self._loss_fn(records[-1].post, Y)  # λ = ∂ℓ/∂a_last
        m = len(self.neurons)
        grads: list[np.ndarray] = [np.empty(0)] * m
        pre: list[np.ndarray] = [np.empty(0)] * m
        post: list[np.ndarray] = [np.empty(0)] * m
        for i in reversed(range(m)):
            neuron, rec = self.neurons[i], records[i]
            post[i] = lam
            lam = get_activation(self.activations[i]).grad(rec.pre, rec.post) * lam  # on z_i
            pre[i] = lam
            grads[i] = neuron.vjp_theta(rec.features, lam)  # g_i = Φ(X_i)ᵀ λ
            if i > 0:  # the error on X_i, i.e. on a_{i-1} (un-flattened if needed)
                down = neuron.vjp_input(rec.features, params[i], lam)
                for c, learner in ensembles[i] if ensembles else ():
                    down = down + c * learner.vjp_input(rec.features, lam)
                lam = down.reshape(records[i - 1].post.shape)
        return Tape(loss, records, pre, post, grads)

    def loss_grads_features(
        self, params: Sequence[np.ndarray], X: np.ndarray, Y: np.ndarray
    ) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
        """One forward and one backward pass (Eq. 6, see :meth:`backprop`).

        Returns:
            ``(loss, grads, features)``: ``grads[i]`` has ``neurons[i].theta_shape``, and
            ``features[i]`` is ``X_i``, the exact array passed to ``neurons[i].forward``.
        """
        tape = self.backprop(params, X, Y)
        return tape.loss, tape.grads, tape.features

    # --- parameters -----------------------------------------------------------------------------
    def init(self, rng: np.random.Generator, scheme: str = "glorot_normal") -> list[np.ndarray]:
        """One θ per neuron (see :func:`init_theta` for the schemes): normal weights, biases
        zero, drawn from ``rng`` neuron by neuron, input side first."""
        return [init_theta(neuron, rng, scheme) for neuron in self.neurons]

    @property
    def n_params(self) -> int:
        """Total number of parameters."""
        return sum(neuron.n_params for neuron in self.neurons)

    def __repr__(self) -> str:
        layers = ", ".join(
            f"{n.name}{n.theta_shape}+{a}"
            for n, a in zip(self.neurons, self.activations, strict=True)
        )
        return f"{type(self).__name__}([{layers}], loss={self.loss_name!r})"


def check_labels(name: str, Y: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    """Integer labels of shape ``(n,)`` in ``[0, n_classes)`` for output neuron ``name``."""
    if not np.issubdtype(Y.dtype, np.integer):
        raise NeuronShapeError(f"neuron {name!r}: labels must be integers, got dtype {Y.dtype}")
    check_shape(name, "labels", Y, (n,))
    if Y.size and (Y.min() < 0 or Y.max() >= n_classes):
        raise NeuronShapeError(
            f"neuron {name!r}: labels must lie in [0, {n_classes}), "
            f"got values in [{Y.min()}, {Y.max()}]"
        )
    return Y


class MLP(Network):
    """A multilayer perceptron: Dense neurons ``"dense0"``, ``"dense1"``, ... .

    ``sizes = [d_0, d_1, ..., d_L]`` gives ``L`` Dense neurons, neuron ``i`` mapping ``d_i``
    features to ``d_{i+1}``. Every hidden layer is followed by ``activation``; the last one by
    ``output_activation`` (None: no activation, so the output is the logits for cross-entropy).

    Args:
        sizes: layer widths, input first; at least two.
        activation: ``"tanh"``, ``"relu"`` or ``"identity"``.
        bias: whether every neuron has a bias (the last column of θ).
        loss: ``"softmax_cross_entropy"`` (integer labels) or ``"mse"``.
        output_activation: an activation name for the last layer, or None.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "tanh",
        bias: bool = True,
        loss: str = "softmax_cross_entropy",
        output_activation: str | None = None,
    ):
        sizes = list(sizes)
        if len(sizes) < 2 or any(int(s) != s or s < 1 for s in sizes):
            raise ValueError(f"sizes must be at least two positive integers, got {sizes}")
        get_activation(activation)
        get_activation(output_activation or "identity")
        self.sizes = [int(s) for s in sizes]
        self.neurons = [
            Dense(f"dense{i}", d_in, d_out, bias=bias)
            for i, (d_in, d_out) in enumerate(pairwise(self.sizes))
        ]
        self.activations = [activation] * (len(self.neurons) - 1)
        self.activations.append(output_activation or "identity")
        self.input_shape = (self.sizes[0],)
        self._setup_loss(loss)


class CNN(Network):
    """Convolutions ``"conv0"``, ``"conv1"``, ... each followed by ``activation``, then a flatten
    and one Dense neuron ``"dense0"`` to the classes (no activation: the logits).

    Args:
        input_shape: ``(channels, height, width)`` of one sample (NCHW layout).
        channels: output channels of each convolution.
        kernel_size: square kernel size of every convolution.
        strides: stride of each convolution (an int: the same for all).
        padding: zero padding of every convolution.
        n_classes: width of the output.
        activation: ``"tanh"``, ``"relu"`` or ``"identity"``.
        bias: whether every neuron has a bias.
        loss: ``"softmax_cross_entropy"`` (integer labels) or ``"mse"``.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        channels: Sequence[int] = (4, 8),
        kernel_size: int = 3,
        strides: int | Sequence[int] = (1, 2),
        padding: int = 1,
        n_classes: int = 10,
        activation: str = "relu",
        bias: bool = True,
        loss: str = "softmax_cross_entropy",
    ):
        if len(input_shape) != 3 or any(int(s) != s or s < 1 for s in input_shape):
            raise ValueError(f"input_shape must be (channels, height, width), got {input_shape}")
        channels = list(channels)
        if any(int(c) != c or c < 1 for c in [*channels, n_classes]):
            raise ValueError(
                f"channels and n_classes must be positive integers, got {channels}, {n_classes}"
            )
        strides = [strides] * len(channels) if isinstance(strides, int) else list(strides)
        if not channels or len(strides) != len(channels):
            raise ValueError(
                f"need one stride per convolution: channels={channels}, strides={strides}"
            )
        get_activation(activation)
        self.input_shape = tuple(int(s) for s in input_shape)
        c, h, w = self.input_shape
        self.neurons = []
        for i, (c_out, stride) in enumerate(zip(channels, strides, strict=True)):
            conv = Conv2d(f"conv{i}", c, c_out, kernel_size, stride, padding, bias=bias)
            h, w = conv.output_hw(h, w)
            if h < 1 or w < 1:
                raise NeuronShapeError(
                    f"neuron {conv.name!r}: input_shape {input_shape} is too small for "
                    f"kernel_size={kernel_size}, strides={strides}, padding={padding}"
                )
            self.neurons.append(conv)
            c = c_out
        self.neurons.append(Dense("dense0", c * h * w, n_classes, bias=bias))
        self.activations = [activation] * len(channels) + ["identity"]
        self._setup_loss(loss)
