"""The report: read the store, ask each claim for its verdict, write report.md (+ PNGs) and report.html.

Each claim is analyzed by :func:`analyze`: its ``decide`` turns the stored runs into findings, its
``render`` formats them (with its plain ``answer``), and a claim with failed runs gets no verdict
(:func:`mark_failures`). The layout is :mod:`bnlab.study.templates`: the answers first, BN's four steps on
a trained channel (:mod:`bnlab.study.steps`), one section per claim with its evidence table
(:func:`evidence_rows`), and the glossary, whose terms :func:`link_glossary` links where first used.

Nothing here trains: ``bnlab report DIR`` regenerates the files from ``DIR/study.sqlite``, opened read-only,
into ``DIR`` or another directory (``out``). The HTML embeds every figure as a base64 palette PNG so the one
file opens offline; the Markdown links the PNG files in ``figures/``. ``verdicts.json`` holds the verdicts,
their parts and key numbers, and the study's metadata for scripts (:data:`SCHEMA_VERSION`).

Text from the claims (rules, literature, captions, table cells) is plain text with two conventions: `code`
in backticks and bare ``https://`` or ``arXiv:NNNN.NNNNN`` references. :func:`inline_html` and
:func:`inline_markdown` turn them into code and links; :func:`md_cell` makes any text one Markdown table cell.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import re
import tempfile
import traceback
import warnings
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from bnlab.errors import UserError
from bnlab.study import answers, steps
from bnlab.study.claims import CLAIMS
from bnlab.study.common import count_failed, dataset_label, json_safe
from bnlab.study.runner import STORE_NAME
from bnlab.study.scope import at_look, design, robust, settings
from bnlab.study.store import Store
from bnlab.study.style import png_bytes
from bnlab.study.templates import BLOCK_SVG, GLOSSARY, HTML, MARKDOWN, profile_time
from bnlab.study.verdict import (CONFIDENCE, HOLDS, NO_DATA, NO_VERDICT, REFUTED, UNDECIDED, ClaimResult, Interval,
                                 Part, Verdict, at_confidence)

__all__ = ["SCHEMA_VERSION", "build_report", "analyze", "mark_failures", "analyze_claims", "render", "md_cell",
           "inline_html", "inline_markdown", "json_clean", "link_glossary", "link_glossary_markdown", "evidence_rows"]

# of verdicts.json: {"schema_version", "study": {...}, "claims": {"1": {...}, ...}}; 3 added per claim "scope"
# (setting, seeds, look, confidence), "settings" (one verdict per setting) and "robust" (the answer across them);
# within 3, keys are only added: per claim "answer" (the plain sentence of the first screen)
SCHEMA_VERSION = 3


def analyze(claim, profile: dict, results: dict) -> ClaimResult:
    """``claim.render(profile, claim.decide(profile, results))``, then :func:`mark_failures`."""
    return mark_failures(claim, profile, results, claim.render(profile, claim.decide(profile, results)))


def mark_failures(claim, profile: dict, results: dict, result: ClaimResult) -> ClaimResult:
    """If any of the claim's runs failed, its verdict is ``no verdict`` and the failures are counted (the
    CLI then exits non-zero naming the claim). Idempotent."""
    failed = count_failed(results, claim.measure(profile, results))
    result.numbers = json_safe(result.numbers)
    if failed and not result.failed_runs:
        result.failed_runs = failed
        result.verdict.verdict = NO_VERDICT
        result.verdict.explanation = (f"{failed} of this claim's runs failed, so it gets no verdict (rerun "
                                      f"`bnlab study` with the same --out to retry them). "
                                      + result.verdict.explanation)
        result.answer = (f"No verdict: {failed} of this claim's runs failed; rerun `bnlab study` with the same "
                         f"--out to retry them.")
    return result


def _analyze_one(module, profile: dict, results: dict) -> ClaimResult:
    """One claim in one setting's profile; a failed analysis becomes a "no verdict" placeholder naming the error."""
    try:
        with warnings.catch_warnings():  # all-NaN slices (e.g. a diverged arm) are expected, not news
            warnings.simplefilter("ignore", RuntimeWarning)
            result = analyze(module, profile, results)
        result.error = None
    except Exception as error:  # noqa: BLE001 — the report must still be written
        nan = Interval(math.nan, math.nan, math.nan)
        result = ClaimResult(module.NUMBER, module.TITLE, Verdict(NO_VERDICT, "n/a", nan, "The analysis failed; see below."),
                             module.LITERATURE, module.RULE, expected=module.EXPECTED,
                             caveats=["No verdict could be computed from the runs."], finding=module.FINDING)
        result.error = f"{type(error).__name__}: {error} — {traceback.format_exc(limit=-1).strip()}"
        result.answer = "No verdict: the analysis of this claim failed; the error is at the end of its section."
        result = mark_failures(module, profile, results, result)
    return result


