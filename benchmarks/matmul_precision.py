"""How much float32 matrix-product precision costs LNB's metric on this device.

    .venv/bin/python benchmarks/matmul_precision.py   # writes results/matmul_precision.json

On NVIDIA GPUs since Ampere, XLA may compute a float32 matrix product in TF32 (a 10-bit mantissa)
at JAX's ``default`` precision; on the CPU every precision gives the same float32 product, so
this script's CPU figures are the control. LNB's step depends on the metric ``M = XᵀX/n`` of each
neuron's features (eq. 7) and on ``(M + γI)⁻¹ ĝ``; the step length is set so that
``θ̂ᵀ(M + γI)θ̂ = ε`` (Algorithm 2). For features shaped like the MLP's first hidden layer
(ReLU of a random projection of 784 inputs: 1000 × 801 with the bias column) it reports, at each
of ``jax.lax.Precision`` DEFAULT, HIGH and HIGHEST:

* ``gram_error``: ‖M₃₂ − M₆₄‖_F / ‖M₆₄‖_F, against the Gram in float64 (NumPy);
* ``solve_error``: ‖θ̂₃₂ − θ̂₆₄‖ / ‖θ̂₆₄‖ for ``θ̂ = (M + γI)⁻¹ĝ`` by Cholesky, γ = 1e-3·mean(diag M);
* ``step_length_error``: the step scaled to length ε in its own float32 metric, measured in the
  float64 one: ``|θ̂ᵀ(M₆₄ + γI)θ̂ / ε − 1|``;
* ``gram_ms``: the mean time of the jitted Gram (after a warm-up), to weigh accuracy against speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = {
    "default": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}


def features(n: int, d_in: int, d_out: int, seed: int = 0) -> np.ndarray:
    """ReLU features of a random layer on [0, 1] pixel-like inputs, with a bias column."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, d_in)).astype(np.float32)
    w = rng.normal(size=(d_in, d_out)).astype(np.float32) / np.sqrt(d_in)
    h = np.maximum(x @ w, 0.0)
    return np.concatenate([h, np.ones((n, 1), np.float32)], axis=1)


def measure(x: np.ndarray, precision, repeats: int, epsilon: float = 0.01) -> dict:
    n = x.shape[0]
    x64 = x.astype(np.float64)
    m64 = x64.T @ x64 / n
    gamma = 1e-3 * float(np.mean(np.diag(m64)))
    g = np.random.default_rng(1).normal(size=x.shape[1])
    a64 = m64 + gamma * np.eye(len(m64))
    theta64 = np.linalg.solve(a64, g)

    gram = jax.jit(lambda x: jnp.matmul(x.T, x, precision=precision) / x.shape[0])

    @jax.jit
    def step(x, g):
        a = gram(x) + gamma * jnp.eye(x.shape[1], dtype=x.dtype)
        c = jax.scipy.linalg.cho_factor(a)
        theta = jax.scipy.linalg.cho_solve(c, g)
        z = jnp.dot(theta, jnp.matmul(a, theta, precision=precision), precision=precision)
        return a, theta * jnp.sqrt(epsilon / z)

    xj, gj = jnp.asarray(x), jnp.asarray(g, jnp.float32)
    m32 = np.asarray(jax.block_until_ready(gram(xj)), np.float64)
    _, theta = jax.block_until_ready(step(xj, gj))
    theta = np.asarray(theta, np.float64)
    unscaled = theta / np.linalg.norm(theta) * np.linalg.norm(theta64)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(gram(xj))
        times.append(time.perf_counter() - start)
    return {
        "gram_error": float(np.linalg.norm(m32 - m64) / np.linalg.norm(m64)),
        "solve_error": float(np.linalg.norm(unscaled - theta64) / np.linalg.norm(theta64)),
        "step_length_error": float(abs(theta @ a64 @ theta / epsilon - 1.0)),
        "gram_ms": 1e3 * float(np.mean(times)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("results/matmul_precision.json"))
    args = parser.parse_args(argv)
    x = features(args.batch, 784, args.width)
    device = jax.devices()[0]
    rows = {name: measure(x, p, args.repeats) for name, p in PRECISIONS.items()}
    print(
        f"device {device.device_kind} ({device.platform}), JAX {jax.__version__}, "
        f"features {x.shape[0]} × {x.shape[1]}"
    )
    print("| precision | Gram error | solve error | step-length error | Gram ms |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['gram_error']:.1e} | {r['solve_error']:.1e} | "
            f"{r['step_length_error']:.1e} | {r['gram_ms']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": f"{device.device_kind} ({device.platform})",
        "jax": jax.__version__,
        "shape": list(x.shape),
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
