"""``lnb_fast.xp`` (the array-API path) against ``lnb_ref``, on every available array library.

The same comparisons run on each backend: NumPy always; CuPy when it imports and a CUDA device
is present (float64 on the GPU too, so the tolerances below hold); ``array_api_strict`` when it
is installed (it rejects anything outside the standard, so it checks that the code would run on
any compliant library). Inputs are drawn in NumPy float64, moved to the backend, and results
moved back for the comparison.

Tolerances (:mod:`lnb.testing.tolerances`): both sides run in float64 and differ only in
summation order (a few matmuls vs the reference's ``einsum``) on well-conditioned problems
(correlated features, a ridge γ ≥ 1e-3 so that no metric is singular): ``rounding`` (1e-10) per
quantity; whole training runs compound it over 10 steps and the networks' nonlinearity:
``steps`` (1e-9).
"""

from __future__ import annotations

import ast
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lnb_ref
from lnb.testing import rel_err
from lnb.testing.strategies import xp_problems
from lnb.testing.tolerances import RTOL, STEP_RTOL
from lnb_fast import xp as lnbxp
from lnb_fast.errors import NonFiniteError, StructureError
from lnb_ref import metric as ref_metric
from lnb_ref import solvers as ref_solvers

ROOT = Path(__file__).resolve().parents[1]


# --- backends ---------------------------------------------------------------------------------
class Backend:
    """An array library: ``put`` moves a NumPy array onto it, ``get`` back to NumPy."""

    def __init__(self, name, put, get):
        self.name, self.put, self.get = name, put, get


def _numpy():
    return Backend("numpy", lambda a: np.asarray(a, dtype=np.float64), np.asarray)


def _cupy():
    try:
        import cupy
    except ImportError as e:
        pytest.skip(f"CuPy not installed / no CUDA device: cupy does not import ({e})")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no runtime
        pytest.skip(f"CuPy not installed / no CUDA device: {type(e).__name__}: {e}")
    if n < 1:
        pytest.skip("CuPy not installed / no CUDA device: cupy imports but sees 0 CUDA devices")
    return Backend("cupy", lambda a: cupy.asarray(np.asarray(a, dtype=np.float64)), cupy.asnumpy)


def _strict():
    strict = pytest.importorskip(
        "array_api_strict", reason="array_api_strict not installed (optional strictness check)"
    )
    return Backend(
        "array_api_strict",
        lambda a: strict.asarray(np.asarray(a, dtype=np.float64)),
        lambda a: np.from_dlpack(a),
    )


@pytest.fixture(params=["numpy", "cupy", "array_api_strict"], scope="module")
def backend(request):
    return {"numpy": _numpy, "cupy": _cupy, "array_api_strict": _strict}[request.param]()


# --- random neurons: lnb.testing.strategies.xp_problems ------------------------------------
@given(xp_problems())
def test_design_metric_and_moments_match_reference(backend, problem):
    ref, new, X, _, v, _, _, _, ridge = problem
    Xb, vb = backend.put(X), backend.put(v)
    assert new.theta_shape == ref.theta_shape and new.n_samples(Xb) == ref.n_samples(X)
    # the design is a copy of entries of X (and ones): exactly equal
    np.testing.assert_array_equal(backend.get(new.design(Xb)), ref.design(X))
    got = backend.get(lnbxp.metric_matvec(new, Xb, vb, ridge))
    assert rel_err(got, ref_metric.metric_matvec(ref, X, v, ridge)) < RTOL
    C = backend.get(lnbxp.row_metric(new, Xb, ridge))
    assert rel_err(C, ref_metric.row_metric(ref, X, ridge)) < RTOL
    for got, want in zip(
        lnbxp.design_moments(new, Xb), ref_solvers.design_moments(ref, X), strict=True
    ):
        assert rel_err(backend.get(got), want) < RTOL