def analyze_claims(profile: dict, results: dict, claims) -> list[ClaimResult]:
    """Each claim's :class:`ClaimResult` in the profile's first setting, with its verdict in every setting
    (``across``) and the answer across them (``robust``, :func:`bnlab.study.scope.robust`); each judged at
    the look it reached. A claim whose analysis fails gets "no verdict" naming the error; a claim with failed
    runs in any setting gets "no verdict" there, and its failed runs are counted over all settings."""
    out = []
    places = settings(profile)
    for n in claims:
        module = CLAIMS[n]
        per_setting = []
        for place in places:
            look = at_look(module, place.profile, results)
            with at_confidence(look.level):
                result = _analyze_one(module, look.profile, results)
            result.scope = {"setting": place.label, "dataset": place.dataset, "depth": place.depth,
                            "seeds": len(look.seeds), "max_seeds": design(place.profile, module).max_seeds,
                            "look": look.index + 1, "looks": look.count, "confidence": look.level}
            per_setting.append(result)
        primary = per_setting[0]
        primary.across = [{**r.scope, "verdict": r.verdict.verdict, "key_number": r.verdict.key_number,
                           "key_interval": r.verdict.key_interval, "parts": [p.text() for p in r.verdict.parts],
                           "outcomes": [p.outcome for p in r.verdict.parts], "failed_runs": r.failed_runs,
                           "error": r.error} for r in per_setting]
        answer, text = robust([(r.scope["setting"], r.verdict.verdict) for r in per_setting])
        primary.robust = {"answer": answer, "text": text}
        primary.failed_runs = sum(r.failed_runs for r in per_setting)
        out.append(primary)
    return out


# ---------------------------------------------------------------------------------------------- text helpers
# a reference: a bare URL (up to whitespace, without trailing punctuation) or an arXiv identifier
_REFERENCE = re.compile(r"(?P<url>https?://[^\s<>`\"]*[^\s<>`\".,;:!?)\]])|(?P<arxiv>arXiv:\s?(?P<id>\d{4}\.\d{4,5}))")
_CODE = re.compile(r"`([^`]+)`")


def _reference_url(match: re.Match) -> str:
    return match["url"] or f"https://arxiv.org/abs/{match['id']}"


def inline_html(text) -> Markup:
    """Plain claim text as safe HTML: escaped, `code` → ``<code>``, URLs and arXiv ids → links."""
    parts = []
    for i, piece in enumerate(_CODE.split(str(text))):
        if i % 2:
            parts.append(Markup("<code>{}</code>").format(piece))
            continue
        last = 0
        for match in _REFERENCE.finditer(piece):
            parts.append(escape(piece[last:match.start()]))
            parts.append(Markup('<a href="{}">{}</a>').format(_reference_url(match), match.group(0)))
            last = match.end()
        parts.append(escape(piece[last:]))
    return Markup("").join(parts)


