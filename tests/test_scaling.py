"""Data parallelism (docs/scaling.md): every transformation takes the single-device step of the
global batch under ``jax.jit`` + ``NamedSharding``, ``shard_map`` and ``pmap`` on 8 simulated
CPU devices, and across 2 processes (``jax.distributed``: one transformation of each kind of
communication, every one under ``-m slow``); misuse is an error, not a drift.

The device count is fixed when JAX starts, so the 8-device checks run in a subprocess
(``tests/scaling_check.py``, which documents the 1e-9 tolerance) and this module keeps the
suite's single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")

#: the tests reading the 8-device subprocess's results: one xdist worker (make test's --dist
#: loadgroup), so the module-scoped fixture runs that subprocess once, not once per worker; the
#: 2-process test and the HLO test stay free to run on the other worker meanwhile
EIGHT = pytest.mark.xdist_group("scaling-8-devices")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-9  # float64; see tests/scaling_check.py (a missing reduction moves the step by O(1))


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scaling_check.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


NAMES = [
    "lnb-auto",
    "lnb-matrix-free",
    "lnb-gram",
    "lnb-covariance",
    "lnb-covariance/refresh",
    "lnb-covariance/split",
    "scale_by_lnb",
    "foof",
    "foof/refresh",
    "foof/refresh+split",
    "locoprop_s",
    "locoprop_m",
    "proxprop",
]


@EIGHT
@pytest.mark.parametrize("name", NAMES)
def test_shard_map_takes_the_global_batch_step(eight_devices, name):
    row = eight_devices[name]
    assert row["shard_map"] <= TOL, row
    for recipe in ("jit", "unchecked", "pre_averaged"):  # where it was run under them
        if recipe in row:
            assert row[recipe] <= TOL, (recipe, row)
    if "unchecked_spread" in row:  # check_vma=False: every replica holds the same parameters
        assert row["unchecked_spread"] == 0.0, row


@EIGHT
def test_every_recipe_was_checked(eight_devices):
    recipes = {k for name in NAMES for k in eight_devices[name]}
    assert {"shard_map", "jit", "unchecked", "unchecked_spread", "pre_averaged"} <= recipes


@EIGHT
def test_tensor_parallel_weights_are_never_gathered(eight_devices):
    """Recipe (a) with a column-parallel and a row-parallel layer on a ("data", "model") mesh
    set with ``jax.set_mesh``, and the head FSDP-split over "data"
    (``scaling_check.TENSOR_SPECS``): every transformation's two steps
    (their ``jit`` rows above, ≤ ``TOL``) return the parameters split as they came, and no
    all-gather in the compiled program yields a whole tensor-parallel weight (or its transpose;
    FSDP's weight is gathered for the forward pass by design), nor a
    layer's metric (``d_in²`` or ``(d_in + 1)²``): the metric products, PCG's inner products
    and the covariance solves work on the shards, and the covariance strategy's and FOOF's
    second moments stay whole on every device. Before: flattening a weight for ``jnp.vdot``
    made XLA gather the column-parallel one for every inner product (118 gathers in these
    steps), and appending the bias column to a row-parallel direction gathered it (its
    ``12 × 12`` rows)."""
    tensor = eight_devices["tensor_sharded"]
    assert len(tensor["weights"]) == 4  # two sharded weights and their transposes
    assert all(tensor["keeps_sharding"].values()), tensor["keeps_sharding"]
    assert set(tensor["keeps_sharding"]) == {n for n in NAMES if "jit" in eight_devices[n]}
    assert tensor["gathered"] == []
    assert tensor["gathered_metrics"] == []


@EIGHT
def test_fsdp_whole_directions_gather_each_weight_once_for_the_solve(eight_devices):
    """``whole_directions=True`` under FSDP (every weight split by rows over "data", the mesh
    set, ``"gram"`` on every neuron, ``cg_iterations=3``): the compiled steps gather each weight
    twice, once for the forward pass and once as ĝ for PCG (3 weights: 6 gathers), where
    without it XLA gathers the direction for each of PCG's products as well (24 here, restart
    branch included); both steps equal one device's (``TOL``)."""
    fsdp = eight_devices["fsdp_whole_directions"]
    assert fsdp["True"]["rel"] <= TOL and fsdp["False"]["rel"] <= TOL
    assert fsdp["True"]["weight_gathers"] <= 2 * 3
    assert fsdp["False"]["weight_gathers"] > 2 * fsdp["True"]["weight_gathers"]


