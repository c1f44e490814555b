"""``lnb_fast.measure_strategies``: matrix-free or gram per neuron, by timing whole steps.

No timing is asserted: the choice is checked with timers that return set times."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import benchmark_module

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lnb_fast  # noqa: E402
from lnb.testing.mlp import classification_batches, mlp_loss, mlp_params, train  # noqa: E402
from lnb.testing.tolerances import FLOAT32_ATOL, FLOAT32_RTOL  # noqa: E402
from lnb_fast.strategy import plan  # noqa: E402

SIZES = (5, 7, 6, 3)  # three dense neurons with biases
PATHS = ["[0]['w']", "[1]['w']", "[2]['w']"]


def problem():
    params = mlp_params(np.random.default_rng(0), SIZES)
    (batch,) = classification_batches(1, 1, n=16, d=SIZES[0], classes=SIZES[-1])
    return params, batch


def additive(costs: dict, calls: list | None = None):
    """A timer whose step time is the sum over neurons of ``costs[path][strategy]`` (each
    neuron's strategy changes its own work only), without running anything."""

    def timer(strategy, run):
        if calls is not None:
            calls.append(dict(strategy))
        return sum(costs[path][name] for path, name in strategy.items())

    return timer


COSTS = {
    PATHS[0]: {"gram": 1.0, "matrix-free": 2.0},
    PATHS[1]: {"gram": 3.0, "matrix-free": 0.5},
    PATHS[2]: {"gram": 0.2, "matrix-free": 0.1},
}


def test_the_fastest_combination_is_found_one_neuron_at_a_time():
    """With additive step times, one pass of switches from auto's plan reaches the fastest of
    all 2^3 combinations (enumerated here); each comparison times the best step so far against
    the one with a switch, ``repeats`` times each, interleaved."""
    params, batch = problem()
    calls = []
    got = lnb_fast.measure_strategies(
        mlp_loss,
        params,
        batch,
        repeats=3,
        timer=additive(COSTS, calls),
        print_table=False,
        progress=False,
    )
    combos = [
        dict(zip(PATHS, c, strict=True)) for c in itertools.product(*[COSTS[p] for p in PATHS])
    ]
    fastest = min(combos, key=lambda s: sum(COSTS[p][s[p]] for p in PATHS))
    assert (
        got.strategy
        == fastest
        == {PATHS[0]: "gram", PATHS[1]: "matrix-free", PATHS[2]: "matrix-free"}
    )
    assert got.seconds == sum(COSTS[p][fastest[p]] for p in PATHS)
    assert set(got.auto) == set(PATHS) and set(got.auto.values()) <= {"gram", "matrix-free"}
    assert [t[0] for t in got.trials] == ["auto", *PATHS]
    for *_, best_s, trial_s, kept in got.trials[1:]:
        assert kept == (trial_s < 0.95 * best_s)  # min_gain 5% by default
    # auto's step alone, then per neuron 3 rounds of (best, trial) in alternating order
    assert len(calls) == 3 + 3 * 2 * 3
    first = calls[3:9]
    # rounds 0 and 2: best, trial; round 1: trial, best
    assert first[0] == first[3] == first[4] == got.auto
    assert first[1] == first[2] == first[5] != got.auto


@pytest.mark.parametrize("gain, kept", [(0.0, False), (0.04, False), (0.06, True)])
def test_a_switch_is_kept_only_when_it_gains_more_than_min_gain(gain, kept):
    """Equal steps keep auto's plan; a switch 4% faster is noise under the default 5% margin,
    one 6% faster is kept."""
    params, batch = problem()
    table = lnb_fast.value_and_grad(mlp_loss).table(params, batch)
    auto = {n.weight_path: c.name for n, c in zip(table.neurons, plan(table), strict=True)}
    other = "gram" if auto[PATHS[0]] == "matrix-free" else "matrix-free"
    costs = {p: {"gram": 0.0, "matrix-free": 0.0} for p in PATHS}
    costs[PATHS[0]] = {auto[PATHS[0]]: 1.0, other: 1.0 - gain}
    got = lnb_fast.measure_strategies(
        mlp_loss, params, batch, repeats=1, timer=additive(costs), print_table=False, progress=False
    )
    assert (got.strategy[PATHS[0]] == other) == kept
    assert [k for *_, k in got.trials[1:]] == [kept, False, False]


def test_the_median_of_the_repeats_decides():
    """One slow run (a load spike) of the step with a switch does not hide that it is faster."""
    params, batch = problem()
    table = lnb_fast.value_and_grad(mlp_loss).table(params, batch)
    auto = {n.weight_path: c.name for n, c in zip(table.neurons, plan(table), strict=True)}
    other = "gram" if auto[PATHS[0]] == "matrix-free" else "matrix-free"
    costs = {p: {"gram": 1.0, "matrix-free": 1.0} for p in PATHS}
    costs[PATHS[0]] = {auto[PATHS[0]]: 1.0, other: 0.5}
    spiked = []

    def timer(strategy, run):
        if strategy[PATHS[0]] == other and not spiked:
            spiked.append(strategy)
            return 50.0
        return additive(costs)(strategy, run)

    got = lnb_fast.measure_strategies(
        mlp_loss, params, batch, repeats=3, timer=timer, print_table=False, progress=False
    )
    assert spiked and got.strategy[PATHS[0]] == other


def test_the_measured_strategy_takes_the_same_step():
    """Gram and matrix-free compute the same PCG iterates, so the step with a measured (here:
    mixed) strategy equals both pure ones' to float32 rounding (10 steps; FLOAT32_RTOL)."""
    params, batch = problem()
    mixed = lnb_fast.measure_strategies(
        mlp_loss, params, batch, repeats=1, timer=additive(COSTS), print_table=False, progress=False
    ).strategy
    assert set(mixed.values()) == {"gram", "matrix-free"}
    finals = [
        train(lnb_fast.lnb(0.05, strategy=strategy), params, mlp_loss, batch, 10)[0]
        for strategy in (mixed, "gram", "matrix-free")
    ]
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(params), strict=True)
    )
    assert moved > 1e-2  # the steps did move the parameters
    for other in finals[1:]:
        for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(a, b, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_neurons_without_a_design_are_left_out():
    """An elementwise scale has no design (matrix-free whatever the strategy): it is not timed
    and not in the dict, which lnb_fast.lnb then fills with "auto"."""

    def loss(params, batch):
        x, y = batch
        h = jnp.tanh(x @ params["w"] + params["b"]) * params["s"]
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    params, batch = problem()
    params = {"w": params[0]["w"][:, :3], "b": params[0]["b"][:3], "s": jnp.ones(3)}
    costs = {"['w']": {"gram": 1.0, "matrix-free": 2.0}}
    got = lnb_fast.measure_strategies(
        loss, params, batch, repeats=1, timer=additive(costs), print_table=False, progress=False
    )
    rows = lnb_fast.describe(loss, params, batch, print_table=False)
    assert {r["parameter"]: r["neuron"] for r in rows}["['s']"] == "scale weight"
    assert got.strategy == {"['w']": "gram"}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"repeats": 0}, "repeats must be an integer >= 1"),
        ({"repeats": 2.5}, "repeats must be an integer >= 1"),
        ({"min_gain": 1.0}, r"min_gain must be in \[0, 1\)"),
        ({"min_gain": -0.1}, r"min_gain must be in \[0, 1\)"),
        ({"strategy": "gram"}, "pass neither `strategy` nor `learning_rate`"),
        ({"learning_rate": 0.1}, "pass neither `strategy` nor `learning_rate`"),
        ({"axis_name": "data"}, "leave axis_name out and pass one device's shard"),
    ],
)
def test_bad_arguments_are_named(kwargs, words):
    params, batch = problem()
    with pytest.raises(ValueError, match=words):
        lnb_fast.measure_strategies(
            mlp_loss, params, batch, print_table=False, progress=False, **kwargs
        )