def inline_markdown(text) -> str:
    """Plain claim text as Markdown: `code` kept, URLs and arXiv ids → links."""
    parts = []
    for i, piece in enumerate(_CODE.split(str(text))):
        if i % 2:
            parts.append(f"`{piece}`")
        else:
            parts.append(_REFERENCE.sub(lambda m: f"[{m.group(0)}]({_reference_url(m)})", piece))
    return "".join(parts)


def md_cell(text) -> str:
    """Any text as one Markdown table cell: ``|`` escaped, line breaks as ``<br>`` (GitHub and Python-Markdown
    both render these)."""
    return " <br>".join(str(text).replace("|", r"\|").splitlines()) or " "


def _md_row(cells) -> str:
    return "| " + " | ".join(md_cell(inline_markdown(c)) for c in cells) + " |"


def _md_table(columns, rows) -> str:
    """A whole Markdown table; every cell through :func:`md_cell`."""
    lines = [_md_row(columns), "|" + "---|" * len(columns)]
    lines += [_md_row(list(row) + [""] * (len(columns) - len(row))) for row in rows]
    return "\n".join(lines)


def json_clean(value):
    """``value`` made strictly JSON-serialisable: NaN/±inf → ``None``, intervals and parts → dicts, tuples →
    lists, NumPy scalars → Python numbers, anything else unknown → its ``str``."""
    if isinstance(value, Interval):
        value = value.to_dict()
    if hasattr(value, "to_dict") and not isinstance(value, dict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
        return json_clean(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _agrees(value) -> str:
    return {True: "yes", False: "no", None: "—"}[value]


def _css_class(verdict: str) -> str:
    return "verdict-" + re.sub(r"[^a-z]+", "-", verdict.lower()).strip("-")


# ---------------------------------------------------------------------------------------------- the study
def _study_metadata(profile: dict, claims, rows: dict, seconds, ran: int | None = None) -> dict:
    """What was run, on what, when: shown in the appendix and saved in verdicts.json. ``seconds`` and
    ``ran``: the wall time of the last ``bnlab study`` and how many runs it executed (None: not recorded)."""
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in ("done", "diverged", "failed")}
    versions = _distinct(r.get("versions") for r in rows.values())
    hardware = _distinct({k: v for k, v in (r.get("hardware") or {}).items() if v} for r in rows.values())
    finished = [r["finished"] for r in rows.values() if r.get("finished")]
    when = (datetime.datetime.fromtimestamp(max(finished), datetime.timezone.utc).isoformat(timespec="seconds")
            if finished else None)
    seeds = profile.get("seeds")
    return {"profile": profile.get("name"), "description": profile.get("description"), "dataset": profile.get("dataset"),
            "seeds": list(range(seeds)) if isinstance(seeds, int) else seeds, "claims": list(claims),
            "runs": {"total": len(rows), **counts}, "run_seconds": seconds, "last_run_count": ran,
            "last_run_finished": when,
            "versions": versions, "hardware": hardware}


def _distinct(dicts) -> list[dict]:
    out = []
    for d in dicts:
        if d and d not in out:
            out.append(d)
    return out


def _describe(dicts) -> str:
    return "; ".join(", ".join(f"{k} {v}" for k, v in d.items()) for d in dicts) or "n/a"


# the tables a section folds: marked by its claim, and the "ours | paper | setting" table of
# bnlab.study.common.paper_table, which states how the design differs from the paper's
_PAPER_COLUMNS = ["quantity", "ours", "paper", "setting"]
EVIDENCE_COLUMNS = ["part", "effect: mean [interval]", "holds above · absent below", "seeds", "outcome"]


def _folded(table: dict) -> bool:
    return bool(table.get("details", list(table["columns"]) == _PAPER_COLUMNS))


def _table_view(t: dict) -> dict:
    return {"title": t["title"], "columns": list(t["columns"]),
            "rows": [list(r) + [""] * (len(t["columns"]) - len(r)) for r in t["rows"]],
            "markdown": _md_table(t["columns"], t["rows"])}


def evidence_rows(parts: list[Part]) -> list[list[str]]:
    """The compact evidence table of a claim's section, one row per part (:data:`EVIDENCE_COLUMNS`): its
    effect with its interval (and as a factor, for a log10 ratio), the rule's threshold and margin, the seeds
    and the outcome, with roughly how many more seeds would decide an undecided part."""
    rows = []
    for p in parts:
        interval, unit = p.effect.interval, p.rule.unit
        digits = 1 if unit == "points" else 2
        effect = interval.text(digits)
        if unit == "decades" and interval.finite:
            effect += f" (×{10 ** interval.mean:.3g} [{10 ** interval.low:.3g}, {10 ** interval.high:.3g}])"
        level = "" if p.level == CONFIDENCE else f" ({100 * p.level:.1f}".rstrip("0").rstrip(".") + "% interval)"
        unit_text = f" {unit}" if unit else ""
        if p.outcome == UNDECIDED:
            n = answers.more_seeds(p)
            outcome = (f"undecided: about {n} more seed{'s' if n != 1 else ''} would decide it" if n is not None
                       else "undecided: between margin and threshold")
        elif p.outcome == REFUTED:
            outcome = "refuted (reversed)" if p.reversed else "refuted (absent)"
        elif p.outcome == NO_DATA:
            outcome = "no data (fewer than 3 finished seeds)"
        else:
            outcome = HOLDS
        rows.append([p.rule.name, effect, f"{p.rule.threshold:g} · {p.rule.margin:g}{unit_text}",
                     f"{p.effect.n}{level}", outcome])
    return rows


def _answer(c: ClaimResult) -> str:
    """The claim's plain answer; a claim that wrote none gets one from its parts' rule names."""
    if c.answer:
        return c.answer
    return answers.generic(c.verdict.parts) if c.verdict.parts else f"The verdict is “{c.verdict.verdict}”."


def _claim_view(c: ClaimResult, figures: list[dict], several: bool) -> dict:
    verdict = c.verdict
    tables = [t for t in c.tables if not _folded(t)]
    folded = [t for t in c.tables if _folded(t)]
    evidence = evidence_rows(verdict.parts)
    robust = c.robust or {"answer": verdict.verdict, "text": ""}
    answer = _answer(c)
    if several and c.scope:
        answer = f"In {c.scope['setting']}: {answer}"
    return {"number": c.number, "title": c.title, "verdict": verdict.verdict, "css": _css_class(verdict.verdict),
            "badge_text": robust["answer"] if several else verdict.verdict,
            "card_css": _css_class(robust["answer"] if several else verdict.verdict), "answer": answer,
            "key_number": verdict.key_number, "explanation": verdict.explanation,
            "explanation_folded": not c.paragraphs and bool(verdict.explanation),
            "paragraphs": list(c.paragraphs), "details": list(c.details),
            "parts": [p.text() for p in verdict.parts], "failed_runs": c.failed_runs, "rule": c.rule,
            "literature": c.literature, "literature_short": c.finding or c.literature, "expected": c.expected,
            "literature_brief": f"{(c.finding or c.literature).split(':', 1)[0]}: {c.expected}",
            "agrees": _agrees(c.agrees_with_literature), "caveats": c.caveats, "differences": list(c.differences),
            "tables": [_table_view(t) for t in tables], "folded_tables": [_table_view(t) for t in folded],
            "evidence": evidence, "evidence_columns": EVIDENCE_COLUMNS,
            "evidence_markdown": _md_table(EVIDENCE_COLUMNS, evidence) if evidence else "",
            "lead": figures[0] if figures else None, "figures": figures[1:], "error": c.error,
            "scope": _scope_text(c.scope),
            "across": [{**a, "css": _css_class(a["verdict"]), "seeds_text": _seeds_text(a)} for a in c.across],
            "robust": robust, "robust_css": _css_class(robust["answer"]), "across_markdown": _md_table(
                ["setting", "verdict", "key number", "seeds"],
                [[a["setting"], f"**{a['verdict']}**", a["key_number"], _seeds_text(a)] for a in c.across])}


def _seeds_text(scope: dict) -> str:
    if not scope:
        return ""
    text = f"{scope['seeds']}"
    if scope.get("looks", 1) > 1:
        text += (f" of up to {scope['max_seeds']} (look {scope['look']} of {scope['looks']}, "
                 f"{100 * scope['confidence']:.1f}".rstrip("0").rstrip(".") + "% intervals)")
    return text


def _scope_text(scope: dict) -> str:
    """"Judged on mnist1d, ResNet-8 with 6 seeds" (and the look, under a sequential design)."""
    return f"Judged on {scope['setting']} with {_seeds_text(scope)} seeds." if scope else ""


def _duration(seconds) -> str:
    """``253`` → "4 min 13 s"."""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(round(seconds % 60))} s"
    return f"{seconds / 3600:.1f} h"


