"""Step-size schedule study for LNB on the matrix-factorization problem (paper §5.1).

LNB's step has squared length ε_t in function space whatever the distance to the optimum, so the
schedule {ε_t} decides how fast it converges. This script measures the excess loss at steps 100
and 1000 of exponential schedules ``ε_t = ε₀ · decayᵗ`` for Algorithm 1 (exact solve) and
Algorithm 2 (2 warm-started PCG iterations, full batch, with and without the gradient EMA), and
checks the chosen defaults on several seeds against the best-of-grid Adam and GD.

    .venv/bin/python benchmarks/matfact_schedules.py            # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/matfact_schedules.py --quick    # seed 0 only, smaller grid

Its output is what ``docs/matfact.md`` reports.
"""

from __future__ import annotations

import argparse
import itertools

from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from lnb_ref import ExactLNB, OnlineLNB, exponential_decay
from lnb_ref.matfact import (
    ADAM_GRID,
    EXACT_LNB_SCHEDULE,
    GD_GRID,
    ONLINE_LNB_SCHEDULE,
    MatrixFactorization,
    compare,
    run,
)


def schedule_grid(seed: int, inits, decays, make, label: str) -> None:
    problem = MatrixFactorization.make(seed)
    optimum, net = problem.optimum(), problem.network
    print(f"\n{label}, seed {seed}: excess loss at step 100 / 1000")
    print("| ε₀ \\ decay | " + " | ".join(str(d) for d in decays) + " |")
    print("|---|" + "---|" * len(decays))
    cells = {}
    for e0, decay in tqdm(list(itertools.product(inits, decays)), desc=label, leave=False):
        curve = run(problem, make(net, exponential_decay(e0, decay)), 1000) - optimum
        cells[e0, decay] = f"{curve[100]:.3g} / {curve[1000]:.3g}"
    for e0 in inits:
        print(f"| {e0:g} | " + " | ".join(cells[e0, d] for d in decays) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only, smaller grid")
    args = parser.parse_args()
    inits = (1e2, 1e3, 1e4, 1e5) if args.quick else (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
    decays = (0.9, 0.95, 1.0) if args.quick else (0.9, 0.93, 0.95, 0.98, 1.0)
    with threadpool_limits(limits=1):
        schedule_grid(0, inits, decays, lambda n, e: ExactLNB(n.neurons, e), "Algorithm 1")
        for b1 in (0.0, 0.9):
            schedule_grid(
                0,
                inits,
                decays,
                lambda n, e, b1=b1: OnlineLNB(n.neurons, e, b1=b1),
                f"Algorithm 2 (b1 = {b1})",
            )
        seeds = (0,) if args.quick else (0, 1, 2, 3)
        print(
            f"\nDefaults (Algorithm 1: ε_t = {EXACT_LNB_SCHEDULE[0]:g}·{EXACT_LNB_SCHEDULE[1]}ᵗ, "
            f"Algorithm 2: ε_t = {ONLINE_LNB_SCHEDULE[0]:g}·{ONLINE_LNB_SCHEDULE[1]}ᵗ, b1 = 0) "
            f"against best-of-grid GD {GD_GRID} and Adam {ADAM_GRID}: excess at step 100 / 1000"
        )
        print("| seed | LNB Alg. 1 | LNB Alg. 2 | best GD | best Adam |")
        print("|---|---|---|---|---|")
        for seed in seeds:
            rows = compare(seed=seed, steps=1000, at=(100, 1000))["rows"]

            def best(prefix, step, rows=rows):
                return min(r["excess"][step] for r in rows if r["optimizer"].startswith(prefix))

            cells = [
                f"{best(p, 100):.3g} / {best(p, 1000):.3g}"
                for p in ("LNB, Algorithm 1", "LNB, Algorithm 2", "gradient descent", "Adam")
            ]
            print(f"| {seed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
