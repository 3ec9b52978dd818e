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

# Measured in the page once it has loaded: images, widths, the summary table's place, in-page links.
_MEASURE = """() => {
  const table = document.getElementById("summary");
  const box = table ? table.getBoundingClientRect() : null;
  const links = [...document.querySelectorAll('a[href^="#"]')].map(a => a.getAttribute("href"));
  return {
    images: [...document.images].map(img => ({alt: img.alt, complete: img.complete, width: img.naturalWidth,
                                               height: img.naturalHeight, shown: img.getBoundingClientRect().width})),
    scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
    innerHeight: window.innerHeight, summaryBottom: box ? box.bottom + window.scrollY : null,
    brokenLinks: links.filter(h => h.length < 2 || !document.getElementById(decodeURIComponent(h.slice(1)))),
    links: links.length,
  };
}"""


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
    summary_bottom: Optional[float] = None              # the verdict table's bottom edge, page coordinates
    broken_links: list[str] = field(default_factory=list)  # href="#x" with no element id="x"
    links: int = 0
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
        measured = page.evaluate(_MEASURE)
        view.images, view.links, view.broken_links = measured["images"], measured["links"], measured["brokenLinks"]
        view.scroll_width, view.inner_width = measured["scrollWidth"], measured["innerWidth"]
        view.inner_height, view.summary_bottom = measured["innerHeight"], measured["summaryBottom"]
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