def _first_screen_scope(profile: dict, study: dict, results: list[ClaimResult]) -> str:
    """The line under the title: dataset, model, seeds, settings, and the time (the profile's own
    description of it, and the last run's)."""
    import bnlab.data
    places = [r.across for r in results if r.across]
    labels = list(dict.fromkeys(a["setting"] for a in places[0])) if places else []
    seeds = len(profile.get("seeds") or study.get("seeds") or [])
    own = {n: (profile.get(c.SLUG) or {}).get("looks") for n, c in CLAIMS.items()}
    own = {n: looks for n, looks in own.items() if looks and any(r.number == n for r in results)}
    if profile.get("looks"):
        seeds_text = f"{profile['looks'][-1]} seeds (sequential seeds: " + ", ".join(map(str, profile["looks"])) + ")"
    else:
        seeds_text = f"{seeds} seeds"
    if own:
        seeds_text += "".join(f"; claim {n}: up to {looks[-1]} ({', '.join(map(str, looks))}"
                              + (", each part stopping when decided" if hasattr(CLAIMS[n], "part_looks") else "")
                              + ")" for n, looks in own.items())
    if len(labels) > 1:
        where = f"{len(labels)} settings ({'; '.join(labels)}), up to {seeds_text} in each"
    elif profile.get("dataset"):
        try:
            kind = "" if bnlab.data.is_image(profile["dataset"]) else "1-D "
        except Exception:  # noqa: BLE001 — an unknown dataset name still gets a scope line
            kind = ""
        where = (f"{dataset_label(profile)}, {kind}ResNet-{profile.get('depth', '?')} at width "
                 f"{profile.get('width', '?')}, {seeds_text}, one setting")
    else:
        where = seeds_text[:1].upper() + seeds_text[1:]
    time = profile_time(profile.get("description") or "")
    text = where + (f"; the {profile.get('name')} profile takes {time}" if time else "")
    if study.get("run_seconds") is not None and study.get("last_run_count"):
        last = f"last run: {_duration(study['run_seconds'])}"
        text += f"; {last}" if text.endswith(")") else f" ({last})"
    return text + "."


