"""The report's rendering on synthetic claim results (no training, no claim modules): Markdown tables that
render as tables, links and code instead of raw text, palette PNGs, readable badges, strict JSON, a
read-only study directory."""

import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import markdown
import numpy as np
import pytest
from PIL import Image

from bnlab.errors import UserError
from bnlab.study import report as report_module
from bnlab.study import style
from bnlab.study.report import build_report, inline_html, inline_markdown, md_cell, render
from bnlab.study.templates import HTML
from bnlab.study.verdict import (NO_VERDICT, ClaimResult, Effect, Interval, Part, Rule, Verdict, paired_effect)

LITERATURE = "Santurkar et al. 2018 (https://arxiv.org/abs/1805.11604): noisy BN trains as well; see arXiv:1502.03167."


def _figure(arms=("bn", "none")):
    fig, axes = style.figure(ncols=2)
    x = np.arange(10)
    for i, arm in enumerate(arms):
        mean = np.exp(-x / (3 + i))
        style.band(axes[0], x, mean, mean - 0.1, mean + 0.1, style.arm_color(arm), arm)
        axes[1].plot(x, mean[::-1], color=style.arm_color(arm), linestyle=style.LINESTYLES[i])
    style.legend_outside(fig, axes)
    return fig


def synthetic_results() -> list[ClaimResult]:
    """Three claims: supported (two parts), no verdict (failed runs, NaN numbers), partly supported."""
    higher = Rule("higher learning rates", "log10 lr(BN) − log10 lr(none)", 0.4, 0.15, unit="decades")
    better = Rule("better models", "accuracy BN − none", 1.0, 0.5, unit="points", bounds=(-100, 100))
    holds = Part(higher, paired_effect({0: 1.0, 1: 1.2, 2: 1.1}, {0: 0.1, 1: 0.2, 2: 0.15}, "decades"))
    refuted = Part(better, paired_effect({0: 50.0, 1: 51.0, 2: 50.5}, {0: 50.2, 1: 50.9, 2: 50.6}, "points"))
    nan = Interval(math.nan, math.nan, math.nan)
    no_data = Part(better, Effect([], nan))
    return [
        ClaimResult(1, "BN allows higher learning rates", Verdict.from_parts([holds], "lr ratio 10×", "Measured."),
                    LITERATURE, "Run `bnlab study` with the rule: CI ≤ threshold.", caveats=["Small nets."],
                    tables=[{"title": "Per arm", "columns": ["arm", "|Δ mean| per step", "note"],
                             "rows": [["bn", "0.1", "a|b"], ["none", "0.3", "line one\nline two"]]}],
                    figures=[{"title": "Accuracy vs lr", "name": "c1_acc", "figure": _figure(),
                              "caption": "Mean and 95% band per arm."}],
                    finding="Bjorck et al. 2018: higher lr with BN", numbers={"ratio": 10.0, "bad": math.nan,
                                                                              "inf": math.inf, "np": np.float32(2.5)}),
        ClaimResult(2, "BN accelerates training", Verdict(NO_VERDICT, "n/a", nan, "Runs failed.", [no_data]),
                    "Ioffe & Szegedy 2015", "Steps to target.", failed_runs=3, numbers={"steps": [1.0, math.nan]}),
        ClaimResult(3, "BN regularizes", Verdict.from_parts([holds, refuted], "gap 2 points", "Half holds."),
                    "Luo et al. 2019", "Gap at matched loss.", expected="partly supported",
                    figures=[{"title": "Gap vs ghost size", "name": "c3_gap", "figure": _figure(("ghost:8", "skipinit")),
                              "caption": "Smaller ghost batches."}]),
    ]


STUDY = {"profile": "synthetic", "description": "a test", "dataset": "synthetic", "seeds": [0, 1, 2],
         "claims": [1, 2, 3], "runs": {"total": 10, "done": 7, "diverged": 0, "failed": 3}, "run_seconds": 1.5,
         "last_run_finished": "2026-11-30T05:00:00+00:00", "versions": [{"torch": "2.13.0"}],
         "hardware": [{"machine": "x86_64", "cpus": 2}]}
