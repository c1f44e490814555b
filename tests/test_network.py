"""Networks with hand-written backprop (Eq. 6): gradients, features, losses and validation."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from conftest import naive_conv2d
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lnb.testing import rel_err
from lnb.testing.strategies import seeds
from lnb.testing.tolerances import RTOL
from lnb_ref import CNN, MLP, Conv2d, Dense, NeuronShapeError, NonFiniteError
from lnb_ref.network import ACTIVATIONS, mean_squared_error, softmax_cross_entropy

# --- helpers ----------------------------------------------------------------------------------


def random_params(net, rng, scale=0.7):
    """Every entry (biases included) drawn N(0, scale²), so that biases matter in the checks."""
    return [scale * rng.normal(size=n.theta_shape) for n in net.neurons]


def random_targets(net, rng, n):
    """Integer labels for cross-entropy, Gaussian targets of the output's shape for MSE."""
    if net.loss_name == "softmax_cross_entropy":
        return rng.integers(0, net.n_outputs, size=n)
    return rng.normal(size=(n, net.n_outputs))


def finite_difference_grads(net, params, X, Y, h=1e-6):
    """Central differences ``(ℓ(θ + h e_j) − ℓ(θ − h e_j)) / 2h`` of ``net.loss``, entrywise."""
    params = [p.copy() for p in params]
    out = []
    for p in params:
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            orig = p[idx]
            p[idx] = orig + h
            up = net.loss(params, X, Y)
            p[idx] = orig - h
            down = net.loss(params, X, Y)
            p[idx] = orig
            g[idx] = (up - down) / (2 * h)
        out.append(g)
    return out


def assert_grads_match_finite_differences(net, params, X, Y):
    """Every entry of every gradient equals its central finite difference.

    Tolerance: with step h, the central difference has a truncation error of
    ``h²/6 · |∂³ℓ|`` (≈ 2e-13 for h = 1e-6 and O(1) third derivatives) plus a rounding error of
    about ``eps · |ℓ| / h`` (the two loss values each carry a relative error of a few
    eps ≈ 2.2e-16, and their difference is divided by 2h), i.e. ≈ 1e-10 · |ℓ| and at most a
    few times 1e-10 · |ℓ| after the sums inside the loss. So we ask for a relative agreement of
    1e-6 per entry, plus an absolute floor ``1e-8 · max(1, |ℓ|)`` that covers the rounding
    error for entries that are (nearly) zero. The worst error seen over many random draws is
    about 1/50 of this bound, while a wrong gradient misses it by orders of magnitude.
    """
    loss, grads, _ = net.loss_grads_features(params, X, Y)
    fd = finite_difference_grads(net, params, X, Y)
    atol = 1e-8 * max(1.0, abs(loss))
    for neuron, g, f in zip(net.neurons, grads, fd, strict=True):
        assert g.shape == neuron.theta_shape
        np.testing.assert_allclose(g, f, rtol=1e-6, atol=atol, err_msg=neuron.name)


def pre_activations(net, params, X):
    """All pre-activations, to keep ReLU finite differences away from the kink at 0."""
    return np.concatenate([r.pre.ravel() for r in net.forward(params, X)])


# --- gradients against finite differences ----------------------------------------------------


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@settings(max_examples=10)
@given(
    seed=seeds,
    n=st.integers(1, 5),
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4),
)
def test_mlp_gradients_match_finite_differences(activation, bias, loss, seed, n, sizes):
    rng = np.random.default_rng(seed)
    net = MLP(sizes, activation=activation, bias=bias, loss=loss)
    params = random_params(net, rng)
    X = rng.normal(size=(n, sizes[0]))
    if activation == "relu":
        assume(np.min(np.abs(pre_activations(net, params, X))) > 1e-4)
    assert_grads_match_finite_differences(net, params, X, random_targets(net, rng, n))