@EIGHT
def test_a_per_replica_state_crosses_steps(eight_devices):
    """``covariance_sync="refresh"``: each replica's EMA in the state, by ``state_specs``."""
    assert eight_devices["state_specs"] <= TOL


@EIGHT
def test_split_refresh_inverts_each_metric_once(eight_devices):
    """``split_refresh=True``: in a refresh step each neuron's metric is inverted either whole
    on exactly one replica, or, when its inverse alone costs more than an even share of the
    refresh, by every replica for its share of the columns, as :func:`lnb_fast.spmd.refresh_plan`
    planned (``tests/test_split_refresh.py`` checks the plan's choices); without it, whole on
    every replica. The steps themselves equal one device's (``lnb-covariance/split``,
    ``foof/refresh+split`` above)."""
    work = eight_devices["split_work"]
    dims = work["dims"]
    assert len(dims) == 3
    kinds = {how for _, _, how in work["planned"]}
    assert kinds == {"whole", "columns"}  # this MLP's metrics use both ways
    assert work["split"] == work["planned"]
    assert work["whole"] == sorted([r, d, "whole"] for r in range(8) for d in dims)


@EIGHT
def test_the_docs_examples_run(eight_devices):
    """docs/scaling.md's recipes run as printed (each asserts its step equals one device's)."""
    docs = eight_devices["docs"]
    assert set(docs) == {
        "scaling-setup",
        "scaling-jit",
        "scaling-tensor",
        "scaling-shard_map",
        "scaling-refresh",
    }
    assert all(v == "ok" for v in docs.values()), docs


@EIGHT
def test_pmap_with_axis_name_is_the_global_batch_step(eight_devices):
    errors = eight_devices["errors"]
    assert errors["pmap with axis_name: spread"] == 0.0
    assert errors["pmap with axis_name: rel"] <= TOL


@EIGHT
@pytest.mark.parametrize(
    "case, words",
    [
        ("shard_map(check_vma=True) without axis_name", "axis_name='data'"),
        ("shard_map(check_vma=False) without axis_name", "axis_name='data'"),
        ("pmap without axis_name", "pmap(..., axis_name='i')"),
        ("axis_name under plain jit", "leave it None"),
    ],
)
def test_a_missing_or_wrong_axis_is_an_error(eight_devices, case, words):
    message = eight_devices["errors"][case]
    assert message.startswith("AxisError: "), message
    assert words in message, message


def test_whole_directions_change_nothing_without_a_context_mesh():
    """On one device (no ``jax.set_mesh``) ``whole_directions`` constrains nothing: the same
    steps, bit for bit; a value that is not a bool is refused by name."""
    import jax

    import lnb_fast
    from lnb.testing.mlp import classification_batches, mlp_loss, mlp_params, train

    params = mlp_params(np.random.default_rng(0), (5, 7, 3))
    (batch,) = classification_batches(1, 1, n=16, d=5, classes=3)
    finals = [
        train(
            lnb_fast.lnb(0.05, strategy="gram", whole_directions=option), params, mlp_loss, batch, 3
        )[0]
        for option in (False, True)
    ]
    for a, b in zip(*map(jax.tree.leaves, finals), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="whole_directions must be True or False"):
        lnb_fast.lnb(0.05, whole_directions="yes")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the transformations the 2-process test of ``make test`` runs: one of each kind of
#: communication (features and gradients reduced every step; a per-replica EMA averaged on
#: refresh steps; each inverse of a refresh computed by one process and shared; LocoProp/ProxProp's
#: own reduction), two of them under jit too; ``make test-slow`` runs all of them (the
#: 8-device check above runs all of them on one process in every ``make test``)
TWO_PROCESS_SMOKE = ("lnb-auto", "lnb-covariance/refresh", "foof/refresh+split", "proxprop")