PROFILE = {"name": "synthetic", "description": "a test", "dataset": "synthetic", "seeds": [0, 1, 2], "depth": 8,
           "width": 0.25, "note": "lr ≤ 1"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic-report")
    results = synthetic_results()
    failures = [{"label": "train bn seed 0", "error": "RuntimeError: boom"}]
    render(results, STUDY, out, PROFILE, failures, "store.sqlite")
    return out, results


class _Tables(HTMLParser):
    """Every <table> of an HTML document as a list of rows, each the number of its th/td cells."""

    def __init__(self):
        super().__init__()
        self.tables, self.wrapped = [], []
        self._open_divs = []

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            self._open_divs.append(dict(attrs).get("class"))
        elif tag == "table":
            self.tables.append([])
            self.wrapped.append("scroll" in self._open_divs)
        elif tag == "tr":
            self.tables[-1].append(0)
        elif tag in ("td", "th"):
            self.tables[-1][-1] += 1

    def handle_endtag(self, tag):
        if tag == "div" and self._open_divs:
            self._open_divs.pop()


def _tables(html: str) -> _Tables:
    parser = _Tables()
    parser.feed(html)
    return parser


def assert_markdown_tables_render(text: str) -> None:
    """Assert every Markdown table of ``text`` renders as a <table> whose rows all have as many cells as its
    delimiter row ``|---|---|`` has columns (the delimiter is never escaped, so it is the oracle)."""
    delimiters = re.findall(r"^\|((?:\s*:?-+:?\s*\|)+)\s*$", text, re.M)
    expected = [d.count("|") for d in delimiters]
    html = markdown.markdown(text, extensions=["tables", "fenced_code"])
    tables = _tables(html).tables
    assert len(tables) == len(expected) > 0
    for rows, columns in zip(tables, expected):
        assert rows and all(n == columns for n in rows), (rows, columns)


def _without_glossary_links(html: str) -> str:
    """The report's HTML with the glossary's links taken out (their words left), to look for text in it."""
    return re.sub(r'<a class="gloss" href="#gloss-[a-z-]+">([^<]*)</a>', r"\1", html)


def test_md_cell_escapes_pipes_and_line_breaks():
    assert md_cell("|Δ mean|") == r"\|Δ mean\|"
    assert md_cell("one\ntwo") == "one <br>two"
    assert md_cell("") == " "


def test_markdown_table_with_pipes_in_a_header_renders_as_a_table():
    # the defect: claim 1's header "|Δ mean|" made the whole table raw pipes
    raw = "| arm | |Δ mean| |\n|---|---|\n| bn | 0.1 |\n"
    assert "<table>" not in markdown.markdown(raw, extensions=["tables"])
    assert_markdown_tables_render(report_module._md_table(["arm", "|Δ mean|"], [["bn", "0.1"], ["x|y", "a\nb"]]))


def test_inline_html_renders_code_and_links_and_escapes():
    html = str(inline_html("the last `bnlab study` <b> see https://arxiv.org/abs/1805.11604). and arXiv:1502.03167"))
    assert "`" not in html and "<code>bnlab study</code>" in html and "&lt;b&gt;" in html
    assert '<a href="https://arxiv.org/abs/1805.11604">https://arxiv.org/abs/1805.11604</a>).' in html
    assert '<a href="https://arxiv.org/abs/1502.03167">arXiv:1502.03167</a>' in html
    assert inline_markdown("see arXiv:1502.03167, `x|y`") == "see [arXiv:1502.03167](https://arxiv.org/abs/1502.03167), `x|y`"


def test_verdicts_json_is_strict_with_schema_metadata_and_parts(rendered):
    out, results = rendered
    text = (out / "verdicts.json").read_text(encoding="utf-8")

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    data = json.loads(text, parse_constant=refuse)  # NaN / Infinity would land here
    assert data["schema_version"] == report_module.SCHEMA_VERSION
    assert data["study"]["profile"] == "synthetic" and data["study"]["seeds"] == [0, 1, 2]
    assert data["study"]["versions"] == [{"torch": "2.13.0"}] and data["study"]["last_run_finished"]
    claims = data["claims"]
    assert set(claims) == {"1", "2", "3"}
    assert claims["1"]["numbers"] == {"ratio": 10.0, "bad": None, "inf": None, "np": 2.5}
    assert claims["2"]["verdict"] == "no verdict" and claims["2"]["failed_runs"] == 3
    assert claims["2"]["key_interval"]["mean"] is None and claims["2"]["numbers"]["steps"] == [1.0, None]
    assert claims["3"]["verdict"] == "partly supported" and claims["3"]["agrees_with_literature"] is True
    assert claims["1"]["agrees_with_literature"] is True and claims["2"]["agrees_with_literature"] is None
    assert [p["text"] for p in claims["3"]["parts"]] == [p.text() for p in results[2].verdict.parts]
    assert [p["outcome"] for p in claims["3"]["parts"]] == ["holds", "refuted"]


def test_unicode_is_written_as_is(rendered):
    out, _ = rendered
    for name in ("verdicts.json", "report.html", "report.md"):
        text = (out / name).read_text(encoding="utf-8")
        assert "\\u2264" not in text and "\\u0394" not in text, name
    assert "lr ≤ 1" in (out / "report.html").read_text(encoding="utf-8")  # the appendix's profile JSON


def test_html_has_viewport_scroll_wrapped_tables_links_and_no_backticks(rendered):
    out, results = rendered
    html = _without_glossary_links((out / "report.html").read_text(encoding="utf-8"))
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    parsed = _tables(html)
    # the key-number table, then per claim its evidence table (one row per part) and its own tables
    assert len(parsed.tables) == 5 and all(parsed.wrapped)
    assert parsed.tables[0] == [6] * 4  # header + three claims, six columns
    assert parsed.tables[1:] == [[5, 5], [3, 3, 3], [5, 5], [5, 5, 5]]  # claim 1: 1 part, its table; 2: 1; 3: 2
    assert "`" not in re.sub(r"<pre>.*?</pre>", "", html, flags=re.S)
    assert '<a href="https://arxiv.org/abs/1805.11604">' in html
    for href in re.findall(r'href="#([^"]+)"', html):
        assert f'id="{href}"' in html, href
    # provenance once, in the appendix; each figure keeps its own caption
    assert html.count("unless a caption says otherwise") == 1
    assert html.index("unless a caption says otherwise") > html.index('id="appendix"')
    assert "Mean and 95% band per arm." in html and "Smaller ghost batches." in html
    assert html.count("data:image/png;base64,") == 2


def test_html_shows_verdicts_parts_and_failed_runs(rendered):
    out, results = rendered
    html = _without_glossary_links((out / "report.html").read_text(encoding="utf-8"))
    for verdict, css in (("supported", "verdict-supported"), ("no verdict", "verdict-no-verdict"),
                         ("partly supported", "verdict-partly-supported")):
        assert f'<span class="badge {css}">{verdict}</span>' in html
    assert "3 run(s) of this claim failed" in html and 'href="#failed-runs"' in html
    for part in results[2].verdict.parts:
        assert str(inline_html(part.text())) in html
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| 2 | BN accelerates training | **no verdict** | n/a |" in md
    assert "3 run(s) of this claim failed" in md


def test_every_markdown_table_renders_with_its_columns(rendered):
    out, _ = rendered
    assert_markdown_tables_render((out / "report.md").read_text(encoding="utf-8"))


def _luminance(hex_color: str) -> float:
    """WCAG 2 relative luminance."""
    channels = [int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_verdict_badges_have_accessible_contrast():
    rules = dict(re.findall(r"\.verdict-([a-z-]+) \{ ([^}]*)\}", HTML))
    assert {"supported", "partly-supported", "not-supported", "inconclusive", "no-verdict"} <= set(rules)
    for name, body in rules.items():
        background = re.search(r"background: (#[0-9a-f]{3,6})", body)[1]
        color = re.search(r"(?<!-)color: (#[0-9a-f]{3,6})", body)[1]
        full = [c if len(c) == 7 else "#" + "".join(ch * 2 for ch in c[1:]) for c in (background, color)]
        light, dark = sorted(map(_luminance, full), reverse=True)
        assert (light + 0.05) / (dark + 0.05) >= 4.5, name  # WCAG AA for normal text


def test_figures_are_palette_pngs_about_a_third_of_rgba():
    fig = _figure()
    rgba = io.BytesIO()
    fig.savefig(rgba, format="png", dpi=style.DPI)
    palette = style.png_bytes(fig)
    original, small = Image.open(io.BytesIO(rgba.getvalue())), Image.open(io.BytesIO(palette))
    assert original.mode == "RGBA" and small.mode == "P" and small.size == original.size
    assert len(palette) < 0.5 * len(rgba.getvalue())
    difference = np.abs(np.asarray(small.convert("RGB"), dtype=float) - np.asarray(original.convert("RGB"), dtype=float))
    assert difference.mean() < 1.0 and np.quantile(difference, 0.99) < 16  # the same picture to the eye


def test_figures_fit_the_text_column():
    fig, axes = style.figure(ncols=3)
    assert len(axes) == 3 and fig.get_size_inches()[0] * style.DPI <= 1100 + 1e-6
    style.legend_outside(fig, axes)
    style.png_bytes(fig)


def test_arm_colors_are_distinct_and_fixed_by_name():
    arms = ["bn", "none", "skipinit", "fixup", "noisy_bn", "groupnorm", "layernorm", "frozen_bn"]
    assert len({style.arm_color(a) for a in arms}) == len(arms)
    assert style.arm_color("ghost:128") == style.arm_color("ghost:8")  # a dose keeps its arm's hue by default
    assert style.arm_color("ghost", 0, 3) != style.arm_color("ghost", 2, 3)


# ---------------------------------------------------------------------------------- a read-only study directory
def _snapshot(directory: Path) -> dict:
    """Every file's bytes, except SQLite's WAL index and empty log, which a reader may create where it can."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.endswith(("-shm", "-wal"))}


@pytest.fixture
def empty_study(tmp_path):
    """A study directory whose store has a profile and no runs (every claim's analysis then says why)."""
    from bnlab.study import get_profile
    from bnlab.study.store import Store
    study = tmp_path / "study"
    store = Store(study / "study.sqlite")
    store.set_meta("profile", get_profile("tiny"))
    store.set_meta("claims", [1, 2])
    return study


def test_report_of_a_read_only_study_goes_to_out_and_changes_nothing(empty_study, tmp_path, monkeypatch):
    from bnlab.cli import build_parser
    from bnlab.commands import report as report_command
    before = _snapshot(empty_study)
    writable = report_module._writable
    monkeypatch.setattr(report_module, "_writable", lambda d: Path(d) != empty_study and writable(d))
    with pytest.raises(UserError, match=r"is not writable; write the report elsewhere with --out"):
        report_command.run(build_parser().parse_args(["report", str(empty_study)]))
    out = tmp_path / "elsewhere"
    assert report_command.run(build_parser().parse_args(["report", str(empty_study), "--out", str(out)])) == 0
    assert _snapshot(empty_study) == before  # the store was only read
    assert {"report.html", "report.md", "verdicts.json"} <= {p.name for p in out.iterdir()}
    data = json.loads((out / "verdicts.json").read_text())
    assert sorted(data["claims"]) == ["1", "2"] and data["study"]["runs"]["total"] == 0


def test_read_only_store_refuses_writes(empty_study):
    import sqlite3

    from bnlab.study.store import Store
    store = Store(empty_study / "study.sqlite", readonly=True)
    assert store.get_meta("claims") == [1, 2]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.set_meta("claims", [3])
    with pytest.raises(ValueError, match="no store"):
        Store(empty_study / "missing.sqlite", readonly=True)


def test_screenshots_without_chromium_say_how_to_get_it(rendered, monkeypatch):
    from bnlab.study import browser
    out, _ = rendered
    monkeypatch.setenv("BNLAB_CHROMIUM", str(out / "no-such-browser"))
    assert browser.find_chromium() is None
    with pytest.raises(UserError, match="chromium not found: run make setup as root or install chromium"):
        browser.screenshots(out / "report.html", out / "screenshots")
    assert not (out / "screenshots").exists()


def test_report_without_a_store_names_the_directory(tmp_path):
    with pytest.raises(UserError, match="no study store"):
        build_report(tmp_path)


def _can_mount_read_only() -> bool:
    import shutil
    import subprocess
    if not (shutil.which("unshare") and shutil.which("mount")):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.slow  # two CLI processes: ~5 s on an idle machine
@pytest.mark.skipif(not _can_mount_read_only(), reason="needs root and unshare -m to mount a read-only directory")
def test_report_on_a_read_only_filesystem(empty_study, tmp_path):
    """A real read-only mount (where even root cannot write): one line naming --out, then --out works."""
    import shlex
    import subprocess
    import sys
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    bnlab = f"{shlex.quote(sys.executable)} -m bnlab.cli report {mount}"
    script = (f"mount --bind {empty_study} {mount} && mount -o remount,bind,ro {mount} && "
              f"{{ {bnlab}; echo rc=$?; }} && {bnlab} --out {out}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{mount} is not writable; write the report elsewhere with --out OTHER" in done.stderr
    assert "rc=0" not in done.stdout
    assert (out / "report.html").is_file() and not (empty_study / "report.html").exists()


# ---------------------------------------------------------------------------------- the first screen, in plain words
def test_every_claim_has_a_plain_answer_in_verdicts_json_and_on_the_first_screen(rendered):
    out, results = rendered
    data = json.loads((out / "verdicts.json").read_text(encoding="utf-8"))
    assert data["schema_version"] == 3  # answers are an added key: readers of schema 3 keep working
    answers = {n: c["answer"] for n, c in data["claims"].items()}
    assert all(answers.values())
    html = (out / "report.html").read_text(encoding="utf-8")
    cards = re.findall(r'<li class="card" id="answer(\d)">(.*?)</li>', html, re.S)
    assert [n for n, _ in cards] == ["1", "2", "3"]
    for (n, card), result in zip(cards, results):
        assert f'<span class="badge {report_module._css_class(result.verdict.verdict)}">{result.verdict.verdict}' \
               f'</span>' in card and f'href="#claim{n}"' in card
        assert re.sub(r"<[^>]+>", "", card).count(answers[n].split(" (")[0][:40]) == 1
    # the key numbers stay, folded under the answers
    assert html.index('id="summary"') < html.index('<details id="key-numbers">') < html.index('id="verdicts"')


def _part(values, rule):
    return Part(rule, paired_effect(dict(enumerate(values)), {i: 0.0 for i in range(len(values))}, rule.unit,
                                    rule.bounds))


def test_answers_say_the_effect_in_plain_units_and_how_many_more_seeds_would_decide():
    from bnlab.study import answers
    from scipy import stats
    faster = Rule("fewer steps", "log10 steps", 0.1, 0.04, unit="decades")
    better = Rule("better models", "accuracy", 1.0, 0.5, unit="points", bounds=(-100, 100))
    phrases = [answers.Phrase("BN took {x} fewer steps", "not fewer ({s})", "BN takes fewer steps", "{x} more"),
               answers.Phrase("{x} more accurate", "not more accurate ({s})", "BN is more accurate")]
    holds = _part([0.60, 0.62, 0.64], faster)                # 10^0.62 = 4.17: "about 4×"
    wide = [0.0, 6.0, 0.5, 5.5, 1.0, 5.0]                     # mean 3.0, straddles the 1-point threshold
    undecided = _part(wide, better)
    sd, gap = float(np.std(wide, ddof=1)), 3.0 - 1.0
    n = next(k for k in range(2, 1000) if stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k) < gap)
    text = answers.sentence([holds, undecided], phrases)
    assert text == (f"BN took about 4× fewer steps, but we could not tell whether BN is more accurate (3.0 points so "
                    f"far; about {n - 6} more seeds would decide it).")
    assert answers.sentence([_part([1.42, 1.43, 1.44], faster), _part([36.0, 37.0, 38.0], better)], phrases) == \
        "BN took about 27× fewer steps, and about 37 points more accurate."
    assert answers.sentence([_part([-0.61, -0.60, -0.59], faster)], phrases) == "About 4× more."  # reversed
    nothing = Part(better, Effect([], Interval(math.nan, math.nan, math.nan)))
    assert answers.sentence([nothing, nothing], phrases) == \
        "Too few seeds finished (0; at least 3 are needed) to tell whether BN takes fewer steps, or whether BN is " \
        "more accurate."


def test_an_answer_near_its_margin_does_not_say_the_mean_lies_between_margin_and_threshold():
    """Seed set 12–17's claim 1 read "more seeds would not decide it, as it lies between its margin and its
    threshold" for a mean of 0.087 below its margin of 0.1: more than 1,000 seeds were needed, which is
    another reason. Each reason is said as it is."""
    from bnlab.study import answers
    from bnlab.study.verdict import SEEDS_LIMIT, UNDECIDED, between
    rule = Rule("BN lowers it", "decades", 0.3, 0.1, unit="decades")
    phrase = answers.Phrase("lower by {x}", "not lower ({s})", "BN lowers it")
    near = _part([0.087 + d for d in (-0.3, 0.3, -0.2, 0.2, -0.1, 0.1)], rule)    # mean 0.087, sd ≈ 0.22
    assert near.outcome == UNDECIDED and not between(rule, near.effect)
    assert answers.sentence([near], [phrase]) == (f"We could not tell whether BN lowers it (about 1.2× so far; it "
                                                  f"lies so near its margin that more than {SEEDS_LIMIT:,} seeds "
                                                  f"would be needed).")
    assert "more than 1,000 seeds would be needed" in near.text()
    inside = _part([0.2 + d for d in (-0.3, 0.3, -0.2, 0.2, -0.1, 0.1)], rule)     # mean 0.2: between
    assert between(rule, inside.effect)
    assert "as it lies between its margin and its threshold" in answers.sentence([inside], [phrase])
    told = answers.Phrase("lower by {x}", "not lower ({s})", "BN lowers it", undecided="it changed ({s})")
    assert answers.sentence([near], [told]) == "It changed (about 1.2×)."


def test_the_evidence_table_gives_each_part_its_interval_rule_and_outcome():
    faster = Rule("fewer steps", "log10 steps", 0.1, 0.04, unit="decades")
    rows = report_module.evidence_rows([_part([0.5, 0.6, 0.7], faster)])
    low, high = 0.6 - stats_t975(2) * 0.1 / math.sqrt(3), 0.6 + stats_t975(2) * 0.1 / math.sqrt(3)
    assert rows == [["fewer steps", f"0.60 decades [{low:.2f}, {high:.2f}] (×{10 ** 0.6:.3g} [{10 ** low:.3g}, "
                                    f"{10 ** high:.3g}])", "0.1 · 0.04 decades", "3", "holds"]]


def stats_t975(df):
    from scipy import stats
    return float(stats.t.ppf(0.975, df))


# ---------------------------------------------------------------------------------- the glossary
def test_glossary_terms_are_linked_where_first_used_and_again_in_each_folded_block():
    from bnlab.study.report import link_glossary
    html = ("<p>Each arm, every arm.</p><p><code>arm</code> <a href='#x'>decades</a> two decades</p>"
            "<details><summary>arm</summary><p>the arm</p><p>an arm</p></details><p>arms and SkipInit</p>")
    linked = link_glossary(html)
    assert linked == ('<p>Each <a class="gloss" href="#gloss-arm">arm</a>, every arm.</p><p><code>arm</code> '
                      '<a href=\'#x\'>decades</a> two <a class="gloss" href="#gloss-decade">decades</a></p>'
                      '<details><summary>arm</summary><p>the <a class="gloss" href="#gloss-arm">arm</a></p>'
                      '<p>an arm</p></details><p>arms and <a class="gloss" href="#gloss-skipinit">SkipInit</a></p>')
    # "gradient ICS" is its own term: the ICS inside it is not the first use of "ICS"
    assert link_glossary("<p>gradient ICS, then ICS</p>") == (
        '<p><a class="gloss" href="#gloss-gradient-ics">gradient ICS</a>, then '
        '<a class="gloss" href="#gloss-ics">ICS</a></p>')


def test_the_glossary_is_one_structure_both_reports_render(rendered):
    from bnlab.study.templates import GLOSSARY
    out, _ = rendered
    html = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    for term, entry in GLOSSARY.items():
        assert f'<dt id="gloss-{entry.slug}">{term}</dt>' in html
        assert f"- **{term}**: " in md
    for href in set(re.findall(r'href="#(gloss-[a-z-]+)"', html)):
        assert f'id="{href}"' in html
    assert "[arm](#glossary)" in md and md.count("[arm](#glossary)") == 1 and '<a id="glossary"></a>' in md
    assert not any("](#glossary)" in line for line in md.splitlines() if line.startswith("|"))  # tables plain


# ---------------------------------------------------------------------------------- BN, step by step
def test_a_bn_snapshot_is_the_layers_own_numbers_on_one_channel():
    """Oracle: the layer's input caught by a hook, and BN's formula in float64 NumPy."""
    import torch

    import bnlab.models
    from bnlab.study.runs import bn_snapshot
    torch.manual_seed(0)
    model = bnlab.models.create("resnet1d", norm="bn", in_channels=1, num_classes=4, width=0.25, depth=8, fused=False)
    for _ in range(3):  # some training steps, so the running statistics are not the initial ones
        model(torch.randn(16, 1, 20) * 2 + 1).sum().backward()
    layer = model.blocks[0].branch.bn1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    x = torch.randn(40, 1, 20)
    snap = bn_snapshot(model, x, channel=1, max_values=100)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().double()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    values = seen[0][:, 1].reshape(-1).numpy()        # (N, L) of channel 1, flattened as (example, position)
    keep = np.round(np.linspace(0, values.size - 1, 100)).astype(int)
    gamma, beta = float(layer.weight[1]), float(layer.bias[1])
    mean, var = values.mean(), values.var()
    rm, rv = float(layer.running_mean[1]), float(layer.running_var[1])
    assert snap["values"] == values.size == 40 * 20 and snap["examples"] == 40 and snap["layer"] == "blocks.0.branch.bn1"
    assert snap["batch_mean"] == pytest.approx(mean) and snap["batch_var"] == pytest.approx(var)
    assert (snap["weight"], snap["bias"], snap["running_mean"], snap["running_var"]) == \
        pytest.approx((gamma, beta, rm, rv))
    np.testing.assert_allclose(snap["x"], values[keep], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(snap["y_batch"], (values[keep] - mean) / np.sqrt(var + 1e-5) * gamma + beta,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(snap["y_eval"], (values[keep] - rm) / np.sqrt(rv + 1e-5) * gamma + beta,
                               rtol=1e-4, atol=1e-5)
    from bnlab.study import steps
    stages = steps.stages(snap)
    assert abs(stages.normalized.mean()) < 0.3 and 0.7 < stages.normalized.std() < 1.3  # a sample of the channel
    np.testing.assert_allclose(stages.difference, np.asarray(snap["y_eval"]) - np.asarray(snap["y_batch"]))
    assert bn_snapshot(torch.nn.Sequential(torch.nn.Linear(3, 3)), torch.randn(4, 3)) is None  # no such layer


def test_the_report_shows_the_four_steps_from_the_chosen_run_or_says_there_is_none(tmp_path):
    import torch

    import bnlab.models
    from bnlab.study import steps
    from bnlab.study.runs import bn_snapshot
    torch.manual_seed(0)
    model = bnlab.models.create("resnet1d", norm="bn", in_channels=1, num_classes=4, width=0.25, depth=8, fused=False)
    snap = bn_snapshot(model, torch.randn(32, 1, 20))

    def row(seed, steps_, norm="bn", snapshot=True):
        return {"status": "done", "spec": {"kind": "train", "norm": norm, "seed": seed, "dataset": "synthetic",
                                           "depth": 8, "lr": 0.1},
                "result": {"steps": steps_, **({"bn_snapshot": snap} if snapshot else {})}}
    rows = {"a": row(1, 500), "b": row(0, 100), "c": row(0, 300), "d": row(0, 900, norm="none"),
            "e": row(0, 999, snapshot=False)}
    assert steps.pick(rows) is rows["c"]  # the first seed's longest BN run with a snapshot
    assert steps.pick({"e": rows["e"]}) is None
    with_steps = render(synthetic_results(), STUDY, tmp_path / "with", PROFILE, snapshot=rows["c"])
    html = with_steps.read_text(encoding="utf-8")
    assert 'id="bn-steps"' in html and "<svg" in html and report_module.STEPS_MISSING not in html
    assert (tmp_path / "with" / "figures" / "bn_steps.png").is_file()
    assert (tmp_path / "with" / "figures" / "bn_in_block.svg").read_text().startswith("<svg")
    assert "![Where BN sits in a residual block](figures/bn_in_block.svg)" in (tmp_path / "with" / "report.md").read_text()
    without = render(synthetic_results(), STUDY, tmp_path / "without", PROFILE).read_text(encoding="utf-8")
    assert 'id="bn-steps"' not in without and "<svg" in without
    import html as html_text
    assert report_module.STEPS_MISSING.split("`")[0] in html_text.unescape(_without_glossary_links(without))


def test_several_settings_put_the_answer_across_them_on_the_first_screen(tmp_path):
    results = synthetic_results()
    labels = ["mnist1d, ResNet-8", "mnist1d, ResNet-20"]
    for r, verdicts in zip(results, [("supported", "supported"), ("no verdict", "inconclusive"),
                                     ("partly supported", "not supported")]):
        r.scope = {"setting": labels[0], "dataset": "mnist1d", "depth": 8, "seeds": 3, "max_seeds": 3, "look": 1,
                   "looks": 1, "confidence": 0.95}
        r.across = [{**r.scope, "setting": label, "verdict": v, "key_number": "k", "parts": [], "outcomes": []}
                    for label, v in zip(labels, verdicts)]
        answer, text = ("supported", "supported in all 2 settings") if len(set(verdicts)) == 1 else \
            ("depends on the setting", "; ".join(f"{v} in {label}" for label, v in zip(labels, verdicts)))
        r.robust = {"answer": answer, "text": text}
    html = render(results, STUDY, tmp_path, PROFILE).read_text(encoding="utf-8")
    screen = html[:html.index('<section id="steps">')]
    assert "2 settings (mnist1d, ResNet-8; mnist1d, ResNet-20)" in _without_glossary_links(screen)
    cards = dict(re.findall(r'<li class="card" id="answer(\d)">(.*?)</li>', screen, re.S))
    assert '<span class="badge verdict-supported">supported</span>' in cards["1"]
    assert '<span class="badge verdict-depends-on-the-setting">depends on the setting</span>' in cards["3"]
    assert "In mnist1d, ResNet-8: " in _without_glossary_links(cards["3"])
    table = screen[screen.index('<table id="settings">'):screen.index("</table>", screen.index('id="settings"'))]
    assert table.count("<tr>") == 4 and table.count('class="badge') == 3 * 3  # claims × (settings + across them)
    assert "| 3 | **partly supported** | **not supported** | **depends on the setting** |" in \
        (tmp_path / "report.md").read_text(encoding="utf-8")


def test_a_verdict_that_disagrees_with_the_literature_shows_what_this_run_measured(tmp_path):
    """Where our verdict differs from the papers', the section says, right after the literature, what this run
    measured that sets its setting apart; where the claim recorded nothing, it says so. An agreeing claim
    shows neither."""
    higher = Rule("higher learning rates", "log10 lr(BN) − log10 lr(none)", 0.4, 0.15, unit="decades")
    absent = Part(higher, paired_effect({0: 0.1, 1: 0.12, 2: 0.11}, {0: 0.1, 1: 0.1, 2: 0.1}, "decades"))
    holds = Part(higher, paired_effect({0: 1.0, 1: 1.2, 2: 1.1}, {0: 0.1, 1: 0.2, 2: 0.15}, "decades"))
    measured = "The unnormalized net fitted in 2 of 6 seeds."
    results = [ClaimResult(1, "A claim", Verdict.from_parts([absent], "n", "x"), LITERATURE, "rule",
                           differences=[measured]),
               ClaimResult(2, "Another", Verdict.from_parts([absent], "n", "x"), LITERATURE, "rule"),
               ClaimResult(3, "Agreeing", Verdict.from_parts([holds], "n", "x"), LITERATURE, "rule",
                           differences=["never shown"])]
    assert [r.agrees_with_literature for r in results] == [False, False, True]
    render(results, STUDY, tmp_path, PROFILE, [], "store.sqlite")
    md, html = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for text in (md, html):
        sections = re.split(r'id="claim\d"', text)[1:]
        assert len(sections) == 3
        assert "Why ours may differ, from what this run measured" in sections[0] and measured in sections[0]
        assert "nothing measured here sets this" in sections[1]
        assert "Why ours may differ" not in sections[2] and "never shown" not in text

