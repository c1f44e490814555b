"""``split_refresh``'s plan (:func:`lnb_fast.spmd.owners`): which replica computes each inverse
of a covariance refresh. Its claim, longest-processing-time-first scheduling within 4/3 of the
best balance (Graham 1969), checked against the best assignment found by brute force; and the
option's validation. That the split steps equal one device's, and that each metric is inverted
on exactly one replica, is checked on 8 simulated devices in ``tests/test_scaling.py``."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("jax")

import lnb_fast  # noqa: E402
from lnb_fast.spmd import owners  # noqa: E402


def makespan(costs, assignment, size) -> float:
    load = [0.0] * size
    for c, r in zip(costs, assignment, strict=True):
        load[r] += c
    return max(load)


@given(
    costs=st.lists(st.integers(1, 10**6).map(float), min_size=1, max_size=7),
    size=st.integers(1, 4),
)
def test_owners_balance_within_four_thirds_of_the_best(costs, size):
    got = owners(costs, size)
    assert len(got) == len(costs) and all(0 <= r < size for r in got)
    best = min(makespan(costs, a, size) for a in itertools.product(range(size), repeat=len(costs)))
    # Graham's bound for LPT: makespan ≤ (4/3 − 1/(3m))·best (exact arithmetic on integers
    # below 2⁵³; the small slack is for the float sums)
    assert makespan(costs, got, size) <= (4 / 3 - 1 / (3 * size)) * best * (1 + 1e-12)


def test_fewer_inverses_than_replicas_each_get_their_own():
    assert sorted(owners([5.0, 9.0, 7.0], 8)) == [0, 1, 2]


def test_split_refresh_must_be_a_bool():
    import jax.numpy as jnp

    def loss(p, x):
        return jnp.sum(x @ p["w"])

    table = lnb_fast.value_and_grad(loss).table({"w": jnp.ones((3, 2))}, jnp.ones((4, 3)))
    for make in (lnb_fast.lnb, lnb_fast.foof):
        with pytest.raises(TypeError, match="split_refresh must be True or False"):
            make(0.1, neurons=table, split_refresh="yes")


def test_inverse_columns_put_together_are_the_inverse():
    """:func:`lnb_fast.covariance.cholesky_inverse` by column blocks (as each replica computes
    its share with ``split_refresh``), blocks of 3 over 7 columns (the last block runs past the
    matrix: zeros), against NumPy's inverse of the same matrices (float64; κ ≤ 1e2 here, so
    1e-12 leaves room for the ``κ·eps`` of two triangular solves)."""
    import jax
    import numpy as np

    from lnb_fast.covariance import cholesky_inverse

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        B = rng.normal(size=(2, 7, 7))
        M = B @ np.swapaxes(B, -1, -2) + 7 * np.eye(7)
        blocks = [np.asarray(cholesky_inverse(M, (start, 3))) for start in (0, 3, 6)]
        got = np.concatenate(blocks, axis=-1)
        assert got.shape == (2, 7, 9) and np.all(got[..., 7:] == 0)
        want = np.linalg.inv(M)
        assert np.max(np.abs(got[..., :7] - want)) <= 1e-12 * np.max(np.abs(want))
        assert np.max(np.abs(np.asarray(cholesky_inverse(M)) - want)) <= 1e-12 * np.max(
            np.abs(want)
        )


class _Replicas:
    """What :func:`lnb_fast.spmd.split_plan` reads of a Reducer: the replica count, and the
    two ways of sharing out an inverse."""

    def __init__(self, size):
        self.size = size

    def __bool__(self):
        return True

    def split_inverse(self, M):  # pragma: no cover - only its identity is compared
        raise AssertionError

    def from_owner(self, owner, compute, like):  # pragma: no cover - bound by partial only
        raise AssertionError


def _plan_work(plan, dims, size):
    """Each replica's flops in a refresh under ``plan`` (the plan's own cost model: a
    factor ``D³/3``, ``2D²`` a column)."""
    load = [0.0] * size
    for k, d in dims.items():
        if "solve" in plan[k]:
            for r in range(size):
                load[r] += d**3 / 3 + 2 * d**3 * (-(-d // size)) / d
        else:
            load[plan[k]["split"].args[0]] += 7 / 3 * d**3
    return load


@pytest.mark.parametrize(
    ("dims", "wide"),
    [
        ({0: 7, 1: 11, 2: 13}, {1, 2}),  # tests/scaling_check.py's MLP on 8 replicas
        ({0: 785, 1: 801, 2: 801}, {0, 1, 2}),  # the paper's MLP: each more than 1/8 of all
        ({i: 64 for i in range(16)}, set()),  # many equal metrics: each whole to one replica
    ],
)
def test_a_metric_larger_than_a_share_is_split_by_columns(dims, wide):
    """``split_refresh``'s plan: a metric whose inverse costs one replica more than an even
    share of the refresh (``Σ 7D³/3 / P``) has its columns computed by every replica; the
    others go whole to one replica each. The plan's slowest replica then does less than with
    every inverse whole (LPT alone), or the same when nothing is split."""
    from types import SimpleNamespace

    from lnb_fast.spmd import split_plan

    size = 8
    reduce = _Replicas(size)
    layouts = {k: SimpleNamespace(groups=1, aug=d) for k, d in dims.items()}
    plan = split_plan(reduce, layouts, True)
    assert {k for k, v in plan.items() if "solve" in v} == wide
    assert all(plan[k]["solve"] == reduce.split_inverse for k in wide)
    whole = [0.0] * size
    for k, r in zip(dims, owners([7 / 3 * d**3 for d in dims.values()], size), strict=True):
        whole[r] += 7 / 3 * dims[k] ** 3
    work = _plan_work(plan, dims, size)
    if wide:
        assert max(work) < max(whole)
    else:
        assert max(work) == max(whole)
