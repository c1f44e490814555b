"""``lnb_fast.neuron.probe``: the trace-time evaluations of a neuron's own map (the pairing of
weight rows with bias entries, the Gram layout's permutation) run as one compiled program and
are remembered by what they compute, so a layer of a shape and structure already probed costs
a trace, not a compilation."""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnb_fast
from lnb_fast import neuron as neuron_module
from lnb_fast.covariance import gram_layout
from lnb_fast.neuron import probe


@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty cache for the test, the process's own restored after it."""
    cache = OrderedDict()
    monkeypatch.setattr(neuron_module, "_PROBES", cache)
    return cache


def test_a_probe_returns_its_function_as_read_only_numpy(fresh_cache):
    x, y = np.arange(3.0, dtype=np.float32), np.ones(3, np.float32)
    out = probe("test", lambda a, b: (a * 2 + b, jnp.sum(a)), x, y)
    assert all(isinstance(leaf, np.ndarray) for leaf in out)
    np.testing.assert_array_equal(out[0], x * 2 + y)
    assert out[1] == 3.0
    with pytest.raises(ValueError, match="read-only"):
        out[0][0] = 7  # shared by every later probe of the same map


def test_probes_are_remembered_by_the_map_and_the_values_of_its_constants(fresh_cache):
    ones = np.ones(3, np.float32)
    first = probe("test", lambda a: a * np.array([1.0, 2.0, 3.0], np.float32), ones)
    # the same map, from another closure and another (equal) constant: remembered
    again = probe("test", lambda a: a * np.array([1.0, 2.0, 3.0], np.float32), ones)
    assert again[0] is first[0] and len(fresh_cache) == 1
    # a constant of other values, a literal of another value, another kind or shape: evaluated
    other = probe("test", lambda a: a * np.array([1.0, 2.0, 4.0], np.float32), ones)
    np.testing.assert_array_equal(other[0], [1.0, 2.0, 4.0])
    for k in (2.0, 3.0):
        np.testing.assert_array_equal(probe("test", lambda a, k=k: a * k, ones)[0], k * ones)
    assert (
        probe("other", lambda a: a * np.array([1.0, 2.0, 3.0], np.float32), ones)[0]
        is not (first[0])
    )
    np.testing.assert_array_equal(probe("test", lambda a: a * 2.0, np.ones(4, np.float32))[0], 2.0)
    assert len(fresh_cache) == 6


def test_the_cache_keeps_the_most_recent_entries(fresh_cache, monkeypatch):
    monkeypatch.setattr(neuron_module, "PROBE_CACHE_SIZE", 2)
    for k in range(4):
        probe("test", lambda a, k=k: a + k, np.ones(2, np.float32))
    assert len(fresh_cache) == 2
    assert [float(v[0][0]) for v in fresh_cache.values()] == [3.0, 4.0]


def mlp(depth: int, width: int = 8, out: int = 3):
    rng = np.random.default_rng(0)
    sizes = [width] * depth + [out]
    params = [
        {"w": jnp.asarray(rng.normal(size=(a, b)), jnp.float32), "b": jnp.zeros(b, jnp.float32)}
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]

    def loss(p, x):
        for layer in p[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return jnp.mean((x @ p[-1]["w"] + p[-1]["b"]) ** 2)

    return params, loss, jnp.asarray(rng.normal(size=(16, width)), jnp.float32)


def test_layers_of_the_same_map_are_probed_once(fresh_cache):
    """Four hidden layers ``8 → 8`` (the same map: same shapes, same primitives) and a head
    ``8 → 3``: two row-map probes and two of each layout probe, not five; and what they find is
    the definition for ``x @ w + b``: weight entry ``w[i, j]`` belongs to output row ``j``."""
    params, loss, x = mlp(depth=5)
    table = lnb_fast.value_and_grad(loss).table(params, x)
    layouts = [gram_layout(n) for n in table.neurons]
    kinds = [key[0] for key in fresh_cache]
    assert len(table.neurons) == 5
    assert kinds.count("row_map") == 2, kinds
    assert kinds.count("gram_layout rows") == kinds.count("gram_layout bias rows") == 2, kinds
    for neuron, layout in zip(table.neurons, layouts, strict=True):
        d_in, d_out = neuron.weight_shape
        rows = neuron.row_map()
        w = jnp.arange(d_in * d_out, dtype=jnp.float32).reshape(d_in, d_out)
        np.testing.assert_array_equal(rows.row_sum(w), w.sum(axis=0))  # row j: column j of w
        np.testing.assert_array_equal(
            rows.broadcast(jnp.arange(d_out)), np.tile(range(d_out), (d_in, 1))
        )
        # the layout's rows are the weight's columns (K = d_out rows of d = d_in entries)
        assert (layout.groups, layout.rows, layout.cols) == (1, d_out, d_in)
        np.testing.assert_array_equal(layout.to_rows(w)[0], w.T)
        np.testing.assert_array_equal(layout.bias_index, [list(range(d_out))])


def test_probing_under_jit_compiles_nothing_more_for_a_map_seen_before(fresh_cache):
    """The same model's step traced a second time (a new ``jax.jit`` of a new closure, as
    every training script does) finds every probe remembered."""
    params, loss, x = mlp(depth=3)
    opt = lnb_fast.lnb(0.05, strategy="gram")
    vgf = lnb_fast.value_and_grad(loss)

    def step(p, s):
        _, grads, feats = vgf(p, x)
        return opt.update(grads, s, p, features=feats)

    jax.jit(step)(params, opt.init(params))
    seen = dict(fresh_cache)
    jax.jit(lambda p, s: step(p, s))(params, opt.init(params))
    assert seen and list(fresh_cache) == list(seen)
    assert all(fresh_cache[k] is seen[k] for k in seen)
