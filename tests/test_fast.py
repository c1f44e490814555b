"""lnb_fast on unmodified models: what discovery finds (the `describe` table) on plain JAX,
Equinox and Flax NNX models, the optax interface, non-finite handling, and float32 vs float64."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
eqx = pytest.importorskip("equinox")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import lnb_fast  # noqa: E402
from lnb.testing.mlp import train  # noqa: E402
from lnb.testing.tolerances import FLOAT32_RTOL, RTOL  # noqa: E402
from lnb_fast.errors import DiscoveryError, NonFiniteError, StructureError  # noqa: E402

KEY = jax.random.key(0)


def table(loss, params, *args):
    """The describe rows as (parameter, neuron, shape, n_i, metric-kind) tuples."""
    rows = lnb_fast.describe(loss, params, *args, print_table=False)
    return [
        (r["parameter"], r["neuron"], r["shape"], r["n_i"], r["metric"].split(" ")[0]) for r in rows
    ]


# --- models ---------------------------------------------------------------------------------------
def plain_mlp(sizes=(8, 16, 4), dtype=None, seed=0):
    """A tanh MLP in ``dtype`` (default: JAX's default float, float64 under ``x64``)."""
    rng = np.random.default_rng(seed)
    params = [
        {"w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype), "b": jnp.zeros(b, dtype)}
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]

    def loss(p, batch):
        x, y = batch
        for i, layer in enumerate(p):
            x = x @ layer["w"] + layer["b"]
            if i < len(p) - 1:
                x = jnp.tanh(x)
        return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

    return params, loss


def plain_cnn():
    k = jax.random.split(KEY, 3)
    params = {
        "conv1": {"w": jax.random.normal(k[0], (3, 3, 1, 4)) * 0.3, "b": jnp.zeros(4)},
        "conv2": {"w": jax.random.normal(k[1], (3, 3, 2, 6)) * 0.3, "b": jnp.zeros(6)},
        "out": {"w": jax.random.normal(k[2], (6 * 4 * 4, 3)) * 0.1, "b": jnp.zeros(3)},
    }

    def loss(p, batch):
        x, y = batch
        dn = ("NHWC", "HWIO", "NHWC")
        h = lax.conv_general_dilated(x, p["conv1"]["w"], (1, 1), "SAME", dimension_numbers=dn)
        h = jax.nn.relu(h + p["conv1"]["b"])
        h = lax.conv_general_dilated(  # strided, dilated, grouped
            h,
            p["conv2"]["w"],
            (2, 2),
            [(2, 2), (2, 2)],
            rhs_dilation=(2, 2),
            feature_group_count=2,
            dimension_numbers=dn,
        )
        h = jax.nn.relu(h + p["conv2"]["b"])
        logits = h.reshape(h.shape[0], -1) @ p["out"]["w"] + p["out"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    batch = (jnp.ones((5, 8, 8, 1)), jnp.zeros(5, jnp.int32))
    return params, loss, batch


class ViTBlock(eqx.Module):
    """Patch embedding, class token, position embedding, pre-LN attention and MLP, head."""

    patch: eqx.nn.Conv2d
    cls: jax.Array
    pos: jax.Array
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key, d=16):
        k = jax.random.split(key, 4)
        self.patch = eqx.nn.Conv2d(1, d, 4, stride=4, key=k[0])
        self.cls, self.pos = jnp.zeros((1, d)), jnp.zeros((5, d))
        self.ln1, self.ln2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
        self.attn = eqx.nn.MultiheadAttention(2, d, key=k[1])
        self.mlp = eqx.nn.MLP(d, d, 32, 1, key=k[2])
        self.head = eqx.nn.Linear(d, 3, key=k[3])

    def __call__(self, x):
        h = self.patch(x)
        h = jnp.concatenate([self.cls, h.reshape(h.shape[0], -1).T]) + self.pos
        y = jax.vmap(self.ln1)(h)
        h = h + self.attn(y, y, y)
        h = h + jax.vmap(self.mlp)(jax.vmap(self.ln2)(h))
        return self.head(h[0])


def eqx_loss(static):
    def loss(params, batch):
        x, y = batch
        model = eqx.combine(params, static)
        return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y).mean()

    return loss


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.norm(self.l1(x))))


