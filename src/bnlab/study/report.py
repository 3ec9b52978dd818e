"""The report: read the store, ask each claim for its verdict, write report.md (+ PNGs) and report.html.

Each claim is analyzed by :func:`analyze`: its ``decide`` turns the stored runs into findings, its
``render`` formats them, and a claim with failed runs gets no verdict (:func:`mark_failures`).

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
from bnlab.study.claims import CLAIMS
from bnlab.study.common import count_failed, dataset_label, json_safe
from bnlab.study.runner import STORE_NAME
from bnlab.study.scope import at_look, robust, settings
from bnlab.study.store import Store
from bnlab.study.style import png_bytes
from bnlab.study.templates import HTML, MARKDOWN
from bnlab.study.verdict import NO_VERDICT, ClaimResult, Interval, Verdict, at_confidence

__all__ = ["SCHEMA_VERSION", "build_report", "analyze", "mark_failures", "analyze_claims", "render", "md_cell",
           "inline_html", "inline_markdown", "json_clean"]

# of verdicts.json: {"schema_version", "study": {...}, "claims": {"1": {...}, ...}}; 3 added per claim "scope"
# (setting, seeds, look, confidence), "settings" (one verdict per setting) and "robust" (the answer across them)
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
                            "seeds": len(look.seeds), "max_seeds": len(place.profile["seeds"]),
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


def _claim_view(c: ClaimResult, figures: list[dict]) -> dict:
    verdict = c.verdict
    return {"number": c.number, "title": c.title, "verdict": verdict.verdict, "css": _css_class(verdict.verdict),
            "key_number": verdict.key_number, "explanation": verdict.explanation,
            "parts": [p.text() for p in verdict.parts], "failed_runs": c.failed_runs, "rule": c.rule,
            "literature": c.literature, "literature_short": c.finding or c.literature, "expected": c.expected,
            "agrees": _agrees(c.agrees_with_literature), "caveats": c.caveats,
            "tables": [{"title": t["title"], "columns": list(t["columns"]),
                        "rows": [list(r) + [""] * (len(t["columns"]) - len(r)) for r in t["rows"]],
                        "markdown": _md_table(t["columns"], t["rows"])} for t in c.tables],
            "figures": figures, "error": c.error, "scope": _scope_text(c.scope),
            "across": [{**a, "css": _css_class(a["verdict"]), "seeds_text": _seeds_text(a)} for a in c.across],
            "robust": c.robust, "robust_css": _css_class(c.robust.get("answer", "")), "across_markdown": _md_table(
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
    """"Judged on mnist1d, ResNet-8, 6 seeds" (and the look, under a sequential design)."""
    return f"Judged on {scope['setting']} with {_seeds_text(scope)} seeds." if scope else ""


def render(results: list[ClaimResult], study: dict, out: str | Path, profile: dict | None = None,
           failures: list[dict] | None = None, store: str = "") -> Path:
    """Write report.md, report.html, figures/*.png and verdicts.json for ``results`` in ``out``; return
    report.html. ``study`` is the metadata of :func:`_study_metadata`; ``profile`` the full profile."""
    out = Path(out)
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    views = []
    for c in results:
        figures = []
        for f in c.figures:
            data = png_bytes(f["figure"])
            (figures_dir / f"{f['name']}.png").write_bytes(data)
            figures.append({"title": f["title"], "caption": f.get("caption", ""), "path": f"figures/{f['name']}.png",
                            "base64": base64.b64encode(data).decode()})
        views.append(_claim_view(c, figures))
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
    context = {"profile": profile, "study": study, "claims": views, "run_counts": run_counts, "store": store,
               "versions": _describe(study["versions"]), "hardware": _describe(study["hardware"]),
               "run_info": run_info, "failures": failures or [],
               "summary_markdown": _md_table(
                   ["#", "claim", "verdict", "key number [95% CI]", "literature", "agrees"],
                   [[v["number"], v["title"], f"**{v['verdict']}**", v["key_number"], v["literature_short"],
                     v["agrees"]] for v in views]),
               "profile_json": json.dumps(json_clean(profile), indent=2, ensure_ascii=False)}
    html = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html.filters["rich"] = inline_html
    markdown = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    markdown.filters.update(md=inline_markdown)
    (out / "report.md").write_text(markdown.from_string(MARKDOWN).render(**context), encoding="utf-8")
    (out / "report.html").write_text(html.from_string(HTML).render(**context), encoding="utf-8")
    verdicts = {"schema_version": SCHEMA_VERSION, "study": study, "claims": {
        str(c.number): {"title": c.title, "verdict": c.verdict.verdict, "expected": c.expected,
                        "agrees_with_literature": c.agrees_with_literature, "key_number": c.verdict.key_number,
                        "key_interval": c.verdict.key_interval,
                        "parts": [{**p.to_dict(), "text": p.text()} for p in c.verdict.parts],
                        "failed_runs": c.failed_runs, "error": c.error, "numbers": c.numbers,
                        "scope": c.scope, "settings": c.across, "robust": c.robust} for c in results}}
    (out / "verdicts.json").write_text(json.dumps(json_clean(verdicts), indent=2, ensure_ascii=False,
                                                  allow_nan=False) + "\n", encoding="utf-8")
    return out / "report.html"


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
    return render(analyze_claims(profile, rows, claims), study, out, profile, failures, str(path))
