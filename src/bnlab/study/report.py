"""The report: read the store, ask each claim for its verdict, write report.md (+ PNGs) and report.html.

Nothing here trains: ``bnlab report DIR`` regenerates both files from ``DIR/study.sqlite``. The HTML
embeds every figure as base64 PNG so the one file opens offline; the Markdown links the PNG files in
``DIR/figures/``. ``DIR/verdicts.json`` holds the verdicts and key numbers for scripts.
"""

from __future__ import annotations

import base64
import io
import json
import math
import traceback
import warnings
from pathlib import Path

import jinja2
import matplotlib.pyplot as plt

from bnlab.study.claims import CLAIMS
from bnlab.study.runner import STORE_NAME
from bnlab.study.store import Store
from bnlab.study.templates import HTML, MARKDOWN
from bnlab.study.common import mark_failures
from bnlab.study.verdict import NO_VERDICT, SUPPORTED, ClaimResult, Interval, Verdict

__all__ = ["build_report", "analyze_claims"]


def analyze_claims(profile: dict, results: dict, claims) -> list[ClaimResult]:
    """Each claim's :class:`ClaimResult`; a claim whose analysis fails gets a placeholder with verdict
    "no verdict" naming the error. A claim with failed runs gets "no verdict" either way."""
    out = []
    for n in claims:
        module = CLAIMS[n]
        try:
            with warnings.catch_warnings():  # all-NaN slices (e.g. a diverged arm) are expected, not news
                warnings.simplefilter("ignore", RuntimeWarning)
                result = module.analyze(profile, results)
            result.error = None
        except Exception as error:  # noqa: BLE001 — the report must still be written
            nan = Interval(math.nan, math.nan, math.nan)
            result = ClaimResult(n, module.TITLE, Verdict(NO_VERDICT, "n/a", nan, "The analysis failed; see below."),
                                 module.LITERATURE, module.RULE, expected=getattr(module, "EXPECTED", SUPPORTED),
                                 caveats=["No verdict could be computed from the runs."],
                                 finding=getattr(module, "FINDING", ""))
            result.error = f"{type(error).__name__}: {error} — {traceback.format_exc(limit=-1).strip()}"
        out.append(mark_failures(module, profile, results, result))
    return out


def _agrees(value) -> str:
    return {True: "yes", False: "no", None: "—"}[value]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _json_default(value):
    if isinstance(value, Interval):
        return value.to_dict()
    return str(value)


def build_report(out: str | Path) -> Path:
    """Write report.md, report.html, figures/*.png and verdicts.json in ``out``; return report.html."""
    out = Path(out)
    path = out / STORE_NAME
    if not path.is_file():
        raise ValueError(f"no study store in {out} (expected {path}); run `bnlab study --out {out}` first")
    store = Store(path)
    profile = store.get_meta("profile")
    claims = store.get_meta("claims", sorted(CLAIMS))
    if profile is None:
        raise ValueError(f"{path} holds no profile; it was not written by `bnlab study`")
    rows = store.results()
    results = {k: r for k, r in rows.items()}
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in ("done", "diverged", "failed")}
    run_counts = f"{len(rows)} runs: {counts['done']} done, {counts['diverged']} diverged, {counts['failed']} failed"
    versions = "; ".join(sorted({", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())
                                 for r in rows.values()})) or "n/a"
    hardware = "; ".join(sorted({", ".join(f"{k}: {v}" for k, v in (r.get("hardware") or {}).items() if v)
                                 for r in rows.values()})) or "n/a"
    seconds = store.get_meta("last_run_seconds")
    if seconds is not None:
        run_counts += f"; the runs of the last `bnlab study` took {seconds:.0f} s"
    run_info = (f"[{profile['dataset']}, ResNet-{profile['depth']} width {profile['width']} unless stated, "
                f"seeds {profile['seeds']}; {versions}; {hardware}]")

    figures_dir = out / "figures"
    figures_dir.mkdir(exist_ok=True)
    analyzed = analyze_claims(profile, results, claims)
    views = []
    for c in analyzed:
        figures = []
        for f in c.figures:
            data = _png(f["figure"])
            (figures_dir / f"{f['name']}.png").write_bytes(data)
            figures.append({"title": f["title"], "caption": f.get("caption", ""), "path": f"figures/{f['name']}.png",
                            "base64": base64.b64encode(data).decode()})
        views.append({"number": c.number, "title": c.title, "verdict": c.verdict, "rule": c.rule,
                      "literature": c.literature, "literature_short": c.finding or c.literature,
                      "agrees": _agrees(c.agrees_with_literature), "caveats": c.caveats, "tables": c.tables,
                      "figures": figures, "error": getattr(c, "error", None)})
    from bnlab.study.specs import spec_label
    failures = [{"label": spec_label(r["spec"]), "error": (r["error"] or "").strip().splitlines()[-1:][0]
                 if r["error"] else ""} for r in rows.values() if r["status"] == "failed"]
    context = {"profile": profile, "claims": views, "run_counts": run_counts, "store": str(path),
               "versions": versions, "hardware": hardware, "run_info": run_info, "failures": failures,
               "profile_json": json.dumps(profile, indent=2)}
    (out / "report.md").write_text(jinja2.Template(MARKDOWN).render(**context))
    html = jinja2.Environment(autoescape=True).from_string(HTML).render(**context)
    (out / "report.html").write_text(html)
    verdicts = {c.number: {"title": c.title, "verdict": c.verdict.verdict, "key_number": c.verdict.key_number,
                           "key_interval": c.verdict.key_interval.to_dict(), "agrees_with_literature":
                           c.agrees_with_literature, "failed_runs": c.failed_runs, "numbers": c.numbers}
                for c in analyzed}
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=2, default=_json_default))
    return out / "report.html"
