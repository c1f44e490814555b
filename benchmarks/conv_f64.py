"""Why a float64 convolution's metric product loses digits on an NVIDIA GPU, and only under jit.

    .venv/bin/python benchmarks/conv_f64.py      # writes results/conv_f64.{json,md}

On the H200 (``benchmarks/gpu_h200.md``) three float64 cross-checks of convolutions missed their
tolerances by 5e-9 to 1.6e-8. This script isolates the first of them: the conv neuron of
``tests/test_fast_crosscheck.py::test_conv_cases_cover_the_options`` (stride 2, padding 1,
dilation 2, 2 groups, a bias; NCHW and NHWC), whose metric product ``M v = Jᵀ(J v)/n_i + γ v``
(Eq. 11, §3.4) ``lnb_fast`` computes as one forward of the convolution, its VJP and a division
by the ``n_i`` samples. For each layout it reports, per leaf (weight, bias), the relative
error of the product on the default device against the same code on JAX's CPU backend:

* ``jit``: ``Neuron.metric_matvec`` compiled with ``jax.jit``, as the optimizer runs it;
* ``eager``: the same product op by op;
* ``vjp_jit``: ``Jᵀ(J v)`` compiled, without the division by ``n_i``;

and ``jit_vs_ref``, the compiled product on the default device against ``lnb_ref`` (NumPy,
float64); ``float32_scale``, ``|fl32(1/n_i)·n_i − 1|``, the error of a product whose ``1/n_i``
was rounded to float32 on its way; ``conv_targets``, the custom calls the compiled product runs
its convolutions as.

On the CPU the first three are 0 (the same device) and ``jit_vs_ref`` is float64 rounding. On
the H200 (JAX 0.11.2, CUDA 13; ``benchmarks/gpu_h200.md``, second session) the jitted weight
leaf was off by 7.5e-9, which is ``float32_scale`` for its 18 samples, while the eager product
and the undivided VJP were off by 1.7e-16, and the compiled convolutions were
``__cudnn$convBiasActivationForward`` calls: XLA's GPU compiler folds the division into cuDNN's
fused convolution as its output scale, and the error is exactly that of a float32 scale (the type
cudnn-frontend's pull request 423 corrected for float64 convolutions in 2026). One factor
``1 + δ`` then multiplies all of ``M``, which LNB's step, rescaled to length ε, absorbs to
``δ/2``: it matters only to float64 cross-checks at 1e-10.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lnb.testing import rel_err  # noqa: E402
from lnb.testing.crosscheck import conv_case  # noqa: E402
from lnb_ref.matfact import save_json  # noqa: E402
from lnb_ref.metric import metric_matvec  # noqa: E402

RIDGE = 1e-3


def float32_scale_error(n: int) -> float:
    """``|fl32(1/n)·n − 1|``: the relative error of a division by ``n`` done as a float32 scale."""
    return abs(float(np.float32(1.0 / n)) * n - 1.0)


def measure(layout: str) -> dict:
    """The errors of one layout's metric product (module docstring)."""
    case = conv_case(np.random.default_rng(1), 2, 4, 6, 7, 3, 2, 1, 2, 2, True, layout)
    rng = np.random.default_rng(3)
    g, v = (rng.normal(size=case.ref.theta_shape) for _ in range(2))
    neuron = case.neuron(case.from_ref(g))
    leaves = tuple(case.from_ref(v).values())
    keys = list(case.from_ref(v))
    n = neuron.n_samples

    def product(X, u):
        return neuron.metric_matvec(X, u, RIDGE)

    def undivided(X, u):
        out, pullback = jax.vjp(lambda p: case.apply(p, X), dict(zip(keys, u, strict=True)))
        grads = pullback(out)[0]
        return tuple(grads[k] for k in keys)

    variants = {"jit": jax.jit(product), "eager": product, "vjp_jit": jax.jit(undivided)}
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]

    def run(fn, where):
        out = fn(jax.device_put(case.X_jax, where), jax.device_put(leaves, where))
        return [np.asarray(a) for a in out]

    row = {"layout": layout, "case": case.description, "n_samples": int(n)}
    for name, fn in variants.items():  # this device against JAX's CPU backend, per leaf
        here, there = run(fn, device), run(fn, cpu)
        row[name] = [rel_err(a, b) for a, b in zip(here, there, strict=True)]
    ref = case.from_ref(metric_matvec(case.ref, case.X_ref, v, RIDGE)).values()
    row["jit_vs_ref"] = [
        rel_err(a, b) for a, b in zip(run(variants["jit"], device), ref, strict=True)
    ]
    row["float32_scale"] = float32_scale_error(int(n))
    X, u = jax.device_put(case.X_jax, device), jax.device_put(leaves, device)
    compiled = jax.jit(product).lower(X, u).compile().as_text()
    targets = sorted(set(re.findall(r'custom_call_target="([^"]*conv[^"]*)"', compiled, re.I)))
    row["conv_targets"] = targets or ["XLA convolution ops"]
    return row


def table(rows: list[dict]) -> str:
    def errs(e):
        return " / ".join(f"{x:.1e}" for x in e)

    lines = [
        "| layout | n_i | jit (weight / bias) | eager | VJP, jit, undivided | jit vs lnb_ref "
        "| fl32(1/n_i) error | convolutions run as |",
        "|---|---:|---|---|---|---|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['n_samples']} | {errs(r['jit'])} | {errs(r['eager'])} "
            f"| {errs(r['vjp_jit'])} | {errs(r['jit_vs_ref'])} | {r['float32_scale']:.2e} "
            f"| {', '.join(r['conv_targets'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/conv_f64.json"))
    args = parser.parse_args(argv)
    with jax.enable_x64(True):  # the cross-checks' float64
        rows = [measure(layout) for layout in ("NCHW", "NHWC")]
    device = jax.devices()[0]
    text = f"Device: {device.device_kind} ({device.platform}), JAX {jax.__version__}.\n\n" + table(
        rows
    )
    print(text)
    record = {"device": device.device_kind, "platform": device.platform, "rows": rows}
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_json(args.out, record, indent=2)
        args.out.with_suffix(".md").write_text(text + "\n")
    except OSError as err:
        print(f"error: --out {args.out}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
