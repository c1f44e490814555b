"""``strategy="auto"`` (flop model) against the strategy :func:`lnb_fast.measure_strategies` times.

    .venv/bin/python benchmarks/measured_strategy.py                # mlp, cnn, vit
    .venv/bin/python benchmarks/measured_strategy.py --quick        # smoke test (tests)

For each model of ``benchmarks/step_time.py`` (same parameters, random batch and batch size):

1. :func:`lnb_fast.measure_strategies` switches one neuron at a time between matrix-free and
   gram, from ``"auto"``'s plan, keeping a switch when the whole step gets faster
   (``--measure-repeats`` interleaved runs of each step per comparison, medians compared), and
   prints its comparisons;
2. three jitted, donated training steps are timed side by side, as in ``step_time.py``: Adam,
   LNB ``auto`` and LNB with the measured strategy dict, each called once per round in an
   order that alternates between rounds (``--repeats`` rounds after ``--warmup`` untimed
   calls), BLAS/LAPACK pinned to one thread.

The ratios are means over every timed step (no strategy here refreshes anything), medians
beside them. Where the measured choice equals auto's for every neuron the two LNB steps are the
same program, and their ratios differ by the machine's noise only. ``--out`` (default
``results/measured_strategy.json``) gets the rows, every comparison, the machine and the
command; a Markdown copy of the table goes next to it. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import (  # noqa: E402 - the models, the timed runner and the machine record
    LEARNING_RATE,
    MODELS,
    QUICK_MODELS,
    Runner,
    at_least_one,
    copy_tree,
    interleaved,
    machine,
    make_step,
    model_names,
    pin_blas,
    summary,
    unwritable,
    write_results,
)

import lnb_fast  # noqa: E402

KINDS = ("adam", "lnb auto", "lnb measured")


def measure(model, args, bar) -> dict[str, Any]:
    """Measure the strategies of ``model``, then time its three steps side by side."""
    rng = np.random.default_rng(0)
    batch_size = args.batch or model.batch
    params, batch = model.init(rng), model.data(rng, batch_size)
    start = time.perf_counter()
    table = lnb_fast.value_and_grad(model.loss).table(params, batch)
    times = lnb_fast.measure_strategies(
        model.loss,
        params,
        batch,
        repeats=args.measure_repeats,
        min_gain=args.min_gain,
        print_table=not args.quiet,
        progress=not args.quiet,
        neurons=table,
    )
    measuring_s = time.perf_counter() - start
    auto = times.auto
    differ = sorted(p for p, s in times.strategy.items() if s != auto[p])
    opts = {
        "adam": (optax.adam(LEARNING_RATE["adam"]), False),
        "lnb auto": (lnb_fast.lnb(LEARNING_RATE["lnb"], neurons=table), True),
        "lnb measured": (
            lnb_fast.lnb(LEARNING_RATE["lnb"], neurons=table, strategy=times.strategy),
            True,
        ),
    }
    runners = {}
    for kind, (opt, features) in opts.items():
        state = opt.init(params)
        step = make_step(model.loss, opt, features).lower(params, state, batch).compile()
        runners[kind] = Runner(step, copy_tree(params), copy_tree(state), batch)
    _, seconds = interleaved(runners, KINDS, args.repeats, args.warmup, bar)
    stats = {kind: summary(s) for kind, s in seconds.items()}
    adam = stats["adam"]
    return {
        "model": model.name,
        "batch": batch_size,
        "measuring_s": measuring_s,
        "measured": times.strategy,
        "auto": auto,
        "differ": differ,
        "trials": times.trials,
        "times": stats,
        "ratio": {k: stats[k]["mean_ms"] / adam["mean_ms"] for k in KINDS[1:]},
        "median_ratio": {k: stats[k]["median_ms"] / adam["median_ms"] for k in KINDS[1:]},
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | neurons timed | measured ≠ auto | Adam step (ms) | auto / Adam | "
        "measured / Adam | measuring (s) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        differ = ", ".join(f"{p} → {r['measured'][p]}" for p in r["differ"]) or "none"
        ratio, median = r["ratio"], r["median_ratio"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {len(r['measured'])} | {differ} | "
            f"{r['times']['adam']['mean_ms']:.2f} | "
            f"{ratio['lnb auto']:.2f}× ({median['lnb auto']:.2f}×) | "
            f"{ratio['lnb measured']:.2f}× ({median['lnb measured']:.2f}×) | "
            f"{r['measuring_s']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn,vit", help="comma-separated: mlp, cnn, vit")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every model")
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds of the steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compiles)")
    parser.add_argument(
        "--measure-repeats",
        type=int,
        default=10,
        help="measure_strategies' runs of each step per comparison",
    )
    parser.add_argument(
        "--min-gain", type=float, default=0.05, help="measure_strategies' margin for a switch"
    )
    parser.add_argument("--out", type=Path, default=Path("results/measured_strategy.json"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar or comparisons")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: tiny MLP, batch 8, 2 rounds"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch = args.batch or 8
        args.repeats, args.warmup, args.measure_repeats = 2, 1, 2
    args.models = model_names(parser, args.models)
    at_least_one(parser, args, ("batch", "repeats", "warmup", "measure_repeats"))
    if not 0 <= args.min_gain < 1:
        parser.error("--min-gain must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if unwritable(args.out):
        return 2
    pin_blas(1)
    chosen = {**MODELS, **QUICK_MODELS} if args.quick else MODELS
    start = time.perf_counter()
    with tqdm(total=args.repeats * len(args.models), disable=args.quiet, leave=False) as bar:
        rows = [measure(chosen[name], args, bar) for name in args.models]
    elapsed = time.perf_counter() - start
    info = machine()
    text = "\n".join(
        [
            f"Device: {info['device']} ({info['backend']}); {args.repeats} rounds, "
            f"{args.warmup} warm-up calls, BLAS threads 1, {elapsed:.0f} s in all. Ratios are "
            "means over every step, medians in brackets.",
            "",
            table(rows),
        ]
    )
    print(text)
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": info,
        "repeats": args.repeats,
        "total_s": elapsed,
        "models": rows,
    }
    return write_results(args.out, record, text)


if __name__ == "__main__":
    sys.exit(main())
