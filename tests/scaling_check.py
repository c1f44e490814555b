"""Data-parallel steps of every lnb_fast transformation against the single-device step on the
global batch, on 8 simulated CPU devices; run by ``tests/test_scaling.py`` in a subprocess (the
device count is fixed when JAX starts, and the rest of the suite keeps one device).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scaling_check.py

prints one JSON object: per transformation and recipe the largest relative difference of the
parameters after ``STEPS`` steps; the caller asserts on it. float64 throughout: the sharded runs
differ from the single-device run only by the order of the sums over the batch (a mean of 8
shard means instead of one mean), i.e. by rounding of order ``n·eps`` per sum, amplified by the
few PCG iterations and the Cholesky of a ridge-damped metric (κ ≤ 1e3 here), so 1e-9 leaves
several orders of magnitude; a missing reduction (one replica's features) moves the step by O(1).
"""

from __future__ import annotations

import json
import os
import sys

DEVICES = 8
STEPS = 2  # the covariance strategies refresh at step 1 and use a stale inverse at step 2
#: the recipes each transformation runs under, besides shard_map (every one): jit + NamedSharding
#: runs every transformation that has no axis-only option (the "/refresh", "/split" variants
#: need axis_name); compiling for 8 devices dominates the time, so the two other recipes are
#: checked on a few transformations
JIT = (
    "lnb-auto",
    "lnb-matrix-free",
    "lnb-gram",
    "lnb-covariance",
    "scale_by_lnb",
    "foof",
    "locoprop_s",
    "locoprop_m",
    "proxprop",
)
UNCHECKED = ("lnb-matrix-free", "foof")
PRE_AVERAGED = ("lnb-gram", "proxprop")

if __name__ == "__main__":
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lnb_fast  # noqa: E402

jax.config.update("jax_enable_x64", True)

BATCH = 32  # 4 rows per device


def problem(seed: int = 0):
    """A small MLP (6 → 10 → 12 → 3, biases, tanh then relu) and a batch of ``BATCH`` rows.
    No weight has the shape of a metric (``d_in × d_in``), so an all-gathered weight is told
    apart from an all-gathered Gram by its shape alone (:func:`tensor_sharded`)."""
    rng = np.random.default_rng(seed)
    sizes = (6, 10, 12, 3)
    params = {
        f"layer{i}": {
            "w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a)),
            "b": jnp.asarray(0.1 * rng.normal(size=b)),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }
    x = jnp.asarray(rng.normal(size=(BATCH, sizes[0])) + 0.5)
    y = jax.nn.one_hot(rng.integers(0, sizes[-1], BATCH), sizes[-1])
    return params, x, y


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["layer0"]["w"] + params["layer0"]["b"])
    h = jax.nn.relu(h @ params["layer1"]["w"] + params["layer1"]["b"])
    logits = h @ params["layer2"]["w"] + params["layer2"]["b"]
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))


def transformations(table, axis_name=None):
    """Every transformation, built for ``axis_name`` (None: single device or jit)."""
    kw = {"axis_name": axis_name}
    out = {
        f"lnb-{s}": lnb_fast.lnb(
            0.05, strategy=s, neurons=table, refresh_every=2, cg_iterations=3, **kw
        )
        for s in ("auto", "matrix-free", "gram", "covariance")
    }
    # each replica keeps its own second-moment EMA, averaged on refresh steps only (every
    # step here, so that step 2 averages EMAs that each replica accumulated over two steps)
    out["lnb-covariance/refresh"] = lnb_fast.lnb(
        0.05,
        strategy="covariance",
        neurons=table,
        refresh_every=1,
        covariance_sync="refresh",
        **kw,
    )
    out["foof"] = lnb_fast.foof(0.1, neurons=table, refresh_every=2, **kw)
    out["foof/refresh"] = lnb_fast.foof(
        0.1, neurons=table, refresh_every=1, covariance_sync="refresh", **kw
    )
    # each inverse of a refresh computed on one replica and shared (split_refresh; a no-op on
    # one device, so the single-device runs are the plain ones)
    out["lnb-covariance/split"] = lnb_fast.lnb(
        0.05, strategy="covariance", neurons=table, refresh_every=2, split_refresh=True, **kw
    )
    out["foof/refresh+split"] = lnb_fast.foof(
        0.1,
        neurons=table,
        refresh_every=1,
        covariance_sync="refresh",
        split_refresh=True,
        **kw,
    )
    # the optax-shaped pieces: scale_by_lnb's unit-length direction, scaled to ε = 0.05 here
    out["scale_by_lnb"] = optax.chain(
        lnb_fast.scale_by_lnb(neurons=table, refresh_every=2, cg_iterations=3, **kw),
        optax.scale(-(0.05**0.5)),
    )
    out["locoprop_s"] = lnb_fast.locoprop_s(1.0, **kw)
    out["locoprop_m"] = lnb_fast.locoprop_m(1.0, **kw)
    out["proxprop"] = lnb_fast.proxprop(1.0, **kw)
    return out


