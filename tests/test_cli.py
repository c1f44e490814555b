"""``python -m lnb_ref demo``: what ``make demo`` runs (smoke version: 30 steps)."""

from __future__ import annotations

import json
import os

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
