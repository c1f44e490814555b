"""``python -m lnb_ref demo``: what ``make demo`` runs (smoke version: 30 steps); the ``lnb``
command's argument and data-file validation (``lnb.cli.main``)."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from lnb_ref.__main__ import main


def test_demo_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["demo", "--steps", "30", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| LNB, Algorithm 1 (exact) |" in out and "| Adam (best at step" in out
    assert "below every baseline curve at every step from step" in out
    data = json.loads((tmp_path / "matfact.json").read_text())
    assert set(data) >= {"seed", "steps", "optimum", "initial_loss", "rows", "curves"}
    assert data["steps"] == 30 and data["optimum"] > 0
    for name, curve in data["curves"].items():
        assert len(curve) == 31, name
    lnb = data["curves"]["LNB, Algorithm 2 (2 PCG its)"]
    assert lnb[-1] < 1e-2 * lnb[0]  # even 30 steps cut the excess loss by 100×
    # the 1000-step column is dropped when the run is shorter
    assert all(list(row["excess"]) == ["10"] for row in data["rows"])
    png = tmp_path / "matfact.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder_is_a_clear_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["demo", "--steps", "2", "--quiet", "--out", str(locked / "x")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_output_path_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("")
    assert main(["demo", "--steps", "2", "--quiet", "--out", str(target)]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["train"])


# --- lnb.cli: a bad flag value or data file is one line on stderr and exit code 2 ----------------
@pytest.fixture
def lnb_main():
    pytest.importorskip("jax")
    pytest.importorskip("sklearn")
    from lnb.cli import main as lnb_cli_main

    return lnb_cli_main


@pytest.fixture
def lnb_main_stubbed(lnb_main, monkeypatch):
    """``lnb.cli.main`` with the experiment runner and ``lnb check``'s engine replaced by stubs
    that fail the test: a rejected argument must stop the command before they run."""
    import lnb.check
    import lnb.experiments

    def ran(*args, **kwargs):
        raise AssertionError(f"the command ran with {args} {kwargs}")

    monkeypatch.setattr(lnb.experiments, "run", ran)
    monkeypatch.setattr(lnb.check, "run_check", ran)
    return lnb_main


def one_line_error(capsys, message) -> str:
    """The last line of stderr, asserting it holds ``message`` and no traceback was printed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert message in last, err
    return last


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "mlp", "--epochs", "-1"], "argument --epochs: must be an integer >= 1"),
        (["reproduce", "mlp", "--epochs", "0"], "argument --epochs: must be an integer >= 1"),
        (["reproduce", "mlp", "--epochs", "2.5"], "argument --epochs: expected an integer"),
        (["reproduce", "mlp", "--batch-size", "0"], "argument --batch-size: must be an integer"),
        (["reproduce", "mlp", "--batch-size", "-5"], "argument --batch-size: must be an integer"),
        (["reproduce", "mlp", "--n-test", "0"], "argument --n-test: must be an integer >= 1"),
        (["reproduce", "mlp", "--n-train", "-5"], "argument --n-train: must be an integer >= 1"),
        (["reproduce", "mlp", "--target", "nan"], "argument --target: must be a finite number"),
        (["reproduce", "mlp", "--target", "inf"], "argument --target: must be a finite number"),
        (["reproduce", "mlp", "--target", "x"], "argument --target: expected a number"),
        (["reproduce", "mlp", "--lr", "lnb=abc"], "learning rate of lnb must be a number"),
        (["reproduce", "mlp", "--lr", "lnb=-1"], "learning rate of lnb must be a finite number"),
        (["reproduce", "mlp", "--lr", "adam=0"], "learning rate of adam must be a finite number"),
        (["reproduce", "mlp", "--lr", "adam=nan"], "learning rate of adam must be a finite"),
        (["reproduce", "mlp", "--lr", "adam"], "argument --lr: expected OPTIMIZER=VALUE"),
        (["reproduce", "mlp", "--lr", "=0.1"], "argument --lr: expected OPTIMIZER=VALUE"),
        (["reproduce", "mlp", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
        (["reproduce", "mlp", "--option", "lnb=1"], "argument --option: expected OPTIMIZER.OPTION"),
        (["reproduce", "mlp", "--option", "lnb.ridge"], "argument --option: expected OPTIMIZER"),
        (["reproduce", "vit", "--model", "depth"], "argument --model: expected KEY=VALUE"),
        (["demo", "--epochs", "0"], "argument --epochs: must be an integer >= 1"),
        (["check", "--problems", "-1"], "argument --problems: must be an integer >= 1"),
        (["check", "--problems", "0"], "argument --problems: must be an integer >= 1"),
        (["check", "--seed", "-3"], "argument --seed: must be an integer >= 0"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(lnb_main_stubbed, capsys, tmp_path, argv, message):
    out = ["--out", str(tmp_path)] if argv[0] != "check" else []
    with pytest.raises(SystemExit) as exit_info:
        lnb_main_stubbed([*argv, *out, "--quiet"])
    assert exit_info.value.code == 2
    one_line_error(capsys, message)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "rmsprop=1e-3"], "--lr: unknown optimizer 'rmsprop'; choose from lnb, adam"),
        (["--batch-size", "10"], "--batch-size does not apply to matfact"),
        (["--n-train", "10", "--n-test", "5"], "--n-train, --n-test do not apply to matfact"),
        (["--option", "rmsprop.eps=1"], "--option: no options for optimizer 'rmsprop'; choose"),
        (["--option", "adam.b1=0.8"], "--option: no options for optimizer 'adam'; choose from"),
        (["--option", "lnb.momentum=0.9"], "--option: lnb takes no option 'momentum'"),
        (["--option", "lnb.neurons=None"], "--option: lnb takes no option 'neurons'"),
        (["--option", "lnb.min_descent=-1"], "--option lnb: min_descent must lie in [0.0, 1.0]"),
        (["--option", "lnb.step_norm=fast"], "--option lnb: step_norm must be"),
        (["--model", "depth=1"], "--model does not apply to matfact"),
    ],
)
def test_flags_the_experiment_cannot_use_exit_2(lnb_main_stubbed, capsys, tmp_path, argv, message):
    argv = ["reproduce", "matfact", *argv, "--out", str(tmp_path), "--quiet"]
    assert lnb_main_stubbed(argv) == 2
    one_line_error(capsys, message)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["vit", "--model", "deph=1"],
            "--model: vit takes no option 'deph'; it takes patch, dim, depth, heads, mlp_dim, "
            "layernorm_affine",
        ),
        (["vit", "--model", "depth=1.5"], "--model depth: expected a int like its default 2"),
        (["vit", "--model", "layernorm_affine=1"], "--model layernorm_affine: expected a bool"),
        (["mlp", "--model", "hidden=64"], "--model hidden: expected a tuple like its default"),
        (["unet", "--model", "width=8"], "--model: unet takes no option 'width'; it takes"),
    ],
)
def test_bad_model_options_exit_2(lnb_main_stubbed, capsys, tmp_path, argv, message):
    assert lnb_main_stubbed(["reproduce", *argv, "--out", str(tmp_path), "--quiet"]) == 2
    one_line_error(capsys, message)