def test_the_table_and_the_progress_bar_are_printed(capsys):
    params, batch = problem()
    costs = {p: {k: v * 1e-3 for k, v in c.items()} for p, c in COSTS.items()}
    got = lnb_fast.measure_strategies(mlp_loss, params, batch, repeats=1, timer=additive(costs))
    captured = capsys.readouterr()
    for path, tried, *_ in got.trials[1:]:
        assert f"| {path} | {tried} |" in captured.out
    assert f"measured choice {1e3 * got.seconds:.3f} ms" in captured.out
    assert "measuring strategies" in captured.err and "4/4" in captured.err  # the progress bar


def test_benchmark_quick_run_writes_its_record(tmp_path):
    """``benchmarks/measured_strategy.py --quick``: the record has the measured dict (a strategy
    for every neuron with a design), auto's, and both step ratios. No timing is asserted."""
    bench = benchmark_module("measured_strategy")
    out = tmp_path / "measured.json"
    assert bench.main(["--quick", "--quiet", "--models", "mlp", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["models"]
    assert set(row["measured"]) == set(row["auto"]) == {"['w0']", "['w1']", "['w2']"}
    assert set(row["measured"].values()) <= {"gram", "matrix-free"}
    assert row["differ"] == sorted(p for p in row["auto"] if row["measured"][p] != row["auto"][p])
    assert row["ratio"]["lnb auto"] > 0 and row["ratio"]["lnb measured"] > 0
    assert "| mlp | 8 | 3 |" in out.with_suffix(".md").read_text()