@given(xp_problems())
def test_preconditioners_match_reference(backend, problem):
    ref, new, _, _, v, _, mu, chi, ridge = problem
    P_new = lnbxp.paper_preconditioner(new, backend.put(mu), backend.put(chi), ridge)
    P_ref = ref_solvers.paper_preconditioner(ref, mu, chi, ridge)
    assert type(P_new).__name__ == type(P_ref).__name__
    assert rel_err(backend.get(P_new(backend.put(v))), P_ref(v)) < RTOL


@given(xp_problems(), st.integers(1, 4), st.booleans(), st.booleans())
def test_every_pcg_iterate_matches_reference(backend, problem, iterations, precondition, warm):
    ref, new, X, g, _, x0, mu, chi, ridge = problem
    Xb = backend.put(X)
    P_new = lnbxp.paper_preconditioner(new, backend.put(mu), backend.put(chi), ridge)
    P_ref = ref_solvers.paper_preconditioner(ref, mu, chi, ridge)
    got = lnbxp.pcg(
        lnbxp.metric_operator(new, Xb, ridge),
        backend.put(g),
        iterations,
        P_new if precondition else None,
        backend.put(x0) if warm else None,
    )
    want = ref_solvers.pcg(
        lambda u: ref_metric.metric_matvec(ref, X, u, ridge),
        g,
        iterations,
        P_ref if precondition else None,
        x0 if warm else None,
    )
    assert len(got.iterates) == len(want.iterates) == iterations
    for a, b in zip(got.iterates, want.iterates, strict=True):
        assert rel_err(backend.get(a), b) < RTOL
    # residual norms: compared relative to the initial one (a late residual may be tiny)
    r = np.array([float(backend.get(x)) for x in got.residual_norms])
    assert np.max(np.abs(r - want.residual_norms)) < RTOL * want.residual_norms[0]
    # Σ θ̂ · g of this neuron (the unclamped z: index 2 of boosting_update's result)
    raw_z = lnbxp.boosting_update([got.x], [got.x], [backend.put(g)], 1.0)[2]
    want_z = ref_metric.step_norm(want.x, g)
    assert abs(float(backend.get(raw_z)) - want_z) < RTOL * np.linalg.norm(want.x) * np.linalg.norm(
        g
    )


def test_pcg_stops_cleanly_at_an_exact_solution(backend):
    """A zero right-hand side from x0 = 0: r = 0, so every iterate repeats 0 (no 0/0)."""
    new = lnbxp.Dense(3, 2, bias=True)
    X = backend.put(np.random.default_rng(0).normal(size=(10, 3)))
    res = lnbxp.pcg(lnbxp.metric_operator(new, X), backend.put(np.zeros((2, 4))), 3)
    assert all(np.all(backend.get(x) == 0) for x in res.iterates)
    assert [float(backend.get(r)) for r in res.residual_norms] == [0.0] * 4


# --- Algorithm 2 on the reference's networks --------------------------------------------------
def _train_both(backend, net, X, Y, steps=10, **kw):
    """Train ``net`` from the same start with lnb_ref.OnlineLNB and lnb_fast.xp.OnlineLNB, each
    on its own parameters (gradients and features from lnb_ref's backprop); yield per step the
    two parameter lists and the two StepInfos."""
    rng = np.random.default_rng(1)
    p_ref = net.init(rng)
    p_new = [backend.put(p) for p in p_ref]
    opt_ref = lnb_ref.OnlineLNB(net.neurons, **kw)
    xp_neurons = []
    for n in net.neurons:
        if isinstance(n, lnb_ref.Conv2d):
            xp_neurons.append(
                lnbxp.Conv2d(
                    n.c_in, n.c_out, n.kernel_size, n.stride, n.padding, n.dilation,
                    n.groups, n.bias, name=n.name,
                )
            )  # fmt: skip
        else:
            xp_neurons.append(lnbxp.Dense(n.d_in, n.d_out, n.bias, name=n.name))
    opt_new = lnbxp.OnlineLNB(xp_neurons, **kw)
    s_ref, s_new = opt_ref.init(p_ref), opt_new.init(p_new)
    for t in range(steps):
        batch = slice(8 * t, 8 * t + 8)
        _, g_ref, f_ref = net.loss_grads_features(p_ref, X[batch], Y[batch])
        p_np = [backend.get(p) for p in p_new]
        _, g_new, f_new = net.loss_grads_features(p_np, X[batch], Y[batch])
        p_ref, s_ref, i_ref = opt_ref.step(p_ref, g_ref, f_ref, s_ref)
        g_new, f_new = [backend.put(a) for a in g_new], [backend.put(a) for a in f_new]
        p_new, s_new, i_new = opt_new.step(p_new, g_new, f_new, s_new)
        yield p_ref, [backend.get(p) for p in p_new], i_ref, i_new