HOW_TO_READ = ("Every arm trained on the same seeds (paired seeds); each answer comes from the differences seed "
               "by seed, with 95% intervals, judged by rules fixed in code before any data. The badge is the "
               "verdict; each claim's section shows the evidence.")
STEPS_LIST = ["Batch statistics: the mean μ and variance σ² of the channel over the batch, every example and "
              "position.",
              "Normalize: x̂ = (x − μ) / √(σ² + ε), so that over the batch the channel has mean 0 and variance 1.",
              "Scale and shift: y = γ·x̂ + β, with γ and β learned like any other weight.",
              "Output: y goes on through the block. At inference (eval mode) BN uses running statistics, averaged "
              "over training, instead of the batch's: the same input then gives a slightly different output."]
STEPS_MISSING = ("This study's store holds no snapshot of a trained BN layer: its runs were stored before bnlab "
                 "recorded one. A new study (`bnlab study --out NEW`) records it in every BN run.")


def _steps_view(row: dict | None, figures_dir: Path) -> tuple[str, dict | None]:
    """The step-by-step section's introduction and, when a run recorded a snapshot, its figure (saved as
    figures/bn_steps.png) and numbers."""
    if row is None:
        return ("Batch normalization (BN) works channel by channel on a batch of activations, in four steps.",
                None)
    spec, snap = row["spec"], row["result"]["bn_snapshot"]
    intro = (f"Batch normalization (BN) works channel by channel on a batch of activations, in four steps. Here "
             f"they are on one real channel: channel {snap['channel']} of `{snap['layer']}`, the first BN of the "
             f"first residual block of a BN network this study trained ({spec.get('dataset')}, ResNet-"
             f"{spec.get('depth')}, seed {spec.get('seed')}, lr {spec.get('lr'):g}, {row['result'].get('steps')} "
             f"steps), on its first {snap['examples']} training examples.")
    fig = steps.figure(snap)
    data = png_bytes(fig["figure"])
    (figures_dir / f"{fig['name']}.png").write_bytes(data)
    columns = ["quantity", "what it is", "this channel"]
    rows = steps.numbers(snap)
    return intro, {"figure": {"title": fig["title"], "caption": fig["caption"], "path": f"figures/{fig['name']}.png",
                              "base64": base64.b64encode(data).decode()},
                   "columns": columns, "rows": rows, "markdown": _md_table(columns, rows)}


