"""The README's lnb_ref example runs as printed, prints what its comment says, and trains."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    match = re.search(r"<!-- example: lnb_ref -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README lost its marked lnb_ref example"
    return match.group(1)


def test_readme_reference_example_runs_and_trains():
    code = example()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    before, after = (float(v) for v in re.findall(r"(\d+\.\d+)", out.getvalue())[:2])
    assert after < before / 10
    # the comment on the last line shows the printed numbers
    assert f"# {before:.3f} -> {after:.3f}" in code