@pytest.mark.parametrize("output_activation", ["tanh", "relu"])
def test_mlp_output_activation_gradients(output_activation):
    rng = np.random.default_rng(3)
    net = MLP([3, 4, 2], loss="mse", output_activation=output_activation)
    params = random_params(net, rng)
    X = rng.normal(size=(4, 3))
    assert np.min(np.abs(pre_activations(net, params, X))) > 1e-4
    assert_grads_match_finite_differences(net, params, X, random_targets(net, rng, 4))


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_cnn_gradients_match_finite_differences(activation, loss):
    """Two convolutions (strides 1 then 2, padding 1, bias), a flatten and a dense layer."""
    rng = np.random.default_rng(7)
    net = CNN(
        input_shape=(2, 5, 5),
        channels=(3, 2),
        kernel_size=3,
        strides=(1, 2),
        padding=1,
        n_classes=3,
        activation=activation,
        bias=True,
        loss=loss,
    )
    params = random_params(net, rng)
    X = rng.normal(size=(2, 2, 5, 5))
    assert np.min(np.abs(pre_activations(net, params, X))) > 1e-4
    assert_grads_match_finite_differences(net, params, X, random_targets(net, rng, 2))


# --- features, loss value, one forward and one backward -------------------------------------


def small_cnn(**kw):
    return CNN(input_shape=(2, 6, 5), channels=(3, 4), strides=(1, 2), n_classes=3, **kw)


@pytest.mark.parametrize("make", [lambda: MLP([4, 5, 3, 2]), small_cnn])
def test_features_are_the_arrays_fed_to_the_neurons(make, monkeypatch):
    """``features[i]`` *is* the array passed to ``neurons[i].forward``; one forward and one
    backward pass (one ``forward`` and one ``vjp_theta`` call per neuron)."""
    net = make()
    rng = np.random.default_rng(0)
    params = net.init(rng)
    X = rng.normal(size=(3, *net.input_shape))
    calls = {"forward": [], "vjp_theta": []}

    def spy(method):
        original = getattr(type_, method)

        def wrapped(self, X, *args, **kwargs):
            calls[method].append((self.name, X))
            return original(self, X, *args, **kwargs)

        return wrapped

    for type_ in (Dense, Conv2d):
        for method in ("forward", "vjp_theta"):
            monkeypatch.setattr(type_, method, spy(method))
    _, _, features = net.loss_grads_features(params, X, random_targets(net, rng, 3))
    names = [n.name for n in net.neurons]
    assert [name for name, _ in calls["forward"]] == names
    assert [name for name, _ in calls["vjp_theta"]] == names[::-1]
    assert len(features) == len(net.neurons)
    for feat, (_, fed) in zip(features, calls["forward"], strict=True):
        assert feat is fed
    for feat, (_, fed) in zip(features, calls["vjp_theta"][::-1], strict=True):
        assert feat is fed


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_features_chain_through_the_activations(kind, activation):
    """``features[0]`` is the data and ``σ(neurons[i].forward(features[i], θ_i))`` is the next
    layer's ``features[i + 1]`` (flattened before the CNN's dense layer)."""
    net = (
        MLP([4, 5, 3, 2], activation=activation)
        if kind == "mlp"
        else small_cnn(activation=activation)
    )
    rng = np.random.default_rng(1)
    params = random_params(net, rng)
    X = rng.normal(size=(3, *net.input_shape))
    _, _, features = net.loss_grads_features(params, X, random_targets(net, rng, 3))
    assert features[0] is X
    sigma = ACTIVATIONS[activation].fn
    for i in range(len(net.neurons) - 1):
        nxt = sigma(net.neurons[i].forward(features[i], params[i]))
        np.testing.assert_array_equal(nxt.reshape(features[i + 1].shape), features[i + 1])
    if kind == "cnn":
        assert features[-1].shape == (3, net.neurons[-1].d_in)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
@pytest.mark.parametrize("make", [lambda loss: MLP([4, 5, 3], loss=loss), small_cnn])
def test_returned_loss_equals_loss(make, loss):
    net = make(loss=loss)
    rng = np.random.default_rng(2)
    params = net.init(rng)
    X = rng.normal(size=(5, *net.input_shape))
    Y = random_targets(net, rng, 5)
    value, _, _ = net.loss_grads_features(params, X, Y)
    assert isinstance(value, float)
    assert value == net.loss(params, X, Y)


# --- closed forms ---------------------------------------------------------------------------


