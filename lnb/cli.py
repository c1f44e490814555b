"""The ``lnb`` command: ``lnb demo``, ``lnb reproduce EXPERIMENT``, ``lnb plot``, ``lnb check``.

    lnb demo                                  # matfact + digits MLP (original, inverted), ~2 min
    lnb reproduce mlp --optimizers lnb,adam --epochs 20 --seed 0 --out results
    lnb reproduce mlp --dataset fashion-mnist # the full-size run (needs `make data`)
    lnb plot results/mlp.json results/mlp-inverted.json --out both.png   # runs on shared axes
    lnb check --problems 20                   # lnb_fast vs lnb_ref on fresh random problems

Every run writes ``OUT/<experiment>.json`` (config, dataset, per-epoch train/test loss and
metric, wall time per epoch excluding compilation) and ``OUT/<experiment>.png``.
Exit codes: 0 success, 1 a check over tolerance, 2 a usage error (a bad flag value, unknown
experiment, optimizer or model option, unwritable output folder, missing or corrupt dataset
file, a model the options cannot build), printed as
one line without a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lnb_ref.matfact import save_json

from .data import DataError, MissingDatasetError


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback, exit code 2."""


# --- argument types: a bad value is a one-line argparse error, exit code 2 ------------------------
def int_at_least(minimum: int):
    """An argparse ``type=``: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def finite_float(text: str) -> float:
    """An argparse ``type=``: a finite number (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def learning_rate(text: str) -> tuple[str, float]:
    """An argparse ``type=`` for ``--lr OPT=VALUE``: ``(OPT, VALUE)`` with VALUE finite > 0
    (whether OPT is an optimizer of the experiment is checked once the experiment is known)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER=VALUE, e.g. adam=3e-3, got {text!r}")
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"the learning rate of {name.strip()} must be a number, got {value!r}"
        ) from None
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError(
            f"the learning rate of {name.strip()} must be a finite number > 0, got {value!r}"
        )
    return name.strip(), rate


def optimizer_option(text: str) -> tuple[str, str, Any]:
    """An argparse ``type=`` for ``--option OPT.KEY=VALUE``: ``(OPT, KEY, VALUE)``, VALUE read
    as a Python literal (``0``, ``0.5``, ``True``, ``None``, ``"x"``) or else kept as a string
    (``step_norm=paper``). Whether OPT and KEY exist is checked once the experiment is known."""
    import ast

    target, sep, raw = text.partition("=")
    name, dot, key = target.partition(".")
    if not (sep and dot and name.strip() and key.strip() and raw.strip()):
        raise argparse.ArgumentTypeError(
            f"expected OPTIMIZER.OPTION=VALUE, e.g. lnb.min_descent=0, got {text!r}"
        )
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return name.strip(), key.strip(), value


def model_option(text: str) -> tuple[str, Any]:
    """An argparse ``type=`` for ``--model KEY=VALUE``: ``(KEY, VALUE)``, VALUE read as a Python
    literal (``1``, ``(16, 32)``, ``True``) or else kept as a string (``activation=relu``).
    Whether KEY exists is checked once the experiment is known (:func:`check_model_options`)."""
    import ast

    key, sep, raw = text.partition("=")
    if not (sep and key.strip() and raw.strip()):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. depth=1, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


def check_model_options(exp, options: list) -> dict[str, Any]:
    """``--model`` values as ``{keyword: value}``, each keyword one the experiment's model
    builder (:mod:`lnb.models`) takes besides the input shape and the class count, each value of
    the type of that keyword's default (a list for a tuple); a shape the model cannot take is
    the builder's own error, when the data is known (:class:`lnb.experiments.ModelOptionError`)."""
    import inspect

    from . import models

    if not options:
        return {}
    if exp.model == "matfact":
        raise UsageError("--model does not apply to matfact (its model is the problem itself)")
    parameters = list(inspect.signature(getattr(models, exp.model)).parameters.values())[2:]
    defaults = {p.name: p.default for p in parameters}
    out: dict[str, Any] = {}
    for key, value in options:
        if key not in defaults:
            raise UsageError(
                f"--model: {exp.model} takes no option {key!r}; it takes {', '.join(defaults)}"
            )
        default = defaults[key]
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        same = isinstance(value, type(default)) and isinstance(value, bool) == isinstance(
            default, bool
        )
        if not same:
            raise UsageError(
                f"--model {key}: expected a {type(default).__name__} like its default "
                f"{default!r}, got {value!r}"
            )
        out[key] = value
    return out


def check_options(exp, options: list) -> dict[str, dict]:
    """``--option`` values as ``{optimizer: {keyword: value}}``, each optimizer one of the
    experiment's and each keyword one its constructor takes; a bad value is the constructor's
    own error, raised here as a one-line :class:`UsageError` (a dry build without the model)."""
    import inspect

    from .train import CONSTRUCTORS, FEATURE_OPTIMIZERS, OptimizerSpec

    # the lnb_fast optimizers (FEATURE_OPTIMIZERS) validate their Python arguments when built,
    # so a bad value is caught here; optax's (adam, sgd) do not, so theirs are not offered
    offered = [o for o in exp.optimizers if o in FEATURE_OPTIMIZERS]
    out: dict[str, dict] = {}
    for name, key, value in options:
        if name not in offered:
            raise UsageError(
                f"--option: no options for optimizer {name!r}; choose from {', '.join(offered)}"
            )
        make, _ = CONSTRUCTORS[name]
        accepted = list(inspect.signature(make).parameters)
        if key not in accepted[1:] or key == "neurons":  # not the rate, not the model's table
            raise UsageError(f"--option: {name} takes no option {key!r} (see its docstring)")
        out.setdefault(name, {})[key] = value
    for name, given in out.items():
        spec = exp.optimizers[name]
        try:  # the constructor validates its Python arguments (lnb_fast: at construction)
            OptimizerSpec(name, spec.learning_rate, spec.decay, {**spec.options, **given}).build()
        except (ValueError, TypeError) as err:
            if "neurons=" not in str(err):  # a strategy that needs the model's table: fine
                raise UsageError(f"--option {name}: {err}") from None
    return out


positive_int = int_at_least(1)
seed_int = int_at_least(0)


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to output folder {folder}: {err.strerror or err}") from None


def machine() -> dict[str, Any]:
    import jax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(["lnb", *sys.argv[1:]]),
    }


