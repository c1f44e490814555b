"""Convergence of LNB against Adam on every experiment, side by side in one run.

    .venv/bin/python benchmarks/convergence.py              # all six, ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/convergence.py --experiments mlp,cnn --seeds 0
    .venv/bin/python benchmarks/convergence.py --related     # + FOOF, LocoProp-S/M, ProxProp

For each experiment each optimizer's learning rate is grid-searched (the paper grid-searches
Adam's; we do the same for LNB's ε) on the experiment's default schedule; the best setting is
the one with the best mean final test metric over the seeds. For the best settings we report,
per experiment, the final test metric, the epochs and the training wall time (compilation
excluded) until the test metric first reaches the experiment's target, the ratio LNB/Adam of
both, and the ratio of the median time per epoch. Writes ``results/convergence.json`` (every
curve) and ``results/convergence.md`` (the table ``docs/results.md`` shows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lnb.cli import markdown
from lnb.experiments import EXPERIMENTS, run, to_target
from lnb_ref.matfact import save_json

GRIDS = {
    "matfact": {"lnb": [30.0, 100.0, 300.0], "adam": [0.1, 0.3, 1.0, 3.0]},
    "default": {"lnb": [0.01, 0.03, 0.1], "adam": [3e-4, 1e-3, 3e-3]},
}
#: Learning-rate grids of the related methods (``--related``), around each one's default.
RELATED_GRIDS = {
    "matfact": {
        "foof": [3e-4, 1e-3, 3e-3],
        "locoprop-s": [3e-3, 1e-2, 3e-2],
        "locoprop-m": [3e-3, 1e-2, 3e-2],
        "proxprop": [1e-3, 3e-3, 1e-2],
    },
    "default": {
        "foof": [0.1, 0.3, 1.0],
        "locoprop-s": [3.0, 10.0, 30.0],
        "locoprop-m": [3.0, 10.0, 30.0],
        "proxprop": [1.0, 10.0, 100.0],
    },
}
RELATED = ("foof", "locoprop-s", "locoprop-m", "proxprop")
SEEDS = {"mlp": [0, 1, 2], "mlp-inverted": [0, 1, 2], "cnn": [0, 1], "matfact": [0]}


def grid_of(name: str, opt: str) -> list[float]:
    """The learning rates tried for optimizer ``opt`` on experiment ``name``."""
    for grids in (GRIDS, RELATED_GRIDS):
        grid = grids.get(name, grids["default"])
        if opt in grid:
            return grid[opt]
    raise KeyError(f"no learning-rate grid for {opt} on {name}")


def sweep(name: str, seeds: list[int], bar: tqdm, optimizers=("lnb", "adam")) -> dict:
    """Every (optimizer, learning rate, seed) run of one experiment."""
    exp = EXPERIMENTS[name]
    runs: dict[str, dict[float, list[dict]]] = {opt: {} for opt in optimizers}
    meta = {}
    for opt in optimizers:
        for lr in grid_of(name, opt):
            for seed in seeds:
                result = run(name, [opt], seed=seed, learning_rates={opt: lr}, progress=False)
                runs[opt].setdefault(lr, []).append(result["runs"][0])
                meta = {k: result[k] for k in ("config", "dataset", "metric")}
                bar.update()
    return {"experiment": name, "target": exp.target, "meta": meta, "runs": runs}


def best(runs: dict[float, list[dict]], lower: bool) -> float:
    def score(lr: float) -> float:
        finals = [r["test_metric"][-1] for r in runs[lr]]
        value = float(np.mean(finals))
        if not np.isfinite(value) or any(r["diverged"] for r in runs[lr]):
            return np.inf
        return value if lower else -value

    return min(runs, key=score)


def summarise(sweep_result: dict) -> dict:
    name, target = sweep_result["experiment"], sweep_result["target"]
    lower = sweep_result["meta"]["metric"] == "excess loss"
    row: dict = {"experiment": name, "target": target, "metric": sweep_result["meta"]["metric"]}
    for opt, runs in sweep_result["runs"].items():
        lr = best(runs, lower)
        chosen = runs[lr]
        hits = [to_target(r, target, lower) for r in chosen]
        epochs = [h[0] for h in hits]
        seconds = [h[1] for h in hits]
        per_epoch = [float(np.median(r["epoch_seconds"][1:])) for r in chosen]
        row[opt] = {
            "learning_rate": lr,
            "label": chosen[0]["label"],
            "final": float(np.mean([r["test_metric"][-1] for r in chosen])),
            "epochs_to_target": None if None in epochs else float(np.mean(epochs)),
            "seconds_to_target": None if None in seconds else float(np.mean(seconds)),
            "seconds_per_epoch": float(np.mean(per_epoch)),
            "seeds": len(chosen),
            "grid": {
                str(k): float(np.mean([r["test_metric"][-1] for r in v])) for k, v in runs.items()
            },
        }
    return row


def ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}"


def table(rows: list[dict]) -> str:
    out = []
    for row in rows:
        lnb, adam = row["lnb"], row["adam"]
        fmt = lambda v: "never" if v is None else f"{v:.3g}"  # noqa: E731
        out.append(
            {
                "experiment": row["experiment"],
                "target": f"{'≤' if row['metric'] == 'excess loss' else '≥'} {row['target']:g} "
                f"({row['metric']})",
                "LNB (best ε)": lnb["label"],
                "Adam (best lr)": adam["label"],
                "final: LNB / Adam": f"{lnb['final']:.4g} / {adam['final']:.4g}",
                "epochs to target: LNB / Adam": f"{fmt(lnb['epochs_to_target'])} / "
                f"{fmt(adam['epochs_to_target'])}",
                "epochs ratio": ratio(lnb["epochs_to_target"], adam["epochs_to_target"]),
                "wall time to target (s): LNB / Adam": f"{fmt(lnb['seconds_to_target'])} / "
                f"{fmt(adam['seconds_to_target'])}",
                "wall-time ratio": ratio(lnb["seconds_to_target"], adam["seconds_to_target"]),
                "time per epoch ratio": ratio(lnb["seconds_per_epoch"], adam["seconds_per_epoch"]),
                "seeds": str(lnb["seeds"]),
            }
        )
    return markdown(out)


def related_table(rows: list[dict], optimizers: list[str]) -> str:
    """One row per (experiment, optimizer): its best setting, final metric, epochs and wall time
    to the target, and the ratios to Adam's (epochs, wall time, time per epoch)."""
    out = []
    fmt = lambda v: "never" if v is None else f"{v:.3g}"  # noqa: E731
    for row in rows:
        adam = row["adam"]
        for opt in optimizers:
            r = row[opt]
            out.append(
                {
                    "experiment": row["experiment"],
                    "target": f"{'≤' if row['metric'] == 'excess loss' else '≥'} "
                    f"{row['target']:g} ({row['metric']})",
                    "optimizer (best lr)": r["label"],
                    "final": f"{r['final']:.4g}",
                    "epochs to target": fmt(r["epochs_to_target"]),
                    "epochs / Adam's": ratio(r["epochs_to_target"], adam["epochs_to_target"]),
                    "wall time to target (s)": fmt(r["seconds_to_target"]),
                    "wall time / Adam's": ratio(r["seconds_to_target"], adam["seconds_to_target"]),
                    "time per epoch / Adam's": ratio(
                        r["seconds_per_epoch"], adam["seconds_per_epoch"]
                    ),
                    "seeds": str(r["seeds"]),
                }
            )
    return markdown(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", default=None, help="comma-separated; default: all")
    p.add_argument("--seeds", default=None, help="comma-separated; default per experiment")
    p.add_argument("--out", default="results")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--related",
        action="store_true",
        help="also FOOF, LocoProp-S/M and ProxProp (matfact, mlp, mlp-inverted, cnn by default); "
        "writes results/related.{json,md}",
    )
    args = p.parse_args(argv)
    if args.experiments is None:
        args.experiments = "matfact,mlp,mlp-inverted,cnn" if args.related else ",".join(EXPERIMENTS)
    optimizers = ["lnb", "adam", *(RELATED if args.related else ())]
    names = [n for n in args.experiments.split(",") if n]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(f"unknown experiment(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    seeds = {
        n: ([int(s) for s in args.seeds.split(",")] if args.seeds else SEEDS.get(n, [0]))
        for n in names
    }
    total = sum(len(seeds[n]) * sum(len(grid_of(n, o)) for o in optimizers) for n in names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sweeps, rows = [], []
    with tqdm(total=total, desc="runs", disable=args.quiet) as bar:
        for name in names:
            sweeps.append(sweep(name, seeds[name], bar, optimizers))
            rows.append(summarise(sweeps[-1]))
    text = related_table(rows, optimizers) if args.related else table(rows)
    seconds = time.perf_counter() - start
    command = "python benchmarks/convergence.py " + " ".join(argv or sys.argv[1:])
    stem = "related" if args.related else "convergence"
    save_json(
        out / f"{stem}.json",
        {"command": command.strip(), "seconds": seconds, "summary": rows, "sweeps": sweeps},
    )
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"\n{seconds:.0f} s; wrote {out / stem}.json, {out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