# --- discovery ------------------------------------------------------------------------------------
def test_describe_plain_mlp(capsys):
    params, loss = plain_mlp()
    batch = (jnp.ones((10, 8)), jnp.zeros(10, jnp.int32))
    lnb_fast.describe(loss, params, batch)
    assert "| [0]['w']  | dense weight | 8×16  | 10  | M_i (Eq. 10) |" in capsys.readouterr().out
    assert table(loss, params, batch) == [
        ("[0]['b']", "dense bias", "16", "10", "M_i"),
        ("[0]['w']", "dense weight", "8×16", "10", "M_i"),
        ("[1]['b']", "dense bias", "4", "10", "M_i"),
        ("[1]['w']", "dense weight", "16×4", "10", "M_i"),
    ]


def test_describe_plain_cnn():
    params, loss, batch = plain_cnn()
    # n_i: 5 images x 8x8 output pixels, then 5 x 4x4 (stride 2), then 5 samples.
    assert table(loss, params, batch) == [
        ("['conv1']['b']", "conv bias", "4", "320", "M_i"),
        ("['conv1']['w']", "conv weight", "3×3×1×4", "320", "M_i"),
        ("['conv2']['b']", "conv bias", "6", "80", "M_i"),
        ("['conv2']['w']", "conv weight", "3×3×2×6", "80", "M_i"),
        ("['out']['b']", "dense bias", "3", "5", "M_i"),
        ("['out']['w']", "dense weight", "96×3", "5", "M_i"),
    ]


def test_describe_equinox_mlp_and_cnn():
    mlp = eqx.nn.MLP(6, 3, 10, 2, key=KEY)
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    rows = table(eqx_loss(static), params, (jnp.ones((7, 6)), jnp.zeros(7, jnp.int32)))
    assert [r[:4] for r in rows] == [
        (f".layers[{i}].{k}", f"dense {'weight' if k == 'weight' else 'bias'}", s, "7")
        for i, shapes in enumerate([("10×6", "10"), ("10×10", "10"), ("3×10", "3")])
        for k, s in zip(("weight", "bias"), shapes, strict=True)
    ]
    cnn = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, key=KEY),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(lambda h: h.reshape(-1)),
            eqx.nn.Linear(4 * 3 * 3, 3, key=KEY),
        ]
    )
    params, static = eqx.partition(cnn, eqx.is_inexact_array)
    rows = table(eqx_loss(static), params, (jnp.ones((5, 2, 6, 6)), jnp.zeros(5, jnp.int32)))
    assert rows == [
        (".layers[0].weight", "conv weight", "4×1×3×3", "45", "M_i"),
        (".layers[0].bias", "conv bias", "4×1×1", "45", "M_i"),
        (".layers[3].weight", "dense weight", "3×36", "5", "M_i"),
        (".layers[3].bias", "dense bias", "3", "5", "M_i"),
    ]


def test_describe_equinox_vit_block():
    params, static = eqx.partition(ViTBlock(KEY), eqx.is_inexact_array)
    rows = table(eqx_loss(static), params, (jnp.ones((3, 1, 8, 8)), jnp.zeros(3, jnp.int32)))
    tokens = "15"  # 3 images x (1 class token + 4 patches)
    dense = [
        (f".attn.{k}_proj.weight", "dense weight", "16×16", tokens, "M_i")
        for k in ("query", "key", "value", "output")
    ]
    assert rows == [
        (".patch.weight", "conv weight", "16×1×4×4", "12", "M_i"),
        (".patch.bias", "conv bias", "16×1×1", "12", "M_i"),
        (".cls", "class token", "1×16", "-", "identity"),
        (".pos", "additive", "5×16", "-", "identity"),
        (".ln1.weight", "scale weight", "16", tokens, "M_i"),
        (".ln1.bias", "scale bias", "16", tokens, "M_i"),
        *dense,
        (".ln2.weight", "scale weight", "16", tokens, "M_i"),
        (".ln2.bias", "scale bias", "16", tokens, "M_i"),
        (".mlp.layers[0].weight", "dense weight", "32×16", tokens, "M_i"),
        (".mlp.layers[0].bias", "dense bias", "32", tokens, "M_i"),
        (".mlp.layers[1].weight", "dense weight", "16×32", tokens, "M_i"),
        (".mlp.layers[1].bias", "dense bias", "16", tokens, "M_i"),
        (".head.weight", "dense weight", "3×16", "3", "M_i"),
        (".head.bias", "dense bias", "3", "3", "M_i"),
    ]


