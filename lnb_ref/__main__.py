"""Command line of the reference: ``python -m lnb_ref demo`` (what ``make demo`` runs).

``demo`` runs the matrix-factorization comparison of the paper's §5.1 (Fig. 1) with the exact
reference: LNB (Algorithms 1 and 2) against gradient descent and Adam at their best grid step,
prints the table that the README shows, and writes ``matfact.json`` (every curve) and
``matfact.png`` (excess loss against step) to the output folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from threadpoolctl import threadpool_limits

from . import matfact


def format_table(result: dict) -> str:
    """The comparison as a Markdown table (excess loss over the rank-constrained optimum)."""
    at = list(result["rows"][0]["excess"])
    levels = list(result["rows"][0]["steps_to"])
    head = ["optimizer", "setting", *[f"excess @ {s}" for s in at]]
    head += [f"steps to ≤ {level:g}" for level in levels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [row["optimizer"], row["setting"]]
        cells += [f"{row['excess'][s]:.3g}" for s in at]
        cells += ["—" if row["steps_to"][lv] is None else str(row["steps_to"][lv]) for lv in levels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Excess loss against step for every row; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install 'lnb[plots]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in result["curves"].items():
        style = "-" if name.startswith("LNB") else "--"
        ax.semilogy(curve, style, label=name, lw=1.5)
    ax.set_xlabel("step (full batch)")
    ax.set_ylabel("excess loss  ℓ − ℓ*")
    ax.set_title(
        f"Matrix factorization (§5.1), κ(A) = {result['condition_number']:.2g}, "
        f"seed {result['seed']}"
    )
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def demo(args: argparse.Namespace) -> int:
    """Run :func:`lnb_ref.matfact.compare`, print the table, write the JSON and the plot."""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        print(f"error: cannot write to output folder {str(out)!r}: {err}", file=sys.stderr)
        return 2
    result = matfact.compare(seed=args.seed, steps=args.steps, progress=not args.quiet)
    print(
        f"\nMatrix factorization (paper §5.1), seed {result['seed']}: n = 10⁴, "
        f"W₂ 60×100, W₁ 100×60, κ(A) = {result['condition_number']:.3g}, "
        f"initial loss {result['initial_loss']:.4g}, optimum ℓ* = {result['optimum']:.4g}\n"
    )
    print(format_table(result))
    for name, step in result["ahead_from"].items():
        print(f"{name}: below every baseline curve at every step from step {step} on")
    matfact.save_json(out / "matfact.json", result)
    wrote = [str(out / "matfact.json")]
    if plot(result, out / "matfact.png"):
        wrote.append(str(out / "matfact.png"))
    print("\nwrote " + ", ".join(wrote))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lnb_ref`` and the ``lnb-ref`` console script."""
    parser = argparse.ArgumentParser(prog="python -m lnb_ref", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="matrix factorization: LNB vs GD vs Adam (the README table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", default=os.environ.get("LNB_RESULTS", "results"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    # numpy and scipy each carry an OpenBLAS; on small matrices their thread pools only fight
    # (8× slower on 2 cores: benchmarks/blas_threads.py), so use one thread.
    with threadpool_limits(limits=1):
        return demo(args)


if __name__ == "__main__":
    sys.exit(main())
