"""Check the links of the built site as a browser opening it from ``file://`` sees them.

Every relative ``href``/``src`` of every HTML page under the site folder (``build/site`` by
default) must name a file that exists (a folder is an error: from ``file://`` it shows a directory
listing), and every ``#anchor`` must be an ``id`` (or ``<a name>``) of the page it points to.
External URLs (``https:``, ``mailto:``, ``data:`` …) are counted, not fetched. Exits 1 and lists
what is broken; ``make docs-build`` runs it after ``mkdocs build --strict``, which does not look
inside the notebook pages (mkdocs-jupyter renders them to HTML after MkDocs' own link checks).

No library: mkdocs-htmlproofer-plugin checks links while MkDocs renders the pages (and fetches
external URLs over the network), not the files on disk after every plugin and hook has run, and
linkchecker is a crawler with far more than this needs. The standard library's ``html.parser``
does it in a page of code.

Usage: ``python tools/check_site.py [SITE_DIR]``
"""

from __future__ import annotations

import sys
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

LINK_ATTRS = {"href", "src"}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" or (tag == "a" and name == "name"):
                self.ids.add(value or "")
            elif name in LINK_ATTRS and value is not None:
                self.refs.append((tag, name, value.strip()))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def check(site: Path) -> tuple[dict[str, int], list[str]]:
    """(counts, problems) for the site in ``site``."""
    site = site.resolve()
    pages = {p: _parse(p) for p in sorted(site.rglob("*.html"))}
    counts: dict[str, int] = defaultdict(int)
    counts["pages"] = len(pages)
    problems: list[str] = []
    for path, page in pages.items():
        where = path.relative_to(site).as_posix()
        for tag, attr, value in page.refs:
            url = urlsplit(value)
            if url.scheme or value.startswith("//"):
                counts["external"] += 1
                continue
            if not value:
                if attr == "src":  # an empty src makes the browser fetch nothing and fail
                    problems.append(f'{where}: <{tag} {attr}=""> is empty')
                continue
            counts["links"] += 1
            if url.path.startswith("/"):
                # Root-absolute: only the 404 page may use them (a server shows it at any depth,
                # so MkDocs writes its links from the root); from file:// they lead nowhere.
                if path != site / "404.html":
                    problems.append(f"{where}: {value} is root-absolute (broken from file://)")
                    continue
                target = (site / unquote(url.path).lstrip("/")).resolve()
            else:
                target = (path.parent / unquote(url.path)).resolve() if url.path else path
            if not target.is_relative_to(site):
                problems.append(f"{where}: {value} leaves the site")
                continue
            if target.is_dir():
                problems.append(f"{where}: {value} is a folder (a directory listing from file://)")
                continue
            if not target.is_file():
                problems.append(f"{where}: {value} does not exist")
                continue
            if url.fragment and target.suffix == ".html":
                counts["anchors"] += 1
                if unquote(url.fragment) not in pages[target].ids:
                    name = target.relative_to(site).as_posix()
                    problems.append(f"{where}: {value}: no id {url.fragment!r} in {name}")
    return counts, problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    site = Path(args[0] if args else "build/site")
    if not (site / "index.html").is_file():
        print(f"check_site: no built site in {site} (run `make docs-build` first)")
        return 2
    counts, problems = check(site)
    for problem in problems:
        print(f"BROKEN {problem}")
    print(
        f"check_site: {counts['pages']} pages, {counts['links']} relative links "
        f"({counts['anchors']} with an anchor) checked, {counts['external']} external not "
        f"fetched; {len(problems)} broken"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