def test_describe_flax_nnx_mlp():
    graphdef, params = nnx.split(NNXMLP(nnx.Rngs(0)), nnx.Param)

    def loss(p, batch):
        x, y = batch
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    rows = table(loss, params, (jnp.ones((6, 8)), jnp.zeros(6, jnp.int32)))
    assert rows == [
        ("['l1']['bias'].value", "dense bias", "16", "6", "M_i"),
        ("['l1']['kernel'].value", "dense weight", "8×16", "6", "M_i"),
        ("['l2']['bias'].value", "dense bias", "3", "6", "M_i"),
        ("['l2']['kernel'].value", "dense weight", "16×3", "6", "M_i"),
        # Flax folds the scale into rsqrt(var) before multiplying by x - mean: still a scale.
        ("['norm']['bias'].value", "scale bias", "16", "6", "M_i"),
        ("['norm']['scale'].value", "scale weight", "16", "6", "M_i"),
    ]


@pytest.mark.x64  # compares at float64 rounding
def test_flax_layernorm_scale_matches_reference_scale():
    """The folded Flax scale has the metric of lnb_ref's Scale on the normalised input x̂."""
    from lnb_ref.metric import metric_matvec
    from lnb_ref.neurons import Scale

    norm = nnx.LayerNorm(5, use_bias=False, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(norm, nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(9, 5)) * 3 + 1)
    neuron = (
        lnb_fast.value_and_grad(lambda p, x: nnx.merge(graphdef, p)(x).sum())
        .table(params, x)
        .neurons[0]
    )
    _, _, feats = lnb_fast.value_and_grad(lambda p, x: nnx.merge(graphdef, p)(x).sum())(params, x)
    x_hat = np.asarray(nnx.merge(graphdef, params)(x))  # scale is 1 at init
    v = np.random.default_rng(1).normal(size=5)
    ours = neuron.metric_matvec(feats.values[0], (jnp.asarray(v),))[0]
    ref = metric_matvec(Scale("norm", 5), x_hat, v)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)  # Flax's eps=1e-6 inside rsqrt is shared


@pytest.mark.x64  # compares at float64 rounding
def test_unclassified_parameters_fall_back_to_identity_and_are_listed():
    def loss(p, x):
        h = x @ p["tied"]  # used twice: tied weights
        h = jnp.tanh(h) @ p["tied"].T
        h = h * jnp.exp(p["gain"])  # a nonlinear use
        out, _ = lax.scan(lambda c, xi: (c + xi @ p["in_scan"], None), jnp.zeros(2), h)
        return out.sum() + p["unused"].sum() * 0

    params = {
        "tied": jnp.ones((3, 3)),
        "gain": jnp.zeros(3),
        "in_scan": jnp.ones((3, 2)),
        "unused": jnp.ones(2),
    }
    rows = {
        r["parameter"]: r
        for r in lnb_fast.describe(loss, params, jnp.ones((4, 3)), print_table=False)
    }
    assert rows["['tied']"]["metric"].startswith("identity (used 2 times")
    assert rows["['gain']"]["metric"] == "identity (used by `exp`)"
    assert rows["['in_scan']"]["metric"] == "identity (used inside `scan` (not walked))"
    assert rows["['unused']"]["neuron"] == "used by `reduce_sum`" or rows["['unused']"][
        "metric"
    ].startswith("identity")
    # ...and the optimizer uses θ̂ = ĝ for them: with b1 = 0 the update is -√(ε/z) g.
    vgf = lnb_fast.value_and_grad(loss)
    _, grads, feats = vgf(params, jnp.ones((4, 3)))
    opt = lnb_fast.lnb(0.04, b1=0.0)
    updates, _ = opt.update(grads, opt.init(params), params, features=feats)
    z = sum(float(jnp.vdot(g, g)) for g in jax.tree.leaves(grads))
    for key in params:
        np.testing.assert_allclose(updates[key], -np.sqrt(0.04 / z) * grads[key], rtol=1e-12)