def render(results: list[ClaimResult], study: dict, out: str | Path, profile: dict | None = None,
           failures: list[dict] | None = None, store: str = "", snapshot: dict | None = None) -> Path:
    """Write report.md, report.html, figures/*.png (and the block diagram, figures/bn_in_block.svg) and
    verdicts.json for ``results`` in ``out``; return report.html. ``study`` is the metadata of
    :func:`_study_metadata`; ``profile`` the full profile; ``snapshot`` the stored run whose BN snapshot the
    step-by-step section draws (:func:`bnlab.study.steps.pick`; ``None``: the section says there is none)."""
    out = Path(out)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    (figures_dir / "bn_in_block.svg").write_text(BLOCK_SVG, encoding="utf-8")
    several = any(len(c.across) > 1 for c in results)
    views = []
    for c in results:
        figures = []
        for f in c.figures:
            data = png_bytes(f["figure"])
            (figures_dir / f"{f['name']}.png").write_bytes(data)
            figures.append({"title": f["title"], "caption": f.get("caption", ""), "path": f"figures/{f['name']}.png",
                            "base64": base64.b64encode(data).decode()})
        views.append(_claim_view(c, figures, several))
    runs = study["runs"]
    run_counts = (f"{runs['total']} runs: {runs['done']} done, {runs['diverged']} diverged, "
                  f"{runs['failed']} failed")
    ran = study.get("last_run_count")  # recorded with run_seconds; None in stores written before it was
    if ran == 0:
        run_counts += "; the last `bnlab study` found every run finished and ran none"
    elif ran is not None:
        run_counts += f"; the last `bnlab study` ran {ran} of them in {study['run_seconds']:.0f} s"
    elif study.get("run_seconds") is not None:
        run_counts += f"; the runs of the last `bnlab study` took {study['run_seconds']:.0f} s"
    profile = profile or {}
    run_info = (f"{dataset_label(profile) if profile.get('dataset') else 'n/a'}, ResNet-{profile.get('depth', '?')} "
                f"width {profile.get('width', '?')} unless a caption says otherwise, seeds {study['seeds']}")
    steps_intro, steps_view = _steps_view(snapshot, figures_dir)
    labels = list(dict.fromkeys(a["setting"] for a in results[0].across)) if results and several else []
    context = {"profile": profile, "study": study, "claims": views, "run_counts": run_counts, "store": store,
               "versions": _describe(study["versions"]), "hardware": _describe(study["hardware"]),
               "run_info": run_info, "failures": failures or [], "several": several, "setting_labels": labels,
               "scope": _first_screen_scope(profile, study, results), "how_to_read": HOW_TO_READ,
               "steps_intro": steps_intro, "steps_list": STEPS_LIST, "steps": steps_view,
               "steps_missing": STEPS_MISSING, "block_svg": Markup(BLOCK_SVG), "glossary": list(GLOSSARY.items()),
               "summary_markdown": _md_table(
                   ["#", "claim", "verdict", "key number [95% CI]", "literature", "agrees"],
                   [[v["number"], v["title"], f"**{v['verdict']}**", v["key_number"], v["literature_short"],
                     v["agrees"]] for v in views]),
               "settings_markdown": _md_table(
                   ["claim"] + labels + ["across them"],
                   [[v["number"]] + [f"**{a['verdict']}**" for a in v["across"]] + [f"**{v['robust']['answer']}**"]
                    for v in views]) if several else "",
               "profile_json": json.dumps(json_clean(profile), indent=2, ensure_ascii=False)}
    html = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html.filters["rich"] = inline_html
    markdown = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    markdown.filters.update(md=inline_markdown)
    (out / "report.md").write_text(link_glossary_markdown(markdown.from_string(MARKDOWN).render(**context)),
                                   encoding="utf-8")
    (out / "report.html").write_text(link_glossary(html.from_string(HTML).render(**context)), encoding="utf-8")
    verdicts = {"schema_version": SCHEMA_VERSION, "study": study, "claims": {
        str(c.number): {"title": c.title, "verdict": c.verdict.verdict, "expected": c.expected,
                        "agrees_with_literature": c.agrees_with_literature, "key_number": c.verdict.key_number,
                        "key_interval": c.verdict.key_interval, "answer": _answer(c),
                        "parts": [{**p.to_dict(), "text": p.text()} for p in c.verdict.parts],
                        "failed_runs": c.failed_runs, "error": c.error, "numbers": c.numbers,
                        "scope": c.scope, "settings": c.across, "robust": c.robust} for c in results}}
    (out / "verdicts.json").write_text(json.dumps(json_clean(verdicts), indent=2, ensure_ascii=False,
                                                  allow_nan=False) + "\n", encoding="utf-8")
    return out / "report.html"


