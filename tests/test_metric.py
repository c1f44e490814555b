"""The metric M_i (Eq. 10–12, §3.4): generic construction from the forward == closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import naive_conv2d
from hypothesis import given
from hypothesis import strategies as st

from lnb.testing import correlated_features, rel_err
from lnb.testing.strategies import seeds
from lnb.testing.tolerances import RTOL, SOLVE_RTOL
from lnb_ref import (
    Conv2d,
    Dense,
    Embedding,
    Scale,
    dense_bias_metric,
    expand_row_metric,
    feature_moments,
    metric_from_forward,
    metric_matvec,
    row_metric,
    second_moment,
    solve_exact,
    step_norm,
)


@given(seed=seeds, n=st.integers(1, 12), d_in=st.integers(1, 6), d_out=st.integers(1, 4))
def test_dense_metric_is_second_moment(seed, n, d_in, d_out):
    """No bias: M = I_k ⊗ E[x xᵀ] (§3.3), built from the forward function alone."""
    rng = np.random.default_rng(seed)
    neuron = Dense("w", d_in, d_out)
    X = rng.normal(size=(n, d_in))
    M = metric_from_forward(neuron, X)
    assert rel_err(M, np.kron(np.eye(d_out), second_moment(X))) < RTOL
    assert rel_err(M, expand_row_metric(neuron, row_metric(neuron, X))) < RTOL


@given(seed=seeds, n=st.integers(1, 12), d_in=st.integers(1, 6), d_out=st.integers(1, 4))
def test_dense_bias_metric_is_eq12(seed, n, d_in, d_out):
    """With bias: M = I_k ⊗ [[Σ + μμᵀ, μ], [μᵀ, 1]] (Eq. 12)."""
    rng = np.random.default_rng(seed)
    neuron = Dense("w", d_in, d_out, bias=True)
    X = correlated_features(rng, n, d_in)
    mu, sigma = feature_moments(X)
    M = metric_from_forward(neuron, X)
    assert rel_err(M, np.kron(np.eye(d_out), dense_bias_metric(mu, sigma))) < RTOL
    assert rel_err(M, expand_row_metric(neuron, row_metric(neuron, X))) < RTOL


def test_dense_tokens_count_every_position_as_a_sample():
    """Footnote 3: inputs (batch, tokens, d) give n_i = batch · tokens."""
    rng = np.random.default_rng(0)
    neuron = Dense("w", 3, 2, bias=True)
    X = rng.normal(size=(4, 5, 3))
    assert neuron.n_samples(X) == 20
    flat = X.reshape(20, 3)
    mu, sigma = feature_moments(flat)
    assert (
        rel_err(metric_from_forward(neuron, X), np.kron(np.eye(2), dense_bias_metric(mu, sigma)))
        < RTOL
    )


conv_configs = st.fixed_dictionaries(
    {
        "c_in_per_group": st.integers(1, 2),
        "c_out_per_group": st.integers(1, 2),
        "groups": st.integers(1, 2),
        "kernel_size": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "padding": st.tuples(st.integers(0, 2), st.integers(0, 2)),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "bias": st.booleans(),
    }
)


def make_conv(cfg) -> Conv2d:
    g = cfg["groups"]
    return Conv2d(
        "conv",
        c_in=cfg["c_in_per_group"] * g,
        c_out=cfg["c_out_per_group"] * g,
        kernel_size=cfg["kernel_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=g,
        bias=cfg["bias"],
    )


@given(seed=seeds, cfg=conv_configs)
def test_conv_forward_matches_naive_loops(seed, cfg):
    """The im2col forward equals a loop-by-loop convolution (so the generic metric built from it
    is validated independently of the design matrix)."""
    rng = np.random.default_rng(seed)
    neuron = make_conv(cfg)
    X = rng.normal(size=(2, neuron.c_in, 6, 7))
    theta = rng.normal(size=neuron.theta_shape)
    bias = theta[:, -1] if neuron.bias else None
    expected = naive_conv2d(
        X,
        neuron.filters(theta),
        bias,
        cfg["stride"],
        cfg["padding"],
        cfg["dilation"],
        cfg["groups"],
    )
    assert rel_err(neuron.forward(X, theta), expected) < RTOL


@given(seed=seeds, cfg=conv_configs)
def test_conv_metric_is_patch_second_moment(seed, cfg):
    """Conv: M = blockdiag_g(I ⊗ E[p pᵀ]) over the patches p (im2col), n_i = output pixels."""
    rng = np.random.default_rng(seed)
    neuron = make_conv(cfg)
    X = rng.normal(size=(2, neuron.c_in, 6, 7)) + 0.5
    n_out = 2 * np.prod(neuron.output_hw(6, 7))
    assert neuron.n_samples(X) == n_out
    # patches by hand: (n, c, ho, wo, kh, kw) -> per group (n·ho·wo, cg·kh·kw [+1])
    P = neuron.patches(X)
    cg = neuron.c_in // neuron.groups
    blocks = []
    for g in range(neuron.groups):
        pg = P[:, g * cg : (g + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(n_out, -1)
        if neuron.bias:
            pg = np.hstack([pg, np.ones((n_out, 1))])
        blocks.append(pg.T @ pg / n_out)
    expected = expand_row_metric(neuron, np.stack(blocks))
    assert rel_err(metric_from_forward(neuron, X), expected) < RTOL


def test_scale_and_embedding_metrics():
    """Scale: diag(E[x⊙x]); additive embedding: the identity (§3.3, last paragraph)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(5, 3, 4))
    scale = Scale("gain", 4)
    assert rel_err(metric_from_forward(scale, X), np.diag(np.mean(X**2, axis=(0, 1)))) < RTOL
    assert (
        rel_err(expand_row_metric(scale, row_metric(scale, X)), metric_from_forward(scale, X))
        < RTOL
    )
    emb = Embedding("pos", (3, 4))
    assert rel_err(metric_from_forward(emb, X), np.eye(12)) < RTOL
    # its solve is skipped (θ̂ = g), so no ridge applies to it either: M stays I with γ > 0
    assert rel_err(metric_from_forward(emb, X, gamma=0.5), np.eye(12)) < RTOL
    v = rng.normal(size=(3, 4))
    assert rel_err(metric_matvec(emb, X, v, gamma=0.5), v) < RTOL
    with pytest.raises(TypeError, match="identity metric"):
        row_metric(emb, X)


