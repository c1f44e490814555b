"""The docs site, built and then opened in a real browser.

The site is built here, once per session (:func:`site`): ``mkdocs build --strict`` renders the
pages and the notebooks that ``tests/test_notebooks.py`` executed into ``docs/notebooks/``, then
``tools/check_site.py`` checks every relative link and ``#anchor`` of every page, notebook pages
included. The module is in the notebooks' xdist group and collected after them, so under
``make test`` (``--dist loadgroup``) it runs on their worker once they are done, while the other
worker goes on with the rest of the suite (docs/testing.md, "How long it takes").

Then headless Chromium opens the maths page and every notebook page of ``build/site`` from
``file://``, with every host name unresolvable (offline), and the formulas must have been typeset
by the MathJax that ships with the site: ``mjx-container`` elements, no MathJax error, and no TeX
delimiter left in the text MathJax is given (Markdown cells of the notebooks, arithmatex spans,
the tables of contents). Search must work there too.

The browser tests skip, saying why, where Chromium is not installed (``apt-get install
chromium``; or set ``LNB_CHROMIUM`` to a Chrome/Chromium binary); the build skips where the
executed notebooks are missing from ``docs/notebooks/`` (run ``tests/test_notebooks.py`` first,
as ``make test`` and ``make docs`` do).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

#: after the notebooks, on their worker (tests/conftest.py orders the group's tests)
pytestmark = pytest.mark.xdist_group("notebooks")

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "site"
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
RENDERED = ROOT / "docs" / "notebooks"
PAGES = ["maths.html", *(f"notebooks/{name}.html" for name in NOTEBOOKS)]
#: Classes whose text MathJax typesets (docs/javascripts/mathjax.js).
MATH_CLASSES = {"arithmatex", "jp-MarkdownOutput", "md-nav--secondary"}
#: Text under these is not maths (code) or is MathJax's output.
OPAQUE = {"mjx-container", "code", "pre", "script", "style", "kbd"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
RAW_TEX = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]")


def _chromium() -> str | None:
    candidates = [os.environ.get("LNB_CHROMIUM"), "/usr/bin/chromium"]
    candidates += [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


CHROMIUM = _chromium()
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium not found (apt-get install chromium, or set LNB_CHROMIUM)",
)


@pytest.fixture(scope="session")
def site() -> Path:
    """``build/site``, built from ``docs/`` with the executed notebooks (``make docs-build``:
    ``mkdocs build --strict``, then ``tools/check_site.py``); built once per session, and the
    build itself is :func:`test_the_site_builds_strictly_and_every_link_resolves`."""
    missing = [n for n in NOTEBOOKS if not (RENDERED / f"{n}.ipynb").is_file()]
    if missing:
        pytest.skip(
            f"docs/notebooks/ lacks the executed {', '.join(missing)}: run "
            "tests/test_notebooks.py first (make test and make docs do)"
        )
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr[-4000:]}"
    links = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_site.py"), str(SITE)],
        capture_output=True,
        text=True,
        check=False,
    )
    print(links.stdout.strip().splitlines()[-1] if links.stdout.strip() else links.stderr)
    assert links.returncode == 0, f"broken links in the built site:\n{links.stdout[-4000:]}"
    return SITE


def test_the_site_builds_strictly_and_every_link_resolves(site):
    """``mkdocs build --strict`` succeeded (no warning: a broken link between Markdown pages, a
    missing nav entry) and ``tools/check_site.py`` found every relative link and anchor of
    every built page, notebook pages included (both asserted in :func:`site`)."""
    assert (site / "index.html").is_file()
    for name in NOTEBOOKS:
        assert (site / "notebooks" / f"{name}.html").is_file(), f"{name} was not rendered"


def dump_dom(url: str, profile: Path) -> str:
    """The DOM of ``url`` after its scripts ran (virtual time: MathJax finishes typesetting)."""
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no CDN can answer
        "--window-size=1280,2000",
        "--virtual-time-budget=30000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "</html>" in done.stdout, done.stderr[-2000:]
    return done.stdout


class _Typeset(HTMLParser):
    """Counts MathJax's output and collects the text MathJax was meant to typeset."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, in maths text, opaque)
        self.counts = {"mjx-container": 0, "mjx-merror": 0}
        self.nested = 0  # formulas typeset inside a formula (a second typesetting pass)
        self.leftover: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.counts:
            self.counts[tag] += 1
        if tag == "mjx-container" and any(t == "mjx-container" for t, *_ in self.stack):
            self.nested += 1
        if tag in VOID:
            return
        classes = set((dict(attrs).get("class") or "").split())
        math, opaque = self.stack[-1][1:] if self.stack else (False, False)
        self.stack.append((tag, math or bool(classes & MATH_CLASSES), opaque or tag in OPAQUE))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self.stack and self.stack[-1][1] and not self.stack[-1][2] and RAW_TEX.search(data):
            self.leftover.append(data.strip()[:120])


def test_the_pages_to_check():
    assert len(NOTEBOOKS) == 6 and len(PAGES) == 7, PAGES


@needs_browser
@pytest.mark.parametrize("page", PAGES)
def test_formulas_are_typeset_offline(page, site, tmp_path):
    path = site / page
    assert path.is_file(), f"{page} is missing from the built site"
    dom = _Typeset()
    dom.feed(dump_dom(path.as_uri(), tmp_path / "profile"))
    typeset = dom.counts["mjx-container"]
    print(f"{page}: {typeset} formulas typeset")
    assert typeset >= 20, f"{page}: only {typeset} formulas typeset"
    assert dom.counts["mjx-merror"] == 0, f"{page}: MathJax reported TeX errors"
    # each formula typeset once: a second pass typesets the MathML that MathJax hides inside
    # every formula for screen readers (a formula within each formula, twice the work)
    assert dom.nested == 0, f"{page}: {dom.nested} formulas typeset inside another formula"
    assert not dom.leftover, f"{page}: raw TeX left in the rendered text: {dom.leftover[:5]}"


@needs_browser
def test_search_works_offline(site, tmp_path):
    html = dump_dom((site / "index.html").as_uri() + "?q=whitening", tmp_path / "profile")
    found = re.search(r'md-search-result__meta">\s*(\d+) matching document', html)
    assert found and int(found[1]) > 0, "search found nothing from file://"
