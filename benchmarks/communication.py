"""Bytes communicated per data-parallel step, read from the compiled HLO, and step time, for each
LNB strategy next to ``optax.adam``, on simulated CPU devices.

    .venv/bin/python benchmarks/communication.py           # 784-800-800-10, batch 1024, 8 devices
    .venv/bin/python benchmarks/communication.py --quick   # tiny sizes, a smoke test

The model is the paper's MLP (784-800-800-10, tanh, float32, random data from a seeded NumPy
generator); the batch is split over a ``data`` axis of ``--devices`` simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``, set here before JAX starts). The recipes
(docs/scaling.md):

* ``jit``: the single-device step under ``jax.jit``, batch ``NamedSharding``-ed over ``data``,
  parameters and state replicated: XLA inserts the collectives;
* ``tensor`` (not run by default): ``jit`` on a ``(devices/2, 2)`` mesh ``("data", "model")``,
  the batch split over ``data``, the first hidden layer column-parallel (its weight and bias
  split over ``model`` by output), the second row-parallel (its weight split over ``model`` by
  input), the head replicated: tensor parallelism as Megatron lays out an MLP, compiled with
  the mesh set (``jax.set_mesh``), and the covariance strategy once more without it. Its
  table splits the bytes by kind of collective (a whole weight all-gathered shows as
  all-gather);
* ``fsdp`` (not run by default): ``jit`` with every weight split by rows over ``data`` (fully
  sharded data parallelism: the batch and the weights over the same axis), the mesh set, and
  ``auto`` and ``gram`` once more with ``whole_directions=True`` (PCG on whole vectors);
* ``shard_map``: the step inside ``jax.shard_map`` with ``axis_name="data"``: lnb_fast's own
  ``pmean``s (:mod:`lnb_fast.spmd`), and one more row, the covariance strategy with
  ``covariance_sync="refresh"`` (each replica's EMA, averaged on refresh steps only; the state
  laid out by :func:`lnb_fast.state_specs`), and both covariance rows again with
  ``split_refresh=True`` (each inverse of a refresh computed on one replica, then shared).

For each compiled step the collectives (``all-reduce``, ``all-gather``, ``reduce-scatter``,
``all-to-all``, ``collective-permute``) are read from ``compiled.as_text()`` with their result
shapes: "bytes" is the payload of each, summed (what one device contributes to the
reductions; a ring all-reduce moves about twice that over the links, for Adam as for LNB).
Collectives inside a ``lax.cond`` branch run on some steps only: the branch that refreshes the
covariance inverse (it holds a Cholesky) every ``refresh_every`` steps, amortised as such; any
other branch (PCG's restart from 0, rare) is listed apart and not amortised. Step time is the
mean over ``--steps`` steps (refresh steps included, compilation excluded), with the median,
as ratios to Adam's in the same recipe and run: the devices are simulated on the host's cores,
so the times say how the computation and the reductions weigh, not what a real cluster would
take. No number is asserted; docs/scaling.md quotes a run of this script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--sizes", default="784,800,800,10")
    ap.add_argument("--refresh-every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per strategy")
    ap.add_argument(
        "--recipes",
        default="jit,shard_map",
        help="comma-separated: jit, shard_map, tensor (jit on a data x model mesh), fsdp",
    )
    ap.add_argument("--only", default=None, help="comma-separated optimizer names (adam always)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.steps = "12,16,16,3", 64, 2
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before JAX starts
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lnb_fast  # noqa: E402

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
_OP = re.compile(r"=\s*(?P<shape>.+?)\s+(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_BRANCHES = re.compile(
    r"(?:branch_computations=\{(?P<many>[^}]*)\}"
    r"|(?:true|false)_computation=%?(?P<one>[\w.\-]+))"
)


def _nbytes(shape: str, kind: str, start: bool) -> int:
    arrays = [
        (dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _ARRAY.findall(shape)
    ]
    if start and kind == "all-gather" and len(arrays) >= 2:  # (operand, result): the result
        arrays = arrays[len(arrays) // 2 :]
    return sum(BYTES.get(dtype, 4) * int(np.prod(dims)) for dtype, dims in arrays)


def collectives(hlo: str) -> list[dict]:
    """Every collective of an HLO module's text: ``kind``, ``bytes`` (its result's payload),
    ``computation`` (where it is), ``branch`` (None, ``"refresh"`` for a ``lax.cond`` branch
    that holds a Cholesky, ``"other"`` for any other branch)."""
    found, bodies, current = [], {}, None
    branch_names: set[str] = set()
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation
            current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            current = current.lstrip("%")
            bodies[current] = []
            continue
        if current is not None:
            bodies[current].append(line)
        for b in _BRANCHES.finditer(line):
            names = b.group("many") or b.group("one") or ""
            branch_names.update(n.strip().lstrip("%") for n in names.split(",") if n.strip())
        op = _OP.search(line)
        if op and "-done" not in line.split("=")[1].split("(")[0]:
            found.append(
                {
                    "kind": op.group("kind"),
                    "bytes": _nbytes(op.group("shape"), op.group("kind"), bool(op.group("start"))),
                    "computation": current,
                }
            )

    def holds_cholesky(name: str, seen=()) -> bool:
        text = "\n".join(bodies.get(name, ()))
        if re.search(r"cholesky|potrf", text, re.IGNORECASE):
            return True
        called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", text)
        for b in _BRANCHES.finditer(text):  # nested conditionals (split_refresh's owner test)
            names = b.group("many") or b.group("one") or ""
            called += [n.strip().lstrip("%") for n in names.split(",") if n.strip()]
        return any(holds_cholesky(c, (*seen, name)) for c in called if c not in seen)

    for c in found:
        name = c["computation"]
        c["branch"] = None
        if name in branch_names:
            c["branch"] = "refresh" if holds_cholesky(name) else "other"
    return found


def summary(hlo: str, refresh_every: int) -> dict:
    """Bytes and counts per step: ``by_kind`` (amortised bytes per kind of collective),
    ``every`` (collectives run on every step), ``refresh``
    (in the refresh branch), ``amortised`` (every + refresh / refresh_every), ``other`` (other
    branches), ``count`` (collectives run on every step)."""
    cs = collectives(hlo)
    every = sum(c["bytes"] for c in cs if c["branch"] is None)
    refresh = sum(c["bytes"] for c in cs if c["branch"] == "refresh")
    by_kind = {
        k: sum(c["bytes"] for c in cs if c["kind"] == k and c["branch"] is None)
        + sum(c["bytes"] for c in cs if c["kind"] == k and c["branch"] == "refresh") / refresh_every
        for k in KINDS
    }
    return {
        "by_kind": by_kind,
        "every": every,
        "refresh": refresh,
        "amortised": every + refresh / refresh_every,
        "other": sum(c["bytes"] for c in cs if c["branch"] == "other"),
        "count": sum(c["branch"] is None for c in cs),
        "kinds": sorted({c["kind"] for c in cs}),
    }


def problem(sizes, batch, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        f"layer{i}": {
            "w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
            "b": jnp.zeros(b, jnp.float32),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }
    x = jnp.asarray(rng.uniform(size=(batch, sizes[0])), jnp.float32)
    y = jax.nn.one_hot(rng.integers(0, sizes[-1], batch), sizes[-1], dtype=jnp.float32)
    return params, x, y


def loss_fn(params, x, y):
    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
        if i < n - 1:
            h = jnp.tanh(h)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(h) * y, axis=-1))


def optimizers(table, refresh_every, axis_name):
    kw = {"axis_name": axis_name}
    out = {"adam": None}
    for s in ("auto", "matrix-free", "gram", "covariance"):
        out[s] = lnb_fast.lnb(0.01, strategy=s, neurons=table, refresh_every=refresh_every, **kw)
    if axis_name is not None:  # each replica's own EMA, averaged on refresh steps only
        out["covariance (sync at refresh)"] = lnb_fast.lnb(
            0.01,
            strategy="covariance",
            neurons=table,
            refresh_every=refresh_every,
            covariance_sync="refresh",
            **kw,
        )
        # each inverse computed on one replica and shared (split_refresh)
        for sync in ("step", "refresh"):
            label = (
                "covariance (split refresh)"
                if sync == "step"
                else ("covariance (sync at refresh + split refresh)")
            )
            out[label] = lnb_fast.lnb(
                0.01,
                strategy="covariance",
                neurons=table,
                refresh_every=refresh_every,
                covariance_sync=sync,
                split_refresh=True,
                **kw,
            )
    return out


def make_step(opt, vgf, axis_name):
    if opt is None:  # Adam on the mean gradient of the global batch
        adam = optax.adam(1e-3)

        def step(params, state, x, y):
            grads = jax.grad(loss_fn)(params, x, y)
            if axis_name is not None:  # autodiff summed them over the axis (check_vma)
                grads = jax.tree.map(lambda g: g / jax.lax.axis_size(axis_name), grads)
            updates, state = adam.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step, adam.init

    def step(params, state, x, y):
        _, grads, features = vgf(params, x, y)
        updates, state = opt.update(grads, state, params, features=features)
        return optax.apply_updates(params, updates), state

    return step, opt.init


def measure(args) -> list[dict]:
    sizes = tuple(int(s) for s in args.sizes.split(","))
    params, x, y = problem(sizes, args.batch)
    vgf = lnb_fast.value_and_grad(loss_fn)
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, split), jax.device_put(y, split)
    tp_mesh = jax.make_mesh((n // 2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    column = {"w": P(None, "model"), "b": P("model")}  # split by output, with its bias
    row = {"w": P("model", None), "b": P()}  # split by input
    replicated = [{"w": P(), "b": P()}] * (len(params) - 2)  # the rest: the head
    tp_specs = dict(
        zip(params, [column, row, *replicated], strict=False)
    )  # (a 1-layer MLP: column)
    fsdp_specs = {  # each weight's rows over data (where they divide evenly), biases whole
        name: {"w": P("data", None) if layer["w"].shape[0] % n == 0 else P(), "b": P()}
        for name, layer in params.items()
    }
    layouts = {"tensor": (tp_mesh, tp_specs), "fsdp": (mesh, fsdp_specs)}
    rows = []
    for recipe in args.recipes.split(","):
        if recipe not in ("jit", "shard_map", *layouts):
            raise SystemExit(f"--recipes: unknown recipe {recipe!r} (jit, shard_map, tensor, fsdp)")
        axis = "data" if recipe == "shard_map" else None
        table = vgf.table(params, x[: args.batch // n], y[: args.batch // n]) if axis else None
        table = table or vgf.table(params, x, y)
        opts = optimizers(table, args.refresh_every, axis)
        if recipe == "fsdp":  # PCG's vectors whole: one gather of ĝ per step, not per product
            for s in ("auto", "gram"):
                opts[f"{s} (whole directions)"] = lnb_fast.lnb(
                    0.01,
                    strategy=s,
                    neurons=table,
                    refresh_every=args.refresh_every,
                    whole_directions=True,
                )
        if recipe == "tensor":  # the covariance strategy again, without jax.set_mesh
            opts["covariance (no set_mesh)"] = opts["covariance"]
        if recipe in layouts:  # the parameters and the batch laid out once per recipe
            where, specs = layouts[recipe]
            placed = jax.device_put(
                params,
                jax.tree.map(
                    lambda spec, where=where: NamedSharding(where, spec),
                    specs,
                    is_leaf=lambda spec: isinstance(spec, P),
                ),
            )
            batch = NamedSharding(where, P("data"))
            xs_, ys_ = jax.device_put(x, batch), jax.device_put(y, batch)
        else:
            placed, xs_, ys_ = jax.device_put(params, whole), xs, ys
        for name, opt in opts.items():
            if args.only and name != "adam" and name not in args.only.split(","):
                continue
            context = contextlib.nullcontext()
            if recipe in layouts and name != "covariance (no set_mesh)":
                context = jax.set_mesh(layouts[recipe][0])  # the context mesh: spmd.whole
            step, init = make_step(opt, vgf, axis)
            if recipe == "shard_map":
                specs = lnb_fast.state_specs(jax.eval_shape(init, params), "data")
                s = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=P(), out_specs=specs))(params)
                step = jax.shard_map(
                    step,
                    mesh=mesh,
                    in_specs=(P(), specs, P("data"), P("data")),
                    out_specs=(P(), specs),
                )
            elif recipe in layouts:
                s = init(placed)  # eagerly: the state shaped like a weight is split like it
            else:
                s = jax.device_put(init(params), whole)
            jitted = jax.jit(step)
            p = placed
            with context:
                hlo = jitted.lower(p, s, xs_, ys_).compile().as_text()
                info = summary(hlo, args.refresh_every)
                for _ in range(2):  # compile and warm (the state's layout can change once)
                    p, s = jax.block_until_ready(jitted(p, s, xs_, ys_))
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    p, s = jax.block_until_ready(jitted(p, s, xs_, ys_))
                    times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "recipe": recipe,
                    "name": name,
                    **info,
                    "mean": np.mean(times),
                    "median": np.median(times),
                }
            )
    return rows


def table(rows, args) -> str:
    out = [
        f"MLP {args.sizes}, batch {args.batch} over {args.devices} simulated CPU devices, float32; "
        f"covariance refresh every {args.refresh_every}",
        "",
        "| recipe | optimizer | collectives / step | bytes / step (amortised) | × Adam | "
        "in other branches | step time × Adam (mean, median) | step (ms, mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe in dict.fromkeys(r["recipe"] for r in rows if r["recipe"] in ("jit", "shard_map")):
        group = [r for r in rows if r["recipe"] == recipe]
        adam = next(r for r in group if r["name"] == "adam")
        for r in group:
            out.append(
                f"| {recipe} | {r['name']} | {r['count']} | {r['amortised'] / 1e6:.3f} MB | "
                f"{r['amortised'] / adam['amortised']:.2f} | {r['other'] / 1e6:.3f} MB | "
                f"{r['mean'] / adam['mean']:.2f}, {r['median'] / adam['median']:.2f} | "
                f"{1e3 * r['mean']:.1f} |"
            )
    titles = {
        "tensor": f"Tensor parallelism (recipe tensor): {args.devices // 2} x 2 mesh "
        "(data, model), first hidden layer column-parallel, second row-parallel, head replicated",
        "fsdp": f"FSDP (recipe fsdp): {args.devices} devices (data), every weight split by rows "
        "over data (where they divide), biases replicated",
    }
    for recipe, title in titles.items():
        group = [r for r in rows if r["recipe"] == recipe]
        if not group:
            continue
        adam = next(r for r in group if r["name"] == "adam")
        out += [
            "",
            f"{title}; MB per step, amortised, by kind of collective",
            "",
            "| optimizer | collectives / step | all-reduce | all-gather | all-to-all | "
            "collective-permute | bytes × Adam | step time × Adam (mean, median) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in group:
            k = r["by_kind"]
            out.append(
                f"| {r['name']} | {r['count']} | {k['all-reduce'] / 1e6:.3f} | "
                f"{k['all-gather'] / 1e6:.3f} | {k['all-to-all'] / 1e6:.3f} | "
                f"{k['collective-permute'] / 1e6:.3f} | "
                f"{r['amortised'] / adam['amortised']:.2f} | "
                f"{r['mean'] / adam['mean']:.2f}, {r['median'] / adam['median']:.2f} |"
            )
    return "\n".join(out)


def main(args) -> None:
    print(f"jax {jax.__version__}, {jax.device_count()} devices ({jax.devices()[0].platform})")
    rows = measure(args)
    print(table(rows, args))
    sys.stdout.flush()


if __name__ == "__main__":
    main(ARGS)