# ---------------------------------------------------------------------------------------------- the glossary
# Each form of each glossary term is linked where it first appears: once in the page outside <details>, and
# once inside each <details> (a reader who opens one finds its terms linked). Never inside a link, code, a
# heading's <summary>, the diagram, the glossary itself or the page's head.
_TOKENS = re.compile(r"(<!--.*?-->|<[^>]*>)", re.S)
_NOT_LINKED = {"a", "code", "pre", "script", "style", "title", "svg", "summary", "dl", "head", "textarea"}
_FORMS = [((term, i), entry.slug, re.compile(form, re.I)) for term, entry in GLOSSARY.items()
          for i, form in enumerate(entry.forms)]


def _first_uses(text: str, seen: set) -> list[tuple[int, int, str]]:
    """(start, end, slug) of the first use of every form not yet ``seen`` in ``text``, non-overlapping, in
    order; marks them seen."""
    found = []
    for key, slug, pattern in _FORMS:
        if key not in seen and (match := pattern.search(text)):
            found.append((match.start(), match.end(), slug, key))
    chosen, end = [], -1
    for start, stop, slug, key in sorted(found):
        if start >= end:
            chosen.append((start, stop, slug))
            seen.add(key)
            end = stop
    return chosen


def link_glossary(html: str) -> str:
    """``html`` with the first use of every glossary term linked to its entry (``<a class="gloss"
    href="#gloss-slug">``)."""
    out, skipping, scopes = [], [], [set()]
    for token in _TOKENS.split(html):
        if token.startswith("<"):
            tag = re.match(r"<(/?)([A-Za-z][A-Za-z0-9]*)", token)
            if tag:
                closing, name = tag[1] == "/", tag[2].lower()
                if name == "details":
                    if closing and len(scopes) > 1:
                        scopes.pop()
                    elif not closing:
                        scopes.append(set())
                if name in _NOT_LINKED:
                    if closing and name in skipping:
                        del skipping[len(skipping) - 1 - skipping[::-1].index(name)]
                    elif not closing and not token.endswith("/>"):
                        skipping.append(name)
            out.append(token)
            continue
        if skipping or not token.strip():
            out.append(token)
            continue
        last = 0
        for start, stop, slug in _first_uses(token, scopes[-1]):
            out.append(token[last:start])
            out.append(f'<a class="gloss" href="#gloss-{slug}">{token[start:stop]}</a>')
            last = stop
        out.append(token[last:])
    return "".join(out)


