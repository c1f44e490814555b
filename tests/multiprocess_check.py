"""One process of a multi-process data-parallel run (``jax.distributed``), for
``tests/test_scaling.py``, which starts two of them on 127.0.0.1:

    python tests/multiprocess_check.py PORT PROCESS_ID NUM_PROCESSES

Each process owns one CPU device and its shard of the batch (``make_array_from_process_local_
data``); the mesh spans the processes' devices, CPU collectives go through gloo. It runs the
steps of ``tests/scaling_check.py``'s transformations under ``shard_map`` (``axis_name="data"``)
and under ``jax.jit`` with the batch sharded, and prints, as JSON, the largest relative
difference of the parameters from the single-process step on the global batch (computed by
every process on its own device). The same code runs on a multi-host GPU/TPU cluster, where
``jax.distributed.initialize()`` reads the coordinator from the cluster's environment.
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: int, process_id: int, num_processes: int) -> dict:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    import numpy as np
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

    # the single-process reference, on this process's own device (no collective)
    here = jax.local_devices()[0]
    table = vgf.table(params, x, y)
    # every transformation under shard_map, and those without an axis-only option under jit
    singles = transformations(table)
    names = tuple(singles)
    single = jax.jit(make_runs(singles, vgf))(*jax.device_put((params, x, y), here))

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    split = NamedSharding(mesh, P("data"))
    xs, ys = (jax.make_array_from_process_local_data(split, np.asarray(a)[rows]) for a in (x, y))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    out = {}

    # (b) shard_map over the processes' devices, axis_name="data"
    local_table = vgf.table(params, x[rows], y[rows])
    sharded = transformations(local_table, "data")
    got = on_batch_axis(make_runs(sharded, vgf), mesh)(replicated, xs, ys)
    for name in names:
        mine = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), got[name])
        out[f"{name} shard_map"] = rel(mine, single[name])

    # (a) jit with the batch sharded across the processes
    got = jax.jit(make_runs({k: singles[k] for k in JIT}, vgf))(replicated, xs, ys)
    for name in JIT:
        mine = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), got[name])
        out[f"{name} jit"] = rel(mine, single[name])
    out["devices"] = jax.device_count()
    out["processes"] = jax.process_count()
    jax.distributed.shutdown()
    return out


if __name__ == "__main__":
    port, process_id, num_processes = (int(a) for a in sys.argv[1:4])
    json.dump(main(port, process_id, num_processes), sys.stdout)
