"""One process of a multi-process data-parallel run (``jax.distributed``), for
``tests/test_scaling.py``, which starts two of them on 127.0.0.1:

    python tests/multiprocess_check.py PORT PROCESS_ID NUM_PROCESSES [NAMES]

Each process owns one CPU device and its shard of the batch (``make_array_from_process_local_
data``); the mesh spans the processes' devices, CPU collectives go through gloo. It runs the
steps of ``tests/scaling_check.py``'s transformations under ``shard_map`` (``axis_name="data"``)
and under ``jax.jit`` with the batch sharded, and prints, as JSON, a digest of the parameters
each run left on this process (the test asserts the processes agree bit for bit) and, from
process 0, the largest relative difference of the parameters from the single-process step on
the global batch, which process 0 computes on its own device after the distributed runs (the
other processes need not repeat it: their parameters are the same bits). The same code runs on
a multi-host GPU/TPU cluster, where ``jax.distributed.initialize()`` reads the coordinator from
the cluster's environment. ``NAMES`` (comma-separated, default all) limits the run to some of
the transformations: ``make test`` runs a few, ``make test-slow`` all of them.
"""

from __future__ import annotations

import hashlib
import json
import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: int, process_id: int, num_processes: int, names: tuple[str, ...] = ()) -> dict:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lnb_fast
    from tests.scaling_check import (
        BATCH,
        JIT,
        loss_fn,
        make_runs,
        on_batch_axis,
        problem,
        rel,
        transformations,
    )

    params, x, y = problem()
    vgf = lnb_fast.value_and_grad(loss_fn)
    local = BATCH // num_processes
    rows = slice(process_id * local, (process_id + 1) * local)
    table = vgf.table(params, x, y)
    # every transformation under shard_map, and those without an axis-only option under jit
    singles = transformations(table)
    unknown = set(names) - set(singles)
    if unknown:
        raise SystemExit(
            f"unknown transformation(s) {sorted(unknown)}; choose from {list(singles)}"
        )
    names = names or tuple(singles)
    singles = {k: singles[k] for k in names}
    jit_names = [k for k in JIT if k in names]

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    split = NamedSharding(mesh, P("data"))
    xs, ys = (jax.make_array_from_process_local_data(split, np.asarray(a)[rows]) for a in (x, y))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    mine = {}

    # (b) shard_map over the processes' devices, axis_name="data"
    local_table = vgf.table(params, x[rows], y[rows])
    sharded = {k: v for k, v in transformations(local_table, "data").items() if k in names}
    got = on_batch_axis(make_runs(sharded, vgf), mesh)(replicated, xs, ys)
    for name in names:
        mine[f"{name} shard_map"] = jax.tree.map(
            lambda a: np.asarray(a.addressable_data(0)), got[name]
        )

    # (a) jit with the batch sharded across the processes
    got = jax.jit(make_runs({k: singles[k] for k in jit_names}, vgf))(replicated, xs, ys)
    for name in jit_names:
        mine[f"{name} jit"] = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), got[name])
    out = {
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "digest": {key: digest(tree) for key, tree in mine.items()},
    }
    if process_id == 0:
        # the single-process reference on the global batch, on this process's own device (no
        # collective): computed once, as every process holds the same parameters (the digests)
        here = jax.local_devices()[0]
        single = jax.jit(make_runs(singles, vgf))(*jax.device_put((params, x, y), here))
        out["rel"] = {key: rel(tree, single[key.rsplit(" ", 1)[0]]) for key, tree in mine.items()}
    jax.distributed.shutdown()
    return out


def digest(tree) -> str:
    """SHA-256 of a PyTree's leaves' bytes, in leaf order: equal digests, equal bits."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    port, process_id, num_processes = (int(a) for a in sys.argv[1:4])
    names = tuple(n for n in sys.argv[4].split(",") if n) if len(sys.argv) > 4 else ()
    json.dump(main(port, process_id, num_processes, names), sys.stdout)
