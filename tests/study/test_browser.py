"""The tiny profile's report, built through the public CLI and opened in a real headless Chromium (Playwright):
what a reader sees on a laptop and on a phone. Skipped, saying why, only where no Chromium is installed."""

import json
import os
import subprocess
import sys

import markdown
import pytest
from PIL import Image

from bnlab.study.browser import CHROMIUM_MISSING, VIEWPORTS, find_chromium

pytestmark = pytest.mark.skipif(find_chromium() is None, reason=CHROMIUM_MISSING)
pytest.importorskip("playwright", reason="the Python package playwright is missing: pip install -e '.[dev]'")


def _bnlab(*args, timeout=300):
    done = subprocess.run([sys.executable, "-m", "bnlab.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """The tiny study through `bnlab study` (built once, shared by pytest-xdist workers), then each
    viewport's view of its report.html."""
    from filelock import FileLock

    from bnlab.study.browser import inspect_report
    base = tmp_path_factory.getbasetemp()
    # the session's directory, shared by its xdist workers (each has base = SESSION/popen-gwN); never one that
    # other sessions share, where a report of other code may lie
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / "browser-study"
    with FileLock(str(root / "browser-study.lock")):
        if not (out / "report.html").is_file():
            _bnlab("study", "--profile", "tiny", "--out", out, "--jobs", "1", "--no-progress")
    return out, inspect_report(out / "report.html")


def test_no_console_errors_or_failed_requests(tiny_report):
    _, views = tiny_report
    for view in views.values():
        assert view.console_errors == [] and view.failed_requests == [], view.viewport


def test_every_image_decodes_with_a_size(tiny_report):
    out, views = tiny_report
    figures = sorted((out / "figures").glob("*.png"))
    for view in views.values():
        assert len(view.images) == len(figures) > 0
        assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in view.images), view.images
    sizes = sorted((i["width"], i["height"]) for i in views["desktop"].images)
    assert sizes == sorted(Image.open(f).size for f in figures)  # the embedded PNGs are the saved ones


def test_phone_layout_is_no_wider_than_the_screen(tiny_report):
    _, views = tiny_report
    phone = views["phone"]
    assert phone.inner_width == VIEWPORTS["phone"][0]
    assert phone.scroll_width <= phone.inner_width


def test_verdict_table_is_on_the_first_screen(tiny_report):
    _, views = tiny_report
    desktop = views["desktop"]
    assert desktop.inner_height == VIEWPORTS["desktop"][1]
    assert desktop.summary_bottom is not None and desktop.summary_bottom <= desktop.inner_height


def test_every_in_page_link_resolves(tiny_report):
    _, views = tiny_report
    for view in views.values():
        assert view.links >= 5 and view.broken_links == [], view.viewport  # at least one link per claim


def test_report_md_tables_render_as_tables(tiny_report):
    from test_report import assert_markdown_tables_render
    out, _ = tiny_report
    text = (out / "report.md").read_text(encoding="utf-8")
    assert_markdown_tables_render(text)
    assert "<table>" in markdown.markdown(text, extensions=["tables"])


def test_report_command_writes_screenshots_at_both_sizes(tiny_report, tmp_path):
    from bnlab.cli import main
    out, _ = tiny_report
    other = tmp_path / "elsewhere"
    assert main(["report", str(out), "--out", str(other), "--screenshots"]) == 0
    for width, height in VIEWPORTS.values():
        shot = other / "screenshots" / f"report-{width}x{height}.png"
        image = Image.open(shot)
        assert image.size == (width, height) and image.mode == "P"
        assert len(image.convert("RGB").getcolors(1 << 24)) > 8  # a page was drawn, not a blank screen


def test_figures_are_shown_at_their_own_size_on_a_laptop(tmp_path):
    """Figures drawn with bnlab.study.style fit the text column, so a browser never scales their text down
    (a report of synthetic claim results: no training)."""
    from test_report import PROFILE, STUDY, synthetic_results

    from bnlab.study import style
    from bnlab.study.browser import inspect_report
    from bnlab.study.report import render
    results = synthetic_results()
    fig, axes = style.figure(ncols=3)  # the widest figure the study draws: three panels
    for ax in axes:
        ax.plot([0, 1], [0, 1], color=style.arm_color("bn"), label="BN")
    style.legend_outside(fig, axes)
    results[0].figures.append({"title": "Three panels", "name": "wide", "figure": fig, "caption": "Wide."})
    views = inspect_report(render(results, STUDY, tmp_path, PROFILE), viewports=("desktop",))
    images = views["desktop"].images
    assert len(images) == 3 and max(i["width"] for i in images) > 1000
    assert all(abs(i["shown"] - i["width"]) < 1 for i in images), images


def test_the_first_screen_holds_every_answer_and_verdict_at_both_sizes(tiny_report):
    out, views = tiny_report
    claims = json.loads((out / "verdicts.json").read_text(encoding="utf-8"))["claims"]
    assert len(claims) == 5
    for view in views.values():
        assert view.inner_height == VIEWPORTS[view.viewport][1]
        cards = {c["id"]: c for c in view.cards}
        assert sorted(cards) == sorted(f"answer{n}" for n in claims), view.viewport
        for number, claim in claims.items():
            card = cards[f"answer{number}"]
            assert card["shown"] and 0 < card["bottom"] <= view.inner_height, (view.viewport, card)
            assert card["verdict"] == claim["verdict"]
            assert card["answer"] == claim["answer"].replace("`", "") != ""


def test_no_paragraph_outside_details_has_more_than_80_words(tiny_report):
    _, views = tiny_report
    for view in views.values():
        assert view.long_paragraphs == [], view.viewport


def test_every_glossary_term_is_linked_where_it_is_first_used(tiny_report):
    out, views = tiny_report
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('class="gloss"') >= 8  # terms are used, so the check below checks something
    for view in views.values():
        assert view.unlinked_terms == [], view.viewport


def test_the_step_by_step_figure_decodes(tiny_report):
    out, views = tiny_report
    size = Image.open(out / "figures" / "bn_steps.png").size
    for view in views.values():
        figure = view.step_figure
        assert figure is not None and figure["complete"] and (figure["width"], figure["height"]) == size


def test_no_page_is_wider_than_its_viewport(tiny_report):
    _, views = tiny_report
    for view in views.values():
        assert view.inner_width == VIEWPORTS[view.viewport][0]
        assert view.scroll_width <= view.inner_width, view.viewport
