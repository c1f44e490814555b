"""The README's lnb_fast example (an unmodified Equinox MLP) runs as printed and trains."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytest.importorskip("equinox")
README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example: lnb_fast -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its marked lnb_fast example"
    return match.group(1)


def test_readme_example_runs_and_trains():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example(), str(README), "exec"), {"__name__": "readme"})
    printed = out.getvalue()
    assert "| .layers[0].weight | dense weight | 128×64  | 512 | M_i (Eq. 10) |" in printed
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", printed)]
    assert len(losses) == 5
    assert losses[-1] < losses[0] / 100  # 2.33 -> below 0.0233 in 100 steps
