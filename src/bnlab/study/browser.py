"""The report as a browser shows it: headless Chromium driven by Playwright.

Shared by ``bnlab report --screenshots`` and the browser test, so the screenshots show exactly what the
test checked. Playwright drives the system's Chromium (Debian's ``chromium``, installed by ``make
setup`` as root) through ``executable_path``; it never downloads a browser. ``$BNLAB_CHROMIUM`` names
another executable.

Example::

    >>> from bnlab.study.browser import inspect_report, screenshots      # doctest: +SKIP
    >>> page = inspect_report("study-out/report.html", "phone")
    >>> page.scroll_width <= page.inner_width, page.console_errors
    >>> screenshots("study-out/report.html", "study-out/screenshots")
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from bnlab.errors import UserError
from bnlab.study.style import to_palette_png

__all__ = ["VIEWPORTS", "CHROMIUM_MISSING", "find_chromium", "launch", "PageView", "inspect_report", "screenshots"]

VIEWPORTS = {"desktop": (1366, 900), "phone": (390, 844)}  # a common laptop; a common phone (CSS pixels)
CHROMIUM_MISSING = "chromium not found: run make setup as root or install chromium"
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Measured in the page once it has loaded: images, widths, the answers' place, in-page links, paragraph lengths,
# and the glossary terms whose first use is not linked (``forms``: [[key, regular expression], ...]).
_MEASURE = """(forms) => {
  const table = document.getElementById("summary");
  const box = table ? table.getBoundingClientRect() : null;
  const links = [...document.querySelectorAll('a[href^="#"]')].map(a => a.getAttribute("href"));
  const cards = [...document.querySelectorAll("#summary > li")].map(li => {
    const answer = li.querySelector(".answer"), badge = li.querySelector(".badge");
    const a = answer.getBoundingClientRect(), b = badge.getBoundingClientRect();
    return {id: li.id, answer: answer.innerText.trim(), verdict: badge.innerText.trim(),
            bottom: Math.max(a.bottom, b.bottom) + window.scrollY, shown: a.width > 0 && b.width > 0};
  });
  const long = [...document.querySelectorAll("p, li, dd, figcaption")].filter(e => !e.closest("details"))
    .map(e => ({words: e.innerText.trim().split(/\s+/).filter(Boolean).length, text: e.innerText.trim().slice(0, 80)}))
    .filter(p => p.words > 80);
  const skip = new Set(["A", "CODE", "PRE", "SCRIPT", "STYLE", "TITLE", "SVG", "SUMMARY", "DL", "HEAD", "TEXTAREA"]);
  const seen = new Map(), unlinked = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    let gloss = false, skipped = false, scope = null;
    for (let e = node.parentElement; e; e = e.parentElement) {
      const tag = e.tagName.toUpperCase();
      if (tag === "A" && e.classList.contains("gloss")) gloss = true;
      else if (skip.has(tag)) skipped = true;
      if (!scope && tag === "DETAILS") scope = e;
    }
    if (skipped) continue;
    const key = scope || document.body;
    if (!seen.has(key)) seen.set(key, new Set());
    const done = seen.get(key);
    for (const [name, source] of forms) {
      if (done.has(name)) continue;
      const m = new RegExp(source, "i").exec(node.data);
      if (!m) continue;
      done.add(name);
      if (!gloss) unlinked.push(name + ": …" + node.data.slice(Math.max(0, m.index - 30), m.index + 30) + "…");
    }
  }
  const steps = document.getElementById("bn-steps");
  return {
    images: [...document.images].map(img => ({alt: img.alt, complete: img.complete, width: img.naturalWidth,
                                               height: img.naturalHeight, shown: img.getBoundingClientRect().width})),
    scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
    innerHeight: window.innerHeight, summaryBottom: box ? box.bottom + window.scrollY : null,
    brokenLinks: links.filter(h => h.length < 2 || !document.getElementById(decodeURIComponent(h.slice(1)))),
    links: links.length, cards: cards, longParagraphs: long, unlinkedTerms: unlinked,
    stepFigure: steps ? {complete: steps.complete, width: steps.naturalWidth, height: steps.naturalHeight} : null,
  };
}"""


def _forms() -> list[list[str]]:
    from bnlab.study.templates import GLOSSARY
    return [[f"{term} ({form})", form] for term, entry in GLOSSARY.items() for form in entry.forms]


def find_chromium() -> Optional[str]:
    """The Chromium executable to drive: ``$BNLAB_CHROMIUM``, else the first on ``PATH``; ``None`` if none."""
    named = os.environ.get("BNLAB_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def launch() -> Iterator[object]:
    """A headless Chromium (a Playwright ``Browser``); :class:`UserError` naming the fix if there is none."""
    executable = find_chromium()
    if executable is None:
        raise UserError(CHROMIUM_MISSING)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UserError("the Python package playwright is missing: pip install -e '.[dev]' (or make setup)") from None
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root, which is how CI containers run
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageView:
    """What a browser saw of the report at one viewport."""

    viewport: str
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)    # {"alt", "complete", "width", "height"} (natural size),
                                                        # "shown": the displayed width in CSS pixels
    scroll_width: int = 0                               # document.documentElement.scrollWidth
    inner_width: int = 0
    inner_height: int = 0
    summary_bottom: Optional[float] = None              # the answers' bottom edge, page coordinates
    broken_links: list[str] = field(default_factory=list)  # href="#x" with no element id="x"
    links: int = 0
    cards: list[dict] = field(default_factory=list)     # per answer card: "id", "answer", "verdict" (the badge's
                                                        # text), "bottom" (page coordinates), "shown"
    long_paragraphs: list[dict] = field(default_factory=list)  # p, li, dd, figcaption outside <details> over
                                                               # 80 words: {"words", "text"}
    unlinked_terms: list[str] = field(default_factory=list)  # glossary terms whose first use is not linked
    step_figure: Optional[dict] = None                  # the step-by-step figure: "complete", "width", "height"
    screenshot: Optional[Path] = None


def _view(browser, html: Path, viewport: str, screenshot: Optional[Path] = None) -> PageView:
    width, height = VIEWPORTS[viewport]
    view = PageView(viewport)
    page = browser.new_page(viewport={"width": width, "height": height})
    try:
        page.on("console", lambda m: view.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: view.console_errors.append(str(e)))
        page.on("requestfailed", lambda r: view.failed_requests.append(f"{r.url[:80]}: {r.failure}"))
        page.goto(Path(html).resolve().as_uri(), wait_until="load")
        measured = page.evaluate(_MEASURE, _forms())
        view.images, view.links, view.broken_links = measured["images"], measured["links"], measured["brokenLinks"]
        view.scroll_width, view.inner_width = measured["scrollWidth"], measured["innerWidth"]
        view.inner_height, view.summary_bottom = measured["innerHeight"], measured["summaryBottom"]
        view.cards, view.long_paragraphs = measured["cards"], measured["longParagraphs"]
        view.unlinked_terms, view.step_figure = measured["unlinkedTerms"], measured["stepFigure"]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            # the first screen, as a reader first sees it; a palette PNG, small enough to commit or share
            screenshot.write_bytes(to_palette_png(page.screenshot()))
            view.screenshot = screenshot
    finally:
        page.close()
    return view


def inspect_report(html: str | Path, viewports=tuple(VIEWPORTS), screenshot_dir: str | Path | None = None
                   ) -> dict[str, PageView]:
    """Open ``html`` at each of ``viewports`` (names in :data:`VIEWPORTS`) in one browser and measure it;
    with ``screenshot_dir``, also save ``report-<width>x<height>.png`` of the first screen there."""
    html = Path(html)
    if not html.is_file():
        raise UserError(f"no report at {html}; build it with `bnlab report DIR` first")
    views = {}
    with launch() as browser:
        for name in viewports:
            width, height = VIEWPORTS[name]
            shot = Path(screenshot_dir) / f"report-{width}x{height}.png" if screenshot_dir is not None else None
            views[name] = _view(browser, html, name, shot)
    return views


def screenshots(html: str | Path, out: str | Path) -> list[Path]:
    """Screenshots of the report's first screen at every viewport, saved in ``out``; returns their paths."""
    return [v.screenshot for v in inspect_report(html, screenshot_dir=out).values()]