SETTINGS = dict(epsilon=1e-2, weight_decay=0.1, ridge=1e-3, z0=1e-4, b1=0.9, b2=0.99)


@pytest.mark.parametrize("net_kind", ["mlp", "cnn"])
def test_online_lnb_runs_match_reference(backend, net_kind):
    rng = np.random.default_rng(0)
    if net_kind == "mlp":
        net = lnb_ref.MLP([6, 9, 7, 3], activation="tanh")
        X = rng.normal(size=(80, 6))
    else:
        net = lnb_ref.CNN((2, 7, 7), channels=(3, 4), kernel_size=3, strides=(1, 2), n_classes=3)
        X = rng.normal(size=(80, 2, 7, 7))
    Y = rng.integers(0, 3, size=80)
    for p_ref, p_new, i_ref, i_new in _train_both(backend, net, X, Y, **SETTINGS):
        assert abs(float(backend.get(i_new.z)) - i_ref.z) < STEP_RTOL * i_ref.z
        assert abs(float(backend.get(i_new.raw_z)) - i_ref.raw_z) < STEP_RTOL * abs(i_ref.raw_z)
        for a, b in zip(i_new.directions, i_ref.directions, strict=True):
            assert rel_err(backend.get(a), b) < STEP_RTOL
        for a, b in zip(p_new, p_ref, strict=True):
            assert rel_err(a, b) < STEP_RTOL


def test_online_lnb_options_match_reference(backend):
    """No bias (Jacobi), no preconditioner, cold start, a schedule, z0 clamping, b1 = 0."""
    net = lnb_ref.MLP([5, 6, 3], activation="relu", bias=False)
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(40, 5)), rng.integers(0, 3, size=40)
    for precondition, warm in ((True, False), (False, True)):
        kw = dict(
            epsilon=lambda t: 1e-2 * 0.9**t, ridge=1e-2, z0=10.0, b1=0.0, cg_iterations=3,
            precondition=precondition, warm_start=warm,
        )  # fmt: skip
        for p_ref, p_new, i_ref, i_new in _train_both(backend, net, X, Y, steps=4, **kw):
            assert float(backend.get(i_new.z)) == i_ref.z == 10.0  # z0 clamps
            for a, b in zip(p_new, p_ref, strict=True):
                assert rel_err(a, b) < STEP_RTOL


