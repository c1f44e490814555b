// MathJax 3, shipped with the site (mathjax/, copied from the django-static-mathjax package by
// tools/site_hooks.py at build time): no CDN, so the maths renders offline and from file://.
// Typeset are only: the arithmatex spans of the Markdown pages (\( \) and \[ \]), the Markdown
// cells of the notebook pages (jp-MarkdownOutput: $ and $$, as in Jupyter) and the tables of
// contents (md-nav--secondary: notebook headings keep their $...$). A dollar sign anywhere else,
// and in code everywhere, is never taken for maths.
// (Not ignoreHtmlClass ".*|" + processHtmlClass: that only reaches text directly inside the
// processed element, not the paragraphs of a notebook cell.)
const MATH = ".arithmatex, .jp-MarkdownOutput, .md-nav--secondary";

window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  startup: { elements: [MATH] },
};

// Re-typeset when mkdocs-material swaps the page in place (navigation.instant, if it is ever
// turned on). document$ also emits once for the page as loaded, which MathJax typesets by itself
// once it has started (`startup.elements`): typesetting it again here found the MathML that
// MathJax had hidden in each formula for screen readers and typeset that too, a second formula
// nested inside every formula, at twice the work (tests/test_site.py checks each formula is
// typeset once). So the first emission is skipped.
let loaded = false;
document$.subscribe(() => {
  if (!loaded) {
    loaded = true;
    return;
  }
  if (window.MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise(document.querySelectorAll(MATH));
  }
});