def test_a_model_the_data_cannot_take_is_one_line(lnb_main, capsys, tmp_path):
    """``--model patch=3`` on 8×8 digits: the builder's own reason, as one line and exit 2,
    raised when the data is loaded and before any training."""
    argv = ["reproduce", "vit", "--model", "patch=3", "--out", str(tmp_path), "--quiet"]
    assert lnb_main(argv) == 2
    line = one_line_error(capsys, "--model: vit with {'patch': 3, 'dim': 64, 'depth': 2")
    assert line.endswith("vit: input 8×8 is not divisible by patch size 3"), line


@pytest.fixture
def recorded_run(lnb_main, monkeypatch) -> dict:
    """The keyword arguments ``lnb reproduce`` passes to the experiment runner, which a stub
    records here before it stops the command (``SystemExit(0)``)."""
    import lnb.experiments

    seen: dict = {}

    def run(name, optimizers, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(lnb.experiments, "run", run)
    return seen


def test_model_options_reach_the_model(lnb_main, recorded_run, tmp_path):
    """``--model hidden=[64, 32] --model activation=relu``: read as Python literals (a list for a
    tuple is a tuple) or else strings, passed to the runner."""
    argv = ["reproduce", "mlp", "--model", "hidden=[64, 32]", "--model", "activation=relu"]
    with pytest.raises(SystemExit):
        lnb_main([*argv, "--out", str(tmp_path), "--quiet"])
    assert recorded_run["model_options"] == {"hidden": (64, 32), "activation": "relu"}


def test_options_reach_the_optimizer(lnb_main, recorded_run, tmp_path):
    """``--option lnb.min_descent=0 --option lnb.step_norm=paper``: the values, read as Python
    literals or else strings, are merged into the experiment's LNB options and passed to the
    runner."""
    argv = ["reproduce", "mlp", "--option", "lnb.min_descent=0", "--option", "lnb.step_norm=paper"]
    with pytest.raises(SystemExit):
        lnb_main([*argv, "--option", "foof.damping=0.3", "--out", str(tmp_path), "--quiet"])
    assert recorded_run["optimizer_options"] == {
        "lnb": {"min_descent": 0, "step_norm": "paper"},
        "foof": {"damping": 0.3},
    }
    assert recorded_run["model_options"] is None  # no --model: the experiment's own


def _idx(a: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    return head + a.tobytes()


def _fashion_files(folder, gz: bool) -> dict:
    """The four Fashion-MNIST IDX files (6 images each), gzipped or not; ``{key: path}``."""
    images = np.arange(6 * 28 * 28, dtype=np.uint8).reshape(6, 28, 28)
    labels = np.arange(6, dtype=np.uint8)
    paths = {}
    for key, stem, arr in (
        ("x_train", "train-images-idx3-ubyte", images),
        ("y_train", "train-labels-idx1-ubyte", labels),
        ("x_test", "t10k-images-idx3-ubyte", images),
        ("y_test", "t10k-labels-idx1-ubyte", labels),
    ):
        path = folder / (stem + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(_idx(arr)) if gz else _idx(arr))
        paths[key] = path
    return paths


#: name: (gzipped?, which file, how it is corrupted, what the message says)
CORRUPTIONS = {
    "not idx": (False, "x_train", lambda b: b"not an idx file at all", "is not an IDX file"),
    "truncated data": (False, "x_train", lambda b: b[:-100], "header says (6, 28, 28) but holds"),
    "truncated header": (False, "x_test", lambda b: b[:9], "truncated IDX header"),
    "not gzip": (True, "y_train", lambda b: b"plain bytes", "cannot read"),
    "truncated gzip": (True, "x_test", lambda b: b[: len(b) // 2], "cannot read"),
    "label count": (False, "y_test", lambda b: _idx(np.zeros(4, np.uint8)), "their n labels"),
    "label range": (False, "y_train", lambda b: _idx(np.full(6, 200, np.uint8)), "label 200"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_idx_file_is_one_line_naming_the_file(lnb_main, capsys, tmp_path, case):
    gz, key, corrupt, message = CORRUPTIONS[case]
    folder = tmp_path / "fashion"
    folder.mkdir()
    path = _fashion_files(folder, gz)[key]
    path.write_bytes(corrupt(path.read_bytes()))
    argv = ["reproduce", "mlp", "--dataset", "fashion-mnist", "--data-path", str(folder)]
    assert lnb_main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert str(path) in one_line_error(capsys, message)


def test_batch_larger_than_the_training_set_exits_2(lnb_main, capsys, tmp_path):
    argv = ["reproduce", "mlp", "--n-train", "40", "--batch-size", "50", "--epochs", "1"]
    assert lnb_main([*argv, "--out", str(tmp_path), "--quiet"]) == 2
    one_line_error(capsys, "batch size 50 is larger than the training set (40)")


def _result(path, dataset: str, shift: float) -> str:
    """A result file as ``lnb reproduce`` writes it (the keys ``lnb plot`` reads; a diverged
    epoch is stored as null)."""
    runs = [
        {
            "optimizer": name,
            "label": name,
            "train_loss": [1.0 + shift, 0.5 + shift, None],
            "test_metric": [0.5, 0.8 - shift, 0.9],
            "epoch_seconds": [0.1, 0.1, 0.1],
        }
        for name in ("lnb", "adam")
    ]
    path.write_text(json.dumps({"metric": "accuracy", "dataset": {"name": dataset}, "runs": runs}))
    return str(path)


def test_plot_puts_results_on_shared_axes(tmp_path, capsys):
    """``lnb plot``: one PNG from up to three result files; a second result adds its (dashed)
    curves, so the figure differs from the first result's alone."""
    from lnb.cli import main as lnb

    a = _result(tmp_path / "a.json", "digits", 0.0)
    b = _result(tmp_path / "b.json", "digits (inverted)", 0.1)
    assert lnb(["plot", a, "--out", str(tmp_path / "one.png")]) == 0
    assert lnb(["plot", a, b, "--out", str(tmp_path / "two.png"), "--title", "t"]) == 0
    one, two = (tmp_path / "one.png").read_bytes(), (tmp_path / "two.png").read_bytes()
    assert one[:4] == two[:4] == b"\x89PNG" and one != two
    assert str(tmp_path / "two.png") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "cannot read"),
        ("corrupt", "is not a result file"),
        ("four", "at most 3 result files"),
        ("jpg", "must name a .png file"),
        ("no-folder", "does not exist"),
        ("mixed", "measure different things"),
    ],
)
def test_plot_bad_inputs_exit_2_with_one_line(tmp_path, capsys, case, message):
    from lnb.cli import main as lnb

    good = _result(tmp_path / "a.json", "digits", 0.0)
    out = str(tmp_path / "fig.png")
    files = [good]
    if case == "missing":
        files = [str(tmp_path / "nope.json")]
    elif case == "corrupt":
        (tmp_path / "bad.json").write_text("{ not json")
        files = [str(tmp_path / "bad.json")]
    elif case == "four":
        files = [good] * 4
    elif case == "jpg":
        out = str(tmp_path / "fig.jpg")
    elif case == "no-folder":
        out = str(tmp_path / "nowhere" / "fig.png")
    elif case == "mixed":
        other = json.loads((tmp_path / "a.json").read_text()) | {"metric": "excess loss"}
        (tmp_path / "m.json").write_text(json.dumps(other))
        files = [good, str(tmp_path / "m.json")]
    assert lnb(["plot", *files, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lnb: error:") and message in err and "\n" not in err
    assert not (tmp_path / "fig.png").exists()
