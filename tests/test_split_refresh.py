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