# in a Markdown line: inline code, links and images, raw HTML and bare URLs are left as they are
_MD_OPAQUE = re.compile(r"(`[^`]*`|!?\[[^\]]*\]\([^)]*\)|<[^>]+>|https?://\S+)")


def link_glossary_markdown(text: str) -> str:
    """report.md with the first use of every glossary term linked to the glossary (``[term](#glossary)``),
    outside code blocks, headings, images, tables (which stay plain text for scripts that read them) and
    the glossary itself."""
    out, seen, fenced, in_glossary = [], set(), False, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        if line.startswith("## "):
            in_glossary = line.strip() == "## Glossary"
        if fenced or in_glossary or line.startswith(("#", "```", "![", "|")):
            out.append(line)
            continue
        pieces = _MD_OPAQUE.split(line)
        for i, piece in enumerate(pieces):
            if i % 2:
                continue
            last, linked = 0, []
            for start, stop, _ in _first_uses(piece, seen):
                linked += [piece[last:start], f"[{piece[start:stop]}](#glossary)"]
                last = stop
            pieces[i] = "".join(linked) + piece[last:]
        out.append("".join(pieces))
    return "".join(out)


def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (tried, not guessed from permission bits)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def build_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md, report.html, figures/*.png and verdicts.json for the study in ``directory`` (read
    only) into ``out`` (default: ``directory``); return report.html."""
    directory = Path(directory)
    path = directory / STORE_NAME
    if not path.is_file():
        raise UserError(f"no study store in {directory} (expected {path}); run `bnlab study --out {directory}` first")
    out = directory if out is None else Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; expected a directory for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the report directory {out} ({error.strerror}); choose another with --out") \
            from None
    if not _writable(out):
        hint = "write the report elsewhere with --out OTHER" if out == directory else "choose another --out"
        raise UserError(f"{out} is not writable; {hint}")
    store = Store(path, readonly=True)
    profile = store.get_meta("profile")
    claims = store.get_meta("claims", sorted(CLAIMS))
    if profile is None:
        raise UserError(f"{path} holds no profile; it was not written by `bnlab study`")
    rows = store.results()
    study = _study_metadata(profile, claims, rows, store.get_meta("last_run_seconds"),
                            store.get_meta("last_run_count"))
    from bnlab.study.specs import spec_label
    failures = [{"label": spec_label(r["spec"]), "error": (r["error"] or "").strip().splitlines()[-1:][0]
                 if r["error"] else ""} for r in rows.values() if r["status"] == "failed"]
    return render(analyze_claims(profile, rows, claims), study, out, profile, failures, str(path),
                  snapshot=steps.pick(rows))
