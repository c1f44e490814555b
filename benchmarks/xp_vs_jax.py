"""Wall time of one Algorithm-2 step: the array-API path (``lnb_fast.xp``) on NumPy and CuPy
against the JAX path (``lnb_fast.lnb``), fed the same gradients and features.

    PYTHONPATH=. python benchmarks/xp_vs_jax.py            # full sizes (a GPU is the point)
    PYTHONPATH=. python benchmarks/xp_vs_jax.py --quick    # small sizes, < 20 s on a CPU

What is timed is the optimizer step alone — for every neuron the feature moments, the §3.5
preconditioner, 2 warm-started PCG iterations of matrix-free metric products (Eq. 11), then the
update of lines 12–14 — not the forward/backward pass, which the user's own loop does:

* ``numpy``: ``lnb_fast.xp.OnlineLNB.step`` on NumPy arrays (CPU);
* ``cupy``: the same code on CuPy arrays (skipped if CuPy or a CUDA device is missing);
* ``jax``: ``lnb_fast.lnb(...).update(grads, state, params, features=features)`` under
  ``jax.jit`` on JAX's default device.

Models (float32, Glorot weights, random data from a seeded generator, nothing downloaded), built
in plain JAX with :mod:`lnb.models`; ``lnb_fast.value_and_grad`` gives the gradients and each
neuron's input features once, and the xp path gets the same arrays converted to its layout (θ as
``(K, D)`` rows with the bias last, NCHW images):

* ``mlp``: 784-800-800-10, tanh, batch 1000 (the paper's MNIST MLP);
* ``cnn``: 3×3 convolutions 1→16 (stride 1) and 16→32 (stride 2), ReLU, then a dense layer to
  10 classes, on 28×28×1 images, batch 256.

The CNN pads every convolution by 1 on each side (explicitly: "SAME" would pad (0, 1) at stride
2, which ``lnb_fast.xp.Conv2d``, like ``lnb_ref``, does not do), so both paths see the same patches.
As a check that the two paths compute the same step, ``max_rel_diff`` reports, per backend, the
largest relative difference (over neurons) between its first update and JAX's (float32: ~1e-5).
``--quick`` shrinks the models (MLP 784-128-10 at batch 256, CNN 1→8→16 at batch 32).

Each step is called ``--warmup`` times (JIT compilation included, not timed), then ``--repeats``
times, each timed up to the results being ready (``jax.block_until_ready``; CuPy: the device is
synchronised); the optimizer state is carried from call to call as in training. The table gives
medians and the ratio to JAX; ``--out`` (default ``results/xp_vs_jax.json``) also gets the
quartiles, the devices and the command, and the Markdown table beside it (``.md``).
No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lnb_fast
from lnb import models
from lnb_fast import xp as lnbxp
from lnb_ref.matfact import save_json

SETTINGS = dict(ridge=1e-3, b1=0.9, b2=0.99, cg_iterations=2, z0=0.0, weight_decay=0.0)
EPSILON = 1e-2


def cupy_or_reason() -> tuple[Any, str | None]:
    """``(cupy, None)`` if CuPy imports and sees a CUDA device, else ``(None, why not)``."""
    try:
        import cupy
    except ImportError as e:
        return None, f"CuPy not installed ({e})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy sees no CUDA device"
    except Exception as e:
        return None, f"no CUDA device ({type(e).__name__}: {e})"
    return cupy, None


def build(kind: str, quick: bool):
    """``(model, batch, xp neurons, layer names)`` for ``mlp`` or ``cnn``."""
    if kind == "mlp":
        hidden, batch = ((128,), 256) if quick else ((800, 800), 1000)
        model = models.mlp(784, 10, hidden=hidden, activation="tanh")
        sizes = [784, *hidden, 10]
        neurons = [
            lnbxp.Dense(a, b, bias=True, name=f"layer{i}")
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
        ]
        return model, batch, neurons
    channels, batch = ((8, 16), 32) if quick else ((16, 32), 256)
    model = cnn_model(channels)
    neurons = [
        lnbxp.Conv2d(1, channels[0], 3, 1, 1, bias=True, name="conv0"),
        lnbxp.Conv2d(channels[0], channels[1], 3, 2, 1, bias=True, name="conv1"),
        lnbxp.Dense(14 * 14 * channels[1], 10, bias=True, name="out"),
    ]
    return model, batch, neurons


def cnn_model(channels: tuple[int, int]) -> models.Model:
    """:func:`lnb.models.cnn` with explicit symmetric padding 1 instead of "SAME" (which at
    stride 2 pads (0, 1)), so that both paths see exactly the same patches."""
    base = models.cnn((28, 28, 1), 10, channels=channels, strides=(1, 2))

    def apply(params, x):
        y = jnp.asarray(x, jnp.float32)
        for i, s in enumerate((1, 2)):
            p = params[f"conv{i}"]
            y = lax.conv_general_dilated(
                y, p["w"], (s, s), ((1, 1), (1, 1)), dimension_numbers=models.CONV_DIMS
            )
            y = jax.nn.relu(y + p["b"])
        return models.dense(params["out"], y.reshape(y.shape[0], -1))

    return base._replace(apply=apply)


def to_rows(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A JAX dense ``(d_in, d_out)`` or HWIO kernel and its bias as θ ``(K, D)``, bias last."""
    if w.ndim == 4:  # HWIO -> (c_out, c_in·kh·kw) in (channel, kh, kw) order
        w = w.transpose(3, 2, 0, 1).reshape(w.shape[3], -1)
    else:
        w = w.T
    return np.concatenate([w, b[:, None]], axis=1)