def check_two_processes(names: tuple[str, ...]) -> None:
    """Run ``tests/multiprocess_check.py`` as 2 local processes (``jax.distributed``, CPU
    collectives by gloo) on ``names`` (empty: all) and check that both hold the same parameters,
    bit for bit, after every run, and that those are the single-process global-batch step's."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "multiprocess_check.py"),
                str(port),
                str(i),
                "2",
                ",".join(names),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(JAX_PLATFORMS="cpu"),
            cwd=ROOT,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            outs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for code, _, err in outs:
        if code != 0 and "gloo" in err.lower() and "not" in err.lower() and "built" in err.lower():
            pytest.skip(f"this jaxlib has no gloo CPU collectives: {err[-300:]}")
        assert code == 0, err[-4000:]
    # the JSON is the last line (gloo prints its connections to stdout)
    results = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]
    first, second = results
    # both processes hold the same parameters, bit for bit, after every run
    assert first["digest"] == second["digest"] and len(first["digest"]) == len(first["rel"])
    assert "rel" not in second  # the reference is computed once, by process 0
    assert (first["devices"], first["processes"]) == (2, 2)
    wanted = set(names or NAMES)
    # every transformation under shard_map, and under jit where it has no axis-only option (the
    # "/refresh" and "/split" variants need axis_name: tests/scaling_check.py's JIT)
    expected = {f"{n} shard_map" for n in wanted}
    expected |= {f"{n} jit" for n in wanted if "/" not in n}
    assert set(first["rel"]) == expected, sorted(first["rel"])
    for key, value in first["rel"].items():
        assert value <= TOL, (key, value)


def test_two_processes_take_the_global_batch_step():
    """``jax.distributed`` with 2 local processes, CPU collectives by gloo (recipe (c)): the
    transformations of ``TWO_PROCESS_SMOKE``."""
    check_two_processes(TWO_PROCESS_SMOKE)


@pytest.mark.slow
def test_two_processes_take_the_global_batch_step_every_transformation():
    """The same for every transformation (``make test-slow``)."""
    check_two_processes(())


HLO = """HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%refresh (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  %r = f32[4,4]{1,0} all-reduce(%p), replica_groups={}, to_apply=%add
  ROOT %c = f32[4,4]{1,0} custom-call(%r), custom_call_target="lapack_spotrf_ffi"
}

%keep (p: f32[4,4]) -> f32[4,4] {
  ROOT %p = f32[4,4]{1,0} parameter(0)
}

%restart (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %r = f32[8]{0} all-reduce(%p), replica_groups={}, to_apply=%add
}

ENTRY %main (g: f32[10,3], m: f32[4,4], /*index=2*/v: f32[8]) -> f32[10,3] {
  %g = f32[10,3]{1,0} parameter(0)
  %ar = (f32[10,3]{1,0}, f64[5]{0}) all-reduce(%g, %g2), replica_groups={}, to_apply=%add
  %ag = (f32[2,3]{1,0}, f32[16,3]{1,0}) all-gather-start(%g), dimensions={0}
  %agd = f32[16,3]{1,0} all-gather-done(%ag)
  %c1 = f32[4,4]{1,0} conditional(%pred, %m, %m), true_computation=%refresh, false_computation=%keep
  %c2 = f32[8]{0} conditional(%i, %v, %v), branch_computations={%restart, %keep}
  ROOT %out = f32[10,3]{1,0} copy(%g)
}
"""


def test_communication_reads_collectives_and_their_bytes_from_hlo():
    """benchmarks/communication.py's HLO reading, on a hand-written module: a tuple all-reduce
    (every operand counts), an async all-gather (its result, once), and the collectives of a
    refresh branch (holds a Cholesky: amortised over refresh_every) and of another branch."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import communication
    finally:
        sys.path.pop(0)
    found = communication.collectives(HLO)
    by = {(c["kind"], c["branch"]): c["bytes"] for c in found}
    assert by == {
        ("all-reduce", None): 10 * 3 * 4 + 5 * 8,
        ("all-gather", None): 16 * 3 * 4,
        ("all-reduce", "refresh"): 16 * 4,
        ("all-reduce", "other"): 8 * 4,
    }
    s = communication.summary(HLO, refresh_every=4)
    assert s["every"] == 160 + 192 and s["count"] == 2
    assert s["amortised"] == 160 + 192 + 64 / 4 and s["other"] == 32