def summary_rows(result: dict) -> list[dict[str, str]]:
    """One row per run: final train loss and test metric, epochs and seconds to the
    experiment's target, seconds per epoch (median, compilation excluded)."""
    from .experiments import to_target

    rows = []
    lower = result["metric"] == "excess loss"
    target = result["config"]["target"]
    for run in result["runs"]:
        seconds = np.asarray(run["epoch_seconds"][1:], dtype=float)
        epochs, wall = to_target(run, target, lower)
        rows.append(
            {
                "experiment": f"{result['config']['experiment']} ({result['dataset']['name']})",
                "optimizer": run["label"],
                "epochs": str(len(run["test_metric"]) - 1),
                "final train loss": f"{run['train_loss'][-1]:.4g}",
                "final test metric": f"{run['test_metric'][-1]:.4g} ({result['metric']})",
                "target": f"{'≤' if lower else '≥'} {target:g}",
                "epochs to target": "never" if epochs is None else str(epochs),
                "seconds to target": "never" if wall is None else f"{wall:.3g}",
                "s / epoch": f"{np.median(seconds):.3g}" if seconds.size else "-",
            }
        )
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    """Rows of dicts (possibly different keys) as one Markdown table."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def save(result: dict, out: Path, name: str, title: str) -> list[Path]:
    from .plots import plot_results

    result = {**result, "machine": machine()}
    save_json(out / f"{name}.json", result)
    return [out / f"{name}.json", plot_results([result], out / f"{name}.png", title)]


# --- subcommands ----------------------------------------------------------------------------------
def cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments import EXPERIMENTS, ModelOptionError, run

    out = Path(args.out)
    check_writable(out)
    exp = EXPERIMENTS[args.experiment]
    if args.layernorm_affine and exp.model != "vit":
        raise UsageError("--layernorm-affine applies to the vit experiment only")
    model_options = check_model_options(exp, args.model or [])
    if args.layernorm_affine:
        model_options["layernorm_affine"] = True
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [o for o in optimizers if o not in exp.optimizers]
    if unknown:
        raise UsageError(
            f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(exp.optimizers)}"
        )
    if exp.model == "matfact":
        ignored = [
            flag
            for flag, value in (
                ("--dataset", args.dataset),
                ("--data-path", args.data_path),
                ("--batch-size", args.batch_size),
                ("--n-train", args.n_train),
                ("--n-test", args.n_test),
            )
            if value is not None
        ]
        if ignored:
            verb = "does" if len(ignored) == 1 else "do"
            raise UsageError(f"{', '.join(ignored)} {verb} not apply to matfact (full batch)")
    lrs = {}
    for name, rate in args.lr or []:
        if name not in exp.optimizers:
            raise UsageError(
                f"--lr: unknown optimizer {name!r}; choose from {', '.join(exp.optimizers)}"
            )
        lrs[name] = rate
    options = check_options(exp, args.option or [])
    start = time.perf_counter()
    try:
        result = run(
            args.experiment,
            optimizers,
            epochs=args.epochs,
            seed=args.seed,
            dataset=args.dataset,
            data_path=args.data_path,
            batch_size=args.batch_size,
            n_train=args.n_train,
            n_test=args.n_test,
            learning_rates=lrs,
            optimizer_options=options,
            target=args.target,
            model_options=model_options or None,
            progress=not args.quiet,
        )
    except ModelOptionError as err:  # --model values this data cannot take
        raise UsageError(f"--model: {err}") from None
    result["seconds"] = time.perf_counter() - start
    paths = save(result, out, args.experiment, exp.description)
    print(markdown(summary_rows(result)))
    print(f"\nwrote {', '.join(str(p) for p in paths)} ({result['seconds']:.0f} s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .experiments import run
    from .plots import plot_results

    out = Path(args.out)
    check_writable(out)
    start = time.perf_counter()
    progress = not args.quiet
    results = {
        "matfact": run(
            "matfact", ["lnb", "adam", "sgd"], epochs=300, seed=args.seed, progress=progress
        ),
        "mlp": run("mlp", ["lnb", "adam"], epochs=args.epochs, seed=args.seed, progress=progress),
        "mlp-inverted": run(
            "mlp-inverted", ["lnb", "adam"], epochs=args.epochs, seed=args.seed, progress=progress
        ),
    }
    seconds = time.perf_counter() - start
    payload = {"seconds": seconds, "machine": machine(), "results": results}
    save_json(out / "demo.json", payload)
    paths = [
        out / "demo.json",
        plot_results(
            [results["matfact"]],
            out / "demo-matfact.png",
            "Matrix factorization (§5.1): excess loss",
        ),
        plot_results(
            [results["mlp"], results["mlp-inverted"]],
            out / "demo-mlp.png",
            "Digits MLP (§5.2): original (solid) and inverted 1 − x (dashed) pixels",
        ),
    ]
    rows = [row for r in results.values() for row in summary_rows(r)]
    print(markdown(rows))
    print("\nmatfact is full batch: one epoch is one step. Seconds exclude compilation.")
    gap = {}
    for run_o, run_i in zip(results["mlp"]["runs"], results["mlp-inverted"]["runs"], strict=True):
        gap[run_o["optimizer"]] = 100 * (run_o["test_metric"][-1] - run_i["test_metric"][-1])
    print(
        "\nTest accuracy, original minus inverted pixels (points): "
        + ", ".join(f"{k} {v:+.1f}" for k, v in gap.items())
    )
    print(f"\nwrote {', '.join(str(p) for p in paths)} ({seconds:.0f} s)")
    return 0


def load_result(path: Path) -> dict:
    """A result JSON written by ``lnb reproduce`` (its nulls, non-finite values, back to nan)."""
    import json

    try:
        result = json.loads(path.read_text())
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise UsageError(f"{path} is not a result file: {err}") from None
    if not isinstance(result, dict) or not isinstance(result.get("runs"), list):
        raise UsageError(f"{path} is not a result file of lnb reproduce (no 'runs')")
    for run in result["runs"]:
        for key in ("train_loss", "test_metric", "epoch_seconds"):
            if key in run:
                run[key] = [math.nan if v is None else v for v in run[key]]
    return result


def cmd_plot(args) -> int:
    """``lnb plot A.json [B.json [C.json]] --out FIG.png``: the runs of up to three results on
    shared axes (solid, dashed, dotted), e.g. original and inverted pixels."""
    from .plots import plot_results

    if len(args.results) > 3:
        raise UsageError(f"at most 3 result files share one figure, got {len(args.results)}")
    results = [load_result(Path(p)) for p in args.results]
    metrics = {r.get("metric") for r in results}
    if len(metrics) > 1:
        raise UsageError(f"the results measure different things ({', '.join(map(str, metrics))})")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {out}")
    if not out.parent.is_dir():
        raise UsageError(f"--out: folder {out.parent} does not exist")
    print(plot_results(results, out, args.title))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import format_report, passed, run_check

    seed = args.seed
    if seed is None:  # fresh entropy, printed so that a failing draw can be replayed
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    print(f"seed {seed} (rerun this draw with: lnb check --problems {args.problems} --seed {seed})")
    errors = run_check(args.problems, seed=seed, progress=not args.quiet)
    print(format_report(errors))
    ok = passed(errors)
    print("\nall within tolerance" if ok else "\nSOME QUANTITIES ARE OVER TOLERANCE")
    return 0 if ok else 1


def parser() -> argparse.ArgumentParser:
    from .experiments import EXPERIMENTS

    p = argparse.ArgumentParser(prog="lnb", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="matrix factorization + digits MLP (original, inverted)")
    demo.add_argument("--epochs", type=positive_int, default=15, help="MLP epochs (default 15)")
    demo.add_argument("--seed", type=seed_int, default=0)
    demo.add_argument("--out", default="results", help="output folder (default results/)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    rep = sub.add_parser("reproduce", help="one experiment of the paper's §5")
    rep.add_argument("experiment", choices=list(EXPERIMENTS))
    rep.add_argument("--optimizers", default="lnb,adam", help="comma-separated (lnb,adam,sgd)")
    rep.add_argument("--epochs", type=positive_int, default=None, help="default: the experiment's")
    rep.add_argument("--seed", type=seed_int, default=0)
    rep.add_argument("--out", default="results")
    rep.add_argument(
        "--dataset",
        choices=["digits", "fashion-mnist", "shapes"],
        default=None,
        help="override the experiment's dataset",
    )
    rep.add_argument("--data-path", default=None, help="folder with the Fashion-MNIST IDX files")
    rep.add_argument("--batch-size", type=positive_int, default=None)
    rep.add_argument(
        "--n-train", type=positive_int, default=None, help="random subset of the train set"
    )
    rep.add_argument(
        "--n-test", type=positive_int, default=None, help="random subset of the test set"
    )
    rep.add_argument(
        "--lr",
        action="append",
        type=learning_rate,
        metavar="OPT=VALUE",
        help="override a learning rate, e.g. --lr adam=3e-3 (repeatable)",
    )
    rep.add_argument(
        "--option",
        action="append",
        type=optimizer_option,
        metavar="OPT.KEY=VALUE",
        help="a keyword argument of lnb, foof, locoprop-s/m or proxprop, e.g. "
        "--option lnb.min_descent=0 (repeatable)",
    )
    rep.add_argument(
        "--model",
        action="append",
        type=model_option,
        metavar="KEY=VALUE",
        help="a keyword of the experiment's model in lnb.models, e.g. --model depth=1 (vit), "
        "--model hidden=(256,256) (mlp) (repeatable)",
    )
    rep.add_argument(
        "--layernorm-affine",
        action="store_true",
        help="vit: give the LayerNorms a learned scale and bias (the paper did not)",
    )
    rep.add_argument(
        "--target",
        type=finite_float,
        default=None,
        help="test metric level for 'epochs to target' (default: the experiment's)",
    )
    rep.add_argument("--quiet", action="store_true")
    rep.set_defaults(func=cmd_reproduce)

    plot = sub.add_parser("plot", help="result files of lnb reproduce on shared axes (PNG)")
    plot.add_argument("results", nargs="+", help="OUT/<experiment>.json files (at most 3)")
    plot.add_argument("--out", required=True, help="the PNG file to write")
    plot.add_argument("--title", default=None)
    plot.set_defaults(func=cmd_plot)

    check = sub.add_parser("check", help="lnb_fast against lnb_ref on fresh random problems")
    check.add_argument("--problems", type=positive_int, default=20)
    check.add_argument("--seed", type=seed_int, default=None)
    check.add_argument("--quiet", action="store_true")
    check.set_defaults(func=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, MissingDatasetError, DataError) as err:
        print(f"lnb: error: {err}", file=sys.stderr)
        return 2