@given(seed=seeds, n=st.integers(1, 20))
def test_two_layer_linear_mse_is_the_matrix_factorization_loss(seed, n):
    """sizes [5, 3, 4], identity, no bias, "mse": ℓ = (1/n)‖W₁W₂Xᵀ − Yᵀ‖²_F with params
    ``[W₂, W₁]`` (input side first), and the gradients of that expression by hand:
    ``∂ℓ/∂W₁ = (2/n) R (W₂Xᵀ)ᵀ``, ``∂ℓ/∂W₂ = (2/n) W₁ᵀ R X`` with ``R = W₁W₂Xᵀ − Yᵀ``."""
    rng = np.random.default_rng(seed)
    net = MLP([5, 3, 4], activation="identity", bias=False, loss="mse")
    W2, W1 = net.init(rng, scheme="normal")
    X, Y = rng.normal(size=(n, 5)), rng.normal(size=(n, 4))
    R = W1 @ W2 @ X.T - Y.T
    expected = np.linalg.norm(R, "fro") ** 2 / n
    loss, (g2, g1), _ = net.loss_grads_features([W2, W1], X, Y)
    # Same quantity, different summation order: agreement to a few eps, RTOL leaves headroom.
    assert abs(loss - expected) <= RTOL * expected
    assert rel_err(g1, 2 / n * R @ (W2 @ X.T).T) < RTOL
    assert rel_err(g2, 2 / n * W1.T @ R @ X) < RTOL


@given(seed=seeds, n=st.integers(1, 6))
def test_mlp_forward_matches_plain_numpy(seed, n):
    rng = np.random.default_rng(seed)
    net = MLP([3, 4, 2], activation="tanh", bias=True)
    (P0, P1) = random_params(net, rng)
    X = rng.normal(size=(n, 3))
    hidden = np.tanh(X @ P0[:, :3].T + P0[:, 3])
    np.testing.assert_allclose(net.predict([P0, P1], X), hidden @ P1[:, :4].T + P1[:, 4])


def test_cnn_forward_matches_naive_convolution():
    rng = np.random.default_rng(4)
    net = small_cnn(activation="relu")
    params = random_params(net, rng)
    X = rng.normal(size=(2, 2, 6, 5))
    h = X
    for conv, theta in zip(net.neurons[:-1], params[:-1], strict=True):
        z = naive_conv2d(
            h, conv.filters(theta), theta[:, -1], (conv.stride,) * 2, (1, 1), (1, 1), 1
        )
        h = np.maximum(z, 0.0)
    dense = params[-1]
    expected = h.reshape(2, -1) @ dense[:, :-1].T + dense[:, -1]
    np.testing.assert_allclose(net.predict(params, X), expected, rtol=1e-12, atol=1e-12)


def test_losses_by_hand():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    labels = np.array([1, 0])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss, grad = softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(-np.mean(np.log(p[[0, 1], labels])), rel=1e-14)
    np.testing.assert_allclose(grad, (p - np.eye(3)[labels]) / 2, rtol=1e-14)
    # Stable for huge logits, where exp overflows: shifting by the row maximum.
    big, _ = softmax_cross_entropy(np.array([[1e4, 0.0], [0.0, 1e4]]), np.array([1, 1]))
    assert big == pytest.approx(0.5e4)
    # MSE: a mean over samples of the sum over outputs, no ½.
    loss, grad = mean_squared_error(np.array([[1.0, 2.0], [0.0, 0.0]]), np.zeros((2, 2)))
    assert loss == 2.5
    np.testing.assert_array_equal(grad, [[1.0, 2.0], [0.0, 0.0]])


def test_accuracy():
    net = MLP([2, 2], activation="identity", bias=False)
    params = [np.eye(2)]
    X = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert net.accuracy(params, X, np.array([0, 1, 1, 1])) == 0.75


# --- initialization -------------------------------------------------------------------------


