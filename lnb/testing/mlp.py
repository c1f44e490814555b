"""The tiny tanh MLP and classification batches that the optax tests train
(``tests/test_conformance.py``, ``tests/test_optax_composition.py``): a list of ``{"w", "b"}``
layers, plain JAX (``lnb_fast`` finds the dense neurons itself), in any float dtype; and the
checkpoint round trip both use. Needs JAX.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax


def mlp_params(rng: np.random.Generator, sizes, dtype=None) -> list[dict]:
    """One ``{"w": (a, b), "b": (b,)}`` per consecutive pair of ``sizes``: weights
    ``N(0, 1/a)``, biases ``N(0, 0.01)``, drawn from ``rng`` layer by layer (w, then b);
    ``dtype`` None is JAX's default float (float64 under x64)."""
    return [
        {
            "w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype),
            "b": jnp.asarray(rng.normal(size=b) * 0.1, dtype),
        }
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_loss(params, batch):
    """Mean softmax cross-entropy of the tanh MLP ``params`` on ``batch = (x, labels)``; the
    logits of a low-precision model (bf16, f16) are promoted to float32 for the loss."""
    x, y = batch
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = jnp.tanh(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def classification_batches(seed: int, count: int, n: int, d: int, classes: int, dtype=None):
    """``count`` batches ``(x, labels)``: ``x`` of shape ``(n, d)``, ``N(0.5, 1)`` entries (a
    nonzero mean, as real features have), labels uniform over ``classes``."""
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(n, d)) + 0.5, dtype),
            jnp.asarray(rng.integers(0, classes, size=n)),
        )
        for _ in range(count)
    ]


def train(opt, params, loss, batch, steps: int):
    """``steps`` jitted LNB-style steps of ``opt`` (an lnb_fast transformation, fed the features
    of :func:`lnb_fast.value_and_grad`) on ``loss(params, batch)``, one fixed batch:
    ``(params, state, [loss before each step])``."""
    import lnb_fast

    vgf = lnb_fast.value_and_grad(loss)

    @jax.jit
    def step(params, state):
        value, grads, feats = vgf(params, batch)
        updates, state = opt.update(grads, state, params, features=feats)
        return optax.apply_updates(params, updates), state, value

    state, values = opt.init(params), []
    for _ in range(steps):
        params, state, value = step(params, state)
        values.append(float(value))
    return params, state, values


def save_restore(state, path):
    """``state`` saved to ``path`` and restored, through orbax when it is installed (the `dev`
    extra), else pickle of host copies."""
    try:
        import orbax.checkpoint as ocp
    except ImportError:  # pragma: no cover - pickle of host copies
        return jax.tree.map(jnp.asarray, pickle.loads(pickle.dumps(jax.device_get(state))))
    ckpt = ocp.StandardCheckpointer()
    try:
        ckpt.save(path, state)
        ckpt.wait_until_finished()
        return ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    finally:
        ckpt.close()