@pytest.mark.x64  # compares at float64 rounding
def test_tag_neuron_is_the_escape_hatch():
    """A weight padded before use is not recognised; tagging the layer makes it a neuron whose
    updates equal those of the same layer written without the pad."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(4, 2)))
    x = jnp.asarray(rng.normal(size=(20, 4)) + 1)
    y = jnp.asarray(rng.normal(size=(20, 3)))

    def padded(p, x):
        return jnp.sum((x @ jnp.pad(p["w"], ((0, 0), (0, 1))) - y) ** 2)

    def tagged(p, x):
        h = lnb_fast.tag_neuron(lambda x, w: x @ jnp.pad(w, ((0, 0), (0, 1))), x, p["w"])
        return jnp.sum((h - y) ** 2)

    def plain(p, x):
        return jnp.sum((x @ p["w"] - y[:, :2]) ** 2) + jnp.sum(y[:, 2] ** 2)

    assert table(padded, {"w": w}, x)[0][4] == "identity"
    assert table(tagged, {"w": w}, x)[0][:4] == ("['w']", "tagged weight", "4×2", "20")
    opt = lnb_fast.lnb(0.1)
    outs = []
    for loss in (tagged, plain):
        _, grads, feats = lnb_fast.value_and_grad(loss)({"w": w}, x)
        outs.append(opt.update(grads, opt.init({"w": w}), {"w": w}, features=feats)[0]["w"])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12)


# --- the optax interface --------------------------------------------------------------------------
def mlp_problem(dtype=None, n=64):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(n, 8)) + 1, dtype)
    y = jnp.asarray(rng.integers(0, 4, size=n))
    params, loss = plain_mlp((8, 16, 4), dtype)
    return params, loss, (x, y)


@pytest.mark.x64  # compares at float64 rounding
def test_chain_with_clipping_equals_lnb_on_clipped_gradients():
    params, loss, batch = mlp_problem()
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
    chained = optax.chain(optax.clip_by_global_norm(0.1), lnb_fast.lnb(0.05))
    # jitted: one compilation each instead of one per operation (the test's time otherwise)
    updates = jax.jit(lambda g: chained.update(g, chained.init(params), params, features=feats))(
        grads
    )[0]
    clipped, _ = optax.clip_by_global_norm(0.1).update(grads, optax.EmptyState())
    alone = lnb_fast.lnb(0.05)
    expected = jax.jit(lambda g: alone.update(g, alone.init(params), params, features=feats))(
        clipped
    )[0]
    assert optax.tree.norm(grads) > 0.1  # the clip did something
    # two programs compiled separately sum in different orders: rounding (1.1e-12 measured)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL)


@pytest.mark.x64  # compares at float64 rounding
def test_schedule_scales_the_step_by_sqrt_epsilon():
    """ε enters only through √ε (with ρ = 0), and the state does not depend on it."""
    params, loss, batch = mlp_problem()
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    opts = lnb_fast.lnb(schedule), lnb_fast.lnb(0.1)
    states = [o.init(params) for o in opts]
    # jitted: one compilation per optimizer instead of one per operation and step
    updates = [jax.jit(lambda s, o=o: o.update(grads, s, params, features=feats)) for o in opts]
    for t in range(3):
        (u_s, states[0]), (u_c, states[1]) = (u(s) for u, s in zip(updates, states, strict=True))
        for a, b in zip(jax.tree.leaves(u_s), jax.tree.leaves(u_c), strict=True):
            # the schedule's value at the optimizer's int32 count (optax computes it in float32)
            ratio = np.sqrt(float(schedule(jnp.asarray(t, jnp.int32))) / 0.1)
            np.testing.assert_allclose(a, ratio * b, rtol=1e-12)
        assert ratio == pytest.approx(np.sqrt(0.5**t), rel=1e-7)


def test_training_decreases_loss_and_state_round_trips_through_numpy():
    params, loss, batch = mlp_problem()
    opt = lnb_fast.lnb(0.05, weight_decay=1e-3)
    params, state, values = train(opt, params, loss, batch, 30)
    assert values[-1] < 0.5 * values[0]
    assert int(state.count) == 30
    leaves, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [np.array(x) for x in leaves])  # e.g. from np.savez
    vgf = lnb_fast.value_and_grad(loss)

    @jax.jit  # one program for both states (run eagerly, each operation compiles on its own)
    def update(state):
        _, grads, feats = vgf(params, batch)
        return opt.update(grads, state, params, features=feats)[0]

    a, b = update(state), update(restored)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.x64  # needs float64 for the float64 run
def test_float32_agrees_with_float64():
    """Same init, same batches, 20 steps. float32 rounding (eps ≈ 1.2e-7) is amplified by the
    metric's conditioning and by 20 steps of a nonlinear network; we measured relative
    differences of a few 1e-6 in the loss and accept 1e-4 — loose enough for rounding, far below
    the 30-50% the loss moves over these steps, so a real bug in the float32 path still fails."""
    curves = []
    for dtype in (jnp.float32, jnp.float64):
        params, loss, batch = mlp_problem(dtype)
        final, _, values = train(lnb_fast.lnb(0.05, ridge=1e-4), params, loss, batch, 20)
        assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(final))
        curves.append(np.array(values))
    np.testing.assert_allclose(curves[0], curves[1], rtol=FLOAT32_RTOL)
    assert curves[1][-1] < 0.7 * curves[1][0]


# --- errors ---------------------------------------------------------------------------------------
def test_nonfinite_gradient_raises_naming_the_parameter():
    params, loss, batch = mlp_problem()
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
    grads[1]["w"] = grads[1]["w"].at[0, 0].set(jnp.nan)
    opt = lnb_fast.lnb(0.05, nonfinite="raise")
    with pytest.raises(NonFiniteError, match=r"gradient of parameter \[1\]\['w'\]"):
        opt.update(grads, opt.init(params), params, features=feats)
    jitted = jax.jit(lambda g, s, p, f: opt.update(g, s, p, features=f))
    with pytest.raises(ValueError, match=r"only on eager .*check_finite"):
        jitted(grads, opt.init(params), params, feats)
    # the default under jit: skipped in the graph, raised on the host by check_finite
    default = lnb_fast.lnb(0.05)
    jitted = jax.jit(lambda g, s, p, f: default.update(g, s, p, features=f))
    _, state = jitted(grads, default.init(params), params, feats)
    with pytest.raises(
        NonFiniteError, match=r"NaN or Inf in the gradient of parameter \[1\]\['w'\]"
    ):
        lnb_fast.check_finite(state, params)


def test_nonfinite_features_raise_or_skip():
    params, loss, batch = mlp_problem()
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
    bad = type(feats)((feats.values[0], feats.values[1].at[2, 3].set(jnp.inf)), feats.table)
    opt = lnb_fast.lnb(0.05, nonfinite="raise")
    with pytest.raises(NonFiniteError, match=r"input features of the neuron of \[1\]\['w'\]"):
        opt.update(grads, opt.init(params), params, features=bad)

    skip = lnb_fast.lnb(0.05, nonfinite="skip")
    state = skip.init(params)
    _, state = skip.update(grads, state, params, features=feats)  # one good step
    updates, new = jax.jit(lambda s, f: skip.update(grads, s, params, features=f))(state, bad)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    assert int(new.skipped) == 1 and int(new.count) == int(state.count) == 1
    for a, b in zip(
        jax.tree.leaves(new._replace(skipped=0, nonfinite=None)),
        jax.tree.leaves(state._replace(skipped=0, nonfinite=None)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(
        NonFiniteError, match=r"input features of the neuron of \[1\]\['w'\] at step 2"
    ):
        lnb_fast.check_finite(new, params)


def test_clear_errors_for_misuse():
    params, loss, batch = mlp_problem()
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
    opt = lnb_fast.lnb(0.05)
    with pytest.raises(TypeError, match="needs the neurons' input features"):
        opt.update(grads, opt.init(params), params)
    other, other_loss = plain_mlp((8, 5, 4))
    _, _, other_feats = lnb_fast.value_and_grad(other_loss)(other, batch)
    with pytest.raises(StructureError, match=r"gradients \[0\]\['b'\]: shape \(16,\), but"):
        opt.update(grads, opt.init(params), params, features=other_feats)
    with pytest.raises(
        DiscoveryError, match=r"parameter \['act'\] is PjitFunction, not a floating array"
    ):
        lnb_fast.value_and_grad(lambda p, x: x.sum())({"act": jnp.tanh}, batch[0])
    with pytest.raises(DiscoveryError, match="must return a scalar"):
        lnb_fast.value_and_grad(lambda p, x: x @ p)(jnp.ones((8, 2)), batch[0])
    with pytest.raises(ValueError, match="cg_iterations"):
        lnb_fast.lnb(0.1, cg_iterations=0)
    with pytest.raises(ValueError, match="nonfinite"):
        lnb_fast.lnb(0.1, nonfinite="ignore")


def test_feature_capture_reuses_the_forward_pass():
    """One forward and one backward: capturing the features adds no matrix product to
    ``jax.value_and_grad`` (counted in the traced computations, not timed)."""
    params, loss, batch = mlp_problem()

    def products(fn):
        text = str(jax.make_jaxpr(fn)(params, batch))
        return text.count("dot_general"), text.count("conv_general_dilated")

    ours = products(lambda p, b: lnb_fast.value_and_grad(loss)(p, b))
    plain = products(lambda p, b: jax.value_and_grad(loss)(p, b))
    assert ours == plain and ours[0] == 5  # 2 forward, 2 weight gradients, 1 input gradient


@pytest.mark.x64  # compares at float64 rounding
def test_discovery_descends_into_jit_remat_and_custom_vjp():
    """Layers inside ``jax.jit``, ``jax.checkpoint`` and a ``custom_vjp`` are found, their
    features captured, and the updates equal those of the same model written flat."""

    @jax.custom_vjp
    def dense(x, w, b):
        return x @ w + b

    dense.defvjp(
        lambda x, w, b: (dense(x, w, b), (x, w)),
        lambda res, g: (g @ res[1].T, res[0].T @ g, g.sum(0)),
    )

    def flat(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p[0]["w"] + p[0]["b"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ p[1]["w"] + p[1]["b"], y).mean()

    @jax.jit
    def nested(p, batch):
        x, y = batch
        h = jax.checkpoint(lambda x: jnp.tanh(x @ p[0]["w"] + p[0]["b"]))(x)
        return optax.softmax_cross_entropy_with_integer_labels(
            dense(h, p[1]["w"], p[1]["b"]), y
        ).mean()

    params, _, batch = mlp_problem()
    rows = table(nested, params, batch)
    assert [r[1] for r in rows] == ["dense bias", "dense weight"] * 2
    opt = lnb_fast.lnb(0.05)
    results = []
    for loss in (flat, nested):
        value, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
        updates, _ = opt.update(grads, opt.init(params), params, features=feats)
        results.append((value, updates))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL)


# --- JAX versions ---------------------------------------------------------------------------------
class _PairBindParams:
    """A primitive as JAX < 0.9.2 has it: ``get_bind_params`` returns ``(subfuns, params)``."""

    def __init__(self, primitive, subfuns=()):
        self._primitive, self._subfuns, self.calls = primitive, list(subfuns), []

    def __getattr__(self, name):
        return getattr(self._primitive, name)

    def get_bind_params(self, params):
        return self._subfuns, dict(params)

    def bind(self, *args, **params):
        self.calls.append(args[: len(self._subfuns)])
        return self._primitive.bind(*args[len(self._subfuns) :], **params)


@pytest.mark.x64  # compares at float64 rounding
def test_replays_primitives_with_either_get_bind_params_convention():
    """jax 0.9.1 returns a pair from ``Primitive.get_bind_params``, jax >= 0.9.2 the params:
    the chain replay, the neuron core and the capturing interpreter bind correctly with both."""
    from lnb_fast import _jax_compat, capture, discovery, neuron

    x, w = jnp.arange(12.0).reshape(3, 4), jnp.arange(8.0).reshape(4, 2) / 7
    step = neuron.Step(_PairBindParams(lax.transpose_p), {"permutation": (1, 0)}, (None,), 0)
    np.testing.assert_array_equal(step(x), x.T)

    closed = jax.make_jaxpr(lambda x, w: jnp.tanh(x @ w).sum())(x, w)
    dot = closed.jaxpr.eqns[0]
    old_dot = dot.replace(primitive=_PairBindParams(dot.primitive))
    np.testing.assert_allclose(discovery._core(old_dot, 1)(x, w), x @ w, rtol=1e-12)

    old = closed.jaxpr.replace(
        eqns=[e.replace(primitive=_PairBindParams(e.primitive)) for e in closed.jaxpr.eqns]
    )
    (out,) = capture._evaluate(old, closed.consts, [x, w], (), {}, set(), {})
    np.testing.assert_allclose(out, jnp.tanh(x @ w).sum(), rtol=1e-12)

    # the subfunctions of the pair go before the operands
    with_subfun = _PairBindParams(lax.neg_p, subfuns=["f"])
    np.testing.assert_array_equal(_jax_compat.bind(with_subfun, {}, [x]), -x)
    assert with_subfun.calls == [("f",)]
