"""The matrix-factorization problem of §5.1 and the paper's Fig. 1 claim."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import scipy.linalg

from lnb.testing import rel_err
from lnb.testing.tolerances import RECURRENCE_RTOL, RTOL, SOLVE_RTOL
from lnb_ref import ExactLNB, row_metric
from lnb_ref.matfact import (
    ADAM_GRID,
    GD_GRID,
    MatrixFactorization,
    compare,
    run,
    save_json,
    steps_to_reach,
)


@pytest.fixture(scope="module")
def small():
    """A ×1 instance (Recht's original sizes) for the exactness checks."""
    return MatrixFactorization.make(seed=3, n=500, x_dim=10, hidden=6, y_dim=10)


def test_construction_follows_recht(small):
    p = MatrixFactorization.make(seed=0)
    W2, W1 = p.init_params
    assert p.X.shape == (10_000, 100) and p.Y.shape == (10_000, 100)
    assert W2.shape == (60, 100) and W1.shape == (100, 60)
    row_norms = np.linalg.norm(p.A, axis=1)
    # rows scaled by linspace(1, 1e-5): the last row is ~1e-5 of the first
    assert 1e-6 < row_norms[-1] / row_norms[0] < 1e-4
    assert rel_err(p.Y, p.X @ p.A.T) < RTOL


def test_compressed_data_is_exactly_the_full_batch(small):
    """Loss, gradients and every neuron's metric depend on the data only through S = XᵀX/n."""
    net = small.network
    Xc, Yc = small.compressed()
    rng = np.random.default_rng(0)
    params = [rng.normal(size=p.shape) for p in small.init_params]
    loss, grads, feats = net.loss_grads_features(params, small.X, small.Y)
    loss_c, grads_c, feats_c = net.loss_grads_features(params, Xc, Yc)
    assert abs(loss_c - loss) < RTOL * loss
    for g, gc in zip(grads, grads_c, strict=True):
        assert rel_err(gc, g) < SOLVE_RTOL
    for neuron, F, Fc in zip(net.neurons, feats, feats_c, strict=True):
        assert rel_err(row_metric(neuron, Fc), row_metric(neuron, F)) < SOLVE_RTOL
    # hence whole Algorithm 1 runs coincide
    opt = ExactLNB(net.neurons, 1.0)
    full = run(small, opt, 5, data=(small.X, small.Y))
    comp = run(small, ExactLNB(net.neurons, 1.0), 5)
    assert rel_err(comp, full) < RECURRENCE_RTOL


def test_optimum_is_attained_and_is_a_lower_bound(small):
    """ℓ* = Σ_{k>hidden} σ_k(A R)²: the Eckart–Young minimiser B* = (A R)_hidden R⁻¹ attains it
    on the full data, any square root of S gives the same value, and a long LNB run approaches
    it from above."""
    S = small.second_moment()
    R = scipy.linalg.cholesky(S, lower=True)
    U, s, Vt = np.linalg.svd(small.A @ R)
    h = small.hidden
    B = (U[:, :h] * s[:h]) @ Vt[:h] @ np.linalg.inv(R)
    loss_B = np.mean(np.sum((small.X @ B.T - small.Y) ** 2, axis=1))
    assert abs(loss_B - small.optimum()) < SOLVE_RTOL * small.optimum()
    w, V = np.linalg.eigh(S)
    sym = (V * np.sqrt(w)) @ V.T
    s_sym = scipy.linalg.svdvals(small.A @ sym)
    assert abs(np.sum(s_sym[h:] ** 2) - small.optimum()) < SOLVE_RTOL * small.optimum()
    losses = run(small, ExactLNB(small.network.neurons, lambda t: 1e-1 * 0.97**t), 400)
    assert np.all(losses >= small.optimum() * (1 - SOLVE_RTOL))
    assert losses[-1] - small.optimum() < 1e-3 * (losses[0] - small.optimum())


def test_steps_to_reach():
    curve = np.array([5.0, 3.0, 1.0, 2.0, 0.5])
    assert steps_to_reach(curve, 1.0) == 2
    assert steps_to_reach(curve, 0.1) is None


def check_fig1_claim(seed: int, steps: int = 1000) -> dict:
    """Fig. 1: at equal step counts (100 and ``steps``; the paper's figure: 1000) LNB's excess
    loss (Algorithm 1, and Algorithm 2 with 2 PCG iterations) is below that of GD and Adam at
    their best grid step, and stays below every baseline from some step ≤ ``steps`` on. The
    grids bracket each baseline's optimum (:func:`check_grids_bracket`, asserted for seed 0), so
    "best of grid" is not an artefact of a short grid."""
    result = compare(seed=seed, steps=steps, at=(100, steps))
    rows = {row["optimizer"]: row for row in result["rows"]}
    for lnb_name in ("LNB, Algorithm 1 (exact)", "LNB, Algorithm 2 (2 PCG its)"):
        lnb = rows[lnb_name]
        for step in (100, steps):
            for name in ("gradient descent", "Adam"):
                best = min(r["excess"][step] for key, r in rows.items() if key.startswith(name))
                assert lnb["excess"][step] < best, (seed, lnb_name, step, name, best)
        assert result["ahead_from"][lnb_name] <= steps
    return result


def check_grids_bracket(result: dict) -> None:
    """The grids really bracket the baselines: GD's largest step diverges, the best is interior."""
    best_gd = {row["setting"] for row in result["rows"] if row["optimizer"].startswith("gradient")}
    assert f"lr = {GD_GRID[-1]:g}" not in best_gd
    best_adam = {row["setting"] for row in result["rows"] if row["optimizer"].startswith("Adam")}
    assert f"lr = {ADAM_GRID[-1]:g}" not in best_adam and f"lr = {ADAM_GRID[0]:g}" not in best_adam


def test_fig1_claim_seed0_300_steps():
    """The claim over the first 300 steps (seed 0, measured: LNB's excess 11.6 and 9.8 at step
    100 against GD's 108 and Adam's 38, 0.08 and 0.04 at step 300 against 74 and 5.7; ahead of
    every baseline from steps 126 and 70); the 1000 steps of the figure are the slow test below."""
    check_grids_bracket(check_fig1_claim(0, steps=300))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fig1_claim(seed):
    result = check_fig1_claim(seed)
    if seed == 0:
        check_grids_bracket(result)


# --- results files ------------------------------------------------------------------------------
@pytest.fixture
def previous(tmp_path):
    path = tmp_path / "results.json"
    save_json(path, {"runs": [1.0, 2.0], "seed": np.int64(3)})
    return path, path.read_bytes()


def test_save_json_round_trips_with_the_usual_permissions(previous):
    path, _ = previous
    save_json(path, {"curve": np.array([0.5, np.nan]), "best": np.float32(0.25)})
    assert json.loads(path.read_text()) == {"curve": [0.5, None], "best": 0.25}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_a_failure_while_serialising_leaves_the_previous_results(previous):
    """An object JSON cannot hold, deep in the payload, fails after part of it was serialised:
    the previous file stays as it was (not truncated) and no temporary file is left behind."""
    path, before = previous
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_json(path, {"runs": [4.0, 5.0], "z": {"config": object()}})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_an_interrupted_write_leaves_the_previous_results(previous, monkeypatch):
    """A write cut short (here: the disk fills up after the first chunk) never replaces the
    previous file."""
    path, before = previous
    real_fsync = os.fsync

    def disk_full(fd):
        real_fsync(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_json(path, {"runs": list(range(10_000))})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