def make_step(opt, vgf, pre_average=None):
    def step(params, state, x, y):
        _, grads, features = vgf(params, x, y)
        if pre_average:  # the caller averages the gradients itself: not reduced twice
            grads = jax.lax.pmean(grads, pre_average)
        updates, state = opt.update(grads, state, params, features=features)
        return optax.apply_updates(params, updates), state

    return step


def make_runs(opts: dict, vgf, stacked: bool = False, pre_average=None):
    """One function running ``STEPS`` steps of every transformation in ``opts`` from the same
    parameters: ``(params, x, y) -> {name: params}`` (with ``stacked``, each replica's copy on
    a new leading axis). One program instead of one per transformation: compiling for 8 devices
    is most of the time."""

    def runs(params, x, y):
        out = {}
        for name, opt in opts.items():
            # scanned: the step is compiled once, not STEPS times
            step = make_step(opt, vgf, pre_average)
            (p, _), _ = jax.lax.scan(
                lambda carry, _, step=step: (step(*carry, x, y), None),
                (params, opt.init(params)),
                length=STEPS,
            )
            out[name] = jax.tree.map(lambda a: a[None], p) if stacked else p
        return out

    return runs


def on_batch_axis(runs, mesh, out_specs=None, check_vma=True):
    """``runs(params, x, y)`` jitted inside ``shard_map``: parameters replicated, the batch
    split over ``"data"``; ``out_specs`` default ``P()`` (replicated outputs)."""
    return jax.jit(
        jax.shard_map(
            runs,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=P() if out_specs is None else out_specs,
            check_vma=check_vma,
        )
    )


def rel(a, b) -> float:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / max(np.max(np.abs(v)), 1e-300))
        for u, v in leaves
    )


def spread(stacked) -> float:
    """How far the replicas' copies (stacked on axis 0) are from replica 0's."""
    return max(
        float(np.max(np.abs(np.asarray(s) - np.asarray(s)[:1]))) for s in jax.tree.leaves(stacked)
    )


