"""MkDocs hooks (``hooks:`` in mkdocs.yml) that make the site work offline and from ``file://``.

* MathJax is shipped with the site instead of fetched from a CDN at view time: the files of
  MathJax 3 that the site uses are copied from the ``django-static-mathjax`` package (a PyPI
  package that bundles MathJax 3.2.2 and nothing else; it needs no Django) into ``mathjax/``
  of the built site. It is in the ``docs`` and ``dev`` extras, so ``make docs`` installs it.
* Notebook pages: links between notebooks are written ``02_metric_and_whitening.ipynb`` in the
  sources (so they work in Jupyter and in the repository); mkdocs-jupyter leaves them as they
  are, so on the site they would lead to the raw ``.ipynb`` download. They are rewritten here
  to the rendered pages. The table of contents that mkdocs-jupyter builds slugifies headings with
  Python-Markdown, which drops code spans, while nbconvert's heading ids keep them; the TOC's
  anchors (and titles, which keep their code) are taken from the rendered headings instead.
  nbconvert's MathJax 2 loader (an empty ``<script src="">`` and its configuration) is
  removed: the site's own MathJax 3 typesets.

``tools/check_site.py`` (run by ``make docs-build``) checks the result.
"""

from __future__ import annotations

import html as html_lib
import importlib.util
import posixpath
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

#: Where MathJax lands in the built site (mkdocs.yml's extra_javascript loads
#: ``mathjax/tex-mml-chtml.js``; the rest is loaded by MathJax itself, relative to that file).
SITE_DIR = "mathjax"
#: What of MathJax's ``es5/`` the site uses: the combined TeX+MathML/CommonHTML component, the
#: TeX extensions it autoloads (e.g. ``\boldsymbol``), its fonts, and what its right-click menu
#: loads on demand (accessibility, speech). The other combined components and the SVG output
#: (~17 MB) are left out.
PARTS = ("tex-mml-chtml.js", "input/tex", "input/mml", "output/chtml", "ui", "a11y", "sre")

_files: Files | None = None


def mathjax_dir() -> Path:
    """``es5/`` of the installed MathJax 3 (from the ``django-static-mathjax`` package)."""
    spec = importlib.util.find_spec("mathjax")
    root = Path(spec.origin).parent / "static" / "mathjax" if spec and spec.origin else None
    if root is None or not (root / "es5" / "tex-mml-chtml.js").is_file():
        raise PluginError(
            "MathJax 3 is not installed: the docs need the django-static-mathjax package "
            "(pip install -e '.[docs]', or `make docs`, which installs it)"
        )
    return root / "es5"


def on_files(files: Files, config) -> Files:
    global _files
    es5 = mathjax_dir()
    for part in PARTS:
        path = es5 / part
        for src in sorted([path] if path.is_file() else path.rglob("*")):
            if src.is_file():
                uri = f"{SITE_DIR}/{src.relative_to(es5).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(src)))
    _files = files
    return files


_NB_MATHJAX2 = re.compile(
    r'<script src="">\s*</script>\s*<!-- MathJax configuration -->.*?'
    r"<!-- End of mathjax configuration -->",
    re.DOTALL,
)
_HEADING = re.compile(r'<h([1-6])[^>]*\sid="([^"]+)"[^>]*>(.*?)</h\1>', re.DOTALL)
_ANCHOR_LINK = re.compile(r'<a class="anchor-link"[^>]*>.*?</a>', re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
_HREF = re.compile(r'(<a\s[^>]*?href=")([^"#?:]+\.ipynb)(#[^"]*)?(")')


def _is_notebook(page) -> bool:
    return page.file.src_uri.endswith(".ipynb")


def _flatten(items):
    for item in items:
        yield item
        yield from _flatten(item.children)


def on_page_content(html: str, page, config, files) -> str:
    if not _is_notebook(page):
        return html
    # The TOC lists the notebook's Markdown headings in order, as the rendered page does: take
    # each anchor and title from the rendered heading (only where the two lists agree level by
    # level). The title keeps its code spans and its $...$, which MathJax typesets in the TOC.
    headings = [(int(level), anchor, body) for level, anchor, body in _HEADING.findall(html)]
    toc = list(_flatten(page.toc))
    if [item.level for item in toc] == [level for level, _, _ in headings]:
        for item, (_, anchor, body) in zip(toc, headings, strict=True):
            item.id = anchor
            text = html_lib.unescape(_TAG.sub("", _ANCHOR_LINK.sub("", body))).strip()
            item.title = html_lib.escape(text, quote=False)
    return _NB_MATHJAX2.sub("", html)


def on_post_page(output: str, page, config) -> str:
    if not _is_notebook(page) or _files is None:
        return output
    here = posixpath.dirname(page.file.src_uri)

    def relink(match: re.Match) -> str:
        target = posixpath.normpath(posixpath.join(here, unquote(urlsplit(match[2]).path)))
        file = _files.get_file_from_path(target)
        if file is None or not file.is_documentation_page():
            return match[0]
        return f"{match[1]}{file.url_relative_to(page.file)}{match[3] or ''}{match[4]}"

    return _HREF.sub(relink, output)
