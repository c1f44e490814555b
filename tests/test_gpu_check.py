"""``benchmarks/gpu_check.sh``, the GPU checks in one script, without a GPU: the whole script
parses (``bash -n``: every mode's branch), and ``--dry-run`` names each step's command and
writes its summary without running any of them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_every_branch_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_dry_run_names_the_steps_and_runs_none(tmp_path):
    env = dict(os.environ, RESULTS=str(tmp_path))
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    for command in (
        "tests/test_xp.py",
        "benchmarks/step_time.py",
        "benchmarks/measured_strategy.py",
        "benchmarks/peers.py",
    ):
        assert command in done.stdout, command
    summary = (tmp_path / "summary.md").read_text()
    assert "not run (dry run)" in summary and "exit" not in summary
    assert not any(p.suffix == ".log" for p in tmp_path.iterdir())  # nothing ran


def test_an_unknown_option_is_a_usage_error():
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage:")