def main() -> dict:
    assert jax.device_count() == DEVICES, jax.devices()
    params, x, y = problem()
    vgf = lnb_fast.value_and_grad(loss_fn)
    table = vgf.table(params, x, y)
    local_table = vgf.table(params, x[: BATCH // DEVICES], y[: BATCH // DEVICES])
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
    batch = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    singles = transformations(table)
    sharded = transformations(local_table, "data")
    single = jax.jit(make_runs(singles, vgf))(params, x, y)
    results: dict = {name: {} for name in singles}

    # (b) shard_map over "data" (default check_vma=True), axis_name="data"; out_specs=P()
    # asserts (by type) that parameters come out the same on every replica
    got = on_batch_axis(make_runs(sharded, vgf), mesh)(params, xs, ys)
    for name in singles:
        results[name]["shard_map"] = rel(got[name], single[name])

    # (a) jit + NamedSharding: the single-device code, batch split over "data", the hidden
    # layers' weights split over "model" (tensor parallelism), the head replicated
    tensor = tensor_sharded(singles, vgf, params, x, y, single)
    for name in JIT:
        results[name]["jit"] = tensor["rel"][name]
    results["tensor_sharded"] = tensor

    # (b') check_vma=False: every replica's parameters returned, equal and equal to single
    got = on_batch_axis(
        make_runs({k: sharded[k] for k in UNCHECKED}, vgf, stacked=True),
        mesh,
        out_specs=P("data"),
        check_vma=False,
    )(params, xs, ys)
    for name in UNCHECKED:
        results[name]["unchecked_spread"] = spread(got[name])
        first = jax.tree.map(lambda a: np.asarray(a)[0], got[name])
        results[name]["unchecked"] = rel(first, single[name])

    # gradients the caller already averaged (pmean) are used as they are
    got = on_batch_axis(
        make_runs({k: sharded[k] for k in PRE_AVERAGED}, vgf, pre_average="data"), mesh
    )(params, xs, ys)
    for name in PRE_AVERAGED:
        results[name]["pre_averaged"] = rel(got[name], single[name])
    results["state_specs"] = state_across_steps(sharded, vgf, params, mesh, xs, ys, single)
    results["docs"] = docs_examples()
    results["errors"] = error_cases(params, x, y, vgf, mesh, xs, ys, single["lnb-auto"])
    results["split_work"] = split_work(vgf, local_table, params, mesh, xs, ys)
    results["fsdp_whole_directions"] = fsdp_whole_directions(
        vgf, table, params, x, y, single["lnb-gram"]
    )
    return results


#: recipe (a) with tensor-parallel weights on a 4 × 2 ("data", "model") mesh: the first layer
#: column-parallel (split over its outputs, as its bias), the second row-parallel (split over
#: its inputs), the head's weight split by rows over "data" as FSDP does, its bias whole
TENSOR_SPECS = {
    "layer0": {"w": P(None, "model"), "b": P("model")},
    "layer1": {"w": P("model", None), "b": P()},
    "layer2": {"w": P("data", None), "b": P()},
}


def tensor_sharded(singles, vgf, params, x, y, single) -> dict:
    """Every transformation under ``jit`` with the batch split over ``"data"`` and the weights
    of :data:`TENSOR_SPECS` split over ``"model"``: ``{"rel": {name: ...}, "keeps_sharding":
    {name: whether the returned parameters keep their shardings}, "gathered": [shapes of all-gathers
    whose result is a whole weight], "weights": [the sharded weights' shapes]}``, read from the
    one compiled program (every transformation's ``STEPS`` steps)."""
    mesh = jax.make_mesh((DEVICES // 2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), TENSOR_SPECS, is_leaf=lambda s: isinstance(s, P)
    )
    batch = NamedSharding(mesh, P("data"))
    runs = jax.jit(make_runs({k: singles[k] for k in JIT}, vgf))
    args = (jax.device_put(params, shardings), jax.device_put(x, batch), jax.device_put(y, batch))
    with jax.set_mesh(mesh):  # the context mesh: the covariance metrics kept whole (spmd.whole)
        compiled = runs.lower(*args).compile()
        got = compiled(*args)
    weights = {  # the tensor-parallel ones (FSDP gathers its weight for the forward pass)
        tuple(params[layer]["w"].shape)
        for layer, spec in TENSOR_SPECS.items()
        if "model" in tuple(spec["w"])
    }
    weights |= {w[::-1] for w in weights}  # a transposed weight is as large
    # a layer's metric: its d_in x d_in Gram, or (d_in + 1)² augmented with the bias
    metrics = {(d, d) for layer in params for d in (params[layer]["w"].shape[0],) * 2}
    metrics |= {(d + 1, d + 1) for d, _ in metrics}
    shapes = gathered_shapes(compiled.as_text())
    gathered = [list(shape) for shape in shapes if shape in weights]
    gathered_metrics = [list(shape) for shape in shapes if shape in metrics]
    return {
        "rel": {name: rel(got[name], single[name]) for name in JIT},
        "keeps_sharding": {  # the parameters come back split as they went in
            name: all(
                a.sharding.is_equivalent_to(s, a.ndim)
                for a, s in zip(jax.tree.leaves(got[name]), jax.tree.leaves(shardings), strict=True)
            )
            for name in JIT
        },
        "gathered": gathered,
        "gathered_metrics": gathered_metrics,
        "weights": sorted(list(w) for w in weights),
    }


def gathered_shapes(hlo: str) -> list[tuple[int, ...]]:
    """The result shape of every all-gather in a compiled program's text (an async start's is
    the last of its tuple), without its axes of size 1."""
    import re

    shapes = []
    for line in hlo.splitlines():
        op = re.search(r"=\s*(.+?)\s+all-gather(?:-start)?\(", line)
        if op:
            dims = re.findall(r"\[([\d,]*)\]", op.group(1))[-1]
            shapes.append(tuple(int(d) for d in dims.split(",") if d and int(d) > 1))
    return shapes


def fsdp_whole_directions(vgf, table, params, x, y, single) -> dict:
    """The ``"gram"`` strategy under FSDP: every weight split by rows over a 2-device ``"data"``
    axis (6, 10 and 12 rows), the batch too, the mesh set; with and without
    ``whole_directions``: ``{option: {"rel": to one device's step, "weight_gathers": how many
    all-gathers yield a whole weight (or its transpose) in the compiled steps}}``."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    shardings = {
        layer: {"w": NamedSharding(mesh, P("data", None)), "b": NamedSharding(mesh, P())}
        for layer in params
    }
    batch = NamedSharding(mesh, P("data"))
    args = (jax.device_put(params, shardings), jax.device_put(x, batch), jax.device_put(y, batch))
    weights = {tuple(layer["w"].shape) for layer in params.values()}
    weights |= {w[::-1] for w in weights}
    out = {}
    for option in (False, True):
        opt = lnb_fast.lnb(
            0.05,
            strategy="gram",
            neurons=table,
            refresh_every=2,
            cg_iterations=3,
            whole_directions=option,
        )
        with jax.set_mesh(mesh):
            compiled = jax.jit(make_runs({"lnb-gram": opt}, vgf)).lower(*args).compile()
            got = compiled(*args)["lnb-gram"]
        gathers = [s for s in gathered_shapes(compiled.as_text()) if s in weights]
        out[str(option)] = {"rel": rel(got, single), "weight_gathers": len(gathers)}
    return out


def split_work(vgf, table, params, mesh, xs, ys) -> dict:
    """Which replica inverts which metric in one refresh step, with and without
    ``split_refresh``: ``{"split": [[replica, D, "whole" or "columns"], ...], "whole": [...],
    "planned": [...]}``, the last what :func:`lnb_fast.spmd.refresh_plan` decides for these
    metrics (one replica the whole inverse, or every replica its share of the columns). Each
    inversion (``lnb_fast.covariance.damped_inverse``, looked up at trace time) reports its
    replica through a ``jax.debug.callback``, which runs only where the branch holding it runs."""
    import lnb_fast.covariance as covariance
    from lnb_fast.spmd import refresh_plan

    original = covariance.damped_inverse
    calls: list = []

    def recorded(layout, A, ridge, relative=False, solve=None):
        how = "whole" if solve is None else "columns"
        jax.debug.callback(
            lambda r, d=layout.aug, how=how: calls.append([int(r), d, how]),
            jax.lax.axis_index("data"),
        )
        return original(layout, A, ridge, relative, solve)

    out = {}
    covariance.damped_inverse = recorded
    try:
        for key, split in (("split", True), ("whole", False)):
            calls.clear()
            opt = lnb_fast.lnb(
                0.05,
                strategy="covariance",
                neurons=table,
                refresh_every=1,
                split_refresh=split,
                axis_name="data",
            )
            step = jax.jit(
                jax.shard_map(
                    make_step(opt, vgf),
                    mesh=mesh,
                    in_specs=(P(), P(), P("data"), P("data")),
                    out_specs=(P(), P()),
                )
            )
            jax.block_until_ready(step(params, opt.init(params), xs, ys))
            jax.effects_barrier()
            out[key] = sorted(calls)
    finally:
        covariance.damped_inverse = original
    layouts = [covariance.gram_layout(n) for n in table.neurons]
    dims = [layout.aug for layout in layouts]
    out["dims"] = dims
    cubes = [layout.groups * float(layout.aug) ** 3 for layout in layouts]
    planned = []
    for d, owner in zip(dims, refresh_plan(cubes, DEVICES), strict=True):
        if owner is None:
            planned += [[r, d, "columns"] for r in range(DEVICES)]
        else:
            planned.append([owner, d, "whole"])
    out["planned"] = sorted(planned)
    return out


def docs_examples() -> dict:
    """Run docs/scaling.md's marked examples in order, in one namespace: ``{name: "ok" or the
    error}``."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
    blocks = re.findall(
        r"<!-- example: (scaling-[\w-]+) -->\s*```python\n(.*?)```", page.read_text(), re.S
    )
    namespace: dict = {"__name__": "docs"}
    out = {}
    for name, code in blocks:
        try:
            exec(compile(code, f"{page}:{name}", "exec"), namespace)
            out[name] = "ok"
        except Exception as err:  # noqa: BLE001 - recorded for the caller to assert on
            out[name] = f"{type(err).__name__}: {err}"
    return out


def state_across_steps(sharded, vgf, params, mesh, xs, ys, single) -> float:
    """The optimizer state crossing the ``shard_map`` boundary from step to step, its
    per-replica part (``covariance_sync="refresh"``) laid out by ``lnb_fast.spmd.state_specs``."""
    name = "lnb-covariance/refresh"
    opt = sharded[name]
    specs = lnb_fast.state_specs(jax.eval_shape(opt.init, params), "data")
    init = jax.jit(jax.shard_map(opt.init, mesh=mesh, in_specs=P(), out_specs=specs))
    step = jax.jit(
        jax.shard_map(
            make_step(opt, vgf),
            mesh=mesh,
            in_specs=(P(), specs, P("data"), P("data")),
            out_specs=(P(), specs),
        )
    )
    p, s = params, init(params)
    for _ in range(STEPS):
        p, s = step(p, s, xs, ys)
    return rel(p, single[name])


def error_cases(params, x, y, vgf, mesh, xs, ys, single) -> dict:
    """What each misuse raises (the exception's class name and the start of its message)."""
    out = {}

    def attempt(label, fn):
        try:
            fn()
            out[label] = "no error"
        except Exception as err:  # noqa: BLE001 - recorded for the caller to assert on
            out[label] = f"{type(err).__name__}: {err}"

    for check_vma in (True, False):
        opt = lnb_fast.lnb(0.05)
        step = jax.shard_map(
            make_step(opt, vgf),
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P()),
            check_vma=check_vma,
        )
        attempt(
            f"shard_map(check_vma={check_vma}) without axis_name",
            lambda step=step, opt=opt: jax.jit(step)(params, opt.init(params), xs, ys),
        )
    opt = lnb_fast.lnb(0.05)
    pm = jax.pmap(make_step(opt, vgf), in_axes=(None, None, 0, 0))
    xb, yb = (a.reshape(DEVICES, -1, a.shape[-1]) for a in (x, y))
    attempt("pmap without axis_name", lambda: pm(params, opt.init(params), xb, yb))
    opt = lnb_fast.lnb(0.05, axis_name="data")
    attempt(
        "axis_name under plain jit",
        lambda: jax.jit(make_step(opt, vgf))(params, opt.init(params), x, y),
    )
    # pmap with axis_name: correct (every replica the global-batch step of lnb-auto)
    opt = lnb_fast.lnb(0.05, refresh_every=2, cg_iterations=3, axis_name="i")
    got = jax.pmap(make_runs({"lnb": opt}, vgf), axis_name="i", in_axes=(None, 0, 0))(
        params, xb, yb
    )["lnb"]
    out["pmap with axis_name: spread"] = spread(got)
    out["pmap with axis_name: rel"] = rel(jax.tree.map(lambda a: np.asarray(a)[0], got), single)
    return out


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=1)