def test_init_shapes_zero_biases_and_scales():
    rng = np.random.default_rng(5)
    net = MLP([400, 600, 10])
    params = net.init(rng)
    for neuron, theta in zip(net.neurons, params, strict=True):
        assert theta.shape == neuron.theta_shape
        np.testing.assert_array_equal(theta[:, -1], 0.0)
    assert np.std(params[0][:, :-1]) == pytest.approx(np.sqrt(2 / 1000), rel=0.02)
    assert np.std(net.init(rng, scheme="normal")[0][:, :-1]) == pytest.approx(1.0, rel=0.02)
    cnn = CNN(input_shape=(16, 8, 8), channels=(64,), strides=(1,), n_classes=10)
    conv_w = cnn.init(rng, scheme="he_normal")[0]
    assert conv_w.shape == (64, 16 * 9 + 1)
    np.testing.assert_array_equal(conv_w[:, -1], 0.0)
    assert np.std(conv_w[:, :-1]) == pytest.approx(np.sqrt(2 / (16 * 9)), rel=0.05)
    glorot = cnn.init(rng)[0]
    assert np.std(glorot[:, :-1]) == pytest.approx(np.sqrt(2 / (16 * 9 + 64 * 9)), rel=0.05)
    # Same generator state, same parameters.
    a, b = net.init(np.random.default_rng(9)), net.init(np.random.default_rng(9))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# --- validation -----------------------------------------------------------------------------


@pytest.fixture
def mlp_case():
    rng = np.random.default_rng(6)
    net = MLP([3, 4, 2])
    return net, net.init(rng), rng.normal(size=(5, 3)), rng.integers(0, 2, size=5)


def test_wrong_number_of_params(mlp_case):
    net, params, X, Y = mlp_case
    with pytest.raises(
        NeuronShapeError, match=r"1 parameter arrays for 2 neurons \(dense0, dense1"
    ):
        net.loss_grads_features(params[:1], X, Y)


def test_wrong_param_shape_names_the_neuron(mlp_case):
    net, params, X, Y = mlp_case
    with pytest.raises(NeuronShapeError, match=r"'dense1'.*parameters has shape \(5, 2\)"):
        net.loss(params[:1] + [params[1].T], X, Y)
    cnn = small_cnn()
    bad = cnn.init(np.random.default_rng(0))
    bad[1] = bad[1][:, :-1]
    with pytest.raises(NeuronShapeError, match="'conv1'"):
        cnn.predict(bad, np.zeros((1, 2, 6, 5)))


def test_wrong_input_shape_names_the_first_neuron(mlp_case):
    net, params, X, Y = mlp_case
    with pytest.raises(NeuronShapeError, match=r"'dense0'.*input has shape \(5, 4\)"):
        net.loss_grads_features(params, np.zeros((5, 4)), Y)
    with pytest.raises(NeuronShapeError, match="'dense0'"):
        net.predict(params, np.zeros(3))
    with pytest.raises(NeuronShapeError, match="'dense0'"):
        net.predict(params, np.zeros((0, 3)))
    cnn = small_cnn()
    with pytest.raises(NeuronShapeError, match=r"'conv0'.*expected \(batch, 2, 6, 5\)"):
        cnn.predict(cnn.init(np.random.default_rng(0)), np.zeros((1, 2, 5, 5)))


def test_non_finite_data_names_the_neuron(mlp_case):
    net, params, X, Y = mlp_case
    X = X.copy()
    X[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="'dense0'.*input features"):
        net.loss_grads_features(params, X, Y)
    reg = MLP([3, 2], loss="mse")
    with pytest.raises(NonFiniteError, match="'dense0'.*targets"):
        reg.loss(reg.init(np.random.default_rng(0)), np.zeros((1, 3)), np.array([[np.inf, 0.0]]))


def test_non_finite_params_give_a_non_finite_loss(mlp_case):
    """Divergence is reported through the loss (a training loop stops there), not raised."""
    net, params, X, Y = mlp_case
    params = [p.copy() for p in params]
    params[1][0, 0] = np.nan
    with np.errstate(invalid="ignore"):
        assert not np.isfinite(net.loss(params, X, Y))


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (np.array([0, 1, 2, 0, 1]), r"'dense1'.*labels must lie in \[0, 2\)"),
        (np.array([0, -1, 1, 0, 1]), r"'dense1'.*labels must lie in \[0, 2\)"),
        (np.array([0.0, 1.0, 1.0, 0.0, 1.0]), "'dense1'.*labels must be integers"),
        (np.array([0, 1, 1]), r"'dense1'.*labels has shape \(3,\)"),
    ],
)
def test_bad_labels_name_the_output_neuron(mlp_case, labels, pattern):
    net, params, X, _ = mlp_case
    with pytest.raises(NeuronShapeError, match=pattern):
        net.loss_grads_features(params, X, labels)
    with pytest.raises(NeuronShapeError, match=pattern):
        net.accuracy(params, X, labels)