def jax_inputs(model, batch: int, seed: int = 0):
    """Parameters, gradients and features of one forward/backward pass of the JAX model."""
    rng = np.random.default_rng(seed)
    params = model.init(rng)
    x = jnp.asarray(rng.normal(size=(batch, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
    _, grads, features = jax.jit(lnb_fast.value_and_grad(models.loss_fn(model)))(params, (x, y))
    return params, grads, features


def xp_inputs(neurons, params, grads, features):
    """The same arrays in the xp layout (NumPy float32): θ rows, NCHW conv inputs."""
    by_layer = {
        n.weight_path.split("'")[1]: X
        for n, X in zip(features.table.neurons, features.values, strict=True)
    }
    p, g, f = [], [], []
    for n in neurons:
        layer = n.name
        p.append(to_rows(np.asarray(params[layer]["w"]), np.asarray(params[layer]["b"])))
        g.append(to_rows(np.asarray(grads[layer]["w"]), np.asarray(grads[layer]["b"])))
        X = np.asarray(by_layer[layer])
        f.append(X.transpose(0, 3, 1, 2) if isinstance(n, lnbxp.Conv2d) else X.reshape(len(X), -1))
    return p, g, f


def timed(fn, sync, warmup: int, repeats: int) -> tuple[list[float], Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; seconds per call, and the
    result of the first call (the first step from a fresh state)."""
    first = fn()
    sync(first)
    for _ in range(warmup - 1):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return times, first


def xp_runner(neurons, p, g, f, put):
    """A closure doing one ``lnb_fast.xp.OnlineLNB`` step, carrying its state."""
    opt = lnbxp.OnlineLNB(neurons, EPSILON, **SETTINGS)
    p, g, f = [put(a) for a in p], [put(a) for a in g], [put(a) for a in f]
    box = {"state": opt.init(p)}

    def run():
        new, box["state"], info = opt.step(p, g, f, box["state"])
        return new

    return run


def jax_runner(params, grads, features):
    opt = lnb_fast.lnb(EPSILON, **SETTINGS)
    update = jax.jit(lambda g, s, p, f: opt.update(g, s, p, features=f))
    box = {"state": opt.init(params)}

    def run():
        updates, box["state"] = update(grads, box["state"], params, features)
        return updates

    return run


def quartiles(seconds: list[float]) -> dict[str, float]:
    q1, med, q3 = np.percentile(np.asarray(seconds) * 1e3, [25, 50, 75])
    return {"q1": float(q1), "median": float(med), "q3": float(q3)}


def measure(kind: str, args, cupy) -> dict[str, Any]:
    model, batch, neurons = build(kind, args.quick)
    params, grads, features = jax_inputs(model, batch)
    p, g, f = xp_inputs(neurons, params, grads, features)
    runs: dict[str, list[float]] = {}
    steps: dict[str, list[np.ndarray]] = {}  # each backend's first update, as θ rows
    runs["numpy"], first = timed(
        xp_runner(neurons, p, g, f, np.asarray), lambda r: r, args.warmup, args.repeats
    )
    steps["numpy"] = [a - b for a, b in zip(first, p, strict=True)]
    if cupy is not None:
        sync = lambda r: cupy.cuda.Device().synchronize()  # noqa: E731
        runs["cupy"], first = timed(
            xp_runner(neurons, p, g, f, cupy.asarray), sync, args.warmup, args.repeats
        )
        steps["cupy"] = [cupy.asnumpy(a) - b for a, b in zip(first, p, strict=True)]
    runs["jax"], first = timed(
        jax_runner(params, grads, features), jax.block_until_ready, args.warmup, args.repeats
    )
    ref = [to_rows(np.asarray(first[n.name]["w"]), np.asarray(first[n.name]["b"])) for n in neurons]
    diff = {
        name: max(
            float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(u, ref, strict=True)
        )
        for name, u in steps.items()
    }
    stats = {name: quartiles(t) for name, t in runs.items()}
    ms = {name: s["median"] for name, s in stats.items()}
    return {
        "model": kind,
        "name": model.name,
        "batch": batch,
        "n_params": int(sum(a.size for a in p)),
        "ms": ms,
        "quartiles_ms": stats,
        "ratio_to_jax": {name: ms[name] / ms["jax"] for name in ms},
        "max_rel_diff": diff,
    }


def machine(cupy) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy_device": "cpu",
        "jax_device": str(jax.devices()[0].device_kind),
        "jax_platform": jax.default_backend(),
    }
    if cupy is not None:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        info["cupy"] = cupy.__version__
        info["cupy_device"] = name.decode() if isinstance(name, bytes) else str(name)
    return info


def markdown(data: dict[str, Any]) -> str:
    backends = [b for b in ("numpy", "cupy", "jax") if any(b in r["ms"] for r in data["rows"])]
    m = data["machine"]
    lines = [
        "# One Algorithm-2 step: lnb_fast.xp (NumPy/CuPy) vs lnb_fast.lnb (JAX)",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Devices: numpy on {m['cpu']} ({m['cpu_count']} cores); "
        + (f"cupy {m['cupy']} on {m['cupy_device']}; " if "cupy" in m else "")
        + f"jax {m['jax']} on {m['jax_platform']} ({m['jax_device']}).",
        "" if not data.get("cupy_skipped") else f"\nCuPy skipped: {data['cupy_skipped']}.\n",
        "Median ms per step (optimizer step only: moments, preconditioner, 2 PCG iterations, "
        "update); ratio = ms / jax ms.",
        "",
        "| model | batch | params | "
        + " | ".join(f"{b} ms" for b in backends)
        + " | "
        + " | ".join(f"{b}/jax" for b in backends if b != "jax")
        + " | max rel. diff of the update vs jax |",
        "|" + "---|" * (3 + 2 * len(backends)),
    ]
    for r in data["rows"]:
        cells = [r["name"], str(r["batch"]), str(r["n_params"])]
        cells += [f"{r['ms'][b]:.2f}" if b in r["ms"] else "—" for b in backends]
        cells += [
            f"{r['ratio_to_jax'][b]:.2f}" if b in r["ms"] else "—" for b in backends if b != "jax"
        ]
        cells.append(", ".join(f"{b} {d:.1e}" for b, d in r["max_rel_diff"].items()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, few repeats")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20; 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 3; 1)")
    parser.add_argument("--no-cupy", action="store_true", help="skip CuPy even if available")
    parser.add_argument("--out", type=Path, default=Path("results/xp_vs_jax.json"))
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cupy, why = (None, "--no-cupy") if args.no_cupy else cupy_or_reason()
    if why:
        print(f"cupy: skipped ({why})", file=sys.stderr)
    rows = [measure(kind, args, cupy) for kind in args.models]
    data = {
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(argv),
        "machine": machine(cupy),
        "settings": {
            "epsilon": EPSILON,
            **SETTINGS,
            "quick": args.quick,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "cupy_skipped": why,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_json(args.out, data, indent=2)
    md = markdown(data)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