# --- errors and dtype -------------------------------------------------------------------------
def test_errors_name_the_neuron_and_argument():
    with pytest.raises(ValueError, match="'c1'.*groups=2 must divide c_in=3"):
        lnbxp.Conv2d(3, 4, 3, groups=2, name="c1")
    with pytest.raises(ValueError, match="'c1'.*stride must be"):
        lnbxp.Conv2d(2, 2, 3, stride=0, name="c1")
    with pytest.raises(ValueError, match="'d'.*d_in must be a positive int"):
        lnbxp.Dense(0, 2, name="d")
    d = lnbxp.Dense(3, 2, bias=True, name="d")
    with pytest.raises(ValueError, match=r"'d': input has shape \(4, 5\), expected \(\.\.\., 3\)"):
        lnbxp.metric_matvec(d, np.zeros((4, 5)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"'d': theta has shape \(2, 3\), expected \(2, 4\)"):
        lnbxp.metric_matvec(d, np.zeros((4, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        lnbxp.metric_matvec(d, np.zeros((4, 3)), np.zeros((2, 4)), ridge=-1.0)
    with pytest.raises(ValueError, match="'d'.*mu has shape"):
        lnbxp.IncompleteCholeskyPreconditioner(d, np.zeros(3), np.zeros((1, 3)))
    with pytest.raises(TypeError, match="no __array_namespace__"):
        lnbxp.metric_matvec(d, [[1.0, 2.0, 3.0]], np.zeros((2, 4)))
    with pytest.raises(ValueError, match="iterations must be"):
        lnbxp.pcg(lambda v: v, np.zeros(3), 0)
    with pytest.raises(ValueError, match="EMA rates"):
        lnbxp.OnlineLNB([d], 1e-2, b1=1.0)
    with pytest.raises(ValueError, match="epsilon must be a positive"):
        lnbxp.OnlineLNB([d], -1.0)
    with pytest.raises(TypeError, match=r"neurons\[0\] is a Dense; expected lnb_fast.xp"):
        lnbxp.OnlineLNB([lnb_ref.Dense("x", 3, 2)], 1e-2)
    opt = lnbxp.OnlineLNB([d], 1e-2)
    state = opt.init([np.zeros((2, 4))])
    with pytest.raises(StructureError, match="got 2 grads for 1 neurons"):
        opt.step([np.zeros((2, 4))], [np.zeros((2, 4))] * 2, [np.zeros((5, 3))], state)
    bad = np.zeros((2, 4))
    bad[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="'d': the gradient contain NaN"):
        opt.step([np.zeros((2, 4))], [bad], [np.zeros((5, 3))], state)


def test_float32_stays_float32():
    """Dtype follows the inputs (float32 is the common case on a GPU)."""
    rng = np.random.default_rng(0)
    conv = lnbxp.Conv2d(2, 3, 3, padding=1, bias=True)
    dense = lnbxp.Dense(3 * 4 * 4, 2, bias=True)
    params = [rng.normal(size=n.theta_shape).astype(np.float32) for n in (conv, dense)]
    feats = [rng.normal(size=(5, 2, 4, 4)), rng.normal(size=(5, 48))]
    feats = [f.astype(np.float32) for f in feats]
    opt = lnbxp.OnlineLNB([conv, dense], 1e-2, ridge=1e-3)
    new, state, info = opt.step(params, params, feats, opt.init(params))
    assert all(p.dtype == np.float32 for p in new + state["mu"] + state["theta_hat"])
    assert info.z.dtype == np.float32 and float(info.z) > 0


def test_xp_package_imports_neither_jax_nor_lnb_ref():
    """A CuPy user may not have JAX: nothing under lnb_fast/xp/ imports it (or the oracle);
    outside the subpackage it imports only ``lnb_fast.errors`` (JAX-free, the shared classes)."""
    for path in (ROOT / "lnb_fast" / "xp").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.ImportFrom) and node.level == 2:
                names = [f"lnb_fast.{node.module or ''}"]
            for name in names:
                top = name.split(".")[0]
                assert top not in {"jax", "jaxlib", "lnb_ref", "optax", "scipy"}, (path, name)
                assert (
                    not name.startswith("lnb_fast")
                    or name.startswith("lnb_fast.xp")
                    or name == "lnb_fast.errors"
                ), name


_WITHOUT_JAX = """
import sys

class _NoJax:  # as if JAX and optax were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "optax"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoJax())

import numpy as np
import lnb_fast.xp as lnbxp
from lnb_fast.errors import LNBError, StructureError

d = lnbxp.Dense(3, 2, bias=True, name="d")
rng = np.random.default_rng(0)
params, grads = [rng.normal(size=(2, 4))], [rng.normal(size=(2, 4))]
opt = lnbxp.OnlineLNB([d], 1e-2, ridge=1e-3)
new, state, info = opt.step(params, grads, [rng.normal(size=(5, 3))], opt.init(params))
assert new[0].shape == (2, 4) and state["t"] == 1 and float(info.z) > 0
assert not np.allclose(new[0], params[0])
try:
    opt.step(params, grads, [np.zeros((5, 7))], state)
except StructureError as err:
    assert "'d': input has shape (5, 7)" in str(err), err
else:
    raise AssertionError("no StructureError for a wrong feature shape")
import lnb_fast
assert lnb_fast.LNBError is LNBError
try:
    lnb_fast.lnb
except ImportError as err:
    assert "needs JAX and optax" in str(err) and "lnb_fast.xp" in str(err), err
else:
    raise AssertionError("lnb_fast.lnb imported without JAX")
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "optax"))
assert not leaked, leaked
print("ok")
"""


def test_xp_runs_without_jax_installed():
    """``lnb_fast.xp`` (and ``lnb_fast.errors``) import and take a NumPy step when JAX and
    optax cannot be imported; ``lnb_fast.lnb`` then says what is missing."""
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_JAX],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_shape_errors_are_the_jax_backends_classes():
    """A gradient or input of the wrong shape is a ``StructureError`` as in the JAX optimizers
    (still a ValueError, as before)."""
    d = lnbxp.Dense(3, 2, bias=True, name="d")
    opt = lnbxp.OnlineLNB([d], 1e-2)
    state = opt.init([np.zeros((2, 4))])
    with pytest.raises(StructureError, match=r"'d': gradient has shape \(2, 3\)"):
        opt.step([np.zeros((2, 4))], [np.zeros((2, 3))], [np.zeros((5, 3))], state)
    with pytest.raises(StructureError, match="'c': input has shape"):
        lnbxp.Conv2d(2, 3, 3, name="c").n_samples(np.zeros((1, 4, 5, 5)))


def test_lazy_names_are_the_objects_not_their_submodules():
    """``lnb_fast.pcg``/``describe``/``foof`` stay the functions even when their submodules were
    imported first (a lazily loaded package would otherwise expose the submodule)."""
    code = (
        "import types, lnb_fast.transform, lnb_fast.describe, lnb_fast.foof\n"
        "import lnb_fast\n"
        "from lnb_fast import describe, foof, lnb, pcg, value_and_grad\n"
        "for f in (describe, foof, lnb, pcg, value_and_grad, lnb_fast.pcg, lnb_fast.describe):\n"
        "    assert callable(f) and not isinstance(f, types.ModuleType), f\n"
        "assert lnb_fast.lnb is lnb and set(lnb_fast.__all__) <= set(dir(lnb_fast))\n"
        "assert all(getattr(lnb_fast, n) is not None for n in lnb_fast.__all__)\n"
        "print('ok')\n"
    )
    pytest.importorskip("jax")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- the docs page's example and the benchmark's quick mode -----------------------------------
def test_docs_example_runs_and_trains():
    text = (ROOT / "docs" / "xp.md").read_text()
    match = re.search(r"<!-- example: xp -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/xp.md lost its marked example"
    scope: dict = {"__name__": "docs_xp"}
    exec(compile(match.group(1), "docs/xp.md", "exec"), scope)
    losses = scope["losses"]
    assert len(losses) == 50 and losses[-1] < 0.5 * losses[0]


def test_benchmark_quick_mode_writes_its_tables(tmp_path, monkeypatch):
    pytest.importorskip("jax")
    out = tmp_path / "xp_vs_jax.json"
    monkeypatch.setattr(sys, "argv", ["xp_vs_jax.py", "--quick", "--out", str(out)])
    monkeypatch.syspath_prepend(str(ROOT))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / "xp_vs_jax.py"), run_name="__main__")
    assert exit_info.value.code == 0
    data = json.loads(out.read_text())
    assert {"machine", "command", "rows"} <= set(data)
    assert {r["model"] for r in data["rows"]} == {"mlp", "cnn"}
    for row in data["rows"]:
        ms, ratio = row["ms"], row["ratio_to_jax"]
        assert {"numpy", "jax"} <= set(ms) and ms["numpy"] > 0 and ms["jax"] > 0
        assert ratio["numpy"] == pytest.approx(ms["numpy"] / ms["jax"])
        # both paths take the same float32 step from the same gradients and features: they
        # agree to float32 rounding amplified by 2 CG iterations (~1e-5 measured), not 1e-10
        assert row["max_rel_diff"]["numpy"] < 1e-3
    md = out.with_suffix(".md").read_text()
    assert "| model |" in md and "numpy" in md and "jax" in md
