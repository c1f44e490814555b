"""``measure_strategies``: choose each neuron's strategy by timing whole steps on this machine.

``strategy="auto"`` picks, per neuron, the cheaper of ``"matrix-free"`` and ``"gram"`` by a flop
model (:mod:`lnb_fast.strategy`). The two compute the same PCG iterates (to rounding), so the
choice changes only the time a step takes, and flops are a poor guide to time where a step is
short or not bound by arithmetic: on an H200 the MLP step that the flop model puts at 150×
Adam's cost 2.1× (kernel launches, not flops; ``docs/results.md``), and on a CPU XLA's
convolutions are slower per flop than its matrix products. XLA compiles and schedules a step as
one program, so a neuron's products are not timed alone but in the step.

:func:`measure_strategies` times **whole jitted steps** (``lnb_fast.value_and_grad``,
``lnb(...).update`` and ``optax.apply_updates``) on a real batch, by coordinate descent from
``"auto"``'s plan: for each neuron with a design, in the table's order, the step with that
neuron switched to the other strategy is timed against the best step so far, and the switch is
kept if its step is faster by more than ``min_gain`` (5%: ``"auto"`` is the prior, and a
difference within the machine's noise is not worth a change). That is ``L + 1`` compiled steps
for ``L`` neurons with a design; where the neurons' costs add up (each neuron's strategy changes
its own work only), one pass finds the fastest of the ``2^L`` combinations. The two steps of a
comparison run ``repeats`` times each, interleaved (one run of each per round, so a change in
the machine's load falls on both), after one untimed run that compiles; their medians are
compared. Every timed step starts from the same parameters and state: nothing is trained.

Neurons without a design (elementwise scales, tagged neurons) are matrix-free whatever the
strategy and are left out of the result, which :func:`lnb_fast.lnb` then gives ``"auto"``
(matrix-free for them). Measure on the device and batch size you train with: a choice made on a
CPU does not carry to a GPU. ``"covariance"`` is not a candidate: it is a different algorithm
(:mod:`lnb_fast.strategy`), not a faster way to the same step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import optax
from tqdm.auto import tqdm

from .capture import value_and_grad
from .strategy import plan
from .transform import lnb

#: the strategies timed: the two that compute the same iterates
TIMED = ("matrix-free", "gram")


class StrategyTimes(NamedTuple):
    """What :func:`measure_strategies` found.

    Attributes:
        strategy: ``{weight path: "matrix-free" or "gram"}`` for every neuron with a design:
            pass it as ``lnb_fast.lnb(..., strategy=times.strategy)``.
        auto: ``"auto"``'s choice for the same neurons (by the flop model), for comparison.
        trials: one row per comparison, in order: ``(path, tried, median seconds of the best
            step so far, of the step with path switched to tried, kept)``; the first row,
            ``("auto", "auto", s, s, True)``, is the step of ``"auto"``'s plan.
        seconds: the median time of the chosen strategy's step.
    """

    strategy: dict[str, str]
    auto: dict[str, str]
    trials: list[tuple[str, str, float, float, bool]]
    seconds: float


def wall_time(strategy: dict[str, str], run: Callable[[], object]) -> float:
    """The default timer: seconds of wall time of one ``run()``, which runs the step with
    ``strategy`` and blocks until its result is ready."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_strategies(
    loss_fn: Callable,
    params,
    *args,
    has_aux: bool = False,
    repeats: int = 10,
    min_gain: float = 0.05,
    timer: Callable[[dict, Callable[[], object]], float] = wall_time,
    print_table: bool = True,
    progress: bool = True,
    **options,
) -> StrategyTimes:
    """Time ``"matrix-free"`` against ``"gram"`` in whole steps of ``loss_fn(params, *args)``,
    neuron by neuron, and return the faster combination found (module docstring).

    Example::

        times = lnb_fast.measure_strategies(loss_fn, params, batch)
        opt = lnb_fast.lnb(0.01, strategy=times.strategy)

    Args:
        loss_fn, params, args, has_aux: as for :func:`lnb_fast.value_and_grad`; ``args`` is a
            batch of the size you train with.
        repeats: timed runs of each step of a comparison (after one that compiles it),
            interleaved; the medians are compared.
        min_gain: a switch is kept when its step's median is below ``(1 − min_gain)`` times the
            best step's so far; 0 keeps any switch that is faster at all.
        timer: ``timer(strategy, run) -> seconds`` for one ``run()`` of the step with
            ``strategy``; :func:`wall_time` by default.
        print_table: print a Markdown table of the comparisons.
        progress: a progress bar over the ``L + 1`` compiled steps (tqdm, on stderr; a ViT
            with 14 neurons took minutes on a CPU).
        **options: keyword arguments of :func:`lnb_fast.lnb` for the timed steps
            (``cg_iterations``, ``warm_start``, ``b1``, ``neurons``...), as you will train with;
            not ``strategy``, which is what is measured. The learning rate does not change the
            time (0.01 is used).

    Returns:
        a :class:`StrategyTimes`.

    Raises:
        ValueError: ``repeats`` below 1, ``min_gain`` outside ``[0, 1)``, or ``strategy``,
            ``learning_rate`` or an ``axis_name`` among ``options``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain!r}")
    if "strategy" in options or "learning_rate" in options:
        raise ValueError(
            "measure_strategies chooses the strategy and times any learning rate alike: pass "
            "neither `strategy` nor `learning_rate`"
        )
    if options.get("axis_name") is not None:
        raise ValueError(
            "measure_strategies times one device's jitted steps: leave axis_name out and pass "
            "one device's shard of the batch (the collectives are not timed)"
        )
    vgf = value_and_grad(loss_fn, has_aux=has_aux)
    table = vgf.table(params, *args)
    k = options.get("cg_iterations")  # the one option auto's gram/matrix-free choice reads
    choices = plan(table, "auto", cg_iterations=2 if k is None else k)
    auto = {n.weight_path: c.name for n, c in zip(table.neurons, choices, strict=True) if c.flops}
    lnb_options = {"neurons": table, **options}

    def runner(strategy: dict[str, str]) -> Callable[[], object]:
        opt = lnb(0.01, strategy=dict(strategy), **lnb_options)
        state = opt.init(params)

        @jax.jit
        def step(params, state, *args):
            _, grads, features = vgf(params, *args)
            updates, state = opt.update(grads, state, params, features=features)
            return optax.apply_updates(params, updates), state

        return lambda: jax.block_until_ready(step(params, state, *args))

    def compare(a: dict, run_a, b: dict, run_b) -> tuple[float, float]:
        run_a(), run_b()  # compile, and a first run that is not timed
        times_a, times_b = [], []
        for round_ in range(repeats):
            pair = ((a, run_a, times_a), (b, run_b, times_b))
            for strategy, run, out in pair if round_ % 2 == 0 else pair[::-1]:
                out.append(float(timer(strategy, run)))
        return statistics.median(times_a), statistics.median(times_b)

    bar = tqdm(total=len(auto) + 1, desc="measuring strategies", disable=not progress, leave=False)
    with bar:
        best, run_best = dict(auto), runner(auto)
        run_best()
        best_s = statistics.median(float(timer(best, run_best)) for _ in range(repeats))
        trials = [("auto", "auto", best_s, best_s, True)]
        bar.update()
        for path in auto:
            tried = "gram" if best[path] == "matrix-free" else "matrix-free"
            trial = {**best, path: tried}
            run_trial = runner(trial)
            best_s, trial_s = compare(best, run_best, trial, run_trial)
            kept = trial_s < (1 - min_gain) * best_s
            trials.append((path, tried, best_s, trial_s, kept))
            if kept:
                best, run_best, best_s = trial, run_trial, trial_s
            bar.update()
    times = StrategyTimes(best, auto, trials, best_s)
    if print_table:
        print(format_times(times))
    return times


def format_times(times: StrategyTimes) -> str:
    """:func:`measure_strategies`'s comparisons as a Markdown table, and its choice under it."""
    lines = [
        "| neuron switched | to | best step so far (ms) | step with the switch (ms) | kept |",
        "|---|---|---:|---:|---|",
    ]
    for path, tried, best_s, trial_s, kept in times.trials[1:]:
        lines.append(
            f"| {path} | {tried} | {1e3 * best_s:.3f} | {1e3 * trial_s:.3f} | "
            f"{'yes' if kept else 'no'} |"
        )
    changed = {p: s for p, s in times.strategy.items() if s != times.auto[p]}
    auto_s = times.trials[0][2]
    lines += [
        "",
        f"auto's step {1e3 * auto_s:.3f} ms; measured choice {1e3 * times.seconds:.3f} ms, "
        + (f"switching {changed} from auto's" if changed else "the same as auto's"),
    ]
    return "\n".join(lines)