def test_mse_targets_of_wrong_shape_name_the_output_neuron():
    net = MLP([3, 4, 2], loss="mse")
    params = net.init(np.random.default_rng(0))
    with pytest.raises(NeuronShapeError, match=r"'dense1'.*targets has shape \(5,\)"):
        net.loss(params, np.zeros((5, 3)), np.zeros(5))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*tanh, relu, identity, sigm"):
        MLP([2, 2], activation="swish")
    with pytest.raises(ValueError, match="unknown activation 'softmax'.*tanh, relu, identity"):
        MLP([2, 2], output_activation="softmax")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        small_cnn(activation="gelu")
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*softmax_cross_entropy, mse"):
        MLP([2, 2], loss="hinge")
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        small_cnn(loss="l1")
    with pytest.raises(ValueError, match="unknown init scheme 'xavier'.*glorot_normal"):
        MLP([2, 2]).init(np.random.default_rng(0), scheme="xavier")


def test_bad_architectures():
    with pytest.raises(ValueError, match="sizes"):
        MLP([3])
    with pytest.raises(ValueError, match="sizes"):
        MLP([3, 0, 2])
    with pytest.raises(ValueError, match="one stride per convolution"):
        CNN(input_shape=(1, 8, 8), channels=(4, 8), strides=(1,))
    with pytest.raises(NeuronShapeError, match="'conv1'.*too small"):
        CNN(input_shape=(1, 3, 3), channels=(2, 2), kernel_size=3, strides=(1, 1), padding=0)


# --- the errors of Eq. 6-7 ----------------------------------------------------------------------


def _loss_after(net, params, Y, i, a):
    """The loss as a function of layer ``i``'s output ``a_i`` (an MLP: no flattening)."""
    for j in range(i + 1, len(net.neurons)):
        a = ACTIVATIONS[net.activations[j]].fn(net.neurons[j].forward(a, params[j]))
    return net._loss_fn(a, Y)[0]


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_backprop_errors_are_derivatives_of_the_loss(activation):
    """``errors_post[i] = ∂ℓ/∂a_i`` and ``errors_pre[i] = ∂ℓ/∂z_i`` against central differences
    of the loss continued from layer ``i`` (truncation O(h²) ≈ 1e-10 and cancellation
    eps·ℓ/h ≈ 1e-11, relative to errors of size ~1e-2: 1e-6 is a safe bound that a wrong
    factor or a missing σ' fails by orders of magnitude); ``g_i = Φ(X_i)ᵀ λ_i`` exactly."""
    rng = np.random.default_rng(0)
    net = MLP([4, 5, 3], activation=activation, bias=True)
    params = random_params(net, rng)
    X, Y = rng.normal(size=(6, 4)), rng.integers(0, 3, size=6)
    tape = net.backprop(params, X, Y)
    assert tape.loss == net.loss(params, X, Y)
    h = 1e-5
    for i, neuron in enumerate(net.neurons):
        rec, act = tape.records[i], ACTIVATIONS[net.activations[i]]
        np.testing.assert_array_equal(
            tape.grads[i], neuron.vjp_theta(tape.features[i], tape.errors_pre[i])
        )
        d_post, d_pre = np.zeros_like(rec.post), np.zeros_like(rec.pre)
        for idx in np.ndindex(rec.post.shape):
            e = np.zeros_like(rec.post)
            e[idx] = h
            up, down = rec.post + e, rec.post - e
            loss_at = partial(_loss_after, net, params, Y, i)
            d_post[idx] = loss_at(up) - loss_at(down)
            up, down = act.fn(rec.pre + e), act.fn(rec.pre - e)
            d_pre[idx] = loss_at(up) - loss_at(down)
        assert rel_err(tape.errors_post[i], d_post / (2 * h)) < 1e-6, i
        # relu's kink: a z within h of 0 would straddle it; none is, at this seed
        assert rel_err(tape.errors_pre[i], d_pre / (2 * h)) < 1e-6, i