@given(seed=seeds, gamma=st.floats(1e-3, 10.0))
def test_ridge_skips_bias_entries(seed, gamma):
    """§3.4: γ is added on the diagonal, excluding the bias entries."""
    rng = np.random.default_rng(seed)
    neuron = Dense("w", 3, 2, bias=True)
    X = rng.normal(size=(6, 3))
    diff = metric_from_forward(neuron, X, gamma) - metric_from_forward(neuron, X)
    expected = gamma * np.diag(np.tile([1.0, 1.0, 1.0, 0.0], 2))
    assert rel_err(diff, expected) < RTOL
    C = row_metric(neuron, X, gamma)
    assert rel_err(expand_row_metric(neuron, C), metric_from_forward(neuron, X, gamma)) < RTOL


@given(seed=seeds, cfg=conv_configs, gamma=st.sampled_from([0.0, 0.3]))
def test_matvec_matches_materialised_metric(seed, cfg, gamma):
    """Eq. 11: M v = Jᵀ(J v)/n_i via a forward and a VJP equals the materialised M times v."""
    rng = np.random.default_rng(seed)
    neuron = make_conv(cfg)
    X = rng.normal(size=(2, neuron.c_in, 5, 6))
    v = rng.normal(size=neuron.theta_shape)
    M = metric_from_forward(neuron, X, gamma)
    assert rel_err(metric_matvec(neuron, X, v, gamma), (M @ v.ravel()).reshape(v.shape)) < RTOL


@given(seed=seeds, n=st.integers(8, 30), d=st.integers(1, 6), bias=st.booleans())
def test_step_norm_is_function_space_norm(seed, n, d, bias):
    """§3.1: z = θ̂·g = θ̂ᵀ M θ̂ = ‖f(·; θ̂)‖²_F = (1/n) Σ ‖f(x; θ̂)‖²."""
    rng = np.random.default_rng(seed)
    neuron = Dense("w", d, 3, bias=bias)
    X = correlated_features(rng, n, d)
    g = rng.normal(size=neuron.theta_shape)
    theta_hat = solve_exact(neuron, row_metric(neuron, X), g)
    z = step_norm(theta_hat, g)
    f_norm = np.sum(neuron.forward(X, theta_hat) ** 2) / n
    assert z > 0
    assert abs(z - f_norm) / z < SOLVE_RTOL  # one solve with κ(M) up to ~1e4 here
